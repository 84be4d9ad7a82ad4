//! The allocator against a brute-force oracle, with leases of every length
//! (as after a SubnetLen or Network change): a picked subnet fits the
//! network and overlaps nothing in use; "exhausted" means no pool subnet is
//! free; removing every key leaves the occupancy empty.
#![no_main]

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use std::net::{Ipv4Addr, Ipv6Addr};
use weft_config::NetworkConfig;
use weft_lease::alloc::{self, InUse, Occupancy};
use weft_lease::SubnetKey;

const CONFIGS: &[&str] = &[
    r#"{"Network":"10.0.0.0/24","SubnetLen":28}"#,
    r#"{"Network":"10.0.0.0/24","SubnetLen":26}"#,
    r#"{"Network":"10.0.0.0/22","SubnetLen":27}"#,
    r#"{"Network":"10.0.0.0/24","SubnetLen":28,"SubnetMin":"10.0.0.64","SubnetMax":"10.0.0.192"}"#,
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/56","IPv6SubnetLen":62}"#,
];

fn key_of(v6: bool, chunk: &[u8]) -> SubnetKey {
    let offset = u16::from_be_bytes([chunk[0], chunk[1]]);
    if v6 {
        let len = 50 + chunk[2] % 15; // /50../64
        let addr = Ipv6Addr::from((0xfd10u128 << 112) | (u128::from(offset) << 64));
        let net = Ipv6Net::new(addr, len).expect("len").trunc();
        SubnetKey::new(None, Some(net)).expect("key")
    } else {
        let len = 20 + chunk[2] % 11; // /20../30
        let addr = Ipv4Addr::from(0x0a00_0000 | u32::from(offset & 0x0fff));
        let net = Ipv4Net::new(addr, len).expect("len").trunc();
        SubnetKey::new(Some(net), None).expect("key")
    }
}

fn nets(k: &SubnetKey) -> Vec<IpNet> {
    k.ipv4()
        .map(IpNet::V4)
        .into_iter()
        .chain(k.ipv6().map(IpNet::V6))
        .collect()
}

fn overlap(a: &SubnetKey, b: &SubnetKey) -> bool {
    nets(a).iter().any(|x| {
        nets(b)
            .iter()
            .any(|y| x.contains(&y.network()) || y.contains(&x.network()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let text = CONFIGS[usize::from(pick) % CONFIGS.len()];
    let config = NetworkConfig::parse(text).expect("test config");
    let v6 = config.ipv4.is_none();
    let (mut base, mut exclude, mut extra, mut preferred) = (vec![], vec![], vec![], vec![]);
    for chunk in rest.chunks_exact(4) {
        let k = key_of(v6, chunk);
        match chunk[3] % 8 {
            0..=3 => base.push(k),
            4 => extra.push(k),
            5 => preferred.push(k),
            _ => {
                // Exclude one that is in base (the asking node's own).
                if let Some(b) = base.get(usize::from(chunk[3]) % base.len().max(1)) {
                    if exclude.iter().filter(|e| *e == b).count()
                        < base.iter().filter(|x| *x == b).count()
                    {
                        exclude.push(*b);
                    }
                }
            }
        }
    }
    let b = Occupancy::from_keys(&config, &base);
    let x = Occupancy::from_keys(&config, &exclude);
    let e = Occupancy::from_keys(&config, &extra);
    let in_use = InUse {
        base: &b,
        extra: &e,
        exclude: &x,
    };
    // The oracle: base minus exclude (as multisets) plus extra.
    let mut used = base.clone();
    for k in &exclude {
        let i = used
            .iter()
            .position(|u| u == k)
            .expect("excluded from base");
        used.swap_remove(i);
    }
    used.extend(extra.iter().copied());
    let free = |k: &SubnetKey| !used.iter().any(|u| overlap(u, k));
    let mut rng = rand::rngs::StdRng::seed_from_u64(rest.len() as u64);
    match alloc::pick(&config, &in_use, &preferred, &mut rng) {
        Ok(k) => {
            assert!(alloc::key_fits(&config, &k), "{k} does not fit {text}");
            assert!(free(&k), "{k} overlaps one of {used:?}");
            if let Some(p) = preferred
                .iter()
                .find(|p| alloc::key_fits(&config, p) && free(p))
            {
                assert_eq!(&k, p, "the first free preferred subnet");
            }
        }
        Err(_) => {
            for i in 0..config.subnet_count() {
                let k = alloc::key_at(&config, i).expect("in the pool");
                assert!(!free(&k), "exhausted, but {k} is free of {used:?}");
            }
        }
    }
    let mut o = Occupancy::from_keys(&config, &base);
    for k in &base {
        o.remove(&config, k);
    }
    assert_eq!(o.positions_used(), 0);
    let none = Occupancy::default();
    let empty = InUse {
        base: &o,
        extra: &none,
        exclude: &none,
    };
    for k in base.iter().chain(&extra) {
        assert!(
            !empty.subnet_taken(k),
            "{k} still taken after every key left"
        );
    }
});
