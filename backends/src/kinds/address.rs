//! Addresses on weft's devices (the subnet's first address on a tunnel
//! device, so the host answers from it).

use super::{no_device, Kind, Table};
use crate::dataplane::Failure;
use crate::netlink::{family_of, ignore_gone, nl_err, Applying};
use crate::state::{Change, Dev, NetState};
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use std::fmt;
use std::net::IpAddr;

/// An address: (device, address with prefix).
#[derive(Debug)]
pub struct Address;

impl Kind for Address {
    type Key = (Dev, IpNet);
    type Value = ();

    fn table(st: &NetState) -> &Table<Self> {
        &st.addresses
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.addresses
    }
    fn dev<'a>((dev, _): &'a Self::Key, _: &'a ()) -> Option<&'a Dev> {
        Some(dev)
    }
    fn set((dev, addr): &Self::Key, _: &(), _: Option<&()>, out: &mut Vec<Change>) {
        out.push(Change::Address(AddressChange::Add {
            dev: dev.clone(),
            addr: *addr,
        }));
    }
    fn del((dev, addr): &Self::Key, _: &()) -> Change {
        Change::Address(AddressChange::Del {
            dev: dev.clone(),
            addr: *addr,
        })
    }
}

/// A change to an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressChange {
    Add { dev: Dev, addr: IpNet },
    Del { dev: Dev, addr: IpNet },
}

impl fmt::Display for AddressChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressChange::Add { dev, addr } => write!(f, "ip addr add {addr} dev {dev}"),
            AddressChange::Del { dev, addr } => write!(f, "ip addr del {addr} dev {dev}"),
        }
    }
}

impl AddressChange {
    pub(crate) fn fake(
        &self,
        st: &mut NetState,
        dev_exists: &dyn Fn(&NetState, &str) -> bool,
    ) -> Result<(), Failure> {
        match self {
            AddressChange::Add { dev, addr } => {
                if !dev_exists(st, dev) {
                    return Err(no_device());
                }
                st.addresses.insert((dev.clone(), *addr), ());
            }
            AddressChange::Del { dev, addr } => {
                st.addresses.remove(&(dev.clone(), *addr));
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        match self {
            AddressChange::Add { dev, addr } => k
                .handle
                .address()
                .add(k.index(dev)?, addr.addr(), addr.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(nl_err),
            AddressChange::Del { dev, addr } => {
                let Ok(i) = k.index(dev) else { return Ok(()) };
                let mut m = AddressMessage::default();
                m.header.family = family_of(addr.addr());
                m.header.prefix_len = addr.prefix_len();
                m.header.index = i;
                m.attributes.push(AddressAttribute::Local(addr.addr()));
                m.attributes.push(AddressAttribute::Address(addr.addr()));
                ignore_gone(k.handle.address().del(m).execute().await)
            }
        }
    }
}

/// The address a message carries (its local one, on a point-to-point
/// device).
pub(crate) fn address_ip(a: &AddressMessage) -> Option<IpAddr> {
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// Reads the addresses on weft's devices (`owned`, by index) into `st`.
pub(crate) fn read(
    messages: &[AddressMessage],
    owned: &std::collections::HashMap<u32, Dev>,
    st: &mut NetState,
) {
    for a in messages {
        if let (Some(dev), Some(ip)) = (owned.get(&a.header.index), address_ip(a)) {
            // The kernel adds an IPv6 link-local address itself.
            if matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
                continue;
            }
            if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                st.addresses.insert((dev.clone(), net), ());
            }
        }
    }
}
