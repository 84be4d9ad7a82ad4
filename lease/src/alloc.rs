//! Choosing a subnet for a node: pure, so every corner case is unit-tested.
//!
//! Subnets are handed out from the config's pool (`SubnetMin..=SubnetMax`).
//! With dual stack, the `i`th IPv4 subnet pairs with the `i`th IPv6 subnet,
//! so the IPv4 part of a key determines the whole key. [`Occupancy`] counts
//! what existing keys occupy and is updated incrementally, so picking a
//! subnet does not rescan every lease.

use crate::key::SubnetKey;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::Rng;
use std::collections::HashMap;
use std::hash::Hash;
use thiserror::Error;
use weft_config::NetworkConfig;

/// No subnet is free.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no free subnet: {used} of {total} subnets are leased or reserved")]
pub struct Exhausted {
    /// Subnets of the pool in use.
    pub used: u128,
    /// Subnets in the pool.
    pub total: u128,
}

/// Whether a key is a valid subnet of this network: every enabled family
/// present, in the network, with the configured length; no disabled family.
/// Reservations may sit outside `SubnetMin..=SubnetMax`, as in flannel.
pub fn key_fits(config: &NetworkConfig, key: &SubnetKey) -> bool {
    let v4_ok = match (&config.ipv4, key.ipv4()) {
        (Some(p), Some(n)) => p.network().contains(&n) && n.prefix_len() == p.subnet_len(),
        (None, None) => true,
        _ => false,
    };
    let v6_ok = match (&config.ipv6, key.ipv6()) {
        (Some(p), Some(n)) => p.network().contains(&n) && n.prefix_len() == p.subnet_len(),
        (None, None) => true,
        _ => false,
    };
    v4_ok && v6_ok
}

/// The key at pool position `index`.
pub fn key_at(config: &NetworkConfig, index: u128) -> Option<SubnetKey> {
    let v4 = match &config.ipv4 {
        Some(p) => Some(p.nth(index)?),
        None => None,
    };
    let v6 = match &config.ipv6 {
        Some(p) => Some(p.nth(index)?),
        None => None,
    };
    SubnetKey::new(v4, v6).ok()
}

fn bump<K: Hash + Eq>(map: &mut HashMap<K, u32>, k: K, up: bool) {
    if up {
        *map.entry(k).or_default() += 1;
    } else if let Some(n) = map.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            map.remove(&k);
        }
    }
}

/// What a set of keys occupies: pool positions and individual subnets,
/// counted, so keys can be added and removed in any order.
///
/// Keys of another length than the pool's subnets (leases from before a
/// `SubnetLen` or `Network` change, or written by a replica with another
/// config) occupy every pool subnet they overlap: a narrower one counts as
/// the pool subnet that contains it; a wider one is kept aside and every
/// candidate is checked against it, one map lookup per distinct length.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    positions: HashMap<u128, u32>,
    v4: HashMap<Ipv4Net, u32>,
    v6: HashMap<Ipv6Net, u32>,
    /// Subnets wider than the pool's subnets.
    wide: HashMap<IpNet, u32>,
    /// How many entries of `wide` have each (family, prefix length).
    wide_lens: HashMap<(bool, u8), u32>,
}

/// `net` shortened to `len` bits (`len` at most its own length).
fn truncate(net: IpNet, len: u8) -> IpNet {
    match net {
        IpNet::V4(n) => IpNet::V4(Ipv4Net::new(n.addr(), len).map_or(n, |t| t.trunc())),
        IpNet::V6(n) => IpNet::V6(Ipv6Net::new(n.addr(), len).map_or(n, |t| t.trunc())),
    }
}

impl Occupancy {
    /// Builds the occupancy of `keys` under `config`.
    pub fn from_keys<'a>(
        config: &NetworkConfig,
        keys: impl IntoIterator<Item = &'a SubnetKey>,
    ) -> Self {
        let mut o = Occupancy::default();
        for k in keys {
            o.insert(config, k);
        }
        o
    }

    fn change(&mut self, config: &NetworkConfig, key: &SubnetKey, up: bool) {
        if let Some(mut n) = key.ipv4() {
            if let Some(p) = &config.ipv4 {
                if n.prefix_len() < p.subnet_len() {
                    self.change_wide(IpNet::V4(n), up);
                    return self.change_v6(config, key, up);
                }
                // A narrower subnet occupies the pool subnet holding it.
                n = Ipv4Net::new(n.addr(), p.subnet_len()).map_or(n, |t| t.trunc());
            }
            bump(&mut self.v4, n, up);
            if let Some(i) = config.ipv4.as_ref().and_then(|p| p.index_of(&n)) {
                bump(&mut self.positions, i, up);
            }
        }
        self.change_v6(config, key, up);
    }

    fn change_v6(&mut self, config: &NetworkConfig, key: &SubnetKey, up: bool) {
        if let Some(mut n) = key.ipv6() {
            if let Some(p) = &config.ipv6 {
                if n.prefix_len() < p.subnet_len() {
                    return self.change_wide(IpNet::V6(n), up);
                }
                n = Ipv6Net::new(n.addr(), p.subnet_len()).map_or(n, |t| t.trunc());
            }
            bump(&mut self.v6, n, up);
            if let Some(i) = config.ipv6.as_ref().and_then(|p| p.index_of(&n)) {
                bump(&mut self.positions, i, up);
            }
        }
    }

    fn change_wide(&mut self, net: IpNet, up: bool) {
        let len = (matches!(net, IpNet::V6(_)), net.prefix_len());
        bump(&mut self.wide, net, up);
        bump(&mut self.wide_lens, len, up);
    }

    /// How many wide subnets contain `net` (a pool subnet).
    fn wide_count(&self, net: IpNet) -> u32 {
        let v6 = matches!(net, IpNet::V6(_));
        self.wide_lens
            .keys()
            .filter(|(f, len)| *f == v6 && *len < net.prefix_len())
            .map(|(_, len)| self.wide.get(&truncate(net, *len)).copied().unwrap_or(0))
            .sum()
    }

    /// Pool positions the wide subnets cover, at most: a bound on how many
    /// probes can miss because of them.
    fn wide_cover(&self, config: &NetworkConfig) -> u128 {
        self.wide
            .keys()
            .map(|n| {
                let sub = match n {
                    IpNet::V4(_) => config.ipv4.as_ref().map(|p| p.subnet_len()),
                    IpNet::V6(_) => config.ipv6.as_ref().map(|p| p.subnet_len()),
                };
                let bits = sub.map_or(0, |s| u32::from(s.saturating_sub(n.prefix_len())));
                1u128.checked_shl(bits).unwrap_or(u128::MAX)
            })
            .fold(0u128, u128::saturating_add)
    }

    /// Adds a key.
    pub fn insert(&mut self, config: &NetworkConfig, key: &SubnetKey) {
        self.change(config, key, true);
    }

    /// Removes a key added before (with the same config).
    pub fn remove(&mut self, config: &NetworkConfig, key: &SubnetKey) {
        self.change(config, key, false);
    }

    /// Pool positions in use.
    pub fn positions_used(&self) -> usize {
        self.positions.len()
    }

    fn position_count(&self, i: u128) -> u32 {
        self.positions.get(&i).copied().unwrap_or(0)
    }

    fn subnet_counts(&self, key: &SubnetKey) -> (u32, u32) {
        (
            key.ipv4()
                .and_then(|n| self.v4.get(&n).copied())
                .unwrap_or(0),
            key.ipv6()
                .and_then(|n| self.v6.get(&n).copied())
                .unwrap_or(0),
        )
    }
}

/// What is in use when picking: the `base` occupancy (all keys in the
/// store), plus `extra` (allocations in flight, keys just lost to another
/// writer), minus `exclude` (keys of the asking node that are going away,
/// e.g. its own expired lease, which it may take again).
#[derive(Debug, Clone, Copy)]
pub struct InUse<'a> {
    /// The leases in the store.
    pub base: &'a Occupancy,
    /// Subnets being claimed right now, and subnets held for a node whose
    /// lease ran out: in use, though no lease holds them.
    pub extra: &'a Occupancy,
    /// Leases of the store to count as free (the asking node's own expired
    /// ones).
    pub exclude: &'a Occupancy,
}

impl InUse<'_> {
    fn position_taken(&self, i: u128) -> bool {
        self.base.position_count(i) > self.exclude.position_count(i)
            || self.extra.position_count(i) > 0
    }

    /// Whether any of `key`'s subnets is in use, or overlaps a wider subnet
    /// in use.
    pub fn subnet_taken(&self, key: &SubnetKey) -> bool {
        let (b4, b6) = self.base.subnet_counts(key);
        let (x4, x6) = self.exclude.subnet_counts(key);
        let (e4, e6) = self.extra.subnet_counts(key);
        if b4 > x4 || b6 > x6 || e4 > 0 || e6 > 0 {
            return true;
        }
        if self.base.wide.is_empty() && self.extra.wide.is_empty() {
            return false;
        }
        let nets = [key.ipv4().map(IpNet::V4), key.ipv6().map(IpNet::V6)];
        nets.into_iter().flatten().any(|n| {
            self.base.wide_count(n) > self.exclude.wide_count(n) || self.extra.wide_count(n) > 0
        })
    }

    /// At least as many as [`InUse::used`], without walking `extra`:
    /// thousands of allocations may be in flight during a join storm, and
    /// this is asked on every pick.
    fn used_bound(&self) -> u128 {
        (self.base.positions_used() + self.extra.positions.len()) as u128
    }

    /// Pool positions in use (without walking the pool; it walks `extra`
    /// and `exclude`).
    pub fn used(&self) -> u128 {
        let freed = self
            .exclude
            .positions
            .keys()
            .filter(|i| !self.position_taken(**i))
            .count();
        let added = self
            .extra
            .positions
            .keys()
            .filter(|i| self.base.position_count(**i) == 0)
            .count();
        (self.base.positions_used() - freed + added) as u128
    }
}

/// Whether `key` can be handed out now.
pub fn is_free(config: &NetworkConfig, in_use: &InUse<'_>, key: &SubnetKey) -> bool {
    key_fits(config, key) && !in_use.subnet_taken(key)
}

/// Picks a subnet: the first of `preferred` that is free, else a random free
/// position of the pool (random, as flannel does, so that controller replicas
/// allocating at once rarely collide).
pub fn pick<R: Rng + ?Sized>(
    config: &NetworkConfig,
    in_use: &InUse<'_>,
    preferred: &[SubnetKey],
    rng: &mut R,
) -> Result<SubnetKey, Exhausted> {
    if let Some(k) = preferred.iter().find(|k| is_free(config, in_use, k)) {
        return Ok(*k);
    }
    let total = config.subnet_count();
    let bound = in_use.used_bound();
    if bound >= total {
        let used = in_use.used();
        if used >= total {
            return Err(Exhausted {
                used: used.min(total),
                total,
            });
        }
    }
    let start = rng.random_range(0..total);
    // Every probe that fails hits a used position or one a wide subnet
    // covers, so this many probes find a free one if there is one.
    let probes = bound
        .saturating_add(in_use.base.wide_cover(config))
        .saturating_add(in_use.extra.wide_cover(config))
        .saturating_add(1)
        .min(total);
    for step in 0..probes {
        let i = (start + step) % total;
        if !in_use.position_taken(i) {
            if let Some(key) = key_at(config, i) {
                if !in_use.subnet_taken(&key) {
                    return Ok(key);
                }
            }
        }
    }
    Err(Exhausted {
        used: in_use.used().min(total),
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg(text: &str) -> NetworkConfig {
        NetworkConfig::parse(text).unwrap()
    }

    fn key(s: &str) -> SubnetKey {
        s.parse().unwrap()
    }

    fn pick_with(
        config: &NetworkConfig,
        used: &[SubnetKey],
        preferred: &[SubnetKey],
        seed: u64,
    ) -> Result<SubnetKey, Exhausted> {
        let base = Occupancy::from_keys(config, used);
        let none = Occupancy::default();
        let in_use = InUse {
            base: &base,
            extra: &none,
            exclude: &none,
        };
        pick(config, &in_use, preferred, &mut StdRng::seed_from_u64(seed))
    }

    #[test]
    fn fills_a_small_network_exactly_then_reports_exhaustion() {
        // /28 in /26: positions 1..=3 (the first subnet is skipped).
        let c = cfg(r#"{"Network":"10.0.0.0/26"}"#);
        let mut used = Vec::new();
        for seed in 0..3 {
            let k = pick_with(&c, &used, &[], seed).unwrap();
            assert!(key_fits(&c, &k));
            assert!(!used.contains(&k));
            used.push(k);
        }
        let mut got: Vec<String> = used.iter().map(|k| k.to_string()).collect();
        got.sort();
        assert_eq!(got, ["10.0.0.16-28", "10.0.0.32-28", "10.0.0.48-28"]);
        assert_eq!(
            pick_with(&c, &used, &[], 9),
            Err(Exhausted { used: 3, total: 3 })
        );
    }

    #[test]
    fn fragmented_pool_finds_the_one_hole() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let used: Vec<SubnetKey> = (1..=255)
            .filter(|i| *i != 77)
            .map(|i| key(&format!("10.244.{i}.0-24")))
            .collect();
        for seed in 0..20 {
            assert_eq!(
                pick_with(&c, &used, &[], seed).unwrap(),
                key("10.244.77.0-24")
            );
        }
    }

    #[test]
    fn claims_in_flight_that_the_store_already_shows_still_leave_the_hole() {
        // Claims in flight are counted once they are in the store too (the
        // cache has seen them, the claimer has not let go yet): the pick
        // must still find the one free subnet, and say exactly how many are
        // used when there is none.
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let all: Vec<SubnetKey> = (1..=255)
            .map(|i| key(&format!("10.244.{i}.0-24")))
            .collect();
        let base_keys: Vec<SubnetKey> = all.iter().copied().filter(|k| *k != all[76]).collect();
        let base = Occupancy::from_keys(&c, &base_keys);
        let extra = Occupancy::from_keys(&c, &base_keys[..200]);
        let none = Occupancy::default();
        let in_use = InUse {
            base: &base,
            extra: &extra,
            exclude: &none,
        };
        for seed in 0..20 {
            let got = pick(&c, &in_use, &[], &mut StdRng::seed_from_u64(seed));
            assert_eq!(got.unwrap(), all[76]);
        }
        // The hole claimed too: exhausted, and 255 used, not 455.
        let mut extra = extra;
        extra.insert(&c, &all[76]);
        let in_use = InUse {
            base: &base,
            extra: &extra,
            exclude: &none,
        };
        assert_eq!(
            pick(&c, &in_use, &[], &mut StdRng::seed_from_u64(1)),
            Err(Exhausted {
                used: 255,
                total: 255
            })
        );
    }

    #[test]
    fn reserved_and_out_of_range_keys() {
        let c = cfg(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.11.0"}"#,
        );
        // A reservation outside min..max fits the network but takes no pool slot.
        let reserved = key("10.244.200.0-24");
        assert!(key_fits(&c, &reserved));
        let used = vec![reserved, key("10.244.10.0-24")];
        assert_eq!(pick_with(&c, &used, &[], 1).unwrap(), key("10.244.11.0-24"));
        let used = vec![reserved, key("10.244.10.0-24"), key("10.244.11.0-24")];
        assert_eq!(
            pick_with(&c, &used, &[], 1),
            Err(Exhausted { used: 2, total: 2 })
        );
        // The reserved subnet itself is never handed to someone else.
        assert_ne!(
            pick_with(&c, &[reserved], &[reserved], 1).unwrap(),
            reserved
        );
    }

    #[test]
    fn previous_subnet_is_preferred_when_free() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let prev = key("10.244.42.0-24");
        assert_eq!(pick_with(&c, &[], &[prev], 5).unwrap(), prev);
        let got = pick_with(&c, &[prev], &[prev], 5).unwrap();
        assert_ne!(got, prev);
        let foreign = key("10.99.42.0-24");
        assert_ne!(pick_with(&c, &[], &[foreign], 5).unwrap(), foreign);
        let wrong_len = key("10.244.42.0-25");
        assert_ne!(pick_with(&c, &[], &[wrong_len], 5).unwrap(), wrong_len);
        let second = key("10.244.43.0-24");
        assert_eq!(pick_with(&c, &[prev], &[prev, second], 5).unwrap(), second);
    }

    #[test]
    fn excluded_keys_are_free_again_and_extra_keys_are_not() {
        let c = cfg(r#"{"Network":"10.0.0.0/26"}"#);
        let all = [
            key("10.0.0.16-28"),
            key("10.0.0.32-28"),
            key("10.0.0.48-28"),
        ];
        let base = Occupancy::from_keys(&c, &all);
        let own = Occupancy::from_keys(&c, &all[1..2]);
        let none = Occupancy::default();
        let mut rng = StdRng::seed_from_u64(1);
        let in_use = InUse {
            base: &base,
            extra: &none,
            exclude: &own,
        };
        assert_eq!(in_use.used(), 2);
        assert_eq!(pick(&c, &in_use, &[], &mut rng).unwrap(), all[1]);
        let in_use = InUse {
            base: &base,
            extra: &own,
            exclude: &own,
        };
        assert_eq!(
            pick(&c, &in_use, &[], &mut rng),
            Err(Exhausted { used: 3, total: 3 })
        );
        let base = Occupancy::from_keys(&c, &all[..1]);
        let in_flight = Occupancy::from_keys(&c, &all[1..]);
        let in_use = InUse {
            base: &base,
            extra: &in_flight,
            exclude: &none,
        };
        assert_eq!(in_use.used(), 3);
    }

    #[test]
    fn leases_of_another_length_block_every_subnet_they_overlap() {
        // Leases from before SubnetLen changed from 28: a /27 over the first
        // two pool subnets and a /29 inside the last.
        let c = cfg(r#"{"Network":"10.0.0.0/26","SubnetLen":28}"#);
        let (wide, narrow) = (key("10.0.0.0-27"), key("10.0.0.48-29"));
        for seed in 0..32 {
            assert_eq!(
                pick_with(&c, &[wide, narrow], &[], seed),
                Ok(key("10.0.0.32-28"))
            );
        }
        let preferred = [key("10.0.0.16-28"), key("10.0.0.48-28")];
        assert_eq!(
            pick_with(&c, &[wide, narrow], &preferred, 0),
            Ok(key("10.0.0.32-28"))
        );
        let used = [wide, narrow, key("10.0.0.32-28")];
        for seed in 0..8 {
            assert!(pick_with(&c, &used, &[], seed).is_err(), "seed {seed}");
        }

        // The asking node's own expired wide lease is free again; a wide
        // subnet being claimed is not.
        let base = Occupancy::from_keys(&c, &used);
        let own = Occupancy::from_keys(&c, &[wide]);
        let none = Occupancy::default();
        let in_use = InUse {
            base: &base,
            extra: &none,
            exclude: &own,
        };
        assert_eq!(
            pick(&c, &in_use, &[], &mut StdRng::seed_from_u64(3)),
            Ok(key("10.0.0.16-28"))
        );
        let in_use = InUse {
            base: &base,
            extra: &own,
            exclude: &own,
        };
        assert!(pick(&c, &in_use, &[], &mut StdRng::seed_from_u64(3)).is_err());

        // Removing them frees everything.
        let mut o = Occupancy::from_keys(&c, &used);
        for k in &used {
            o.remove(&c, k);
        }
        assert_eq!(o.positions_used(), 0);
        assert!(o.wide.is_empty() && o.wide_lens.is_empty() && o.v4.is_empty());
    }

    #[test]
    fn a_wide_ipv6_lease_blocks_its_subnets_in_a_huge_pool() {
        let c = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/48","IPv6SubnetLen":64}"#,
        );
        let wide = key("0.0.0.0-0&fd10::-56");
        let inside = key("0.0.0.0-0&fd10:0:0:12::-64");
        assert!(pick_with(&c, &[wide], &[inside], 0).unwrap() != inside);
        assert_eq!(pick_with(&c, &[], &[inside], 0), Ok(inside));
    }

    #[test]
    fn occupancy_counts_survive_remove() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let k = key("10.244.5.0-24");
        let mut o = Occupancy::default();
        o.insert(&c, &k);
        o.insert(&c, &k);
        o.remove(&c, &k);
        assert_eq!(o.positions_used(), 1);
        o.remove(&c, &k);
        assert_eq!(o.positions_used(), 0);
        o.remove(&c, &k);
        assert_eq!(o.positions_used(), 0);
    }

    #[test]
    fn dual_stack_pairs_positions() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd77::/48"}"#);
        let k = pick_with(&c, &[], &[], 3).unwrap();
        let i4 = c.ipv4.unwrap().index_of(&k.ipv4().unwrap()).unwrap();
        let i6 = c.ipv6.unwrap().index_of(&k.ipv6().unwrap()).unwrap();
        assert_eq!(i4, i6);
        assert!(!key_fits(&c, &key("10.244.3.0-24")));
        let v6_taken = key("10.244.200.0-24&fd77:0:0:3::-64");
        let prev = key("10.244.9.0-24&fd77:0:0:3::-64");
        assert_ne!(pick_with(&c, &[v6_taken], &[prev], 1).unwrap(), prev);
    }

    #[test]
    fn ipv6_only_huge_pool_is_fast() {
        let c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd77::/16"}"#);
        assert_eq!(c.subnet_count(), (1u128 << 48) - 1);
        let k = pick_with(&c, &[], &[], 1).unwrap();
        assert!(k.ipv4().is_none() && key_fits(&c, &k));
    }
}
