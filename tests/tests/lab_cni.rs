//! The lab's pods come from weft-cni: containers on one host and across
//! hosts reach each other, and a pod's DEL frees its address and cuts it
//! off. Needs root (scripts/test).

use weft_tests::lab::{Lab, LabConfig};
use weft_tests::netns::require_root;

/// Addresses held in host `i`'s IPAM store (one file per address).
fn store(lab: &Lab, i: u32) -> Vec<String> {
    let dir = lab.dir().join(format!("h{i}-cni")).join("weft");
    let mut ips: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
        .collect();
    ips.sort();
    ips
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn cni_pods_reach_each_other_on_one_host_and_across_hosts() {
    require_root();
    let mut cfg = LabConfig::for_test(2, "vxlan");
    cfg.pods_per_host = 2;
    let mut lab = Lab::up(cfg).unwrap();
    // Every pod got an address in its host's subnet from that host's store.
    let mut seen = std::collections::HashSet::new();
    for h in &lab.state.hosts {
        let subnet = h.subnet.unwrap();
        assert_eq!(h.pods.len(), 2);
        let mut want: Vec<String> = h.pods.iter().map(|p| p.ip.to_string()).collect();
        want.sort();
        assert_eq!(store(&lab, h.index), want);
        for p in &h.pods {
            assert!(subnet.contains(&p.ip), "{} outside {subnet}", p.ip);
            assert_ne!(p.ip, subnet.network());
            assert!(seen.insert(p.ip), "{} handed out twice", p.ip);
        }
    }
    // Lab::up waited for all pairs; check again explicitly, both directions.
    assert!(
        lab.unreachable_pairs().is_empty(),
        "{:?}",
        lab.unreachable_pairs()
    );

    // DEL frees the address and takes the pod off the network.
    let gone = lab.host(1).unwrap().pods[0].clone();
    let other = lab.host(2).unwrap().pods[0].clone();
    lab.delete_pod(1, &gone.ns).unwrap();
    assert!(!store(&lab, 1).contains(&gone.ip.to_string()));
    assert!(
        !lab.reaches(&other.ns, gone.ip),
        "{} still answers",
        gone.ip
    );
    // The host keeps no veth of it: one port left on weft0.
    let ports = lab
        .host_ip(1, &["-j", "link", "show", "master", "weft0"])
        .unwrap();
    let ports: serde_json::Value = serde_json::from_str(&ports).unwrap();
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");

    // A new pod joins and is reachable from the other host at once.
    let fresh = lab.new_pod(1).unwrap();
    assert!(lab.reaches(&other.ns, fresh.ip), "{}", lab.diagnostics());
    assert!(lab.reaches(&fresh.ns, other.ip), "{}", lab.diagnostics());
    assert_eq!(store(&lab, 1).len(), 2);
}
