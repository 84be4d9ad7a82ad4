//! The vxlan backend: one `weft.<VNI>` device; per peer a permanent
//! neighbour (peer subnet address -> peer VTEP MAC), an FDB entry (MAC ->
//! peer public IP) and an onlink route via the peer's subnet address, in
//! flannel's order. With `DirectRouting`, peers on our L2 get a plain route.

use crate::backend::{per_peer_desired, Backend, PerPeer};
use crate::local::{vtep_mac, LocalNode};
use crate::peer::{Claim, Peer, Skipped};
use crate::state::{vxlan_name, Dev, NetState, RouteTarget, VxlanLink};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::IpAddr;
use weft_config::{BackendType, VxlanConfig};
use weft_lease::BackendData;

/// VXLAN over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The vxlan backend.
#[derive(Debug, Clone)]
pub struct Vxlan {
    cfg: VxlanConfig,
    /// `weft.<VNI>`, shared by every object on the device.
    device: Dev,
}

impl Vxlan {
    pub fn new(cfg: VxlanConfig) -> Self {
        Vxlan {
            device: vxlan_name(cfg.vni),
            cfg,
        }
    }

    /// The device name, `weft.<VNI>`.
    pub fn device(&self) -> Dev {
        self.device.clone()
    }
}

impl Backend for Vxlan {
    fn backend_type(&self) -> BackendType {
        BackendType::Vxlan
    }

    fn lease_data(&self, local_name: &str) -> BackendData {
        BackendData::Vxlan {
            vni: self.cfg.vni,
            vtep_mac: vtep_mac(local_name),
        }
    }

    fn pod_mtu(&self, underlay_mtu: u32) -> u32 {
        self.cfg
            .mtu
            .unwrap_or(underlay_mtu.saturating_sub(VXLAN_OVERHEAD))
    }

    fn desired(&self, local: &LocalNode, peers: &[&Peer]) -> (NetState, Vec<Skipped>) {
        per_peer_desired(self, local, peers)
    }

    fn per_peer(&self) -> Option<&dyn PerPeer> {
        Some(self)
    }
}

impl PerPeer for Vxlan {
    fn base(&self, local: &LocalNode) -> NetState {
        let dev = self.device.clone();
        let mut st = NetState::default();
        st.links.insert(
            dev.clone(),
            VxlanLink {
                vni: self.cfg.vni,
                port: self.cfg.port,
                local: IpAddr::V4(local.public_ip),
                mac: local.vtep_mac,
                underlay: Some(local.ext.name.clone()),
                learning: false,
                mtu: self.pod_mtu(local.ext.mtu),
                up: true,
            }
            .into(),
        );
        if let Some(s) = local.subnet.ipv4() {
            st.addresses.insert(
                (
                    dev.clone(),
                    IpNet::V4(Ipv4Net::new(s.network(), 32).expect("/32")),
                ),
                (),
            );
        }
        if let Some(s) = local.subnet.ipv6() {
            st.addresses.insert(
                (
                    dev.clone(),
                    IpNet::V6(Ipv6Net::new(s.network(), 128).expect("/128")),
                ),
                (),
            );
        }
        st
    }

    fn refuse(&self, local: &LocalNode, p: &Peer) -> Option<String> {
        let BackendData::Vxlan { vni, vtep_mac } = &p.backend else {
            return Some("not a vxlan lease".into());
        };
        if *vni != self.cfg.vni {
            return Some(format!("VNI {vni} differs from ours ({})", self.cfg.vni));
        }
        (*vtep_mac == local.vtep_mac).then(|| format!("VTEP MAC {vtep_mac} is ours"))
    }

    fn claims(&self, p: &Peer) -> Option<Claim> {
        match &p.backend {
            BackendData::Vxlan { vtep_mac, .. } => Some(Claim::VtepMac(*vtep_mac)),
            _ => None,
        }
    }

    fn add(&self, local: &LocalNode, ext: &Dev, p: &Peer, st: &mut NetState) {
        let BackendData::Vxlan { vtep_mac, .. } = &p.backend else {
            return;
        };
        let dev = &self.device;
        let direct = self.cfg.direct_routing && local.ext.addr.contains(&p.public_ip);
        let v6 = p.subnet6.filter(|_| local.subnet.ipv6().is_some());
        if let Some(s4) = p.subnet {
            if direct {
                let to = RouteTarget::direct(IpAddr::V4(p.public_ip), ext);
                st.routes.insert(IpNet::V4(s4), to);
            } else {
                let gw = IpAddr::V4(s4.network());
                st.neighbours.insert((dev.clone(), gw), *vtep_mac);
                st.routes
                    .insert(IpNet::V4(s4), RouteTarget::onlink(gw, dev));
            }
        }
        // The FDB entry whenever something goes through the device: IPv4
        // without DirectRouting, or IPv6 (always over VXLAN).
        if (p.subnet.is_some() && !direct) || v6.is_some() {
            st.fdb
                .insert((dev.clone(), *vtep_mac), IpAddr::V4(p.public_ip));
        }
        if let Some(s6) = v6 {
            let gw6 = IpAddr::V6(s6.network());
            st.neighbours.insert((dev.clone(), gw6), *vtep_mac);
            st.routes
                .insert(IpNet::V6(s6), RouteTarget::onlink(gw6, dev));
        }
    }
}
