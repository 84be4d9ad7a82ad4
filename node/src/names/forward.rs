//! Asking the host's resolvers (the `nameserver` lines of its
//! resolv.conf) for names that are not the cluster's, with a cache.
//!
//! Each query goes out with a fresh random ID from a socket of its own,
//! connected to one resolver, and only an answer with that ID and the same
//! question is taken. At most [`MAX_IN_FLIGHT`] are out at once: a flood
//! from a container gets SERVFAIL, not a flood of the host's resolvers.

use hickory_proto::op::{Message, MessageType};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Queries to the host's resolvers at once.
pub const MAX_IN_FLIGHT: usize = 256;

/// How long one resolver gets to answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers kept, and the largest kept (bytes): at most 16 MiB in all.
const CACHE_ENTRIES: usize = 4096;
const MAX_CACHED_ANSWER: usize = 4096;

/// The longest an answer is kept, whatever its TTL.
const MAX_CACHE_TTL: u32 = 300;

/// How long "no such name" and "no such data" are kept when the answer
/// carries no SOA to say.
const NEGATIVE_TTL: u32 = 30;

/// How often resolv.conf is looked at for changes (DHCP, NetworkManager).
const RESOLV_CONF_CHECK: Duration = Duration::from_secs(5);

/// What an answer depends on besides the question: the name (lower
/// case), type and class, and the client's CD bit, EDNS and DO bit.
type Key = (String, u16, u16, bool, bool, bool);

/// A kept answer: when it came and until when it may be given.
#[derive(Debug)]
struct Kept {
    answer: Message,
    at: Instant,
    until: Instant,
}

/// The resolvers, as last read from resolv.conf.
#[derive(Debug)]
struct Resolvers {
    servers: Vec<SocketAddr>,
    /// The file and its modification time when read; `None`: fixed list.
    source: Option<(PathBuf, Option<std::time::SystemTime>)>,
    checked: Instant,
}

/// The host's resolvers and what they said.
#[derive(Debug)]
pub struct Forwarder {
    resolvers: Mutex<Resolvers>,
    /// Resolvers inside these networks are never used (forwarding into
    /// the pod network could reach this server again).
    exclude: Vec<IpNet>,
    cache: Mutex<HashMap<Key, Kept>>,
    in_flight: Semaphore,
}

/// The `nameserver` addresses of resolv.conf text, leaving out those in
/// `exclude`.
pub fn nameservers(text: &str, exclude: &[IpNet]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|a| !exclude.iter().any(|n| n.contains(a)) && !a.is_unspecified())
        .map(|a| SocketAddr::new(a, 53))
        .collect()
}

/// Whether an answer matches the question asked.
fn matches(asked: &Message, got: &Message) -> bool {
    got.message_type() == MessageType::Response
        && got.id() == asked.id()
        && got.queries().len() == asked.queries().len()
        && got.queries().iter().zip(asked.queries()).all(|(a, b)| {
            a.query_type() == b.query_type()
                && a.query_class() == b.query_class()
                && a.name().to_lowercase() == b.name().to_lowercase()
        })
}

fn cache_key(q: &Message) -> Option<Key> {
    let [query] = q.queries() else { return None };
    Some((
        query.name().to_lowercase().to_ascii(),
        u16::from(query.query_type()),
        u16::from(query.query_class()),
        q.checking_disabled(),
        q.extensions().is_some(),
        q.extensions().as_ref().is_some_and(|e| e.flags().dnssec_ok),
    ))
}

/// How long an answer may be kept: its smallest TTL; not at all when it
/// failed or was truncated.
fn cache_ttl(m: &Message) -> Option<u32> {
    use hickory_proto::op::ResponseCode;
    if m.truncated()
        || !matches!(
            m.response_code(),
            ResponseCode::NoError | ResponseCode::NXDomain
        )
    {
        return None;
    }
    let ttl = m
        .answers()
        .iter()
        .chain(m.name_servers())
        .map(|r| r.ttl())
        .min()
        .unwrap_or(NEGATIVE_TTL);
    (ttl > 0).then_some(ttl.min(MAX_CACHE_TTL))
}

fn read_resolvers(path: &Path, exclude: &[IpNet]) -> Vec<SocketAddr> {
    let servers = match std::fs::read_to_string(path) {
        Ok(text) => nameservers(&text, exclude),
        Err(e) => {
            tracing::warn!(file = %path.display(), "cannot read the host's resolvers: {e}; names outside the cluster will not resolve");
            return Vec::new();
        }
    };
    if servers.is_empty() {
        tracing::warn!(file = %path.display(), "no resolvers to forward to; names outside the cluster will not resolve");
    } else {
        tracing::info!(resolvers = ?servers, "names outside the cluster are forwarded");
    }
    servers
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

/// `bytes`, or when they do not fit `limit`, the answer truncated (TC: the
/// client asks again over TCP).
fn fitted(answer: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = answer.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    answer.truncate().to_vec().ok()
}

impl Forwarder {
    /// Resolvers from a resolv.conf file, read again when it changes;
    /// those inside `exclude` are never used.
    pub fn from_resolv_conf(path: &Path, exclude: Vec<IpNet>) -> Forwarder {
        let servers = read_resolvers(path, &exclude);
        let mut f = Forwarder::new(servers);
        f.exclude = exclude;
        f.resolvers
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .source = Some((path.to_owned(), modified(path)));
        f
    }

    /// A fixed list of resolvers.
    pub fn new(servers: Vec<SocketAddr>) -> Forwarder {
        Forwarder {
            resolvers: Mutex::new(Resolvers {
                servers,
                source: None,
                checked: Instant::now(),
            }),
            exclude: Vec::new(),
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// The resolvers now, reading resolv.conf again if it changed.
    fn servers(&self) -> Vec<SocketAddr> {
        let mut r = self.resolvers.lock().unwrap_or_else(|p| p.into_inner());
        if r.checked.elapsed() >= RESOLV_CONF_CHECK {
            r.checked = Instant::now();
            if let Some((path, seen)) = &r.source {
                let now = modified(path);
                if now != *seen {
                    let path = path.clone();
                    r.servers = read_resolvers(&path, &self.exclude);
                    r.source = Some((path, now));
                }
            }
        }
        r.servers.clone()
    }

    /// The answer to `query` from the cache or a resolver, with the
    /// client's ID and question, fitted to a UDP client's buffer; `None`
    /// when there is none to give (SERVFAIL).
    pub async fn resolve(&self, query: &Message, tcp: bool) -> Option<Vec<u8>> {
        let key = cache_key(query)?;
        let limit = if tcp {
            65535
        } else {
            super::answer::udp_limit(query)
        };
        if let Some(hit) = self.cached(&key, query) {
            return fitted(&hit, limit);
        }
        let _permit = self.in_flight.try_acquire().ok()?;
        let mut ours = query.clone();
        ours.set_id(rand::random());
        let bytes = ours.to_vec().ok()?;
        for server in self.servers() {
            let got = if tcp {
                ask_tcp(server, &bytes).await
            } else {
                ask_udp(server, &bytes).await
            };
            let Some(raw) = got else { continue };
            let Ok(mut msg) = Message::from_vec(&raw) else {
                continue;
            };
            if !matches(&ours, &msg) {
                continue;
            }
            if raw.len() <= MAX_CACHED_ANSWER {
                if let Some(ttl) = cache_ttl(&msg) {
                    self.keep(key, msg.clone(), ttl);
                }
            }
            msg.set_id(query.id());
            *msg.queries_mut() = query.queries().to_vec();
            return fitted(&msg, limit);
        }
        None
    }

    /// A kept answer for `query`: its ID and question (as the client
    /// spelled it), TTLs less the time it was kept.
    fn cached(&self, key: &Key, query: &Message) -> Option<Message> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let kept = cache.get(key).filter(|k| k.until > Instant::now())?;
        let mut m = kept.answer.clone();
        let aged = u32::try_from(kept.at.elapsed().as_secs()).unwrap_or(u32::MAX);
        drop(cache);
        m.set_id(query.id());
        *m.queries_mut() = query.queries().to_vec();
        for r in m.answers_mut().iter_mut() {
            r.set_ttl(r.ttl().saturating_sub(aged));
        }
        for r in m.name_servers_mut().iter_mut() {
            r.set_ttl(r.ttl().saturating_sub(aged));
        }
        Some(m)
    }

    fn keep(&self, key: Key, answer: Message, ttl: u32) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, k| k.until > now);
        }
        if cache.len() >= CACHE_ENTRIES {
            // Still full of live answers: the one nearest its end goes.
            if let Some(k) = cache
                .iter()
                .min_by_key(|(_, k)| k.until)
                .map(|(k, _)| k.clone())
            {
                cache.remove(&k);
            }
        }
        cache.insert(
            key,
            Kept {
                answer,
                at: now,
                until: now + Duration::from_secs(u64::from(ttl)),
            },
        );
    }

    /// Answers in the cache (for tests and metrics).
    pub fn cache_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

async fn ask_udp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = UdpSocket::bind(local).await.ok()?;
    sock.connect(server).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(ATTEMPT_TIMEOUT, sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    (n >= 12).then_some(buf)
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let exchange = async {
        let mut s = TcpStream::connect(server).await.ok()?;
        let len = u16::try_from(query.len()).ok()?;
        s.write_all(&len.to_be_bytes()).await.ok()?;
        s.write_all(query).await.ok()?;
        let n = s.read_u16().await.ok()?;
        let mut buf = vec![0u8; usize::from(n)];
        s.read_exact(&mut buf).await.ok()?;
        (buf.len() >= 12).then_some(buf)
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await.ok()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    #[test]
    fn resolvers_come_from_resolv_conf_without_ourselves() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nsearch x\nnameserver 10.244.3.1\nnameserver 0.0.0.0\nnameserver bogus\n";
        let got = nameservers(text, &["10.244.0.0/16".parse().unwrap()]);
        assert_eq!(
            got,
            [
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    /// A resolver on 127.0.0.1 that answers every A query with 127.0.0.9
    /// (TTL 60), counting the queries; `mangle` spoils its answers; names
    /// starting with `big` get 60 addresses.
    async fn resolver(mangle: bool) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = q.clone();
                r.set_message_type(MessageType::Response);
                let name = q.queries()[0].name().clone();
                let n = if name.to_ascii().starts_with("big") {
                    60
                } else {
                    1
                };
                for i in 0..n {
                    r.add_answer(Record::from_rdata(
                        name.clone(),
                        60,
                        RData::A(A(std::net::Ipv4Addr::new(127, 0, 1, i as u8))),
                    ));
                }
                if mangle {
                    r.set_id(q.id().wrapping_add(1));
                }
                let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
            }
        });
        (addr, count)
    }

    fn query(name: &str, id: u16) -> Message {
        let mut m = Message::new();
        m.set_id(id).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m
    }

    #[tokio::test]
    async fn answers_are_relayed_with_the_client_s_id_and_cached() {
        let (addr, count) = resolver(false).await;
        let f = Forwarder::new(vec![addr]);
        let a = f.resolve(&query("example.org.", 7), false).await.unwrap();
        let m = Message::from_vec(&a).unwrap();
        assert_eq!(m.id(), 7);
        assert_eq!(m.answers().len(), 1);
        let b = f.resolve(&query("EXAMPLE.org.", 8), false).await.unwrap();
        let b = Message::from_vec(&b).unwrap();
        assert_eq!(b.id(), 8);
        // The question as this client spelled it (some check it).
        assert_eq!(b.queries()[0].name().to_ascii(), "EXAMPLE.org.");
        assert!(b.answers()[0].ttl() <= 60);
        assert_eq!(
            count.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the second came from the cache"
        );
        assert_eq!(f.cache_len(), 1);
    }

    #[tokio::test]
    async fn answers_too_large_for_a_udp_client_are_truncated_also_from_the_cache() {
        let (addr, count) = resolver(false).await;
        let f = Forwarder::new(vec![addr]);
        // 60 addresses: over 512 bytes, under 1232. The fake resolver sends them over
        // UDP anyway; a client without EDNS gets TC and asks over TCP.
        let plain = f.resolve(&query("big.example.", 1), false).await.unwrap();
        let m = Message::from_vec(&plain).unwrap();
        assert!(plain.len() <= 512 && m.truncated() && m.answers().is_empty());
        let mut edns = query("big.example.", 2);
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(4096);
        edns.set_edns(e);
        let full = f.resolve(&edns, false).await.unwrap();
        assert_eq!(Message::from_vec(&full).unwrap().answers().len(), 60);
        // Cached per EDNS, so the plain client still gets TC from it.
        let again = f.resolve(&query("big.example.", 3), false).await.unwrap();
        assert!(Message::from_vec(&again).unwrap().truncated());
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_wrong_answer_or_no_resolver_is_no_answer() {
        let (addr, _) = resolver(true).await;
        let f = Forwarder::new(vec![addr]);
        assert!(f.resolve(&query("example.org.", 7), false).await.is_none());
        assert_eq!(f.cache_len(), 0);
        let none = Forwarder::new(vec![]);
        assert!(none
            .resolve(&query("example.org.", 7), false)
            .await
            .is_none());
    }
}
