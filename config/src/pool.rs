//! The range of subnets a network hands out: `SubnetMin..=SubnetMax` in
//! steps of `SubnetLen`, for one address family.

use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

/// One address family's subnet range, already validated: `min` and `max`
/// are aligned to `subnet_len`, inside `network`, and `min <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool<N: Family> {
    network: N::Net,
    subnet_len: u8,
    min: N::Addr,
    max: N::Addr,
}

/// The IPv4 subnet pool of a network.
pub type Ipv4Pool = SubnetPool<V4>;
/// The IPv6 subnet pool of a network.
pub type Ipv6Pool = SubnetPool<V6>;

/// An address family, as the arithmetic the pool needs.
pub trait Family: Copy + std::fmt::Debug + PartialEq + Eq {
    type Addr: Copy + std::fmt::Debug + PartialEq + Eq + std::fmt::Display;
    type Net: Copy + std::fmt::Debug + PartialEq + Eq + std::fmt::Display;
    const BITS: u8;
    fn to_bits(a: Self::Addr) -> u128;
    fn from_bits(b: u128) -> Self::Addr;
    fn net(a: Self::Addr, len: u8) -> Self::Net;
    fn net_addr(n: &Self::Net) -> Self::Addr;
    fn net_len(n: &Self::Net) -> u8;
}

/// IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4;
/// IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Net = Ipv4Net;
    const BITS: u8 = 32;
    fn to_bits(a: Ipv4Addr) -> u128 {
        u32::from(a) as u128
    }
    fn from_bits(b: u128) -> Ipv4Addr {
        Ipv4Addr::from(b as u32)
    }
    fn net(a: Ipv4Addr, len: u8) -> Ipv4Net {
        Ipv4Net::new(a, len).expect("prefix length checked by the pool")
    }
    fn net_addr(n: &Ipv4Net) -> Ipv4Addr {
        n.network()
    }
    fn net_len(n: &Ipv4Net) -> u8 {
        n.prefix_len()
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Net = Ipv6Net;
    const BITS: u8 = 128;
    fn to_bits(a: Ipv6Addr) -> u128 {
        u128::from(a)
    }
    fn from_bits(b: u128) -> Ipv6Addr {
        Ipv6Addr::from(b)
    }
    fn net(a: Ipv6Addr, len: u8) -> Ipv6Net {
        Ipv6Net::new(a, len).expect("prefix length checked by the pool")
    }
    fn net_addr(n: &Ipv6Net) -> Ipv6Addr {
        n.network()
    }
    fn net_len(n: &Ipv6Net) -> u8 {
        n.prefix_len()
    }
}

impl<N: Family> SubnetPool<N> {
    /// Builds a pool; the caller (config validation) guarantees the invariants.
    pub(crate) fn new_unchecked(
        network: N::Net,
        subnet_len: u8,
        min: N::Addr,
        max: N::Addr,
    ) -> Self {
        SubnetPool {
            network,
            subnet_len,
            min,
            max,
        }
    }

    /// The whole cluster network (`Network` / `IPv6Network`).
    pub fn network(&self) -> N::Net {
        self.network
    }
    /// The prefix length of each node's subnet.
    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }
    /// The first subnet handed out.
    pub fn subnet_min(&self) -> N::Addr {
        self.min
    }
    /// The last subnet handed out.
    pub fn subnet_max(&self) -> N::Addr {
        self.max
    }

    fn step(&self) -> u128 {
        1u128 << (N::BITS - self.subnet_len)
    }

    /// How many subnets the pool holds.
    pub fn len(&self) -> u128 {
        ((N::to_bits(self.max) - N::to_bits(self.min)) / self.step()).saturating_add(1)
    }

    /// Always false: a valid pool holds at least one subnet.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `index`th subnet of the pool, if there is one.
    pub fn nth(&self, index: u128) -> Option<N::Net> {
        if index >= self.len() {
            return None;
        }
        Some(N::net(
            N::from_bits(N::to_bits(self.min) + index * self.step()),
            self.subnet_len,
        ))
    }

    /// The index of `subnet` in the pool, or `None` when it is not one of the
    /// pool's subnets (wrong length, unaligned, or outside min..=max).
    pub fn index_of(&self, subnet: &N::Net) -> Option<u128> {
        if N::net_len(subnet) != self.subnet_len {
            return None;
        }
        let bits = N::to_bits(N::net_addr(subnet));
        let (min, max) = (N::to_bits(self.min), N::to_bits(self.max));
        if bits < min || bits > max || (bits - min) % self.step() != 0 {
            return None;
        }
        Some((bits - min) / self.step())
    }

    /// Whether `subnet` is one of the subnets this pool hands out.
    pub fn contains(&self, subnet: &N::Net) -> bool {
        self.index_of(subnet).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_pool_indexing() {
        let pool = Ipv4Pool::new_unchecked(
            "10.244.0.0/16".parse().unwrap(),
            24,
            "10.244.1.0".parse().unwrap(),
            "10.244.255.0".parse().unwrap(),
        );
        assert_eq!(pool.len(), 255);
        assert_eq!(pool.nth(0).unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(pool.nth(254).unwrap().to_string(), "10.244.255.0/24");
        assert_eq!(pool.nth(255), None);
        assert_eq!(pool.index_of(&"10.244.3.0/24".parse().unwrap()), Some(2));
        assert_eq!(pool.index_of(&"10.244.0.0/24".parse().unwrap()), None);
        assert_eq!(pool.index_of(&"10.244.3.0/25".parse().unwrap()), None);
        assert_eq!(pool.index_of(&"10.245.3.0/24".parse().unwrap()), None);
    }

    #[test]
    fn v6_pool_indexing() {
        let pool = Ipv6Pool::new_unchecked(
            "fc00::/48".parse().unwrap(),
            64,
            "fc00:0:0:1::".parse().unwrap(),
            "fc00:0:0:ffff::".parse().unwrap(),
        );
        assert_eq!(pool.len(), 65_535);
        assert_eq!(pool.nth(1).unwrap().to_string(), "fc00:0:0:2::/64");
        assert_eq!(
            pool.index_of(&"fc00:0:0:ffff::/64".parse().unwrap()),
            Some(65_534)
        );
    }
}
