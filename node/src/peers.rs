//! Following the leases: list, then the controller's watch stream; re-list
//! when told to (410, an error line), reconnect when the stream ends or
//! goes silent. The result is one table of leases, shared through a
//! `watch` channel: bursts of changes collapse into the latest table, and
//! the table's change log tells a reader which leases changed since it
//! last looked (so a reconcile pass can work on those alone).

use crate::retry::{until_ok, Backoff};
use crate::status::Status;
use futures::StreamExt;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use weft_backends::peer::{read, Candidate};
use weft_lease::api::WatchKind;
use weft_lease::client::ControllerClient;
use weft_lease::SubnetKey;

/// All leases as last seen, each read and checked once on arrival, and
/// the latest changes to them.
#[derive(Debug)]
pub struct PeerTable {
    /// Whether a full list has been loaded; until then nothing is
    /// reconciled (a restart must not remove routes it has not seen yet).
    pub synced: bool,
    pub revision: i64,
    leases: BTreeMap<SubnetKey, Candidate>,
    /// This table's number among tables: a new list starts a new one.
    id: u64,
    /// The number of the first change in `log`.
    first: u64,
    /// The latest changes: the key, and what it held before.
    log: VecDeque<(SubnetKey, Option<Candidate>)>,
}

/// Changes kept for readers that look later. A reader further behind
/// reads the whole table instead; at most this many old leases are kept.
const LOG_LEN: usize = 1024;

/// Where a reader of a table got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    table: u64,
    seq: u64,
}

/// A key that changed: what it held then, and what it holds now.
pub type Changed<'a> = (SubnetKey, Option<&'a Candidate>, Option<&'a Candidate>);

fn next_id() -> u64 {
    static TABLES: AtomicU64 = AtomicU64::new(1);
    TABLES.fetch_add(1, Ordering::Relaxed)
}

impl Default for PeerTable {
    fn default() -> Self {
        PeerTable {
            synced: false,
            revision: 0,
            leases: BTreeMap::new(),
            id: next_id(),
            first: 0,
            log: VecDeque::new(),
        }
    }
}

impl PeerTable {
    /// A loaded table (`synced`) of these leases.
    pub fn new(revision: i64, leases: BTreeMap<SubnetKey, Candidate>) -> Self {
        PeerTable {
            synced: true,
            revision,
            leases,
            ..PeerTable::default()
        }
    }

    /// Every lease.
    pub fn leases(&self) -> &BTreeMap<SubnetKey, Candidate> {
        &self.leases
    }

    /// Puts in or replaces the lease at `key`.
    pub fn insert(&mut self, key: SubnetKey, lease: Candidate) {
        let before = self.leases.insert(key, lease);
        self.logged(key, before);
    }

    /// Takes out the lease at `key`, if there is one.
    pub fn remove(&mut self, key: &SubnetKey) {
        if let Some(before) = self.leases.remove(key) {
            self.logged(*key, Some(before));
        }
    }

    /// Loads a full list: a new table as far as readers can tell.
    pub fn load(&mut self, revision: i64, leases: BTreeMap<SubnetKey, Candidate>) {
        *self = PeerTable::new(revision, leases);
    }

    fn logged(&mut self, key: SubnetKey, before: Option<Candidate>) {
        self.log.push_back((key, before));
        if self.log.len() > LOG_LEN {
            self.log.pop_front();
            self.first += 1;
        }
    }

    /// Where a reader that has seen the table as it is now got to.
    pub fn mark(&self) -> Mark {
        Mark {
            table: self.id,
            seq: self.first + self.log.len() as u64,
        }
    }

    /// The keys that changed since `mark`, each once, with what it held
    /// at `mark` and holds now (keys that changed back are left out);
    /// `None` when the log does not reach back that far or this is
    /// another table.
    pub fn changes_since(&self, mark: Mark) -> Option<Vec<Changed<'_>>> {
        if mark.table != self.id || mark.seq < self.first {
            return None;
        }
        let from = usize::try_from(mark.seq - self.first).ok()?;
        let mut then: Vec<(SubnetKey, Option<&Candidate>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (key, before) in self.log.iter().skip(from) {
            if seen.insert(*key) {
                then.push((*key, before.as_ref()));
            }
        }
        Some(
            then.into_iter()
                .map(|(key, before)| (key, before, self.leases.get(&key)))
                .filter(|(_, before, now)| before != now)
                .collect(),
        )
    }
}

/// Follows the controller's leases into `tx`, forever.
pub async fn follow(
    client: ControllerClient,
    tx: watch::Sender<PeerTable>,
    silence: Duration,
    status: Arc<Status>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let list = until_ok("listing leases from the controller", || client.list(false)).await;
        let n = list.leases.len();
        let leases = list.leases.iter().map(|l| (l.key, read(l))).collect();
        drop(list.leases);
        tx.send_modify(|t| t.load(list.revision, leases));
        tracing::info!(leases = n, revision = list.revision, "lease list loaded");
        let mut from = list.revision + 1;
        // Watch until a re-list is needed.
        'watch: loop {
            let mut stream = match client.watch(from).await {
                Ok(s) => s,
                Err(e) if e.status() == Some(410) => {
                    tracing::info!("the controller no longer has revision {from}; listing again");
                    break 'watch;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!("watching leases: {e}; retrying in {delay:?} (the data plane stays as it is)");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            status.watch_restarts.inc();
            loop {
                let line = match tokio::time::timeout(silence, stream.next()).await {
                    Err(_) => {
                        tracing::warn!("no word from the controller in {silence:?}; reconnecting");
                        break;
                    }
                    Ok(None) => {
                        tracing::info!("the controller closed the lease watch; reconnecting");
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!("lease watch broke: {e}; reconnecting");
                        break;
                    }
                    Ok(Some(Ok(line))) => line,
                };
                backoff.reset();
                match line.kind {
                    WatchKind::Put | WatchKind::Delete => {
                        let Some(lease) = line.lease else { continue };
                        from = from.max(line.revision + 1);
                        let put = line.kind == WatchKind::Put;
                        tracing::debug!(subnet = %lease.key, node = ?lease.node_name, put, "lease changed");
                        tx.send_modify(|t| {
                            t.revision = t.revision.max(line.revision);
                            if put {
                                t.insert(lease.key, read(&lease));
                            } else {
                                t.remove(&lease.key);
                            }
                        });
                    }
                    WatchKind::Heartbeat => {}
                    WatchKind::Error => {
                        tracing::info!(
                            "controller: {}; listing again",
                            line.message.unwrap_or_default()
                        );
                        break 'watch;
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_backends::Skipped;

    fn key(k: u8) -> SubnetKey {
        format!("10.244.{k}.0-24").parse().unwrap()
    }

    /// A lease at `k` told apart by `what` (its content does not matter).
    fn lease(k: u8, what: &str) -> Candidate {
        Err(Skipped {
            key: key(k),
            node: None,
            reason: what.into(),
        })
    }

    fn keys(changes: &[Changed<'_>]) -> Vec<SubnetKey> {
        changes.iter().map(|c| c.0).collect()
    }

    #[test]
    fn each_changed_key_comes_once_with_its_value_at_the_mark() {
        let mut t = PeerTable::new(1, [(key(1), lease(1, "a"))].into_iter().collect());
        let mark = t.mark();
        assert_eq!(t.changes_since(mark).unwrap(), vec![]);
        t.insert(key(2), lease(2, "a"));
        t.insert(key(1), lease(1, "b"));
        t.insert(key(1), lease(1, "c"));
        t.insert(key(3), lease(3, "a"));
        t.remove(&key(3));
        t.remove(&key(9));
        let changes = t.changes_since(mark).unwrap();
        // Key 3 came and went: nothing changed for a reader at `mark`.
        assert_eq!(keys(&changes), [key(2), key(1)]);
        assert_eq!(changes[0].1, None);
        assert_eq!(changes[0].2, Some(&lease(2, "a")));
        assert_eq!(changes[1].1, Some(&lease(1, "a")), "the value at the mark");
        assert_eq!(changes[1].2, Some(&lease(1, "c")), "the value now");
        // A key set back to what it was is no change either.
        let mark = t.mark();
        t.insert(key(2), lease(2, "b"));
        t.insert(key(2), lease(2, "a"));
        assert_eq!(t.changes_since(mark).unwrap(), vec![]);
    }

    #[test]
    fn a_reader_too_far_behind_or_of_another_table_reads_everything() {
        let mut t = PeerTable::new(1, BTreeMap::new());
        let old = t.mark();
        for i in 0..LOG_LEN {
            t.insert(key((i % 200) as u8), lease(0, &i.to_string()));
        }
        assert!(t.changes_since(old).is_some(), "exactly the log's length");
        let recent = t.mark();
        t.insert(key(1), lease(1, "one more"));
        assert!(
            t.changes_since(old).is_none(),
            "the log no longer reaches back"
        );
        assert_eq!(keys(&t.changes_since(recent).unwrap()), [key(1)]);
        // A new list is a new table, even with the same leases.
        let leases = t.leases().clone();
        let mark = t.mark();
        t.load(2, leases);
        assert!(t.changes_since(mark).is_none());
        assert!(t.changes_since(t.mark()).is_some());
        let other = PeerTable::new(2, BTreeMap::new());
        assert!(other.changes_since(mark).is_none());
        assert!(t.synced && t.revision == 2);
    }
}
