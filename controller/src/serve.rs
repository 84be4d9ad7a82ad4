//! Serving the API: over HTTPS with client certificates, where each
//! connection's verified certificate becomes the [`Caller`] of its
//! requests, or over plain HTTP (loopback, `--insecure-listen`, the health
//! listener). Either way with the same limits: connections below the
//! open-files limit, a deadline for each request's headers (which also
//! closes idle keep-alive connections), and for TLS a bounded handshake.

use crate::tls::Caller;
use crate::Controller;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// A client that does not finish the handshake within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long requests in flight may finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);
/// Handshakes in flight at once: each costs a key exchange and a
/// signature before the client has proved anything; more wait in the
/// listen backlog.
const HANDSHAKES: usize = 256;
/// File descriptors kept for etcd, logs and the like.
const FD_MARGIN: u64 = 256;
/// Freed memory is given back at most this often, after at least
/// [`BURST`] connections closed since the last time.
const GIVE_BACK_EVERY: Duration = Duration::from_secs(10);
const BURST: u64 = 1000;

/// Gives memory back after bursts of connections: thousands of nodes
/// joining at once leave hundreds of MiB freed, which glibc would keep
/// resident (figures in bench/README.md, "At 50,000 nodes"). The walk over
/// the heaps runs on a blocking thread, not on a request thread; anyone
/// who can open connections can make it run at most every 10 s.
pub(crate) async fn give_back(shared: Arc<crate::Shared>) {
    let (mut at, mut in_burst) = (0, false);
    loop {
        tokio::time::sleep(GIVE_BACK_EVERY).await;
        let closed = shared.closed.load(std::sync::atomic::Ordering::Relaxed);
        let now;
        (now, in_burst) = give_back_now(closed - at, in_burst);
        if !now {
            continue;
        }
        at = closed;
        let t0 = std::time::Instant::now();
        let _ = tokio::task::spawn_blocking(weft_lease::memory::give_back).await;
        tracing::debug!(
            connections = closed,
            took = ?t0.elapsed(),
            "gave freed memory back to the system after a burst of connections"
        );
    }
}

/// Whether to give memory back at a tick, `since` connections having
/// closed since the last time, and whether a burst is still going on: at
/// every tick of a burst, and once more at the first quiet tick after it,
/// for what the burst's last connections freed.
fn give_back_now(since: u64, in_burst: bool) -> (bool, bool) {
    if since >= BURST {
        (true, true)
    } else {
        (in_burst, false)
    }
}

/// Counts a connection as closed when dropped, however it ended.
struct Closes(Arc<crate::Shared>);

impl Drop for Closes {
    fn drop(&mut self) {
        self.0
            .closed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many connections may be open at once: the open-files limit less a
/// margin, so that a flood of connections (anyone who reaches the port can
/// open them) makes new ones wait rather than making `accept`, etcd and
/// everything else fail.
pub fn connection_limit() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|x| x.starts_with("Max open files"))
                .and_then(|x| x.split_whitespace().nth(3)?.parse::<u64>().ok())
        })
        .unwrap_or(1024);
    usize::try_from(soft.saturating_sub(FD_MARGIN).max(64)).unwrap_or(usize::MAX)
}

/// Failed handshakes, logged at most once per interval with a count (a
/// scanner must not flood the log).
#[derive(Debug)]
struct FailureLog {
    state: std::sync::Mutex<(tokio::time::Instant, u64)>,
}

impl FailureLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn record(&self, peer: SocketAddr, why: &str) {
        tracing::debug!(%peer, "TLS handshake failed: {why}");
        let mut st = crate::lock(&self.state);
        st.1 += 1;
        if st.0.elapsed() >= Self::EVERY {
            tracing::info!(
                "{} TLS handshake(s) failed in the last {:?}; the last: {peer}: {why}",
                st.1,
                st.0.elapsed()
            );
            *st = (tokio::time::Instant::now(), 0);
        }
    }
}

/// Serves the API on `listener` over TLS with `tls` (which must require a
/// client certificate: [`crate::tls::ServerTlsFiles::config`]) until
/// `shutdown` resolves; then watch streams end, idle connections close, and
/// requests in flight get [`DRAIN`] to finish.
///
/// The future does not borrow `controller` (spawn it); the controller must
/// stay alive while it runs.
pub fn serve_tls(
    listener: TcpListener,
    controller: &Controller,
    tls: Arc<ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
    let shared = controller.shared.clone();
    let router = crate::http::router(shared.clone());
    let limit = connection_limit();
    run(
        listener,
        shared,
        router,
        Some(TlsAcceptor::from(tls)),
        limit,
        shutdown,
    )
}

/// Serves `router` over plain HTTP with the same limits, at most `limit`
/// connections at once; every request's caller is
/// [`Caller::Unauthenticated`] (the router decides what that may do).
pub(crate) fn serve_plain(
    listener: TcpListener,
    shared: Arc<crate::Shared>,
    router: axum::Router,
    limit: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
    run(listener, shared, router, None, limit, shutdown)
}

async fn run(
    listener: TcpListener,
    shared: Arc<crate::Shared>,
    router: axum::Router,
    acceptor: Option<TlsAcceptor>,
    limit: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if acceptor.is_some() {
        tracing::info!(
            "accepting up to {limit} connections at once, {HANDSHAKES} of them in the TLS handshake"
        );
    }
    let open = Arc::new(Semaphore::new(limit));
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    let failures = Arc::new(FailureLog {
        state: std::sync::Mutex::new((tokio::time::Instant::now(), 0)),
    });
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Room for one more connection and its handshake first; until then
        // new ones wait in the listen backlog.
        let permits = async {
            let conn = open.clone().acquire_owned().await;
            let hs = handshakes.clone().acquire_owned().await;
            (conn, hs)
        };
        let (conn_permit, hs_permit) = tokio::select! {
            _ = &mut shutdown => break,
            (Ok(c), Ok(h)) = permits => (c, h),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, say: wait, do not spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            acceptor: acceptor.clone(),
            router: router.clone(),
            shared: shared.clone(),
            failures: failures.clone(),
            peer,
        };
        conns.spawn(conn.run(tcp, conn_permit, hs_permit));
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
    }
    // No new connections during the drain: they would wait in the backlog
    // for nothing.
    drop(listener);
    shared.closing.send_replace(true);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(
            "{} connection(s) still open after {DRAIN:?}; closing them",
            conns.len()
        );
        conns.abort_all();
    }
    Ok(())
}

struct Connection {
    acceptor: Option<TlsAcceptor>,
    router: axum::Router,
    shared: Arc<crate::Shared>,
    failures: Arc<FailureLog>,
    peer: SocketAddr,
}

impl Connection {
    /// Serves one connection; `_open` is held while it is open, `handshake`
    /// until its handshake is done.
    async fn run(
        self,
        tcp: tokio::net::TcpStream,
        _open: OwnedSemaphorePermit,
        handshake: OwnedSemaphorePermit,
    ) {
        let peer = self.peer;
        let _closes = Closes(self.shared.clone());
        let Some(acceptor) = self.acceptor.clone() else {
            drop(handshake);
            let (router, shared) = (self.router, self.shared);
            return serve_connection(tcp, router, Caller::Unauthenticated, &shared, peer).await;
        };
        let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
        drop(handshake);
        let stream = match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.shared.metrics.tls_handshake_failures.inc();
                self.failures.record(peer, &e.to_string());
                return;
            }
            Err(_) => {
                self.shared.metrics.tls_handshake_failures.inc();
                self.failures
                    .record(peer, &format!("not finished within {HANDSHAKE_TIMEOUT:?}"));
                return;
            }
        };
        // The verifier required a certificate; without one there would be
        // no connection here. Fail closed all the same.
        let caller = match stream.get_ref().1.peer_certificates() {
            Some([leaf, ..]) => Caller::from_cert(leaf),
            _ => {
                tracing::warn!(%peer, "TLS connection without a client certificate; closing");
                return;
            }
        };
        tracing::debug!(%peer, %caller, "TLS connection");
        serve_connection(stream, self.router, caller, &self.shared, peer).await;
    }
}

/// HTTP/1.1 on one connection, every request as `caller`, until the
/// client closes, its headers are late, or the server shuts down.
async fn serve_connection<S>(
    stream: S,
    router: axum::Router,
    caller: Caller,
    shared: &crate::Shared,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = tower::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(caller.clone());
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut closing = shared.closing.subscribe();
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.opts.header_timeout)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { let _ = closing.wait_for(|c| *c).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_goes_back_during_a_burst_and_once_after_it() {
        // Quiet: nothing to give back.
        assert_eq!(give_back_now(0, false), (false, false));
        assert_eq!(give_back_now(BURST - 1, false), (false, false));
        // A burst, tick after tick.
        assert_eq!(give_back_now(BURST, false), (true, true));
        assert_eq!(give_back_now(5 * BURST, true), (true, true));
        // Its tail, fewer than a burst's worth: once more, then quiet.
        assert_eq!(give_back_now(BURST / 2, true), (true, false));
        assert_eq!(give_back_now(0, false), (false, false));
    }
}
