//! What the daemon is doing, for `/readyz`, `/metrics` and the logs.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The daemon's state as `/readyz` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub ready: bool,
    /// What the daemon is doing or waiting for.
    pub phase: String,
    pub node: String,
    pub subnet: Option<String>,
    pub backend: Option<String>,
    pub peers: usize,
    /// Leases not programmed, with the reason.
    pub skipped: Vec<String>,
    /// Changes that failed in the last reconcile.
    pub errors: Vec<String>,
    /// Unix time of the last reconcile that applied everything.
    pub last_success_unix: Option<u64>,
    /// Set while the node's lease has run out without a renewal: no new
    /// pods (weft-cni refuses), not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expired: Option<String>,
    /// The IPsec key, with the ipsec backend (never the private half).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<IpsecSnapshot>,
}

/// The node's IPsec key as `/readyz` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IpsecSnapshot {
    pub epoch: u64,
    /// The epoch our lease carries (peers know it).
    pub published_epoch: Option<u64>,
    /// Base64, as in the lease.
    pub public_key: String,
}

/// Shared status and metrics.
#[derive(Debug)]
pub struct Status {
    snap: Mutex<Snapshot>,
    registry: Registry,
    pub peers: Gauge,
    pub skipped: Gauge,
    pub reconcile_seconds: Histogram,
    pub reconciles: Counter,
    /// Passes that planned and compared only the leases that changed.
    pub reconciles_changed_only: Counter,
    pub reconcile_errors: Counter,
    pub changes: Counter,
    pub last_success: Gauge,
    pub renewals: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub watch_restarts: Counter,
    pub ipsec_rekeys: Counter,
    pub ipsec_epoch: Gauge,
    pub wireguard_rekeys: Counter,
    ready: Gauge,
}

impl Status {
    pub fn new(node: &str) -> Self {
        let mut registry = Registry::with_prefix("weft_node");
        let peers = Gauge::default();
        registry.register(
            "peers",
            "Peers programmed into the data plane",
            peers.clone(),
        );
        let skipped = Gauge::default();
        registry.register(
            "skipped_peers",
            "Leases skipped because they cannot be programmed",
            skipped.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass",
            reconcile_seconds.clone(),
        );
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconcile passes", reconciles.clone());
        let reconciles_changed_only = Counter::default();
        registry.register(
            "reconciles_changed_only",
            "Reconcile passes that computed and compared only the leases that changed",
            reconciles_changed_only.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Changes or observations that failed",
            reconcile_errors.clone(),
        );
        let changes = Counter::default();
        registry.register("changes_applied", "Kernel changes applied", changes.clone());
        let last_success = Gauge::default();
        registry.register(
            "last_reconcile_success_timestamp_seconds",
            "Unix time of the last reconcile without errors",
            last_success.clone(),
        );
        let renewals = Family::default();
        registry.register(
            "lease_renewals",
            "Lease renewals by result",
            renewals.clone(),
        );
        let watch_restarts = Counter::default();
        registry.register(
            "watch_restarts",
            "Times the lease watch was re-established",
            watch_restarts.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 after the first full reconcile", ready.clone());
        let ipsec_rekeys = Counter::default();
        registry.register(
            "ipsec_key_rotations",
            "IPsec key rotations published",
            ipsec_rekeys.clone(),
        );
        let ipsec_epoch = Gauge::default();
        registry.register(
            "ipsec_key_epoch",
            "Epoch of the IPsec key in use (ipsec backend)",
            ipsec_epoch.clone(),
        );
        let wireguard_rekeys = Counter::default();
        registry.register(
            "wireguard_key_rotations",
            "WireGuard key rotations published",
            wireguard_rekeys.clone(),
        );
        Status {
            snap: Mutex::new(Snapshot {
                node: node.to_string(),
                phase: "starting".into(),
                ..Snapshot::default()
            }),
            registry,
            peers,
            skipped,
            reconcile_seconds,
            reconciles,
            reconciles_changed_only,
            reconcile_errors,
            changes,
            last_success,
            renewals,
            watch_restarts,
            ipsec_rekeys,
            ipsec_epoch,
            wireguard_rekeys,
            ready,
        }
    }

    /// Changes the snapshot.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.snap.lock().expect("status lock");
        f(&mut s);
        self.ready
            .set(i64::from(s.ready && s.lease_expired.is_none()));
    }

    /// Sets what the daemon is doing.
    pub fn phase(&self, phase: impl Into<String>) {
        self.update(|s| s.phase = phase.into());
    }

    /// Shows the ipsec backend's key state in `/readyz` and the epoch
    /// gauge.
    pub fn ipsec_keys(&self, k: &weft_backends::ipsec::KeyStatus) {
        use base64::Engine;
        self.ipsec_epoch.set(k.epoch as i64);
        let snap = IpsecSnapshot {
            epoch: k.epoch,
            published_epoch: k.published_epoch,
            public_key: base64::engine::general_purpose::STANDARD.encode(k.public_key),
        };
        self.update(|s| s.ipsec = Some(snap));
    }

    /// The snapshot; not ready while the lease has expired, whatever the
    /// data plane does.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.snap.lock().expect("status lock").clone();
        if let Some(why) = &s.lease_expired {
            s.ready = false;
            s.phase = why.clone();
        }
        s
    }

    /// Records a reconcile without errors now.
    pub fn succeeded_now(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_success.set(now as i64);
        self.update(|s| s.last_success_unix = Some(now));
    }

    /// The metrics text.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
