//! Subnet leases for weft.
//!
//! - [`SubnetKey`], [`LeaseAttrs`], [`Lease`]: flannel's etcd schema, typed.
//! - [`alloc`]: the pure allocator that picks a node's subnet.
//! - [`LeaseStore`] with [`EtcdStore`] (production) and [`MemoryStore`]
//!   (tests); `conformance` (feature `conformance`) holds the suite both pass.
//! - [`api`]: the controller's HTTP API types; `client` (feature `client`)
//!   an HTTP client for it.
//! - [`NodeName`]: validated node identities.

pub mod alloc;
pub mod api;
mod attrs;
#[cfg(feature = "client")]
pub mod client;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod key;
mod lease;
mod mac;
mod name;
pub mod store;

pub use attrs::{BackendData, BackendDataError, LeaseAttrs};
pub use key::{KeyError, SubnetKey};
pub use lease::{Lease, LeaseId};
pub use mac::MacAddr;
pub use name::{NodeName, NodeNameError, MAX_NODE_NAME_LEN};
pub use store::{EtcdOptions, EtcdStore, LeaseStore, MemoryStore, StoreError, StoreEvent};
