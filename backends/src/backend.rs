//! The backends: pure functions from the local node and its peers to the
//! state the kernel should have.

use crate::hostgw::HostGw;
use crate::ipsec::keys::NodeKey;
use crate::ipsec::{Ipsec, RekeyCause, Timing};
use crate::keystore::{self, KeyOrigin, KeyStoreError};
use crate::local::LocalNode;
use crate::peer::{resolve, Claim, Peer, Skipped};
use crate::state::{Dev, NetState};
use crate::vxlan::Vxlan;
use crate::wireguard::Wireguard;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;
use weft_config::{BackendConfig, BackendType};
use weft_lease::BackendData;
use zeroize::Zeroizing;

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
    #[error("the {backend} backend's key: {source}")]
    Keys {
        backend: BackendType,
        source: KeyStoreError,
    },
}

/// What building a backend takes besides its config: what is the node's
/// own, not the cluster's.
#[derive(Debug)]
pub struct Context<'a> {
    /// Where the node's key pairs live (`--state-dir`; [`keystore`]).
    pub state_dir: &'a Path,
    /// ipsec: the cluster PSK (a node-local file, [`keystore::read_psk`]);
    /// `None` runs without one.
    pub ipsec_psk: Option<Zeroizing<Vec<u8>>>,
    /// ipsec: when SAs switch and old ones go.
    pub ipsec_timing: Timing,
}

impl<'a> Context<'a> {
    /// Keys in `state_dir`, no ipsec PSK, the default timing.
    pub fn new(state_dir: &'a Path) -> Self {
        Context {
            state_dir,
            ipsec_psk: None,
            ipsec_timing: Timing::default(),
        }
    }
}

/// A backend built from the config, and its key when it has one.
#[derive(Debug, Clone)]
pub struct Built {
    pub backend: Arc<dyn Backend>,
    pub keyed: Option<Keyed>,
    /// Whether the key was read from the state directory (in use before)
    /// or made now.
    pub key_origin: Option<KeyOrigin>,
}

/// The backend for a network config: the one place that builds each
/// backend. ipsec and wireguard load their key pair from
/// `ctx.state_dir`, making one on first start. (Whether the kernel can run
/// the backend is the dataplane's probe, before this.)
pub fn for_config(cfg: &BackendConfig, ctx: &Context<'_>) -> Result<Built, BackendError> {
    let load = |backend: BackendType, which| {
        keystore::load_or_create(ctx.state_dir, which)
            .map_err(|source| BackendError::Keys { backend, source })
    };
    let plain = |backend: Arc<dyn Backend>| Built {
        backend,
        keyed: None,
        key_origin: None,
    };
    Ok(match cfg {
        BackendConfig::Vxlan(v) => plain(Arc::new(Vxlan::new(v.clone()))),
        BackendConfig::HostGw => plain(Arc::new(HostGw)),
        BackendConfig::Ipsec(_) => {
            let (key, origin) = load(BackendType::Ipsec, keystore::IPSEC)?;
            let ipsec = Arc::new(Ipsec::new(key, ctx.ipsec_psk.clone(), ctx.ipsec_timing));
            if origin == KeyOrigin::Loaded {
                ipsec.key_restored();
            }
            Built {
                backend: ipsec.clone(),
                keyed: Some(Keyed::Ipsec(ipsec)),
                key_origin: Some(origin),
            }
        }
        BackendConfig::Wireguard(w) => {
            let (key, origin) = load(BackendType::Wireguard, keystore::WIREGUARD)?;
            let wg = Arc::new(Wireguard::new(w.clone(), *key.secret_bytes()));
            Built {
                backend: wg.clone(),
                keyed: Some(Keyed::Wireguard(wg, Arc::new(AtomicU64::new(key.epoch())))),
                key_origin: Some(origin),
            }
        }
    })
}

/// A backend whose key pair rotates: what the node's rotation task needs
/// of it.
#[derive(Debug, Clone)]
pub enum Keyed {
    Ipsec(Arc<Ipsec>),
    /// With its key's epoch (the backend keeps only the key).
    Wireguard(Arc<Wireguard>, Arc<AtomicU64>),
}

impl Keyed {
    /// The key's file in the state directory, and the name in logs.
    pub fn which(&self) -> keystore::Which {
        match self {
            Keyed::Ipsec(_) => keystore::IPSEC,
            Keyed::Wireguard(..) => keystore::WIREGUARD,
        }
    }

    /// The ipsec backend, if this is it.
    pub fn ipsec(&self) -> Option<&Arc<Ipsec>> {
        match self {
            Keyed::Ipsec(i) => Some(i),
            Keyed::Wireguard(..) => None,
        }
    }

    /// The current key's epoch.
    pub fn epoch(&self) -> u64 {
        match self {
            Keyed::Ipsec(i) => i.epoch(),
            Keyed::Wireguard(_, e) => e.load(Ordering::Relaxed),
        }
    }

    /// The backend as a whole.
    pub fn backend(&self) -> &dyn Backend {
        match self {
            Keyed::Ipsec(i) => &**i,
            Keyed::Wireguard(w, _) => &**w,
        }
    }

    /// The key put in place by a pass goes into the lease data (wireguard;
    /// ipsec's lease data carries a new key at once: its peers switch
    /// only after its switch delay, by when the inbound SAs are in).
    pub fn publish(&self) {
        if let Keyed::Wireguard(w, _) = self {
            w.publish();
        }
    }

    /// Makes `new` (stored already) the key the next pass puts in place.
    pub fn switch(&self, new: NodeKey) {
        match self {
            Keyed::Ipsec(i) => i.rotate(new),
            Keyed::Wireguard(w, e) => {
                w.rotate(*new.secret_bytes());
                e.store(new.epoch(), Ordering::Relaxed);
            }
        }
    }

    /// A rotation the backend asks for (ipsec's repairs); never for
    /// wireguard.
    pub async fn wanted(&self) -> RekeyCause {
        match self {
            Keyed::Ipsec(i) => i.rekey_wanted().await,
            Keyed::Wireguard(..) => std::future::pending().await,
        }
    }
}
