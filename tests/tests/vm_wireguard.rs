//! The wireguard backend for real: a lab whose nodes tunnel pod traffic
//! through kernel WireGuard. This machine's kernel has none, so these run
//! inside a Debian kernel booted with qemu: `scripts/vm-test` (called by
//! `scripts/test`). Run anywhere else they fail, saying so. `wg` (from
//! wireguard-tools) is the independent oracle; weft itself never runs it.

use serde_json::Value;
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_tests::capture::capture;
use weft_tests::lab::{Lab, LabConfig, PodState};
use weft_tests::netns::{require_root, run};

/// Fails clearly unless the kernel has WireGuard (the VM loads it).
fn require_wireguard() {
    require_root();
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    assert!(
        modules.lines().any(|l| l.starts_with("wireguard ")),
        "this test needs a kernel with WireGuard (module wireguard loaded): run it with \
         scripts/vm-test"
    );
}

fn lab(hosts: u32) -> Lab {
    require_wireguard();
    let mut cfg = LabConfig::for_test(hosts, "wireguard");
    cfg.resync = 3;
    Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"))
}

fn pod(lab: &Lab, i: u32) -> PodState {
    lab.pods()
        .into_iter()
        .find(|(h, _)| *h == i)
        .map(|(_, p)| p)
        .unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn host_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}

/// `wg show weft-wg dump` on host `i`: one line per peer after the
/// device's (public key, preshared key, endpoint, allowed ips, ...).
fn wg_dump(lab: &Lab, i: u32) -> Vec<Vec<String>> {
    let ns = &lab.host(i).unwrap().ns;
    let out = run(
        "ip",
        &["netns", "exec", ns, "wg", "show", "weft-wg", "dump"],
    )
    .unwrap();
    out.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

fn lease_of(lab: &Lab, i: u32) -> Value {
    let list: Value =
        serde_json::from_str(&lab.weftctl(&["leases", "list", "-o", "json"]).unwrap()).unwrap();
    list["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["node_name"] == format!("host-{i}"))
        .cloned()
        .unwrap_or_else(|| panic!("no lease of host-{i}: {list}"))
}

/// Only UDP to the WireGuard port passes between the hosts: every other
/// packet from another host's public IP is dropped on the way in.
fn firewall(lab: &Lab, hosts: u32) {
    for i in 1..=hosts {
        let ns = &lab.host(i).unwrap().ns;
        let others: Vec<String> = (1..=hosts)
            .filter(|j| *j != i)
            .map(|j| host_ip(j).to_string())
            .collect();
        let from = others.join(", ");
        let rules = format!(
            "table inet wefttest {{\nchain input {{\ntype filter hook input priority 0;\n\
             ip saddr {{ {from} }} udp dport 51820 accept\nip saddr {{ {from} }} drop\n}}\n}}"
        );
        run("ip", &["netns", "exec", ns, "nft", &rules]).unwrap();
    }
}

#[test]
#[ignore = "needs a kernel with WireGuard; run by scripts/vm-test"]
fn pods_reach_each_other_and_the_fabric_carries_only_wireguard() {
    let lab = lab(3);
    firewall(&lab, 3);
    lab.wait_converged(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    // Each host has a peer per other host, with its subnet and endpoint.
    for i in 1..=3u32 {
        let peers = wg_dump(&lab, i);
        assert_eq!(peers.len(), 2, "host {i}: {peers:?}");
        for j in (1..=3u32).filter(|j| *j != i) {
            let theirs = lease_of(&lab, j);
            let key = theirs["backend_data"]["PublicKey"].as_str().unwrap();
            let subnet = theirs["subnet"].as_str().unwrap().replace('-', "/");
            let p = peers
                .iter()
                .find(|p| p[0] == key)
                .unwrap_or_else(|| panic!("host {i} has no peer {key}: {peers:?}"));
            assert_eq!(p[2], format!("{}:51820", host_ip(j)), "{p:?}");
            assert_eq!(p[3], subnet, "{p:?}");
        }
    }
    let env = std::fs::read_to_string(lab.dir().join("h1-subnet.env")).unwrap();
    assert!(env.contains("FLANNEL_MTU=1420"), "{env}");
    let (p1, p2) = (pod(&lab, 1), pod(&lab, 2));
    // A full-size packet with DF set crosses without fragmentation.
    let df = run(
        "ip",
        &[
            "netns",
            "exec",
            &p1.ns,
            "ping",
            "-c",
            "2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1392",
            &p2.ip.to_string(),
        ],
    );
    assert!(df.is_ok(), "1420-byte packets with DF: {df:?}");
    let fab = lab.state.fabric.clone();
    let cap = std::thread::spawn(move || {
        capture(
            &fab,
            Duration::from_secs(4),
            "10.244.0.0/16".parse().unwrap(),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let (sent, got) = lab.ping(&p1.ns, p2.ip, 10, "0.2").unwrap();
    assert_eq!((sent, got), (10, 10));
    let seen = cap.join().unwrap().unwrap();
    eprintln!(
        "fabric during 10 pings: {} IPv4 packets, {} WireGuard, {} pod packets in the clear",
        seen.total,
        seen.wireguard.len(),
        seen.plaintext.len()
    );
    assert!(seen.plaintext.is_empty(), "{:?}", seen.plaintext);
    assert!(seen.esp.is_empty() && seen.vxlan == 0, "{seen:?}");
    let (h1, h2) = (ip("198.18.0.11"), ip("198.18.0.12"));
    for (s, d) in [(h1, h2), (h2, h1)] {
        assert!(
            seen.wireguard.iter().filter(|p| **p == (s, d)).count() >= 10,
            "WireGuard {s} -> {d}: {seen:?}"
        );
    }
    // Converged means converged: two more resyncs (every 3 s here) read
    // everything back and change nothing (the key is not set again, which
    // would end every session).
    let updates = |lab: &Lab| {
        lab.log_tail("node-1", 10_000)
            .matches("data plane updated")
            .count()
    };
    let before = updates(&lab);
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(updates(&lab), before, "{}", lab.log_tail("node-1", 20));
}

#[test]
#[ignore = "needs a kernel with WireGuard; run by scripts/vm-test"]
fn hand_removed_peers_and_the_device_come_back_within_a_resync() {
    let lab = lab(2);
    let ns1 = lab.host(1).unwrap().ns.clone();
    let key2 = lease_of(&lab, 2)["backend_data"]["PublicKey"]
        .as_str()
        .unwrap()
        .to_string();
    run(
        "ip",
        &[
            "netns", "exec", &ns1, "wg", "set", "weft-wg", "peer", &key2, "remove",
        ],
    )
    .unwrap();
    lab.wait_for(Duration::from_secs(10), "host 1's peer back", || {
        Ok(wg_dump(&lab, 1).iter().any(|p| p[0] == key2))
    })
    .unwrap();
    lab.host_ip(1, &["link", "del", "weft-wg"]).unwrap();
    lab.wait_converged(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    assert!(wg_dump(&lab, 1).iter().any(|p| p[0] == key2));
}

#[test]
#[ignore = "needs a kernel with WireGuard; run by scripts/vm-test"]
fn a_restarted_node_keeps_its_key_and_a_removed_peer_is_dropped() {
    let mut lab = lab(3);
    let before = lease_of(&lab, 1)["backend_data"].clone();
    lab.stop("node-1").unwrap();
    lab.start("node-1").unwrap();
    lab.wait_converged(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    assert_eq!(lease_of(&lab, 1)["backend_data"], before, "same key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(lab.state_dir(1).join("wireguard-key.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let key3 = lease_of(&lab, 3)["backend_data"]["PublicKey"]
        .as_str()
        .unwrap()
        .to_string();
    lab.stop("node-3").unwrap();
    lab.weftctl(&["lease", "release", "host-3"]).unwrap();
    lab.wait_for(
        Duration::from_secs(30),
        "hosts 1 and 2 to drop host 3",
        || Ok((1..=2).all(|i| !wg_dump(&lab, i).iter().any(|p| p[0] == key3))),
    )
    .unwrap();
    let (p1, p2) = (pod(&lab, 1), pod(&lab, 2));
    assert!(lab.reaches(&p1.ns, p2.ip));
}

/// Run by scripts/vm-test before the wireguard module is loaded, with
/// its loading switched off: the node must say what is missing and exit.
#[test]
#[ignore = "needs a kernel without WireGuard; run by scripts/vm-test"]
fn without_wireguard_the_node_says_so_and_exits() {
    require_root();
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    assert!(
        !modules.lines().any(|l| l.starts_with("wireguard ")),
        "wireguard is loaded: scripts/vm-test runs this first, with its loading off"
    );
    let mut cfg = LabConfig::for_test(0, "wireguard");
    cfg.pods_per_host = 0;
    let mut lab = Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    lab.start_host().unwrap();
    let status = lab
        .wait_exit("node-1", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("weft-node without WireGuard: {e:#}"));
    assert!(!status.success(), "{status:?}");
    let log = lab.log_tail("node-1", 20);
    assert!(log.contains("cannot run on this kernel"), "{log}");
    assert!(
        log.contains("module wireguard") && log.contains("CONFIG_WIREGUARD"),
        "{log}"
    );
    assert!(
        !lab.state_dir(1).join("wireguard-key.json").exists(),
        "no key made for nothing"
    );
}

#[test]
#[ignore = "needs a kernel with WireGuard; run by scripts/vm-test"]
fn a_deleted_device_never_lets_pod_traffic_out_in_the_clear() {
    let lab = lab(2);
    // A default route via the fabric: without the blackhole under the
    // route into weft-wg, pod packets would leave this way, unencrypted,
    // until the next pass made the device again.
    lab.host_ip(1, &["route", "add", "default", "via", "198.18.0.1"])
        .unwrap();
    let fallback = lab
        .host_ip(1, &["route", "show", "type", "blackhole"])
        .unwrap();
    assert!(
        fallback.contains("10.244.0.0/16") && fallback.contains("metric 4294967295"),
        "{fallback}"
    );
    let (p1, p2) = (pod(&lab, 1), pod(&lab, 2));
    let fab = lab.state.fabric.clone();
    let cap = std::thread::spawn(move || {
        capture(
            &fab,
            Duration::from_secs(4),
            "10.244.0.0/16".parse().unwrap(),
        )
    });
    let ping = {
        let (ns, to) = (p1.ns.clone(), p2.ip);
        std::thread::spawn(move || {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "ping",
                    "-q",
                    "-n",
                    "-i",
                    "0.1",
                    "-W",
                    "1",
                    "-c",
                    "30",
                    &to.to_string(),
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    lab.host_ip(1, &["link", "del", "weft-wg"]).unwrap();
    let seen = cap.join().unwrap().unwrap();
    let _ = ping.join();
    eprintln!(
        "fabric with weft-wg deleted under ping: {} IPv4 packets, {} WireGuard, {} pod packets in the clear",
        seen.total,
        seen.wireguard.len(),
        seen.plaintext.len()
    );
    assert!(seen.plaintext.is_empty(), "{:?}", seen.plaintext);
    lab.wait_converged(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}
