//! The backends: pure functions from the local node and its peers to the
//! state the kernel should have.

use crate::hostgw::HostGw;
use crate::local::LocalNode;
use crate::peer::{resolve, Claim, Peer, Skipped};
use crate::state::{Dev, NetState};
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
    /// A backend that is [`PerPeer`] is told on full passes only.
    fn observed(&self, _have: &NetState) {}

    /// The backend's state as a sum of per-peer parts, if it is one: then
    /// a pass woken by a lease change computes only the changed peers'
    /// part ([`crate::Plan`]). `None`: `desired` is computed as a whole on
    /// every pass (ipsec, whose state also changes with time and keys).
    fn per_peer(&self) -> Option<&dyn PerPeer> {
        None
    }
}

/// A backend whose desired state is a base (its device) plus one part per
/// peer, each a function of that peer and the local node alone. Two
/// programmed peers never write the same object: every object's key must
/// follow from one of the peer's claims (its subnets, its public IP, or
/// one of [`PerPeer::claims`]), which no other programmed peer holds.
pub trait PerPeer: Send + Sync {
    /// What the node has whatever its peers (a device and its address).
    fn base(&self, local: &LocalNode) -> NetState;

    /// Why this backend cannot program `p`, judging `p` alone.
    fn refuse(&self, local: &LocalNode, p: &Peer) -> Option<String>;

    /// What only one peer may hold besides its subnets and public IP (the
    /// older lease keeps it). Never a subnet or public IP claim.
    fn claims(&self, p: &Peer) -> Option<Claim>;

    /// Adds `p`'s objects to `st`. `ext` is the external interface's name,
    /// shared by every object that names it.
    fn add(&self, local: &LocalNode, ext: &Dev, p: &Peer, st: &mut NetState);
}

/// The peers among `peers` that `b` does not refuse; the refused ones go
/// to `skipped`.
pub fn programmable<'a>(
    b: &dyn PerPeer,
    local: &LocalNode,
    peers: impl IntoIterator<Item = &'a Peer>,
    skipped: &mut Vec<Skipped>,
) -> Vec<&'a Peer> {
    let mut fit = Vec::new();
    for p in peers {
        match b.refuse(local, p) {
            Some(reason) => skipped.push(Skipped::of(p, reason)),
            None => fit.push(p),
        }
    }
    fit
}

/// `b`'s base with the objects of `peers` added.
pub fn with_peers(b: &dyn PerPeer, local: &LocalNode, peers: &[&Peer]) -> NetState {
    let mut st = b.base(local);
    let ext = local.ext.name.clone();
    for p in peers {
        b.add(local, &ext, p, &mut st);
    }
    st
}

/// The whole desired state of a [`PerPeer`] backend for `peers` (already
/// [`crate::peer::select`]ed): the base, then every peer this backend can
/// program, the older lease keeping what two of them claim.
pub fn per_peer_desired(
    b: &dyn PerPeer,
    local: &LocalNode,
    peers: &[&Peer],
) -> (NetState, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let fit = programmable(b, local, peers.iter().copied(), &mut skipped);
    let peers = resolve(fit, |p| b.claims(p), &mut skipped);
    (with_peers(b, local, &peers), skipped)
}

/// Why a backend cannot be used.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("the {0} backend is not available in this build of weft-node")]
    Unsupported(BackendType),
    #[error("the {0} backend needs the node's key: build it with Ipsec::new or Wireguard::new")]
    NeedsKeys(BackendType),
}

/// The backend for a network config (ipsec, which needs the node's key
/// pair, is made with `Ipsec::new`).
pub fn for_config(cfg: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    match cfg {
        BackendConfig::Vxlan(v) => Ok(Box::new(Vxlan::new(v.clone()))),
        BackendConfig::HostGw => Ok(Box::new(HostGw)),
        BackendConfig::Ipsec(_) => Err(BackendError::NeedsKeys(BackendType::Ipsec)),
        BackendConfig::Wireguard(_) => Err(BackendError::NeedsKeys(BackendType::Wireguard)),
    }
}
