//! weft's data plane.
//!
//! A [`Backend`] turns the local node and its peers into the [`NetState`]
//! the kernel should have (pure); [`diff`] compares it with what a
//! [`Dataplane`] observes; the dataplane applies the changes. The node's
//! reconcile loop does exactly that: from scratch on every full pass, and,
//! for a [`PerPeer`] backend, for the changed leases alone on a pass woken
//! by lease changes ([`Plan`], which ends where a full pass would).
//!
//! - [`Vxlan`], [`HostGw`], [`Ipsec`] and [`Wireguard`] are the backends;
//!   [`for_config`] builds each from the network config and a [`Context`]
//!   (the node's state directory, where [`keystore`] keeps key pairs).
//! - [`NetlinkDataplane`] is the kernel; [`FakeDataplane`] a stand-in for tests.
//! - [`kinds`]: each kind of kernel object weft owns, in a module of its own.
//! - [`peer::select`] checks leases before they are programmed.

mod backend;
pub mod dataplane;
mod diff;
mod hostgw;
pub mod ipsec;
pub mod keystore;
pub mod kinds;
mod local;
pub mod netlink;
pub mod peer;
pub mod plan;
pub mod state;
mod vxlan;
pub mod wireguard;
pub mod xfrm;

pub use backend::{
    for_config, per_peer_desired, Backend, BackendError, Built, Context, Keyed, PerPeer,
};
pub use dataplane::{ApplyError, Dataplane, DataplaneError, Errno, Failure, FakeDataplane};
pub use diff::{diff, in_scope};
pub use hostgw::HostGw;
pub use ipsec::Ipsec;
pub use kinds::address::AddressChange;
pub use kinds::fdb::FdbChange;
pub use kinds::link::{Link, LinkChange};
pub use kinds::neighbour::NeighbourChange;
pub use kinds::route::RouteChange;
pub use kinds::wireguard::{WgKey, WireguardChange};
pub use kinds::xfrm_policy::XfrmPolicyChange;
pub use kinds::xfrm_state::XfrmStateChange;
pub use local::{vtep_mac, ExternalIface, LocalNode};
pub use netlink::{Interface, NetlinkDataplane};
pub use peer::{Claim, Peer, Skipped};
pub use plan::{Delta, Plan, PlanInputs};
pub use state::{
    dev, route_metric, AeadKey, Change, Dev, NetState, RouteTarget, VxlanLink, XfrmDir,
    XfrmPolicyId, XfrmSa, XfrmSaId, XfrmTmpl, WEFT_ROUTE_PROTOCOL, WEFT_XFRM_REQID,
};
pub use vxlan::{Vxlan, VXLAN_OVERHEAD};
pub use wireguard::{Wireguard, WIREGUARD_OVERHEAD};
