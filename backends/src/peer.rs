//! Turning leases into peers: every lease that is not ours, checked. A lease
//! that cannot be programmed is skipped with a reason; the others still are.

use crate::local::LocalNode;
use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};
use weft_config::BackendType;
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, SubnetKey};

/// A remote node to program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub key: SubnetKey,
    pub node: Option<String>,
    pub subnet: Ipv4Net,
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

fn overlaps4(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn overlaps6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Checks one lease against the local node. `Ok(None)`: the lease is ours.
pub fn check(
    lease: &LeaseView,
    local: &LocalNode,
    backend: BackendType,
) -> Result<Option<Peer>, String> {
    if lease.key == local.subnet || lease.node_name.as_deref() == Some(local.name.as_str()) {
        return Ok(None);
    }
    let subnet = lease.subnet.ok_or_else(|| {
        "lease has no IPv4 subnet (IPv6-only peers are not supported)".to_string()
    })?;
    if let Some(ours) = local.subnet.ipv4() {
        if overlaps4(&subnet, &ours) {
            return Err(format!("subnet {subnet} overlaps ours ({ours})"));
        }
    }
    if let (Some(theirs), Some(ours)) = (lease.ipv6_subnet, local.subnet.ipv6()) {
        if overlaps6(&theirs, &ours) {
            return Err(format!("IPv6 subnet {theirs} overlaps ours ({ours})"));
        }
    }
    let public_ip = lease.public_ip.ok_or_else(|| {
        "no public IP yet (a reservation for a node that has not joined)".to_string()
    })?;
    if public_ip.is_loopback() || public_ip.is_multicast() || public_ip.is_broadcast() {
        return Err(format!("public IP {public_ip} is not a unicast address"));
    }
    if public_ip == local.public_ip {
        return Err(format!("public IP {public_ip} is ours"));
    }
    if lease.backend_type != backend.as_str() {
        return Err(format!(
            "backend {:?} differs from ours ({backend})",
            lease.backend_type
        ));
    }
    let data = BackendData::parse(&lease.backend_type, lease.backend_data.as_ref())
        .map_err(|e| e.to_string())?;
    Ok(Some(Peer {
        key: lease.key,
        node: lease.node_name.clone(),
        subnet,
        subnet6: lease.ipv6_subnet,
        public_ip,
        public_ipv6: lease.public_ipv6,
        backend: data,
        revision: lease.revision,
    }))
}

/// Splits leases into peers to program and leases skipped with a reason
/// (the local node's own lease is neither).
pub fn select<'a>(
    leases: impl IntoIterator<Item = &'a LeaseView>,
    local: &LocalNode,
    backend: BackendType,
) -> (Vec<Peer>, Vec<Skipped>) {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for l in leases {
        match check(l, local, backend) {
            Ok(Some(p)) => peers.push(p),
            Ok(None) => {}
            Err(reason) => skipped.push(Skipped {
                key: l.key,
                node: l.node_name.clone(),
                reason,
            }),
        }
    }
    (peers, skipped)
}
