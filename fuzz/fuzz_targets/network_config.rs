//! The network config, as anyone with write access to etcd's config key
//! can write it: parsing never panics, what is accepted reads back the
//! same from its own JSON, and the allocator works on it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use weft_config::NetworkConfig;
use weft_lease::alloc::{self, InUse, Occupancy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = NetworkConfig::parse(text) else {
        return;
    };
    let json = config.to_json();
    let again = NetworkConfig::parse(&json.to_string())
        .unwrap_or_else(|e| panic!("its own JSON {json} does not parse: {e}"));
    assert_eq!(again.to_json(), json, "{text}");
    let total = config.subnet_count();
    for i in [0, 1, total / 2, total.saturating_sub(1), total] {
        if let Some(k) = alloc::key_at(&config, i) {
            assert!(
                alloc::key_fits(&config, &k),
                "{k} at {i} does not fit {json}"
            );
        }
    }
    let none = Occupancy::default();
    let first = alloc::key_at(&config, 0).into_iter().collect::<Vec<_>>();
    let used = Occupancy::from_keys(&config, &first);
    let in_use = InUse {
        base: &used,
        extra: &none,
        exclude: &none,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(data.len() as u64);
    if let Ok(k) = alloc::pick(&config, &in_use, &[], &mut rng) {
        assert!(alloc::key_fits(&config, &k), "picked {k} outside {json}");
        assert!(!first.contains(&k), "picked the used {k}");
    }
});
