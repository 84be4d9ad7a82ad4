//! The one level-triggered reconcile loop: desired = backend(local, peers);
//! observed = dataplane.observe(); apply(diff). It runs whenever the leases
//! or the local node change and on a periodic resync, so anything deleted
//! by hand comes back by itself.
//!
//! What the kernel has is observed in full on the periodic resync, on the
//! first pass and after any failure; a pass woken by a lease change diffs
//! against what the previous pass left instead (its observation plus the
//! changes it applied). Reading 150,000 objects back from the kernel takes
//! ~250 ms, far more than applying one peer's three; anything changed
//! behind weft's back is still repaired by the next resync.
//!
//! Masquerade rules (`--ip-masq`) are installed on the first pass and read
//! back and put back on every full pass ([`crate::masq::Masquerade`]).
//!
//! Desired state is computed from scratch on every full pass. On a pass
//! woken by lease changes, a backend made of per-peer parts (vxlan,
//! host-gw) computes only the changed leases' parts ([`Plan`]), and only
//! those objects are compared: at 50,000 peers one change costs what it
//! costs at 5. Other backends (ipsec) compute everything on every pass.

use crate::masq::{self, Masquerade};
use crate::peers::{Mark, PeerTable};
use crate::status::Status;
use std::collections::{BTreeSet, HashSet};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use weft_backends::peer::{select, HostView, Skipped};
use weft_backends::{
    diff, in_scope, Backend, Change, Dataplane, Delta, LinkChange, LocalNode, NetState, PerPeer,
    Plan, PlanInputs, RouteChange,
};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub peers: usize,
    /// The skipped leases; the same `Arc` from pass to pass while they
    /// stay the same.
    pub skipped: Arc<Vec<String>>,
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

/// Leases from which a pass over all of them gives freed memory back
/// (below, there is little to give).
const GIVE_BACK_FROM: usize = 1000;

/// What a pass knows of the kernel.
enum Have {
    /// As the previous pass left it.
    Known(NetState),
    /// Read back now.
    Read(NetState),
    /// Reading failed (the error is in the outcome).
    Nothing,
}

impl Have {
    fn state(&self) -> Option<&NetState> {
        match self {
            Have::Known(s) | Have::Read(s) => Some(s),
            Have::Nothing => None,
        }
    }
}

/// What a pass planned while the lease table was lent to it.
// One lives for part of a pass, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Planned {
    /// The whole desired state, to compare with `have`.
    All {
        want: NetState,
        have: Have,
        tally: Tally,
    },
    /// The changed leases' parts, to compare with the known state's.
    Changed { known: NetState, delta: Box<Delta> },
}

/// Where the counts of programmed and skipped leases are.
enum Tally {
    /// In the reconciler's plan.
    Plan,
    /// Here (a backend that is not [`PerPeer`]).
    Whole { peers: usize, skipped: Vec<Skipped> },
}

/// What the kernel has once a pass's changes are applied.
enum Then {
    /// The desired state.
    Is(NetState),
    /// What it had, with the changed peers' parts swapped.
    Patch(NetState, Box<Delta>),
}

/// The reconcile loop's state.
pub struct Reconciler {
    dataplane: Arc<dyn Dataplane>,
    backend: Arc<dyn Backend>,
    status: Arc<Status>,
    last_skipped: Arc<Vec<String>>,
    last_errors: BTreeSet<String>,
    /// The kernel's state as the last pass left it; `None` after a failure.
    known: Option<NetState>,
    /// A per-peer backend's plan, and how far into the lease table it
    /// goes.
    plan: Option<(Plan, Mark)>,
    /// The host's networks and foreign routes, read on every full pass.
    host: HostView,
    /// Milliseconds since `origin` of the last completed pass, for the
    /// systemd watchdog.
    pub heartbeat: Arc<AtomicU64>,
    origin: Instant,
    kicks: mpsc::Receiver<oneshot::Sender<Outcome>>,
    kicker: Kicker,
    /// weft's masquerade tables, kept when `--ip-masq` is on.
    masquerade: Option<Masquerade>,
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
            last_skipped: Arc::default(),
            last_errors: BTreeSet::new(),
            known: None,
            plan: None,
            host: HostView::default(),
            heartbeat: Arc::new(AtomicU64::new(0)),
            origin: Instant::now(),
            masquerade: None,
        }
    }

    /// Keeps masquerade rules for the local node's networks, too.
    pub fn with_masquerade(mut self) -> Self {
        self.masquerade = Some(Masquerade::default());
        self
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
        self.pass(local, || table, pass).await
    }

    /// One pass; `table` lends the leases while the pass plans (never
    /// across an await, so the lease follower is not held up).
    async fn pass<T: Deref<Target = PeerTable>>(
        &mut self,
        local: &LocalNode,
        table: impl FnOnce() -> T,
        pass: Pass,
    ) -> Outcome {
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
            (Pass::Event, Some(known)) => Have::Known(known),
            _ => match self.dataplane.observe().await {
                Ok(mut h) => {
                    in_scope(&mut h, &local.network);
                    self.backend.observed(&h);
                    Have::Read(h)
                }
                Err(e) => {
                    outcome.errors.push(e.to_string());
                    Have::Nothing
                }
            },
        };
        let per_peer = self.backend.per_peer().is_some();
        let (planned, leases) = {
            let t = table();
            (self.plan(local, &t, have), t.leases().len())
        };
        // The table is free again: compare and tally without it.
        let (changes, then, rebuilt) = match planned {
            Planned::Changed { known, delta } => {
                self.status.reconciles_changed_only.inc();
                self.tally(Tally::Plan, &mut outcome);
                // The changed objects, on the same links.
                let mut want = delta.want.clone();
                want.links = known.links.clone();
                let before = known.restricted_to(&delta.gone, &delta.want);
                let changes = diff(&want, &before);
                (Some(changes), Then::Patch(known, delta), false)
            }
            Planned::All { want, have, tally } => {
                self.tally(tally, &mut outcome);
                let changes = have.state().map(|h| diff(&want, h));
                (changes, Then::Is(want), per_peer)
            }
        };
        if let Some(changes) = changes {
            outcome.changes = changes.len();
            for c in &changes {
                if let Change::Link(LinkChange::Delete {
                    name,
                    foreign: Some(what),
                }) = c
                {
                    tracing::warn!(
                        device = %name,
                        "deleting a {what} device named {name} that weft did not make: \
                         weft's device takes that name"
                    );
                }
                tracing::debug!(change = %c, "applying");
            }
            let errors = self.dataplane.apply(&changes).await;
            outcome.changes -= errors.len();
            outcome.errors.extend(errors.iter().map(|e| e.to_string()));
            // Deleting a stray route at metric 0 deletes the first weft
            // route via its gateway (the kernel takes 0 as any metric): if
            // the stray went away meanwhile, that is the new one. The next
            // pass reads the kernel back.
            let strays = changes
                .iter()
                .any(|c| matches!(c, Change::Route(RouteChange::DelStray { .. })));
            if errors.is_empty() && !strays {
                // The kernel has it all now, before any next pass.
                self.known = Some(match then {
                    Then::Is(want) => {
                        self.backend.observed(&want);
                        want
                    }
                    Then::Patch(mut known, delta) => {
                        known.patch(&delta.gone, &delta.want);
                        known
                    }
                });
            } else if !errors.is_empty() {
                self.plan = None;
            }
        }
        self.masquerade(local, pass == Pass::Full, &mut outcome)
            .await;
        if (pass == Pass::Full || rebuilt) && leases >= GIVE_BACK_FROM {
            weft_lease::memory::give_back();
        }
        self.report(&outcome, started.elapsed());
        outcome
    }

    /// Installs the masquerade rules if they are not yet (for these
    /// networks); on a full pass, also if they are not as installed.
    async fn masquerade(&mut self, local: &LocalNode, full: bool, outcome: &mut Outcome) {
        let Some(m) = &mut self.masquerade else {
            return;
        };
        match m.reconcile(masq::Nets::of(local), full).await {
            Ok(masq::Done::Nothing) => {}
            Ok(masq::Done::Installed) => {
                outcome.changes += 1;
                tracing::info!(subnet = %local.subnet.to_cidrs(), "masquerade rules installed");
            }
            Ok(masq::Done::Restored) => {
                outcome.changes += 1;
                tracing::warn!(
                    "masquerade rules were changed or removed behind weft's back; restored"
                );
            }
            Err(e) => outcome.errors.push(format!("masquerade rules: {e}")),
        }
    }

    /// Plans the desired state for `table`: only the changed leases if the
    /// kernel's state is known and the last plan still holds, everything
    /// otherwise.
    fn plan(&mut self, local: &LocalNode, table: &PeerTable, have: Have) -> Planned {
        let backend = self.backend.clone();
        let Some(pp) = backend.per_peer() else {
            let (peers, mut skipped) = select(
                table.leases().values(),
                local,
                backend.backend_type(),
                &self.host,
            );
            let (want, more) = backend.desired(local, &peers);
            // Peers the backend itself could not program are among `peers`.
            let peers = peers.len().saturating_sub(more.len());
            skipped.extend(more);
            let tally = Tally::Whole { peers, skipped };
            return Planned::All { want, have, tally };
        };
        let mark = table.mark();
        let have = match have {
            Have::Known(known) => match self.changed_only(pp, local, table) {
                Some((plan, delta)) => {
                    self.plan = Some((plan, mark));
                    let delta = Box::new(delta);
                    return Planned::Changed { known, delta };
                }
                None => Have::Known(known),
            },
            have => have,
        };
        // The old plan goes first: two of them at once are the peak.
        self.plan = None;
        let inputs = PlanInputs {
            local: local.clone(),
            backend: backend.backend_type(),
            host: self.host.clone(),
        };
        let (plan, want) = Plan::build(pp, inputs, table.leases().values());
        self.plan = Some((plan, mark));
        Planned::All {
            want,
            have,
            tally: Tally::Plan,
        }
    }

    /// The last plan with the changes since it, if it still holds and they
    /// touch no contested claim. The last plan is gone either way.
    fn changed_only(
        &mut self,
        pp: &dyn PerPeer,
        local: &LocalNode,
        table: &PeerTable,
    ) -> Option<(Plan, Delta)> {
        let (plan, mark) = self.plan.take()?;
        if !plan.holds_for(local, self.backend.backend_type(), &self.host) {
            return None;
        }
        let changes = table.changes_since(mark)?;
        let n = changes.len();
        let updated = plan.update(pp, changes);
        if updated.is_none() {
            tracing::debug!(
                changes = n,
                "a change touches a subnet, IP or MAC another lease claims; planning every lease"
            );
        }
        updated
    }

    /// Puts what the desired state programs and skips in `outcome`.
    fn tally(&mut self, tally: Tally, outcome: &mut Outcome) {
        match tally {
            Tally::Plan => {
                if let Some((plan, _)) = &mut self.plan {
                    outcome.peers = plan.programmed();
                    outcome.skipped = plan.skip_lines();
                }
            }
            Tally::Whole { peers, skipped } => {
                outcome.peers = peers;
                outcome.skipped = Arc::new(skipped.iter().map(|s| s.to_string()).collect());
            }
        }
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
        // The same lines as last time (a pass that changed no skip) cost
        // nothing here, however many there are.
        let skipped = (!Arc::ptr_eq(&o.skipped, &self.last_skipped)).then(|| {
            let before: HashSet<&String> = self.last_skipped.iter().collect();
            for new in o.skipped.iter().filter(|l| !before.contains(l)) {
                tracing::warn!("not programming the lease of {new}");
            }
            o.skipped.to_vec()
        });
        self.last_skipped = o.skipped.clone();
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
        let (peers, error_list) = (o.peers, o.errors.clone());
        s.update(|snap| {
            snap.ready = true;
            snap.phase = "running".into();
            snap.peers = peers;
            if let Some(skipped) = skipped {
                snap.skipped = skipped;
            }
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
        mut peers: watch::Receiver<PeerTable>,
        resync: Duration,
    ) {
        // The resync runs on its own clock: a steady stream of lease
        // changes must not postpone it.
        let mut next_full = tokio::time::Instant::now();
        let mut pass = Pass::Full;
        let mut waiting: Vec<oneshot::Sender<Outcome>> = Vec::new();
        loop {
            let l = local.borrow_and_update().clone();
            let synced = peers.borrow_and_update().synced;
            if pass == Pass::Full {
                next_full = tokio::time::Instant::now() + resync;
            }
            if let Some(l) = l.filter(|_| synced) {
                let o = self.pass(&l, || peers.borrow_and_update(), pass).await;
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
