//! The backends: pure functions from the local node and its peers to the
//! state the kernel should have.

use crate::hostgw::HostGw;
use crate::local::LocalNode;
use crate::peer::{Peer, Skipped};
use crate::state::NetState;
use crate::vxlan::Vxlan;
use thiserror::Error;
use weft_config::{BackendConfig, BackendType};
use weft_lease::BackendData;

/// A data plane kind.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Which backend this is.
    fn backend_type(&self) -> BackendType;

    /// What this node publishes in its lease's `BackendData`.
    fn lease_data(&self, local_name: &str) -> BackendData;

    /// MTU for pods, given the external interface's MTU.
    fn pod_mtu(&self, underlay_mtu: u32) -> u32;

    /// The state the kernel should have for these peers. Peers this
    /// backend cannot program are returned as skipped, with the reason.
    fn desired(&self, local: &LocalNode, peers: &[&Peer]) -> (NetState, Vec<Skipped>);

    /// The next moment desired state changes with time alone (on tokio's
    /// clock), so the reconcile loop runs then; `None`: only leases change it.
    fn next_change(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// What the kernel has: before a pass's diff (read back, or as the
    /// previous pass left it) and after a pass applied every change. Lets
    /// a backend notice state it cannot simply put back (ipsec: an
    /// outbound SA whose sequence numbers the peer has already seen).
    fn observed(&self, _have: &NetState) {}
}

/// Why a backend cannot be used.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("the {0} backend is not available in this build of weft-node")]
    Unsupported(BackendType),
    #[error("the ipsec backend needs the node's key: build it with Ipsec::new")]
    NeedsKeys,
}

/// The backend for a network config (ipsec, which needs the node's key
/// pair, is made with `Ipsec::new`).
pub fn for_config(cfg: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    match cfg {
        BackendConfig::Vxlan(v) => Ok(Box::new(Vxlan::new(v.clone()))),
        BackendConfig::HostGw => Ok(Box::new(HostGw)),
        BackendConfig::Ipsec(_) => Err(BackendError::NeedsKeys),
    }
}
