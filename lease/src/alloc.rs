//! Choosing a subnet for a node: pure, so every corner case is unit-tested.
//!
//! Subnets are handed out from the config's pool (`SubnetMin..=SubnetMax`).
//! With dual stack, the `i`th IPv4 subnet pairs with the `i`th IPv6 subnet,
//! so the IPv4 part of a key determines the whole key.

use crate::key::SubnetKey;
use rand::Rng;
use std::collections::HashSet;
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

/// The pool positions that existing keys occupy.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    indexes: HashSet<u128>,
}

impl Taken {
    /// Marks the pool positions `key` occupies (none if it is outside the pool).
    pub fn insert(&mut self, config: &NetworkConfig, key: &SubnetKey) {
        if let (Some(pool), Some(n)) = (&config.ipv4, key.ipv4()) {
            if let Some(i) = pool.index_of(&n) {
                self.indexes.insert(i);
            }
        }
        if let (Some(pool), Some(n)) = (&config.ipv6, key.ipv6()) {
            if let Some(i) = pool.index_of(&n) {
                self.indexes.insert(i);
            }
        }
    }

    /// Builds the set from keys.
    pub fn from_keys<'a>(
        config: &NetworkConfig,
        keys: impl IntoIterator<Item = &'a SubnetKey>,
    ) -> Self {
        let mut t = Taken::default();
        for k in keys {
            t.insert(config, k);
        }
        t
    }

    /// Number of occupied pool positions.
    pub fn len(&self) -> usize {
        self.indexes.len()
    }

    /// Whether no position is occupied.
    pub fn is_empty(&self) -> bool {
        self.indexes.is_empty()
    }

    fn contains(&self, i: u128) -> bool {
        self.indexes.contains(&i)
    }
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

/// Whether `key` can be handed out now: it fits the network, and none of its
/// subnets collides with a taken key.
pub fn is_free(
    config: &NetworkConfig,
    taken_keys: &HashSet<SubnetKey>,
    taken: &Taken,
    key: &SubnetKey,
) -> bool {
    if !key_fits(config, key) || taken_keys.contains(key) {
        return false;
    }
    let mut probe = Taken::default();
    probe.insert(config, key);
    !probe.indexes.iter().any(|i| taken.contains(*i))
        && !taken_keys.iter().any(|k| shares_subnet(k, key))
}

fn shares_subnet(a: &SubnetKey, b: &SubnetKey) -> bool {
    (a.ipv4().is_some() && a.ipv4() == b.ipv4()) || (a.ipv6().is_some() && a.ipv6() == b.ipv6())
}

/// Picks a subnet: the first of `preferred` that is free, else a random free
/// position of the pool (random, as flannel does, so that controller replicas
/// allocating at once rarely collide).
///
/// `taken_keys` are all keys in use (leases, reservations, unreadable entries,
/// allocations in flight); `taken` is the same set as pool positions.
pub fn pick<R: Rng + ?Sized>(
    config: &NetworkConfig,
    taken_keys: &HashSet<SubnetKey>,
    taken: &Taken,
    preferred: &[SubnetKey],
    rng: &mut R,
) -> Result<SubnetKey, Exhausted> {
    if let Some(k) = preferred
        .iter()
        .find(|k| is_free(config, taken_keys, taken, k))
    {
        return Ok(*k);
    }
    let total = config.subnet_count();
    let used = taken.len() as u128;
    if used >= total {
        return Err(Exhausted {
            used: used.min(total),
            total,
        });
    }
    let start = rng.random_range(0..total);
    // At most `used + 1` probes: every probe that fails hits a taken position.
    for step in 0..=used {
        let i = (start + step) % total;
        if !taken.contains(i) {
            if let Some(key) = key_at(config, i) {
                return Ok(key);
            }
        }
    }
    Err(Exhausted { used, total })
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
        let keys: HashSet<_> = used.iter().copied().collect();
        let taken = Taken::from_keys(config, used);
        pick(
            config,
            &keys,
            &taken,
            preferred,
            &mut StdRng::seed_from_u64(seed),
        )
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
    }

    #[test]
    fn previous_subnet_is_preferred_when_free() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let prev = key("10.244.42.0-24");
        assert_eq!(pick_with(&c, &[], &[prev], 5).unwrap(), prev);
        // Taken: fall back to another subnet, never the taken one.
        let got = pick_with(&c, &[prev], &[prev], 5).unwrap();
        assert_ne!(got, prev);
        // Not in this network any more: ignored.
        let foreign = key("10.99.42.0-24");
        assert_ne!(pick_with(&c, &[], &[foreign], 5).unwrap(), foreign);
        // Wrong length for this network: ignored.
        let wrong_len = key("10.244.42.0-25");
        assert_ne!(pick_with(&c, &[], &[wrong_len], 5).unwrap(), wrong_len);
        // The first free preference wins.
        let second = key("10.244.43.0-24");
        assert_eq!(pick_with(&c, &[prev], &[prev, second], 5).unwrap(), second);
    }

    #[test]
    fn dual_stack_pairs_positions() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd77::/48"}"#);
        let k = pick_with(&c, &[], &[], 3).unwrap();
        let i4 = c.ipv4.unwrap().index_of(&k.ipv4().unwrap()).unwrap();
        let i6 = c.ipv6.unwrap().index_of(&k.ipv6().unwrap()).unwrap();
        assert_eq!(i4, i6);
        // A v4-only key in a dual-stack network does not fit.
        assert!(!key_fits(&c, &key("10.244.3.0-24")));
        // A taken IPv6 subnet blocks its paired IPv4 subnet too.
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
