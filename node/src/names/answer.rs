//! What the name server says to one query, decided without I/O: an answer
//! from the table for `<name>.<domain>` and for the reverse names of
//! container addresses, or "forward it" for everything else.
//!
//! Every packet comes from a container, so any of it may be hostile:
//! nothing here panics on any input, responses are never answered (no
//! loops), and an answer that does not fit the client's buffer is sent
//! truncated (TC) so it asks again over TCP.

use super::NameTable;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_config::DnsName;

/// TTL of local answers: short, names follow containers.
pub const TTL: u32 = 5;

/// The largest UDP answer offered to clients with EDNS (the size DNS flag
/// day 2020 settled on: no fragmentation).
pub const EDNS_PAYLOAD: u16 = 1232;

/// What the server answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Names are `<name>.<domain>`.
    pub domain: DnsName,
    /// The cluster's networks: reverse names of addresses in them are
    /// answered here (NXDOMAIN when no container has the address), never
    /// asked of the host's resolvers.
    pub networks: Vec<IpNet>,
}

/// The server's decision.
#[derive(Debug)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not a name of ours: ask the host's resolvers.
    Forward(Box<Message>),
    /// Say nothing (a response, or too short to carry an ID).
    Drop,
}

/// An error answer built from the raw header alone (the rest did not parse).
fn raw_error(packet: &[u8], code: ResponseCode) -> Outcome {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let mut out = vec![0u8; 12];
    out[0] = packet[0];
    out[1] = packet[1];
    // QR, the opcode as asked, RD as asked; RA.
    out[2] = 0x80 | (packet[2] & 0x79);
    out[3] = 0x80 | (u16::from(code) as u8 & 0x0f);
    Outcome::Reply(out)
}

/// The reply to `query` with `code` and `answers`, fitted to `limit` bytes.
fn reply(
    query: &Message,
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    limit: usize,
) -> Outcome {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(authoritative)
        .set_response_code(code);
    m.add_queries(query.queries().iter().cloned());
    if query.extensions().is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(e);
    }
    m.add_answers(answers);
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Outcome::Reply(bytes),
        Ok(_) => match m.truncate().to_vec() {
            Ok(bytes) => Outcome::Reply(bytes),
            Err(_) => Outcome::Drop,
        },
        Err(_) => Outcome::Drop,
    }
}

/// How large a UDP answer may be for this query.
pub fn udp_limit(query: &Message) -> usize {
    match query.extensions() {
        Some(e) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
        None => 512,
    }
}

/// The address a reverse name stands for (`5.3.244.10.in-addr.arpa`).
fn reverse_address(labels: &[&str]) -> Option<IpAddr> {
    match labels {
        [rest @ .., "in-addr", "arpa"] if rest.len() == 4 => {
            let mut octets = [0u8; 4];
            for (i, l) in rest.iter().rev().enumerate() {
                if l.is_empty() || l.len() > 3 || (l.len() > 1 && l.starts_with('0')) {
                    return None;
                }
                octets[i] = l.parse().ok()?;
            }
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        [rest @ .., "ip6", "arpa"] if rest.len() == 32 => {
            let mut n: u128 = 0;
            for l in rest.iter().rev() {
                let [c] = l.as_bytes() else { return None };
                n = (n << 4) | u128::from((*c as char).to_digit(16)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(n)))
        }
        _ => None,
    }
}

/// Decides what to say to `packet`. `turn` rotates the order of a name's
/// addresses from one answer to the next; `limit` is the most bytes the
/// answer may have (the client's UDP buffer, or 65535 over TCP).
pub fn answer(packet: &[u8], zone: &Zone, table: &NameTable, turn: usize, tcp: bool) -> Outcome {
    // A query has one question, no answers and no authority, and at most
    // an OPT (and a signature) in the additional section. Anything else is
    // refused from the header alone: the parser sizes its vectors by these
    // counts, and 65535 of each would cost megabytes per packet.
    if packet.len() < 12 {
        return Outcome::Drop;
    }
    let count = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 2 {
        return raw_error(packet, ResponseCode::FormErr);
    }
    let query = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return raw_error(packet, ResponseCode::FormErr),
    };
    if query.message_type() != MessageType::Query {
        return Outcome::Drop;
    }
    let limit = if tcp { 65535 } else { udp_limit(&query) };
    if query.op_code() != OpCode::Query {
        return reply(&query, ResponseCode::NotImp, false, vec![], limit);
    }
    let [q] = query.queries() else {
        return reply(&query, ResponseCode::FormErr, false, vec![], limit);
    };
    let ascii = q.name().to_lowercase().to_ascii();
    let text = ascii.trim_end_matches('.');
    let labels: Vec<&str> = text.split('.').collect();
    let domain = zone.domain.as_str();
    let local = if text == domain {
        Some("")
    } else {
        text.strip_suffix(domain)
            .and_then(|rest| rest.strip_suffix('.'))
    };
    if let Some(local) = local {
        if q.query_class() != DNSClass::IN {
            return reply(&query, ResponseCode::Refused, true, vec![], limit);
        }
        if local.is_empty() {
            return reply(&query, ResponseCode::NoError, true, vec![], limit);
        }
        let Ok(name) = local.parse::<DnsName>() else {
            return reply(&query, ResponseCode::NXDomain, true, vec![], limit);
        };
        let Some(addrs) = table.addresses(&name) else {
            let code = if table.has_below(&name) {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            return reply(&query, code, true, vec![], limit);
        };
        let want = q.query_type();
        let mut picked: Vec<IpAddr> = addrs
            .filter(|a| match want {
                RecordType::A => a.is_ipv4(),
                RecordType::AAAA => a.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .collect();
        if !picked.is_empty() {
            let n = turn % picked.len();
            picked.rotate_left(n);
        }
        let owner = q.name().clone();
        let records = picked
            .into_iter()
            .map(|a| {
                let data = match a {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                Record::from_rdata(owner.clone(), TTL, data)
            })
            .collect();
        return reply(&query, ResponseCode::NoError, true, records, limit);
    }
    if let Some(addr) = reverse_address(&labels) {
        let names: Vec<&DnsName> = table.names_of(addr).collect();
        let ours = zone.networks.iter().any(|n| n.contains(&addr));
        if !names.is_empty() || ours {
            if q.query_class() != DNSClass::IN {
                return reply(&query, ResponseCode::Refused, true, vec![], limit);
            }
            if names.is_empty() {
                return reply(&query, ResponseCode::NXDomain, true, vec![], limit);
            }
            if !matches!(q.query_type(), RecordType::PTR | RecordType::ANY) {
                return reply(&query, ResponseCode::NoError, true, vec![], limit);
            }
            let records = names
                .into_iter()
                .filter_map(|n| Name::from_ascii(format!("{}.", n.within(&zone.domain))).ok())
                .map(|target| Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(target))))
                .collect();
            return reply(&query, ResponseCode::NoError, true, records, limit);
        }
    }
    Outcome::Forward(Box::new(query))
}

/// A SERVFAIL for `query` (the host's resolvers did not answer).
pub fn server_failure(query: &Message, tcp: bool) -> Vec<u8> {
    let limit = if tcp { 65535 } else { udp_limit(query) };
    match reply(query, ResponseCode::ServFail, false, vec![], limit) {
        Outcome::Reply(b) => b,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use weft_lease::names::NameRecord;
    use weft_lease::NodeName;

    fn zone() -> Zone {
        Zone {
            domain: "weft".parse().unwrap(),
            networks: vec!["10.244.0.0/16".parse().unwrap()],
        }
    }

    fn table(records: &[(&str, &str)]) -> NameTable {
        let mut t = NameTable::default();
        t.load(
            1,
            records.iter().map(|(n, a)| NameRecord {
                name: n.parse().unwrap(),
                address: a.parse().unwrap(),
                node: Some(NodeName::new("host-1").unwrap()),
                container_id: None,
            }),
        );
        t
    }

    fn ask(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn reply_of(o: Outcome) -> Message {
        match o {
            Outcome::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers()
            .iter()
            .map(|r| match r.data() {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                RData::PTR(p) => p.0.to_ascii(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn names_answer_with_every_address_in_turn() {
        let t = table(&[
            ("web", "10.244.1.5"),
            ("web", "10.244.2.5"),
            ("web", "10.244.3.5"),
            ("web", "fdc6:7765:6675:1::5"),
        ]);
        let first = reply_of(answer(
            &ask("Web.WEFT.", RecordType::A, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(first.id(), 0x1234);
        assert_eq!(first.response_code(), ResponseCode::NoError);
        assert!(first.authoritative() && first.recursion_available());
        assert_eq!(addrs(&first), ["10.244.1.5", "10.244.2.5", "10.244.3.5"]);
        assert!(first.answers().iter().all(|r| r.ttl() == TTL));
        let next = reply_of(answer(
            &ask("web.weft.", RecordType::A, false),
            &zone(),
            &t,
            1,
            false,
        ));
        assert_eq!(addrs(&next), ["10.244.2.5", "10.244.3.5", "10.244.1.5"]);
        let v6 = reply_of(answer(
            &ask("web.weft.", RecordType::AAAA, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(addrs(&v6), ["fdc6:7765:6675:1::5"]);
        // No MX for a name: no data, but the name exists.
        let mx = reply_of(answer(
            &ask("web.weft.", RecordType::MX, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(
            (mx.response_code(), mx.answers().len()),
            (ResponseCode::NoError, 0)
        );
    }

    #[test]
    fn unknown_names_in_the_domain_do_not_exist_and_others_are_forwarded() {
        let t = table(&[("api.shop", "10.244.1.5")]);
        let m = reply_of(answer(
            &ask("nope.weft.", RecordType::A, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        assert!(m.authoritative());
        let m = reply_of(answer(
            &ask("shop.weft.", RecordType::A, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(
            m.response_code(),
            ResponseCode::NoError,
            "a name with names below it"
        );
        let m = reply_of(answer(
            &ask("bad_name.weft.", RecordType::A, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        let m = reply_of(answer(
            &ask("weft.", RecordType::A, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(m.response_code(), ResponseCode::NoError);
        for other in ["example.org.", "weft.example.org.", "xweft."] {
            match answer(&ask(other, RecordType::A, false), &zone(), &t, 0, false) {
                Outcome::Forward(q) => assert_eq!(q.id(), 0x1234),
                o => panic!("{other}: {o:?}"),
            }
        }
    }

    #[test]
    fn reverse_names_of_container_addresses() {
        let t = table(&[("web", "10.244.1.5"), ("db", "fdc6:7765:6675:1::5")]);
        let m = reply_of(answer(
            &ask("5.1.244.10.in-addr.arpa.", RecordType::PTR, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(addrs(&m), ["web.weft."]);
        let v6 = "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.5.7.6.6.5.6.7.7.6.c.d.f.ip6.arpa.";
        let m = reply_of(answer(
            &ask(v6, RecordType::PTR, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(addrs(&m), ["db.weft."]);
        // A pod address nobody has: ours to deny, never asked upstream.
        let m = reply_of(answer(
            &ask("9.9.244.10.in-addr.arpa.", RecordType::PTR, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        assert!(matches!(
            answer(
                &ask("1.0.0.127.in-addr.arpa.", RecordType::PTR, false),
                &zone(),
                &t,
                0,
                false
            ),
            Outcome::Forward(_)
        ));
        for bad in [
            &["01", "1", "244", "10", "in-addr", "arpa"][..],
            &["256", "1", "244", "10", "in-addr", "arpa"],
            &["1", "244", "10", "in-addr", "arpa"],
            &["g"; 32],
        ] {
            assert_eq!(reverse_address(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn garbage_and_responses_never_crash_or_loop() {
        let t = table(&[("web", "10.244.1.5")]);
        assert!(matches!(answer(&[], &zone(), &t, 0, false), Outcome::Drop));
        assert!(matches!(
            answer(&[1, 2, 3], &zone(), &t, 0, false),
            Outcome::Drop
        ));
        // A header then garbage: FORMERR with the ID.
        let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 40]);
        let m = reply_of(answer(&junk, &zone(), &t, 0, false));
        assert_eq!((m.id(), m.response_code()), (0xabcd, ResponseCode::FormErr));
        // A response is never answered.
        let mut resp = Message::from_vec(&ask("web.weft.", RecordType::A, false)).unwrap();
        resp.set_message_type(MessageType::Response);
        assert!(matches!(
            answer(&resp.to_vec().unwrap(), &zone(), &t, 0, false),
            Outcome::Drop
        ));
        let mut raw = resp.to_vec().unwrap();
        raw.truncate(14);
        assert!(matches!(answer(&raw, &zone(), &t, 0, false), Outcome::Drop));
        // Two questions; another opcode.
        let mut two = Message::from_vec(&ask("web.weft.", RecordType::A, false)).unwrap();
        two.add_query(Query::query(
            Name::from_ascii("x.weft.").unwrap(),
            RecordType::A,
        ));
        let m = reply_of(answer(&two.to_vec().unwrap(), &zone(), &t, 0, false));
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        // Huge counts in a bare header: refused before any parsing.
        let counts = [0x12, 0x34, 1, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let m = reply_of(answer(&counts, &zone(), &t, 0, false));
        assert_eq!((m.id(), m.response_code()), (0x1234, ResponseCode::FormErr));
        let mut notify = Message::from_vec(&ask("web.weft.", RecordType::A, false)).unwrap();
        notify.set_op_code(OpCode::Notify);
        let m = reply_of(answer(&notify.to_vec().unwrap(), &zone(), &t, 0, false));
        assert_eq!(m.response_code(), ResponseCode::NotImp);
        // Every prefix and every one-byte change of a good query.
        let good = ask("web.weft.", RecordType::A, true);
        for i in 0..good.len() {
            let _ = answer(&good[..i], &zone(), &t, 0, false);
            for b in [0u8, 0x3f, 0xc0, 0xff] {
                let mut p = good.clone();
                p[i] = b;
                let _ = answer(&p, &zone(), &t, 0, false);
            }
        }
    }

    #[test]
    fn answers_too_large_for_udp_are_truncated() {
        let many: Vec<(String, String)> = (1..=60)
            .map(|i| ("web".to_string(), format!("10.244.{i}.5")))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let t = table(&refs);
        let plain = reply_of(answer(
            &ask("web.weft.", RecordType::A, false),
            &zone(),
            &t,
            0,
            false,
        ));
        assert!(plain.truncated() && plain.answers().is_empty());
        let edns = reply_of(answer(
            &ask("web.weft.", RecordType::A, true),
            &zone(),
            &t,
            0,
            false,
        ));
        assert!(!edns.truncated());
        assert_eq!(edns.answers().len(), 60);
        let tcp = reply_of(answer(
            &ask("web.weft.", RecordType::A, false),
            &zone(),
            &t,
            0,
            true,
        ));
        assert_eq!(tcp.answers().len(), 60);
    }
}
