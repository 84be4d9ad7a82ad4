//! Subnet leases for weft.
//!
//! - [`SubnetKey`], [`LeaseAttrs`], [`Lease`]: flannel's etcd schema, typed.
//! - [`alloc`]: the pure allocator that picks a node's subnet.
//! - [`LeaseStore`] with `EtcdStore` (production; feature `etcd`, which only
//!   the controller, tests and benchmarks enable) and [`MemoryStore`]
//!   (tests); `conformance` (feature `conformance`) holds the suite both pass.
//! - [`api`]: the controller's HTTP API types; `client` (feature `client`)
//!   an HTTP(S) client for it; `tls` (feature `tls`) its PEM files as
//!   rustls configurations; `node_control` (with `client`) the node
//!   daemon's control socket protocol.
//! - [`NodeName`]: validated node identities.

/// Serializes a type as its `Display` text and reads it with `FromStr`.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

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
pub mod memory;
mod name;
pub mod names;
#[cfg(feature = "client")]
pub mod node_control;
pub mod store;
#[cfg(feature = "tls")]
pub mod tls;

pub use attrs::{BackendData, BackendDataError, JsonText, LeaseAttrs};
pub use key::{KeyError, SubnetKey};
pub use lease::{Lease, LeaseId};
pub use mac::MacAddr;
pub use name::{NodeName, NodeNameError, MAX_NODE_NAME_LEN};
#[cfg(feature = "etcd")]
pub use store::{EtcdOptions, EtcdStore};
pub use store::{LeaseStore, MemoryStore, StoreError, StoreEvent};
