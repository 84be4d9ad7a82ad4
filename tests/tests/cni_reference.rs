//! weft-cni next to the reference plugins (Debian's containernetworking-
//! plugins): the same shape of result and an equivalent container as
//! bridge + host-local; and chained before portmap. Needs root.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use weft_tests::cni::{call, reference, weft_cni, weft_conf, Attach};
use weft_tests::netns::{in_ns, require_root, run, Netns};

fn host() -> (Netns, tempfile::TempDir) {
    require_root();
    let ns = Netns::new("refhost").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    (ns, dir)
}

fn reference_conf(dir: &std::path::Path) -> Value {
    weft_tests::cni::reference_conf(
        &dir.join("ref-networks"),
        "10.244.6.0/24",
        "10.244.6.1",
        1450,
    )
}

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

/// What a container looks like from inside: MTU, address prefix, default gateway.
fn container_view(c: &Netns) -> (u64, u64, String) {
    let link = &c.ip_json(&["link", "show", "eth0"]).unwrap()[0];
    let addr = &c.ip_json(&["-4", "addr", "show", "eth0"]).unwrap()[0]["addr_info"][0];
    let gw = c.ip_json(&["route", "show", "default"]).unwrap()[0]["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    (
        link["mtu"].as_u64().unwrap(),
        addr["prefixlen"].as_u64().unwrap(),
        gw,
    )
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn same_shape_and_equivalent_container_as_bridge_and_host_local() {
    let (ns, dir) = host();
    let (cw, cr) = (Netns::new("cw").unwrap(), Netns::new("cr").unwrap());
    let pw = cw.path().display().to_string();
    let pr = cr.path().display().to_string();
    let ours = call(
        &weft_cni().unwrap(),
        ns.name(),
        "ADD",
        &weft_conf(
            "1.0.0",
            &dir.path().join("subnet.env"),
            &dir.path().join("networks"),
        ),
        Some(&Attach {
            container_id: "w",
            netns: &pw,
            ifname: "eth0",
        }),
    )
    .unwrap();
    let theirs = call(
        &reference("bridge").unwrap(),
        ns.name(),
        "ADD",
        &reference_conf(dir.path()),
        Some(&Attach {
            container_id: "r",
            netns: &pr,
            ifname: "eth0",
        }),
    )
    .unwrap();
    assert!(ours.ok, "{ours:?}");
    assert!(theirs.ok, "{theirs:?}");
    let (o, t) = (&ours.out, &theirs.out);
    let both = format!("weft-cni: {o}\nreference: {t}");
    assert_eq!(keys(o), keys(t), "{both}");
    assert_eq!(
        o["interfaces"].as_array().unwrap().len(),
        t["interfaces"].as_array().unwrap().len(),
        "{both}"
    );
    for (a, b) in o["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .zip(t["interfaces"].as_array().unwrap())
    {
        assert_eq!(keys(a), keys(b), "{both}");
    }
    assert_eq!(o["ips"].as_array().unwrap().len(), 1);
    assert_eq!(keys(&o["ips"][0]), keys(&t["ips"][0]), "{both}");
    assert_eq!(o["ips"][0]["interface"], t["ips"][0]["interface"], "{both}");
    let prefix = |v: &Value| {
        v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(prefix(o), prefix(t));
    let default = |v: &Value| {
        v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "0.0.0.0/0")
    };
    assert!(default(o) && default(t), "{both}");
    // Inside the containers: the same MTU, prefix length and a default route
    // via their gateway.
    let (wm, wp, wg) = container_view(&cw);
    let (rm, rp, rg) = container_view(&cr);
    assert_eq!((wm, wp), (rm, rp));
    assert_eq!(wg, o["ips"][0]["gateway"].as_str().unwrap());
    assert_eq!(rg, t["ips"][0]["gateway"].as_str().unwrap());
    // On the host: both ports are on their bridge with hairpin on.
    for (r, br) in [(o, "weft0"), (t, "cni0")] {
        let port = r["interfaces"][1]["name"].as_str().unwrap();
        let l = &ns.ip_json(&["-d", "link", "show", port]).unwrap()[0];
        assert_eq!(l["master"], br);
        assert_eq!(l["linkinfo"]["info_slave_data"]["hairpin"], true);
    }
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn portmap_chains_after_weft_cni_and_forwards_traffic() {
    let (ns, dir) = host();
    weft_tests::bins::system_tool("iptables", "iptables").unwrap();
    // A client outside the node, on the underlay: 198.18.77.2 -> node 198.18.77.1.
    let (server, outside) = (Netns::new("srv").unwrap(), Netns::new("out").unwrap());
    ns.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "up1",
        "netns",
        outside.name(),
    ])
    .unwrap();
    ns.ip(&["addr", "add", "198.18.77.1/24", "dev", "up0"])
        .unwrap();
    ns.ip(&["link", "set", "up0", "up"]).unwrap();
    outside
        .ip(&["addr", "add", "198.18.77.2/24", "dev", "up1"])
        .unwrap();
    outside.ip(&["link", "set", "up1", "up"]).unwrap();
    // The node daemon turns forwarding on; here the test does.
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns.name(),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )
    .unwrap();
    let wconf = weft_conf(
        "1.0.0",
        &dir.path().join("subnet.env"),
        &dir.path().join("networks"),
    );
    let spath = server.path().display().to_string();
    let s_at = Attach {
        container_id: "server",
        netns: &spath,
        ifname: "eth0",
    };
    let ours = call(&weft_cni().unwrap(), ns.name(), "ADD", &wconf, Some(&s_at)).unwrap();
    assert!(ours.ok, "{ours:?}");
    // The runtime hands portmap our result as prevResult.
    let pconf = json!({
        "cniVersion": "1.0.0", "name": "weft", "type": "portmap", "snat": true,
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
        "prevResult": ours.out,
    });
    let pm = call(
        &reference("portmap").unwrap(),
        ns.name(),
        "ADD",
        &pconf,
        Some(&s_at),
    )
    .unwrap();
    assert!(pm.ok, "portmap rejected weft-cni's result: {pm:?}");
    assert_eq!(
        pm.out["ips"], ours.out["ips"],
        "portmap passes our result on"
    );
    // Traffic to the node's port 8080 reaches the server container's port 80.
    let listener = in_ns(server.name(), || TcpListener::bind(("0.0.0.0", 80)))
        .unwrap()
        .unwrap();
    let accept = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(b"through portmap").unwrap();
        peer
    });
    let got = in_ns(outside.name(), || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(
            &"198.18.77.1:8080".parse().unwrap(),
            Duration::from_secs(5),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })
    .unwrap()
    .unwrap();
    let peer = accept.join().unwrap();
    assert_eq!(got, "through portmap");
    assert_eq!(
        peer.ip().to_string(),
        "198.18.77.2",
        "the container sees the real client"
    );
    // DEL in reverse order, as a runtime does; portmap's rules go away.
    assert!(
        call(
            &reference("portmap").unwrap(),
            ns.name(),
            "DEL",
            &pconf,
            Some(&s_at)
        )
        .unwrap()
        .ok
    );
    let nat = run(
        "ip",
        &["netns", "exec", ns.name(), "iptables", "-t", "nat", "-S"],
    )
    .unwrap();
    assert!(!nat.contains("8080"), "portmap left rules behind:\n{nat}");
    let mut wdel = wconf.clone();
    wdel["prevResult"] = ours.out.clone();
    assert!(
        call(&weft_cni().unwrap(), ns.name(), "DEL", &wdel, Some(&s_at))
            .unwrap()
            .ok
    );
    assert!(ns
        .ip_json(&["link", "show", "master", "weft0"])
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
}
