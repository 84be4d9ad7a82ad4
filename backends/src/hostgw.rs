//! The host-gw backend: per peer a route to its subnet via its public IP on
//! the external interface. Every node must be on the same L2.

use crate::backend::{per_peer_desired, Backend, PerPeer};
use crate::local::LocalNode;
use crate::peer::{Claim, Peer, Skipped};
use crate::state::{Dev, NetState, RouteTarget};
use ipnet::IpNet;
use std::net::IpAddr;
use weft_config::BackendType;
use weft_lease::BackendData;

/// The host-gw backend.
#[derive(Debug, Clone, Copy)]
pub struct HostGw;

impl Backend for HostGw {
    fn backend_type(&self) -> BackendType {
        BackendType::HostGw
    }

    fn lease_data(&self, _local_name: &str) -> BackendData {
        BackendData::HostGw
    }

    fn pod_mtu(&self, underlay_mtu: u32) -> u32 {
        underlay_mtu
    }

    fn desired(&self, local: &LocalNode, peers: &[&Peer]) -> (NetState, Vec<Skipped>) {
        per_peer_desired(self, local, peers)
    }

    fn per_peer(&self) -> Option<&dyn PerPeer> {
        Some(self)
    }
}

impl PerPeer for HostGw {
    fn base(&self, _local: &LocalNode) -> NetState {
        NetState::default()
    }

    fn refuse(&self, local: &LocalNode, p: &Peer) -> Option<String> {
        if local.network.ipv4.is_none() && p.public_ipv6.is_none() {
            return Some(
                "no public IPv6 address, and host-gw routes an IPv6-only network via it".into(),
            );
        }
        (!local.ext.addr.contains(&p.public_ip)).then(|| {
            format!(
                "public IP {} is not directly reachable from {} ({}); host-gw needs every node on one L2 (use vxlan otherwise)",
                p.public_ip, local.ext.name, local.ext.addr
            )
        })
    }

    fn claims(&self, _p: &Peer) -> Option<Claim> {
        None
    }

    fn add(&self, local: &LocalNode, ext: &Dev, p: &Peer, st: &mut NetState) {
        let direct = |via| RouteTarget::direct(via, ext);
        if let Some(s4) = p.subnet {
            st.routes
                .insert(IpNet::V4(s4), direct(IpAddr::V4(p.public_ip)));
        }
        // IPv6 only in a network with IPv6, where the subnet was checked.
        if let (Some(s6), Some(ip6), Some(_)) = (p.subnet6, p.public_ipv6, local.subnet.ipv6()) {
            st.routes.insert(IpNet::V6(s6), direct(IpAddr::V6(ip6)));
        }
    }
}
