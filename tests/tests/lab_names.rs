//! Names across the cluster: pods get names from weft-cni, every node's
//! name server on its bridge gateway answers for all of them, changes
//! reach every node, and the server keeps answering whatever a container
//! sends it. Needs root (scripts/test).

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use weft_tests::dns;
use weft_tests::lab::{Lab, LabConfig};
use weft_tests::netns::require_root;

const WAIT: Duration = Duration::from_secs(30);

/// The IPv4 addresses `name` has, asked from `pod` on host `i` (sorted),
/// or the response code.
fn lookup(lab: &Lab, i: u32, pod: &str, name: &str) -> Result<Vec<String>, ResponseCode> {
    let gw = IpAddr::V4(lab.gateway(i).unwrap());
    dns::addresses(pod, gw, name).unwrap_or(Err(ResponseCode::ServFail))
}

/// Waits until `name`, asked on every host, gives exactly `want`
/// (`None`: does not exist); returns how long it took.
fn converge(lab: &Lab, name: &str, want: Option<&[String]>) -> Duration {
    let t = Instant::now();
    let hosts: Vec<(u32, String)> = lab
        .state
        .hosts
        .iter()
        .filter(|h| lab.running(&format!("node-{}", h.index)))
        .map(|h| (h.index, h.pods[0].ns.clone()))
        .collect();
    lab.wait_for(WAIT, &format!("{name} to be {want:?} everywhere"), || {
        Ok(hosts.iter().all(|(i, pod)| {
            let got = lookup(lab, *i, pod, name);
            match want {
                Some(w) => got.as_deref() == Ok(w),
                None => got == Err(ResponseCode::NXDomain),
            }
        }))
    })
    .unwrap();
    t.elapsed()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn names_resolve_on_every_host_follow_their_containers_and_must_be_names() {
    require_root();
    let mut lab = Lab::up(LabConfig::for_test(3, "vxlan")).unwrap();
    // One service on three hosts, one database with two names.
    let web: Vec<String> = (1..=3)
        .map(|i| lab.new_named_pod(i, &["web"]).unwrap().ip.to_string())
        .collect();
    let db = lab.new_named_pod(2, &["db", "primary.db"]).unwrap();
    let web = sorted(web);
    let took = converge(&lab, "web.weft.", Some(&web));
    eprintln!("web on three hosts answered everywhere after {took:?}");
    converge(&lab, "db.weft.", Some(&[db.ip.to_string()]));
    converge(&lab, "primary.db.weft.", Some(&[db.ip.to_string()]));
    // The shared name comes in turns: the first address changes.
    let pod1 = lab.host(1).unwrap().pods[0].ns.clone();
    let gw1 = IpAddr::V4(lab.gateway(1).unwrap());
    let firsts: std::collections::HashSet<String> = (0..6)
        .map(|_| dns::ask(&pod1, gw1, "web.weft.", RecordType::A).unwrap().1[0].clone())
        .collect();
    assert!(
        firsts.len() > 1,
        "always the same first address: {firsts:?}"
    );
    // Over TCP too, and the reverse name of a container's address.
    let q = dns::query("db.weft.", RecordType::A, 7).unwrap();
    let m = weft_tests::netns::in_ns(&pod1, move || dns::exchange_tcp(gw1, &q))
        .unwrap()
        .unwrap();
    assert_eq!(dns::answers(&m), [db.ip.to_string()]);
    let o = db.ip.octets();
    let ptr = format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]);
    let (code, names) = dns::ask(&pod1, gw1, &ptr, RecordType::PTR).unwrap();
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(sorted(names), ["db.weft.", "primary.db.weft."]);
    // The name leads to the container: a pod on host 3 reaches db by it.
    let pod3 = lab.host(3).unwrap().pods[0].ns.clone();
    let found = lookup(&lab, 3, &pod3, "db.weft.").unwrap();
    assert!(lab.reaches(&pod3, found[0].parse::<IpAddr>().unwrap()));
    // etcdctl shows the records, attached to host 2's etcd lease.
    let keys = lab
        .etcdctl(&["get", "--prefix", "--keys-only", "/weft/network/names/"])
        .unwrap();
    assert!(
        keys.contains(&format!("/weft/network/names/db/{}", db.ip)),
        "{keys}"
    );

    // DEL withdraws the name everywhere.
    lab.delete_pod(2, &db.ns).unwrap();
    let took = converge(&lab, "db.weft.", None);
    eprintln!("db gone everywhere {took:?} after its DEL");
    let (code, _) = dns::ask(&pod1, gw1, &ptr, RecordType::PTR).unwrap();
    assert_eq!(code, ResponseCode::NXDomain, "a pod address nobody has");

    // Names that are not RFC 1123 labels: a clear CNI error, no pod.
    let pods_before = lab.pods().len();
    for bad in ["web_1", "-web", "a..b", &"x".repeat(64)] {
        let e = lab.new_named_pod(1, &[bad]).unwrap_err().to_string();
        assert!(
            e.contains("RFC 1123") && e.contains("CNI_ARGS"),
            "{bad}: {e}"
        );
    }
    assert_eq!(lab.pods().len(), pods_before);
    lab.down().unwrap();
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_restarted_node_answers_again_and_a_dead_node_s_names_expire_with_its_lease() {
    require_root();
    let mut cfg = LabConfig::for_test(2, "vxlan");
    cfg.network =
        Some(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"},"LeaseTTL":"8s"}"#.into());
    let mut lab = Lab::up(cfg).unwrap();
    let a = lab.new_named_pod(1, &["api"]).unwrap();
    let b = lab.new_named_pod(2, &["cache"]).unwrap();
    converge(&lab, "api.weft.", Some(&[a.ip.to_string()]));
    converge(&lab, "cache.weft.", Some(&[b.ip.to_string()]));

    // Restarted: host 1 answers for its own and the others' names again.
    // While it is down an operator removes its container's record: the
    // node, started again, registers it anew from weft-cni's names file.
    lab.signal("node-1", libc::SIGTERM).unwrap();
    lab.wait_exit("node-1", WAIT).unwrap();
    lab.weftctl(&["names", "remove", "api", &a.ip.to_string()])
        .unwrap();
    converge(&lab, "api.weft.", None);
    lab.start("node-1").unwrap();
    converge(&lab, "api.weft.", Some(&[a.ip.to_string()]));
    converge(&lab, "cache.weft.", Some(&[b.ip.to_string()]));

    // Killed: host 2's names go when its lease runs out (8 s), not before
    // anyone asks them to; host 1 no longer answers with them.
    lab.signal("node-2", libc::SIGKILL).unwrap();
    let pod1 = lab.host(1).unwrap().pods[0].ns.clone();
    assert_eq!(
        lookup(&lab, 1, &pod1, "cache.weft."),
        Ok(vec![b.ip.to_string()]),
        "a node that just died still has its lease"
    );
    let took = converge(&lab, "cache.weft.", None);
    eprintln!("a killed node's names expired after {took:?}");
    // Back again, it registers what its containers have (weft-cni's
    // names file) without anyone calling weft-cni.
    lab.start("node-2").unwrap();
    converge(&lab, "cache.weft.", Some(&[b.ip.to_string()]));
    lab.down().unwrap();
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn the_name_server_keeps_answering_through_garbage_and_floods() {
    require_root();
    let mut lab = Lab::up(LabConfig::for_test(1, "vxlan")).unwrap();
    let web = lab.new_named_pod(1, &["web"]).unwrap();
    converge(&lab, "web.weft.", Some(&[web.ip.to_string()]));
    let pod = lab.host(1).unwrap().pods[0].ns.clone();
    let gw = IpAddr::V4(lab.gateway(1).unwrap());
    let (sent, held) = weft_tests::netns::in_ns(
        &pod,
        move || -> anyhow::Result<(u32, Vec<std::net::TcpStream>)> {
            use std::io::Write;
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect((gw, 53))?;
            let mut n = 0u32;
            // Malformed packets of every size, oversized ones (64000 bytes,
            // fragmented), and a flood of good queries for unknown names.
            for i in 0..5000u32 {
                let len = (i * 7919) % 1500;
                let junk: Vec<u8> = (0..len).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
                let _ = s.send(&junk);
                n += 1;
            }
            for _ in 0..20 {
                let _ = s.send(&vec![0xa5u8; 64000]);
                n += 1;
            }
            for i in 0..20000u32 {
                let q = dns::query(&format!("nope{i}.weft."), RecordType::A, i as u16)?;
                let _ = s.send(&q);
                n += 1;
            }
            // TCP: more connections than it serves, idle ones, a length
            // promising 65535 bytes that never come; kept open.
            let mut held = Vec::new();
            for _ in 0..100 {
                if let Ok(mut c) = std::net::TcpStream::connect((gw, 53)) {
                    let _ = c.write_all(&[0xff, 0xff, 1, 2, 3]);
                    held.push(c);
                }
            }
            Ok((n, held))
        },
    )
    .unwrap()
    .unwrap();
    eprintln!("sent {sent} packets of garbage and unknown names");
    // Still answering, over UDP and, while the flooding pod still holds
    // its connections open, over TCP to another container.
    converge(&lab, "web.weft.", Some(&[web.ip.to_string()]));
    let q = dns::query("web.weft.", RecordType::A, 9).unwrap();
    let m = weft_tests::netns::in_ns(&web.ns, move || dns::exchange_tcp(gw, &q))
        .unwrap()
        .unwrap();
    assert_eq!(dns::answers(&m), [web.ip.to_string()]);
    drop(held);
    assert!(lab.running("node-1"), "{}", lab.log_tail("node-1", 30));
    lab.down().unwrap();
}
