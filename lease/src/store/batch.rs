//! Subnet claims sent to etcd together.
//!
//! In a join storm each claim was a transaction of its own, and etcd spent
//! its time on what every request costs (a gRPC call, a raft entry, a WAL
//! write), not on the few keys in it. Here a claim that finds
//! [`IN_FLIGHT`] claim transactions already on their way waits instead,
//! and the waiting claims go together in one transaction: the compares of
//! all of them, then the puts of all of them. A quiet store sees no change:
//! a claim that finds a free slot is sent at once, alone, as before.
//!
//! A batch is the same as its claims one after another only if none of
//! them reads what another writes: so no two claims in a batch share a
//! node or overlap in their subnets' key ranges (see [`Pending::clashes`]).
//! etcd applies a transaction whole or not at all. When a compare fails,
//! the batch reads back what each claim compared: a claim whose own
//! compare failed gets its answer from that, the others try again once.
//! When etcd refuses the batch outright (an etcd lease is gone, too many
//! operations), each claim is sent alone.

use super::{NodeGuard, StoreError};
use crate::key::SubnetKey;
use etcd_client::{Compare, TxnOp};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Claim transactions in flight before claims wait to go together.
pub(super) const IN_FLIGHT: usize = 8;
/// Claims in one transaction: three compares each, and one read plus two
/// each when it fails, stay within etcd's default `--max-txn-ops` of 128.
/// Halved each time etcd says a batch is too large.
pub(super) const MAX_BATCH: usize = 32;
/// Waiting claims looked at to fill one batch (those that clash with one
/// already in it stay for the next).
const SCAN: usize = 4 * MAX_BATCH;
/// How often etcd refusing whole batches is logged as a warning.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What a claim's compares expect.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expect {
    pub key: SubnetKey,
    pub config_revision: i64,
    pub guard: NodeGuard,
}

/// A claim's compares and puts, before they join a transaction.
pub(super) struct Pending {
    pub expect: Expect,
    /// The range of keys that hold its subnet (`[start, end)`).
    pub range: (String, String),
    /// The node's guard key.
    pub node: String,
    /// The config's revision, no key holds the subnet, the node's guard.
    pub compares: [Compare; 3],
    /// The subnet and the node's guard.
    pub puts: [TxnOp; 2],
}

impl Pending {
    /// Whether the two cannot go in one batch: they read or write the
    /// same keys, or one's config compare must fail.
    pub(super) fn clashes(&self, other: &Pending) -> bool {
        let (a, b) = (&self.range, &other.range);
        self.node == other.node
            || (a.0 < b.1 && b.0 < a.1)
            || self.expect.config_revision != other.expect.config_revision
    }
}

impl Expect {
    /// Why this claim fails, from what its compares read (the config key's
    /// revision, 0 when it is gone; how many keys hold the subnet; the
    /// node's guard key, its value and revision); `None` if they all hold.
    /// In the order [`super::LeaseStore::claim`] promises.
    pub(super) fn verdict(
        &self,
        config: i64,
        holders: i64,
        node: Option<(String, i64)>,
    ) -> Option<StoreError> {
        if config != self.config_revision {
            return Some(StoreError::ConfigChanged { revision: config });
        }
        if holders > 0 {
            return Some(StoreError::AlreadyExists(self.key));
        }
        let holds = match self.guard {
            NodeGuard::Absent => node.is_none(),
            NodeGuard::At(rev) => node.as_ref().is_some_and(|n| n.1 == rev),
        };
        (!holds).then(|| StoreError::NodeClaimed {
            revision: node.as_ref().map_or(0, |n| n.1),
            subnet: node.map(|n| n.0),
        })
    }
}

/// A claim waiting for a batch.
pub(super) struct Queued {
    pub claim: Pending,
    pub done: oneshot::Sender<Outcome>,
}

/// What became of a claim sent in a batch.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Applied at this store revision.
    Committed(i64),
    /// Not applied, and this is why: one of its own compares failed.
    Refused(StoreError),
    /// Not applied: its compares held, another claim's did not.
    Again,
    /// Not applied: etcd refused the whole batch. Send it alone.
    Alone,
    /// The batch may or may not have been applied (etcd did not answer).
    Failed(StoreError),
}

struct State {
    queue: VecDeque<Queued>,
    /// Claim transactions on their way (alone or batched).
    in_flight: usize,
    /// When etcd refusing a batch was last logged as a warning.
    warned: Option<Instant>,
    /// Claims in one batch at most.
    max: usize,
}

impl Default for State {
    fn default() -> Self {
        State {
            queue: VecDeque::new(),
            in_flight: 0,
            warned: None,
            max: MAX_BATCH,
        }
    }
}

/// Claims waiting to go together, and the count of claim transactions in
/// flight.
#[derive(Default)]
pub(super) struct Batches {
    state: Mutex<State>,
}

/// Whether a claim goes now or waits.
// Matched at once where it is made; boxing would cost an allocation a claim.
#[allow(clippy::large_enum_variant)]
pub(super) enum Turn {
    /// Send it alone now; the slot is given back with [`Batches::leave`].
    Now(Pending),
    /// Wait for a batch to carry it.
    Wait(oneshot::Receiver<Outcome>),
}

impl Batches {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change under the lock is a push, a pop or a count, done
        // whole: a panicking holder leaves nothing half-made.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `claim`, or queues it when every slot is taken.
    pub(super) fn enter(&self, claim: Pending) -> Turn {
        let mut s = self.state();
        if s.in_flight < IN_FLIGHT {
            s.in_flight += 1;
            return Turn::Now(claim);
        }
        let (done, rx) = oneshot::channel();
        s.queue.push_back(Queued { claim, done });
        Turn::Wait(rx)
    }

    /// Gives a slot back. `true`: claims are waiting and the slot was
    /// taken again at once, for the caller to send a batch.
    pub(super) fn leave(&self) -> bool {
        let mut s = self.state();
        if s.queue.is_empty() {
            s.in_flight -= 1;
            false
        } else {
            true
        }
    }

    /// The next batch, none clashing with another; empty only when no
    /// claim waits. Claims whose caller went away are dropped.
    pub(super) fn next(&self) -> Vec<Queued> {
        let mut s = self.state();
        let max = s.max;
        let mut batch: Vec<Queued> = Vec::new();
        let mut kept = Vec::new();
        while batch.len() < max && kept.len() + batch.len() < SCAN {
            let Some(q) = s.queue.pop_front() else { break };
            if q.done.is_closed() {
                continue;
            }
            if batch.iter().any(|b| b.claim.clashes(&q.claim)) {
                kept.push(q);
            } else {
                batch.push(q);
            }
        }
        for q in kept.into_iter().rev() {
            s.queue.push_front(q);
        }
        if s.queue.is_empty() && s.queue.capacity() > MAX_BATCH {
            // A storm's queue (about 1 KiB a claim) is not kept.
            s.queue = VecDeque::new();
        }
        batch
    }

    /// etcd said a batch of `n` was too large: later ones hold half as
    /// many. The new limit.
    pub(super) fn too_large(&self, n: usize) -> usize {
        let mut s = self.state();
        s.max = s.max.min((n / 2).max(1));
        s.max
    }

    /// Whether a refused batch should be logged as a warning now (at most
    /// once every [`WARN_EVERY`]).
    pub(super) fn warn_now(&self) -> bool {
        let mut s = self.state();
        let due = s.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            s.warned = Some(Instant::now());
        }
        due
    }

    /// Gives a slot back that [`Batches::leave`] took again, when no
    /// batch can be sent (no runtime): the waiting claims go alone.
    pub(super) fn abandon(&self) {
        self.state().in_flight -= 1;
        self.release_all();
    }

    /// Sends every waiting claim off alone (etcd failed a batch: the
    /// others find out for themselves, each in its own time).
    pub(super) fn release_all(&self) {
        let queue = std::mem::take(&mut self.state().queue);
        for q in queue {
            let _ = q.done.send(Outcome::Alone);
        }
    }

    /// Claim transactions in flight (for tests).
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.state().in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::CompareOp;

    fn pending(start: &str, end: &str, node: &str) -> Pending {
        let cmp = || Compare::version(node, CompareOp::Equal, 0);
        let put = || TxnOp::put(start, "v", None);
        Pending {
            expect: Expect {
                key: "10.244.1.0-24".parse().unwrap(),
                config_revision: 1,
                guard: NodeGuard::Absent,
            },
            range: (start.into(), end.into()),
            node: node.into(),
            compares: [cmp(), cmp(), cmp()],
            puts: [put(), put()],
        }
    }

    /// Queues a claim on `[start, end)` for `node`, which must wait.
    fn wait(b: &Batches, start: &str, end: &str, node: &str) -> oneshot::Receiver<Outcome> {
        match b.enter(pending(start, end, node)) {
            Turn::Wait(rx) => rx,
            Turn::Now(_) => panic!("a claim on {start} did not wait"),
        }
    }

    fn fill(b: &Batches) {
        for i in 0..IN_FLIGHT {
            let turn = b.enter(pending("k/x", "k/x'", &format!("f{i}")));
            assert!(matches!(turn, Turn::Now(_)));
        }
    }

    fn starts(batch: &[Queued]) -> Vec<&str> {
        batch.iter().map(|q| q.claim.range.0.as_str()).collect()
    }

    #[test]
    fn claims_wait_only_when_every_slot_is_taken() {
        let b = Batches::default();
        fill(&b);
        let _rx = wait(&b, "a", "a'", "n1");
        // A slot given back with a claim waiting is taken again.
        assert!(b.leave());
        assert_eq!(b.next().len(), 1);
        assert!(!b.leave());
        assert_eq!(b.in_flight(), IN_FLIGHT - 1);
        assert!(matches!(b.enter(pending("a", "a'", "n1")), Turn::Now(_)));
    }

    #[test]
    fn a_batch_holds_no_two_claims_on_one_node_or_overlapping_ranges() {
        let b = Batches::default();
        fill(&b);
        let _rxs: Vec<_> = [
            ("k/10.0.1.0", "k/10.0.1.0'", "a"),
            // A range inside the first (real keys: etcd.rs's tests).
            ("k/10.0.1.0&x", "k/10.0.1.0&x\0", "b"),
            ("k/10.0.2.0", "k/10.0.2.0'", "a"),
            ("k/10.0.3.0", "k/10.0.3.0'", "c"),
        ]
        .into_iter()
        .map(|(start, end, node)| wait(&b, start, end, node))
        .collect();
        assert_eq!(starts(&b.next()), ["k/10.0.1.0", "k/10.0.3.0"]);
        // Those left keep their order and do not clash with each other.
        assert_eq!(starts(&b.next()), ["k/10.0.1.0&x", "k/10.0.2.0"]);
        assert!(b.next().is_empty());
    }

    #[test]
    fn a_batch_is_at_most_max_batch_and_skips_claims_nobody_waits_for() {
        let b = Batches::default();
        fill(&b);
        let mut rxs: Vec<_> = (0..MAX_BATCH + 3)
            .map(|i| {
                wait(
                    &b,
                    &format!("k/{i:03}"),
                    &format!("k/{i:03}'"),
                    &format!("n{i}"),
                )
            })
            .collect();
        drop(rxs.remove(0));
        let first = b.next();
        assert_eq!(first.len(), MAX_BATCH);
        assert_eq!(first[0].claim.range.0, "k/001");
        assert_eq!(starts(&b.next()), ["k/033", "k/034"]);
    }

    #[test]
    fn release_all_tells_every_waiting_claim_to_go_alone() {
        let b = Batches::default();
        fill(&b);
        let mut rx = wait(&b, "k/1", "k/1'", "a");
        b.release_all();
        assert!(matches!(rx.try_recv(), Ok(Outcome::Alone)));
        assert!(b.next().is_empty());
        b.abandon();
        assert_eq!(b.in_flight(), IN_FLIGHT - 1);
    }

    #[test]
    fn claims_under_different_configs_go_in_different_batches() {
        let b = Batches::default();
        fill(&b);
        let mut p = pending("k/2", "k/2'", "b");
        p.expect.config_revision = 2;
        let _rxs = [wait(&b, "k/1", "k/1'", "a"), {
            let Turn::Wait(rx) = b.enter(p) else {
                panic!("queued")
            };
            rx
        }];
        assert_eq!(starts(&b.next()), ["k/1"]);
        assert_eq!(starts(&b.next()), ["k/2"]);
    }

    #[test]
    fn claims_nobody_waits_for_do_not_end_a_batch_early() {
        let b = Batches::default();
        fill(&b);
        let gone: Vec<_> = (0..SCAN + 5)
            .map(|i| {
                wait(
                    &b,
                    &format!("g/{i:04}"),
                    &format!("g/{i:04}'"),
                    &format!("g{i}"),
                )
            })
            .collect();
        let _live = wait(&b, "k/1", "k/1'", "a");
        drop(gone);
        assert_eq!(starts(&b.next()), ["k/1"]);
    }

    #[test]
    fn a_batch_too_large_for_etcd_halves_the_next_ones() {
        let b = Batches::default();
        assert_eq!(b.too_large(MAX_BATCH), MAX_BATCH / 2);
        // An older, larger batch refused later changes nothing.
        assert_eq!(b.too_large(MAX_BATCH), MAX_BATCH / 2);
        assert_eq!(b.too_large(1), 1);
        fill(&b);
        let _rxs: Vec<_> = (0..3)
            .map(|i| wait(&b, &format!("k/{i}"), &format!("k/{i}'"), &format!("n{i}")))
            .collect();
        assert_eq!(b.next().len(), 1);
    }

    #[test]
    fn a_refused_claim_is_told_why_in_the_order_claim_promises() {
        let mut p = pending("k/1", "k/1'", "a").expect;
        p.config_revision = 5;
        let key = p.key;
        assert_eq!(p.verdict(5, 0, None), None);
        assert_eq!(
            p.verdict(6, 1, Some(("x".into(), 3))),
            Some(StoreError::ConfigChanged { revision: 6 })
        );
        assert_eq!(
            p.verdict(5, 1, Some(("x".into(), 3))),
            Some(StoreError::AlreadyExists(key))
        );
        assert_eq!(
            p.verdict(5, 0, Some(("10.244.9.0-24".into(), 3))),
            Some(StoreError::NodeClaimed {
                subnet: Some("10.244.9.0-24".into()),
                revision: 3
            })
        );
        p.guard = NodeGuard::At(3);
        assert_eq!(p.verdict(5, 0, Some(("x".into(), 3))), None);
        assert_eq!(
            p.verdict(5, 0, None),
            Some(StoreError::NodeClaimed {
                subnet: None,
                revision: 0
            })
        );
    }

    #[test]
    fn warnings_about_refused_batches_are_rate_limited() {
        let b = Batches::default();
        assert!(b.warn_now());
        assert!(!b.warn_now());
    }
}
