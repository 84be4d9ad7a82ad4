//! `weft-node`, the daemon on every node.
//!
//! It picks the external interface, gets the network config and a subnet
//! lease from the controller, writes `subnet.env` in flannel's format,
//! installs masquerade rules (`--ip-masq`), and then runs one
//! level-triggered reconcile loop over the leases it follows from the
//! controller's watch stream. It never talks to etcd.

pub mod control;
pub mod daemon;
pub mod health;
pub mod iface;
/// The key store lives with the backends that have keys.
pub use weft_backends::keystore;
pub mod masq;
pub mod names;
pub mod peers;
pub mod reconcile;
pub mod rekey;
pub mod retry;
pub mod status;
pub mod subnet_env;
pub mod system;
