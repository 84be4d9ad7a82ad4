//! CIDR text as flannel reads it (Go's `net.ParseCIDR`): an address in
//! standard form (no leading zeros in an octet, no zone), one `/`, and a
//! decimal prefix length (digits only: no sign, no space).
//!
//! Etcd values, subnet.env and CNI results are written by others (every
//! flannel node in a shared keyspace can write the config), so weft reads
//! them no more loosely than flannel does: a value one of them takes for a
//! network the other refuses, or reads as another network, would split the
//! cluster. `ipnet`'s own parser accepts octets with leading zeros
//! (`010.244.0.0/16`, which older parsers read as octal); std's address
//! parsers do not.

use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Parses `10.244.0.0/16`. Host bits are kept (`10.244.3.1/24` is the form
/// subnet.env uses); call `trunc()` for the network.
pub fn parse_v4(text: &str) -> Option<Ipv4Net> {
    let (addr, len) = split(text, 32)?;
    Ipv4Net::new(addr.parse::<Ipv4Addr>().ok()?, len).ok()
}

/// Parses `fd77::/48`, as [`parse_v4`].
pub fn parse_v6(text: &str) -> Option<Ipv6Net> {
    let (addr, len) = split(text, 128)?;
    Ipv6Net::new(addr.parse::<Ipv6Addr>().ok()?, len).ok()
}

/// serde for `Option<Ipv4Net>` / `Option<Ipv6Net>` fields read through
/// [`parse_v4`] / [`parse_v6`] (`#[serde(with = "cidr::opt_v4")]`).
macro_rules! opt_serde {
    ($module:ident, $net:ty, $parse:path, $what:literal) => {
        #[doc = concat!("serde for `Option<", stringify!($net), ">` through strict parsing.")]
        pub mod $module {
            use serde::{Deserialize, Deserializer, Serializer};

            pub fn serialize<S: Serializer>(v: &Option<$net>, s: S) -> Result<S::Ok, S::Error> {
                match v {
                    Some(n) => s.collect_str(n),
                    None => s.serialize_none(),
                }
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$net>, D::Error> {
                match Option::<String>::deserialize(d)? {
                    None => Ok(None),
                    Some(text) => $parse(&text).map(Some).ok_or_else(|| {
                        serde::de::Error::custom(format!(concat!("{:?} is not ", $what), text))
                    }),
                }
            }
        }
    };
}
opt_serde!(opt_v4, ipnet::Ipv4Net, super::parse_v4, "an IPv4 CIDR");
opt_serde!(opt_v6, ipnet::Ipv6Net, super::parse_v6, "an IPv6 CIDR");

fn split(text: &str, max: u8) -> Option<(&str, u8)> {
    let (addr, len) = text.split_once('/')?;
    Some((addr, prefix_len(len, max)?))
}

/// A prefix length as Go reads it (`dtoi`): decimal digits only (no sign,
/// no space); leading zeros are fine (`016` is 16).
pub fn prefix_len(text: &str, max: u8) -> Option<u8> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = text.trim_start_matches('0');
    if digits.len() > 3 {
        return None;
    }
    let len: u16 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    u8::try_from(len).ok().filter(|l| *l <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_go_reads() {
        assert_eq!(
            parse_v4("10.244.0.0/16").unwrap().to_string(),
            "10.244.0.0/16"
        );
        assert_eq!(
            parse_v4("10.244.3.1/24").unwrap().to_string(),
            "10.244.3.1/24"
        );
        assert_eq!(parse_v4("0.0.0.0/0").unwrap().prefix_len(), 0);
        assert_eq!(parse_v4("10.0.0.1/32").unwrap().prefix_len(), 32);
        assert_eq!(parse_v6("fd77::/48").unwrap().to_string(), "fd77::/48");
        assert_eq!(parse_v6("fd77:0:0:5::1/64").unwrap().prefix_len(), 64);
        // Go's dtoi takes leading zeros in the length.
        assert_eq!(
            parse_v4("10.244.0.0/016").unwrap().to_string(),
            "10.244.0.0/16"
        );
        assert_eq!(parse_v4("10.244.0.0/0000016").unwrap().prefix_len(), 16);
        assert_eq!(parse_v6("fd77::/048").unwrap().prefix_len(), 48);
    }

    #[test]
    fn serde_fields_parse_strictly() {
        #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
        struct View {
            #[serde(with = "opt_v4", default)]
            subnet: Option<Ipv4Net>,
            #[serde(with = "opt_v6", default)]
            ipv6: Option<Ipv6Net>,
        }
        let v: View =
            serde_json::from_str(r#"{"subnet":"10.244.3.0/24","ipv6":"fd77::/64"}"#).unwrap();
        assert_eq!(v.subnet.unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"subnet":"10.244.3.0/24","ipv6":"fd77::/64"}"#
        );
        let none: View = serde_json::from_str(r#"{"subnet":null}"#).unwrap();
        assert_eq!(
            none,
            View {
                subnet: None,
                ipv6: None
            }
        );
        let e = serde_json::from_str::<View>(r#"{"subnet":"010.244.3.0/24"}"#).unwrap_err();
        assert!(e.to_string().contains("is not an IPv4 CIDR"), "{e}");
    }

    #[test]
    fn refuses_what_go_refuses() {
        for bad in [
            "10.244.0.0",
            "10.244.0.0/",
            "10.244.0.0/255.255.0.0",
            "10.244.0.0/+16",
            "10.244.0.0/-16",
            "10.244.0.0/ 16",
            "10.244.0.0/16 ",
            "10.244.0.0/33",
            "10.244.0.0/1000",
            "010.244.0.0/16",
            "10.244.0.00/16",
            "10.244.0/16",
            "10.244.0.0/16/8",
            "fd77::/48",
            "",
        ] {
            assert_eq!(parse_v4(bad), None, "{bad:?}");
        }
        for bad in [
            "fd77::",
            "fd77::/+48",
            "fd77::/0129",
            "fd77::/129",
            "fd77::%eth0/48",
            "10.0.0.0/8",
        ] {
            assert_eq!(parse_v6(bad), None, "{bad:?}");
        }
    }
}
