//! Asking a name server the way a container does: from a thread inside
//! the container's network namespace, over UDP or TCP.

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

/// How long one question waits for its answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A query for `name` (`web.weft.`) of type `rtype`.
pub fn query(name: &str, rtype: RecordType, id: u16) -> Result<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name)?, rtype));
    Ok(m.to_vec()?)
}

/// The addresses (or PTR names) an answer carries, in its order.
pub fn answers(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            RData::PTR(p) => Some(p.0.to_ascii()),
            _ => None,
        })
        .collect()
}

/// Sends `packet` to `server:53` over UDP from a fresh socket and reads
/// the answer with the same ID.
pub fn exchange_udp(server: IpAddr, packet: &[u8]) -> Result<Message> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(SocketAddr::new(server, 53))?;
    s.send(packet)?;
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let mut buf = vec![0u8; 65535];
    loop {
        let n = s.recv(&mut buf).context("no answer")?;
        let m = Message::from_vec(&buf[..n])?;
        if m.id() == id {
            return Ok(m);
        }
    }
}

/// The same over TCP (two-byte length, then the message).
pub fn exchange_tcp(server: IpAddr, packet: &[u8]) -> Result<Message> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(server, 53), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(&(packet.len() as u16).to_be_bytes())?;
    s.write_all(packet)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(Message::from_vec(&buf)?)
}

/// Asks `server` for `name`'s records of `rtype` from inside namespace
/// `ns`: the response code and the answers.
pub fn ask(
    ns: &str,
    server: IpAddr,
    name: &str,
    rtype: RecordType,
) -> Result<(ResponseCode, Vec<String>)> {
    let packet = query(name, rtype, rand_id())?;
    let m = crate::netns::in_ns(ns, move || exchange_udp(server, &packet))??;
    if m.truncated() {
        bail!("the answer for {name} came truncated over UDP");
    }
    Ok((m.response_code(), answers(&m)))
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t ^ (t >> 16)) as u16
}

/// `name`'s IPv4 addresses as `server` gives them from inside `ns`
/// (sorted), or the response code when there are none.
pub fn addresses(
    ns: &str,
    server: IpAddr,
    name: &str,
) -> Result<Result<Vec<String>, ResponseCode>> {
    let (code, mut got) = ask(ns, server, name, RecordType::A)?;
    if code != ResponseCode::NoError || got.is_empty() {
        return Ok(Err(code));
    }
    got.sort();
    Ok(Ok(got))
}
