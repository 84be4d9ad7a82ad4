//! Asking the host's resolvers (the `nameserver` lines of its
//! resolv.conf) for names that are not the cluster's, with a cache.
//!
//! Each query goes out with a fresh random ID from a socket of its own,
//! connected to one resolver, and only an answer with that ID and the same
//! question is taken. At most [`MAX_IN_FLIGHT`] are out at once: a flood
//! from a container gets SERVFAIL, not a flood of the host's resolvers.

use hickory_proto::op::{Message, MessageType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
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

/// Answers kept.
const CACHE_ENTRIES: usize = 10_000;

/// The longest an answer is kept, whatever its TTL.
const MAX_CACHE_TTL: u32 = 300;

/// How long "no such name" and "no such data" are kept when the answer
/// carries no SOA to say.
const NEGATIVE_TTL: u32 = 30;

type Key = (String, u16, u16, bool);

/// The host's resolvers and what they said.
#[derive(Debug)]
pub struct Forwarder {
    servers: Vec<SocketAddr>,
    cache: Mutex<HashMap<Key, (Vec<u8>, Instant)>>,
    in_flight: Semaphore,
}

/// The `nameserver` addresses of resolv.conf text, leaving out `exclude`
/// (the server's own addresses: forwarding to itself would loop).
pub fn nameservers(text: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|a| !exclude.contains(a) && !a.is_unspecified())
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

impl Forwarder {
    /// Resolvers from a resolv.conf file (none when it cannot be read:
    /// names outside the cluster then get SERVFAIL).
    pub fn from_resolv_conf(path: &Path, exclude: &[IpAddr]) -> Forwarder {
        let servers = match std::fs::read_to_string(path) {
            Ok(text) => nameservers(&text, exclude),
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot read the host's resolvers: {e}; names outside the cluster will not resolve");
                Vec::new()
            }
        };
        if servers.is_empty() {
            tracing::warn!(file = %path.display(), "no resolvers to forward to; names outside the cluster will not resolve");
        } else {
            tracing::info!(resolvers = ?servers, "names outside the cluster are forwarded");
        }
        Forwarder::new(servers)
    }

    pub fn new(servers: Vec<SocketAddr>) -> Forwarder {
        Forwarder {
            servers,
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// The answer to `query` from the cache or a resolver, with the
    /// client's ID; `None` when there is none to give (SERVFAIL).
    pub async fn resolve(&self, query: &Message, tcp: bool) -> Option<Vec<u8>> {
        let key = cache_key(query)?;
        if let Some(mut hit) = self.cached(&key) {
            hit[..2].copy_from_slice(&query.id().to_be_bytes());
            return Some(hit);
        }
        let _permit = self.in_flight.try_acquire().ok()?;
        let mut ours = query.clone();
        ours.set_id(rand::random());
        let bytes = ours.to_vec().ok()?;
        for server in &self.servers {
            let got = if tcp {
                ask_tcp(*server, &bytes).await
            } else {
                ask_udp(*server, &bytes).await
            };
            let Some(raw) = got else { continue };
            let Ok(msg) = Message::from_vec(&raw) else {
                continue;
            };
            if !matches(&ours, &msg) {
                continue;
            }
            if let Some(ttl) = cache_ttl(&msg) {
                self.keep(key, raw.clone(), ttl);
            }
            let mut raw = raw;
            raw[..2].copy_from_slice(&query.id().to_be_bytes());
            return Some(raw);
        }
        None
    }

    fn cached(&self, key: &Key) -> Option<Vec<u8>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(b, _)| b.clone())
    }

    fn keep(&self, key: Key, bytes: Vec<u8>, ttl: u32) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, until)| *until > now);
        }
        if cache.len() >= CACHE_ENTRIES {
            // Still full of live answers: forget all (simple, and a cache
            // this busy refills at once).
            cache.clear();
        }
        cache.insert(key, (bytes, now + Duration::from_secs(u64::from(ttl))));
    }

    /// Keeps only the resolvers `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(&SocketAddr) -> bool) {
        self.servers.retain(|s| keep(s));
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
        let got = nameservers(text, &["10.244.3.1".parse().unwrap()]);
        assert_eq!(
            got,
            [
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    /// A resolver on 127.0.0.1 that answers every A query with 127.0.0.9
    /// (TTL 60), counting the queries; `mangle` spoils its answers.
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
                r.add_answer(Record::from_rdata(
                    q.queries()[0].name().clone(),
                    60,
                    RData::A(A("127.0.0.9".parse().unwrap())),
                ));
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
        assert_eq!(Message::from_vec(&b).unwrap().id(), 8);
        assert_eq!(
            count.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the second came from the cache"
        );
        assert_eq!(f.cache_len(), 1);
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
