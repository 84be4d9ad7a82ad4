//! weft's devices, whatever their type: made, updated in place (MTU,
//! up), made again when what identifies them changes, deleted when
//! unwanted. Every object on a device goes with it ([`super::Kind::dev`]).
//! What a type of device is lives in its own module ([`super::vxlan`]).

use super::vxlan::{VxlanLink, VXLAN_PREFIX};
use super::wireguard::WG_NAMES;
use crate::dataplane::{Errno, Failure};
use crate::netlink::{ignore_gone, link_name, nl_err, Applying};
use crate::state::{dev, Change, Dev, NetState};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{LinkUnspec, LinkWireguard};
use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// A device weft owns, or one that has a weft name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Vxlan(VxlanLink),
    /// Its key, port and peers are [`super::wireguard`]'s.
    Wireguard(WgLink),
    /// A device with one of weft's names (`weft.<vni>`, `weft-wg`,
    /// `weft-wg-v6`) that is not of the type weft makes under it, such as a
    /// `dummy` someone made by hand: what it is. Nothing is ever programmed
    /// onto it; it is deleted when weft needs the name (as flannel does),
    /// and otherwise left alone. Only the kernel read-back has these.
    Foreign(String),
}

/// A WireGuard device: nothing identifies it but its name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgLink {
    pub mtu: u32,
    pub up: bool,
}

impl Link {
    pub fn mtu(&self) -> u32 {
        match self {
            Link::Vxlan(v) => v.mtu,
            Link::Wireguard(w) => w.mtu,
            Link::Foreign(_) => 0,
        }
    }

    pub fn up(&self) -> bool {
        match self {
            Link::Vxlan(v) => v.up,
            Link::Wireguard(w) => w.up,
            Link::Foreign(_) => false,
        }
    }

    /// What a device with a weft name is, when weft did not make it.
    pub fn foreign(&self) -> Option<&str> {
        match self {
            Link::Foreign(what) => Some(what),
            _ => None,
        }
    }

    /// Whether `other` can become `self` without recreating the device.
    pub fn same_identity(&self, other: &Link) -> bool {
        match (self, other) {
            (Link::Vxlan(a), Link::Vxlan(b)) => a.same_identity(b),
            (Link::Wireguard(_), Link::Wireguard(_)) => true,
            _ => false,
        }
    }

    /// The VXLAN device's settings, if it is one.
    pub fn vxlan(&self) -> Option<&VxlanLink> {
        match self {
            Link::Vxlan(v) => Some(v),
            _ => None,
        }
    }

    pub fn vxlan_mut(&mut self) -> Option<&mut VxlanLink> {
        match self {
            Link::Vxlan(v) => Some(v),
            _ => None,
        }
    }

    fn set_mtu_up(&mut self, mtu: u32, up: bool) {
        match self {
            Link::Vxlan(v) => {
                v.mtu = mtu;
                v.up = up;
            }
            Link::Wireguard(w) => {
                w.mtu = mtu;
                w.up = up;
            }
            Link::Foreign(_) => {}
        }
    }
}

impl From<VxlanLink> for Link {
    fn from(v: VxlanLink) -> Self {
        Link::Vxlan(v)
    }
}

/// A change to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    Create {
        name: Dev,
        link: Link,
    },
    Delete {
        name: Dev,
        /// What the device is when weft did not make it ([`Link::Foreign`]):
        /// it is deleted because weft needs its name.
        foreign: Option<String>,
    },
    /// MTU or admin state of an existing device.
    Update {
        name: Dev,
        mtu: u32,
        up: bool,
    },
}

impl fmt::Display for LinkChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkChange::Create { name, link } => match link {
                Link::Vxlan(v) => f.write_str(&v.command(name)),
                Link::Wireguard(w) => write!(f, "ip link add {name} mtu {} type wireguard", w.mtu),
                Link::Foreign(what) => write!(f, "ip link add {name} type {what}"),
            },
            LinkChange::Delete {
                name,
                foreign: None,
            } => write!(f, "ip link del {name}"),
            LinkChange::Delete {
                name,
                foreign: Some(what),
            } => write!(
                f,
                "ip link del {name} (a {what} device weft did not make, in the way of weft's)"
            ),
            LinkChange::Update { name, mtu, up } => write!(
                f,
                "ip link set {name} mtu {mtu} {}",
                if *up { "up" } else { "down" }
            ),
        }
    }
}

/// Adds to `out` what makes `desired`'s devices exist as they are there;
/// returns the devices made (again) in this pass: whatever was on them
/// before is gone, and is made again.
pub(crate) fn add(desired: &NetState, observed: &NetState, out: &mut Vec<Change>) -> BTreeSet<Dev> {
    let mut made = BTreeSet::new();
    let create = |name: &Dev, link: &Link| {
        Change::Link(LinkChange::Create {
            name: name.clone(),
            link: link.clone(),
        })
    };
    for (name, want) in &desired.links {
        match observed.links.get(name) {
            None => {
                out.push(create(name, want));
                made.insert(name.clone());
            }
            Some(have) if !want.same_identity(have) => {
                out.push(Change::Link(LinkChange::Delete {
                    name: name.clone(),
                    foreign: have.foreign().map(str::to_owned),
                }));
                out.push(create(name, want));
                made.insert(name.clone());
            }
            Some(have) if have.mtu() != want.mtu() || have.up() != want.up() => {
                out.push(Change::Link(LinkChange::Update {
                    name: name.clone(),
                    mtu: want.mtu(),
                    up: want.up(),
                }))
            }
            Some(_) => {}
        }
    }
    made
}

/// Adds to `out` the deletion of `observed`'s devices that `desired` does
/// not have (but for those weft did not make). Deleting a device removes
/// everything on it.
pub(crate) fn remove(desired: &NetState, observed: &NetState, out: &mut Vec<Change>) {
    for (name, link) in &observed.links {
        if !desired.links.contains_key(name) && link.foreign().is_none() {
            out.push(Change::Link(LinkChange::Delete {
                name: name.clone(),
                foreign: None,
            }));
        }
    }
}

impl LinkChange {
    pub(crate) fn fake(&self, st: &mut NetState) -> Result<(), Failure> {
        match self {
            LinkChange::Create { name, link } => {
                if st.links.contains_key(name) {
                    return Err(Failure::of(Errno::EEXIST));
                }
                st.links.insert(name.clone(), link.clone());
            }
            LinkChange::Delete { name, .. } => {
                st.links.remove(name).ok_or(Failure::of(Errno::ENODEV))?;
                st.drop_objects_on(name);
            }
            LinkChange::Update { name, mtu, up } => {
                st.links
                    .get_mut(name)
                    .ok_or(Failure::of(Errno::ENODEV))?
                    .set_mtu_up(*mtu, *up);
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        let h = k.handle;
        match self {
            LinkChange::Create { name, link } => match link {
                Link::Vxlan(v) => v.create(name, k).await,
                Link::Foreign(what) => Err(Failure::other(format!(
                    "weft makes no {what} device (a read-back type, never wanted)"
                ))),
                Link::Wireguard(w) => {
                    let mut b = LinkWireguard::new(name).mtu(w.mtu);
                    if w.up {
                        b = b.up();
                    }
                    h.link().add(b.build()).execute().await.map_err(|e| {
                        match crate::netlink::errno_of(&e) {
                            Some(Errno::EOPNOTSUPP) => Failure::with(
                                Errno::EOPNOTSUPP,
                                "the kernel has no WireGuard (module wireguard)",
                            ),
                            _ => nl_err(e),
                        }
                    })
                }
            },
            LinkChange::Delete { name, .. } => match k.idx.get(&**name) {
                None => Ok(()),
                Some(i) => ignore_gone(h.link().del(*i).execute().await),
            },
            LinkChange::Update { name, mtu, up } => {
                let b = LinkUnspec::new_with_index(k.index(name)?).mtu(*mtu);
                let b = if *up { b.up() } else { b.down() };
                h.link().set(b.build()).execute().await.map_err(nl_err)
            }
        }
    }
}

/// Reads weft's devices among `links` into `st` (and devices with a weft
/// name that weft did not make, as [`Link::Foreign`]); returns weft's by
/// index (objects are read on those only). `names`: every device's name by
/// index.
pub(crate) fn read(
    links: &[LinkMessage],
    names: &HashMap<u32, Dev>,
    st: &mut NetState,
) -> HashMap<u32, Dev> {
    let mut owned = HashMap::new();
    for l in links {
        let Some((name, link)) = classify(l, names) else {
            continue;
        };
        let name = dev(&name);
        if link.foreign().is_none() {
            owned.insert(l.header.index, name.clone());
        }
        st.links.insert(name, link);
    }
    owned
}

/// Devices with a weft name that weft did not make, by name: what each is.
pub(crate) fn foreign(links: &[LinkMessage]) -> HashMap<String, String> {
    let names = HashMap::new();
    links
        .iter()
        .filter_map(|l| match classify(l, &names)? {
            (name, Link::Foreign(what)) => Some((name, what)),
            _ => None,
        })
        .collect()
}

/// `l` as weft sees it, if it has one of weft's names.
fn classify(l: &LinkMessage, names: &HashMap<u32, Dev>) -> Option<(String, Link)> {
    let name = link_name(l)?;
    let vxlan = name.starts_with(VXLAN_PREFIX);
    let wg = WG_NAMES.contains(&name.as_str());
    if !vxlan && !wg {
        return None;
    }
    let infos: &[LinkInfo] = l
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.as_slice()),
            _ => None,
        })
        .unwrap_or_default();
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    });
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(d) => Some(d),
        _ => None,
    });
    let link = match (kind, data) {
        (Some(InfoKind::Vxlan), Some(d)) if vxlan => VxlanLink::read(l, d, names).map(Link::Vxlan),
        (Some(InfoKind::Wireguard), _) if wg => Some(Link::Wireguard(WgLink {
            mtu: crate::netlink::link_mtu(l),
            up: l
                .header
                .flags
                .contains(netlink_packet_route::link::LinkFlags::Up),
        })),
        _ => None,
    };
    let link = link.unwrap_or_else(|| {
        Link::Foreign(match kind {
            Some(k) => k.to_string(),
            None => "typeless (physical?)".to_owned(),
        })
    });
    Some((name, link))
}
