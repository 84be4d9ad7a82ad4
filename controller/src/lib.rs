//! The weft controller: hands out one subnet per node from the network in
//! the store (etcd), and serves the lease API of DESIGN.md over HTTP.
//!
//! One store watch feeds an in-memory [`cache`](Controller) of the config and
//! all leases; allocation picks from it and claims the subnet with a
//! compare-and-set, so several controllers can run against one etcd. Node
//! watch streams are served from the cache's history (fan-out), so etcd sees
//! one watch per controller however many nodes follow it.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use weft_controller::{Controller, Options};
//! use weft_lease::{EtcdOptions, EtcdStore};
//!
//! let store = EtcdStore::connect(EtcdOptions::new(vec!["http://127.0.0.1:2379".into()], "/weft/network")).await?;
//! let controller = Controller::start(Arc::new(store), Options::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! weft_controller::serve(listener, &controller, std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod auth;
mod cache;
mod error;
mod http;
mod limits;
mod metrics;
mod names;
mod ops;
mod serve;
mod sync;
pub mod tls;
mod validate;
mod watch;

pub use error::ControllerError;
pub use serve::{connection_limit, serve_tls};

use cache::Cache;
use metrics::Metrics;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;
use weft_lease::alloc::Occupancy;
use weft_lease::LeaseStore;

/// Tunables of a controller.
#[derive(Debug, Clone)]
pub struct Options {
    /// Interval of heartbeat lines on idle watch streams.
    pub heartbeat: Duration,
    /// Watch lines kept for streams that resume (older ones re-list).
    pub history: usize,
    /// ... and at most this many bytes of them.
    pub history_bytes: usize,
    /// Watch streams served at once (`--max-watchers`); more get 429.
    pub max_watchers: usize,
    /// A connection whose request headers take longer is closed; also the
    /// longest a keep-alive connection may sit idle.
    pub header_timeout: Duration,
    /// How often the store is pinged for readiness.
    pub health_interval: Duration,
    /// How long a write waits to show up in the cache before answering.
    pub write_wait: Duration,
    /// Set when the API is served without TLS on a non-loopback address
    /// (`--insecure-listen`): the warning `/readyz` carries.
    pub insecure: Option<String>,
    /// How long the subnet of a lease that ran out is held for its node
    /// (`None`: one TTL, at most 10 minutes; zero: not at all).
    pub expired_quarantine: Option<Duration>,
    /// Store changes are applied to the cache on a thread of its own (see
    /// `sync::Applier`: it keeps the cache's memory apart from the
    /// connections'). Off only for tests on tokio's paused clock, which
    /// moves on when the runtime is idle and cannot see that thread's work.
    pub cache_thread: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat: Duration::from_secs(10),
            history: 16_384,
            history_bytes: 64 << 20,
            max_watchers: 16_384,
            header_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(2),
            write_wait: Duration::from_secs(3),
            insecure: None,
            expired_quarantine: None,
            cache_thread: true,
        }
    }
}

/// Number of node lock stripes; acquires of one node never interleave.
const NODE_LOCK_STRIPES: usize = 1024;

/// State shared by the HTTP handlers and the background tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Arc<dyn LeaseStore>,
    pub cache: RwLock<Cache>,
    /// The store revision applied to the cache.
    pub applied: tokio_watch::Sender<i64>,
    /// The last store failure, while the store is failing.
    pub store_error: Mutex<Option<String>>,
    pub metrics: Metrics,
    pub node_locks: Vec<tokio::sync::Mutex<()>>,
    /// Subnets being claimed right now by this controller.
    pub in_flight: Mutex<Occupancy>,
    pub rng: Mutex<StdRng>,
    pub limits: limits::Limits,
    pub opts: Options,
    /// Set when the server shuts down: watch streams end so that graceful
    /// shutdown does not wait for them forever.
    pub closing: tokio_watch::Sender<bool>,
    /// A panic left the cache lock poisoned: the cache may be half
    /// updated. Requests get 503 and `/healthz` fails until the sync task
    /// has loaded it again from the store.
    pub damaged: AtomicBool,
    /// Wakes the sync task to reload after damage.
    pub reload: tokio::sync::Notify,
    /// Connections closed since the start (see [`serve::give_back`]).
    pub closed: AtomicU64,
}

/// Locks a mutex whose data stays valid whatever a panicking holder did
/// (counters, a message, the RNG): a panic elsewhere must not make every
/// later request panic too.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|p| {
            self.mark_damaged();
            p.into_inner()
        })
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|p| {
            self.mark_damaged();
            p.into_inner()
        })
    }

    /// Whether the cache can be trusted to serve from; notices a lock
    /// poisoned since the last look.
    pub(crate) fn damaged(&self) -> bool {
        if self.cache.is_poisoned() {
            self.mark_damaged();
        }
        self.damaged.load(Ordering::SeqCst)
    }

    fn mark_damaged(&self) {
        if !self.damaged.swap(true, Ordering::SeqCst) {
            tracing::error!(
                "a panic while the lease cache was locked may have left it half updated; \
                 answering 503 and reloading it from the store"
            );
            self.metrics.cache_reloads.inc();
            self.reload.notify_one();
        }
    }

    /// The cache was loaded afresh: it can be served from again.
    pub(crate) fn repaired(&self) {
        if self.damaged.swap(false, Ordering::SeqCst) {
            tracing::info!("lease cache reloaded from the store after the panic; serving again");
        }
    }

    /// Records a store failure (logged when the failure starts or changes).
    pub(crate) fn store_failed(&self, what: &str, err: &weft_lease::StoreError) {
        self.metrics.etcd_errors.inc();
        let msg = format!("{what}: {err}");
        let mut cur = lock(&self.store_error);
        if cur.as_deref() != Some(msg.as_str()) {
            tracing::warn!(store = %self.store.describe(), "{msg}");
        }
        *cur = Some(msg);
    }

    /// Records that the store answered.
    pub(crate) fn store_ok(&self) {
        let mut cur = lock(&self.store_error);
        if cur.take().is_some() {
            tracing::info!(store = %self.store.describe(), "store reachable again");
        }
    }

    /// Waits (bounded) until the cache has applied `revision`, so a client
    /// that wrote and then reads sees its write. Whether it has.
    pub(crate) async fn wait_applied(&self, revision: i64) -> bool {
        let mut rx = self.applied.subscribe();
        let wait = rx.wait_for(|r| *r >= revision);
        if !matches!(
            tokio::time::timeout(self.opts.write_wait, wait).await,
            Ok(Ok(_))
        ) {
            tracing::debug!(
                revision,
                "write not yet visible in the watch; answering anyway"
            );
            return false;
        }
        true
    }
}

/// A running controller: its state and background tasks. Dropping it stops
/// the tasks.
#[derive(Debug)]
pub struct Controller {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Starts the store sync and health tasks. Must run inside a tokio
    /// runtime. The store may be down: the controller reports not ready and
    /// keeps retrying.
    pub fn start(store: Arc<dyn LeaseStore>, opts: Options) -> Self {
        let (applied, _) = tokio_watch::channel(0);
        let (closing, _) = tokio_watch::channel(false);
        let mut cache = Cache::new(opts.history, opts.history_bytes);
        cache.quarantine_for = opts.expired_quarantine;
        let shared = Arc::new(Shared {
            store,
            cache: RwLock::new(cache),
            applied,
            store_error: Mutex::new(None),
            metrics: Metrics::new(),
            node_locks: (0..NODE_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            in_flight: Mutex::new(Occupancy::default()),
            rng: Mutex::new(StdRng::from_os_rng()),
            limits: limits::Limits::new(opts.max_watchers),
            opts,
            closing,
            damaged: AtomicBool::new(false),
            closed: AtomicU64::new(0),
            reload: tokio::sync::Notify::new(),
        });
        tracing::info!(store = %shared.store.describe(), "controller starting");
        let tasks = vec![
            tokio::spawn(sync::run(shared.clone())),
            tokio::spawn(sync::health(shared.clone())),
            tokio::spawn(serve::give_back(shared.clone())),
        ];
        Controller { shared, tasks }
    }

    /// The HTTP API without authentication: every caller may do
    /// everything. For a listener only trusted clients reach (loopback);
    /// [`serve_tls`] serves the API with client certificates instead.
    pub fn router(&self) -> axum::Router {
        http::router(self.shared.clone()).layer(axum::Extension(tls::Caller::Unauthenticated))
    }

    /// Only `/healthz`, `/readyz` and `/metrics` (no lease data), for a
    /// plain-HTTP listener next to the HTTPS one (`--healthz-listen`).
    pub fn health_router(&self) -> axum::Router {
        http::health_router(self.shared.clone())
    }

    /// Ends every open watch stream (nodes reconnect, to this controller
    /// or another); used when shutting down.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Waits until the first list of the store is loaded.
    pub async fn synced(&self) {
        let mut rx = self.shared.applied.subscribe();
        let _ = rx.wait_for(|r| *r > 0).await;
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves the API on `listener` until `shutdown` resolves; then open watch
/// streams are ended and requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    controller: &Controller,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shared = controller.shared.clone();
    let router = http::router(shared.clone());
    let limit = serve::connection_limit();
    serve::serve_plain(listener, shared, router, limit, shutdown).await
}

/// Serves only `/healthz`, `/readyz` and `/metrics` on `listener`
/// (`--healthz-listen`), with the same connection limits, until
/// `shutdown` resolves.
/// The future does not borrow `controller` (spawn it).
pub fn serve_health(
    listener: tokio::net::TcpListener,
    controller: &Controller,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
    let shared = controller.shared.clone();
    let router = http::health_router(shared.clone());
    // Probes and scrapers: a few connections are plenty.
    serve::serve_plain(listener, shared, router, 128, shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use weft_lease::MemoryStore;

    async fn get(router: &axum::Router, uri: &str) -> (StatusCode, String) {
        let req = Request::get(uri).body(Body::empty()).unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_panic_under_the_cache_lock_means_503_and_a_reload_not_a_panic_per_request() {
        let store = MemoryStore::new();
        store
            .put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .await
            .unwrap();
        let opts = Options {
            health_interval: Duration::from_millis(50),
            ..Options::default()
        };
        let c = Controller::start(Arc::new(store.clone()), opts);
        tokio::time::timeout(Duration::from_secs(10), c.synced())
            .await
            .unwrap();
        let router = c.router();
        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);
        // The store goes away, then a handler panics holding the lock.
        store.set_available(false);
        let shared = c.shared.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = shared.cache.write().unwrap();
            panic!("a bug while the cache is locked");
        })
        .join();
        assert!(panicked.is_err());
        assert!(c.shared.cache.is_poisoned());
        // Every request answers (no panic); the API and /healthz say 503
        // until the cache is loaded again, which needs the store.
        for _ in 0..3 {
            let (code, body) = get(&router, "/v1/leases").await;
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert!(body.contains("reloaded from the store"), "{body}");
            let (code, _) = get(&router, "/healthz").await;
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
            let (code, body) = get(&router, "/readyz").await;
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
            assert!(body.contains("after a panic"), "{body}");
        }
        assert!(get(&router, "/metrics")
            .await
            .1
            .contains("weft_controller_cache_reloads_total 1"));
        // The store is back: the cache is loaded afresh and served again.
        store.set_available(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while get(&router, "/healthz").await.0 != StatusCode::OK {
            assert!(tokio::time::Instant::now() < deadline, "not repaired");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!c.shared.cache.is_poisoned());
        let (code, body) = get(&router, "/v1/leases").await;
        assert_eq!(code, StatusCode::OK, "{body}");
    }
}
