//! Permanent neighbours on weft's devices: a peer's tunnel address and
//! the MAC of its VXLAN device.

use super::{no_device, Kind, Table};
use crate::dataplane::Failure;
use crate::netlink::{family_of, ignore_gone, mac_of, neigh_addr, nl_err, Applying};
use crate::state::{Change, Dev, NetState};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_lease::MacAddr;

/// A neighbour: (device, IP) -> MAC.
#[derive(Debug)]
pub struct Neighbour;

impl Kind for Neighbour {
    type Key = (Dev, IpAddr);
    type Value = MacAddr;

    fn table(st: &NetState) -> &Table<Self> {
        &st.neighbours
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.neighbours
    }
    fn dev<'a>((dev, _): &'a Self::Key, _: &'a MacAddr) -> Option<&'a Dev> {
        Some(dev)
    }
    fn set((dev, ip): &Self::Key, mac: &MacAddr, _: Option<&MacAddr>, out: &mut Vec<Change>) {
        out.push(Change::Neighbour(NeighbourChange::Set {
            dev: dev.clone(),
            ip: *ip,
            mac: *mac,
        }));
    }
    fn del((dev, ip): &Self::Key, _: &MacAddr) -> Change {
        Change::Neighbour(NeighbourChange::Del {
            dev: dev.clone(),
            ip: *ip,
        })
    }
}

/// A change to a neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeighbourChange {
    Set { dev: Dev, ip: IpAddr, mac: MacAddr },
    Del { dev: Dev, ip: IpAddr },
}

impl fmt::Display for NeighbourChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NeighbourChange::Set { dev, ip, mac } => write!(
                f,
                "ip neigh replace {ip} lladdr {mac} dev {dev} nud permanent"
            ),
            NeighbourChange::Del { dev, ip } => write!(f, "ip neigh del {ip} dev {dev}"),
        }
    }
}

impl NeighbourChange {
    pub(crate) fn fake(
        &self,
        st: &mut NetState,
        dev_exists: &dyn Fn(&NetState, &str) -> bool,
    ) -> Result<(), Failure> {
        match self {
            NeighbourChange::Set { dev, ip, mac } => {
                if !dev_exists(st, dev) {
                    return Err(no_device());
                }
                st.neighbours.insert((dev.clone(), *ip), *mac);
            }
            NeighbourChange::Del { dev, ip } => {
                st.neighbours.remove(&(dev.clone(), *ip));
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        match self {
            NeighbourChange::Set { dev, ip, mac } => k
                .handle
                .neighbours()
                .add(k.index(dev)?, *ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl_err),
            NeighbourChange::Del { dev, ip } => {
                let Ok(i) = k.index(dev) else { return Ok(()) };
                let mut m = NeighbourMessage::default();
                m.header.family = family_of(*ip);
                m.header.ifindex = i;
                m.attributes
                    .push(NeighbourAttribute::Destination(neigh_addr(*ip)));
                ignore_gone(k.handle.neighbours().del(m).execute().await)
            }
        }
    }
}

/// The IP a neighbour or FDB message is for. FDB entries (AF_BRIDGE)
/// carry the remote VTEP as raw bytes.
pub(crate) fn neigh_ip(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(IpAddr::V4(*v)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => Some(IpAddr::V6(*v)),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            _ => None,
        },
        _ => None,
    })
}

/// The MAC a neighbour or FDB message carries.
pub(crate) fn neigh_mac(n: &NeighbourMessage) -> Option<MacAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => mac_of(b),
        _ => None,
    })
}

/// Reads one neighbour message into `st` if it is a permanent one on a
/// weft device (`owned`, by index).
pub(crate) fn read(
    n: &NeighbourMessage,
    owned: &std::collections::HashMap<u32, Dev>,
    st: &mut NetState,
) {
    let Some(dev) = owned.get(&n.header.ifindex) else {
        return;
    };
    if n.header.state != NeighbourState::Permanent {
        return;
    }
    if let (Some(ip), Some(mac)) = (neigh_ip(n), neigh_mac(n)) {
        st.neighbours.insert((dev.clone(), ip), mac);
    }
}
