//! The wireguard backend for real: a lab whose nodes tunnel pod traffic
//! through kernel WireGuard. This machine's kernel has none, so these run
//! inside a Debian kernel booted with qemu: `scripts/vm-test` (called by
//! `scripts/test`). Run anywhere else they fail, saying so. `wg` (from
//! wireguard-tools) is the independent oracle; weft itself never runs it.

use serde_json::Value;
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_tests::capture::{capture, capture_both};
use weft_tests::lab::{host_ip6, Lab, LabConfig, PodState, POD_NETWORK6};
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
    lab_with(hosts, |_| {})
}

/// A wireguard lab, its config changed by `f` first.
fn lab_with(hosts: u32, f: impl FnOnce(&mut LabConfig)) -> Lab {
    require_wireguard();
    let mut cfg = LabConfig::for_test(hosts, "wireguard");
    cfg.resync = 3;
    f(&mut cfg);
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
    wg_dump_of(lab, i, "weft-wg")
}

/// `wg show DEV dump` on host `i`, peers only.
fn wg_dump_of(lab: &Lab, i: u32, dev: &str) -> Vec<Vec<String>> {
    let ns = &lab.host(i).unwrap().ns;
    let out = run("ip", &["netns", "exec", ns, "wg", "show", dev, "dump"]).unwrap();
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
    // With no traffic at all, the peer set again shakes hands at once (a
    // keepalive sent when its allowed IPs were set), and keeps no
    // persistent keepalive (none is configured).
    lab.wait_for(
        Duration::from_secs(10),
        "a handshake with the peer set again",
        || {
            let dump = wg_dump(&lab, 1);
            let p = dump.iter().find(|p| p[0] == key2).unwrap();
            Ok(p[4] != "0")
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", wg_dump(&lab, 1)));
    let dump = wg_dump(&lab, 1);
    assert_eq!(
        dump.iter().find(|p| p[0] == key2).unwrap()[7],
        "off",
        "{dump:?}"
    );
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

/// The largest round trip in ping's summary (`rtt min/avg/max/mdev = ...`).
fn max_rtt_ms(summary: &str) -> f64 {
    let line = summary
        .lines()
        .find(|l| l.starts_with("rtt "))
        .unwrap_or_else(|| panic!("no rtt line: {summary}"));
    let values = line.split('=').nth(1).unwrap().trim();
    values.split('/').nth(2).unwrap().parse().unwrap()
}

#[test]
#[ignore = "needs a kernel with WireGuard; run by scripts/vm-test"]
fn key_rotations_under_a_10_per_second_ping_lose_nothing() {
    let mut lab = lab(2);
    firewall(&lab, 2);
    let (p1, p2) = (pod(&lab, 1), pod(&lab, 2));
    let key1 = lease_of(&lab, 1)["backend_data"]["PublicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let key2 = lease_of(&lab, 2)["backend_data"]["PublicKey"]
        .as_str()
        .unwrap()
        .to_string();
    // 20 s of pings from host 1's pod; host 1 (the side that sends the
    // requests) rotates by weftctl after 2 s, host 2 by SIGUSR1 after 11 s.
    let ping = {
        let (ns, to) = (p1.ns.clone(), p2.ip);
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-q", "-n", "-i", "0.1", "-W", "10", "-c", "200",
                ])
                .arg(to.to_string())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let socket = lab.control_socket(1).display().to_string();
    let out = lab
        .host_weftctl(1, &["node", "rekey", "--socket", socket.as_str()])
        .unwrap();
    assert!(out.contains("epoch 2"), "{out}");
    std::thread::sleep(Duration::from_secs(9));
    let pid = lab.pid("node-2").unwrap();
    run("kill", &["-USR1", &pid.to_string()]).unwrap();
    let summary = ping.join().unwrap();
    let (sent, got) =
        weft_tests::traffic::ping_summary(&summary).unwrap_or_else(|| panic!("{summary}"));
    let slowest = max_rtt_ms(&summary);
    eprintln!(
        "two WireGuard key rotations under ping -i 0.1: {got} of {sent} answered, slowest reply \
         {slowest:.0} ms"
    );
    assert_eq!(sent, 200, "{summary}");
    assert_eq!(
        got,
        sent,
        "lost {} during two key rotations:\n{summary}\n{}",
        sent - got,
        lab.diagnostics()
    );

    // New keys in both leases and on both devices; the old ones gone.
    lab.wait_for(
        Duration::from_secs(20),
        "host 2's new key in its lease",
        || Ok(lease_of(&lab, 2)["backend_data"]["PublicKey"] != key2.as_str()),
    )
    .unwrap();
    let new1 = lease_of(&lab, 1)["backend_data"]["PublicKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new1, key1);
    let peers_of_2: Vec<String> = wg_dump(&lab, 2).into_iter().map(|p| p[0].clone()).collect();
    assert_eq!(peers_of_2, std::slice::from_ref(&new1), "host 2's peers");
    let key_file: Value = serde_json::from_str(
        &std::fs::read_to_string(lab.state_dir(1).join("wireguard-key.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(key_file["epoch"], 2);
    assert_eq!(key_file["public_key"], new1.as_str());
    let private = key_file["private_key"].as_str().unwrap();
    for n in 1..=2 {
        assert!(!lab.log_tail(&format!("node-{n}"), 10_000).contains(private));
    }
    let (_, metrics) =
        weft_tests::netns::http_get(&lab.host(1).unwrap().ns, "127.0.0.1:9680", "/metrics")
            .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "weft_node_wireguard_key_rotations_total 1"),
        "{metrics}"
    );
    // And the other way.
    assert!(lab.reaches(&p2.ns, p1.ip));

    // With the controller down a rotation would cut the node off until it
    // returns (peers keep the old key): it does not start, and the key
    // stays.
    lab.stop("controller").unwrap();
    let pid = lab.pid("node-1").unwrap();
    run("kill", &["-USR1", &pid.to_string()]).unwrap();
    lab.wait_for(
        Duration::from_secs(40),
        "the refused rotation in the log",
        || {
            Ok(lab
                .log_tail("node-1", 200)
                .contains("WireGuard key rotation failed"))
        },
    )
    .unwrap();
    let key_file: Value = serde_json::from_str(
        &std::fs::read_to_string(lab.state_dir(1).join("wireguard-key.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(key_file["epoch"], 2, "the key did not change");
    let dump = wg_dump(&lab, 2);
    assert_eq!(dump[0][0], new1, "host 2 still has host 1's key");
    assert!(lab.reaches(&p1.ns, p2.ip) && lab.reaches(&p2.ns, p1.ip));
}

#[test]
#[ignore = "needs a kernel with WireGuard; run by scripts/vm-test"]
fn dual_stack_pods_reach_each_other_through_both_devices() {
    let lab = lab_with(2, |c| c.ipv6 = true);
    // Between the hosts only WireGuard: UDP 51820 over IPv4, 51821 over
    // IPv6 (flannel's separate mode: weft-wg and weft-wg-v6), and IPv6's
    // neighbour discovery (IPv4's ARP is not IP: no rule stops it), without
    // which the underlay breaks once a neighbour entry goes stale.
    for i in 1..=2u32 {
        let j = 3 - i;
        let rules = format!(
            "table inet wefttest {{\nchain input {{\ntype filter hook input priority 0;\n\
             ip saddr {} udp dport 51820 accept\nip saddr {} drop\n\
             ip6 saddr {} udp dport 51821 accept\n\
             icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept\n\
             ip6 saddr {} drop\n}}\n}}",
            host_ip(j),
            host_ip(j),
            host_ip6(j),
            host_ip6(j)
        );
        run(
            "ip",
            &["netns", "exec", &lab.host(i).unwrap().ns, "nft", &rules],
        )
        .unwrap();
    }
    lab.wait_converged(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    // weft-wg-v6's peer: the other node's key, its IPv6 /64, its public
    // IPv6 address and ListenPortV6.
    let theirs = lease_of(&lab, 2);
    let peers6 = wg_dump_of(&lab, 1, "weft-wg-v6");
    assert_eq!(peers6.len(), 1, "{peers6:?}");
    assert_eq!(
        peers6[0][0],
        theirs["backend_data"]["PublicKey"].as_str().unwrap()
    );
    assert_eq!(peers6[0][2], format!("[{}]:51821", host_ip6(2)));
    assert_eq!(peers6[0][3], theirs["ipv6_subnet"].as_str().unwrap());
    let (p1, p2) = (pod(&lab, 1), pod(&lab, 2));
    let fab = lab.state.fabric.clone();
    let cap = std::thread::spawn(move || {
        capture_both(
            &fab,
            Duration::from_secs(4),
            "10.244.0.0/16".parse().unwrap(),
            Some(POD_NETWORK6.parse().unwrap()),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let (sent, got) = lab.ping(&p1.ns, p2.ip6.unwrap(), 10, "0.2").unwrap();
    assert_eq!((sent, got), (10, 10));
    let seen = cap.join().unwrap().unwrap();
    eprintln!(
        "fabric during 10 IPv6 pings: {} IPv6 packets, {} WireGuard over IPv6, {} pod packets in \
         the clear",
        seen.total6,
        seen.wireguard6.len(),
        seen.plaintext6.len() + seen.plaintext.len()
    );
    assert!(
        seen.plaintext6.is_empty() && seen.plaintext.is_empty(),
        "{seen:?}"
    );
    for (s, d) in [(host_ip6(1), host_ip6(2)), (host_ip6(2), host_ip6(1))] {
        assert!(
            seen.wireguard6.iter().filter(|p| **p == (s, d)).count() >= 10,
            "WireGuard {s} -> {d}: {seen:?}"
        );
    }
}

#[test]
#[ignore = "needs a kernel with WireGuard; run by scripts/vm-test"]
fn ipv6_only_pods_reach_each_other_through_weft_wg_v6_alone() {
    let lab = lab_with(2, |c| {
        c.ipv6 = true;
        c.network = Some(format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{POD_NETWORK6}","Backend":{{"Type":"wireguard"}}}}"#
        ));
    });
    let (p1, p2) = (pod(&lab, 1), pod(&lab, 2));
    assert!(p1.ip.is_unspecified(), "{p1:?}");
    assert!(lab.reaches(&p1.ns, p2.ip6.unwrap()));
    assert!(lab.reaches(&p2.ns, p1.ip6.unwrap()));
    // No IPv4 device: nothing of the network is IPv4.
    assert!(lab.host_ip(1, &["link", "show", "weft-wg"]).is_err());
    let peers6 = wg_dump_of(&lab, 1, "weft-wg-v6");
    assert_eq!(peers6.len(), 1, "{peers6:?}");
    assert_eq!(peers6[0][2], format!("[{}]:51821", host_ip6(2)));
}
