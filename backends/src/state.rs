//! The network state weft owns, as plain data: what a backend wants and what
//! the kernel has are both a [`NetState`], so reconciling is a diff. Each
//! kind of object is a module of [`crate::kinds`]; this is where they meet.

use crate::kinds::address::{Address, AddressChange};
use crate::kinds::fallback::{Fallback, FallbackChange};
use crate::kinds::fdb::{Fdb, FdbChange};
use crate::kinds::link::{Link, LinkChange};
use crate::kinds::neighbour::{Neighbour, NeighbourChange};
use crate::kinds::route::{Route, RouteChange, StrayRoute};
use crate::kinds::wireguard::{WireguardChange, WireguardDeviceKind, WireguardPeerKind};
use crate::kinds::xfrm_policy::{XfrmBlock, XfrmPolicy, XfrmPolicyChange};
use crate::kinds::xfrm_state::{XfrmState, XfrmStateChange};
use crate::kinds::{pick, swap, Kind, Table};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

pub use crate::kinds::route::{route_metric, RouteTarget, WEFT_ROUTE_PROTOCOL};
pub use crate::kinds::vxlan::{vxlan_name, VxlanLink, VXLAN_PREFIX};
pub use crate::kinds::xfrm_policy::{XfrmDir, XfrmPolicyId, XfrmTmpl, WEFT_BLOCK_PRIORITY};
pub use crate::kinds::xfrm_state::{
    AeadKey, XfrmSa, XfrmSaId, WEFT_XFRM_REQID, XFRM_AEAD, XFRM_ICV_BITS,
};

/// A device name. Shared, because thousands of objects name the same
/// device and cloning the name must not allocate.
pub type Dev = Arc<str>;

/// A device name from text.
pub fn dev(name: &str) -> Dev {
    Arc::from(name)
}

/// Everything weft owns on a host: its devices, and one table per kind of
/// object ([`crate::kinds`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    /// weft's devices by name.
    pub links: BTreeMap<Dev, Link>,
    /// Addresses on weft's devices: (device, address).
    pub addresses: Table<Address>,
    /// Permanent neighbours on weft's devices: (device, IP) -> MAC.
    pub neighbours: Table<Neighbour>,
    /// FDB entries on weft's VXLAN devices: (device, MAC) -> remote VTEP.
    pub fdb: Table<Fdb>,
    /// Routes with weft's protocol and [`route_metric`], by destination.
    pub routes: Table<Route>,
    /// Routes with weft's protocol and another metric, by destination
    /// and metric: left by a weft that set no metric, or a second route to
    /// a destination. Never desired; every pass deletes them.
    pub stray_routes: Table<StrayRoute>,
    /// Blackhole routes for the cluster network at the worst metric: pod
    /// traffic that loses its route into an encrypting device is dropped.
    pub fallback_routes: Table<Fallback>,
    /// ESP SAs with weft's reqid.
    pub xfrm_states: Table<XfrmState>,
    /// XFRM policies whose template has weft's reqid.
    pub xfrm_policies: Table<XfrmPolicy>,
    /// XFRM policies that drop (action block, priority
    /// [`WEFT_BLOCK_PRIORITY`], which marks them weft's): below the
    /// per-peer policies, they catch pod traffic to the cluster network that
    /// no peer's policy encrypts, so it is never sent in the clear.
    pub xfrm_blocks: Table<XfrmBlock>,
    /// WireGuard devices' own settings (private key, port), by device.
    pub wg_devices: Table<WireguardDeviceKind>,
    /// WireGuard peers: (device, public key) -> endpoint, allowed IPs...
    pub wg_peers: Table<WireguardPeerKind>,
}

impl NetState {
    /// Number of kernel objects (devices and every table's).
    pub fn object_count(&self) -> usize {
        self.links.len()
            + self.addresses.len()
            + self.neighbours.len()
            + self.fdb.len()
            + self.routes.len()
            + self.stray_routes.len()
            + self.fallback_routes.len()
            + self.xfrm_states.len()
            + self.xfrm_policies.len()
            + self.xfrm_blocks.len()
            + self.wg_devices.len()
            + self.wg_peers.len()
    }

    /// Self's devices, and its objects with a key that `a` or `b` has.
    pub fn restricted_to(&self, a: &NetState, b: &NetState) -> NetState {
        NetState {
            links: self.links.clone(),
            addresses: pick::<Address>(self, a, b),
            neighbours: pick::<Neighbour>(self, a, b),
            fdb: pick::<Fdb>(self, a, b),
            routes: pick::<Route>(self, a, b),
            stray_routes: pick::<StrayRoute>(self, a, b),
            fallback_routes: pick::<Fallback>(self, a, b),
            xfrm_states: pick::<XfrmState>(self, a, b),
            xfrm_policies: pick::<XfrmPolicy>(self, a, b),
            xfrm_blocks: pick::<XfrmBlock>(self, a, b),
            wg_devices: pick::<WireguardDeviceKind>(self, a, b),
            wg_peers: pick::<WireguardPeerKind>(self, a, b),
        }
    }

    /// Takes out the objects with a key that `gone` has, then puts in
    /// `want`'s (devices are left alone).
    pub fn patch(&mut self, gone: &NetState, want: &NetState) {
        swap::<Address>(self, gone, want);
        swap::<Neighbour>(self, gone, want);
        swap::<Fdb>(self, gone, want);
        swap::<Route>(self, gone, want);
        swap::<StrayRoute>(self, gone, want);
        swap::<Fallback>(self, gone, want);
        swap::<XfrmState>(self, gone, want);
        swap::<XfrmPolicy>(self, gone, want);
        swap::<XfrmBlock>(self, gone, want);
        swap::<WireguardDeviceKind>(self, gone, want);
        swap::<WireguardPeerKind>(self, gone, want);
    }

    /// Removes every object that lives on device `name` (as the kernel
    /// does when the device goes).
    pub(crate) fn drop_objects_on(&mut self, name: &Dev) {
        fn off<K: Kind>(st: &mut NetState, name: &Dev) {
            K::table_mut(st).retain(|k, v| K::dev(k, v) != Some(name));
        }
        off::<Address>(self, name);
        off::<Neighbour>(self, name);
        off::<Fdb>(self, name);
        off::<Route>(self, name);
        off::<StrayRoute>(self, name);
        off::<WireguardDeviceKind>(self, name);
        off::<WireguardPeerKind>(self, name);
    }
}

/// One change to the kernel's state: one kind's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Link(LinkChange),
    Address(AddressChange),
    Neighbour(NeighbourChange),
    Fdb(FdbChange),
    Route(RouteChange),
    Fallback(FallbackChange),
    XfrmState(XfrmStateChange),
    XfrmPolicy(XfrmPolicyChange),
    Wireguard(WireguardChange),
}

impl fmt::Display for Change {
    /// The change as the equivalent iproute2 command, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Link(c) => c.fmt(f),
            Change::Address(c) => c.fmt(f),
            Change::Neighbour(c) => c.fmt(f),
            Change::Fdb(c) => c.fmt(f),
            Change::Route(c) => c.fmt(f),
            Change::Fallback(c) => c.fmt(f),
            Change::XfrmState(c) => c.fmt(f),
            Change::XfrmPolicy(c) => c.fmt(f),
            Change::Wireguard(c) => c.fmt(f),
        }
    }
}
