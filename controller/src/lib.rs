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
mod metrics;
mod ops;
mod serve;
mod sync;
pub mod tls;
mod validate;
mod watch;

pub use error::ControllerError;
pub use serve::serve_tls;

use cache::Cache;
use metrics::Metrics;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::{Arc, Mutex, RwLock};
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat: Duration::from_secs(10),
            history: 16_384,
            health_interval: Duration::from_secs(2),
            write_wait: Duration::from_secs(3),
            insecure: None,
            expired_quarantine: None,
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
    pub opts: Options,
    /// Set when the server shuts down: watch streams end so that graceful
    /// shutdown does not wait for them forever.
    pub closing: tokio_watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().expect("cache lock poisoned")
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().expect("cache lock poisoned")
    }

    /// Records a store failure (logged when the failure starts or changes).
    pub(crate) fn store_failed(&self, what: &str, err: &weft_lease::StoreError) {
        self.metrics.etcd_errors.inc();
        let msg = format!("{what}: {err}");
        let mut cur = self.store_error.lock().expect("health lock");
        if cur.as_deref() != Some(msg.as_str()) {
            tracing::warn!(store = %self.store.describe(), "{msg}");
        }
        *cur = Some(msg);
    }

    /// Records that the store answered.
    pub(crate) fn store_ok(&self) {
        let mut cur = self.store_error.lock().expect("health lock");
        if cur.take().is_some() {
            tracing::info!(store = %self.store.describe(), "store reachable again");
        }
    }

    /// Waits (bounded) until the cache has applied `revision`, so a client
    /// that wrote and then reads sees its write.
    pub(crate) async fn wait_applied(&self, revision: i64) {
        let mut rx = self.applied.subscribe();
        let wait = rx.wait_for(|r| *r >= revision);
        if tokio::time::timeout(self.opts.write_wait, wait)
            .await
            .is_err()
        {
            tracing::debug!(
                revision,
                "write not yet visible in the watch; answering anyway"
            );
        }
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
        let mut cache = Cache::new(opts.history);
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
            opts,
            closing,
        });
        tracing::info!(store = %shared.store.describe(), "controller starting");
        let tasks = vec![
            tokio::spawn(sync::run(shared.clone())),
            tokio::spawn(sync::health(shared.clone())),
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
    let closing = controller.shared.closing.clone();
    axum::serve(listener, controller.router())
        .with_graceful_shutdown(async move {
            shutdown.await;
            closing.send_replace(true);
        })
        .await
}
