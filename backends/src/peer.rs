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
    let subnet = lease.subnet.ok_or_else(|| {
        skip("lease has no IPv4 subnet (IPv6-only peers are not supported)".into())
    })?;
    let public_ip = lease.public_ip.ok_or_else(|| {
        skip("no public IP yet (a reservation for a node that has not joined)".into())
    })?;
    if public_ip.is_loopback() || public_ip.is_multicast() || public_ip.is_broadcast() {
        return Err(skip(format!(
            "public IP {public_ip} is not a unicast address"
        )));
    }
    let backend = BackendData::parse(&lease.backend_type, lease.backend_data.as_ref())
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

/// Whether `c` is the local node's own lease.
fn is_ours(key: &SubnetKey, node: Option<&str>, local: &LocalNode) -> bool {
    *key == local.subnet || node == Some(local.name.as_str())
}

/// The peers to program, and the leases skipped with the reason (the local
/// node's own lease is neither).
pub fn select<'a>(
    candidates: impl IntoIterator<Item = &'a Candidate>,
    local: &LocalNode,
    backend: BackendType,
) -> (Vec<&'a Peer>, Vec<Skipped>) {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for c in candidates {
        let p = match c {
            Err(s) => {
                if !is_ours(&s.key, s.node.as_deref(), local) {
                    skipped.push(s.clone());
                }
                continue;
            }
            Ok(p) => p,
        };
        if is_ours(&p.key, p.node.as_deref(), local) {
            continue;
        }
        let reason = if let Some(ours) = local.subnet.ipv4().filter(|o| overlaps4(&p.subnet, o)) {
            Some(format!("subnet {} overlaps ours ({ours})", p.subnet))
        } else if let (Some(theirs), Some(ours)) = (p.subnet6, local.subnet.ipv6()) {
            overlaps6(&theirs, &ours)
                .then(|| format!("IPv6 subnet {theirs} overlaps ours ({ours})"))
        } else {
            None
        };
        let reason = reason
            .or_else(|| {
                (p.public_ip == local.public_ip)
                    .then(|| format!("public IP {} is ours", p.public_ip))
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
            Some(reason) => skipped.push(Skipped::of(p, reason)),
            None => peers.push(p),
        }
    }
    (peers, skipped)
}

/// Reads and selects in one go (for tests and tools).
pub fn select_leases(
    leases: &[LeaseView],
    local: &LocalNode,
    backend: BackendType,
) -> (Vec<Peer>, Vec<Skipped>) {
    let candidates: Vec<Candidate> = leases.iter().map(read).collect();
    let (peers, skipped) = select(&candidates, local, backend);
    (peers.into_iter().cloned().collect(), skipped)
}
