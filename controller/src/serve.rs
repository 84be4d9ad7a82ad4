//! Serving the API over HTTPS with client certificates: each connection's
//! verified certificate becomes the [`Caller`] of its requests.

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
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// A client that does not finish the handshake within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Likewise for a request's headers (slow clients hold no connection open).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long requests in flight may finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);

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
    run(listener, shared, tls, shutdown)
}

async fn run(
    listener: TcpListener,
    shared: Arc<crate::Shared>,
    tls: Arc<ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let router = crate::http::router(shared.clone());
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
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
                    peer,
                };
                conns.spawn(conn.run(tcp));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
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
    acceptor: TlsAcceptor,
    router: axum::Router,
    shared: Arc<crate::Shared>,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, tcp: tokio::net::TcpStream) {
        let peer = self.peer;
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.shared.metrics.tls_handshake_failures.inc();
                tracing::info!(%peer, "TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                self.shared.metrics.tls_handshake_failures.inc();
                tracing::info!(%peer, "TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}");
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
        let router = self.router;
        let service = tower::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(caller.clone());
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let mut closing = self.shared.closing.subscribe();
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
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
}
