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
}

/// Why a backend cannot be used.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("the {0} backend is not available in this build of weft-node")]
    Unsupported(BackendType),
}

/// The backend for a network config.
pub fn for_config(cfg: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    match cfg {
        BackendConfig::Vxlan(v) => Ok(Box::new(Vxlan::new(v.clone()))),
        BackendConfig::HostGw => Ok(Box::new(HostGw)),
        BackendConfig::Ipsec(_) => Err(BackendError::Unsupported(BackendType::Ipsec)),
    }
}
