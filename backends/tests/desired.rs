//! Desired state of each backend, peer checks, diff, and convergence on the
//! fake dataplane. Pure: no root needed.

use ipnet::IpNet;
use serde_json::json;
use std::net::IpAddr;
use std::sync::Arc;
use weft_backends::keystore::KeyOrigin;
use weft_backends::peer::{select_leases, HostView, Peer, Skipped};
use weft_backends::{
    dev, diff, for_config, vtep_mac, Backend, Change, Context, Dataplane, ExternalIface,
    FakeDataplane, HostGw, LocalNode, NetState, Vxlan,
};
use weft_backends::{AddressChange, FdbChange, LinkChange, NeighbourChange, RouteChange};
use weft_config::{BackendType, NetworkConfig, VxlanConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, Lease, LeaseAttrs, SubnetKey};

/// Peer selection on a host with nothing in the way.
fn select(leases: &[LeaseView], local: &LocalNode, b: BackendType) -> (Vec<Peer>, Vec<Skipped>) {
    select_leases(leases, local, b, &HostView::default())
}

fn net() -> Arc<NetworkConfig> {
    Arc::new(NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap())
}

fn local() -> LocalNode {
    LocalNode::new(
        "host-1",
        "10.244.1.0-24".parse().unwrap(),
        "198.18.0.11".parse().unwrap(),
        ExternalIface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            addr: "198.18.0.11/16".parse().unwrap(),
        },
        net(),
    )
}

fn lease(key: &str, node: &str, ip: &str, backend: &BackendData) -> LeaseView {
    let l = Lease {
        key: key.parse().unwrap(),
        attrs: LeaseAttrs::new(node, Some(ip.parse().unwrap()), None, backend),
        etcd_lease: None,
        create_revision: 1,
        mod_revision: 1,
    };
    LeaseView::new(&l, true, None)
}

fn vx(node: &str) -> BackendData {
    BackendData::Vxlan {
        vni: 1,
        vtep_mac: vtep_mac(node),
    }
}

fn vxlan() -> Vxlan {
    Vxlan::new(VxlanConfig::default())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn netw(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn vxlan_programs_device_neighbour_fdb_and_onlink_route_per_peer() {
    let leases = [
        lease("10.244.1.0-24", "host-1", "198.18.0.11", &vx("host-1")),
        lease("10.244.2.0-24", "host-2", "198.18.0.12", &vx("host-2")),
        lease("10.244.3.0-24", "host-3", "198.18.0.13", &vx("host-3")),
    ];
    let (peers, skipped) = select(&leases, &local(), BackendType::Vxlan);
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(peers.len(), 2, "our own lease is not a peer");
    let (st, skipped) = vxlan().desired(&local(), &peers.iter().collect::<Vec<_>>());
    assert!(skipped.is_empty());
    let link = st.links["weft.1"].vxlan().unwrap();
    assert_eq!(
        (link.vni, link.port, link.mtu, link.learning),
        (1, 8472, 1450, false)
    );
    assert_eq!(link.local, ip("198.18.0.11"));
    assert_eq!(link.mac, vtep_mac("host-1"));
    assert_eq!(link.underlay.as_deref(), Some("eth0"));
    assert!(st
        .addresses
        .contains_key(&(dev("weft.1"), netw("10.244.1.0/32"))));
    assert_eq!(
        st.neighbours[&(dev("weft.1"), ip("10.244.2.0"))],
        vtep_mac("host-2")
    );
    assert_eq!(
        st.fdb[&(dev("weft.1"), vtep_mac("host-2"))],
        ip("198.18.0.12")
    );
    let r = &st.routes[&netw("10.244.3.0/24")];
    assert_eq!(
        (r.via, r.dev.as_ref(), r.onlink),
        (Some(ip("10.244.3.0")), "weft.1", true)
    );
    assert_eq!(st.object_count(), 1 + 1 + 2 * 3);
}

#[test]
fn vxlan_direct_routing_uses_plain_routes_on_the_same_l2() {
    let b = Vxlan::new(VxlanConfig {
        direct_routing: true,
        ..VxlanConfig::default()
    });
    let leases = [
        lease("10.244.2.0-24", "near", "198.18.0.12", &vx("near")),
        lease("10.244.3.0-24", "far", "203.0.113.7", &vx("far")),
    ];
    let (peers, _) = select(&leases, &local(), BackendType::Vxlan);
    let (st, _) = b.desired(&local(), &peers.iter().collect::<Vec<_>>());
    let near = &st.routes[&netw("10.244.2.0/24")];
    assert_eq!(
        (near.via, near.dev.as_ref(), near.onlink),
        (Some(ip("198.18.0.12")), "eth0", false)
    );
    assert!(!st.fdb.contains_key(&(dev("weft.1"), vtep_mac("near"))));
    let far = &st.routes[&netw("10.244.3.0/24")];
    assert_eq!(&*far.dev, "weft.1");
}

#[test]
fn vxlan_skips_peers_it_cannot_program() {
    let leases = [
        lease(
            "10.244.2.0-24",
            "other-vni",
            "198.18.0.12",
            &BackendData::Vxlan {
                vni: 7,
                vtep_mac: vtep_mac("x"),
            },
        ),
        lease(
            "10.244.3.0-24",
            "same-mac",
            "198.18.0.13",
            &BackendData::Vxlan {
                vni: 1,
                vtep_mac: vtep_mac("host-1"),
            },
        ),
        lease("10.244.4.0-24", "good", "198.18.0.14", &vx("good")),
    ];
    let (peers, _) = select(&leases, &local(), BackendType::Vxlan);
    let (st, skipped) = vxlan().desired(&local(), &peers.iter().collect::<Vec<_>>());
    let reasons: Vec<&str> = skipped.iter().map(|s| s.reason.as_str()).collect();
    assert_eq!(skipped.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("VNI 7"), "{reasons:?}");
    assert!(reasons[1].contains("is ours"), "{reasons:?}");
    assert_eq!(st.routes.len(), 1, "the good peer is still programmed");
}

#[test]
fn bad_leases_are_skipped_with_a_reason_and_the_rest_programmed() {
    let mut garbage = lease("10.244.2.0-24", "garbage", "198.18.0.12", &vx("garbage"));
    garbage.backend_data = Some(json!({"VNI": "one", "VtepMAC": 5}).into());
    let mut unknown = lease("10.244.3.0-24", "wg", "198.18.0.13", &vx("wg"));
    unknown.backend_type = "wireguard".into();
    let same_ip = lease("10.244.4.0-24", "dup-ip", "198.18.0.11", &vx("dup-ip"));
    let overlap = lease("10.244.1.128-25", "overlap", "198.18.0.15", &vx("overlap"));
    let mut no_ip = lease("10.244.6.0-24", "reserved", "198.18.0.16", &vx("reserved"));
    no_ip.public_ip = None;
    let hostgw = lease("10.244.7.0-24", "hgw", "198.18.0.17", &BackendData::HostGw);
    let good = lease("10.244.8.0-24", "good", "198.18.0.18", &vx("good"));
    let leases = [garbage, unknown, same_ip, overlap, no_ip, hostgw, good];
    let (peers, skipped) = select(&leases, &local(), BackendType::Vxlan);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node.as_deref(), Some("good"));
    let why: Vec<(String, String)> = skipped
        .iter()
        .map(|s| (s.node.clone().unwrap(), s.reason.clone()))
        .collect();
    let find = |n: &str| {
        why.iter()
            .find(|(k, _)| k == n)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    assert!(
        find("garbage").contains("BackendData is invalid"),
        "{why:?}"
    );
    assert!(find("wg").contains("wireguard"), "{why:?}");
    assert!(find("dup-ip").contains("is ours"), "{why:?}");
    assert!(find("overlap").contains("overlaps ours"), "{why:?}");
    assert!(find("reserved").contains("no public IP"), "{why:?}");
    assert!(find("hgw").contains("differs from ours"), "{why:?}");
}

#[test]
fn host_gw_routes_via_public_ips_and_refuses_routed_peers() {
    let leases = [
        lease("10.244.2.0-24", "near", "198.18.0.12", &BackendData::HostGw),
        lease("10.244.3.0-24", "far", "203.0.113.7", &BackendData::HostGw),
    ];
    let (peers, skipped) = select(&leases, &local(), BackendType::HostGw);
    assert!(skipped.is_empty());
    let (st, skipped) = HostGw.desired(&local(), &peers.iter().collect::<Vec<_>>());
    assert!(st.links.is_empty() && st.neighbours.is_empty() && st.fdb.is_empty());
    let r = &st.routes[&netw("10.244.2.0/24")];
    assert_eq!(
        (r.via, r.dev.as_ref(), r.onlink),
        (Some(ip("198.18.0.12")), "eth0", false)
    );
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0]
            .reason
            .contains("not directly reachable from eth0"),
        "{}",
        skipped[0].reason
    );
    assert_eq!(HostGw.pod_mtu(1500), 1500);
}

#[test]
fn every_backend_is_built_by_config_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ctx = Context::new(&state);
    let build =
        |text: &str| for_config(&NetworkConfig::parse(text).unwrap().backend, &ctx).unwrap();
    let b = build(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#);
    assert_eq!(b.backend.backend_type(), BackendType::HostGw);
    assert!(b.keyed.is_none() && b.key_origin.is_none());
    let b = build(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":9}}"#);
    assert_eq!(
        b.backend.lease_data("n"),
        BackendData::Vxlan {
            vni: 9,
            vtep_mac: vtep_mac("n")
        }
    );
    assert!(!state.exists(), "no key, no state directory");
    // ipsec and wireguard: a key pair each, made on first build, read back
    // on the next; the lease data carries its public key.
    for (text, file) in [
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec"}}"#,
            "ipsec-key.json",
        ),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
            "wireguard-key.json",
        ),
    ] {
        let first = build(text);
        assert_eq!(first.key_origin, Some(KeyOrigin::Created), "{text}");
        let keyed = first.keyed.as_ref().unwrap();
        assert_eq!(keyed.epoch(), 1);
        assert_eq!(keyed.which().file, file);
        assert!(state.join(file).exists());
        let again = build(text);
        assert_eq!(again.key_origin, Some(KeyOrigin::Loaded));
        assert_eq!(
            again.backend.lease_data("n"),
            first.backend.lease_data("n"),
            "the same key after a restart"
        );
    }
    // A key file that is not one: the error names the backend and the file.
    std::fs::write(state.join("wireguard-key.json"), "{").unwrap();
    let e = for_config(
        &NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#)
            .unwrap()
            .backend,
        &ctx,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("wireguard") && e.contains("wireguard-key.json"),
        "{e}"
    );
}

fn desired_with(n: u32) -> NetState {
    let leases: Vec<LeaseView> = (2..2 + n)
        .map(|i| {
            lease(
                &format!("10.244.{i}.0-24"),
                &format!("host-{i}"),
                &format!("198.18.0.{}", 10 + i),
                &vx(&format!("host-{i}")),
            )
        })
        .collect();
    let (peers, _) = select(&leases, &local(), BackendType::Vxlan);
    vxlan()
        .desired(&local(), &peers.iter().collect::<Vec<_>>())
        .0
}

#[test]
fn diff_is_empty_when_in_step_and_orders_changes_like_flannel() {
    let want = desired_with(2);
    assert!(diff(&want, &want).is_empty());
    let changes = diff(&want, &NetState::default());
    assert!(matches!(
        changes[0],
        Change::Link(LinkChange::Create { .. })
    ));
    let kinds: Vec<u8> = changes
        .iter()
        .map(|c| match c {
            Change::Link(LinkChange::Create { .. }) => 0,
            Change::Address(AddressChange::Add { .. }) => 1,
            Change::Neighbour(NeighbourChange::Set { .. }) => 2,
            Change::Fdb(FdbChange::Set { .. }) => 3,
            Change::Route(RouteChange::Set { .. }) => 4,
            other => panic!("unexpected {other}"),
        })
        .collect();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(
        kinds, sorted,
        "links, addresses, neighbours, FDB, then routes"
    );
    assert_eq!(changes.len(), want.object_count());
}

#[test]
fn diff_repairs_tampering_and_removes_departed_peers() {
    let want = desired_with(3);
    let mut have = want.clone();
    let dev = dev("weft.1");
    // A neighbour pointing at the wrong MAC, a route deleted by hand, a peer gone.
    let key = (dev.clone(), ip("10.244.2.0"));
    have.neighbours.insert(key.clone(), vtep_mac("impostor"));
    have.routes.remove(&netw("10.244.3.0/24"));
    let fewer = desired_with(2);
    let changes = diff(&fewer, &have);
    assert!(changes.contains(&Change::Neighbour(NeighbourChange::Set {
        dev: dev.clone(),
        ip: ip("10.244.2.0"),
        mac: vtep_mac("host-2")
    })));
    assert!(changes
        .iter()
        .any(|c| matches!(c, Change::Route(RouteChange::Set { dst, .. }) if *dst == netw("10.244.3.0/24"))));
    assert!(changes
        .iter()
        .any(|c| matches!(c, Change::Route(RouteChange::Del { dst, .. }) if *dst == netw("10.244.4.0/24"))));
    assert!(changes.iter().any(
        |c| matches!(c, Change::Fdb(FdbChange::Del { mac, .. }) if *mac == vtep_mac("host-4"))
    ));
    assert!(changes
        .iter()
        .any(|c| matches!(c, Change::Neighbour(NeighbourChange::Del { ip: i, .. }) if *i == ip("10.244.4.0"))));
    assert!(!changes.iter().any(|c| matches!(
        c,
        Change::Link(LinkChange::Create { .. }) | Change::Link(LinkChange::Delete { .. })
    )));
}

#[test]
fn diff_recreates_a_link_whose_identity_changed_and_drops_old_devices() {
    let want = desired_with(1);
    let mut have = want.clone();
    have.links
        .get_mut("weft.1")
        .unwrap()
        .vxlan_mut()
        .unwrap()
        .local = ip("198.18.9.9");
    let changes = diff(&want, &have);
    assert_eq!(
        changes[0],
        Change::Link(LinkChange::Delete {
            name: "weft.1".into(),
            foreign: None,
        })
    );
    assert!(matches!(
        changes[1],
        Change::Link(LinkChange::Create { .. })
    ));
    assert_eq!(
        changes.len(),
        2 + want.object_count() - 1,
        "everything on the device is added again"
    );

    let mut mtu = want.clone();
    mtu.links
        .get_mut("weft.1")
        .unwrap()
        .vxlan_mut()
        .unwrap()
        .mtu = 1400;
    assert_eq!(
        diff(&want, &mtu),
        vec![Change::Link(LinkChange::Update {
            name: "weft.1".into(),
            mtu: 1450,
            up: true
        })]
    );

    // VNI changed: weft.2 is wanted, weft.1 goes with everything on it.
    let b2 = Vxlan::new(VxlanConfig {
        vni: 2,
        ..VxlanConfig::default()
    });
    let leases = [lease(
        "10.244.2.0-24",
        "host-2",
        "198.18.0.12",
        &BackendData::Vxlan {
            vni: 2,
            vtep_mac: vtep_mac("host-2"),
        },
    )];
    let (peers, _) = select(&leases, &local(), BackendType::Vxlan);
    let want2 = b2.desired(&local(), &peers.iter().collect::<Vec<_>>()).0;
    let changes = diff(&want2, &want);
    assert!(changes.contains(&Change::Link(LinkChange::Delete {
        name: "weft.1".into(),
        foreign: None,
    })));
    assert!(!changes.iter().any(
        |c| matches!(c, Change::Route(RouteChange::Del { target, .. }) if &*target.dev == "weft.1")
    ));
}

#[tokio::test]
async fn applying_the_diff_converges_and_a_second_pass_changes_nothing() {
    let fake = FakeDataplane::with_devices(&["eth0"]);
    let want = desired_with(5);
    let errors = fake
        .apply(&diff(&want, &fake.observe().await.unwrap()))
        .await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(fake.observe().await.unwrap(), want);
    assert!(diff(&want, &fake.observe().await.unwrap()).is_empty());
    // The operator deletes the device: the next pass restores everything.
    fake.tamper(|st| {
        st.links.clear();
        st.neighbours.clear();
        st.fdb.clear();
        st.routes.clear();
        st.addresses.clear();
    });
    let errors = fake
        .apply(&diff(&want, &fake.observe().await.unwrap()))
        .await;
    assert!(errors.is_empty());
    assert_eq!(fake.observe().await.unwrap(), want);
}

#[tokio::test]
async fn one_failing_change_does_not_stop_the_others() {
    let fake = FakeDataplane::with_devices(&["eth0"]);
    fake.fail_changes_containing("10.244.3.0/24");
    let want = desired_with(3);
    let errors = fake.apply(&diff(&want, &NetState::default())).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].to_string().contains("10.244.3.0/24"));
    let have = fake.observe().await.unwrap();
    assert_eq!(have.routes.len(), 2);
    assert!(have.routes.contains_key(&netw("10.244.4.0/24")));
    fake.heal();
    assert!(fake.apply(&diff(&want, &have)).await.is_empty());
    assert_eq!(fake.observe().await.unwrap(), want);
}

#[test]
fn changes_print_as_iproute2_commands() {
    let c = Change::Fdb(FdbChange::Set {
        dev: "weft.1".into(),
        mac: vtep_mac("host-2"),
        dst: ip("198.18.0.12"),
    });
    assert_eq!(
        c.to_string(),
        format!(
            "bridge fdb replace {} dev weft.1 dst 198.18.0.12 self permanent",
            vtep_mac("host-2")
        )
    );
    let key: SubnetKey = "10.244.2.0-24".parse().unwrap();
    assert_eq!(key.to_string(), "10.244.2.0-24");
}

#[test]
fn a_vtep_mac_claimed_twice_stays_with_the_older_lease() {
    let first = lease("10.244.2.0-24", "host-2", "198.18.0.12", &vx("host-2"));
    let mut clone = lease("10.244.3.0-24", "clone", "198.18.0.13", &vx("host-2"));
    clone.revision = first.revision + 5;
    // Order of the leases does not matter, only their age.
    let (peers, _) = select(&[clone, first], &local(), BackendType::Vxlan);
    let (st, skipped) = vxlan().desired(&local(), &peers.iter().collect::<Vec<_>>());
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].node.as_deref(), Some("clone"));
    assert!(
        skipped[0].reason.contains("already used by host-2"),
        "{}",
        skipped[0].reason
    );
    assert_eq!(
        st.fdb[&(dev("weft.1"), vtep_mac("host-2"))],
        ip("198.18.0.12")
    );
    assert_eq!(st.routes.len(), 1);
}

#[test]
fn an_ipv6_only_network_programs_ipv6_alone_and_checks_leases_by_family() {
    let n6 = Arc::new(
        NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fdc6:7765:6675::/48"}"#,
        )
        .unwrap(),
    );
    let mut me = local();
    me.subnet = "0.0.0.0-0&fdc6:7765:6675:1::-64".parse().unwrap();
    me.network = n6;
    let six = |key: &str, node: &str, ip: &str, v6: &str, b: &BackendData| {
        let l = Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new(
                node,
                Some(ip.parse().unwrap()),
                Some(v6.parse().unwrap()),
                b,
            ),
            etcd_lease: None,
            create_revision: 1,
            mod_revision: 1,
        };
        LeaseView::new(&l, true, None)
    };
    let leases = [
        six(
            "0.0.0.0-0&fdc6:7765:6675:2::-64",
            "host-2",
            "198.18.0.12",
            "fdc6:7765:6674:18::c",
            &vx("host-2"),
        ),
        // An IPv4 lease has no place in an IPv6-only network.
        lease("10.244.3.0-24", "host-3", "198.18.0.13", &vx("host-3")),
    ];
    let (peers, skipped) = select(&leases, &me, BackendType::Vxlan);
    assert_eq!(peers.len(), 1);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].reason.contains("no IPv4"), "{skipped:?}");
    let (st, s) = vxlan().desired(&me, &peers.iter().collect::<Vec<_>>());
    assert!(s.is_empty(), "{s:?}");
    let d = dev("weft.1");
    assert_eq!(
        st.routes.keys().copied().collect::<Vec<_>>(),
        [netw("fdc6:7765:6675:2::/64")]
    );
    assert!(st
        .neighbours
        .contains_key(&(d.clone(), ip("fdc6:7765:6675:2::"))));
    assert_eq!(st.fdb[&(d.clone(), vtep_mac("host-2"))], ip("198.18.0.12"));
    assert!(st.addresses.keys().all(|(_, a)| a.addr().is_ipv6()));
    // host-gw routes via the node's IPv6 address; no IPv4 route.
    let (st, _) = HostGw.desired(&me, &peers.iter().collect::<Vec<_>>());
    assert_eq!(st.routes.len(), 1);
    let (dst, to) = st.routes.iter().next().unwrap();
    assert_eq!(*dst, netw("fdc6:7765:6675:2::/64"));
    assert_eq!(to.via, Some(ip("fdc6:7765:6674:18::c")));
}
