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
