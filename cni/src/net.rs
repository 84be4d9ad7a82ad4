//! The kernel side of an attachment, through rtnetlink: the node bridge,
//! the veth pair into the container, its address and routes.

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// A netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct NetError {
    pub what: String,
    pub reason: String,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |e| NetError {
        reason: match &e {
            rtnetlink::Error::NetlinkError(m) => match m.code {
                Some(c) => std::io::Error::from_raw_os_error(-c.get()).to_string(),
                None => e.to_string(),
            },
            _ => e.to_string(),
        },
        what,
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| -c.get() == errno))
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    pub master: Option<u32>,
    /// The link kind (`bridge`, `veth`, ...), if it has one.
    pub kind: Option<String>,
    /// The interface alias (`ip link set X alias ...`).
    pub alias: Option<String>,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: String::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        master: None,
        kind: None,
        alias: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::IfAlias(a) if !a.is_empty() => l.alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => {
                l.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                })
            }
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Controller(i) => l.master = Some(*i),
            LinkAttribute::Address(b) => {
                l.mac = b
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
            }
            _ => {}
        }
    }
    l
}

/// A netlink connection in one network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    h: Handle,
    /// The namespace, when it is not this process's.
    ns: Option<Arc<File>>,
}

impl Netlink {
    /// A connection in this process's namespace (inside a tokio runtime).
    pub fn here() -> Result<Self, NetError> {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| NetError {
            what: "netlink socket".into(),
            reason: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Netlink { h, ns: None })
    }

    /// A connection in the namespace `ns` (made on a thread that enters it).
    pub fn in_ns(ns: &File) -> Result<Self, NetError> {
        let ns = ns.try_clone().map_err(|e| NetError {
            what: "netns".into(),
            reason: e.to_string(),
        })?;
        let kept = Arc::new(ns.try_clone().map_err(|e| NetError {
            what: "netns".into(),
            reason: e.to_string(),
        })?);
        let rt = tokio::runtime::Handle::current();
        let made = in_netns(ns, move || {
            let _g = rt.enter();
            rtnetlink::new_connection().map_err(|e| e.to_string())
        })
        .map_err(|reason| NetError {
            what: "netlink socket".into(),
            reason,
        })?;
        tokio::spawn(made.0);
        Ok(Netlink {
            h: made.1,
            ns: Some(kept),
        })
    }

    /// IPv6 on for `ifname` in this connection's namespace: a runtime or a
    /// host may have switched it off (`disable_ipv6`), and the kernel then
    /// refuses IPv6 addresses. `ifname` is an existing device's name.
    fn enable_ipv6(&self, ifname: &str) -> Result<(), NetError> {
        let err = |reason: String| NetError {
            what: format!("IPv6 on {ifname}"),
            reason,
        };
        if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
            return Err(err("not a device name".into()));
        }
        let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
        let write = move || -> Result<(), String> {
            match std::fs::read_to_string(&path) {
                Ok(v) if v.trim() == "0" => Ok(()),
                Ok(_) => std::fs::write(&path, "0").map_err(|e| format!("{path}: {e}")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err("the kernel has no IPv6 (no /proc/sys/net/ipv6)".into())
                }
                Err(e) => Err(format!("{path}: {e}")),
            }
        };
        match &self.ns {
            None => write().map_err(err),
            Some(ns) => {
                in_netns(ns.try_clone().map_err(|e| err(e.to_string()))?, write).map_err(err)
            }
        }
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        match self
            .h
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
        {
            Ok(m) => Ok(m.as_ref().map(link_of)),
            Err(e) if is_errno(&e, 19) => Ok(None),
            Err(e) => Err(nl(format!("looking up {name}"))(e)),
        }
    }

    async fn must(&self, name: &str) -> Result<Link, NetError> {
        self.link(name).await?.ok_or_else(|| NetError {
            what: name.into(),
            reason: "link vanished".into(),
        })
    }

    /// Addresses on a link, both families.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, NetError> {
        let msgs: Vec<_> = self
            .h
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
                        IpNet::new(*ip, m.header.prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Routes of both families in the main table: (destination, gateway,
    /// output link).
    pub async fn routes(&self) -> Result<Vec<(IpNet, Option<IpAddr>, Option<u32>)>, NetError> {
        let mut msgs: Vec<_> = self
            .h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        let v6: Vec<_> = self
            .h
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing IPv6 routes"))?;
        msgs.extend(v6);
        Ok(msgs
            .iter()
            .filter(|r| r.header.table == RouteHeader::RT_TABLE_MAIN)
            .map(|r| {
                let v4 = r.header.address_family == netlink_packet_route::AddressFamily::Inet;
                let mut dst = if v4 {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                };
                let mut gw = None;
                let mut oif = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = (*d).into(),
                        RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = (*d).into(),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some((*g).into()),
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some((*g).into()),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let dst = IpNet::new(dst, r.header.destination_prefix_length)
                    .unwrap_or_else(|_| IpNet::new(dst, 0).expect("/0"));
                (dst, gw, oif)
            })
            .collect())
    }

    /// The node bridge, created if missing, with the gateway address and
    /// MTU. Its MAC is fixed: a bridge without one takes its lowest port's,
    /// and a new container could then change it under every other
    /// container's ARP cache. Addresses of an older node subnet (inside the
    /// cluster network) are replaced.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateways: &[IpNet],
        clusters: &[IpNet],
        mtu: u32,
    ) -> Result<Link, NetError> {
        let bridge = match self.link(name).await? {
            Some(l) if l.kind.as_deref() == Some("bridge") => l,
            Some(l) => {
                return Err(NetError {
                    what: format!("node bridge {name}"),
                    reason: format!(
                        "a {} named {name} exists and is not a bridge: remove it \
                         (ip link del {name}) or name another bridge in the CNI config (\"bridge\")",
                        l.kind.as_deref().unwrap_or("link without a kind")
                    ),
                })
            }
            None => {
                let o = match gateways.first().map(IpNet::addr) {
                    Some(IpAddr::V4(a)) => a.octets(),
                    Some(IpAddr::V6(a)) => {
                        let b = a.octets();
                        [b[12], b[13], b[14], b[15]]
                    }
                    None => [0; 4],
                };
                let mac = vec![0x02, 0x77, o[0], o[1], o[2], o[3]];
                match self
                    .h
                    .link()
                    .add(LinkBridge::new(name).mtu(mtu).address(mac).build())
                    .execute()
                    .await
                {
                    // Another ADD made it meanwhile.
                    Err(e) if is_errno(&e, 17) => {}
                    r => r.map_err(nl(format!("creating bridge {name}")))?,
                }
                self.must(name).await?
            }
        };
        let have = self.addresses(bridge.index).await?;
        for gateway in gateways {
            if have.contains(gateway) {
                continue;
            }
            for old in have.iter().filter(|a| {
                a.addr().is_ipv4() == gateway.addr().is_ipv4()
                    && clusters.iter().any(|c| c.contains(&a.addr()))
            }) {
                let _ = self
                    .h
                    .address()
                    .del(address_message(bridge.index, *old))
                    .execute()
                    .await;
            }
            if gateway.addr().is_ipv6() {
                self.enable_ipv6(name)?;
            }
            match self.add_address(bridge.index, *gateway).execute().await {
                Err(e) if is_errno(&e, 17) => {}
                r => r.map_err(nl(format!("adding {gateway} to {name}")))?,
            }
        }
        if bridge.mtu != mtu || !bridge.up {
            self.h
                .link()
                .set(
                    LinkUnspec::new_with_index(bridge.index)
                        .mtu(mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("setting up {name}")))?;
        }
        self.must(name).await
    }

    /// Creates a veth pair in one request: `host` stays here, up and on
    /// `bridge`, marked with `alias` (the attachment it belongs to); the peer
    /// is made directly inside `ns` as `ifname` (down: a veth cannot be
    /// opened before the kernel has paired it).
    /// Creating the peer in its namespace, instead of moving it there
    /// afterwards, spares the kernel's namespace move (tens of ms: it waits
    /// for RCU grace periods). Returns the host link.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_veth(
        &self,
        host: &str,
        ifname: &str,
        ns: &File,
        mtu: u32,
        bridge: u32,
        hairpin: bool,
        alias: &str,
    ) -> Result<Link, NetError> {
        let peer = LinkUnspec::new_with_name(ifname)
            .mtu(mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .mtu(mtu)
            .controller(bridge)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.h.link().add(msg).execute().await.map_err(nl(format!(
            "creating veth {host} with peer {ifname} in the container"
        )))?;
        let h = self.must(host).await?;
        // The kernel takes an alias only on a link that exists.
        self.h
            .link()
            .set(LinkUnspec::new_with_index(h.index).alias(alias).build())
            .execute()
            .await
            .map_err(nl(format!("marking {host} as {alias:?}")))?;
        if hairpin {
            self.h
                .link()
                .set_port(LinkBridgePort::new(h.index).hairpin(true).build())
                .execute()
                .await
                .map_err(nl(format!("hairpin mode on {host}")))?;
        }
        Ok(h)
    }

    /// An address to add; IPv6 ones without duplicate address detection
    /// (weft's IPAM hands each out once, and a tentative address would
    /// keep the first packets from leaving).
    fn add_address(&self, index: u32, a: IpNet) -> rtnetlink::AddressAddRequest {
        let mut req = self.h.address().add(index, a.addr(), a.prefix_len());
        if a.addr().is_ipv6() {
            req.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        req
    }

    /// Inside the container: `ifname` (made by [`Netlink::add_veth`]) up,
    /// with its addresses and routes.
    pub async fn setup_container_if(
        &self,
        ifname: &str,
        addrs: &[IpNet],
        routes: &[(IpNet, IpAddr)],
    ) -> Result<Link, NetError> {
        let l = self.must(ifname).await?;
        if addrs.iter().any(|a| a.addr().is_ipv6()) {
            self.enable_ipv6(ifname)?;
        }
        for addr in addrs {
            self.add_address(l.index, *addr)
                .execute()
                .await
                .map_err(nl(format!("adding {addr} to {ifname}")))?;
        }
        self.h
            .link()
            .set(LinkUnspec::new_with_index(l.index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bringing {ifname} up")))?;
        for (dst, gw) in routes {
            let msg = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .and_then(|b| b.gateway(*gw))
                .map_err(|e| NetError {
                    what: format!("route {dst} via {gw}"),
                    reason: e.to_string(),
                })?
                .output_interface(l.index)
                .build();
            self.h
                .route()
                .add(msg)
                .execute()
                .await
                .map_err(nl(format!("adding route {dst} via {gw}")))?;
        }
        Ok(l)
    }

    /// Deletes the host veth `name` of an attachment if it is the one
    /// marked `alias` (a veth takes its peer along). A veth without an
    /// alias counts as the attachment's only when it is on `bridge` (made
    /// by an older weft-cni, or by an ADD that stopped before marking it).
    /// Anything else with that name belongs to someone else and stays.
    pub async fn delete_veth(
        &self,
        name: &str,
        alias: &str,
        bridge: Option<u32>,
    ) -> Result<Removal, NetError> {
        let Some(l) = self.link(name).await? else {
            return Ok(Removal::Absent);
        };
        if !owned(&l, alias, bridge) {
            return Ok(Removal::NotOurs(describe(&l)));
        }
        match self.h.link().del(l.index).execute().await {
            Err(e) if is_errno(&e, 19) => Ok(Removal::Absent),
            r => r
                .map(|_| Removal::Removed)
                .map_err(nl(format!("deleting {name}"))),
        }
    }
}

/// Runs `f` on a thread that has entered the network namespace `ns`
/// (this process's own namespace stays as it is).
fn in_netns<T: Send + 'static>(
    ns: File,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    std::thread::spawn(move || {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the container's namespace: {e}"))?;
        f()
    })
    .join()
    .map_err(|_| "thread panicked".to_string())?
}

/// What [`Netlink::delete_veth`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    Removed,
    Absent,
    /// A link with that name is not the attachment's: what it is.
    NotOurs(String),
}

/// Whether `l` is the host veth of the attachment marked `alias`.
pub fn owned(l: &Link, alias: &str, bridge: Option<u32>) -> bool {
    l.kind.as_deref() == Some("veth")
        && match &l.alias {
            Some(a) => a == alias,
            None => bridge.is_some() && l.master == bridge,
        }
}

/// A link, for messages.
pub fn describe(l: &Link) -> String {
    format!(
        "a {} {}",
        l.kind.as_deref().unwrap_or("link"),
        match &l.alias {
            Some(a) => format!("marked {a:?}"),
            None => "without a weft mark".to_string(),
        }
    )
}

fn address_message(index: u32, a: IpNet) -> netlink_packet_route::address::AddressMessage {
    let mut m = netlink_packet_route::address::AddressMessage::default();
    m.header.family = match a {
        IpNet::V4(_) => netlink_packet_route::AddressFamily::Inet,
        IpNet::V6(_) => netlink_packet_route::AddressFamily::Inet6,
    };
    m.header.prefix_len = a.prefix_len();
    m.header.index = index;
    if a.addr().is_ipv4() {
        m.attributes.push(AddressAttribute::Local(a.addr()));
    }
    m.attributes.push(AddressAttribute::Address(a.addr()));
    m
}

fn fnv64(container_id: &str, ifname: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer, so every output bit depends on every input bit.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The host-side veth name of an attachment: stable, so DEL finds it even
/// when the container's namespace is gone. `veth` and 11 base-32 digits of
/// a 64-bit hash: 55 bits, the most the 15 bytes of a name hold. A name
/// that collides all the same is caught by the alias check, never deleted.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    const DIGITS: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut h = fnv64(container_id, ifname);
    let mut name = String::from("veth");
    for _ in 0..11 {
        name.push(char::from(DIGITS[(h & 31) as usize]));
        h >>= 5;
    }
    name
}

/// The host veth name weft-cni 0.1 used (32-bit FNV-1a): DEL and GC still
/// remove such veths of containers attached before an upgrade.
pub fn legacy_host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("veth{h:08x}")
}

/// The alias that marks an attachment's host veth (at most 255 bytes, the
/// kernel's limit; a longer container id is stood for by its hash, after a
/// '/', which no container id has).
pub fn veth_alias(container_id: &str, ifname: &str) -> String {
    let full = format!("weft:{ifname}:{container_id}");
    if full.len() <= 255 {
        full
    } else {
        format!("weft:{ifname}:/{:016x}", fnv64(container_id, ifname))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("veth"));
        // Two ids that collide in 32-bit FNV-1a ("costarring"/"liquid" is
        // the classic pair) get different names now.
        assert_eq!(
            legacy_host_veth_name("costarring", ""),
            legacy_host_veth_name("liquid", "")
        );
        assert_ne!(
            host_veth_name("costarring", ""),
            host_veth_name("liquid", "")
        );
        // 100,000 containers: no two names alike.
        let names: std::collections::HashSet<String> = (0..100_000)
            .map(|i| host_veth_name(&format!("{i:064x}"), "eth0"))
            .collect();
        assert_eq!(names.len(), 100_000);
    }

    #[test]
    fn aliases_fit_the_kernel_and_ownership_needs_them() {
        let short = veth_alias("abc", "eth0");
        assert_eq!(short, "weft:eth0:abc");
        let long = veth_alias(&"x".repeat(300), "eth0");
        assert!(
            long.len() <= 255 && long.starts_with("weft:eth0:/"),
            "{long}"
        );
        assert_ne!(long, veth_alias(&"y".repeat(300), "eth0"));
        let veth = |alias: Option<&str>, master| Link {
            index: 9,
            name: host_veth_name("abc", "eth0"),
            mac: String::new(),
            mtu: 1500,
            up: true,
            master,
            kind: Some("veth".into()),
            alias: alias.map(String::from),
        };
        assert!(owned(&veth(Some(&short), None), &short, Some(3)));
        assert!(!owned(
            &veth(Some("weft:eth0:other"), Some(3)),
            &short,
            Some(3)
        ));
        // Unmarked: only on our bridge.
        assert!(owned(&veth(None, Some(3)), &short, Some(3)));
        assert!(!owned(&veth(None, Some(4)), &short, Some(3)));
        assert!(!owned(&veth(None, Some(3)), &short, None));
        let mut dummy = veth(Some(&short), None);
        dummy.kind = Some("dummy".into());
        assert!(!owned(&dummy, &short, Some(3)));
    }
}
