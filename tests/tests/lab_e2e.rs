//! End to end on the lab, for vxlan and for host-gw: connectivity, joins,
//! releases, restarts, repairs, outages, masquerading, dual stack. Needs
//! root.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;
use weft_tests::lab::{host_ip6, Lab, LabConfig, OUTSIDE_IP, OUTSIDE_IP6, POD_NETWORK6};
use weft_tests::netns::{in_ns, spawn_in_ns};

fn lab(hosts: u32, backend: &str) -> Lab {
    weft_tests::netns::require_root();
    Lab::up(LabConfig::for_test(hosts, backend)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn converged(lab: &Lab) {
    lab.wait_converged(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Connects from pod namespace `from` to `to:port` where a listener in
/// namespace `server_ns` accepts; returns the source address the server saw.
fn source_seen(
    from: &str,
    server_ns: &str,
    bind: impl Into<IpAddr>,
    to: impl Into<IpAddr>,
    port: u16,
) -> Option<IpAddr> {
    let (bind, to): (IpAddr, IpAddr) = (bind.into(), to.into());
    let listener = in_ns(server_ns, move || TcpListener::bind((bind, port)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(false).unwrap();
    let server = std::thread::spawn(move || {
        // Accept with a deadline: a connection that never arrives fails the check.
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    let _ = s.write_all(b"hi");
                    return Some(peer.ip());
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        }
    });
    let client = spawn_in_ns(from, move || {
        let mut s = TcpStream::connect_timeout(&(to, port).into(), Duration::from_secs(3))?;
        let mut buf = [0u8; 2];
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.read_exact(&mut buf)?;
        Ok::<_, std::io::Error>(())
    })
    .unwrap();
    let seen = server.join().unwrap();
    let connected = client.join().unwrap().map(|r| r.is_ok()).unwrap_or(false);
    seen.filter(|_| connected)
}

fn pods_reach_each_other_and_a_fourth_host_joins(backend: &str) {
    let mut lab = lab(3, backend);
    assert!(lab.unreachable_pairs().is_empty());
    let i = lab.add_host().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(i, 4);
    let new_pod = lab.host(4).unwrap().pods[0].clone();
    for (h, p) in lab.pods() {
        if h != 4 {
            assert!(
                lab.reaches(&p.ns, new_pod.ip),
                "host {h} pod does not reach the new host"
            );
            assert!(
                lab.reaches(&new_pod.ns, p.ip),
                "the new host does not reach host {h}"
            );
        }
    }
    // Without masquerading, nothing leaves the cluster network with a pod
    // source that the outside could answer.
    let pod = &lab.host(1).unwrap().pods[0];
    assert_eq!(
        source_seen(&pod.ns, &lab.state.outside, OUTSIDE_IP, OUTSIDE_IP, 9101),
        None
    );
}

fn a_released_lease_vanishes_everywhere(backend: &str) {
    let mut lab = lab(3, backend);
    let gone = lab.host(3).unwrap().subnet.unwrap().to_string();
    for i in [1, 2] {
        assert!(lab.weft_routes(i).unwrap().contains(&gone));
    }
    // Decommission host 3: stop its daemon, release its lease.
    lab.stop("node-3").unwrap();
    let out = lab.weftctl(&["lease", "release", "host-3"]).unwrap();
    assert!(out.contains(&gone), "{out}");
    lab.wait_for(Duration::from_secs(15), "host 3's routes to vanish", || {
        Ok([1, 2]
            .iter()
            .all(|i| !lab.weft_routes(*i).unwrap().contains(&gone)))
    })
    .unwrap();
    if backend == "vxlan" {
        let mac = lab.host_ip(1, &["neigh", "show", "dev", "weft.1"]).unwrap();
        assert!(!mac.contains(&gone.replace("/24", "")), "{mac}");
    }
    let p1 = &lab.host(1).unwrap().pods[0];
    let p2 = &lab.host(2).unwrap().pods[0];
    assert!(lab.reaches(&p1.ns, p2.ip));
}

fn a_restarted_host_keeps_its_subnet_without_losing_traffic(backend: &str) {
    let mut lab = lab(3, backend);
    let subnet = lab.host(2).unwrap().subnet;
    let from = lab.host(1).unwrap().pods[0].ns.clone();
    let to = lab.host(2).unwrap().pods[0].ip;
    // 100 pings at 20 a second across the restart.
    let ping = Command::new("ip")
        .args([
            "netns", "exec", &from, "ping", "-q", "-n", "-i", "0.05", "-W", "1", "-c", "100",
        ])
        .arg(to.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    lab.stop("node-2").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.start("node-2").unwrap();
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap();
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(nums[0], 100);
    assert!(
        nums[0] - nums[1] <= 3,
        "lost {} of 100 packets across a restart: {line}",
        nums[0] - nums[1]
    );
    converged(&lab);
    let list = lab.weftctl(&["leases", "list", "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let h2 = v["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["node_name"] == "host-2")
        .unwrap();
    assert_eq!(
        h2["subnet"].as_str().map(|s| s.to_string()),
        subnet.map(|s| s.to_string()),
        "host 2 kept its subnet"
    );
    assert_eq!(v["leases"].as_array().unwrap().len(), 3);
}

fn hand_deletions_come_back(backend: &str) {
    let lab = lab(3, backend);
    let s2 = lab.host(2).unwrap().subnet.unwrap().to_string();
    // What each node has applied so far: the repair must be its own work
    // (on a slow machine it may be done before we could look).
    let applied = |h: u32| lab.changes_applied(h).unwrap();
    let (before1, before3) = (applied(1), applied(3));
    lab.host_ip(1, &["route", "del", &s2]).unwrap();
    if backend == "vxlan" {
        lab.host_ip(3, &["link", "del", "weft.1"]).unwrap();
    }
    // The nodes resync every 2 s in the lab.
    lab.wait_for(
        Duration::from_secs(15),
        "the deleted route and device to come back",
        || {
            let back = lab.weft_routes(1)?.contains(&s2) && applied(1) > before1;
            let dev = backend != "vxlan"
                || (lab.host_ip(3, &["link", "show", "weft.1"]).is_ok() && applied(3) > before3);
            Ok(back && dev)
        },
    )
    .unwrap();
    converged(&lab);
}

fn outages_of_controller_and_etcd_leave_pods_connected(backend: &str) {
    let mut lab = lab(3, backend);
    lab.stop("controller").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.unreachable_pairs().is_empty(),
        "pods lost each other with the controller down"
    );
    for h in 1..=3 {
        assert_eq!(lab.node_status(h).unwrap()["ready"], true);
    }
    lab.start("controller").unwrap();
    lab.stop("etcd").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.unreachable_pairs().is_empty(),
        "pods lost each other with etcd down"
    );
    lab.start("etcd").unwrap();
    lab.wait_for(
        Duration::from_secs(30),
        "the controller to be ready again",
        || Ok(lab.weftctl(&["status"]).is_ok()),
    )
    .unwrap();
    // A host that joins after the outages is reachable from all.
    lab.add_host().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(lab.unreachable_pairs().is_empty());
}

fn masquerade_rewrites_only_traffic_leaving_the_cluster(backend: &str) {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(2, backend);
    cfg.ip_masq = true;
    let lab = Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let h1 = lab.host(1).unwrap().clone();
    let p1 = &h1.pods[0];
    let p2 = lab.host(2).unwrap().pods[0].clone();
    let seen = source_seen(&p1.ns, &lab.state.outside, OUTSIDE_IP, OUTSIDE_IP, 9102);
    assert_eq!(
        seen,
        Some(IpAddr::V4(h1.ip)),
        "traffic to the outside leaves with the host's address"
    );
    let seen = source_seen(&p1.ns, &p2.ns, p2.ip, p2.ip, 9103);
    assert_eq!(
        seen,
        Some(IpAddr::V4(p1.ip)),
        "pod to pod keeps the pod's address"
    );
    let rules = weft_tests::netns::run(
        "ip",
        &[
            "netns", "exec", &h1.ns, "nft", "list", "table", "ip", "weft",
        ],
    )
    .unwrap();
    assert!(
        rules.contains("masquerade") && rules.contains(&h1.subnet.unwrap().to_string()),
        "{rules}"
    );
    // An operator flushes every nftables rule: the reconcile loop puts
    // weft's table back by itself, as it does a deleted route.
    Lab::nft_in(&h1.ns, &["flush", "ruleset"]).unwrap();
    let listed = |ns: &str| {
        weft_tests::netns::run(
            "ip",
            &["netns", "exec", ns, "nft", "list", "table", "ip", "weft"],
        )
    };
    lab.wait_for(
        Duration::from_secs(20),
        "weft's masquerade table to come back after nft flush ruleset",
        || Ok(listed(&h1.ns).is_ok_and(|r| r.contains("masquerade"))),
    )
    .unwrap();
    assert_eq!(
        listed(&h1.ns).unwrap(),
        rules,
        "the restored table is not the one installed"
    );
    let seen = source_seen(&p1.ns, &lab.state.outside, OUTSIDE_IP, OUTSIDE_IP, 9104);
    assert_eq!(
        seen,
        Some(IpAddr::V4(h1.ip)),
        "after the flush, traffic to the outside leaves with the host's address again"
    );
}

/// A dual-stack network: pods get an address of each family from weft-cni
/// and reach each other over both (the lab waits for every pair, both
/// families, before it is up); nodes publish their IPv6 address; IPv6
/// traffic leaving the cluster is masqueraded, pod-to-pod keeps its
/// source.
fn dual_stack_pods_reach_each_other_over_both_families(backend: &str) {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(2, backend);
    cfg.ipv6 = true;
    cfg.ip_masq = true;
    let lab = Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let pool6: ipnet::Ipv6Net = POD_NETWORK6.parse().unwrap();
    let leases: serde_json::Value =
        serde_json::from_str(&lab.weftctl(&["leases", "list", "-o", "json"]).unwrap()).unwrap();
    for i in 1..=2u32 {
        let l = leases["leases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["node_name"] == format!("host-{i}"))
            .unwrap_or_else(|| panic!("{leases}"));
        assert_eq!(l["public_ipv6"], host_ip6(i).to_string(), "{l}");
        let s6: ipnet::Ipv6Net = l["ipv6_subnet"].as_str().unwrap().parse().unwrap();
        assert!(pool6.contains(&s6) && s6.prefix_len() == 64, "{s6}");
        let pod = &lab.host(i).unwrap().pods[0];
        assert!(s6.contains(&pod.ip6.unwrap()), "{pod:?} in {s6}");
    }
    let h1 = lab.host(1).unwrap().clone();
    let (p1, p2) = (h1.pods[0].clone(), lab.host(2).unwrap().pods[0].clone());
    // The route to the other node's IPv6 pods is weft's.
    let routes6 = lab
        .host_ip(1, &["-6", "route", "show", "proto", "87"])
        .unwrap();
    let s2: String = leases["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["node_name"] == "host-2")
        .unwrap()["ipv6_subnet"]
        .as_str()
        .unwrap()
        .into();
    assert!(routes6.contains(&s2), "{routes6}");
    assert!(lab.reaches(&p1.ns, p2.ip6.unwrap()));
    assert!(lab.reaches(&p2.ns, p1.ip6.unwrap()));
    let seen = source_seen(&p1.ns, &p2.ns, p2.ip6.unwrap(), p2.ip6.unwrap(), 9111);
    assert_eq!(
        seen,
        Some(IpAddr::V6(p1.ip6.unwrap())),
        "pod to pod over IPv6 keeps the pod's address"
    );
    let seen = source_seen(&p1.ns, &lab.state.outside, OUTSIDE_IP6, OUTSIDE_IP6, 9112);
    assert_eq!(
        seen,
        Some(IpAddr::V6(host_ip6(1))),
        "IPv6 traffic to the outside leaves with the host's IPv6 address"
    );
    let rules = weft_tests::netns::run(
        "ip",
        &[
            "netns", "exec", &h1.ns, "nft", "list", "table", "ip6", "weft",
        ],
    )
    .unwrap();
    assert!(rules.contains("masquerade"), "{rules}");
    // IPv4 as before.
    let seen = source_seen(&p1.ns, &lab.state.outside, OUTSIDE_IP, OUTSIDE_IP, 9113);
    assert_eq!(seen, Some(IpAddr::V4(h1.ip)));
}

/// An IPv6-only network: pods get an IPv6 address only (the hosts keep
/// their IPv4 underlay; vxlan carries IPv6 over it, host-gw routes via the
/// nodes' IPv6 addresses) and reach each other; IPv6 leaving the cluster is
/// masqueraded, and there is no IPv4 table.
fn ipv6_only_pods_reach_each_other(backend: &str) {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(2, backend);
    cfg.ipv6 = true;
    cfg.ip_masq = true;
    cfg.network = Some(format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{POD_NETWORK6}","Backend":{{"Type":"{backend}"}}}}"#
    ));
    let lab = Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let leases: serde_json::Value =
        serde_json::from_str(&lab.weftctl(&["leases", "list", "-o", "json"]).unwrap()).unwrap();
    let list = leases["leases"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{leases}");
    for l in list {
        assert!(l["subnet"].is_null(), "{l}");
        assert!(l["ipv6_subnet"].is_string(), "{l}");
    }
    let h1 = lab.host(1).unwrap().clone();
    let (p1, p2) = (h1.pods[0].clone(), lab.host(2).unwrap().pods[0].clone());
    assert!(p1.ip.is_unspecified() && p1.ip6.is_some(), "{p1:?}");
    let v4 =
        weft_tests::netns::run("ip", &["-n", &p1.ns, "-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(
        !v4.contains("inet "),
        "an IPv6-only pod has no IPv4 address: {v4}"
    );
    assert!(lab.reaches(&p1.ns, p2.ip6.unwrap()));
    assert!(lab.reaches(&p2.ns, p1.ip6.unwrap()));
    let seen = source_seen(&p1.ns, &lab.state.outside, OUTSIDE_IP6, OUTSIDE_IP6, 9121);
    assert_eq!(seen, Some(IpAddr::V6(host_ip6(1))));
    let table = |family: &str| {
        weft_tests::netns::run(
            "ip",
            &[
                "netns", "exec", &h1.ns, "nft", "list", "table", family, "weft",
            ],
        )
    };
    assert!(table("ip6").unwrap().contains("masquerade"));
    assert!(
        table("ip").is_err(),
        "no IPv4 table in an IPv6-only network"
    );
}

macro_rules! backend_tests {
    ($module:ident, $backend:literal) => {
        mod $module {
            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn pods_reach_each_other_and_a_fourth_host_joins() {
                super::pods_reach_each_other_and_a_fourth_host_joins($backend);
            }

            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn a_released_lease_vanishes_everywhere() {
                super::a_released_lease_vanishes_everywhere($backend);
            }

            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn a_restarted_host_keeps_its_subnet_without_losing_traffic() {
                super::a_restarted_host_keeps_its_subnet_without_losing_traffic($backend);
            }

            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn hand_deletions_come_back() {
                super::hand_deletions_come_back($backend);
            }

            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn outages_of_controller_and_etcd_leave_pods_connected() {
                super::outages_of_controller_and_etcd_leave_pods_connected($backend);
            }

            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn masquerade_rewrites_only_traffic_leaving_the_cluster() {
                super::masquerade_rewrites_only_traffic_leaving_the_cluster($backend);
            }

            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn dual_stack_pods_reach_each_other_over_both_families() {
                super::dual_stack_pods_reach_each_other_over_both_families($backend);
            }

            #[test]
            #[ignore = "needs root; run by scripts/test"]
            fn ipv6_only_pods_reach_each_other() {
                super::ipv6_only_pods_reach_each_other($backend);
            }
        }
    };
}

backend_tests!(vxlan, "vxlan");
backend_tests!(host_gw, "host-gw");

/// A third host behind a router (its own /24, proxy ARP on the router's
/// fabric leg): vxlan reaches it; host-gw says why it cannot and keeps the
/// others working.
#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_host_a_routed_hop_away_is_reached_by_vxlan_and_skipped_by_host_gw() {
    for backend in ["vxlan", "host-gw"] {
        let mut lab = lab(2, backend);
        let i = lab.start_routed_host().unwrap();
        lab.finish_host(i).unwrap_or_else(|e| panic!("{e:#}"));
        let far = lab.host(i).unwrap().clone();
        // Host 1 reaches host 3 only through the router (TTL 63 on arrival).
        let ping = lab
            .host_ip(1, &["route", "get", &far.ip.to_string()])
            .unwrap();
        assert!(ping.contains("dev eth0"), "{ping}");
        let out = weft_tests::netns::run(
            "ip",
            &[
                "netns",
                "exec",
                &lab.host(1).unwrap().ns,
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                &far.ip.to_string(),
            ],
        )
        .unwrap();
        assert!(out.contains("ttl=63"), "not routed: {out}");
        if backend == "vxlan" {
            converged(&lab);
        } else {
            // The routed host's public IP is off its own /24, so it skips
            // both peers and says why. (The others cannot tell: the routed
            // host's address is inside their /16 and proxy ARP answers.)
            lab.wait_for(
                Duration::from_secs(30),
                "the routed host to skip both peers",
                || {
                    let s = lab.node_status(i)?;
                    Ok(s["skipped"]
                        .to_string()
                        .matches("not directly reachable")
                        .count()
                        == 2)
                },
            )
            .unwrap();
            let (p1, p2) = (&lab.host(1).unwrap().pods[0], &lab.host(2).unwrap().pods[0]);
            assert!(lab.reaches(&p1.ns, p2.ip), "the others still work");
        }
    }
}
