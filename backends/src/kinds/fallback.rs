//! Fallback routes: a blackhole for the whole cluster network at the
//! worst metric, under the routes that carry pod traffic. While those are
//! there they win; when one goes (its device deleted or set down, which
//! makes the kernel drop every route through it) pod traffic meets the
//! blackhole instead of the host's other routes, so an encrypting backend
//! never sends it in the clear, not even until the next pass repairs the
//! device.

use super::route::WEFT_ROUTE_PROTOCOL;
use super::{Kind, Table};
use crate::dataplane::Failure;
use crate::netlink::{ignore_gone, nl_err, Applying};
use crate::state::{Change, Dev, NetState};
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::RouteMessageBuilder;
use std::fmt;
use std::net::IpAddr;

/// The metric of weft's fallback routes: the worst there is, so any other
/// route to the same destination wins.
pub const FALLBACK_METRIC: u32 = u32::MAX;

/// A fallback route: destination -> ().
#[derive(Debug)]
pub struct Fallback;

impl Kind for Fallback {
    type Key = IpNet;
    type Value = ();

    fn table(st: &NetState) -> &Table<Self> {
        &st.fallback_routes
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.fallback_routes
    }
    fn dev<'a>(_: &'a IpNet, _: &'a ()) -> Option<&'a Dev> {
        None
    }
    fn set(dst: &IpNet, _: &(), _: Option<&()>, out: &mut Vec<Change>) {
        out.push(Change::Fallback(FallbackChange::Add { dst: *dst }));
    }
    fn del(dst: &IpNet, _: &()) -> Change {
        Change::Fallback(FallbackChange::Del { dst: *dst })
    }
}

/// A change to a fallback route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackChange {
    Add { dst: IpNet },
    Del { dst: IpNet },
}

impl fmt::Display for FallbackChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verb, dst) = match self {
            FallbackChange::Add { dst } => ("replace", dst),
            FallbackChange::Del { dst } => ("del", dst),
        };
        write!(
            f,
            "ip route {verb} blackhole {dst} proto {WEFT_ROUTE_PROTOCOL} metric {FALLBACK_METRIC}"
        )
    }
}

impl FallbackChange {
    pub(crate) fn fake(&self, st: &mut NetState) -> Result<(), Failure> {
        match self {
            FallbackChange::Add { dst } => {
                st.fallback_routes.insert(*dst, ());
            }
            FallbackChange::Del { dst } => {
                st.fallback_routes.remove(dst);
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        match self {
            FallbackChange::Add { dst } => k
                .handle
                .route()
                .add(message(dst)?)
                .replace()
                .execute()
                .await
                .map_err(nl_err),
            FallbackChange::Del { dst } => {
                ignore_gone(k.handle.route().del(message(dst)?).execute().await)
            }
        }
    }
}

fn message(dst: &IpNet) -> Result<RouteMessage, Failure> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map_err(|e| Failure::other(format!("route {dst}: {e}")))?
        .kind(RouteType::BlackHole)
        .protocol(RouteProtocol::Other(WEFT_ROUTE_PROTOCOL))
        .priority(FALLBACK_METRIC)
        .build())
}

/// Reads one route message into `st` if it is a fallback of weft's: main
/// table, weft's protocol, a blackhole at [`FALLBACK_METRIC`].
pub(crate) fn read(r: &RouteMessage, st: &mut NetState) {
    if r.header.table != RouteHeader::RT_TABLE_MAIN
        || r.header.protocol != RouteProtocol::Other(WEFT_ROUTE_PROTOCOL)
        || r.header.kind != RouteType::BlackHole
    {
        return;
    }
    let mut dst = None;
    let mut metric = 0;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = super::route::route_ip(d),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if metric != FALLBACK_METRIC {
        return;
    }
    if let Some(net) = dst.and_then(|d| IpNet::new(d, r.header.destination_prefix_length).ok()) {
        st.fallback_routes.insert(net, ());
    }
}
