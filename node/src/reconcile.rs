//! The one level-triggered reconcile loop: desired = backend(local, peers);
//! observed = dataplane.observe(); apply(diff). It runs whenever the leases
//! or the local node change and on a periodic resync, so anything deleted
//! by hand comes back by itself.
//!
//! Desired state is computed from scratch on every pass. What the kernel
//! has is observed in full on the periodic resync, on the first pass and
//! after any failure; a pass woken by a lease change diffs against what the
//! previous pass left instead (its observation plus the changes it applied).
//! Reading 15,000 objects back from the kernel takes ~17 ms, far more than
//! applying one peer's three; anything changed behind weft's back is still
//! repaired by the next resync.

use crate::peers::PeerTable;
use crate::status::Status;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use weft_backends::peer::{select, HostView};
use weft_backends::{diff, in_scope, Backend, Dataplane, LocalNode};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub peers: usize,
    pub skipped: Vec<String>,
    pub changes: usize,
    pub errors: Vec<String>,
}

/// How a pass learns what the kernel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Observe the kernel (the periodic resync).
    Full,
    /// Use what the previous pass left; a full pass if that is unknown.
    Event,
}

/// Asks a running loop for a full pass now and waits for its outcome.
#[derive(Debug, Clone)]
pub struct Kicker(mpsc::Sender<oneshot::Sender<Outcome>>);

impl Kicker {
    /// A full pass, run as soon as the loop is free; `None` if the loop is
    /// gone.
    pub async fn full_pass(&self) -> Option<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// The reconcile loop's state.
pub struct Reconciler {
    dataplane: Arc<dyn Dataplane>,
    backend: Arc<dyn Backend>,
    status: Arc<Status>,
    last_skipped: BTreeSet<String>,
    last_errors: BTreeSet<String>,
    /// The kernel's state as the last pass left it; `None` after a failure.
    known: Option<weft_backends::NetState>,
    /// The host's networks and foreign routes, read on every full pass.
    host: HostView,
    /// Milliseconds since `origin` of the last completed pass, for the
    /// systemd watchdog.
    pub heartbeat: Arc<AtomicU64>,
    origin: Instant,
    kicks: mpsc::Receiver<oneshot::Sender<Outcome>>,
    kicker: Kicker,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Reconciler {
    pub fn new(
        dataplane: Arc<dyn Dataplane>,
        backend: Arc<dyn Backend>,
        status: Arc<Status>,
    ) -> Self {
        let (tx, kicks) = mpsc::channel(8);
        Reconciler {
            kicks,
            kicker: Kicker(tx),
            dataplane,
            backend,
            status,
            last_skipped: BTreeSet::new(),
            last_errors: BTreeSet::new(),
            known: None,
            host: HostView::default(),
            heartbeat: Arc::new(AtomicU64::new(0)),
            origin: Instant::now(),
        }
    }

    /// A handle that asks the running loop for a full pass.
    pub fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }

    /// One full pass: the kernel observed, whatever woke us.
    pub async fn reconcile_once(&mut self, local: &LocalNode, table: &PeerTable) -> Outcome {
        self.reconcile(local, table, Pass::Full).await
    }

    /// One pass of the given kind.
    pub async fn reconcile(&mut self, local: &LocalNode, table: &PeerTable, pass: Pass) -> Outcome {
        let started = Instant::now();
        let mut outcome = Outcome::default();
        if pass == Pass::Full || self.known.is_none() {
            match self.dataplane.host_view().await {
                Ok(h) => self.host = h,
                // Keep the last view; the error is reported.
                Err(e) => outcome.errors.push(e.to_string()),
            }
        }
        // What the kernel has, first: the backend may want to know before
        // it says what it wants (ipsec: outbound SAs that were lost are not
        // put back).
        let have = match (pass, self.known.take()) {
            (Pass::Event, Some(known)) => Ok(known),
            _ => self.dataplane.observe().await,
        };
        let have = have.map(|mut h| {
            in_scope(&mut h, &local.network);
            self.backend.observed(&h);
            h
        });
        let (peers, mut skipped) = select(
            table.leases.values(),
            local,
            self.backend.backend_type(),
            &self.host,
        );
        let (want, more) = self.backend.desired(local, &peers);
        // Peers the backend itself could not program are among `peers`.
        let programmed = peers.len().saturating_sub(more.len());
        skipped.extend(more);
        let skipped: Vec<String> = skipped
            .iter()
            .map(|s| {
                format!(
                    "{} ({}): {}",
                    s.key.to_cidrs(),
                    s.node.as_deref().unwrap_or("flannel"),
                    s.reason
                )
            })
            .collect();
        outcome.peers = programmed;
        outcome.skipped = skipped;
        match have {
            Err(e) => outcome.errors.push(e.to_string()),
            Ok(have) => {
                let changes = diff(&want, &have);
                outcome.changes = changes.len();
                for c in &changes {
                    tracing::debug!(change = %c, "applying");
                }
                let errors = self.dataplane.apply(&changes).await;
                outcome.changes -= errors.len();
                outcome.errors.extend(errors.iter().map(|e| e.to_string()));
                if errors.is_empty() {
                    // The kernel has it all now, before any next pass.
                    self.backend.observed(&want);
                    self.known = Some(want);
                }
            }
        }
        self.report(&outcome, started.elapsed());
        outcome
    }

    fn report(&mut self, o: &Outcome, took: Duration) {
        let s = &self.status;
        s.reconciles.inc();
        s.reconcile_seconds.observe(took.as_secs_f64());
        s.changes.inc_by(o.changes as u64);
        s.reconcile_errors.inc_by(o.errors.len() as u64);
        s.peers.set(o.peers as i64);
        s.skipped.set(o.skipped.len() as i64);
        if o.changes > 0 {
            tracing::info!(
                changes = o.changes,
                peers = o.peers,
                took_ms = took.as_millis() as u64,
                "data plane updated"
            );
        }
        let skipped: BTreeSet<String> = o.skipped.iter().cloned().collect();
        for new in skipped.difference(&self.last_skipped) {
            tracing::warn!("not programming the lease of {new}");
        }
        self.last_skipped = skipped;
        let errors: BTreeSet<String> = o.errors.iter().cloned().collect();
        for new in errors.difference(&self.last_errors) {
            tracing::warn!("data plane change failed: {new}; retrying on the next pass");
        }
        if errors.is_empty() && !self.last_errors.is_empty() {
            tracing::info!("data plane in step again");
        }
        self.last_errors = errors;
        if o.errors.is_empty() {
            s.succeeded_now();
        }
        let (peers, skipped_list, error_list) = (o.peers, o.skipped.clone(), o.errors.clone());
        s.update(|snap| {
            snap.ready = true;
            snap.phase = "running".into();
            snap.peers = peers;
            snap.skipped = skipped_list;
            snap.errors = error_list;
        });
        self.heartbeat
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Runs until the senders go away: a pass on every change of the local
    /// node or the leases, when the backend's state changes with time (an
    /// IPsec key switch), when kicked, and every `resync` otherwise.
    /// Nothing happens before the first full lease list (a restart must not
    /// remove what it has not seen yet).
    pub async fn run(
        mut self,
        mut local: watch::Receiver<Option<Arc<LocalNode>>>,
        mut peers: watch::Receiver<Arc<PeerTable>>,
        resync: Duration,
    ) {
        // The resync runs on its own clock: a steady stream of lease
        // changes must not postpone it.
        let mut next_full = tokio::time::Instant::now();
        let mut pass = Pass::Full;
        let mut waiting: Vec<oneshot::Sender<Outcome>> = Vec::new();
        loop {
            let l = local.borrow_and_update().clone();
            let t = peers.borrow_and_update().clone();
            if pass == Pass::Full {
                next_full = tokio::time::Instant::now() + resync;
            }
            if let Some(l) = l.filter(|_| t.synced) {
                let o = self.reconcile(&l, &t, pass).await;
                for w in waiting.drain(..) {
                    let _ = w.send(o.clone());
                }
            }
            let timed = self.backend.next_change();
            pass = tokio::select! {
                r = local.changed() => { if r.is_err() { return } Pass::Full }
                r = peers.changed() => { if r.is_err() { return } Pass::Event }
                _ = tokio::time::sleep_until(next_full) => Pass::Full,
                _ = tokio::time::sleep_until(timed.unwrap_or(next_full)), if timed.is_some() => Pass::Event,
                Some(w) = self.kicks.recv() => { waiting.push(w); Pass::Full }
            };
        }
    }
}
