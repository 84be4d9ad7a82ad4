//! The network state weft owns, as plain data: what a backend wants and what
//! the kernel has are both a [`NetState`], so reconciling is a diff.

use ipnet::IpNet;
use rustc_hash::FxHashMap as HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use weft_lease::MacAddr;

/// Route protocol number on every route weft installs; routes with any
/// other protocol are never touched. `ip route` shows it as `proto 87`
/// (`proto weft` with deploy/rt_protos.d/weft.conf installed).
pub const WEFT_ROUTE_PROTOCOL: u8 = 87;

/// The metric of weft's route to `dst`, set on every route weft makes.
///
/// IPv4: the kernel keeps one `fib_info` per distinct next hop and finds
/// an existing one through a hash of the protocol, scope, preferred
/// source, metric and device, but not the gateway. Peer routes differ
/// only in their gateway, so with one metric they all share one hash
/// chain: adding the 50,000th walks the 49,999 before it (2.5 ms), and
/// 50,000 from empty took 35 to 50 s. A metric of its own per destination
/// (its network address) spreads them: 0.5 s for 50,000. A metric only
/// orders routes to the same destination, and weft has one per
/// destination. IPv6 has no such table: the kernel's default, 1024.
pub fn route_metric(dst: &IpNet) -> u32 {
    match dst {
        IpNet::V4(d) => u32::from(d.network()),
        IpNet::V6(_) => 1024,
    }
}

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

impl RouteTarget {
    /// Via `via`, a neighbour on `dev`'s network (a peer on our L2).
    pub fn direct(via: IpAddr, dev: &Dev) -> Self {
        RouteTarget {
            via,
            dev: dev.clone(),
            onlink: false,
        }
    }

    /// Via `via` on `dev`, whatever `dev`'s addresses (a tunnel's far end).
    pub fn onlink(via: IpAddr, dev: &Dev) -> Self {
        RouteTarget {
            via,
            dev: dev.clone(),
            onlink: true,
        }
    }
}

/// weft's reqid on every XFRM state and policy template it owns ("weft"
/// in ASCII); entries with any other reqid are never touched.
pub const WEFT_XFRM_REQID: u32 = 0x7765_6674;

/// The AEAD every weft SA uses, and its ICV length in bits.
pub const XFRM_AEAD: &str = "rfc4106(gcm(aes))";
pub const XFRM_ICV_BITS: u32 = 128;

/// Key material of an SA: the AES-256 key and the 4-byte GCM salt, as the
/// kernel takes them (36 bytes). Never shown: `Debug` prints a fingerprint
/// length only.
#[derive(Clone, PartialEq, Eq)]
pub struct AeadKey(pub Arc<[u8]>);

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AeadKey(<{} bytes, redacted>)", self.0.len())
    }
}

/// An ESP SA in tunnel mode, identified as the kernel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XfrmSaId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
}

/// What an SA holds besides its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XfrmSa {
    pub reqid: u32,
    pub key: AeadKey,
    pub replay_window: u32,
}

/// Direction of an XFRM policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XfrmDir {
    In,
    Out,
    Fwd,
}

impl XfrmDir {
    /// The kernel's number (XFRM_POLICY_IN/OUT/FWD).
    pub fn kernel(self) -> u8 {
        match self {
            XfrmDir::In => 0,
            XfrmDir::Out => 1,
            XfrmDir::Fwd => 2,
        }
    }

    /// From the kernel's number.
    pub fn from_kernel(d: u8) -> Option<Self> {
        match d {
            0 => Some(XfrmDir::In),
            1 => Some(XfrmDir::Out),
            2 => Some(XfrmDir::Fwd),
            _ => None,
        }
    }
}

impl fmt::Display for XfrmDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XfrmDir::In => "in",
            XfrmDir::Out => "out",
            XfrmDir::Fwd => "fwd",
        })
    }
}

/// An XFRM policy's identity: direction and selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XfrmPolicyId {
    pub dir: XfrmDir,
    pub src: IpNet,
    pub dst: IpNet,
}

/// The priority of weft's dropping policies ("weft" in ASCII, as the reqid):
/// larger than the per-peer policies' (0), so those match first; it also
/// tells weft's block policies from others.
pub const WEFT_BLOCK_PRIORITY: u32 = 0x7765_6674;

/// The one template of a weft policy: ESP in tunnel mode between two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XfrmTmpl {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub reqid: u32,
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
    /// Routes with weft's protocol and [`route_metric`], by destination.
    pub routes: HashMap<IpNet, RouteTarget>,
    /// Routes with weft's protocol and another metric, by destination
    /// and metric: left by a weft that set no metric, or a second route to
    /// a destination. Never desired; every pass deletes them.
    pub stray_routes: HashMap<(IpNet, u32), RouteTarget>,
    /// ESP SAs with weft's reqid.
    pub xfrm_states: HashMap<XfrmSaId, XfrmSa>,
    /// XFRM policies whose template has weft's reqid.
    pub xfrm_policies: HashMap<XfrmPolicyId, XfrmTmpl>,
    /// XFRM policies that drop (action block, priority
    /// [`WEFT_BLOCK_PRIORITY`], which marks them weft's): below the
    /// per-peer policies, they catch pod traffic to the cluster network that
    /// no peer's policy encrypts, so it is never sent in the clear.
    pub xfrm_blocks: BTreeSet<XfrmPolicyId>,
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
            + self.stray_routes.len()
            + self.xfrm_states.len()
            + self.xfrm_policies.len()
            + self.xfrm_blocks.len()
    }

    /// Self's links, and its objects with a key that `a` or `b` has.
    pub fn restricted_to(&self, a: &NetState, b: &NetState) -> NetState {
        fn pick<K: Clone + Eq + std::hash::Hash, V: Clone>(
            from: &HashMap<K, V>,
            a: &HashMap<K, V>,
            b: &HashMap<K, V>,
        ) -> HashMap<K, V> {
            a.keys()
                .chain(b.keys())
                .filter_map(|k| from.get_key_value(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }
        NetState {
            links: self.links.clone(),
            addresses: pick(&self.addresses, &a.addresses, &b.addresses),
            neighbours: pick(&self.neighbours, &a.neighbours, &b.neighbours),
            fdb: pick(&self.fdb, &a.fdb, &b.fdb),
            routes: pick(&self.routes, &a.routes, &b.routes),
            stray_routes: pick(&self.stray_routes, &a.stray_routes, &b.stray_routes),
            xfrm_states: pick(&self.xfrm_states, &a.xfrm_states, &b.xfrm_states),
            xfrm_policies: pick(&self.xfrm_policies, &a.xfrm_policies, &b.xfrm_policies),
            xfrm_blocks: a
                .xfrm_blocks
                .iter()
                .chain(&b.xfrm_blocks)
                .filter(|k| self.xfrm_blocks.contains(*k))
                .copied()
                .collect(),
        }
    }

    /// Takes out the objects with a key that `gone` has, then puts in
    /// `want`'s (links are left alone).
    pub fn patch(&mut self, gone: &NetState, want: &NetState) {
        fn swap<K: Clone + Eq + std::hash::Hash, V: Clone>(
            into: &mut HashMap<K, V>,
            gone: &HashMap<K, V>,
            want: &HashMap<K, V>,
        ) {
            for k in gone.keys() {
                into.remove(k);
            }
            into.extend(want.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        swap(&mut self.addresses, &gone.addresses, &want.addresses);
        swap(&mut self.neighbours, &gone.neighbours, &want.neighbours);
        swap(&mut self.fdb, &gone.fdb, &want.fdb);
        swap(&mut self.routes, &gone.routes, &want.routes);
        swap(
            &mut self.stray_routes,
            &gone.stray_routes,
            &want.stray_routes,
        );
        swap(&mut self.xfrm_states, &gone.xfrm_states, &want.xfrm_states);
        swap(
            &mut self.xfrm_policies,
            &gone.xfrm_policies,
            &want.xfrm_policies,
        );
        for k in &gone.xfrm_blocks {
            self.xfrm_blocks.remove(k);
        }
        self.xfrm_blocks.extend(want.xfrm_blocks.iter().copied());
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
    /// A route with weft's protocol: created exclusively (a route to `dst`
    /// that is already there, which weft did not make, stays), or with
    /// `replace` in place of weft's own route to `dst`.
    SetRoute {
        dst: IpNet,
        target: RouteTarget,
        replace: bool,
    },
    DelRoute {
        dst: IpNet,
        target: RouteTarget,
    },
    /// A route of [`NetState::stray_routes`].
    DelStrayRoute {
        dst: IpNet,
        metric: u32,
        target: RouteTarget,
    },
    AddXfrmState {
        id: XfrmSaId,
        sa: XfrmSa,
    },
    DelXfrmState {
        id: XfrmSaId,
    },
    /// Adds the policy or updates its template.
    SetXfrmPolicy {
        id: XfrmPolicyId,
        tmpl: XfrmTmpl,
    },
    DelXfrmPolicy {
        id: XfrmPolicyId,
    },
    /// A dropping policy ([`NetState::xfrm_blocks`]).
    AddXfrmBlock {
        id: XfrmPolicyId,
    },
    DelXfrmBlock {
        id: XfrmPolicyId,
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
            Change::SetRoute {
                dst,
                target,
                replace,
            } => write!(
                f,
                "ip route {} {dst} via {} dev {}{} proto {WEFT_ROUTE_PROTOCOL} metric {}",
                if *replace { "replace" } else { "add" },
                target.via,
                target.dev,
                if target.onlink { " onlink" } else { "" },
                route_metric(dst)
            ),
            Change::DelRoute { dst, target } => write!(
                f,
                "ip route del {dst} via {} dev {} metric {}",
                target.via,
                target.dev,
                route_metric(dst)
            ),
            Change::DelStrayRoute {
                dst,
                metric,
                target,
            } => write!(
                f,
                "ip route del {dst} via {} dev {} metric {metric}",
                target.via, target.dev
            ),
            // The key is never written out, here or anywhere.
            Change::AddXfrmState { id, sa } => write!(
                f,
                "ip xfrm state add src {} dst {} proto esp spi {:#010x} reqid {} mode tunnel replay-window {} aead '{XFRM_AEAD}' <key> {XFRM_ICV_BITS}",
                id.src, id.dst, id.spi, sa.reqid, sa.replay_window
            ),
            Change::DelXfrmState { id } => write!(
                f,
                "ip xfrm state del src {} dst {} proto esp spi {:#010x}",
                id.src, id.dst, id.spi
            ),
            Change::SetXfrmPolicy { id, tmpl } => write!(
                f,
                "ip xfrm policy update src {} dst {} dir {} tmpl src {} dst {} proto esp reqid {} mode tunnel",
                id.src, id.dst, id.dir, tmpl.src, tmpl.dst, tmpl.reqid
            ),
            Change::DelXfrmPolicy { id } => write!(
                f,
                "ip xfrm policy del src {} dst {} dir {}",
                id.src, id.dst, id.dir
            ),
            Change::AddXfrmBlock { id } => write!(
                f,
                "ip xfrm policy add src {} dst {} dir {} priority {WEFT_BLOCK_PRIORITY} action block",
                id.src, id.dst, id.dir
            ),
            Change::DelXfrmBlock { id } => write!(
                f,
                "ip xfrm policy del src {} dst {} dir {} (action block)",
                id.src, id.dst, id.dir
            ),
        }
    }
}
