//! The controller's view of the store, fed by its one etcd watch: config,
//! leases indexed by subnet and by node, what the pool has in use, and a
//! bounded history of watch lines that node streams are served from.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use weft_config::NetworkConfig;
use weft_lease::alloc::{key_fits, Occupancy};
use weft_lease::api::{LeaseView, WatchEvent, WatchKind};
use weft_lease::store::{CorruptEntry, Snapshot, StoreEvent, WatchBatch};
use weft_lease::{Lease, SubnetKey};

/// The network config as last seen in the store.
#[derive(Debug, Clone)]
pub(crate) enum ConfigState {
    Missing,
    Invalid {
        raw: String,
        error: String,
        revision: i64,
    },
    Valid {
        raw: String,
        config: Arc<NetworkConfig>,
        revision: i64,
    },
}

impl ConfigState {
    fn from_text(raw: String, revision: i64) -> Self {
        match NetworkConfig::parse(&raw) {
            Ok(config) => ConfigState::Valid {
                raw,
                config: Arc::new(config),
                revision,
            },
            Err(e) => ConfigState::Invalid {
                raw,
                error: e.to_string(),
                revision,
            },
        }
    }

    pub(crate) fn valid(&self) -> Option<&Arc<NetworkConfig>> {
        match self {
            ConfigState::Valid { config, .. } => Some(config),
            _ => None,
        }
    }
}

/// Serialized watch lines, oldest first, at most `capacity` of them and
/// `max_bytes` in all. Every event with a revision greater than `start` is
/// present.
#[derive(Debug)]
pub(crate) struct History {
    lines: VecDeque<(i64, Bytes)>,
    start: i64,
    capacity: usize,
    bytes: usize,
    max_bytes: usize,
}

impl History {
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        History {
            lines: VecDeque::new(),
            start: 0,
            capacity: capacity.max(1),
            bytes: 0,
            max_bytes,
        }
    }

    pub(crate) fn push(&mut self, revision: i64, line: Bytes) {
        self.bytes += line.len();
        self.lines.push_back((revision, line));
        // The newest line always stays, however large.
        while self.lines.len() > 1
            && (self.lines.len() > self.capacity || self.bytes > self.max_bytes)
        {
            if let Some((rev, old)) = self.lines.pop_front() {
                self.bytes -= old.len();
                self.start = rev;
            }
        }
    }

    /// Forgets everything: history starts at `revision`.
    pub(crate) fn restart_at(&mut self, revision: i64) {
        self.lines.clear();
        self.bytes = 0;
        self.start = revision;
    }

    /// Bytes of the lines kept.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lines with a revision greater than `after`, or `None` if some of
    /// them are no longer kept.
    pub(crate) fn since(&self, after: i64) -> Option<(Vec<Bytes>, i64)> {
        if after < self.start {
            return None;
        }
        let from = self.lines.partition_point(|(rev, _)| *rev <= after);
        let lines: Vec<Bytes> = self.lines.range(from..).map(|(_, l)| l.clone()).collect();
        let last = self
            .lines
            .back()
            .map_or(after, |(rev, _)| (*rev).max(after));
        Some((lines, last))
    }

    #[cfg(test)]
    pub(crate) fn start(&self) -> i64 {
        self.start
    }
}

/// A line type of a watch stream: what it says when idle and when the
/// stream must end.
pub(crate) trait WatchLine: serde::Serialize {
    fn heartbeat(revision: i64) -> Self;
    fn error(revision: i64, message: String) -> Self;
}

impl WatchLine for WatchEvent {
    fn heartbeat(revision: i64) -> Self {
        WatchEvent {
            kind: WatchKind::Heartbeat,
            revision,
            lease: None,
            message: None,
        }
    }

    fn error(revision: i64, message: String) -> Self {
        WatchEvent {
            kind: WatchKind::Error,
            revision,
            lease: None,
            message: Some(message),
        }
    }
}

/// Encodes one watch line (JSON plus newline).
pub(crate) fn line(event: &impl serde::Serialize) -> Bytes {
    let mut v = serde_json::to_vec(event).expect("watch events always serialize");
    v.push(b'\n');
    Bytes::from(v)
}

/// Controller state derived from the store.
#[derive(Debug)]
pub(crate) struct Cache {
    /// Store revision applied so far.
    pub revision: i64,
    /// Whether the first full list has been loaded.
    pub synced: bool,
    pub config: ConfigState,
    pub leases: BTreeMap<SubnetKey, Lease>,
    pub corrupt: BTreeMap<String, CorruptEntry>,
    /// Each node's subnets: one, or a few while it moves to another, so
    /// a short list (a set would allocate room for eleven per node).
    by_node: HashMap<Box<str>, Vec<SubnetKey>>,
    occupancy: Occupancy,
    pub history: History,
    /// Container names and their own history.
    pub names: crate::names::Names,
    /// Subnets whose lease ran out (not released through the API): held for
    /// their node until the deadline, so a node cut off for longer than
    /// its TTL finds its subnet unused when it comes back.
    quarantine: HashMap<SubnetKey, (String, tokio::time::Instant)>,
    /// Keys this controller is deleting on purpose (release, retire): their
    /// deletion is no expiry.
    releasing: std::collections::HashSet<SubnetKey>,
    /// How long an expired subnet stays held (`None`: one TTL, at most
    /// 10 minutes).
    pub quarantine_for: Option<std::time::Duration>,
}

/// The default hold: one TTL, at most 10 minutes.
const QUARANTINE_MAX: std::time::Duration = std::time::Duration::from_secs(600);

impl Cache {
    pub(crate) fn new(history_capacity: usize, history_bytes: usize) -> Self {
        Cache {
            revision: 0,
            synced: false,
            config: ConfigState::Missing,
            leases: BTreeMap::new(),
            corrupt: BTreeMap::new(),
            by_node: HashMap::new(),
            occupancy: Occupancy::default(),
            history: History::new(history_capacity, history_bytes),
            names: crate::names::Names::new(History::new(history_capacity, history_bytes)),
            quarantine: HashMap::new(),
            releasing: std::collections::HashSet::new(),
            quarantine_for: None,
        }
    }

    /// Marks `key` as being deleted on purpose (not an expiry).
    pub(crate) fn releasing(&mut self, key: SubnetKey) {
        self.releasing.insert(key);
    }

    /// A lease deleted without this controller asking: it ran out (or
    /// someone deleted it in etcd). Its subnet is held for its node.
    fn expired(&mut self, lease: &Lease, now: tokio::time::Instant) {
        if self.releasing.remove(&lease.key) || lease.is_reservation() {
            return;
        }
        let Some(node) = lease.node_name() else {
            return;
        };
        let hold = self.quarantine_for.unwrap_or_else(|| {
            self.config
                .valid()
                .map_or(QUARANTINE_MAX, |c| c.lease_ttl.min(QUARANTINE_MAX))
        });
        if hold.is_zero() {
            return;
        }
        tracing::info!(subnet = %lease.key, node, hold = ?hold, "lease ran out; its subnet is held for its node");
        self.quarantine
            .insert(lease.key, (node.to_string(), now + hold));
    }

    /// Subnets held for nodes other than `node` now, and `node`'s own.
    pub(crate) fn quarantined(&mut self, node: &str) -> (Vec<SubnetKey>, Vec<SubnetKey>) {
        let now = tokio::time::Instant::now();
        self.quarantine.retain(|_, (_, until)| *until > now);
        let (mut others, mut own) = (Vec::new(), Vec::new());
        for (key, (owner, _)) in &self.quarantine {
            if owner == node {
                own.push(*key);
            } else {
                others.push(*key);
            }
        }
        (others, own)
    }

    /// The view of a lease under the current config.
    pub(crate) fn view(&self, lease: &Lease, ttl: Option<std::time::Duration>) -> LeaseView {
        let fits = self.config.valid().is_some_and(|c| key_fits(c, &lease.key));
        LeaseView::new(lease, fits, ttl)
    }

    /// What the pool has in use (leases, reservations, unreadable keys).
    pub(crate) fn occupancy(&self) -> &Occupancy {
        &self.occupancy
    }

    /// Leases and reservations owned by `node`.
    pub(crate) fn leases_of(&self, node: &str) -> Vec<Lease> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.leases.get(k).cloned())
            .collect()
    }

    /// Leases whose subnet is not part of the current network.
    pub(crate) fn outside_network(&self) -> Vec<&Lease> {
        match self.config.valid() {
            Some(c) => self
                .leases
                .values()
                .filter(|l| !key_fits(c, &l.key))
                .collect(),
            None => Vec::new(),
        }
    }

    fn occupy(&mut self, key: &SubnetKey, up: bool) {
        if let Some(c) = self.config.valid().cloned() {
            if up {
                self.occupancy.insert(&c, key);
            } else {
                self.occupancy.remove(&c, key);
            }
        }
    }

    fn rebuild_occupancy(&mut self) {
        self.occupancy = match self.config.valid() {
            Some(c) => Occupancy::from_keys(
                c,
                self.leases
                    .keys()
                    .chain(self.corrupt.values().filter_map(|e| e.subnet.as_ref())),
            ),
            None => Occupancy::default(),
        };
    }

    fn set_config(&mut self, state: ConfigState) {
        match &state {
            ConfigState::Valid { config, .. } => {
                let outside = self
                    .leases
                    .values()
                    .filter(|l| !key_fits(config, &l.key))
                    .count();
                if outside > 0 {
                    tracing::warn!(
                        outside,
                        "network config changed: {outside} lease(s) are outside the new network; \
                         their nodes get new subnets when they next acquire"
                    );
                } else {
                    tracing::info!("network config loaded");
                }
            }
            ConfigState::Invalid { error, .. } => {
                tracing::error!(%error, "network config in the store is invalid; allocation stops until it is fixed")
            }
            ConfigState::Missing => tracing::warn!("network config is missing from the store"),
        }
        self.config = state;
        self.rebuild_occupancy();
    }

    /// Records that `node` holds `key` (not yet recorded); a node's keys
    /// stay in order.
    fn node_has(&mut self, node: &str, key: SubnetKey) {
        match self.by_node.get_mut(node) {
            Some(keys) => keys.insert(keys.partition_point(|k| *k < key), key),
            None => {
                self.by_node.insert(node.into(), vec![key]);
            }
        }
    }

    /// Removes a lease; returns it.
    fn remove_lease(&mut self, key: &SubnetKey) -> Option<Lease> {
        let old = self.leases.remove(key)?;
        if let Some(node) = old.node_name() {
            if let Some(keys) = self.by_node.get_mut(node) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_node.remove(node);
                }
            }
        }
        self.occupy(key, false);
        Some(old)
    }

    fn insert_lease(&mut self, lease: Lease) {
        self.remove_lease(&lease.key);
        if let Some(node) = lease.node_name() {
            self.node_has(node, lease.key);
        }
        self.occupy(&lease.key, true);
        self.leases.insert(lease.key, lease);
    }

    fn remove_corrupt(&mut self, key: &str) {
        if let Some(old) = self.corrupt.remove(key) {
            if let Some(s) = old.subnet {
                self.occupy(&s, false);
            }
        }
    }

    fn record(&mut self, kind: WatchKind, revision: i64, lease: &Lease) {
        let view = self.view(lease, None);
        let event = WatchEvent {
            kind,
            revision,
            lease: Some(view),
            message: None,
        };
        self.history.push(revision, line(&event));
    }

    /// Replaces the state with a fresh snapshot. After the first load, the
    /// differences become watch lines (stamped with the snapshot revision),
    /// so streams that were following see every lease that changed.
    pub(crate) fn reset(&mut self, snap: Snapshot, now: tokio::time::Instant) {
        let first = !self.synced;
        let old = std::mem::take(&mut self.leases);
        self.by_node.clear();
        self.corrupt.clear();
        self.config = match snap.config {
            Some((raw, rev)) => ConfigState::from_text(raw, rev),
            None => ConfigState::Missing,
        };
        for c in snap.corrupt {
            tracing::warn!(key = %c.key, reason = %c.reason, "skipping unreadable entry in the store");
            self.corrupt.insert(c.key.clone(), c);
        }
        for l in snap.leases {
            if let Some(node) = l.node_name() {
                self.node_has(node, l.key);
            }
            self.leases.insert(l.key, l);
        }
        self.rebuild_occupancy();
        let rev = snap.revision;
        self.names.reset(snap.names, rev, first);
        if first {
            self.history.restart_at(rev);
        } else {
            let changed: Vec<Lease> = self
                .leases
                .values()
                .filter(|l| old.get(&l.key) != Some(l))
                .cloned()
                .collect();
            let gone: Vec<&Lease> = old
                .values()
                .filter(|l| !self.leases.contains_key(&l.key))
                .collect();
            for l in &gone {
                self.record(WatchKind::Delete, rev, l);
            }
            let gone: Vec<Lease> = gone.into_iter().cloned().collect();
            for l in &gone {
                self.expired(l, now);
            }
            for l in &changed {
                self.record(WatchKind::Put, rev, l);
            }
        }
        self.revision = self.revision.max(rev);
        self.synced = true;
    }

    /// Applies one watch batch; `now` is when (leases that ran out are
    /// held from then).
    pub(crate) fn apply(&mut self, batch: WatchBatch, now: tokio::time::Instant) {
        for ev in batch.events {
            match ev {
                StoreEvent::Put(l) => {
                    if !self.corrupt.is_empty() {
                        self.remove_corrupt(&format!("subnets/{}", l.key));
                    }
                    self.record(WatchKind::Put, l.mod_revision, &l);
                    self.insert_lease(l);
                }
                StoreEvent::Delete { key, revision } => {
                    if let Some(old) = self.remove_lease(&key) {
                        self.record(WatchKind::Delete, revision, &old);
                        self.expired(&old, now);
                    }
                    if !self.corrupt.is_empty() {
                        self.remove_corrupt(&format!("subnets/{key}"));
                    }
                }
                StoreEvent::Corrupt(c) => {
                    tracing::warn!(key = %c.key, reason = %c.reason, "skipping unreadable entry written to the store");
                    // A lease overwritten with garbage is gone for nodes,
                    // but its subnet stays taken.
                    if let Some(old) = c.subnet.as_ref().and_then(|k| self.remove_lease(k)) {
                        self.record(WatchKind::Delete, c.mod_revision, &old);
                    }
                    self.remove_corrupt(&c.key);
                    if let Some(s) = c.subnet {
                        self.occupy(&s, true);
                    }
                    self.corrupt.insert(c.key.clone(), c);
                }
                StoreEvent::CorruptDeleted { key, .. } => self.remove_corrupt(&key),
                StoreEvent::ConfigPut { text, revision } => {
                    self.set_config(ConfigState::from_text(text, revision))
                }
                StoreEvent::ConfigDelete { .. } => self.set_config(ConfigState::Missing),
                StoreEvent::NamePut(n) => self.names.put(n),
                StoreEvent::NameDelete {
                    name,
                    address,
                    revision,
                } => self.names.delete(name, address, revision),
            }
        }
        self.revision = self.revision.max(batch.revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Cache {
        fn apply_now(&mut self, batch: WatchBatch) {
            self.apply(batch, tokio::time::Instant::now());
        }

        fn reset_now(&mut self, snap: Snapshot) {
            self.reset(snap, tokio::time::Instant::now());
        }
    }
    use weft_lease::{BackendData, LeaseAttrs, LeaseId};

    fn lease(key: &str, node: &str, rev: i64) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new(
                node,
                Some("198.18.0.1".parse().unwrap()),
                None,
                &BackendData::HostGw,
            ),
            etcd_lease: Some(LeaseId(1)),
            create_revision: rev,
            mod_revision: rev,
        }
    }

    fn snapshot(rev: i64, leases: Vec<Lease>) -> Snapshot {
        Snapshot {
            revision: rev,
            config: Some((r#"{"Network":"10.244.0.0/16"}"#.into(), 1)),
            leases,
            corrupt: vec![],
            names: vec![],
        }
    }

    fn kinds(lines: &[Bytes]) -> Vec<(WatchKind, String)> {
        lines
            .iter()
            .map(|l| {
                let e: WatchEvent = serde_json::from_slice(l).unwrap();
                (e.kind, e.lease.unwrap().key.to_string())
            })
            .collect()
    }

    #[test]
    fn history_is_bounded_in_bytes_and_keeps_the_newest_line() {
        let mut h = History::new(1000, 100);
        h.restart_at(0);
        for rev in 1..=10 {
            h.push(rev, Bytes::from(vec![b'x'; 30]));
        }
        // 3 lines of 30 bytes fit in 100.
        assert_eq!(h.bytes(), 90);
        assert_eq!(h.start(), 7);
        assert_eq!(h.since(7).unwrap().0.len(), 3);
        assert!(h.since(6).is_none());
        // One line larger than the bound replaces everything but stays.
        h.push(11, Bytes::from(vec![b'y'; 500]));
        assert_eq!(h.bytes(), 500);
        assert_eq!(h.since(10).unwrap().0.len(), 1);
        assert!(h.since(9).is_none());
        h.restart_at(20);
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn history_serves_lines_after_a_revision() {
        let mut h = History::new(3, usize::MAX);
        h.restart_at(10);
        for rev in 11..=14 {
            h.push(rev, Bytes::from(format!("{rev}\n")));
        }
        // Capacity 3: line 11 was dropped, so only revisions > 11 are complete.
        assert_eq!(h.start(), 11);
        assert!(h.since(10).is_none());
        let (lines, last) = h.since(11).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(last, 14);
        let (lines, last) = h.since(13).unwrap();
        assert_eq!(lines, vec![Bytes::from("14\n")]);
        assert_eq!(last, 14);
        let (lines, last) = h.since(20).unwrap();
        assert!(lines.is_empty());
        assert_eq!(last, 20);
    }

    #[test]
    fn indexes_follow_puts_and_deletes() {
        let mut c = Cache::new(100, usize::MAX);
        c.reset_now(snapshot(5, vec![lease("10.244.1.0-24", "a", 3)]));
        assert_eq!(c.occupancy().positions_used(), 1);
        c.apply_now(WatchBatch {
            revision: 6,
            events: vec![StoreEvent::Put(lease("10.244.2.0-24", "a", 6))],
        });
        assert_eq!(c.leases_of("a").len(), 2);
        c.apply_now(WatchBatch {
            revision: 7,
            events: vec![StoreEvent::Delete {
                key: "10.244.1.0-24".parse().unwrap(),
                revision: 7,
            }],
        });
        assert_eq!(c.leases_of("a").len(), 1);
        assert_eq!(c.occupancy().positions_used(), 1);
        let (lines, _) = c.history.since(5).unwrap();
        assert_eq!(
            kinds(&lines),
            vec![
                (WatchKind::Put, "10.244.2.0-24".to_string()),
                (WatchKind::Delete, "10.244.1.0-24".to_string())
            ]
        );
    }

    #[test]
    fn corrupt_overwrite_deletes_the_lease_but_keeps_the_subnet_taken() {
        let mut c = Cache::new(100, usize::MAX);
        c.reset_now(snapshot(5, vec![lease("10.244.1.0-24", "a", 3)]));
        c.apply_now(WatchBatch {
            revision: 6,
            events: vec![StoreEvent::Corrupt(CorruptEntry {
                key: "subnets/10.244.1.0-24".into(),
                subnet: Some("10.244.1.0-24".parse().unwrap()),
                reason: "bad".into(),
                mod_revision: 6,
            })],
        });
        assert!(c.leases.is_empty());
        assert_eq!(c.occupancy().positions_used(), 1);
        assert_eq!(
            kinds(&c.history.since(5).unwrap().0),
            vec![(WatchKind::Delete, "10.244.1.0-24".into())]
        );
        c.apply_now(WatchBatch {
            revision: 7,
            events: vec![StoreEvent::CorruptDeleted {
                key: "subnets/10.244.1.0-24".into(),
                revision: 7,
            }],
        });
        assert_eq!(c.occupancy().positions_used(), 0);
    }

    #[test]
    fn relist_turns_differences_into_lines() {
        let mut c = Cache::new(100, usize::MAX);
        c.reset_now(snapshot(
            5,
            vec![
                lease("10.244.1.0-24", "a", 3),
                lease("10.244.2.0-24", "b", 4),
            ],
        ));
        assert!(c.history.since(5).unwrap().0.is_empty());
        c.reset_now(snapshot(
            9,
            vec![
                lease("10.244.2.0-24", "b", 4),
                lease("10.244.3.0-24", "c", 8),
            ],
        ));
        let (lines, last) = c.history.since(5).unwrap();
        assert_eq!(last, 9);
        assert_eq!(
            kinds(&lines),
            vec![
                (WatchKind::Delete, "10.244.1.0-24".to_string()),
                (WatchKind::Put, "10.244.3.0-24".to_string())
            ]
        );
    }

    #[test]
    fn config_change_rebuilds_occupancy_and_reports_outsiders() {
        let mut c = Cache::new(10, usize::MAX);
        c.reset_now(snapshot(5, vec![lease("10.244.1.0-24", "a", 3)]));
        c.apply_now(WatchBatch {
            revision: 6,
            events: vec![StoreEvent::ConfigPut {
                text: r#"{"Network":"10.99.0.0/16"}"#.into(),
                revision: 6,
            }],
        });
        assert_eq!(c.outside_network().len(), 1);
        assert_eq!(c.occupancy().positions_used(), 0);
        c.apply_now(WatchBatch {
            revision: 7,
            events: vec![StoreEvent::ConfigPut {
                text: "{".into(),
                revision: 7,
            }],
        });
        assert!(matches!(c.config, ConfigState::Invalid { .. }));
    }
}
