//! Someone with write access to etcd (every flannel node in a shared
//! keyspace has it) writes leases meant to divert traffic. The nodes skip
//! them, say why, and keep everything else working.

use std::time::Duration;
use weft_tests::lab::{Lab, LabConfig};
use weft_tests::netns::http_get;

fn put(lab: &Lab, key: &str, ip: &str, node: &str) {
    lab.etcdctl(&[
        "put",
        &format!("/weft/network/subnets/{key}"),
        &format!(r#"{{"PublicIP":"{ip}","BackendType":"host-gw","NodeName":"{node}"}}"#),
    ])
    .unwrap();
}

/// Waits until host `i` reports a skipped lease containing `needle`.
fn skips(lab: &Lab, i: u32, needle: &str) {
    lab.wait_for(
        Duration::from_secs(30),
        &format!("host {i} to skip {needle}"),
        || {
            Ok(lab
                .node_status(i)
                .map(|s| s["skipped"].to_string().contains(needle))
                .unwrap_or(false))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nstatus: {:?}", lab.node_status(i)));
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn leases_written_into_etcd_to_divert_traffic_are_not_programmed() {
    weft_tests::netns::require_root();
    let lab = Lab::up(LabConfig::for_test(3, "host-gw")).unwrap_or_else(|e| panic!("{e:#}"));
    // The issue's two keys: half the internet, and the underlay itself.
    put(&lab, "128.0.0.0-1", "198.18.0.99", "evil-1");
    put(&lab, "198.18.0.0-16", "198.18.0.98", "evil-2");
    let free = lab.free_subnets(2);
    let (free3, free4) = (free[0].to_string(), free[1].to_string());
    // A node's public IP, claimed by a newer lease.
    put(&lab, &free3.replace('/', "-"), "198.18.0.12", "evil-3");
    // On host 1, a route someone else made to a subnet a lease then claims.
    lab.host_ip(
        1,
        &["route", "add", &free4, "via", "198.18.0.1", "dev", "eth0"],
    )
    .unwrap();
    put(&lab, &free4.replace('/', "-"), "198.18.0.97", "evil-4");
    for i in 1..=3 {
        skips(
            &lab,
            i,
            "128.0.0.0/1 is not a /24 of the network 10.244.0.0/16",
        );
        skips(&lab, i, "198.18.0.0/16 is not a /24 of the network");
        if i != 2 {
            skips(&lab, i, "public IP 198.18.0.12 is already host-2's");
        }
    }
    skips(
        &lab,
        1,
        &format!("a route to {free4} that weft does not own"),
    );
    for i in 1..=3 {
        let routes = lab.host_ip(i, &["-j", "route", "show"]).unwrap();
        let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
        let routes = routes.as_array().unwrap();
        // Nothing of the attacker's, and the underlay's connected route as
        // the kernel made it.
        assert!(
            routes
                .iter()
                .all(|r| r["dst"] != "128.0.0.0/1" && r["gateway"] != "198.18.0.98"),
            "host {i}: {routes:?}"
        );
        assert!(
            routes.iter().any(|r| r["dst"] == "198.18.0.0/16"
                && r["protocol"] == "kernel"
                && r.get("gateway").is_none()),
            "host {i}: {routes:?}"
        );
        // Host 1 has its two peers; hosts 2 and 3 also evil-4's lease,
        // which looks like any other (nothing on them collides with it).
        let (_, metrics) =
            http_get(&lab.host(i).unwrap().ns, "127.0.0.1:9680", "/metrics").unwrap();
        let want = if i == 1 { 2 } else { 3 };
        assert!(
            metrics.contains(&format!("weft_node_peers {want}")),
            "host {i}: {metrics}"
        );
    }
    // The foreign route on host 1 is as it was.
    let r = lab.host_ip(1, &["route", "show", &free4]).unwrap();
    assert!(r.contains("via 198.18.0.1") && !r.contains("proto"), "{r}");
    // And the pods still reach each other.
    let broken = lab.unreachable_pairs();
    assert!(
        broken.is_empty(),
        "{broken:?}\n{}",
        (1..=3)
            .map(|i| lab.host_ip(i, &["route"]).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The lease JSON under `key`, as etcd has it.
fn stored(lab: &Lab, key: &str) -> String {
    lab.etcdctl(&[
        "get",
        "--print-value-only",
        &format!("/weft/network/subnets/{key}"),
    ])
    .unwrap()
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_node_restores_its_lease_at_once_when_someone_rewrites_or_deletes_it() {
    weft_tests::netns::require_root();
    // The default TTL (24h): the next renewal is an hour away.
    let lab = Lab::up(LabConfig::for_test(2, "host-gw")).unwrap_or_else(|e| panic!("{e:#}"));
    let key1 = lab
        .host(1)
        .unwrap()
        .subnet
        .unwrap()
        .to_string()
        .replace('/', "-");
    let key2 = lab
        .host(2)
        .unwrap()
        .subnet
        .unwrap()
        .to_string()
        .replace('/', "-");
    // Rewritten to take host 1's traffic elsewhere.
    lab.etcdctl(&[
        "put",
        &format!("/weft/network/subnets/{key1}"),
        r#"{"PublicIP":"198.18.0.99","BackendType":"host-gw","NodeName":"host-1"}"#,
    ])
    .unwrap();
    lab.wait_for(
        Duration::from_secs(15),
        "host 1 to restore its lease",
        || Ok(stored(&lab, &key1).contains("198.18.0.11")),
    )
    .unwrap();
    let log = lab.log_tail("node-1", 30);
    assert!(
        log.contains("our lease was rewritten in the store by someone else")
            && log.contains("198.18.0.99"),
        "{log}"
    );
    // Deleted behind the controller's back.
    lab.etcdctl(&["del", &format!("/weft/network/subnets/{key2}")])
        .unwrap();
    lab.wait_for(
        Duration::from_secs(15),
        "host 2 to take its subnet again",
        || Ok(stored(&lab, &key2).contains("host-2")),
    )
    .unwrap();
    assert!(lab
        .log_tail("node-2", 30)
        .contains("our lease is gone from the store"));
    lab.wait_converged(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn the_control_socket_is_roots_and_says_why_it_refuses() {
    use std::os::unix::fs::PermissionsExt;
    weft_tests::netns::require_root();
    let lab = Lab::up(LabConfig::for_test(1, "host-gw")).unwrap_or_else(|e| panic!("{e:#}"));
    let socket = lab.control_socket(1);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let s = socket.display().to_string();
    // Root, but this node runs host-gw: nothing to rotate.
    let e = format!(
        "{:#}",
        lab.host_weftctl(1, &["node", "rekey", "--socket", &s])
            .unwrap_err()
    );
    assert!(e.contains("[no_key]"), "{e}");
    // Anyone else: refused before the daemon is reached, exit 1 (a retry
    // does not help).
    let weftctl = weft_tests::bins::workspace_bin("weftctl").unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&weftctl)
        .args(["node", "rekey", "--socket", &s])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("run as root"),
        "{err}"
    );
    // No socket there: retryable (the daemon may be starting).
    let out = std::process::Command::new(&weftctl)
        .args(["node", "rekey", "--socket", "/run/weft-lab/no-such.sock"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("is weft-node running"), "{err}");
    // The node stopped: its socket is gone with it.
    let mut lab = lab;
    lab.stop("node-1").unwrap();
    assert!(!socket.exists());
}
