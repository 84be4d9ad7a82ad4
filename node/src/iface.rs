//! Choosing the external interface and the public IP, as flannel does:
//! `--iface NAME`, `--iface-regex RE`, the interface holding `--public-ip`,
//! or the interface of the default route.

use ipnet::{IpNet, Ipv4Net};
use regex::Regex;
use std::net::{Ipv4Addr, Ipv6Addr};
use weft_backends::{ExternalIface, Interface};

/// How the operator asked to pick the interface.
#[derive(Debug, Clone)]
pub enum IfaceChoice {
    Name(String),
    Regex(Regex),
    /// The interface holding this address.
    Holding(Ipv4Addr),
    DefaultRoute,
}

/// The interface to use and the address to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub ext: ExternalIface,
    pub public_ip: Ipv4Addr,
    /// The interface's first global IPv6 address, if it has one (published
    /// in a network with IPv6, as flannel's PublicIPv6).
    pub public_ipv6: Option<Ipv6Addr>,
}

fn first_v6(i: &Interface) -> Option<Ipv6Addr> {
    i.addrs.iter().find_map(|a| match a {
        IpNet::V6(n)
            if !n.addr().is_loopback()
                && !n.addr().is_multicast()
                && !n.addr().is_unicast_link_local() =>
        {
            Some(n.addr())
        }
        _ => None,
    })
}

fn first_v4(i: &Interface) -> Option<Ipv4Net> {
    i.addrs.iter().find_map(|a| match a {
        IpNet::V4(n) if !n.addr().is_loopback() && !n.addr().is_link_local() => Some(*n),
        _ => None,
    })
}

fn to_ext(i: &Interface, addr: Ipv4Net) -> ExternalIface {
    ExternalIface {
        name: i.name.as_str().into(),
        index: i.index,
        mtu: i.mtu,
        addr,
    }
}

/// Picks the interface. `public_ip` (from `--public-ip`) overrides the
/// published address, e.g. behind NAT.
pub fn choose(
    ifaces: &[Interface],
    default_route: Option<u32>,
    choice: &IfaceChoice,
    public_ip: Option<Ipv4Addr>,
) -> Result<Chosen, String> {
    let names = || {
        ifaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let iface = match choice {
        IfaceChoice::Name(n) => ifaces
            .iter()
            .find(|i| &i.name == n)
            .ok_or_else(|| format!("--iface {n}: no such interface (have: {})", names()))?,
        IfaceChoice::Regex(re) => ifaces
            .iter()
            .find(|i| re.is_match(&i.name) && first_v4(i).is_some())
            .ok_or_else(|| {
                format!(
                    "--iface-regex {re}: no interface with an IPv4 address matches (have: {})",
                    names()
                )
            })?,
        IfaceChoice::Holding(ip) => ifaces
            .iter()
            .find(|i| {
                i.addrs
                    .iter()
                    .any(|a| a.addr() == std::net::IpAddr::V4(*ip))
            })
            .ok_or_else(|| {
                format!(
                    "--public-ip {ip}: no interface holds it; give --iface too (e.g. behind NAT)"
                )
            })?,
        IfaceChoice::DefaultRoute => {
            let idx = default_route.ok_or_else(|| {
                "no default route to pick the external interface from; give --iface, --iface-regex or --public-ip".to_string()
            })?;
            ifaces
                .iter()
                .find(|i| i.index == idx)
                .ok_or_else(|| format!("the default route's interface (index {idx}) is gone"))?
        }
    };
    if !iface.up {
        return Err(format!("interface {} is down", iface.name));
    }
    let addr = match choice {
        IfaceChoice::Holding(ip) => iface
            .addrs
            .iter()
            .find_map(|a| match a {
                IpNet::V4(n) if n.addr() == *ip => Some(*n),
                _ => None,
            })
            .expect("found above"),
        _ => first_v4(iface)
            .ok_or_else(|| format!("interface {} has no IPv4 address", iface.name))?,
    };
    Ok(Chosen {
        ext: to_ext(iface, addr),
        public_ip: public_ip.unwrap_or(addr.addr()),
        public_ipv6: first_v6(iface),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifaces() -> Vec<Interface> {
        let i = |index, name: &str, up, addrs: &[&str]| Interface {
            index,
            name: name.into(),
            mtu: 1500,
            up,
            mac: None,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        };
        vec![
            i(1, "lo", true, &["127.0.0.1/8"]),
            i(
                2,
                "eth0",
                true,
                &["fe80::1/64", "198.18.0.11/16", "fdc6:7765:6674:18::b/64"],
            ),
            i(3, "eth1", true, &["203.0.113.5/24"]),
            i(4, "eth2", false, &["198.51.100.2/24"]),
            i(5, "bare", true, &[]),
        ]
    }

    #[test]
    fn by_name_regex_address_and_default_route() {
        let all = ifaces();
        let c = choose(&all, None, &IfaceChoice::Name("eth0".into()), None).unwrap();
        assert_eq!(
            (&*c.ext.name, c.public_ip.to_string()),
            ("eth0", "198.18.0.11".into())
        );
        assert_eq!(c.ext.addr.to_string(), "198.18.0.11/16");
        // Not the link-local one.
        assert_eq!(c.public_ipv6, Some("fdc6:7765:6674:18::b".parse().unwrap()));
        let c = choose(
            &all,
            None,
            &IfaceChoice::Regex(Regex::new("^eth[1-9]").unwrap()),
            None,
        )
        .unwrap();
        assert_eq!(&*c.ext.name, "eth1");
        assert_eq!(c.public_ipv6, None);
        let c = choose(
            &all,
            None,
            &IfaceChoice::Holding("203.0.113.5".parse().unwrap()),
            None,
        )
        .unwrap();
        assert_eq!(&*c.ext.name, "eth1");
        let c = choose(&all, Some(2), &IfaceChoice::DefaultRoute, None).unwrap();
        assert_eq!(&*c.ext.name, "eth0");
        // Behind NAT: the interface is eth0, the published address another.
        let c = choose(
            &all,
            None,
            &IfaceChoice::Name("eth0".into()),
            Some("192.88.99.9".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(
            (&*c.ext.name, c.public_ip.to_string()),
            ("eth0", "192.88.99.9".into())
        );
    }

    #[test]
    fn clear_errors() {
        let all = ifaces();
        let e = choose(&all, None, &IfaceChoice::Name("wlan0".into()), None).unwrap_err();
        assert!(e.contains("no such interface") && e.contains("eth0"), "{e}");
        let e = choose(&all, None, &IfaceChoice::DefaultRoute, None).unwrap_err();
        assert!(e.contains("no default route"), "{e}");
        let e = choose(&all, None, &IfaceChoice::Name("eth2".into()), None).unwrap_err();
        assert!(e.contains("down"), "{e}");
        let e = choose(&all, None, &IfaceChoice::Name("bare".into()), None).unwrap_err();
        assert!(e.contains("no IPv4 address"), "{e}");
        let e = choose(
            &all,
            None,
            &IfaceChoice::Holding("198.18.9.9".parse().unwrap()),
            None,
        )
        .unwrap_err();
        assert!(e.contains("no interface holds it"), "{e}");
    }
}
