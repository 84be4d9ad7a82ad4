//! The [`Dataplane`] on the real kernel, through rtnetlink.
//!
//! Observation reads only what weft owns: links named `weft.*` of kind
//! vxlan and the addresses, permanent neighbours and FDB entries on them,
//! routes in the main table with [`WEFT_ROUTE_PROTOCOL`], and XFRM SAs and
//! policies with weft's reqid (`crate::xfrm`). Changes of one
//! kind are sent concurrently over one netlink socket; deleting something
//! that is already gone counts as done.

use crate::dataplane::{ApplyError, Dataplane, DataplaneError, Errno, Failure};
use crate::peer::HostView;
use crate::state::{
    dev, route_metric, Change, Dev, NetState, RouteTarget, VxlanLink, VXLAN_PREFIX,
    WEFT_ROUTE_PROTOCOL,
};
use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
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
}

impl Drop for NetlinkDataplane {
    fn drop(&mut self) {
        self.connection.abort();
        if let Xfrm::Ready { connection, .. } = &self.xfrm {
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
fn errno_of(e: &rtnetlink::Error) -> Option<Errno> {
    code_of(e).map(|c| Errno::from_raw(-c.get()))
}

fn nl_err(e: rtnetlink::Error) -> Failure {
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
            Ok((conn, handle, open_xfrm()))
        })
        .join()
        .map_err(|_| DataplaneError::Setup("netns thread panicked".into()))?
        .map_err(DataplaneError::Setup)?;
        Ok(NetlinkDataplane {
            handle: made.1,
            connection: tokio::spawn(made.0),
            xfrm: made.2,
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
            if let (Some(i), Some(ip)) = (by_index.get_mut(&a.header.index), address_ip(&a)) {
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

    async fn indexes(&self) -> Result<HashMap<String, u32>, String> {
        let links = self.links().await.map_err(|e| e.to_string())?;
        Ok(links
            .iter()
            .filter_map(|l| Some((link_name(l)?, l.header.index)))
            .collect())
    }

    async fn apply_one(&self, c: &Change, idx: &HashMap<String, u32>) -> Result<(), Failure> {
        let index = |dev: &str| {
            idx.get(dev)
                .copied()
                .ok_or_else(|| Failure::with(Errno::ENODEV, format!("device {dev} does not exist")))
        };
        let h = &self.handle;
        match c {
            Change::CreateLink { name, link } => {
                let mut b = LinkVxlan::new(name, link.vni)
                    .port(link.port)
                    .learning(link.learning)
                    .mtu(link.mtu)
                    .address(link.mac.0.to_vec());
                b = match link.local {
                    IpAddr::V4(a) => b.local(a),
                    IpAddr::V6(a) => b.local6(a),
                };
                if let Some(u) = &link.underlay {
                    b = b.dev(index(u)?);
                }
                if link.up {
                    b = b.up();
                }
                h.link().add(b.build()).execute().await.map_err(nl_err)
            }
            Change::DeleteLink { name } => match idx.get(&**name) {
                None => Ok(()),
                Some(i) => ignore_gone(h.link().del(*i).execute().await),
            },
            Change::UpdateLink { name, mtu, up } => {
                let b = LinkUnspec::new_with_index(index(name)?).mtu(*mtu);
                let b = if *up { b.up() } else { b.down() };
                h.link().set(b.build()).execute().await.map_err(nl_err)
            }
            Change::AddAddress { dev, addr } => h
                .address()
                .add(index(dev)?, addr.addr(), addr.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(nl_err),
            Change::DelAddress { dev, addr } => {
                let Ok(i) = index(dev) else { return Ok(()) };
                let mut m = AddressMessage::default();
                m.header.family = family_of(addr.addr());
                m.header.prefix_len = addr.prefix_len();
                m.header.index = i;
                m.attributes.push(AddressAttribute::Local(addr.addr()));
                m.attributes.push(AddressAttribute::Address(addr.addr()));
                ignore_gone(h.address().del(m).execute().await)
            }
            Change::SetNeighbour { dev, ip, mac } => h
                .neighbours()
                .add(index(dev)?, *ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl_err),
            Change::DelNeighbour { dev, ip } => {
                let Ok(i) = index(dev) else { return Ok(()) };
                let mut m = NeighbourMessage::default();
                m.header.family = family_of(*ip);
                m.header.ifindex = i;
                m.attributes
                    .push(NeighbourAttribute::Destination(neigh_addr(*ip)));
                ignore_gone(h.neighbours().del(m).execute().await)
            }
            Change::SetFdb { dev, mac, dst } => h
                .neighbours()
                .add_bridge(index(dev)?, &mac.0)
                .destination(*dst)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl_err),
            Change::DelFdb { dev, mac, dst } => {
                let Ok(i) = index(dev) else { return Ok(()) };
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = i;
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(neigh_addr(*dst)));
                ignore_gone(h.neighbours().del(m).execute().await)
            }
            Change::SetRoute {
                dst,
                target,
                replace,
            } => {
                let msg = route_message(dst, target, index(&target.dev)?, route_metric(dst))
                    .map_err(Failure::other)?;
                let req = h.route().add(msg);
                let req = if *replace { req.replace() } else { req };
                req.execute().await.map_err(|e| match errno_of(&e) {
                    Some(Errno::EEXIST) => Failure::with(
                        Errno::EEXIST,
                        format!("a route to {dst} that weft does not own exists; it is left alone"),
                    ),
                    _ => nl_err(e),
                })
            }
            Change::DelRoute { dst, target } => {
                let i = idx.get(&*target.dev).copied().unwrap_or(0);
                let msg =
                    route_message(dst, target, i, route_metric(dst)).map_err(Failure::other)?;
                ignore_gone(h.route().del(msg).execute().await)
            }
            Change::DelStrayRoute {
                dst,
                metric,
                target,
            } => {
                let i = idx.get(&*target.dev).copied().unwrap_or(0);
                let msg = route_message(dst, target, i, *metric).map_err(Failure::other)?;
                ignore_gone(h.route().del(msg).execute().await)
            }
            Change::AddXfrmState { .. }
            | Change::DelXfrmState { .. }
            | Change::SetXfrmPolicy { .. }
            | Change::DelXfrmPolicy { .. }
            | Change::AddXfrmBlock { .. }
            | Change::DelXfrmBlock { .. } => {
                crate::xfrm::apply(self.xfrm().map_err(Failure::other)?, c).await
            }
        }
    }
}

fn ignore_gone(r: Result<(), rtnetlink::Error>) -> Result<(), Failure> {
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

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// The options every weft route carries, whatever its family.
fn finish_route<T>(
    b: RouteMessageBuilder<T>,
    target: &RouteTarget,
    oif: u32,
    metric: u32,
) -> RouteMessage {
    let mut b = b
        .protocol(RouteProtocol::Other(WEFT_ROUTE_PROTOCOL))
        .priority(metric);
    if oif != 0 {
        b = b.output_interface(oif);
    }
    if target.onlink {
        b = b.onlink();
    }
    b.build()
}

fn route_message(
    dst: &IpNet,
    target: &RouteTarget,
    oif: u32,
    metric: u32,
) -> Result<RouteMessage, String> {
    Ok(match (dst, target.via) {
        (IpNet::V4(d), IpAddr::V4(via)) => finish_route(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(via),
            target,
            oif,
            metric,
        ),
        (IpNet::V6(d), IpAddr::V6(via)) => finish_route(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(via),
            target,
            oif,
            metric,
        ),
        _ => {
            return Err(format!(
                "route {dst} via {}: mixed address families",
                target.via
            ))
        }
    })
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_mtu(l: &LinkMessage) -> u32 {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

fn link_mac(l: &LinkMessage) -> Option<MacAddr> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => {
            Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
        }
        _ => None,
    })
}

/// The VXLAN settings of a link, if it is a VXLAN device.
fn vxlan_of(l: &LinkMessage, names: &HashMap<u32, Dev>) -> Option<VxlanLink> {
    let infos = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })?;
    let mut link = VxlanLink {
        vni: 0,
        port: 0,
        local: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        mac: link_mac(l)?,
        underlay: None,
        learning: true,
        mtu: link_mtu(l),
        up: l.header.flags.contains(LinkFlags::Up),
    };
    for d in data {
        match d {
            InfoVxlan::Id(v) => link.vni = *v,
            InfoVxlan::Port(p) => link.port = *p,
            InfoVxlan::Local(a) => link.local = IpAddr::V4(*a),
            InfoVxlan::Local6(a) => link.local = IpAddr::V6(*a),
            InfoVxlan::Learning(b) => link.learning = *b,
            InfoVxlan::Link(i) => link.underlay = names.get(i).cloned(),
            _ => {}
        }
    }
    Some(link)
}

fn address_ip(a: &AddressMessage) -> Option<IpAddr> {
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn neigh_ip(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(IpAddr::V4(*v)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => Some(IpAddr::V6(*v)),
        // FDB entries (AF_BRIDGE) carry the remote VTEP as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            _ => None,
        },
        _ => None,
    })
}

fn neigh_mac(n: &NeighbourMessage) -> Option<MacAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
            Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
        }
        _ => None,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

/// Which group a change is applied in: changes in one group do not depend
/// on each other and go out concurrently; groups go in order.
fn group(c: &Change) -> u8 {
    match c {
        Change::CreateLink { .. } | Change::DeleteLink { .. } | Change::UpdateLink { .. } => 0,
        Change::AddAddress { .. } => 1,
        Change::SetNeighbour { .. } => 2,
        Change::SetFdb { .. } => 3,
        Change::SetRoute { .. } => 4,
        Change::DelRoute { .. } | Change::DelStrayRoute { .. } => 5,
        Change::DelFdb { .. } => 6,
        Change::DelNeighbour { .. } => 7,
        Change::DelAddress { .. } => 8,
        Change::AddXfrmState { .. } => 9,
        Change::SetXfrmPolicy { .. } | Change::AddXfrmBlock { .. } => 10,
        Change::DelXfrmPolicy { .. } | Change::DelXfrmBlock { .. } => 11,
        Change::DelXfrmState { .. } => 12,
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
        let mut owned: HashMap<u32, Dev> = HashMap::new();
        for l in &links {
            let Some(name) = link_name(l) else { continue };
            if !name.starts_with(VXLAN_PREFIX) {
                continue;
            }
            if let Some(v) = vxlan_of(l, &names) {
                let name = dev(&name);
                owned.insert(l.header.index, name.clone());
                st.links.insert(name, v);
            }
        }
        if !owned.is_empty() {
            for a in self.addresses().await? {
                if let (Some(dev), Some(ip)) = (owned.get(&a.header.index), address_ip(&a)) {
                    // The kernel adds an IPv6 link-local address itself.
                    if matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
                        continue;
                    }
                    if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                        st.addresses.insert((dev.clone(), net), ());
                    }
                }
            }
            for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
                self.each_neighbour(fam, |n| {
                    let Some(dev) = owned.get(&n.header.ifindex) else {
                        return;
                    };
                    if n.header.state != NeighbourState::Permanent {
                        return;
                    }
                    if let (Some(ip), Some(mac)) = (neigh_ip(n), neigh_mac(n)) {
                        st.neighbours.insert((dev.clone(), ip), mac);
                    }
                })
                .await?;
            }
            self.each_neighbour(AddressFamily::Bridge, |n| {
                let Some(dev) = owned.get(&n.header.ifindex) else {
                    return;
                };
                if let (Some(ip), Some(mac)) = (neigh_ip(n), neigh_mac(n)) {
                    st.fdb.insert((dev.clone(), mac), ip);
                }
            })
            .await?;
        }
        // Without an XFRM socket there is nothing of weft's there to see.
        if let Ok(h) = self.xfrm() {
            let failed = |what| move |reason| DataplaneError::Observe { what, reason };
            st.xfrm_states.extend(
                crate::xfrm::states(h)
                    .await
                    .map_err(failed("XFRM states"))?,
            );
            let (policies, blocks) = crate::xfrm::policies(h)
                .await
                .map_err(failed("XFRM policies"))?;
            st.xfrm_policies.extend(policies);
            st.xfrm_blocks.extend(blocks);
        }
        self.each_route(|r| {
            if r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.protocol != RouteProtocol::Other(WEFT_ROUTE_PROTOCOL)
            {
                return;
            }
            let mut dst = None;
            let mut via = None;
            let mut dev = None;
            // The kernel leaves out a metric of 0.
            let mut metric = 0;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Gateway(g) => via = route_ip(g),
                    RouteAttribute::Oif(i) => dev = names.get(i).cloned(),
                    RouteAttribute::Priority(p) => metric = *p,
                    _ => {}
                }
            }
            if let (Some(dst), Some(via), Some(dev)) = (dst, via, dev) {
                if let Ok(net) = IpNet::new(dst, r.header.destination_prefix_length) {
                    let target = RouteTarget {
                        via,
                        dev,
                        onlink: r.header.flags.contains(RouteFlags::Onlink),
                    };
                    if metric == route_metric(&net) {
                        st.routes.insert(net, target);
                    } else {
                        st.stray_routes.insert((net, metric), target);
                    }
                }
            }
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
            if let Some(ip) = address_ip(&a) {
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
                    RouteAttribute::Destination(d) => dst = route_ip(d),
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
        let mut idx = match self.indexes().await {
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
                    if let Err(failure) = self.apply_one(c, &idx).await {
                        errors.push(ApplyError {
                            change: c.clone(),
                            failure,
                        });
                    }
                    if let Ok(fresh) = self.indexes().await {
                        idx = fresh;
                    }
                }
            } else {
                let idx = &idx;
                let pending: Vec<_> = run
                    .iter()
                    .enumerate()
                    .map(|(i, c)| async move { (i, self.apply_one(c, idx).await) })
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
