//! The [`Dataplane`] on the real kernel: rtnetlink, XFRM netlink, and
//! generic netlink for WireGuard.
//!
//! Observation reads only what weft owns: devices named `weft.*` of kind
//! vxlan and `weft-wg`/`weft-wg-v6` of kind wireguard, the addresses,
//! permanent neighbours and FDB entries on them, the WireGuard devices'
//! settings and peers, routes in the main table with
//! [`WEFT_ROUTE_PROTOCOL`], and XFRM SAs and policies with weft's reqid.
//! How each kind is read and changed is its module's ([`crate::kinds`]).
//! Changes of one group are sent concurrently; deleting something that is
//! already gone counts as done.

use crate::dataplane::{ApplyError, Dataplane, DataplaneError, Errno, Failure};
use crate::kinds::{
    address, fallback, fdb, link, neighbour, route, wireguard, xfrm_policy, xfrm_state,
};
use crate::peer::HostView;
use crate::state::{dev, Change, Dev, NetState, WEFT_ROUTE_PROTOCOL};
use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use weft_lease::MacAddr;

/// Requests in flight at once when applying many changes of one kind.
const CONCURRENCY: usize = 64;

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub mac: Option<MacAddr>,
    /// Addresses with prefix length.
    pub addrs: Vec<IpNet>,
}

/// The XFRM netlink socket, or why there is none.
enum Xfrm {
    Ready {
        handle: xfrmnetlink::Handle,
        connection: tokio::task::JoinHandle<()>,
    },
    Unavailable(String),
}

impl std::fmt::Debug for Xfrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Xfrm::Ready { .. } => f.write_str("Xfrm::Ready"),
            Xfrm::Unavailable(why) => write!(f, "Xfrm::Unavailable({why:?})"),
        }
    }
}

/// The generic netlink socket WireGuard is reached through, or why there
/// is none.
enum Genl {
    Ready {
        handle: genetlink::GenetlinkHandle,
        connection: tokio::task::JoinHandle<()>,
    },
    Unavailable(String),
}

impl std::fmt::Debug for Genl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Genl::Ready { .. } => f.write_str("Genl::Ready"),
            Genl::Unavailable(why) => write!(f, "Genl::Unavailable({why:?})"),
        }
    }
}

/// Opens a generic netlink socket in the current namespace (inside a
/// runtime).
fn open_genl() -> Genl {
    match genetlink::new_connection() {
        Ok((conn, handle, _)) => Genl::Ready {
            handle,
            connection: tokio::spawn(conn),
        },
        Err(e) => Genl::Unavailable(e.to_string()),
    }
}

/// Opens the XFRM socket in the current namespace (inside a runtime). A
/// kernel without xfrm_user is fine for vxlan and host-gw: the reason is
/// kept and reported when IPsec is asked for.
fn open_xfrm() -> Xfrm {
    match xfrmnetlink::new_connection() {
        Ok((conn, handle, _)) => Xfrm::Ready {
            handle,
            connection: tokio::spawn(conn),
        },
        Err(e) => Xfrm::Unavailable(e.to_string()),
    }
}

/// Dataplane on the kernel of one network namespace.
#[derive(Debug)]
pub struct NetlinkDataplane {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
    xfrm: Xfrm,
    genl: Genl,
}

impl Drop for NetlinkDataplane {
    fn drop(&mut self) {
        self.connection.abort();
        if let Xfrm::Ready { connection, .. } = &self.xfrm {
            connection.abort();
        }
        if let Genl::Ready { connection, .. } = &self.genl {
            connection.abort();
        }
    }
}

/// The (negative) errno code the kernel answered with, if it did.
fn code_of(e: &rtnetlink::Error) -> Option<std::num::NonZeroI32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code,
        _ => None,
    }
}

/// The errno the kernel answered with, if it did.
pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<Errno> {
    code_of(e).map(|c| Errno::from_raw(-c.get()))
}

pub(crate) fn nl_err(e: rtnetlink::Error) -> Failure {
    Failure::from_netlink(code_of(&e), || e.to_string())
}

/// Whether a failed delete means "it was not there".
fn already_gone(e: &rtnetlink::Error) -> bool {
    matches!(
        errno_of(e),
        Some(Errno::ENOENT | Errno::ESRCH | Errno::ENODEV | Errno::EADDRNOTAVAIL)
    )
}

impl NetlinkDataplane {
    /// Connects to the kernel in this process's network namespace. Must be
    /// called inside a tokio runtime.
    pub fn new() -> Result<Self, DataplaneError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| DataplaneError::Setup(e.to_string()))?;
        Ok(NetlinkDataplane {
            handle,
            connection: tokio::spawn(conn),
            xfrm: open_xfrm(),
            genl: open_genl(),
        })
    }

    /// Connects to the kernel in the network namespace at `path` (e.g.
    /// `/run/netns/<name>`). The socket is made on a short-lived thread that
    /// enters the namespace, so no tokio worker ever changes namespace.
    pub fn in_netns(path: &Path) -> Result<Self, DataplaneError> {
        let rt = tokio::runtime::Handle::current();
        let path = path.to_path_buf();
        let made = std::thread::spawn(move || -> Result<_, String> {
            let ns = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {}: {e}", path.display()))?;
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
            Ok((conn, handle, open_xfrm(), open_genl()))
        })
        .join()
        .map_err(|_| DataplaneError::Setup("netns thread panicked".into()))?
        .map_err(DataplaneError::Setup)?;
        Ok(NetlinkDataplane {
            handle: made.1,
            connection: tokio::spawn(made.0),
            xfrm: made.2,
            genl: made.3,
        })
    }

    fn xfrm(&self) -> Result<&xfrmnetlink::Handle, String> {
        match &self.xfrm {
            Xfrm::Ready { handle, .. } => Ok(handle),
            Xfrm::Unavailable(why) => {
                Err(format!("no XFRM netlink socket (module xfrm_user): {why}"))
            }
        }
    }

    /// Checks that this kernel can run the ipsec backend: XFRM netlink,
    /// ESP and the AEAD weft uses. The error names what is missing.
    pub async fn probe_ipsec(&self) -> Result<(), crate::xfrm::KernelSupport> {
        match &self.xfrm {
            Xfrm::Ready { handle, .. } => crate::xfrm::probe(handle).await,
            Xfrm::Unavailable(why) => Err(crate::xfrm::KernelSupport::NoXfrmUser(why.clone())),
        }
    }

    fn wireguard(&self) -> Result<&genetlink::GenetlinkHandle, String> {
        match &self.genl {
            Genl::Ready { handle, .. } => Ok(handle),
            Genl::Unavailable(why) => Err(format!("no generic netlink socket: {why}")),
        }
    }

    /// Checks that this kernel can run the wireguard backend. The error
    /// says what is missing.
    pub async fn probe_wireguard(&self) -> Result<(), wireguard::WgSupport> {
        match &self.genl {
            Genl::Ready { handle, .. } => wireguard::probe(handle).await,
            Genl::Unavailable(why) => Err(wireguard::WgSupport::Other(why.clone())),
        }
    }

    /// The rtnetlink handle, for callers that need more than the Dataplane.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Every interface with its addresses.
    pub async fn interfaces(&self) -> Result<Vec<Interface>, DataplaneError> {
        let links = self.links().await?;
        let mut by_index: HashMap<u32, Interface> = links
            .iter()
            .map(|l| {
                (
                    l.header.index,
                    Interface {
                        index: l.header.index,
                        name: link_name(l).unwrap_or_default(),
                        mtu: link_mtu(l),
                        up: l.header.flags.contains(LinkFlags::Up),
                        mac: link_mac(l),
                        addrs: Vec::new(),
                    },
                )
            })
            .collect();
        for a in self.addresses().await? {
            if let (Some(i), Some(ip)) =
                (by_index.get_mut(&a.header.index), address::address_ip(&a))
            {
                if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                    i.addrs.push(net);
                }
            }
        }
        let mut out: Vec<Interface> = by_index.into_values().collect();
        out.sort_by_key(|i| i.index);
        Ok(out)
    }

    /// The interface of the IPv4 default route, if there is one.
    pub async fn default_route_interface(&self) -> Result<Option<u32>, DataplaneError> {
        let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(|e| observe_err("routes", e))?;
        Ok(routes
            .iter()
            .filter(|r| {
                r.header.table == RouteHeader::RT_TABLE_MAIN
                    && r.header.destination_prefix_length == 0
            })
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, DataplaneError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| observe_err("links", e))
    }

    async fn addresses(&self) -> Result<Vec<AddressMessage>, DataplaneError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| observe_err("addresses", e))
    }

    /// Calls `f` with each neighbour of `family` as it arrives: with many
    /// peers, holding the whole dump would cost megabytes.
    async fn each_neighbour(
        &self,
        family: AddressFamily,
        mut f: impl FnMut(&NeighbourMessage),
    ) -> Result<(), DataplaneError> {
        let stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        futures::pin_mut!(stream);
        while let Some(n) = stream
            .try_next()
            .await
            .map_err(|e| observe_err("neighbours", e))?
        {
            f(&n);
        }
        Ok(())
    }

    /// Calls `f` with each route (IPv4, then IPv6) as it arrives.
    async fn each_route(&self, mut f: impl FnMut(&RouteMessage)) -> Result<(), DataplaneError> {
        for req in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let stream = self.handle.route().get(req).execute();
            futures::pin_mut!(stream);
            while let Some(r) = stream
                .try_next()
                .await
                .map_err(|e| observe_err("routes", e))?
            {
                f(&r);
            }
        }
        Ok(())
    }

    async fn devices(&self) -> Result<Devices, String> {
        let links = self.links().await.map_err(|e| e.to_string())?;
        Ok(Devices {
            idx: links
                .iter()
                .filter_map(|l| Some((link_name(l)?, l.header.index)))
                .collect(),
            foreign: link::foreign(&links),
        })
    }

    async fn apply_one(&self, c: &Change, devs: &Devices) -> Result<(), Failure> {
        let k = Applying {
            handle: &self.handle,
            idx: &devs.idx,
            foreign: &devs.foreign,
            xfrm: self.xfrm(),
            wireguard: self.wireguard(),
        };
        match c {
            Change::Link(c) => c.apply(&k).await,
            Change::Address(c) => c.apply(&k).await,
            Change::Neighbour(c) => c.apply(&k).await,
            Change::Fdb(c) => c.apply(&k).await,
            Change::Route(c) => c.apply(&k).await,
            Change::Fallback(c) => c.apply(&k).await,
            Change::XfrmState(c) => c.apply(&k).await,
            Change::XfrmPolicy(c) => c.apply(&k).await,
            Change::Wireguard(c) => c.apply(&k).await,
        }
    }
}

/// The host's devices, as of the start of a group of changes.
struct Devices {
    /// Every device's index by name.
    idx: HashMap<String, u32>,
    /// Devices with a weft name that weft did not make: what each is.
    foreign: HashMap<String, String>,
}

/// What a kind needs to apply a change to the kernel.
pub(crate) struct Applying<'a> {
    pub handle: &'a Handle,
    /// Every device's index by name, as of the start of the change's group.
    pub idx: &'a HashMap<String, u32>,
    foreign: &'a HashMap<String, String>,
    xfrm: Result<&'a xfrmnetlink::Handle, String>,
    wireguard: Result<&'a genetlink::GenetlinkHandle, String>,
}

impl Applying<'_> {
    /// The index of device `dev` to put something on, or ENODEV; never a
    /// device with a weft name that weft did not make.
    pub fn index(&self, dev: &str) -> Result<u32, Failure> {
        if let Some(what) = self.foreign.get(dev) {
            return Err(Failure::with(
                Errno::ENODEV,
                format!("device {dev} is a {what} device weft did not make; nothing goes onto it"),
            ));
        }
        self.idx
            .get(dev)
            .copied()
            .ok_or_else(|| Failure::with(Errno::ENODEV, format!("device {dev} does not exist")))
    }

    /// The generic netlink socket for WireGuard, or why there is none.
    pub fn wireguard(&self) -> Result<&genetlink::GenetlinkHandle, Failure> {
        self.wireguard.clone().map_err(Failure::other)
    }

    /// The XFRM socket, or why there is none.
    pub fn xfrm(&self) -> Result<&xfrmnetlink::Handle, Failure> {
        self.xfrm.clone().map_err(Failure::other)
    }
}

/// A delete's result: gone already counts as done.
pub(crate) fn ignore_gone(r: Result<(), rtnetlink::Error>) -> Result<(), Failure> {
    match r {
        Err(e) if !already_gone(&e) => Err(nl_err(e)),
        _ => Ok(()),
    }
}

fn observe_err(what: &'static str, e: rtnetlink::Error) -> DataplaneError {
    DataplaneError::Observe {
        what,
        reason: nl_err(e).to_string(),
    }
}

pub(crate) fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub(crate) fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

pub(crate) fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

pub(crate) fn link_mtu(l: &LinkMessage) -> u32 {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

pub(crate) fn link_mac(l: &LinkMessage) -> Option<MacAddr> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => mac_of(b),
        _ => None,
    })
}

/// A MAC address from the kernel's bytes.
pub(crate) fn mac_of(b: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(b).ok().map(MacAddr)
}

/// Which group a change is applied in: changes in one group do not depend
/// on each other and go out concurrently; groups go in order.
fn group(c: &Change) -> u8 {
    use address::AddressChange as A;
    use fdb::FdbChange as F;
    use neighbour::NeighbourChange as N;
    use route::RouteChange as R;
    use wireguard::WireguardChange as W;
    use xfrm_policy::XfrmPolicyChange as P;
    use xfrm_state::XfrmStateChange as S;
    match c {
        Change::Link(_) => 0,
        Change::Address(A::Add { .. }) => 1,
        Change::Neighbour(N::Set { .. }) => 2,
        Change::Fdb(F::Set { .. }) => 3,
        Change::Route(R::Set { .. }) => 4,
        Change::Route(R::Del { .. } | R::DelStray { .. }) => 5,
        Change::Fdb(F::Del { .. }) => 6,
        Change::Neighbour(N::Del { .. }) => 7,
        Change::Address(A::Del { .. }) => 8,
        Change::XfrmState(S::Add { .. }) => 9,
        Change::XfrmPolicy(P::Set { .. } | P::AddBlock { .. }) => 10,
        Change::XfrmPolicy(P::Del { .. } | P::DelBlock { .. }) => 11,
        Change::XfrmState(S::Del { .. }) => 12,
        Change::Wireguard(W::SetDevice { .. } | W::SetPeer { .. }) => 13,
        Change::Wireguard(W::DelPeer { .. }) => 14,
        Change::Fallback(_) => 15,
    }
}

#[async_trait]
impl Dataplane for NetlinkDataplane {
    async fn observe(&self) -> Result<NetState, DataplaneError> {
        let links = self.links().await?;
        let names: HashMap<u32, Dev> = links
            .iter()
            .filter_map(|l| Some((l.header.index, dev(&link_name(l)?))))
            .collect();
        let mut st = NetState::default();
        let owned = link::read(&links, &names, &mut st);
        if !owned.is_empty() {
            address::read(&self.addresses().await?, &owned, &mut st);
            for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
                self.each_neighbour(fam, |n| neighbour::read(n, &owned, &mut st))
                    .await?;
            }
            self.each_neighbour(AddressFamily::Bridge, |n| fdb::read(n, &owned, &mut st))
                .await?;
            let wg: Vec<Dev> = st
                .links
                .iter()
                .filter(|(_, l)| matches!(l, link::Link::Wireguard(_)))
                .map(|(n, _)| n.clone())
                .collect();
            for name in wg {
                let h = self.wireguard().map_err(|reason| DataplaneError::Observe {
                    what: "WireGuard devices",
                    reason,
                })?;
                wireguard::read(h, &name, &mut st)
                    .await
                    .map_err(|f| DataplaneError::Observe {
                        what: "WireGuard devices",
                        reason: f.to_string(),
                    })?;
            }
        }
        // Without an XFRM socket there is nothing of weft's there to see.
        if let Ok(h) = self.xfrm() {
            let failed = |what| move |reason| DataplaneError::Observe { what, reason };
            xfrm_state::read(h, &mut st)
                .await
                .map_err(failed("XFRM states"))?;
            xfrm_policy::read(h, &mut st)
                .await
                .map_err(failed("XFRM policies"))?;
        }
        self.each_route(|r| {
            route::read(r, &names, &mut st);
            fallback::read(r, &mut st);
        })
        .await?;
        Ok(st)
    }

    async fn host_view(&self) -> Result<HostView, DataplaneError> {
        let links = self.links().await?;
        // weft's own devices (weft.<VNI>, weft0, weft-wg...) are not the
        // host's: what is on them is the cluster's.
        let weft: std::collections::HashSet<u32> = links
            .iter()
            .filter(|l| link_name(l).is_some_and(|n| n.starts_with("weft")))
            .map(|l| l.header.index)
            .collect();
        let mut view = HostView::default();
        for a in self.addresses().await? {
            if weft.contains(&a.header.index) {
                continue;
            }
            if let Some(ip) = address::address_ip(&a) {
                if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                    view.networks.push(net.trunc());
                }
            }
        }
        self.each_route(|r| {
            if r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.protocol == RouteProtocol::Other(WEFT_ROUTE_PROTOCOL)
                || r.header.destination_prefix_length == 0
            {
                return;
            }
            let mut dst = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route::route_ip(d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if oif.is_some_and(|i| weft.contains(&i)) {
                return;
            }
            let Some(net) =
                dst.and_then(|d| IpNet::new(d, r.header.destination_prefix_length).ok())
            else {
                return;
            };
            if r.header.scope == RouteScope::Link {
                view.networks.push(net.trunc());
            }
            view.foreign_routes.insert(net.trunc());
        })
        .await?;
        view.networks.sort();
        view.networks.dedup();
        Ok(view)
    }

    async fn apply(&self, changes: &[Change]) -> Vec<ApplyError> {
        let mut errors = Vec::new();
        let mut devs = match self.devices().await {
            Ok(i) => i,
            Err(e) => {
                return changes
                    .iter()
                    .map(|c| ApplyError {
                        change: c.clone(),
                        failure: Failure::other(format!("listing links: {e}")),
                    })
                    .collect()
            }
        };
        let mut start = 0;
        while start < changes.len() {
            let g = group(&changes[start]);
            let end = changes[start..]
                .iter()
                .position(|c| group(c) != g)
                .map_or(changes.len(), |p| start + p);
            let run = &changes[start..end];
            if g == 0 {
                // Links one at a time; indexes change with them.
                for c in run {
                    if let Err(failure) = self.apply_one(c, &devs).await {
                        errors.push(ApplyError {
                            change: c.clone(),
                            failure,
                        });
                    }
                    if let Ok(fresh) = self.devices().await {
                        devs = fresh;
                    }
                }
            } else {
                let devs = &devs;
                let pending: Vec<_> = run
                    .iter()
                    .enumerate()
                    .map(|(i, c)| async move { (i, self.apply_one(c, devs).await) })
                    .collect();
                let results: Vec<(usize, Result<(), Failure>)> = stream::iter(pending)
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
                let mut failed: Vec<(usize, Failure)> = results
                    .into_iter()
                    .filter_map(|(i, r)| r.err().map(|e| (i, e)))
                    .collect();
                failed.sort_by_key(|(i, _)| *i);
                errors.extend(failed.into_iter().map(|(i, failure)| ApplyError {
                    change: run[i].clone(),
                    failure,
                }));
            }
            start = end;
        }
        errors
    }
}
