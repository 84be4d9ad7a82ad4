//! VXLAN devices (`weft.<VNI>`): what identifies one, how one is made,
//! and how one is read back. Devices as a whole (create, update, delete,
//! objects going with them) are [`super::link`].

use crate::dataplane::Failure;
use crate::netlink::{link_mac, link_mtu, nl_err, Applying};
use crate::state::{dev, Dev};
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkFlags, LinkMessage};
use rtnetlink::LinkVxlan;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use weft_lease::MacAddr;

/// Name prefix of the VXLAN devices weft owns (`weft.<VNI>`).
pub const VXLAN_PREFIX: &str = "weft.";

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

    /// `ip link add` of this device, for logs.
    pub(crate) fn command(&self, name: &Dev) -> String {
        format!(
            "ip link add {name} type vxlan id {} dstport {} local {} nolearning (mtu {})",
            self.vni, self.port, self.local, self.mtu
        )
    }

    /// Makes the device.
    pub(crate) async fn create(&self, name: &Dev, k: &Applying<'_>) -> Result<(), Failure> {
        let mut b = LinkVxlan::new(name, self.vni)
            .port(self.port)
            .learning(self.learning)
            .mtu(self.mtu)
            .address(self.mac.0.to_vec());
        b = match self.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        if let Some(u) = &self.underlay {
            b = b.dev(k.index(u)?);
        }
        if self.up {
            b = b.up();
        }
        k.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(nl_err)
    }

    /// The VXLAN settings of a link whose kind is vxlan, with `data` its
    /// kind's attributes. `names`: every device's name by index.
    pub(crate) fn read(
        l: &LinkMessage,
        data: &InfoData,
        names: &HashMap<u32, Dev>,
    ) -> Option<VxlanLink> {
        let InfoData::Vxlan(data) = data else {
            return None;
        };
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
}
