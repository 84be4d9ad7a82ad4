//! An in-memory [`LeaseStore`] with etcd's semantics, for unit tests.
//!
//! Revisions, expiring leases, compare-and-set, watches that replay history,
//! and compaction behave as in etcd, so the controller can be tested without
//! one; the conformance suite keeps the two stores honest. Time is
//! `tokio::time`, so tests with paused time control lease expiry. Outages can
//! be simulated with [`MemoryStore::set_available`].

use super::decode::{add_to_snapshot, decode_delete, decode_entry, decode_put};
use super::{
    Claim, LeaseStore, NodeGuard, RequestCounts, Snapshot, StoreError, StoreResult, WatchBatch,
    WatchStream,
};
use crate::attrs::LeaseAttrs;
use crate::key::SubnetKey;
use crate::lease::{Lease, LeaseId};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify};
use tokio::time::Instant;

#[derive(Debug, Clone)]
struct Kv {
    value: Vec<u8>,
    create: i64,
    modified: i64,
    lease: i64,
}

#[derive(Debug, Clone)]
enum Change {
    Put(String, Kv),
    Delete(String),
}

#[derive(Debug)]
struct EtcdLease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct State {
    revision: i64,
    compacted: i64,
    /// The key space just before `compacted`, the base for `snapshot_at`.
    base: BTreeMap<String, Kv>,
    kv: BTreeMap<String, Kv>,
    log: Vec<(i64, Change)>,
    leases: HashMap<i64, EtcdLease>,
    next_lease: i64,
    counts: RequestCounts,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changes: broadcast::Sender<(i64, Vec<Change>)>,
    available: watch::Sender<bool>,
    lease_added: Notify,
}

/// In-memory lease store. Cloning gives another handle to the same store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

fn unavailable() -> StoreError {
    StoreError::Unavailable("memory store is set unavailable".into())
}

impl MemoryStore {
    /// A new empty store. Must be called inside a tokio runtime: a task
    /// expires leases in the background, as etcd does.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(4096);
        let (available, _) = watch::channel(true);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                revision: 1,
                next_lease: 0x1000,
                ..State::default()
            }),
            changes,
            available,
            lease_added: Notify::new(),
        });
        tokio::spawn(expire_loop(Arc::downgrade(&inner)));
        MemoryStore { inner }
    }

    /// Simulates an outage (`false`) or recovery (`true`). While unavailable
    /// every call fails with `Unavailable` and open watches end. Leases do
    /// not expire during an outage (etcd extends them on recovery, too).
    pub fn set_available(&self, up: bool) {
        if up {
            let mut st = self.lock();
            let now = Instant::now();
            for l in st.leases.values_mut() {
                l.deadline = now + l.ttl;
            }
        }
        self.inner.available.send_replace(up);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("memory store lock poisoned")
    }

    /// Locks the state for an operation: fails if unavailable, expires due
    /// leases first (so expiry is exact even between background ticks).
    fn op(
        &self,
        count: impl FnOnce(&mut RequestCounts),
    ) -> StoreResult<std::sync::MutexGuard<'_, State>> {
        let mut st = self.lock();
        count(&mut st.counts);
        if !*self.inner.available.borrow() {
            return Err(unavailable());
        }
        expire_due(&mut st, &self.inner.changes);
        Ok(st)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Applies one change to a key space.
fn apply_change(kv: &mut BTreeMap<String, Kv>, change: &Change) {
    match change {
        Change::Put(k, v) => {
            kv.insert(k.clone(), v.clone());
        }
        Change::Delete(k) => {
            kv.remove(k);
        }
    }
}

/// A snapshot of a key space at `revision`.
fn snapshot_of(kv: &BTreeMap<String, Kv>, revision: i64) -> Snapshot {
    let mut snap = Snapshot {
        revision,
        ..Snapshot::default()
    };
    for (k, v) in kv {
        add_to_snapshot(
            &mut snap,
            decode_entry(k, &v.value, v.create, v.modified, v.lease),
            v.modified,
        );
    }
    snap
}

/// Applies changes as one revision and tells watchers.
fn commit(st: &mut State, tx: &broadcast::Sender<(i64, Vec<Change>)>, changes: Vec<Change>) -> i64 {
    st.revision += 1;
    let rev = st.revision;
    for c in &changes {
        apply_change(&mut st.kv, c);
        st.log.push((rev, c.clone()));
    }
    let _ = tx.send((rev, changes));
    rev
}

fn revoke_locked(st: &mut State, tx: &broadcast::Sender<(i64, Vec<Change>)>, id: i64) {
    if st.leases.remove(&id).is_none() {
        return;
    }
    let keys: Vec<String> = st
        .kv
        .iter()
        .filter(|(_, kv)| kv.lease == id)
        .map(|(k, _)| k.clone())
        .collect();
    if !keys.is_empty() {
        commit(st, tx, keys.into_iter().map(Change::Delete).collect());
    }
}

fn expire_due(st: &mut State, tx: &broadcast::Sender<(i64, Vec<Change>)>) {
    let now = Instant::now();
    let mut due: Vec<(Instant, i64)> = st
        .leases
        .iter()
        .filter(|(_, l)| l.deadline <= now)
        .map(|(id, l)| (l.deadline, *id))
        .collect();
    due.sort();
    for (_, id) in due {
        revoke_locked(st, tx, id);
    }
}

async fn expire_loop(inner: Weak<Inner>) {
    loop {
        let (next, notified) = {
            let Some(inner) = inner.upgrade() else { return };
            let mut st = inner.state.lock().expect("memory store lock poisoned");
            if *inner.available.borrow() {
                expire_due(&mut st, &inner.changes);
            }
            let next = st.leases.values().map(|l| l.deadline).min();
            drop(st);
            // Register for wake-ups before sleeping, so a lease granted
            // meanwhile is not missed.
            let inner2 = inner.clone();
            let notified = async move { inner2.lease_added.notified().await };
            (next, notified)
        };
        let sleep_until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until) => {}
            _ = notified => {}
        }
    }
}

fn subnet_key(key: &SubnetKey) -> String {
    format!("{}{}", super::subnets_prefix(), key)
}

/// Whether some existing key already holds one of `key`'s subnets, judged as
/// the etcd store judges it (a range over the IPv4 part, else the exact key).
fn holder_exists(st: &State, key: &SubnetKey) -> bool {
    match key.ipv4_part() {
        Some(part) => {
            let start = format!("{}{}", super::subnets_prefix(), part);
            st.kv
                .range(start.clone()..)
                .take_while(|(k, _)| k.starts_with(&start))
                .any(|(k, _)| k.len() == start.len() || k.as_bytes()[start.len()] == b'&')
        }
        None => st.kv.contains_key(&subnet_key(key)),
    }
}

fn lease_of(rel: &str, kv: &Kv) -> Lease {
    match decode_entry(rel, &kv.value, kv.create, kv.modified, kv.lease) {
        super::Entry::Lease(l) => l,
        other => unreachable!("we only write readable leases, got {other:?}"),
    }
}

fn to_batch(rev: i64, changes: &[Change]) -> WatchBatch {
    let events = changes
        .iter()
        .filter_map(|c| match c {
            Change::Put(k, kv) => decode_put(k, &kv.value, kv.create, kv.modified, kv.lease),
            Change::Delete(k) => decode_delete(k, rev),
        })
        .collect();
    WatchBatch {
        revision: rev,
        events,
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    async fn snapshot(&self) -> StoreResult<Snapshot> {
        let st = self.op(|c| c.range += 1)?;
        Ok(snapshot_of(&st.kv, st.revision))
    }

    async fn snapshot_at(&self, revision: i64) -> StoreResult<Snapshot> {
        let st = self.op(|c| c.range += 1)?;
        let revision = revision.max(0);
        if revision < st.compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: st.compacted,
            });
        }
        if revision > st.revision {
            return Err(StoreError::Other(format!(
                "revision {revision} is in the future (current is {})",
                st.revision
            )));
        }
        let mut kv = st.base.clone();
        for (_, change) in st.log.iter().take_while(|(rev, _)| *rev <= revision) {
            apply_change(&mut kv, change);
        }
        Ok(snapshot_of(&kv, revision))
    }

    async fn watch(&self, from_revision: i64) -> StoreResult<WatchStream> {
        let (rx, replay, mut last) = {
            let st = self.op(|c| c.watch += 1)?;
            if from_revision > 0 && from_revision < st.compacted {
                return Err(StoreError::Compacted {
                    requested: from_revision,
                    compacted: st.compacted,
                });
            }
            // Subscribe under the lock so nothing falls between replay and live.
            let rx = self.inner.changes.subscribe();
            let mut replay: Vec<WatchBatch> = Vec::new();
            if from_revision > 0 {
                let mut i = 0;
                while i < st.log.len() {
                    let rev = st.log[i].0;
                    let mut changes = Vec::new();
                    while i < st.log.len() && st.log[i].0 == rev {
                        changes.push(st.log[i].1.clone());
                        i += 1;
                    }
                    if rev >= from_revision {
                        replay.push(to_batch(rev, &changes));
                    }
                }
            }
            (rx, replay, st.revision)
        };
        let mut avail = self.inner.available.subscribe();
        let stream = super::task_stream(move |tx| async move {
            for b in replay {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            let mut rx = rx;
            loop {
                tokio::select! {
                    changed = avail.changed() => {
                        if changed.is_err() || !*avail.borrow() {
                            let _ = tx.send(Err(unavailable())).await;
                            return;
                        }
                    }
                    msg = rx.recv() => match msg {
                        Ok((rev, changes)) => {
                            if rev <= last {
                                continue;
                            }
                            last = rev;
                            if tx.send(Ok(to_batch(rev, &changes))).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let _ = tx.send(Err(StoreError::Unavailable("watch fell behind".into()))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(stream)
    }

    async fn put_config(&self, text: &str) -> StoreResult<i64> {
        let mut st = self.op(|c| c.put += 1)?;
        let key = super::config_key().to_string();
        let create = st
            .kv
            .get(&key)
            .map(|kv| kv.create)
            .unwrap_or(st.revision + 1);
        let kv = Kv {
            value: text.as_bytes().to_vec(),
            create,
            modified: st.revision + 1,
            lease: 0,
        };
        Ok(commit(
            &mut st,
            &self.inner.changes,
            vec![Change::Put(key, kv)],
        ))
    }

    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let id = {
            let mut st = self.op(|c| c.grant += 1)?;
            st.next_lease += 1;
            let id = st.next_lease;
            let ttl = Duration::from_secs(ttl.as_secs().max(1));
            st.leases.insert(
                id,
                EtcdLease {
                    ttl,
                    deadline: Instant::now() + ttl,
                },
            );
            id
        };
        self.inner.lease_added.notify_one();
        Ok(LeaseId(id))
    }

    async fn keep_alive(&self, id: LeaseId) -> StoreResult<Duration> {
        let mut st = self.op(|c| c.keep_alive += 1)?;
        let l = st
            .leases
            .get_mut(&id.0)
            .ok_or_else(|| StoreError::NotFound(format!("etcd lease {id}")))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn time_to_live(&self, id: LeaseId) -> StoreResult<Option<Duration>> {
        let st = self.op(|c| c.time_to_live += 1)?;
        Ok(st
            .leases
            .get(&id.0)
            .map(|l| l.deadline.saturating_duration_since(Instant::now())))
    }

    async fn revoke(&self, id: LeaseId) -> StoreResult<()> {
        let mut st = self.op(|c| c.revoke += 1)?;
        revoke_locked(&mut st, &self.inner.changes, id.0);
        Ok(())
    }

    async fn create(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        lease: Option<LeaseId>,
    ) -> StoreResult<Lease> {
        let mut st = self.op(|c| c.txn += 1)?;
        if let Some(id) = lease {
            if !st.leases.contains_key(&id.0) {
                return Err(StoreError::NotFound(format!("etcd lease {id}")));
            }
        }
        if holder_exists(&st, key) {
            return Err(StoreError::AlreadyExists(*key));
        }
        let rel = subnet_key(key);
        let kv = Kv {
            value: attrs.to_json().into_bytes(),
            create: st.revision + 1,
            modified: st.revision + 1,
            lease: lease.map_or(0, |l| l.0),
        };
        commit(
            &mut st,
            &self.inner.changes,
            vec![Change::Put(rel.clone(), kv.clone())],
        );
        Ok(lease_of(&rel, &kv))
    }

    async fn claim(&self, claim: &Claim<'_>) -> StoreResult<Lease> {
        let mut st = self.op(|c| c.txn += 1)?;
        let config = st.kv.get(super::config_key()).map_or(0, |kv| kv.modified);
        if config != claim.config_revision {
            return Err(StoreError::ConfigChanged { revision: config });
        }
        if holder_exists(&st, claim.key) {
            return Err(StoreError::AlreadyExists(*claim.key));
        }
        let guard_key = super::node_key(claim.node);
        let guard = st.kv.get(&guard_key);
        let expected = match claim.guard {
            NodeGuard::Absent => guard.is_none(),
            // As etcd compares: a missing key has mod_revision 0.
            NodeGuard::At(rev) => guard.map_or(0, |kv| kv.modified) == rev,
        };
        if !expected {
            return Err(StoreError::NodeClaimed {
                subnet: guard.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
                revision: guard.map_or(0, |kv| kv.modified),
            });
        }
        // etcd checks the lease only for the puts it makes: after the compares.
        if !st.leases.contains_key(&claim.lease.0) {
            return Err(StoreError::NotFound(format!("etcd lease {}", claim.lease)));
        }
        let rel = subnet_key(claim.key);
        let rev = st.revision + 1;
        let kv = Kv {
            value: claim.attrs.to_json().into_bytes(),
            create: rev,
            modified: rev,
            lease: claim.lease.0,
        };
        let guard_kv = Kv {
            value: claim.key.to_string().into_bytes(),
            create: guard.map_or(rev, |g| g.create),
            modified: rev,
            lease: claim.lease.0,
        };
        commit(
            &mut st,
            &self.inner.changes,
            vec![
                Change::Put(rel.clone(), kv.clone()),
                Change::Put(guard_key, guard_kv),
            ],
        );
        Ok(lease_of(&rel, &kv))
    }

    async fn update(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        lease: Option<LeaseId>,
    ) -> StoreResult<Lease> {
        let mut st = self.op(|c| c.txn += 1)?;
        let rel = subnet_key(&current.key);
        let existing = st
            .kv
            .get(&rel)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("lease {}", current.key)))?;
        if existing.modified != current.mod_revision {
            return Err(StoreError::Conflict(format!("lease {}", current.key)));
        }
        if let Some(id) = lease {
            if !st.leases.contains_key(&id.0) {
                return Err(StoreError::NotFound(format!("etcd lease {id}")));
            }
        }
        let kv = Kv {
            value: attrs.to_json().into_bytes(),
            create: existing.create,
            modified: st.revision + 1,
            lease: lease.map_or(0, |l| l.0),
        };
        commit(
            &mut st,
            &self.inner.changes,
            vec![Change::Put(rel.clone(), kv.clone())],
        );
        Ok(lease_of(&rel, &kv))
    }

    async fn delete(&self, key: &SubnetKey, mod_revision: i64) -> StoreResult<i64> {
        let mut st = self.op(|c| c.txn += 1)?;
        let rel = subnet_key(key);
        let existing = st
            .kv
            .get(&rel)
            .ok_or_else(|| StoreError::NotFound(format!("lease {key}")))?;
        if existing.modified != mod_revision {
            return Err(StoreError::Conflict(format!("lease {key}")));
        }
        Ok(commit(
            &mut st,
            &self.inner.changes,
            vec![Change::Delete(rel)],
        ))
    }

    async fn put_raw(&self, key: &str, value: &str, lease: Option<LeaseId>) -> StoreResult<i64> {
        let mut st = self.op(|c| c.put += 1)?;
        if let Some(id) = lease {
            if !st.leases.contains_key(&id.0) {
                return Err(StoreError::NotFound(format!("etcd lease {id}")));
            }
        }
        let create = st
            .kv
            .get(key)
            .map(|kv| kv.create)
            .unwrap_or(st.revision + 1);
        let kv = Kv {
            value: value.as_bytes().to_vec(),
            create,
            modified: st.revision + 1,
            lease: lease.map_or(0, |l| l.0),
        };
        Ok(commit(
            &mut st,
            &self.inner.changes,
            vec![Change::Put(key.to_string(), kv)],
        ))
    }

    async fn delete_raw(&self, key: &str) -> StoreResult<i64> {
        let mut st = self.op(|c| c.txn += 1)?;
        if !st.kv.contains_key(key) {
            return Ok(st.revision);
        }
        Ok(commit(
            &mut st,
            &self.inner.changes,
            vec![Change::Delete(key.to_string())],
        ))
    }

    async fn compact(&self, revision: i64) -> StoreResult<()> {
        let mut st = self.op(|c| c.other += 1)?;
        if revision <= st.compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: st.compacted,
            });
        }
        if revision > st.revision {
            return Err(StoreError::Other(format!(
                "revision {revision} is in the future"
            )));
        }
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.log)
            .into_iter()
            .partition(|(rev, _)| *rev < revision);
        for (_, change) in &old {
            apply_change(&mut st.base, change);
        }
        st.log = keep;
        st.compacted = revision;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        self.op(|c| c.other += 1).map(|_| ())
    }

    fn requests(&self) -> RequestCounts {
        self.lock().counts
    }

    fn describe(&self) -> String {
        "in-memory store".into()
    }
}

#[cfg(test)]
mod conformance {
    use crate::conformance::Store;
    use std::sync::Arc;

    async fn fresh() -> Store {
        Arc::new(super::MemoryStore::new())
    }

    crate::conformance_tests!(fresh);
}
