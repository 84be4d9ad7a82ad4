//! FDB entries on weft's VXLAN devices: a peer's VTEP MAC and the public
//! IP its tunnel packets go to.

use super::neighbour::{neigh_ip, neigh_mac};
use super::{no_device, Kind, Table};
use crate::dataplane::Failure;
use crate::netlink::{ignore_gone, neigh_addr, nl_err, Applying};
use crate::state::{Change, Dev, NetState};
use netlink_packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use std::fmt;
use std::net::IpAddr;
use weft_lease::MacAddr;

/// An FDB entry: (device, MAC) -> remote VTEP.
#[derive(Debug)]
pub struct Fdb;

impl Kind for Fdb {
    type Key = (Dev, MacAddr);
    type Value = IpAddr;

    fn table(st: &NetState) -> &Table<Self> {
        &st.fdb
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.fdb
    }
    fn dev<'a>((dev, _): &'a Self::Key, _: &'a IpAddr) -> Option<&'a Dev> {
        Some(dev)
    }
    fn set((dev, mac): &Self::Key, dst: &IpAddr, _: Option<&IpAddr>, out: &mut Vec<Change>) {
        out.push(Change::Fdb(FdbChange::Set {
            dev: dev.clone(),
            mac: *mac,
            dst: *dst,
        }));
    }
    fn del((dev, mac): &Self::Key, dst: &IpAddr) -> Change {
        Change::Fdb(FdbChange::Del {
            dev: dev.clone(),
            mac: *mac,
            dst: *dst,
        })
    }
}

/// A change to an FDB entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdbChange {
    Set { dev: Dev, mac: MacAddr, dst: IpAddr },
    Del { dev: Dev, mac: MacAddr, dst: IpAddr },
}

impl fmt::Display for FdbChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FdbChange::Set { dev, mac, dst } => write!(
                f,
                "bridge fdb replace {mac} dev {dev} dst {dst} self permanent"
            ),
            FdbChange::Del { dev, mac, dst } => {
                write!(f, "bridge fdb del {mac} dev {dev} dst {dst} self")
            }
        }
    }
}

impl FdbChange {
    pub(crate) fn fake(
        &self,
        st: &mut NetState,
        dev_exists: &dyn Fn(&NetState, &str) -> bool,
    ) -> Result<(), Failure> {
        match self {
            FdbChange::Set { dev, mac, dst } => {
                if !dev_exists(st, dev) {
                    return Err(no_device());
                }
                st.fdb.insert((dev.clone(), *mac), *dst);
            }
            FdbChange::Del { dev, mac, .. } => {
                st.fdb.remove(&(dev.clone(), *mac));
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        match self {
            FdbChange::Set { dev, mac, dst } => k
                .handle
                .neighbours()
                .add_bridge(k.index(dev)?, &mac.0)
                .destination(*dst)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl_err),
            FdbChange::Del { dev, mac, dst } => {
                let Ok(i) = k.index(dev) else { return Ok(()) };
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = i;
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(neigh_addr(*dst)));
                ignore_gone(k.handle.neighbours().del(m).execute().await)
            }
        }
    }
}

/// Reads one AF_BRIDGE neighbour message into `st` if it is on a weft
/// device (`owned`, by index).
pub(crate) fn read(
    n: &NeighbourMessage,
    owned: &std::collections::HashMap<u32, Dev>,
    st: &mut NetState,
) {
    let Some(dev) = owned.get(&n.header.ifindex) else {
        return;
    };
    if let (Some(ip), Some(mac)) = (neigh_ip(n), neigh_mac(n)) {
        st.fdb.insert((dev.clone(), mac), ip);
    }
}
