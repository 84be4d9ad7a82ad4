//! Where leases live: the [`LeaseStore`] trait, implemented by `EtcdStore`
//! (production) and [`MemoryStore`] (unit tests). Both pass the same
//! conformance suite (`weft_lease::conformance`).
//!
//! The store speaks etcd's model: every change has a revision, a key can be
//! attached to an expiring lease, writes are compare-and-set, and a watch
//! replays changes from a revision or reports that it was compacted.

#[cfg(feature = "etcd")]
mod batch;
mod decode;
#[cfg(feature = "etcd")]
mod etcd;
mod memory;

pub(crate) use decode::Entry;
pub use decode::{config_key, node_key, subnets_prefix};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use memory::MemoryStore;

use crate::attrs::LeaseAttrs;
use crate::key::SubnetKey;
use crate::lease::{Lease, LeaseId};
use crate::names::{name_key, NameRecord, StoredName};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::time::Duration;
use thiserror::Error;

/// Errors from a lease store.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// `create` found the subnet already held.
    #[error("subnet {0} is already leased")]
    AlreadyExists(SubnetKey),
    /// A compare-and-set lost: the key changed since it was read.
    #[error("{0} changed concurrently")]
    Conflict(String),
    /// The key or etcd lease does not exist (any more).
    #[error("{0} not found")]
    NotFound(String),
    /// The requested revision is older than the store's history.
    #[error("revision {requested} is compacted (oldest available is {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    /// A claim was made under a network config that is no longer the
    /// store's (its config key is now at `revision`, 0 when deleted).
    #[error("the network config changed (now at revision {revision})")]
    ConfigChanged { revision: i64 },
    /// A claim found the node's guard key (`nodes/<name>`) other than it
    /// expected: another writer claimed a subnet for the node.
    #[error("the node's claim changed: it records subnet {subnet:?} since revision {revision}")]
    NodeClaimed {
        /// The subnet key the guard names, `None` when there is no guard.
        subnet: Option<String>,
        /// The guard's revision (0 when there is none).
        revision: i64,
    },
    /// Any other failure reported by the store.
    #[error("store error: {0}")]
    Other(String),
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// A key under `subnets/` whose key or value cannot be read. It is reported
/// and skipped, and its subnet (when the key names one) is never handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptEntry {
    /// The key relative to the prefix (`subnets/...`).
    pub key: String,
    /// The subnet, when the key itself is readable.
    pub subnet: Option<SubnetKey>,
    /// What is wrong.
    pub reason: String,
    /// Revision of the entry's last change.
    pub mod_revision: i64,
}

/// Everything under the prefix at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store revision the snapshot was read at.
    pub revision: i64,
    /// The raw config text and its revision, if the config key exists.
    pub config: Option<(String, i64)>,
    /// Readable leases and reservations.
    pub leases: Vec<Lease>,
    /// Unreadable entries under `subnets/`.
    pub corrupt: Vec<CorruptEntry>,
    /// Readable name records (unreadable ones are left out).
    pub names: Vec<StoredName>,
}

/// What a claim expects of its node's guard key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeGuard {
    /// There is none: the node holds no lease (or one from before guards).
    Absent,
    /// It is unchanged since this revision.
    At(i64),
}

/// A new lease for a node, written in one transaction only if the subnet is
/// free, the network config is still the one the subnet was chosen under,
/// and the node's guard is as expected. The guard is set to the new subnet.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The subnet.
    pub key: &'a SubnetKey,
    /// The lease's attributes.
    pub attrs: &'a LeaseAttrs,
    /// The node the lease is for.
    pub node: &'a str,
    /// The etcd lease the subnet and the guard are attached to.
    pub lease: LeaseId,
    /// The revision of the config key the subnet was chosen under.
    pub config_revision: i64,
    /// What the node's guard must be.
    pub guard: NodeGuard,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEvent {
    /// A lease was created or changed.
    Put(Lease),
    /// A lease key was deleted (released, expired, or removed by hand).
    Delete { key: SubnetKey, revision: i64 },
    /// A key under `subnets/` was written with something unreadable.
    Corrupt(CorruptEntry),
    /// An unreadable key under `subnets/` was deleted.
    CorruptDeleted { key: String, revision: i64 },
    /// The config key was written.
    ConfigPut { text: String, revision: i64 },
    /// The config key was deleted.
    ConfigDelete { revision: i64 },
    /// A name record was written.
    NamePut(StoredName),
    /// A name record was deleted (or overwritten with something unreadable).
    NameDelete {
        name: weft_config::DnsName,
        address: std::net::IpAddr,
        revision: i64,
    },
}

impl StoreEvent {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            StoreEvent::Put(l) => l.mod_revision,
            StoreEvent::Delete { revision, .. }
            | StoreEvent::CorruptDeleted { revision, .. }
            | StoreEvent::ConfigPut { revision, .. }
            | StoreEvent::ConfigDelete { revision }
            | StoreEvent::NameDelete { revision, .. } => *revision,
            StoreEvent::Corrupt(c) => c.mod_revision,
            StoreEvent::NamePut(n) => n.mod_revision,
        }
    }
}

/// The changes of one store response. `revision` is that of the last event,
/// or for a batch without events the store's revision (progress): every
/// change up to `revision` has been delivered, so a watch resumes from
/// `revision + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchBatch {
    pub revision: i64,
    pub events: Vec<StoreEvent>,
}

/// A live watch. It ends with an error when the store goes away or the
/// watch was compacted; callers re-list and watch again.
pub type WatchStream = BoxStream<'static, StoreResult<WatchBatch>>;

/// Counts of requests sent to the store, by operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub range: u64,
    pub txn: u64,
    pub put: u64,
    pub grant: u64,
    pub keep_alive: u64,
    pub time_to_live: u64,
    pub revoke: u64,
    pub watch: u64,
    pub other: u64,
}

impl RequestCounts {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.range
            + self.txn
            + self.put
            + self.grant
            + self.keep_alive
            + self.time_to_live
            + self.revoke
            + self.watch
            + self.other
    }

    /// `(operation, count)` pairs, for metrics.
    pub fn by_op(&self) -> [(&'static str, u64); 9] {
        [
            ("range", self.range),
            ("txn", self.txn),
            ("put", self.put),
            ("grant", self.grant),
            ("keep_alive", self.keep_alive),
            ("time_to_live", self.time_to_live),
            ("revoke", self.revoke),
            ("watch", self.watch),
            ("other", self.other),
        ]
    }
}

/// Where leases and the network config are kept.
#[async_trait]
pub trait LeaseStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads the config and all leases in one consistent read.
    async fn snapshot(&self) -> StoreResult<Snapshot>;

    /// Reads them as they were at `revision`; `Compacted` if that is gone.
    async fn snapshot_at(&self, revision: i64) -> StoreResult<Snapshot>;

    /// Streams every change with a revision `>= from_revision`.
    async fn watch(&self, from_revision: i64) -> StoreResult<WatchStream>;

    /// Writes the config text (the caller validates it). Returns the revision.
    async fn put_config(&self, text: &str) -> StoreResult<i64>;

    /// Grants an etcd lease with this TTL (whole seconds).
    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId>;

    /// Renews an etcd lease; returns its TTL. `NotFound` if it expired.
    async fn keep_alive(&self, id: LeaseId) -> StoreResult<Duration>;

    /// Time left on an etcd lease; `None` if it does not exist.
    async fn time_to_live(&self, id: LeaseId) -> StoreResult<Option<Duration>>;

    /// Revokes an etcd lease, deleting its keys. Revoking a lease that does
    /// not exist succeeds.
    async fn revoke(&self, id: LeaseId) -> StoreResult<()>;

    /// Creates a lease key if no key holds any of its subnets, attached to
    /// `lease` (or none: a reservation). `AlreadyExists` otherwise.
    async fn create(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        lease: Option<LeaseId>,
    ) -> StoreResult<Lease>;

    /// Creates a node's lease as [`Claim`] says. Checked in this order:
    /// `ConfigChanged`, `AlreadyExists`, `NodeClaimed`; `NotFound` when the
    /// etcd lease is gone.
    async fn claim(&self, claim: &Claim<'_>) -> StoreResult<Lease>;

    /// Rewrites an existing lease if it is unchanged since `current` was read
    /// (`Conflict` otherwise), attaching it to `lease`.
    async fn update(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        lease: Option<LeaseId>,
    ) -> StoreResult<Lease>;

    /// Deletes a lease key if its revision is still `mod_revision`. Returns
    /// the store revision after the delete. `NotFound` if the key is gone,
    /// `Conflict` if it changed.
    async fn delete(&self, key: &SubnetKey, mod_revision: i64) -> StoreResult<i64>;

    /// Writes a raw value under the prefix, with no checks: for tools and for
    /// tests that need to write what another program (flannel) would.
    async fn put_raw(&self, key: &str, value: &str, lease: Option<LeaseId>) -> StoreResult<i64>;

    /// Deletes a key under the prefix if it is there. Returns the store
    /// revision after the delete (the current one when there was nothing).
    async fn delete_raw(&self, key: &str) -> StoreResult<i64>;

    /// Writes a name record attached to `lease` (`None`: it stays until
    /// deleted). `NotFound` when the etcd lease is gone.
    async fn put_name(&self, record: &NameRecord, lease: Option<LeaseId>) -> StoreResult<i64> {
        self.put_raw(&record.key(), &record.to_json(), lease).await
    }

    /// Deletes a name record; deleting one that is not there succeeds.
    async fn delete_name(
        &self,
        name: &weft_config::DnsName,
        address: std::net::IpAddr,
    ) -> StoreResult<i64> {
        self.delete_raw(&name_key(name, address)).await
    }

    /// Discards history before `revision`.
    async fn compact(&self, revision: i64) -> StoreResult<()>;

    /// Checks that the store answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Requests sent so far.
    fn requests(&self) -> RequestCounts;

    /// A one-line description for logs (`etcd http://... prefix /weft/network`).
    fn describe(&self) -> String;
}

/// A stream fed by a spawned task, ending when the task ends. The task should
/// stop when `tx` is closed (the reader went away).
pub(crate) fn task_stream<F, Fut>(body: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<StoreResult<WatchBatch>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
