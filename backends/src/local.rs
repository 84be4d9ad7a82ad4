//! The local node as the backends see it.

use crate::state::Dev;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::sync::Arc;
use weft_config::NetworkConfig;
use weft_lease::{MacAddr, SubnetKey};

/// The external (underlay) interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIface {
    /// Its name (shared: thousands of routes name it).
    pub name: Dev,
    pub index: u32,
    pub mtu: u32,
    /// Its IPv4 address with prefix: peers inside are on the same L2.
    pub addr: Ipv4Net,
}

/// Everything about this node that desired state depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalNode {
    pub name: String,
    pub subnet: SubnetKey,
    pub public_ip: Ipv4Addr,
    pub ext: ExternalIface,
    pub vtep_mac: MacAddr,
    pub network: Arc<NetworkConfig>,
}

impl LocalNode {
    /// The local node; its VTEP MAC follows from its name ([`vtep_mac`]).
    pub fn new(
        name: impl Into<String>,
        subnet: SubnetKey,
        public_ip: Ipv4Addr,
        ext: ExternalIface,
        network: Arc<NetworkConfig>,
    ) -> Self {
        let name = name.into();
        LocalNode {
            vtep_mac: vtep_mac(&name),
            name,
            subnet,
            public_ip,
            ext,
            network,
        }
    }
}

/// The VTEP MAC of a node: derived from its name, so a restarted node keeps
/// it and peers need not be told. Locally administered, unicast.
pub fn vtep_mac(node_name: &str) -> MacAddr {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"weft-vtep:".iter().chain(node_name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_stable_unicast_and_local() {
        let a = vtep_mac("host-1");
        assert_eq!(a, vtep_mac("host-1"));
        assert_ne!(a, vtep_mac("host-2"));
        assert!(a.is_unicast());
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered");
        // A compatibility pin, not a computation: if the derivation ever
        // changes, every node gets a new MAC on upgrade and every peer's
        // FDB goes stale until it re-reads the leases.
        assert_eq!(vtep_mac("host-1").to_string(), "ae:3a:9f:f9:3f:b3");
        let many: std::collections::HashSet<_> = (0..10_000)
            .map(|i| vtep_mac(&format!("node-{i}")))
            .collect();
        assert_eq!(many.len(), 10_000);
    }
}
