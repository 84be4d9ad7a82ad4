//! Subnet keys, flannel's encoding of a lease's subnet(s) in an etcd key:
//! `10.244.3.0-24`, or `10.244.3.0-24&fd77::-64` for dual stack, or
//! `0.0.0.0-0&fd77::-64` for IPv6 only.

use ipnet::{Ipv4Net, Ipv6Net};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use thiserror::Error;
use weft_config::cidr;

/// The subnet(s) one lease holds; at least one family is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    ipv4: Option<Ipv4Net>,
    ipv6: Option<Ipv6Net>,
}

/// Why a key or subnet text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("{0:?} is not a subnet key (expected e.g. 10.244.3.0-24 or 10.244.3.0-24&fd77::-64)")]
    Malformed(String),
    #[error("{0} has host bits set; the subnet starts at {1}")]
    HostBits(String, String),
    #[error("a subnet key needs an IPv4 or an IPv6 subnet")]
    Empty,
}

impl SubnetKey {
    /// A key for the given subnets; host bits must be clear.
    pub fn new(ipv4: Option<Ipv4Net>, ipv6: Option<Ipv6Net>) -> Result<Self, KeyError> {
        if ipv4.is_none() && ipv6.is_none() {
            return Err(KeyError::Empty);
        }
        if let Some(n) = ipv4 {
            if n.addr() != n.network() {
                return Err(KeyError::HostBits(n.to_string(), n.trunc().to_string()));
            }
        }
        if let Some(n) = ipv6 {
            if n.addr() != n.network() {
                return Err(KeyError::HostBits(n.to_string(), n.trunc().to_string()));
            }
        }
        Ok(SubnetKey { ipv4, ipv6 })
    }

    /// An IPv4-only key.
    pub fn v4(net: Ipv4Net) -> Self {
        SubnetKey {
            ipv4: Some(net.trunc()),
            ipv6: None,
        }
    }

    /// The IPv4 subnet, if any.
    pub fn ipv4(&self) -> Option<Ipv4Net> {
        self.ipv4
    }

    /// The IPv6 subnet, if any.
    pub fn ipv6(&self) -> Option<Ipv6Net> {
        self.ipv6
    }

    /// The part of the key that names the IPv4 subnet (`10.244.3.0-24`). Two
    /// keys with the same IPv4 part hold the same IPv4 subnet.
    pub fn ipv4_part(&self) -> Option<String> {
        self.ipv4
            .map(|n| format!("{}-{}", n.network(), n.prefix_len()))
    }

    /// Parses CIDR text as people write it: `10.244.3.0/24`, optionally
    /// `,fd77::/64` for dual stack. Host bits are dropped, so `10.244.3.1/24`
    /// (the form in subnet.env) names `10.244.3.0/24`.
    pub fn from_cidrs(text: &str) -> Result<Self, KeyError> {
        let mut ipv4 = None;
        let mut ipv6 = None;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(n) = cidr::parse_v4(part) {
                if ipv4.replace(n.trunc()).is_some() {
                    return Err(KeyError::Malformed(text.into()));
                }
            } else if let Some(n) = cidr::parse_v6(part) {
                if ipv6.replace(n.trunc()).is_some() {
                    return Err(KeyError::Malformed(text.into()));
                }
            } else {
                return Err(KeyError::Malformed(text.into()));
            }
        }
        SubnetKey::new(ipv4, ipv6)
    }

    /// The subnets as CIDR text: `10.244.3.0/24` or `10.244.3.0/24,fd77::/64`.
    pub fn to_cidrs(&self) -> String {
        match (self.ipv4, self.ipv6) {
            (Some(a), Some(b)) => format!("{a},{b}"),
            (Some(a), None) => a.to_string(),
            (None, Some(b)) => b.to_string(),
            (None, None) => String::new(),
        }
    }
}

impl fmt::Display for SubnetKey {
    /// flannel's key form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv4 {
            Some(n) => write!(f, "{}-{}", n.network(), n.prefix_len())?,
            None => f.write_str("0.0.0.0-0")?,
        }
        if let Some(n) = self.ipv6 {
            write!(f, "&{}-{}", n.network(), n.prefix_len())?;
        }
        Ok(())
    }
}

fn split_net(part: &str) -> Option<(&str, u8)> {
    let (ip, len) = part.rsplit_once('-')?;
    // flannel reads the length with strconv.ParseUint: leading zeros are
    // fine. A key spelled `-024` names the subnet of `-24`, and must count
    // as taken like it, not be skipped as unreadable.
    Some((ip, weft_config::cidr::prefix_len(len, 128)?))
}

impl FromStr for SubnetKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::Malformed(s.to_string());
        let (v4, v6) = match s.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let (ip, len) = split_net(v4).ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let ipv4 = if ip.is_unspecified() && len == 0 {
            None
        } else {
            Some(Ipv4Net::new(ip, len).map_err(|_| bad())?)
        };
        let ipv6 = match v6 {
            None => None,
            Some(part) => {
                let (ip, len) = split_net(part).ok_or_else(bad)?;
                let ip = ip.parse().map_err(|_| bad())?;
                Some(Ipv6Net::new(ip, len).map_err(|_| bad())?)
            }
        };
        SubnetKey::new(ipv4, ipv6)
    }
}

serde_as_text!(SubnetKey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for text in [
            "10.244.3.0-24",
            "10.244.3.0-24&fd77::-64",
            "0.0.0.0-0&fd77:0:0:5::-64",
            "10.0.0.0-30",
            "10.244.3.0-24&fd77:1:2:3::-64",
        ] {
            let key: SubnetKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
    }

    #[test]
    fn a_length_with_leading_zeros_names_the_same_subnet() {
        // As flannel reads it: the subnet counts as taken, whichever key
        // spelling holds it.
        let odd: SubnetKey = "10.244.3.0-024".parse().unwrap();
        assert_eq!(odd, "10.244.3.0-24".parse().unwrap());
        assert_eq!(odd.to_string(), "10.244.3.0-24");
    }

    #[test]
    fn parts_and_cidrs() {
        let key: SubnetKey = "10.244.3.0-24&fd77::-64".parse().unwrap();
        assert_eq!(key.ipv4().unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(key.ipv6().unwrap().to_string(), "fd77::/64");
        assert_eq!(key.ipv4_part().unwrap(), "10.244.3.0-24");
        assert_eq!(key.to_cidrs(), "10.244.3.0/24,fd77::/64");
        assert_eq!(
            SubnetKey::from_cidrs("10.244.3.0/24,fd77::/64").unwrap(),
            key
        );
        assert_eq!(
            SubnetKey::from_cidrs("10.244.3.1/24").unwrap().to_string(),
            "10.244.3.0-24"
        );
        let v6only: SubnetKey = "0.0.0.0-0&fd77::-64".parse().unwrap();
        assert_eq!(v6only.ipv4(), None);
        assert_eq!(v6only.ipv4_part(), None);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "10.244.3.0",
            "10.244.3.0-",
            "10.244.3.0-33",
            "10.244.3.0-24&",
            "10.244.3.0-24&fd77::",
            "10.244.3.0-24&fd77::-129",
            "10.244.3.0/24",
            "x.244.3.0-24",
            "10.244.3.1-24",
            "10.244.3.0-24-1",
            "10.244.3.0--24",
            "0.0.0.0-0",
            "10.244.3.0-+24",
            "010.244.3.0-24",
            "10.244.3.0-24&fd77::-+64",
        ] {
            assert!(
                bad.parse::<SubnetKey>().is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert!(SubnetKey::from_cidrs("10.0.0.0/24,10.1.0.0/24").is_err());
        assert!(SubnetKey::from_cidrs("nonsense").is_err());
        assert!(SubnetKey::from_cidrs("010.244.3.0/24").is_err());
    }
}
