//! Desired against observed: the changes that make the kernel match.

use crate::kinds;
use crate::kinds::address::Address;
use crate::kinds::fallback::Fallback;
use crate::kinds::fdb::Fdb;
use crate::kinds::link;
use crate::kinds::neighbour::Neighbour;
use crate::kinds::route::{Route, StrayRoute};
use crate::kinds::wireguard::{WireguardDeviceKind, WireguardPeerKind};
use crate::kinds::xfrm_policy::{XfrmBlock, XfrmPolicy};
use crate::kinds::xfrm_state::XfrmState;
use crate::state::{Change, Dev, NetState};
use ipnet::IpNet;
use weft_config::NetworkConfig;

/// Leaves in `have` only the routes weft may delete: those with its
/// protocol (all that observing reports) whose destination lies inside the
/// cluster network, or that use one of weft's own devices. A proto-87
/// route elsewhere (made by hand, or by another tool that picked the
/// number) is not weft's to remove, so the diff never sees it.
pub fn in_scope(have: &mut NetState, network: &NetworkConfig) {
    let weft_may_delete = |dst: &IpNet, target: &crate::state::RouteTarget| {
        let inside = match dst {
            IpNet::V4(d) => network
                .ipv4
                .as_ref()
                .is_some_and(|p| p.network().contains(d)),
            IpNet::V6(d) => network
                .ipv6
                .as_ref()
                .is_some_and(|p| p.network().contains(d)),
        };
        inside || target.dev.starts_with("weft")
    };
    have.routes
        .retain(|dst, target| weft_may_delete(dst, target));
    have.stray_routes
        .retain(|(dst, _), target| weft_may_delete(dst, target));
}

/// The changes that turn `observed` into `desired`, in an order that works:
/// devices first; then additions as flannel orders them (address,
/// neighbour, FDB, WireGuard settings and peers, XFRM SA, XFRM policy,
/// route); deletions in reverse; unwanted devices last. A device whose identity (VNI, port, local
/// address) changed is made again, and everything on it is added again.
pub fn diff(desired: &NetState, observed: &NetState) -> Vec<Change> {
    let mut out = Vec::new();
    let made = link::add(desired, observed, &mut out);
    // Objects on a device made again are gone with the old one.
    let gone = |dev: &Dev| made.contains(dev);
    // The blackhole under everything first: traffic is dropped, not sent
    // elsewhere, until the routes above it are in.
    kinds::add::<Fallback>(desired, observed, &gone, &mut out);
    kinds::add::<Address>(desired, observed, &gone, &mut out);
    kinds::add::<Neighbour>(desired, observed, &gone, &mut out);
    kinds::add::<Fdb>(desired, observed, &gone, &mut out);
    // A WireGuard device's key and port, then its peers, before the route
    // into it.
    kinds::add::<WireguardDeviceKind>(desired, observed, &gone, &mut out);
    kinds::add::<WireguardPeerKind>(desired, observed, &gone, &mut out);
    // SAs before the policies that use them, policies before the routes
    // that send traffic into them: a packet never meets a policy without
    // its SA (it would be dropped) or a route without its policy (it
    // would leave unencrypted).
    kinds::add::<XfrmState>(desired, observed, &gone, &mut out);
    kinds::add::<XfrmPolicy>(desired, observed, &gone, &mut out);
    kinds::add::<XfrmBlock>(desired, observed, &gone, &mut out);
    kinds::add::<Route>(desired, observed, &gone, &mut out);

    // What is on a device that goes (now, or was made again) goes with it.
    let leaving = |dev: &Dev| {
        made.contains(dev) || (!desired.links.contains_key(dev) && observed.links.contains_key(dev))
    };
    kinds::remove::<Route>(desired, observed, &leaving, &mut out);
    kinds::remove::<StrayRoute>(desired, observed, &leaving, &mut out);
    kinds::remove::<Fallback>(desired, observed, &leaving, &mut out);
    // Routes are gone by now; then policies, then their SAs.
    kinds::remove::<XfrmPolicy>(desired, observed, &leaving, &mut out);
    kinds::remove::<XfrmBlock>(desired, observed, &leaving, &mut out);
    kinds::remove::<XfrmState>(desired, observed, &leaving, &mut out);
    kinds::remove::<WireguardPeerKind>(desired, observed, &leaving, &mut out);
    kinds::remove::<WireguardDeviceKind>(desired, observed, &leaving, &mut out);
    kinds::remove::<Fdb>(desired, observed, &leaving, &mut out);
    kinds::remove::<Neighbour>(desired, observed, &leaving, &mut out);
    kinds::remove::<Address>(desired, observed, &leaving, &mut out);
    link::remove(desired, observed, &mut out);
    out
}
