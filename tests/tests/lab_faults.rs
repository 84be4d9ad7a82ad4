//! The node daemon facing faults in a running lab (vxlan): a controller
//! that is not there yet, bad leases in the store, and systemd's protocol.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use weft_backends::vtep_mac;
use weft_tests::lab::{Lab, LabConfig};
use weft_tests::netns::http_get;

fn lab(hosts: u32) -> Lab {
    weft_tests::netns::require_root();
    Lab::up(LabConfig::for_test(hosts, "vxlan")).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_node_waits_for_an_unreachable_controller_and_says_so() {
    let mut lab = lab(2);
    lab.stop("controller").unwrap();
    let i = lab.start_host().unwrap();
    lab.wait_for(
        Duration::from_secs(15),
        "the new node to say what it waits for",
        || {
            let s = lab.node_status(i)?;
            Ok(s["ready"] == false
                && s["phase"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("waiting for the network config"))
        },
    )
    .unwrap();
    let log = lab.log_tail(&format!("node-{i}"), 20);
    assert!(log.contains("cannot reach the controller"), "{log}");
    lab.start("controller").unwrap();
    lab.finish_host(i).unwrap_or_else(|e| panic!("{e:#}"));
    lab.wait_converged(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn bad_leases_in_the_store_are_skipped_and_everything_else_keeps_working() {
    let lab = lab(2);
    let etcdctl = |args: &[&str]| lab.etcdctl(args).unwrap();
    let keys: Vec<String> = lab
        .free_subnets(3)
        .iter()
        .map(|s| format!("/weft/network/subnets/{}", s.to_string().replace('/', "-")))
        .collect();
    // Written by hand, bypassing the controller's checks.
    etcdctl(&[
        "put",
        &keys[0],
        r#"{"PublicIP":"198.18.0.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:zz"},"NodeName":"garbage"}"#,
    ]);
    let stolen = vtep_mac("host-1").to_string();
    etcdctl(&[
        "put",
        &keys[1],
        &format!(
            r#"{{"PublicIP":"198.18.0.98","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{stolen}"}},"NodeName":"clone"}}"#
        ),
    ]);
    etcdctl(&["put", &keys[2], "{not json at all"]);
    let waited = lab.wait_for(
        Duration::from_secs(30),
        "both nodes to skip the two bad leases",
        || {
            Ok([1, 2].iter().all(|h| {
                lab.node_status(*h)
                    .map(|s| s["skipped"].as_array().map(|a| a.len()) == Some(2))
                    .unwrap_or(false)
            }))
        },
    );
    if let Err(e) = waited {
        let statuses: Vec<String> = [1, 2]
            .iter()
            .map(|h| format!("{:?}", lab.node_status(*h)))
            .collect();
        let leases = lab
            .weftctl(&["leases", "list", "-o", "json"])
            .unwrap_or_default();
        panic!("{e:#}\nnode statuses: {statuses:#?}\nleases: {leases}");
    }
    let s1 = lab.node_status(1).unwrap();
    let s2 = lab.node_status(2).unwrap();
    let text = format!("{s1}{s2}");
    assert!(text.contains("BackendData is invalid"), "{text}");
    assert!(s1.to_string().contains("is ours"), "{s1}");
    assert!(s2.to_string().contains("already used by host-1"), "{s2}");
    assert_eq!(s1["peers"], 1);
    assert!(
        lab.unreachable_pairs().is_empty(),
        "the good peers are still programmed"
    );
    let (_, metrics) = http_get(&lab.host(1).unwrap().ns, "127.0.0.1:9680", "/metrics").unwrap();
    assert!(metrics.contains("weft_node_peers 1"), "{metrics}");
    assert!(metrics.contains("weft_node_skipped_peers 2"), "{metrics}");
    let listed = lab.weftctl(&["leases", "list", "-o", "json"]).unwrap();
    assert!(
        listed.contains(keys[2].rsplit('/').next().unwrap()),
        "the unreadable entry is reported: {listed}"
    );
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn systemd_hears_ready_and_the_watchdog() {
    let mut lab = lab(2);
    let sock_path = lab.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    lab.stop("node-1").unwrap();
    let path = sock_path.display().to_string();
    lab.start_with_env(
        "node-1",
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !(got.iter().any(|m: &String| m.contains("READY=1"))
            && got.iter().filter(|m| m.as_str() == "WATCHDOG=1").count() >= 2)
    {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready = got
        .iter()
        .find(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {got:?}"));
    assert!(ready.contains("STATUS=subnet"), "{ready}");
    assert!(
        got.iter().filter(|m| m.as_str() == "WATCHDOG=1").count() >= 2,
        "{got:?}"
    );
    // SIGTERM: "STOPPING=1", and the data plane stays.
    let routes = lab.weft_routes(1).unwrap();
    lab.stop("node-1").unwrap();
    let mut buf = [0u8; 512];
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        if &buf[..n] == b"STOPPING=1" {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert_eq!(
        lab.weft_routes(1).unwrap(),
        routes,
        "routes stay after the daemon stops"
    );
    assert!(lab.host_ip(1, &["link", "show", "weft.1"]).is_ok());
    assert!(lab.unreachable_pairs().is_empty());
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn renewals_keep_short_leases_alive_and_a_lost_lease_is_taken_again() {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(2, "vxlan");
    cfg.network = Some(r#"{"Network":"10.244.0.0/16","LeaseTTL":"6s"}"#.into());
    let lab = Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let subnet = lab.host(1).unwrap().subnet.unwrap().to_string();
    // Three TTLs go by: the nodes renew (every 2 s) and nothing expires.
    std::thread::sleep(Duration::from_secs(18));
    let list: serde_json::Value =
        serde_json::from_str(&lab.weftctl(&["leases", "list", "-o", "json"]).unwrap()).unwrap();
    let leases = list["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 2, "{list}");
    assert!(leases
        .iter()
        .all(|l| l["ttl_seconds"].as_u64().unwrap() <= 6));
    // Released under a running node: it notices at its next renewal and
    // takes its subnet again.
    lab.weftctl(&["lease", "release", "host-1"]).unwrap();
    lab.wait_for(
        Duration::from_secs(15),
        "host 1 to hold its subnet again",
        || {
            let l: serde_json::Value =
                serde_json::from_str(&lab.weftctl(&["leases", "list", "-o", "json"])?)?;
            Ok(l["leases"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["node_name"] == "host-1" && l["subnet"] == subnet.as_str()))
        },
    )
    .unwrap();
    let log = lab.log_tail("node-1", 30);
    assert!(log.contains("our lease is gone"), "{log}");
    lab.wait_converged(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (_, metrics) = http_get(&lab.host(2).unwrap().ns, "127.0.0.1:9680", "/metrics").unwrap();
    assert!(
        metrics.contains(r#"weft_node_lease_renewals_total{result="ok"}"#),
        "{metrics}"
    );
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_refused_network_config_ends_the_wait_at_once_with_the_refusal() {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(1, "vxlan");
    cfg.network = Some(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#.into());
    let Err(e) = Lab::up(cfg) else {
        panic!("a lab came up with a config the controller refuses");
    };
    let msg = format!("{e:#}");
    // Not a timeout about something else: the wait stops at the refusal
    // (weftctl exit 1), and says what was refused.
    assert!(
        msg.contains("gave up waiting for the controller to take the network config"),
        "{msg}"
    );
    assert!(
        msg.contains("SubnetLen") && msg.contains("[invalid_config]"),
        "{msg}"
    );
    assert!(!msg.contains("timed out"), "{msg}");
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_node_whose_lease_ran_out_takes_no_new_pods_until_it_holds_one_again() {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(2, "vxlan");
    cfg.network = Some(r#"{"Network":"10.244.0.0/16","LeaseTTL":"6s"}"#.into());
    let mut lab = Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    // No controller: no renewal, and after 6 s the leases have run out.
    lab.stop("controller").unwrap();
    lab.wait_for(
        Duration::from_secs(30),
        "host 1 to see its lease run out",
        || {
            let s = lab.node_status(1)?;
            Ok(s["ready"] == false && s["lease_expired"].is_string())
        },
    )
    .unwrap();
    let e = lab.new_pod(1).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("ran out") && msg.contains("no new containers"),
        "{msg}"
    );
    // The pods it has keep working meanwhile.
    assert!(lab.unreachable_pairs().is_empty());
    lab.start("controller").unwrap();
    lab.wait_for(
        Duration::from_secs(30),
        "host 1 to hold a lease again",
        || {
            let s = lab.node_status(1)?;
            Ok(s["ready"] == true && s.get("lease_expired").is_none())
        },
    )
    .unwrap();
    let pod = lab.new_pod(1).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(lab.host(1).unwrap().subnet.unwrap().contains(&pod.ip));
}
