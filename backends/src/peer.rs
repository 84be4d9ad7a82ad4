//! Turning leases into peers: every lease that is not ours, checked. A lease
//! that cannot be programmed is skipped with a reason; the others still are.

use crate::local::LocalNode;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rustc_hash::FxHashMap as HashMap;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use weft_config::{BackendType, NetworkConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, MacAddr, SubnetKey};

/// A remote node to program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub key: SubnetKey,
    pub node: Option<String>,
    /// Its IPv4 subnet; none in an IPv6-only network.
    pub subnet: Option<Ipv4Net>,
    pub subnet6: Option<Ipv6Net>,
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: BackendData,
    /// Store revision of the lease: between two leases that claim the same
    /// thing, the older one wins.
    pub revision: i64,
}

/// A lease that was not programmed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: SubnetKey,
    pub node: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    /// As the status and the logs show it: subnets, node, reason.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.key.to_cidrs(),
            self.node.as_deref().unwrap_or("flannel"),
            self.reason
        )
    }
}

impl Skipped {
    /// `peer` skipped for `reason`.
    pub fn of(peer: &Peer, reason: String) -> Self {
        Skipped {
            key: peer.key,
            node: peer.node.clone(),
            reason,
        }
    }
}

/// A lease as a node keeps it: read and checked once, when it arrives
/// (parsing thousands of leases on every pass would cost milliseconds).
pub type Candidate = Result<Peer, Skipped>;

fn overlaps4(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn overlaps6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Reads a lease: every check that does not depend on the local node.
pub fn read(lease: &LeaseView) -> Candidate {
    let skip = |reason: String| Skipped {
        key: lease.key,
        node: lease.node_name.clone(),
        reason,
    };
    let subnet = lease.subnet;
    if subnet.is_none() && lease.ipv6_subnet.is_none() {
        return Err(skip("lease has no subnet".into()));
    }
    let public_ip = lease.public_ip.ok_or_else(|| {
        skip("no public IP yet (a reservation for a node that has not joined)".into())
    })?;
    if public_ip.is_loopback() || public_ip.is_multicast() || public_ip.is_broadcast() {
        return Err(skip(format!(
            "public IP {public_ip} is not a unicast address"
        )));
    }
    if let Some(v6) = lease.public_ipv6 {
        let mapped = v6.to_ipv4_mapped().is_some();
        if v6.is_loopback() || v6.is_multicast() || v6.is_unspecified() || mapped {
            return Err(skip(format!(
                "public IPv6 address {v6} is not a unicast IPv6 address"
            )));
        }
    }
    let backend = BackendData::parse_text(&lease.backend_type, lease.backend_data.as_ref())
        .map_err(|e| skip(e.to_string()))?;
    Ok(Peer {
        key: lease.key,
        node: lease.node_name.clone(),
        subnet,
        subnet6: lease.ipv6_subnet,
        public_ip,
        public_ipv6: lease.public_ipv6,
        backend,
        revision: lease.revision,
    })
}

/// What this host has that no peer may take: its addresses and connected
/// routes (the underlay and anything else it is attached to), and routes
/// that others installed (a peer route to the same destination would
/// replace or shadow them). weft's own devices are not in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// Networks of the host's addresses and connected (scope link) routes.
    pub networks: Vec<IpNet>,
    /// Destinations of main-table routes weft does not own (not the
    /// default route).
    pub foreign_routes: BTreeSet<IpNet>,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why `p` does not fit the network: its subnets must be subnets of the
/// network config, of its subnet length.
fn misfit(p: &Peer, network: &NetworkConfig) -> Option<String> {
    match (p.subnet, &network.ipv4) {
        (Some(s), None) => return Some(format!("subnet {s} is IPv4 and the network has no IPv4")),
        (None, Some(pool)) => {
            return Some(format!(
                "no IPv4 subnet, and the network has IPv4 ({})",
                pool.network()
            ))
        }
        (Some(s), Some(pool))
            if !pool.network().contains(&s) || s.prefix_len() != pool.subnet_len() =>
        {
            return Some(format!(
                "subnet {s} is not a /{} of the network {}",
                pool.subnet_len(),
                pool.network()
            ))
        }
        _ => {}
    }
    match (p.subnet6, &network.ipv6) {
        (None, Some(pool6)) if network.ipv4.is_none() => Some(format!(
            "no IPv6 subnet, and the network {} is IPv6 only",
            pool6.network()
        )),
        (Some(s6), Some(pool6))
            if !pool6.network().contains(&s6) || s6.prefix_len() != pool6.subnet_len() =>
        {
            Some(format!(
                "IPv6 subnet {s6} is not a /{} of the network {}",
                pool6.subnet_len(),
                pool6.network()
            ))
        }
        _ => None,
    }
}

/// Whether `c` is the local node's own lease.
fn is_ours(key: &SubnetKey, node: Option<&str>, local: &LocalNode) -> bool {
    *key == local.subnet || node == Some(local.name.as_str())
}

/// Something only one peer may hold. Between two leases that claim the
/// same, the older one keeps it ([`resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Claim {
    Subnet(Ipv4Net),
    Subnet6(Ipv6Net),
    PublicIp(Ipv4Addr),
    /// In a network with IPv6: host-gw routes and WireGuard endpoints use it.
    PublicIpv6(Ipv6Addr),
    /// A VXLAN VTEP MAC: FDB entries are keyed by it, so a second lease
    /// claiming one (a cloned VM, say) would take the first node's traffic.
    VtepMac(MacAddr),
    /// A WireGuard public key: peers are keyed by it on the device.
    PublicKey([u8; 32]),
}

impl Claim {
    /// Why a peer that also claims this does not get it.
    fn taken_by(&self, holder: &str) -> String {
        match self {
            Claim::Subnet(s) => format!("subnet {s} is already {holder}'s"),
            Claim::Subnet6(s) => format!("IPv6 subnet {s} is already {holder}'s"),
            Claim::PublicIp(ip) => {
                format!("public IP {ip} is already {holder}'s (the older lease keeps it)")
            }
            Claim::PublicIpv6(ip) => {
                format!("public IPv6 address {ip} is already {holder}'s (the older lease keeps it)")
            }
            Claim::VtepMac(m) => format!("VTEP MAC {m} is already used by {holder}"),
            Claim::PublicKey(k) => format!(
                "WireGuard public key {} is already used by {holder}",
                crate::kinds::wireguard::WgKey(*k)
            ),
        }
    }
}

/// What every peer holds alone: its subnets and its public IP. Its IPv6
/// subnet only in a network with IPv6 (otherwise nothing is programmed for
/// it, and a lease can be of any prefix length there).
pub fn claims(p: &Peer, local: &LocalNode) -> impl Iterator<Item = Claim> + Clone {
    let v6 = local.network.ipv6.is_some();
    [
        p.subnet.map(Claim::Subnet),
        p.subnet6.filter(|_| v6).map(Claim::Subnet6),
        Some(Claim::PublicIp(p.public_ip)),
        p.public_ipv6.filter(|_| v6).map(Claim::PublicIpv6),
    ]
    .into_iter()
    .flatten()
}

/// A lease judged on its own, before it meets the others.
#[derive(Debug)]
pub enum Judged<'a> {
    /// The local node's own lease: neither programmed nor skipped.
    Ours,
    Refused(Skipped),
    Fits(&'a Peer),
}

/// Judges one lease by everything that does not depend on the other
/// leases: its subnet must be one of the network's (inside it, of its
/// subnet length) and collide with nothing this node has (its own subnet
/// and public IP, the host's networks and foreign routes in `host`), and
/// its backend must be ours.
pub fn judge<'a>(
    c: &'a Candidate,
    local: &LocalNode,
    backend: BackendType,
    host: &HostView,
) -> Judged<'a> {
    let p = match c {
        Err(s) if is_ours(&s.key, s.node.as_deref(), local) => return Judged::Ours,
        Err(s) => return Judged::Refused(s.clone()),
        Ok(p) if is_ours(&p.key, p.node.as_deref(), local) => return Judged::Ours,
        Ok(p) => p,
    };
    let nets = || {
        p.subnet
            .map(IpNet::V4)
            .into_iter()
            .chain(p.subnet6.map(IpNet::V6))
    };
    let ours = if let Some((theirs, ours)) = p
        .subnet
        .zip(local.subnet.ipv4())
        .filter(|(t, o)| overlaps4(t, o))
    {
        Some(format!("subnet {theirs} overlaps ours ({ours})"))
    } else if let (Some(theirs), Some(ours)) = (p.subnet6, local.subnet.ipv6()) {
        overlaps6(&theirs, &ours).then(|| format!("IPv6 subnet {theirs} overlaps ours ({ours})"))
    } else {
        None
    };
    let reason = ours
        .or_else(|| misfit(p, &local.network))
        .or_else(|| {
            nets().find_map(|n| {
                host.networks.iter().find(|h| overlaps(&n, h)).map(|h| {
                    format!("subnet {n} overlaps {h}, a network of this host (its addresses or connected routes)")
                })
            })
        })
        .or_else(|| {
            nets().find(|n| host.foreign_routes.contains(n)).map(|n| {
                format!("a route to {n} that weft does not own exists on this host; it is left alone")
            })
        })
        .or_else(|| {
            (p.public_ip == local.public_ip).then(|| format!("public IP {} is ours", p.public_ip))
        })
        .or_else(|| {
            (p.backend.backend_type() != backend).then(|| {
                format!(
                    "backend {:?} differs from ours ({backend})",
                    p.backend.backend_type().as_str()
                )
            })
        });
    match reason {
        Some(reason) => Judged::Refused(Skipped::of(p, reason)),
        None => Judged::Fits(p),
    }
}

/// The name a skip reason gives a peer: its node, or its subnet.
fn name(p: &Peer) -> String {
    p.node.clone().unwrap_or_else(|| p.key.to_cidrs())
}

/// Among `peers`, the older lease (by revision, then key) keeps what two
/// of them claim; a peer that loses any claim is skipped and holds none.
pub fn resolve<'a, C>(
    mut peers: Vec<&'a Peer>,
    claims: impl Fn(&Peer) -> C,
    skipped: &mut Vec<Skipped>,
) -> Vec<&'a Peer>
where
    C: IntoIterator<Item = Claim> + Clone,
{
    peers.sort_by_key(|p| (p.revision, p.key));
    let mut held: HashMap<Claim, &Peer> =
        HashMap::with_capacity_and_hasher(peers.len() * 3, Default::default());
    let mut kept = Vec::with_capacity(peers.len());
    for p in peers {
        let mine = claims(p);
        let taken = mine
            .clone()
            .into_iter()
            .find_map(|c| Some((c, *held.get(&c)?)));
        if let Some((c, first)) = taken {
            skipped.push(Skipped::of(p, c.taken_by(&name(first))));
            continue;
        }
        held.extend(mine.into_iter().map(|c| (c, p)));
        kept.push(p);
    }
    kept
}

/// The leases that fit on their own ([`judge`]); the refused ones go to
/// `skipped`.
pub fn fitting<'a>(
    candidates: impl IntoIterator<Item = &'a Candidate>,
    local: &LocalNode,
    backend: BackendType,
    host: &HostView,
    skipped: &mut Vec<Skipped>,
) -> Vec<&'a Peer> {
    let mut fit = Vec::new();
    for c in candidates {
        match judge(c, local, backend, host) {
            Judged::Ours => {}
            Judged::Refused(s) => skipped.push(s),
            Judged::Fits(p) => fit.push(p),
        }
    }
    fit
}

/// The peers to program, and the leases skipped with the reason (the local
/// node's own lease is neither): the leases that fit on their own
/// ([`judge`]), then, between peers, the older lease keeps a subnet or
/// public IP two of them claim ([`resolve`]). A lease written into etcd by
/// hand can therefore not divert traffic that is not the cluster's.
pub fn select<'a>(
    candidates: impl IntoIterator<Item = &'a Candidate>,
    local: &LocalNode,
    backend: BackendType,
    host: &HostView,
) -> (Vec<&'a Peer>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let fit = fitting(candidates, local, backend, host, &mut skipped);
    let peers = resolve(fit, |p| claims(p, local), &mut skipped);
    (peers, skipped)
}

/// Reads and selects in one go (for tests and tools).
pub fn select_leases(
    leases: &[LeaseView],
    local: &LocalNode,
    backend: BackendType,
    host: &HostView,
) -> (Vec<Peer>, Vec<Skipped>) {
    let candidates: Vec<Candidate> = leases.iter().map(read).collect();
    let (peers, skipped) = select(&candidates, local, backend, host);
    (peers.into_iter().cloned().collect(), skipped)
}
