//! weft-cni's input: the network config on stdin (with a prevResult) and
//! the CNI_* environment, both written by the runtime from what users give
//! it. Nothing panics; an accepted interface name and container id are
//! safe to put into link names and file names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_cni::cmd::Env;
use weft_cni::spec::{CniResult, NetConf};

fuzz_target!(|data: &[u8]| {
    // Config, then a NUL, then the environment as KEY=VALUE lines.
    let (conf, env) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(c) = NetConf::parse(conf) {
        if let Some(prev) = &c.prev_result {
            if let Ok(r) = CniResult::from_json(prev) {
                let _ = r.to_json(&c.cni_version);
            }
        }
    }
    let env = String::from_utf8_lossy(env);
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    for command in ["ADD", "DEL", "CHECK"] {
        if let Ok(e) = Env::read(command, get) {
            assert!(!e.ifname.is_empty() && e.ifname.len() <= 15);
            assert!(!e.ifname.contains('/') && !e.container_id.contains('/'));
            // An accepted name is never one the kernel refuses.
            assert!(e.ifname != "." && e.ifname != "..");
            assert!(!e.ifname.chars().any(|c| c == ':' || c.is_whitespace()));
            let _ = weft_cni::net::veth_alias(&e.container_id, &e.ifname);
        }
    }
});
