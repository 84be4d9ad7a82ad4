//! Prometheus metrics of the controller (`GET /metrics`, OpenMetrics text).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use weft_lease::store::RequestCounts;

type Labels = Vec<(&'static str, &'static str)>;

/// Gauges set from the cache at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Levels {
    pub subnets_total: i64,
    pub subnets_used: i64,
    pub leases: i64,
    pub reservations: i64,
    pub outside_network: i64,
    pub unreadable: i64,
    pub revision: i64,
    pub ready: bool,
    pub history_bytes: i64,
}

/// The controller's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub acquire_seconds: Histogram,
    acquires: Family<Labels, Counter>,
    pub watch_clients: Gauge,
    pub etcd_errors: Counter,
    pub forbidden: Counter,
    pub tls_handshake_failures: Counter,
    pub cache_reloads: Counter,
    etcd_requests: Family<Labels, Counter>,
    last_requests: Mutex<RequestCounts>,
    subnets: Family<Labels, Gauge>,
    leases: Family<Labels, Gauge>,
    outside_network: Gauge,
    unreadable: Gauge,
    revision: Gauge,
    ready: Gauge,
    history_bytes: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_controller");
        let acquire_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "acquire_duration_seconds",
            "Time to serve a lease acquire, seconds",
            acquire_seconds.clone(),
        );
        let acquires = Family::<Labels, Counter>::default();
        registry.register("acquires", "Lease acquires by result", acquires.clone());
        let watch_clients = Gauge::default();
        registry.register(
            "watch_clients",
            "Open lease watch streams",
            watch_clients.clone(),
        );
        let etcd_errors = Counter::default();
        registry.register(
            "etcd_errors",
            "Failed requests to etcd",
            etcd_errors.clone(),
        );
        let forbidden = Counter::default();
        registry.register(
            "requests_forbidden",
            "Requests refused because the caller's certificate does not allow them",
            forbidden.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (no, expired or untrusted client certificate, ...)",
            tls_handshake_failures.clone(),
        );
        let cache_reloads = Counter::default();
        registry.register(
            "cache_reloads",
            "Reloads of the lease cache after a panic left its lock poisoned",
            cache_reloads.clone(),
        );
        let etcd_requests = Family::<Labels, Counter>::default();
        registry.register(
            "etcd_requests",
            "Requests sent to etcd by operation",
            etcd_requests.clone(),
        );
        let subnets = Family::<Labels, Gauge>::default();
        registry.register(
            "subnets",
            "Subnets of the network pool by state",
            subnets.clone(),
        );
        let leases = Family::<Labels, Gauge>::default();
        registry.register("leases", "Lease keys in the store by kind", leases.clone());
        let outside_network = Gauge::default();
        registry.register(
            "leases_outside_network",
            "Leases whose subnet is not in the current network config",
            outside_network.clone(),
        );
        let unreadable = Gauge::default();
        registry.register(
            "unreadable_entries",
            "Unreadable keys under subnets/",
            unreadable.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "store_revision",
            "Store revision applied by the controller",
            revision.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the controller is ready to serve",
            ready.clone(),
        );
        let history_bytes = Gauge::default();
        registry.register(
            "watch_history_bytes",
            "Bytes of watch lines kept for streams that resume",
            history_bytes.clone(),
        );
        Metrics {
            registry,
            acquire_seconds,
            acquires,
            watch_clients,
            etcd_errors,
            forbidden,
            tls_handshake_failures,
            cache_reloads,
            etcd_requests,
            last_requests: Mutex::new(RequestCounts::default()),
            subnets,
            leases,
            outside_network,
            unreadable,
            revision,
            ready,
            history_bytes,
        }
    }

    /// Counts one acquire by result (`ok`, `exhausted`, `bad_request`, ...).
    pub(crate) fn acquired(&self, result: &'static str) {
        self.acquires.get_or_create(&vec![("result", result)]).inc();
    }

    /// Renders the metrics after updating the levels.
    pub(crate) fn render(&self, levels: Levels, requests: RequestCounts) -> String {
        let free = (levels.subnets_total - levels.subnets_used).max(0);
        self.subnets
            .get_or_create(&vec![("state", "total")])
            .set(levels.subnets_total);
        self.subnets
            .get_or_create(&vec![("state", "used")])
            .set(levels.subnets_used);
        self.subnets
            .get_or_create(&vec![("state", "free")])
            .set(free);
        self.leases
            .get_or_create(&vec![("kind", "lease")])
            .set(levels.leases);
        self.leases
            .get_or_create(&vec![("kind", "reservation")])
            .set(levels.reservations);
        self.outside_network.set(levels.outside_network);
        self.unreadable.set(levels.unreadable);
        self.revision.set(levels.revision);
        self.ready.set(i64::from(levels.ready));
        self.history_bytes.set(levels.history_bytes);
        {
            let mut last = crate::lock(&self.last_requests);
            let prev = last.by_op();
            for ((op, now), (_, before)) in requests.by_op().into_iter().zip(prev) {
                self.etcd_requests
                    .get_or_create(&vec![("op", op)])
                    .inc_by(now.saturating_sub(before));
            }
            *last = requests;
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
