//! The name server's sockets: UDP and TCP on the bridge gateway's
//! addresses (port 53), bound before weft-cni has made the bridge
//! (`IP_FREEBIND`), and bound again when the node's subnet changes.
//!
//! Limits, against a container that floods it: UDP queries are read one
//! at a time and local answers made at once; forwarded queries are limited
//! in number (the rest get SERVFAIL); at most [`MAX_TCP`] TCP connections,
//! [`MAX_TCP_PER_SOURCE`] from one address, each closed after [`TCP_IDLE`]
//! without a query, when an answer cannot be written within [`TCP_IDLE`],
//! and after [`TCP_QUERIES`] queries.

use super::answer::{answer, server_failure, Outcome, Zone};
use super::forward::Forwarder;
use super::Names;
use hickory_proto::op::Message;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// TCP connections served at once.
pub const MAX_TCP: usize = 64;

/// TCP connections from one address at once (one container cannot take
/// them all).
pub const MAX_TCP_PER_SOURCE: usize = 8;

/// A TCP connection without a query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// Queries on one TCP connection.
pub const TCP_QUERIES: usize = 1000;

/// How long until a socket that could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// What a server needs, shared by its sockets.
#[derive(Debug)]
pub struct Server {
    pub zone: Zone,
    pub names: Names,
    pub forwarder: Forwarder,
    turn: AtomicUsize,
}

impl Server {
    pub fn new(zone: Zone, names: Names, forwarder: Forwarder) -> Arc<Self> {
        Arc::new(Server {
            zone,
            names,
            forwarder,
            turn: AtomicUsize::new(0),
        })
    }

    /// What to say to one packet, from the table as it is now.
    fn decide(&self, packet: &[u8], tcp: bool) -> Outcome {
        let table = self.names.read();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        answer(packet, &self.zone, &table, turn, tcp)
    }

    /// The answer to one packet, forwarding when it is not ours.
    pub async fn respond(&self, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
        match self.decide(packet, tcp) {
            Outcome::Reply(b) => Some(b),
            Outcome::Drop => None,
            Outcome::Forward(q) => Some(self.forward(&q, tcp).await),
        }
    }

    async fn forward(&self, q: &Message, tcp: bool) -> Vec<u8> {
        match self.forwarder.resolve(q, tcp).await {
            Some(b) => b,
            None => server_failure(q, tcp),
        }
    }
}

fn socket(addr: SocketAddr, ty: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    // The bridge and its address may come later (weft-cni makes them with
    // the first container).
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// A UDP socket on `addr`.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(socket(addr, Type::DGRAM, Protocol::UDP)?.into())
}

/// A TCP listener on `addr`.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

/// Answers on one UDP socket, forever.
pub async fn serve_udp(server: Arc<Server>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("name server: receiving: {e}");
                continue;
            }
        };
        match server.decide(&buf[..n], false) {
            Outcome::Reply(b) => {
                let _ = sock.send_to(&b, from).await;
            }
            Outcome::Drop => {}
            Outcome::Forward(q) => {
                let (server, sock) = (server.clone(), sock.clone());
                tokio::spawn(async move {
                    let b = server.forward(&q, false).await;
                    let _ = sock.send_to(&b, from).await;
                });
            }
        }
    }
}

/// Connections per source address, given back on drop.
#[derive(Debug, Default)]
struct Sources(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct SourceSlot(Arc<Sources>, std::net::IpAddr);

impl Sources {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_TCP_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), ip))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Answers TCP connections on one listener, forever.
pub async fn serve_tcp(server: Arc<Server>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP));
    let sources = Arc::new(Sources::default());
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("name server: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over a limit: closed at once.
        let Some(source) = sources.take(from.ip()) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _slots = (slot, source);
            let _ = connection(&server, stream).await;
        });
    }
}

async fn connection(server: &Server, mut stream: TcpStream) -> std::io::Result<()> {
    for _ in 0..TCP_QUERIES {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => usize::from(n),
            _ => return Ok(()),
        };
        let mut packet = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let Some(reply) = server.respond(&packet, true).await else {
            continue;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&reply);
        // A client that does not read gives its place up.
        match tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Serves on the addresses `addrs` says (the bridge gateways; empty: none
/// yet), binding again whenever they change; an address that cannot be
/// bound (port 53 taken by another server, say) is tried again every few
/// seconds.
pub async fn run(server: Arc<Server>, mut addrs: watch::Receiver<Vec<SocketAddr>>) {
    loop {
        let now = addrs.borrow_and_update().clone();
        let mut sockets = JoinSet::new();
        let mut pending: Vec<SocketAddr> = now.clone();
        let mut told = std::collections::HashSet::new();
        loop {
            pending.retain(|addr| match (bind_udp(*addr), bind_tcp(*addr)) {
                (Ok(u), Ok(t)) => {
                    sockets.spawn(serve_udp(server.clone(), u));
                    sockets.spawn(serve_tcp(server.clone(), t));
                    tracing::info!(%addr, domain = %server.zone.domain, "name server listening (UDP and TCP)");
                    false
                }
                (u, t) => {
                    let e = u
                        .err()
                        .or(t.err())
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    if told.insert(*addr) {
                        tracing::error!(%addr, "name server cannot listen: {e}; containers on this node cannot resolve names until it can (trying again every {BIND_RETRY:?})");
                    }
                    true
                }
            });
            let retry = async {
                if pending.is_empty() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(BIND_RETRY).await
                }
            };
            tokio::select! {
                changed = addrs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = retry => {}
            }
        }
        sockets.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RData, RecordType};
    use weft_lease::names::NameRecord;
    use weft_lease::NodeName;

    fn server() -> Arc<Server> {
        let names = Names::default();
        names.update(|t| {
            t.load(
                1,
                [NameRecord {
                    name: "web".parse().unwrap(),
                    address: "10.244.1.5".parse().unwrap(),
                    node: Some(NodeName::new("host-1").unwrap()),
                    container_id: None,
                }],
            )
        });
        Server::new(
            Zone {
                domain: "weft".parse().unwrap(),
                networks: vec!["10.244.0.0/16".parse().unwrap()],
            },
            names,
            Forwarder::new(vec![]),
        )
    }

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(42);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[tokio::test]
    async fn udp_and_tcp_answer_and_floods_of_garbage_do_not_stop_them() {
        let s = server();
        let udp = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let uaddr = udp.local_addr().unwrap();
        let tcp = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let taddr = tcp.local_addr().unwrap();
        tokio::spawn(serve_udp(s.clone(), udp));
        tokio::spawn(serve_tcp(s.clone(), tcp));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(uaddr).await.unwrap();
        for i in 0..2000u32 {
            let junk: Vec<u8> = (0..(i % 600)).map(|j| (i * 31 + j) as u8).collect();
            client.send(&junk).await.unwrap();
        }
        // Answers to garbage (FORMERR) are drained; the real one comes.
        client.send(&query("web.weft.")).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let n = client.recv(&mut buf).await.unwrap();
                if let Ok(m) = Message::from_vec(&buf[..n]) {
                    if m.id() == 42 && !m.answers().is_empty() {
                        return m;
                    }
                }
            }
        })
        .await
        .expect("an answer after the flood");
        assert!(
            matches!(found.answers()[0].data(), RData::A(a) if a.0.to_string() == "10.244.1.5")
        );
        // TCP: a client that sends half a query and sits there does not
        // stop another; a forwarded name without resolvers is SERVFAIL.
        let mut idle = TcpStream::connect(taddr).await.unwrap();
        idle.write_all(&[0, 40, 1, 2]).await.unwrap();
        let mut c = TcpStream::connect(taddr).await.unwrap();
        for (name, code) in [("web.weft.", 0u8), ("example.org.", 2)] {
            let q = query(name);
            c.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
            c.write_all(&q).await.unwrap();
            let n = c.read_u16().await.unwrap();
            let mut r = vec![0u8; n as usize];
            c.read_exact(&mut r).await.unwrap();
            let m = Message::from_vec(&r).unwrap();
            assert_eq!(u16::from(m.response_code()) as u8, code, "{name}");
        }
        // One address holds at most MAX_TCP_PER_SOURCE connections: with
        // `idle` and `c` open, six more are served, the next is closed.
        let mut more = Vec::new();
        for _ in 0..MAX_TCP_PER_SOURCE - 2 {
            more.push(TcpStream::connect(taddr).await.unwrap());
        }
        let mut over = TcpStream::connect(taddr).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut b))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "the connection over the limit is closed");
        drop(more);
        drop(idle);
    }
}
