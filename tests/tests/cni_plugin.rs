//! weft-cni driven as a runtime drives it, in throwaway namespaces. Needs root.

use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::PathBuf;
use weft_tests::cni::{call, weft_cni, weft_conf, Answer, Attach};
use weft_tests::netns::{require_root, Netns};

/// A host namespace with a subnet.env, as weft-node would have written it.
struct Node {
    ns: Netns,
    _dir: tempfile::TempDir,
    subnet_file: PathBuf,
    data_dir: PathBuf,
}

fn node(subnet: &str, mtu: u32) -> Node {
    require_root();
    let ns = Netns::new("cnihost").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    std::fs::write(
        &subnet_file,
        format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n"),
    )
    .unwrap();
    let data_dir = dir.path().join("networks");
    Node {
        ns,
        _dir: dir,
        subnet_file,
        data_dir,
    }
}

impl Node {
    fn conf(&self, version: &str) -> Value {
        weft_conf(version, &self.subnet_file, &self.data_dir)
    }

    fn run(&self, command: &str, conf: &Value, c: &Netns, id: &str, ifname: &str) -> Answer {
        let netns = c.path().display().to_string();
        let a = Attach {
            container_id: id,
            netns: &netns,
            ifname,
        };
        self.call(command, conf, Some(&a))
    }

    /// Runs weft-cni in the node's namespace, as a runtime does.
    fn call(&self, command: &str, conf: &Value, attach: Option<&Attach<'_>>) -> Answer {
        call(&weft_cni().unwrap(), self.ns.name(), command, conf, attach).unwrap()
    }

    fn add(&self, c: &Netns, id: &str) -> Answer {
        self.run("ADD", &self.conf("1.0.0"), c, id, "eth0")
    }

    fn del(&self, c: &Netns, id: &str) -> Answer {
        self.run("DEL", &self.conf("1.0.0"), c, id, "eth0")
    }

    fn ips_in_store(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir.join("weft"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
            .collect()
    }

    fn host_veths(&self) -> usize {
        self.ns
            .ip(&["-o", "link", "show", "type", "veth"])
            .unwrap()
            .lines()
            .count()
    }
}

fn pinged(from: &Netns, to: &str) -> bool {
    weft_tests::netns::run(
        "ip",
        &[
            "netns",
            "exec",
            from.name(),
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            to,
        ],
    )
    .is_ok()
}

fn ip_of(a: &Answer) -> String {
    a.out["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn add_attaches_containers_that_reach_each_other_and_the_gateway() {
    let n = node("10.244.5.1/24", 1450);
    let (c1, c2) = (Netns::new("c1").unwrap(), Netns::new("c2").unwrap());
    let a1 = n.add(&c1, "container-one");
    assert!(a1.ok, "{:?}", a1);
    let a2 = n.add(&c2, "container-two");
    assert!(a2.ok, "{:?}", a2);
    let r = &a1.out;
    assert_eq!(r["cniVersion"], "1.0.0");
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 3);
    assert_eq!(ifs[0]["name"], "weft0");
    assert_eq!(ifs[2]["name"], "eth0");
    assert_eq!(ifs[2]["sandbox"], c1.path().display().to_string());
    assert_eq!(r["ips"][0]["gateway"], "10.244.5.1");
    assert_eq!(r["ips"][0]["interface"], 2);
    assert!(r["ips"][0]["address"].as_str().unwrap().ends_with("/24"));
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.244.5.1"}])
    );
    assert_ne!(ip_of(&a1), ip_of(&a2));
    // The container as the result says, checked with ip -j.
    let link = &c1.ip_json(&["link", "show", "eth0"]).unwrap()[0];
    assert_eq!(link["mtu"], 1450);
    assert_eq!(link["address"], ifs[2]["mac"]);
    let route = c1.ip_json(&["route", "show", "default"]).unwrap();
    assert_eq!(route[0]["gateway"], "10.244.5.1");
    let bridge = &n.ns.ip_json(&["-d", "link", "show", "weft0"]).unwrap()[0];
    assert_eq!(bridge["mtu"], 1450);
    let host_veth = ifs[1]["name"].as_str().unwrap();
    let port = &n.ns.ip_json(&["-d", "link", "show", host_veth]).unwrap()[0];
    assert_eq!(port["master"], "weft0");
    assert_eq!(port["linkinfo"]["info_slave_data"]["hairpin"], true);
    assert!(pinged(&c1, &ip_of(&a2)), "container to container");
    assert!(pinged(&c2, "10.244.5.1"), "container to gateway");
    // A third container does not change the bridge's MAC under the others.
    let mac_before = bridge["address"].clone();
    let c3 = Netns::new("c3").unwrap();
    assert!(n.add(&c3, "container-three").ok);
    assert_eq!(
        n.ns.ip_json(&["link", "show", "weft0"]).unwrap()[0]["address"],
        mac_before
    );
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn del_frees_the_address_and_is_idempotent() {
    let n = node("10.244.5.1/24", 1450);
    let c = Netns::new("c").unwrap();
    let a = n.add(&c, "x1");
    assert!(a.ok, "{a:?}");
    assert_eq!(n.ips_in_store(), vec![ip_of(&a)]);
    assert_eq!(n.host_veths(), 1);
    let d = n.del(&c, "x1");
    assert!(d.ok && d.out.is_null(), "{d:?}");
    assert!(n.ips_in_store().is_empty());
    assert_eq!(n.host_veths(), 0);
    assert!(
        c.ip(&["link", "show", "eth0"]).is_err(),
        "the container side went with the host side"
    );
    assert!(n.del(&c, "x1").ok, "a second DEL succeeds");
    // DEL after the namespace is gone, and without CNI_NETNS at all.
    let c2 = Netns::new("c2").unwrap();
    assert!(n.add(&c2, "x2").ok);
    let path = c2.path().display().to_string();
    drop(c2);
    let gone = Attach {
        container_id: "x2",
        netns: &path,
        ifname: "eth0",
    };
    assert!(n.call("DEL", &n.conf("1.0.0"), Some(&gone)).ok);
    let none = Attach {
        container_id: "x2",
        netns: "",
        ifname: "eth0",
    };
    assert!(n.call("DEL", &n.conf("1.0.0"), Some(&none)).ok);
    assert!(n.ips_in_store().is_empty());
    // DEL works when subnet.env has gone too (the node is being taken down).
    std::fs::remove_file(&n.subnet_file).unwrap();
    assert!(n.call("DEL", &n.conf("1.0.0"), Some(&none)).ok);
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn check_passes_on_a_good_attachment_and_says_what_is_wrong() {
    let n = node("10.244.5.1/24", 1450);
    let c = Netns::new("c").unwrap();
    let a = n.add(&c, "chk");
    assert!(a.ok);
    let mut conf = n.conf("1.0.0");
    conf["prevResult"] = a.out.clone();
    let ok = n.run("CHECK", &conf, &c, "chk", "eth0");
    assert!(ok.ok, "{ok:?}");
    c.ip(&["route", "del", "default"]).unwrap();
    let bad = n.run("CHECK", &conf, &c, "chk", "eth0");
    assert!(!bad.ok);
    assert_eq!(bad.code(), Some(102));
    assert!(bad.msg().contains("route 0.0.0.0/0"), "{}", bad.msg());
    c.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    c.ip(&["link", "set", "eth0", "mtu", "1400"]).unwrap();
    let bad = n.run("CHECK", &conf, &c, "chk", "eth0");
    assert!(
        bad.msg().contains("lacks address") && bad.msg().contains("MTU 1400"),
        "{}",
        bad.msg()
    );
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.3.1");
    assert_eq!(n.run("CHECK", &old, &c, "chk", "eth0").code(), Some(1));
    let mut no_prev = n.conf("1.0.0");
    no_prev.as_object_mut().unwrap().remove("prevResult");
    assert_eq!(n.run("CHECK", &no_prev, &c, "chk", "eth0").code(), Some(7));
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn fifty_parallel_adds_get_fifty_addresses_and_dels_empty_the_store() {
    let n = node("10.244.5.1/24", 1450);
    let containers: Vec<Netns> = (0..50)
        .map(|i| Netns::new(&format!("p{i}")).unwrap())
        .collect();
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let n = &n;
                s.spawn(move || n.add(c, &format!("par-{i}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        assert!(a.ok, "{a:?}");
    }
    let ips: HashSet<String> = answers.iter().map(ip_of).collect();
    assert_eq!(ips.len(), 50);
    assert_eq!(n.ips_in_store().len(), 50);
    std::thread::scope(|s| {
        for (i, c) in containers.iter().enumerate() {
            let n = &n;
            s.spawn(move || assert!(n.del(c, &format!("par-{i}")).ok));
        }
    });
    assert!(n.ips_in_store().is_empty());
    assert_eq!(n.host_veths(), 0);
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn bad_input_gets_the_right_error_and_leaves_nothing_behind() {
    let n = node("10.244.5.1/29", 1450);
    let c = Netns::new("c").unwrap();
    let plugin = weft_cni().unwrap();
    let path = c.path().display().to_string();
    let at = |id: &'static str, ifname: &'static str| (id, ifname);
    let run = |conf: &Value, (id, ifname): (&str, &str), netns: &str| {
        call(
            &plugin,
            n.ns.name(),
            "ADD",
            conf,
            Some(&Attach {
                container_id: id,
                netns,
                ifname,
            }),
        )
        .unwrap()
    };
    // Malformed configuration.
    let bad = call(
        &plugin,
        n.ns.name(),
        "ADD",
        &json!("{not json"),
        Some(&Attach {
            container_id: "a",
            netns: &path,
            ifname: "eth0",
        }),
    )
    .unwrap();
    assert_eq!(bad.code(), Some(6), "{bad:?}");
    // No subnet.env: try again later.
    let mut conf = n.conf("1.0.0");
    conf["subnetFile"] = json!("/nonexistent/subnet.env");
    let r = run(&conf, at("a", "eth0"), &path);
    assert_eq!(r.code(), Some(11));
    assert!(r.msg().contains("weft-node"), "{}", r.msg());
    // A namespace that does not exist.
    let r = run(
        &n.conf("1.0.0"),
        at("a", "eth0"),
        "/run/netns/does-not-exist",
    );
    assert_eq!(r.code(), Some(3), "{r:?}");
    // An interface name that is too long.
    let r = run(&n.conf("1.0.0"), at("a", "averyveryverylongname"), &path);
    assert_eq!(r.code(), Some(4));
    // An interface name already present in the container.
    c.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other",
    ])
    .unwrap();
    let r = run(&n.conf("1.0.0"), at("a", "eth0"), &path);
    assert_eq!(r.code(), Some(100), "{r:?}");
    assert!(r.msg().contains("already exists"));
    assert!(
        n.ips_in_store().is_empty() && n.host_veths() == 0,
        "nothing half-made"
    );
    // An exhausted subnet: a /29 has five addresses for containers.
    let cs: Vec<Netns> = (0..5)
        .map(|i| Netns::new(&format!("x{i}")).unwrap())
        .collect();
    for (i, ci) in cs.iter().enumerate() {
        assert!(n.add(ci, &format!("full-{i}")).ok);
    }
    let sixth = Netns::new("sixth").unwrap();
    let r = n.add(&sixth, "full-6");
    assert_eq!(r.code(), Some(101), "{r:?}");
    assert!(r.msg().contains("no free address"), "{}", r.msg());
    assert_eq!(n.ips_in_store().len(), 5);
    assert_eq!(n.host_veths(), 5);
    assert!(sixth.ip(&["link", "show", "eth0"]).is_err());
    // Unknown command, unsupported version.
    let r = call(&plugin, n.ns.name(), "FROB", &n.conf("1.0.0"), None).unwrap();
    assert_eq!(r.code(), Some(4));
    let r = call(
        &plugin,
        n.ns.name(),
        "ADD",
        &n.conf("2.0.0"),
        Some(&Attach {
            container_id: "v",
            netns: &path,
            ifname: "eth1",
        }),
    )
    .unwrap();
    assert_eq!(r.code(), Some(1));
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn older_spec_versions_get_results_in_their_shape() {
    let n = node("10.244.5.1/24", 1450);
    for (i, v) in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let c = Netns::new("v").unwrap();
        let a = n.run("ADD", &n.conf(v), &c, &format!("ver-{i}"), "eth0");
        assert!(a.ok, "{v}: {a:?}");
        assert_eq!(a.out["cniVersion"], *v);
        let has_version = a.out["ips"][0].get("version").is_some();
        assert_eq!(has_version, v.starts_with("0."), "{v}: {}", a.out);
        assert!(n.run("DEL", &n.conf(v), &c, &format!("ver-{i}"), "eth0").ok);
    }
    let v = n.call("VERSION", &json!({"cniVersion": "0.4.0"}), None);
    assert_eq!(v.out["cniVersion"], "0.4.0");
    assert!(v.out["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn status_and_gc_from_cni_1_1() {
    let n = node("10.244.5.1/24", 1450);
    let plugin = weft_cni().unwrap();
    assert!(
        call(&plugin, n.ns.name(), "STATUS", &n.conf("1.1.0"), None)
            .unwrap()
            .ok
    );
    let (c1, c2) = (Netns::new("g1").unwrap(), Netns::new("g2").unwrap());
    let keep = n.run("ADD", &n.conf("1.1.0"), &c1, "keep", "eth0");
    let lose = n.run("ADD", &n.conf("1.1.0"), &c2, "lose", "eth0");
    assert!(keep.ok && lose.ok);
    let mut gc = n.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    assert!(call(&plugin, n.ns.name(), "GC", &gc, None).unwrap().ok);
    assert_eq!(n.ips_in_store(), vec![ip_of(&keep)]);
    assert_eq!(n.host_veths(), 1);
    // The node's lease ran out (weft-node writes when): STATUS says no,
    // ADD refuses, DEL still works.
    let text = std::fs::read_to_string(&n.subnet_file).unwrap();
    std::fs::write(&n.subnet_file, format!("{text}WEFT_LEASE_EXPIRES=1000\n")).unwrap();
    let s = call(&plugin, n.ns.name(), "STATUS", &n.conf("1.1.0"), None).unwrap();
    assert_eq!(s.code(), Some(50), "{s:?}");
    assert!(s.msg().contains("ran out"), "{s:?}");
    let c3 = Netns::new("g3").unwrap();
    let refused = n.run("ADD", &n.conf("1.1.0"), &c3, "late", "eth0");
    assert_eq!(refused.code(), Some(11), "{refused:?}");
    assert!(refused.msg().contains("no new containers"), "{refused:?}");
    assert!(n.run("DEL", &n.conf("1.1.0"), &c1, "keep", "eth0").ok);
    // A lease that runs out later is fine.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    std::fs::write(
        &n.subnet_file,
        format!("{text}WEFT_LEASE_EXPIRES={later}\n"),
    )
    .unwrap();
    assert!(
        call(&plugin, n.ns.name(), "STATUS", &n.conf("1.1.0"), None)
            .unwrap()
            .ok
    );
    std::fs::remove_file(&n.subnet_file).unwrap();
    let s = call(&plugin, n.ns.name(), "STATUS", &n.conf("1.1.0"), None).unwrap();
    assert_eq!(s.code(), Some(50), "{s:?}");
    assert_eq!(
        call(&plugin, n.ns.name(), "STATUS", &n.conf("1.0.0"), None)
            .unwrap()
            .code(),
        Some(1)
    );
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_host_veth_is_removed_only_when_it_is_the_containers() {
    let n = node("10.244.5.1/24", 1450);
    let c = Netns::new("own").unwrap();
    // The host side's name of attachment "probe", as weft-cni chose it.
    let first = n.add(&c, "probe");
    assert!(first.ok, "{first:?}");
    let name = first.out["interfaces"][1]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(name.len(), 15, "{name}");
    let alias = n.ns.ip(&["-o", "link", "show", &name]).unwrap();
    assert!(alias.contains("alias weft:eth0:probe"), "{alias}");
    assert!(n.del(&c, "probe").ok);
    assert_eq!(n.host_veths(), 0);

    let exists = |link: &str| n.ns.ip(&["link", "show", link]).is_ok();
    // Something else holds the name: ADD refuses and DEL leaves it.
    // (This kernel has no dummy links; a VXLAN device will do.)
    n.ns.ip(&[
        "link", "add", &name, "type", "vxlan", "id", "42", "dstport", "4789",
    ])
    .unwrap();
    let r = n.add(&c, "probe");
    assert_eq!(r.code(), Some(100), "{r:?}");
    assert!(
        r.msg().contains("left alone") && r.msg().contains("vxlan"),
        "{r:?}"
    );
    assert!(n.ips_in_store().is_empty());
    let d = n.del(&c, "probe");
    assert!(d.ok, "{d:?}");
    assert!(d.stderr.contains("left alone"), "{d:?}");
    assert!(exists(&name), "the VXLAN device must stay");
    n.ns.ip(&["link", "del", &name]).unwrap();

    // Another attachment's veth (marked for it) stays too, even on weft0.
    let other_ns = Netns::new("other").unwrap();
    let other = n.add(&other_ns, "other");
    assert!(other.ok, "{other:?}");
    n.ns.ip(&[
        "link", "add", &name, "type", "veth", "peer", "name", "p-probe",
    ])
    .unwrap();
    n.ns.ip(&[
        "link",
        "set",
        &name,
        "alias",
        "weft:eth0:someone-else",
        "master",
        "weft0",
    ])
    .unwrap();
    assert!(n.del(&c, "probe").ok);
    assert!(exists(&name), "another container's veth must stay");
    // Unmarked on weft0 (an older weft-cni's, or an ADD that stopped before
    // marking it): the attachment's, removed.
    n.ns.ip(&["link", "set", &name, "alias", ""]).unwrap();
    assert!(n.del(&c, "probe").ok);
    assert!(
        !exists(&name),
        "an unmarked veth on weft0 with the name is ours"
    );

    // CHECK notices a host side that is not the attachment's.
    let other_veth = other.out["interfaces"][1]["name"]
        .as_str()
        .unwrap()
        .to_string();
    n.ns.ip(&["link", "set", &other_veth, "alias", "weft:eth0:intruder"])
        .unwrap();
    let mut conf = n.conf("1.0.0");
    conf["prevResult"] = other.out.clone();
    let checked = n.run("CHECK", &conf, &other_ns, "other", "eth0");
    assert_eq!(checked.code(), Some(102), "{checked:?}");
    assert!(
        checked.msg().contains("not this attachment's"),
        "{checked:?}"
    );
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn tiny_subnets_and_a_weft0_that_is_not_a_bridge_are_clear_errors() {
    let plugin = weft_cni().unwrap();
    for tiny in ["10.244.5.0/31", "10.244.5.7/32"] {
        let n = node(tiny, 1450);
        let c = Netns::new("tiny").unwrap();
        let r = n.add(&c, "t");
        assert_eq!(r.code(), Some(7), "{tiny}: {r:?}");
        assert!(r.msg().contains("too small"), "{tiny}: {r:?}");
        let s = call(&plugin, n.ns.name(), "STATUS", &n.conf("1.1.0"), None).unwrap();
        assert_eq!(s.code(), Some(50), "{tiny}: {s:?}");
        assert!(n.ips_in_store().is_empty() && n.host_veths() == 0);
    }
    let n = node("10.244.5.1/24", 1450);
    n.ns.ip(&[
        "link",
        "add",
        "weft0",
        "type",
        "veth",
        "peer",
        "name",
        "weft0-peer",
    ])
    .unwrap();
    let c = Netns::new("nobr").unwrap();
    let r = n.add(&c, "b");
    assert!(!r.ok, "{r:?}");
    assert!(
        r.msg().contains("not a bridge") && r.msg().contains("veth"),
        "{r:?}"
    );
    assert!(n.ips_in_store().is_empty(), "nothing half-made");
    assert_eq!(n.host_veths(), 2, "only weft0 and its peer");
    let kind = n.ns.ip(&["-d", "link", "show", "weft0"]).unwrap();
    assert!(kind.contains("veth"), "weft0 left as it was: {kind}");
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_dual_stack_node_gives_containers_both_families() {
    // What weft-node writes for a dual-stack lease (our own ULA range).
    let n = node("10.244.5.1/24", 1450);
    std::fs::write(
        &n.subnet_file,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\n\
         FLANNEL_IPV6_NETWORK=fdc6:7765:6674::/48\nFLANNEL_IPV6_SUBNET=fdc6:7765:6674:5::1/64\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let (c1, c2) = (Netns::new("c1").unwrap(), Netns::new("c2").unwrap());
    let a1 = n.add(&c1, "dual-one");
    assert!(a1.ok, "{a1:?}");
    let a2 = n.add(&c2, "dual-two");
    assert!(a2.ok, "{a2:?}");
    let r = &a1.out;
    let ips = r["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 2, "{r}");
    assert_eq!(ips[0]["gateway"], "10.244.5.1");
    assert_eq!(ips[1]["gateway"], "fdc6:7765:6674:5::1");
    assert_eq!(ips[1]["address"], "fdc6:7765:6674:5::2/64");
    assert_eq!(ips[1]["interface"], 2);
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.244.5.1"}, {"dst": "::/0", "gw": "fdc6:7765:6674:5::1"}])
    );
    // In the container: both addresses (the IPv6 one usable at once, not
    // tentative), both default routes; the bridge holds both gateways.
    let addrs = c1.ip_json(&["addr", "show", "dev", "eth0"]).unwrap()[0]["addr_info"].clone();
    let v6 = addrs
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["local"] == "fdc6:7765:6674:5::2")
        .unwrap_or_else(|| panic!("{addrs}"));
    assert!(v6.get("tentative").is_none(), "{v6}");
    let route6 = c1.ip_json(&["-6", "route", "show", "default"]).unwrap();
    assert_eq!(route6[0]["gateway"], "fdc6:7765:6674:5::1");
    let bridge = n.ns.ip(&["addr", "show", "dev", "weft0"]).unwrap();
    assert!(
        bridge.contains("10.244.5.1/24") && bridge.contains("fdc6:7765:6674:5::1/64"),
        "{bridge}"
    );
    let ip6 = |a: &Answer| {
        a.out["ips"][1]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    assert!(pinged(&c1, &ip6(&a2)), "container to container over IPv6");
    assert!(
        pinged(&c2, "fdc6:7765:6674:5::1"),
        "container to its IPv6 gateway"
    );
    assert!(pinged(&c1, &ip_of(&a2)), "and over IPv4");
    // CHECK knows both; host-local's layout keeps both; DEL frees both.
    let mut conf = n.conf("1.0.0");
    conf["prevResult"] = a1.out.clone();
    let ok = n.run("CHECK", &conf, &c1, "dual-one", "eth0");
    assert!(ok.ok, "{ok:?}");
    c1.ip(&["-6", "route", "del", "default"]).unwrap();
    let bad = n.run("CHECK", &conf, &c1, "dual-one", "eth0");
    assert!(bad.msg().contains("route ::/0"), "{}", bad.msg());
    let store = n.data_dir.join("weft");
    for f in [
        "fdc6:7765:6674:5::2",
        "fdc6:7765:6674:5::3",
        "last_reserved_ip.1",
    ] {
        assert!(store.join(f).exists(), "{f}");
    }
    assert!(n.del(&c1, "dual-one").ok);
    assert!(!store.join("fdc6:7765:6674:5::2").exists());
    assert!(!store.join(ip_of(&a1)).exists());
    // A runtime that switches IPv6 off in its namespaces (new devices get
    // disable_ipv6=1): weft-cni turns it on for the container's interface.
    let c4 = Netns::new("c4").unwrap();
    weft_tests::netns::run(
        "ip",
        &[
            "netns",
            "exec",
            c4.name(),
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    )
    .unwrap();
    let a4 = n.add(&c4, "dual-four");
    assert!(a4.ok, "{a4:?}");
    assert!(
        pinged(&c4, "fdc6:7765:6674:5::1"),
        "IPv6 works in that namespace"
    );
    // Version 0.3.1 results say which family each address is.
    let c3 = Netns::new("c3").unwrap();
    let old = n.run("ADD", &n.conf("0.3.1"), &c3, "dual-three", "eth0");
    assert!(old.ok, "{old:?}");
    assert_eq!(old.out["ips"][0]["version"], "4");
    assert_eq!(old.out["ips"][1]["version"], "6");
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn an_ipv6_only_node_gives_containers_ipv6_only() {
    let n = node("10.244.5.1/24", 1450);
    std::fs::write(
        &n.subnet_file,
        "FLANNEL_IPV6_NETWORK=fdc6:7765:6675::/48\nFLANNEL_IPV6_SUBNET=fdc6:7765:6675:5::1/64\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let (c1, c2) = (Netns::new("c1").unwrap(), Netns::new("c2").unwrap());
    let (a1, a2) = (n.add(&c1, "six-one"), n.add(&c2, "six-two"));
    assert!(a1.ok && a2.ok, "{a1:?} {a2:?}");
    assert_eq!(
        a1.out["ips"],
        json!([{"address": "fdc6:7765:6675:5::2/64", "gateway": "fdc6:7765:6675:5::1", "interface": 2}])
    );
    assert_eq!(
        a1.out["routes"],
        json!([{"dst": "::/0", "gw": "fdc6:7765:6675:5::1"}])
    );
    let v4 = c1.ip(&["-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(!v4.contains("inet "), "{v4}");
    assert!(pinged(&c1, "fdc6:7765:6675:5::3"));
    let mut conf = n.conf("1.1.0");
    conf["prevResult"] = a1.out.clone();
    assert!(n.run("CHECK", &conf, &c1, "six-one", "eth0").ok);
    assert!(n.call("STATUS", &n.conf("1.1.0"), None).ok);
    // An IPv6 subnet outside the IPv6 network, or link-local: refused.
    for (subnet, says) in [
        ("fdc6:7765:9999:5::1/64", "not inside the network"),
        ("fe80::1/64", "not a unicast IPv6 network"),
    ] {
        std::fs::write(
            &n.subnet_file,
            format!(
                "FLANNEL_IPV6_NETWORK=fdc6:7765:6675::/48\nFLANNEL_IPV6_SUBNET={subnet}\n\
                 FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
            ),
        )
        .unwrap();
        let c = Netns::new("cbad").unwrap();
        let refused = n.add(&c, "six-bad");
        assert_eq!(refused.code(), Some(7), "{refused:?}");
        assert!(refused.msg().contains(says), "{}", refused.msg());
    }
    // Neither family: try again later, saying so.
    std::fs::write(&n.subnet_file, "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n").unwrap();
    let c3 = Netns::new("c3").unwrap();
    let none = n.add(&c3, "six-three");
    assert_eq!(none.code(), Some(11), "{none:?}");
    assert!(
        none.msg()
            .contains("neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET"),
        "{}",
        none.msg()
    );
}
