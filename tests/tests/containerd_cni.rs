//! A real container runtime uses weft-cni: containerd's `ctr run --cni`
//! with deploy/10-weft.conflist (weft-cni, then portmap) in /etc/cni/net.d,
//! on a lab host; the container
//! reaches a pod on another host and is reached from it, and ctr's DEL on
//! exit frees the address. Needs root and Debian's containerd, runc and
//! busybox-static (scripts/test installs them).

use std::time::{Duration, Instant};
use weft_tests::containerd::Containerd;
use weft_tests::lab::{Lab, LabConfig};
use weft_tests::netns::require_root;

const IMAGE: &str = "weft.test/busybox:local";

/// The address the IPAM store of host 1 holds for container `id`.
fn stored_ip(store: &std::path::Path, id: &str) -> Option<String> {
    std::fs::read_dir(store).ok()?.flatten().find_map(|e| {
        let text = std::fs::read_to_string(e.path()).ok()?;
        (text.lines().next()? == id).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn ctr_run_cni_container_reaches_a_pod_on_another_host() {
    require_root();
    let lab = Lab::up(LabConfig::for_test(2, "vxlan")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host1 = lab.host(1).unwrap().ns.clone();
    let mut containerd = Containerd::start(&dir.path().join("containerd"), &host1).unwrap();
    let image = dir.path().join("busybox-oci.tar");
    weft_tests::oci::busybox_image(IMAGE, &image).unwrap();
    containerd.import(&image).unwrap();

    // The documented config (deploy/10-weft.conflist: weft-cni, then
    // portmap) in /etc/cni/net.d, pointed at lab host 1's subnet.env and
    // IPAM store; the plugins in /opt/cni/bin.
    let conf_dir = dir.path().join("net.d");
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&bin_dir).unwrap();
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/10-weft.conflist");
    let mut conflist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy).unwrap()).unwrap();
    let lab_conf = lab.cni_conf(1);
    conflist["plugins"][0]["subnetFile"] = lab_conf["subnetFile"].clone();
    conflist["plugins"][0]["dataDir"] = lab_conf["dataDir"].clone();
    std::fs::write(conf_dir.join("10-weft.conflist"), conflist.to_string()).unwrap();
    std::os::unix::fs::symlink(
        weft_tests::cni::weft_cni().unwrap(),
        bin_dir.join("weft-cni"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        weft_tests::cni::reference("portmap").unwrap(),
        bin_dir.join("portmap"),
    )
    .unwrap();

    // The container pings the pod on host 2, then waits to be told to exit.
    let peer = lab.host(2).unwrap().pods[0].clone();
    let script = format!(
        "ping -c 3 -W 2 {} || exit 7; while [ ! -e /tmp/done ]; do sleep 1; done",
        peer.ip
    );
    let log = dir.path().join("ctr.log");
    let mut ctr = containerd
        .run_cni(
            &conf_dir,
            &bin_dir,
            &[IMAGE, "c1", "sh", "-c", &script],
            &log,
        )
        .unwrap();
    let fail = |what: &str, c: &Containerd| -> ! {
        panic!(
            "{what}\nctr stdout:\n{}\nctr stderr:\n{}\ncontainerd log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default(),
            c.log_tail(20)
        )
    };

    // ctr ran weft-cni ADD: the container's address is in host 1's store,
    // under go-cni's id "<namespace>-<container>".
    let store = lab.dir().join("h1-cni").join("weft");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ip = loop {
        if let Some(ip) = stored_ip(&store, "default-c1") {
            break ip;
        }
        if Instant::now() > deadline {
            fail("the container never got an address", &containerd);
        }
        if let Some(st) = ctr.try_wait().unwrap() {
            fail(&format!("ctr exited early ({st})"), &containerd);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let subnet = lab.host(1).unwrap().subnet.unwrap();
    assert!(
        subnet.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()),
        "{ip} outside {subnet}"
    );
    // The pod on host 2 reaches the container.
    if !lab.reaches(&peer.ns, ip.parse::<std::net::IpAddr>().unwrap()) {
        fail(
            &format!("{} does not reach the container at {ip}", peer.ip),
            &containerd,
        );
    }
    containerd
        .ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            "done",
            "c1",
            "touch",
            "/tmp/done",
        ])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = ctr.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            fail("the container did not exit", &containerd);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Exit 0: the container's own pings to host 2 got answers.
    if !status.success() {
        fail(&format!("ctr run ended with {status}"), &containerd);
    }
    // ctr ran weft-cni DEL on the way out: address released, veth gone.
    assert_eq!(stored_ip(&store, "default-c1"), None);
    let ports = lab
        .host_ip(1, &["-j", "link", "show", "master", "weft0"])
        .unwrap();
    let ports: serde_json::Value = serde_json::from_str(&ports).unwrap();
    assert_eq!(
        ports.as_array().unwrap().len(),
        1,
        "only the lab's pod is left: {ports}"
    );
}

/// The conflist of deploy/ for lab host `i`, the container's name in
/// `args.cni.aliases` (ctr passes no CNI_ARGS or capabilities), weft-cni
/// and portmap in a bin dir; returns (conf dir, bin dir).
fn named_conf(
    lab: &Lab,
    i: u32,
    name: &str,
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let conf_dir = dir.join(format!("net.d-{i}"));
    let bin_dir = dir.join(format!("bin-{i}"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&bin_dir).unwrap();
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/10-weft.conflist");
    let mut conflist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy).unwrap()).unwrap();
    let lab_conf = lab.cni_conf(i);
    for k in ["subnetFile", "dataDir", "nodeSocket"] {
        conflist["plugins"][0][k] = lab_conf[k].clone();
    }
    conflist["plugins"][0]["args"] = serde_json::json!({"cni": {"aliases": [name]}});
    std::fs::write(conf_dir.join("10-weft.conflist"), conflist.to_string()).unwrap();
    for (link, target) in [
        ("weft-cni", weft_tests::cni::weft_cni().unwrap()),
        ("portmap", weft_tests::cni::reference("portmap").unwrap()),
    ] {
        std::os::unix::fs::symlink(target, bin_dir.join(link)).unwrap();
    }
    (conf_dir, bin_dir)
}

/// A container that finds `peer` by name through its node's name server
/// (the bridge gateway), pings it, prints `PEER=<address>`, then waits to
/// be told to exit.
fn finder(peer: &str) -> String {
    format!(
        r#"gw=$(ip route | awk '/^default/ {{print $3}}')
n=0
while :; do
  a=$(nslookup -type=a {peer}.weft $gw 2>/dev/null | awk '/^Address/ {{x=$NF}} END {{print x}}')
  case "$a" in *:*|"") ;; *) break ;; esac
  n=$((n+1)); [ $n -gt 60 ] && exit 6; sleep 1
done
echo "PEER=$a"
ping -c 3 -W 2 "$a" || exit 7
while [ ! -e /tmp/done ]; do sleep 1; done"#
    )
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn ctr_run_cni_containers_on_two_hosts_find_each_other_by_name() {
    require_root();
    let lab = Lab::up(LabConfig::for_test(2, "vxlan")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("busybox-oci.tar");
    weft_tests::oci::busybox_image(IMAGE, &image).unwrap();
    let mut runs = Vec::new();
    for (i, me, peer) in [(1u32, "alpha", "beta"), (2, "beta", "alpha")] {
        let ns = lab.host(i).unwrap().ns.clone();
        let mut c = Containerd::start(&dir.path().join(format!("containerd-{i}")), &ns).unwrap();
        c.import(&image).unwrap();
        let (conf_dir, bin_dir) = named_conf(&lab, i, me, dir.path());
        let log = dir.path().join(format!("ctr-{i}.log"));
        let child = c
            .run_cni(
                &conf_dir,
                &bin_dir,
                &[IMAGE, me, "sh", "-c", &finder(peer)],
                &log,
            )
            .unwrap();
        runs.push((i, me, c, child, log));
    }
    let report = |runs: &[(
        u32,
        &str,
        Containerd,
        std::process::Child,
        std::path::PathBuf,
    )]| {
        runs.iter()
            .map(|(i, me, c, _, log)| {
                format!(
                    "{me} on host {i}: stdout {:?} stderr {:?}\ncontainerd: {}",
                    std::fs::read_to_string(log).unwrap_or_default(),
                    std::fs::read_to_string(log.with_extension("err")).unwrap_or_default(),
                    c.log_tail(10)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Each finds the other by name: the address the other's store holds.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let found = runs
            .iter()
            .filter(|(_, _, _, _, log)| {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .contains("PEER=")
            })
            .count();
        if found == 2 {
            break;
        }
        if Instant::now() > deadline || runs.iter_mut().any(|r| r.3.try_wait().unwrap().is_some()) {
            panic!("the containers did not find each other\n{}", report(&runs));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    for (i, me, _, _, log) in &runs {
        let other = if *i == 1 { 2 } else { 1 };
        let other_id = if *me == "alpha" {
            "default-beta"
        } else {
            "default-alpha"
        };
        let store = lab.dir().join(format!("h{other}-cni")).join("weft");
        let want = stored_ip(&store, other_id).expect("the other container's address");
        let out = std::fs::read_to_string(log).unwrap();
        assert!(out.contains(&format!("PEER={want}\n")), "{me}: {out}");
    }
    for (_, me, c, _, _) in &runs {
        c.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            "done",
            me,
            "touch",
            "/tmp/done",
        ])
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for r in runs.iter_mut() {
        let status = loop {
            if let Some(st) = r.3.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "{} did not exit", r.1);
            std::thread::sleep(Duration::from_millis(200));
        };
        // Exit 0: the pings to the address found by name were answered.
        assert!(status.success(), "{} ended with {status}", r.1);
    }
    // ctr's DEL withdrew both names.
    let pod1 = lab.host(1).unwrap().pods[0].ns.clone();
    let gw = std::net::IpAddr::V4(lab.gateway(1).unwrap());
    lab.wait_for(Duration::from_secs(30), "the names to be withdrawn", || {
        Ok(weft_tests::dns::addresses(&pod1, gw, "beta.weft.")?
            == Err(hickory_proto::op::ResponseCode::NXDomain))
    })
    .unwrap();
}
