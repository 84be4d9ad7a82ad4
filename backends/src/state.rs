//! The network state weft owns, as plain data: what a backend wants and what
//! the kernel has are both a [`NetState`], so reconciling is a diff.

use ipnet::IpNet;
use rustc_hash::FxHashMap as HashMap;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use weft_lease::MacAddr;

/// Route protocol number on every route weft installs; routes with any
/// other protocol are never touched. `ip route` shows it as `proto 87`
/// (`proto weft` with deploy/rt_protos.d/weft.conf installed).
pub const WEFT_ROUTE_PROTOCOL: u8 = 87;

/// Name prefix of the VXLAN devices weft owns (`weft.<VNI>`).
pub const VXLAN_PREFIX: &str = "weft.";

/// A device name. Shared, because thousands of objects name the same
/// device and cloning the name must not allocate.
pub type Dev = Arc<str>;

/// A device name from text.
pub fn dev(name: &str) -> Dev {
    Arc::from(name)
}

/// The name of the VXLAN device for `vni`.
pub fn vxlan_name(vni: u32) -> Dev {
    dev(&format!("{VXLAN_PREFIX}{vni}"))
}

/// A VXLAN device: its identity attributes cannot change in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanLink {
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub mac: MacAddr,
    /// The underlay device (by name) the tunnel uses.
    pub underlay: Option<Dev>,
    pub learning: bool,
    pub mtu: u32,
    pub up: bool,
}

impl VxlanLink {
    /// Whether `other` can become `self` without recreating the device.
    pub fn same_identity(&self, other: &VxlanLink) -> bool {
        self.vni == other.vni
            && self.port == other.port
            && self.local == other.local
            && self.learning == other.learning
            && (self.underlay.is_none() || self.underlay == other.underlay)
    }
}

/// Where a route sends traffic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteTarget {
    pub via: IpAddr,
    pub dev: Dev,
    pub onlink: bool,
}

/// Everything weft owns on a host. Hash maps (FxHash: fast for these small
/// keys, which come from controller-checked leases, not from strangers): a
/// pass with thousands of peers builds and compares them, in no order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    /// VXLAN devices by name.
    pub links: BTreeMap<Dev, VxlanLink>,
    /// Addresses on weft's devices: (device, address).
    pub addresses: HashMap<(Dev, IpNet), ()>,
    /// Permanent neighbours on weft's devices: (device, IP) -> MAC.
    pub neighbours: HashMap<(Dev, IpAddr), MacAddr>,
    /// FDB entries on weft's VXLAN devices: (device, MAC) -> remote VTEP.
    pub fdb: HashMap<(Dev, MacAddr), IpAddr>,
    /// Routes with weft's protocol, by destination.
    pub routes: HashMap<IpNet, RouteTarget>,
}

impl NetState {
    /// Number of kernel objects (links, addresses, neighbours, FDB
    /// entries, routes).
    pub fn object_count(&self) -> usize {
        self.links.len()
            + self.addresses.len()
            + self.neighbours.len()
            + self.fdb.len()
            + self.routes.len()
    }
}

/// One change to the kernel's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    CreateLink {
        name: Dev,
        link: VxlanLink,
    },
    DeleteLink {
        name: Dev,
    },
    /// MTU or admin state of an existing link.
    UpdateLink {
        name: Dev,
        mtu: u32,
        up: bool,
    },
    AddAddress {
        dev: Dev,
        addr: IpNet,
    },
    DelAddress {
        dev: Dev,
        addr: IpNet,
    },
    SetNeighbour {
        dev: Dev,
        ip: IpAddr,
        mac: MacAddr,
    },
    DelNeighbour {
        dev: Dev,
        ip: IpAddr,
    },
    SetFdb {
        dev: Dev,
        mac: MacAddr,
        dst: IpAddr,
    },
    DelFdb {
        dev: Dev,
        mac: MacAddr,
        dst: IpAddr,
    },
    SetRoute {
        dst: IpNet,
        target: RouteTarget,
    },
    DelRoute {
        dst: IpNet,
        target: RouteTarget,
    },
}

impl fmt::Display for Change {
    /// The change as the equivalent iproute2 command, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateLink { name, link } => write!(
                f,
                "ip link add {name} type vxlan id {} dstport {} local {} nolearning (mtu {})",
                link.vni, link.port, link.local, link.mtu
            ),
            Change::DeleteLink { name } => write!(f, "ip link del {name}"),
            Change::UpdateLink { name, mtu, up } => {
                write!(
                    f,
                    "ip link set {name} mtu {mtu} {}",
                    if *up { "up" } else { "down" }
                )
            }
            Change::AddAddress { dev, addr } => write!(f, "ip addr add {addr} dev {dev}"),
            Change::DelAddress { dev, addr } => write!(f, "ip addr del {addr} dev {dev}"),
            Change::SetNeighbour { dev, ip, mac } => {
                write!(
                    f,
                    "ip neigh replace {ip} lladdr {mac} dev {dev} nud permanent"
                )
            }
            Change::DelNeighbour { dev, ip } => write!(f, "ip neigh del {ip} dev {dev}"),
            Change::SetFdb { dev, mac, dst } => write!(
                f,
                "bridge fdb replace {mac} dev {dev} dst {dst} self permanent"
            ),
            Change::DelFdb { dev, mac, dst } => {
                write!(f, "bridge fdb del {mac} dev {dev} dst {dst} self")
            }
            Change::SetRoute { dst, target } => write!(
                f,
                "ip route replace {dst} via {} dev {}{} proto {WEFT_ROUTE_PROTOCOL}",
                target.via,
                target.dev,
                if target.onlink { " onlink" } else { "" }
            ),
            Change::DelRoute { dst, target } => write!(
                f,
                "ip route del {dst} via {} dev {}",
                target.via, target.dev
            ),
        }
    }
}
