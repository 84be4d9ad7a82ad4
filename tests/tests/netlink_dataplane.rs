//! The netlink dataplane in throwaway namespaces, checked with `ip -j` and
//! `bridge -j`. Needs root; run by scripts/test.

use serde_json::Value;
use std::sync::Arc;
use weft_backends::peer::{select_leases as select, HostView};
use weft_backends::{
    diff, route_metric, vtep_mac, Backend, Change, Dataplane, ExternalIface, HostGw, LocalNode,
    NetlinkDataplane, Vxlan,
};
use weft_backends::{LinkChange, RouteChange};
use weft_config::{NetworkConfig, VxlanConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, Lease, LeaseAttrs};
use weft_tests::netns::{require_root, Netns};

/// A namespace with an "eth0" on 198.18.0.11/16 (a veth whose other end,
/// "wire0", stays in the namespace; this kernel has no dummy driver).
fn host() -> Netns {
    require_root();
    let ns = Netns::new("dp").unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "wire0",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "198.18.0.11/16", "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "wire0", "up"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns
}

fn local(ns: &Netns) -> LocalNode {
    let idx = ns.ip_json(&["link", "show", "eth0"]).unwrap()[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    LocalNode::new(
        "host-1",
        "10.244.1.0-24".parse().unwrap(),
        "198.18.0.11".parse().unwrap(),
        ExternalIface {
            name: "eth0".into(),
            index: idx,
            mtu: 1500,
            addr: "198.18.0.11/16".parse().unwrap(),
        },
        Arc::new(NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap()),
    )
}

/// A host namespace, its local node, the dataplane in it and weft's
/// vxlan backend.
fn vxlan_host() -> (Netns, LocalNode, NetlinkDataplane, Vxlan) {
    let ns = host();
    let local = local(&ns);
    let dp = NetlinkDataplane::in_netns(&ns.path()).unwrap();
    (ns, local, dp, Vxlan::new(VxlanConfig::default()))
}

/// A VXLAN device weft does not own ("other.5", VNI 5, weft's port and
/// local address), as another program would make it.
fn add_foreign_vxlan(ns: &Netns) {
    ns.ip(&[
        "link",
        "add",
        "other.5",
        "type",
        "vxlan",
        "id",
        "5",
        "dstport",
        "4789",
        "local",
        "198.18.0.11",
    ])
    .unwrap();
}

fn leases(n: u32, backend: impl Fn(&str) -> BackendData) -> Vec<LeaseView> {
    (2..2 + n)
        .map(|i| {
            let node = format!("host-{i}");
            let l = Lease {
                key: format!("10.244.{i}.0-24").parse().unwrap(),
                attrs: LeaseAttrs::new(
                    &node,
                    Some(format!("198.18.0.{}", 10 + i).parse().unwrap()),
                    None,
                    &backend(&node),
                ),
                etcd_lease: None,
                create_revision: 1,
                mod_revision: 1,
            };
            LeaseView::new(&l, true, None)
        })
        .collect()
}

fn vx(node: &str) -> BackendData {
    BackendData::Vxlan {
        vni: 1,
        vtep_mac: vtep_mac(node),
    }
}

async fn reconcile(
    dp: &NetlinkDataplane,
    backend: &dyn Backend,
    local: &LocalNode,
    leases: &[LeaseView],
) -> usize {
    let (peers, skipped) = select(leases, local, backend.backend_type(), &HostView::default());
    assert!(skipped.is_empty(), "{skipped:?}");
    let (want, skipped) = backend.desired(local, &peers.iter().collect::<Vec<_>>());
    assert!(skipped.is_empty(), "{skipped:?}");
    let changes = diff(&want, &dp.observe().await.unwrap());
    let errors = dp.apply(&changes).await;
    assert!(errors.is_empty(), "{errors:?}");
    let have = dp.observe().await.unwrap();
    assert_eq!(
        have, want,
        "observed state equals desired state after applying"
    );
    changes.len()
}

fn routes(ns: &Netns) -> Vec<Value> {
    ns.ip_json(&["route", "show", "proto", "87"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn vxlan_programs_exactly_the_expected_objects_idempotently() {
    let (ns, local, dp, b) = vxlan_host();
    let ls = leases(3, vx);
    assert_eq!(reconcile(&dp, &b, &local, &ls).await, 1 + 1 + 3 * 3);

    let link = &ns.ip_json(&["-d", "link", "show", "weft.1"]).unwrap()[0];
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(info["id"], 1);
    assert_eq!(info["port"], 8472);
    assert_eq!(info["local"], "198.18.0.11");
    assert_eq!(info["learning"], false);
    assert_eq!(info["link"], "eth0");
    assert_eq!(link["mtu"], 1450);
    assert_eq!(link["address"], vtep_mac("host-1").to_string());
    assert!(link["flags"]
        .as_array()
        .unwrap()
        .contains(&Value::from("UP")));
    let addrs = ns.ip_json(&["addr", "show", "dev", "weft.1"]).unwrap();
    let v4: Vec<&Value> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .collect();
    assert_eq!(v4.len(), 1, "{addrs}");
    assert_eq!(
        (v4[0]["local"].as_str(), v4[0]["prefixlen"].as_u64()),
        (Some("10.244.1.0"), Some(32))
    );

    let neigh = ns.ip_json(&["neigh", "show", "dev", "weft.1"]).unwrap();
    let neigh = neigh.as_array().unwrap();
    assert_eq!(neigh.len(), 3);
    for i in 2..5 {
        let n = neigh
            .iter()
            .find(|n| n["dst"] == format!("10.244.{i}.0"))
            .expect("neighbour");
        assert_eq!(n["lladdr"], vtep_mac(&format!("host-{i}")).to_string());
        assert!(n["state"]
            .as_array()
            .unwrap()
            .contains(&Value::from("PERMANENT")));
    }
    let fdb = ns.bridge_json(&["fdb", "show", "dev", "weft.1"]).unwrap();
    let ours: Vec<&Value> = fdb
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("dst").is_some())
        .collect();
    assert_eq!(ours.len(), 3, "{fdb}");
    for i in 2..5 {
        let e = ours
            .iter()
            .find(|e| e["mac"] == vtep_mac(&format!("host-{i}")).to_string())
            .expect("fdb entry");
        assert_eq!(e["dst"], format!("198.18.0.{}", 10 + i));
        assert_eq!(e["state"], "permanent");
    }
    let rs = routes(&ns);
    assert_eq!(rs.len(), 3);
    for r in &rs {
        let i = r["dst"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(2)
            .unwrap()
            .to_string();
        assert_eq!(r["gateway"], format!("10.244.{i}.0"));
        assert_eq!(r["dev"], "weft.1");
        assert!(
            r["flags"]
                .as_array()
                .unwrap()
                .contains(&Value::from("onlink")),
            "{r}"
        );
    }
    // Second pass: nothing to do.
    assert_eq!(reconcile(&dp, &b, &local, &ls).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn a_departed_peer_is_removed_and_hand_deletions_come_back() {
    let (ns, local, dp, b) = vxlan_host();
    let ls = leases(3, vx);
    reconcile(&dp, &b, &local, &ls).await;
    // host-4 leaves.
    reconcile(&dp, &b, &local, &ls[..2]).await;
    assert_eq!(routes(&ns).len(), 2);
    assert!(!ns
        .ip(&["neigh", "show", "dev", "weft.1"])
        .unwrap()
        .contains("10.244.4.0"));
    assert!(!ns
        .bridge_json(&["fdb", "show", "dev", "weft.1"])
        .unwrap()
        .to_string()
        .contains(&vtep_mac("host-4").to_string()));

    // An operator deletes a route, an FDB entry, then the whole device.
    ns.ip(&["route", "del", "10.244.2.0/24"]).unwrap();
    run_bridge(
        &ns,
        &[
            "fdb",
            "del",
            &vtep_mac("host-3").to_string(),
            "dev",
            "weft.1",
            "dst",
            "198.18.0.13",
        ],
    );
    assert_eq!(reconcile(&dp, &b, &local, &ls[..2]).await, 2);
    ns.ip(&["link", "del", "weft.1"]).unwrap();
    assert!(routes(&ns).is_empty());
    assert_eq!(reconcile(&dp, &b, &local, &ls[..2]).await, 1 + 1 + 2 * 3);
    assert_eq!(routes(&ns).len(), 2);
}

/// Each of weft's routes with its metric, as `ip -j route` shows it.
fn metrics(ns: &Netns) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = routes(ns)
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap().to_string(),
                r["metric"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn routes_left_without_their_metric_are_replaced_without_a_gap() {
    let (ns, local, dp, b) = vxlan_host();
    let ls = leases(3, vx);
    reconcile(&dp, &b, &local, &ls).await;
    let want: Vec<(String, u64)> = (2..5)
        .map(|i| {
            let dst: ipnet::IpNet = format!("10.244.{i}.0/24").parse().unwrap();
            (dst.to_string(), u64::from(route_metric(&dst)))
        })
        .collect();
    assert_eq!(
        metrics(&ns),
        want,
        "each route has its destination's metric"
    );
    // As a weft without metrics left them, and a second route to one
    // destination.
    ns.ip(&["route", "flush", "proto", "87"]).unwrap();
    for i in 2..5 {
        let (dst, via) = (format!("10.244.{i}.0/24"), format!("10.244.{i}.0"));
        let add = [
            "route", "add", &dst, "via", &via, "dev", "weft.1", "onlink", "proto", "87",
        ];
        ns.ip(&add).unwrap();
    }
    let mut second = vec!["route", "add", "10.244.3.0/24", "via", "10.244.3.0"];
    second.extend(["dev", "weft.1", "onlink", "proto", "87", "metric", "7"]);
    ns.ip(&second).unwrap();
    let have = dp.observe().await.unwrap();
    assert!(have.routes.is_empty(), "{:?}", have.routes);
    assert_eq!(have.stray_routes.len(), 4, "{:?}", have.stray_routes);
    let (peers, _) = select(&ls, &local, b.backend_type(), &HostView::default());
    let (st, _) = b.desired(&local, &peers.iter().collect::<Vec<_>>());
    let changes = diff(&st, &have);
    // New routes first, then the old ones go: a destination never has
    // no route.
    let kinds: Vec<&str> = changes
        .iter()
        .map(|c| match c {
            Change::Route(RouteChange::Set { replace: false, .. }) => "add",
            Change::Route(RouteChange::DelStray { .. }) => "del",
            other => panic!("unexpected change {other}"),
        })
        .collect();
    assert_eq!(kinds, ["add", "add", "add", "del", "del", "del", "del"]);
    assert!(dp.apply(&changes).await.is_empty());
    assert_eq!(metrics(&ns), want);
    assert_eq!(dp.observe().await.unwrap(), st);
}

fn run_bridge(ns: &Netns, args: &[&str]) {
    let mut all = vec!["-n", ns.name()];
    all.extend_from_slice(args);
    weft_tests::netns::run("bridge", &all).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn objects_weft_does_not_own_are_never_touched() {
    let ns = host();
    let local = local(&ns);
    // Things an operator or another daemon put there.
    ns.ip(&[
        "route",
        "add",
        "10.99.0.0/24",
        "via",
        "198.18.0.99",
        "dev",
        "eth0",
    ])
    .unwrap();
    ns.ip(&[
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "198.18.0.99",
        "dev",
        "eth0",
        "proto",
        "static",
    ])
    .unwrap();
    ns.ip(&[
        "neigh",
        "add",
        "198.18.0.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])
    .unwrap();
    add_foreign_vxlan(&ns);
    ns.ip(&[
        "link",
        "add",
        "weftish",
        "type",
        "veth",
        "peer",
        "name",
        "weftish-peer",
    ])
    .unwrap();
    let dp = NetlinkDataplane::in_netns(&ns.path()).unwrap();
    let b = Vxlan::new(VxlanConfig::default());
    reconcile(&dp, &b, &local, &leases(2, vx)).await;
    reconcile(&dp, &b, &local, &[]).await;
    let all_routes = ns.ip(&["route", "show"]).unwrap();
    assert!(
        all_routes.contains("10.99.0.0/24") && all_routes.contains("10.244.9.0/24"),
        "{all_routes}"
    );
    assert!(ns
        .ip(&["neigh", "show", "dev", "eth0"])
        .unwrap()
        .contains("198.18.0.77"));
    assert!(ns.ip(&["link", "show", "other.5"]).is_ok());
    assert!(ns.ip(&["link", "show", "weftish"]).is_ok());
    // weft.1 stays (the backend wants it) but carries no peer state.
    assert!(routes(&ns).is_empty());
    assert!(ns
        .ip(&["neigh", "show", "dev", "weft.1"])
        .unwrap()
        .trim()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn host_gw_routes_via_public_ips() {
    let ns = host();
    let local = local(&ns);
    let dp = NetlinkDataplane::in_netns(&ns.path()).unwrap();
    let ls = leases(3, |_| BackendData::HostGw);
    assert_eq!(reconcile(&dp, &HostGw, &local, &ls).await, 3);
    let rs = routes(&ns);
    assert_eq!(rs.len(), 3);
    for r in &rs {
        let i: u32 = r["dst"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(r["gateway"], format!("198.18.0.{}", 10 + i));
        assert_eq!(r["dev"], "eth0");
    }
    assert!(
        ns.ip(&["link", "show", "weft.1"]).is_err(),
        "host-gw makes no device"
    );
    assert_eq!(reconcile(&dp, &HostGw, &local, &ls).await, 0);
    ns.ip(&["route", "del", "10.244.3.0/24"]).unwrap();
    assert_eq!(reconcile(&dp, &HostGw, &local, &ls).await, 1);
    assert_eq!(reconcile(&dp, &HostGw, &local, &ls[1..]).await, 1);
    assert_eq!(routes(&ns).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn a_changed_vni_replaces_the_device() {
    let ns = host();
    let local = local(&ns);
    let dp = NetlinkDataplane::in_netns(&ns.path()).unwrap();
    reconcile(
        &dp,
        &Vxlan::new(VxlanConfig::default()),
        &local,
        &leases(2, vx),
    )
    .await;
    let b7 = Vxlan::new(VxlanConfig {
        vni: 7,
        ..VxlanConfig::default()
    });
    let ls7 = leases(2, |n| BackendData::Vxlan {
        vni: 7,
        vtep_mac: vtep_mac(n),
    });
    reconcile(&dp, &b7, &local, &ls7).await;
    assert!(ns.ip(&["link", "show", "weft.1"]).is_err());
    assert_eq!(
        ns.ip_json(&["-d", "link", "show", "weft.7"]).unwrap()[0]["linkinfo"]["info_data"]["id"],
        7
    );
    assert!(routes(&ns).iter().all(|r| r["dev"] == "weft.7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn interfaces_and_default_route_are_reported() {
    let ns = host();
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "198.18.0.1",
        "dev",
        "eth0",
    ])
    .unwrap();
    let dp = NetlinkDataplane::in_netns(&ns.path()).unwrap();
    let ifs = dp.interfaces().await.unwrap();
    let eth0 = ifs.iter().find(|i| i.name == "eth0").unwrap();
    assert!(eth0.addrs.contains(&"198.18.0.11/16".parse().unwrap()));
    assert_eq!(eth0.mtu, 1500);
    assert_eq!(
        dp.default_route_interface().await.unwrap(),
        Some(eth0.index)
    );
}

/// A failed change keeps the errno it comes down to, for callers to match:
/// the kernel's EEXIST for a VNI another device has, weft's own EEXIST
/// for a route to a peer's subnet that weft does not own, ENODEV for a
/// device that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn failures_keep_their_errno() {
    use weft_backends::{dev, Errno, RouteTarget, VxlanLink};
    let ns = host();
    add_foreign_vxlan(&ns);
    let dst: ipnet::IpNet = "10.244.9.0/24".parse().unwrap();
    let metric = route_metric(&dst).to_string();
    ns.ip(&[
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "198.18.0.99",
        "dev",
        "eth0",
        "proto",
        "static",
        "metric",
        &metric,
    ])
    .unwrap();
    let dp = NetlinkDataplane::in_netns(&ns.path()).unwrap();
    let changes = [
        Change::Link(LinkChange::Create {
            name: dev("weft.5"),
            link: VxlanLink {
                vni: 5,
                port: 4789,
                local: "198.18.0.11".parse().unwrap(),
                mac: vtep_mac("host-1"),
                underlay: None,
                learning: false,
                mtu: 1450,
                up: true,
            }
            .into(),
        }),
        Change::Route(RouteChange::Set {
            dst,
            target: RouteTarget::direct("198.18.0.99".parse().unwrap(), &dev("eth0")),
            replace: false,
        }),
        Change::Link(LinkChange::Update {
            name: dev("weft.404"),
            mtu: 1450,
            up: true,
        }),
    ];
    let errors = dp.apply(&changes).await;
    let got: Vec<(Change, Option<Errno>)> = errors
        .iter()
        .map(|e| (e.change.clone(), e.errno()))
        .collect();
    assert_eq!(
        got,
        [
            (changes[0].clone(), Some(Errno::EEXIST)),
            (changes[1].clone(), Some(Errno::EEXIST)),
            (changes[2].clone(), Some(Errno::ENODEV)),
        ],
        "{errors:#?}"
    );
    let text = errors[1].to_string();
    assert!(
        text.contains("weft does not own") && text.ends_with("(EEXIST)"),
        "{text}"
    );
    // Nothing weft does not own was changed.
    assert!(ns.ip(&["link", "show", "weft.5"]).is_err());
    let route = ns.ip(&["route", "show", "10.244.9.0/24"]).unwrap();
    assert!(route.contains("proto static"), "{route}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; run by scripts/test"]
async fn a_device_with_a_weft_name_that_weft_did_not_make_is_replaced_or_left_alone() {
    use weft_backends::{dev, Errno, Link, RouteTarget};
    let (ns, local, dp, b) = vxlan_host();
    // A veth with the name weft's VXLAN device takes, and a bridge with
    // a weft name weft does not need, carrying an address of its own.
    ns.ip(&[
        "link", "add", "weft.1", "type", "veth", "peer", "name", "wp1",
    ])
    .unwrap();
    ns.ip(&["link", "add", "weft.9", "type", "bridge"]).unwrap();
    ns.ip(&["addr", "add", "10.9.9.1/24", "dev", "weft.9"])
        .unwrap();
    let seen = dp.observe().await.unwrap();
    assert_eq!(seen.links[&dev("weft.1")], Link::Foreign("veth".into()));
    assert_eq!(seen.links[&dev("weft.9")], Link::Foreign("bridge".into()));
    assert!(
        seen.addresses.is_empty(),
        "nothing on a device weft did not make is read as weft's: {:?}",
        seen.addresses
    );
    // Nothing goes onto such a device, and the refusal says why.
    let onto = Change::Route(RouteChange::Set {
        dst: "10.244.7.0/24".parse().unwrap(),
        target: RouteTarget::device(&dev("weft.9")),
        replace: false,
    });
    let errors = dp.apply(std::slice::from_ref(&onto)).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].errno(), Some(Errno::ENODEV));
    assert!(
        errors[0]
            .to_string()
            .contains("bridge device weft did not make"),
        "{}",
        errors[0]
    );
    assert!(routes(&ns).is_empty());
    // The backend needs weft.1: the veth goes first, saying what it was;
    // weft.9 is not weft's to delete.
    let ls = leases(2, vx);
    let (peers, _) = select(&ls, &local, b.backend_type(), &HostView::default());
    let (want, _) = b.desired(&local, &peers.iter().collect::<Vec<_>>());
    let changes = diff(&want, &seen);
    assert_eq!(
        changes[0],
        Change::Link(LinkChange::Delete {
            name: dev("weft.1"),
            foreign: Some("veth".into()),
        })
    );
    assert!(changes[0]
        .to_string()
        .contains("a veth device weft did not make"));
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Change::Link(LinkChange::Delete { .. })))
            .count(),
        1,
        "{changes:#?}"
    );
    let errors = dp.apply(&changes).await;
    assert!(errors.is_empty(), "{errors:?}");
    let have = dp.observe().await.unwrap();
    assert_eq!(have.links[&dev("weft.1")], want.links[&dev("weft.1")]);
    assert_eq!(
        ns.ip_json(&["-d", "link", "show", "weft.1"]).unwrap()[0]["linkinfo"]["info_kind"],
        "vxlan"
    );
    assert_eq!(routes(&ns).len(), 2);
    assert!(ns
        .ip(&["addr", "show", "dev", "weft.9"])
        .unwrap()
        .contains("10.9.9.1/24"));
    // Converged: the bridge it leaves alone is no reason for a change.
    assert_eq!(diff(&want, &have), []);
}
