//! Leases written by someone who can write to etcd (every flannel node in a
//! shared keyspace can), and what a node makes of them. Pure: no root.

use ipnet::IpNet;
use std::collections::BTreeSet;
use std::sync::Arc;
use weft_backends::peer::{select_leases, HostView};
use weft_backends::state::{dev, RouteTarget};
use weft_backends::RouteChange;
use weft_backends::{
    diff, in_scope, vtep_mac, Backend, Change, Dataplane, ExternalIface, FakeDataplane, HostGw,
    LocalNode, NetState,
};
use weft_config::{BackendType, NetworkConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, Lease, LeaseAttrs};

fn local(network: &str) -> LocalNode {
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
        Arc::new(NetworkConfig::parse(network).unwrap()),
    )
}

const NET: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

/// A host-gw lease (see [`lease`]).
fn hostgw(key: &str, node: &str, ip: &str, rev: i64) -> LeaseView {
    lease(key, node, ip, &BackendData::HostGw, rev)
}

/// A lease as etcd would hold it; `rev` orders them (older wins).
fn lease(key: &str, node: &str, ip: &str, backend: &BackendData, rev: i64) -> LeaseView {
    let l = Lease {
        key: key.parse().unwrap(),
        attrs: LeaseAttrs::new(node, Some(ip.parse().unwrap()), None, backend),
        etcd_lease: None,
        create_revision: rev,
        mod_revision: rev,
    };
    LeaseView::new(&l, true, None)
}

/// The lab host's view: eth0's network and its connected route.
fn host() -> HostView {
    HostView {
        networks: vec!["198.18.0.0/16".parse().unwrap()],
        foreign_routes: BTreeSet::from(["198.18.0.0/16".parse().unwrap()]),
    }
}

fn reasons(leases: &[LeaseView], l: &LocalNode, b: BackendType, h: &HostView) -> Vec<String> {
    let (_, skipped) = select_leases(leases, l, b, h);
    skipped
        .into_iter()
        .map(|s| format!("{}: {}", s.key, s.reason))
        .collect()
}

#[test]
fn leases_outside_the_network_or_of_another_length_are_not_programmed() {
    // The two keys of the issue: half the internet, and the underlay.
    let leases = [
        hostgw("128.0.0.0-1", "evil-1", "198.18.0.99", 5),
        hostgw("198.18.0.0-16", "evil-2", "198.18.0.98", 6),
        // Inside the network, but not a /24 of it.
        hostgw("10.244.4.0-23", "evil-3", "198.18.0.97", 7),
        hostgw("10.244.9.128-25", "evil-4", "198.18.0.96", 8),
        // A good one.
        hostgw("10.244.2.0-24", "host-2", "198.18.0.12", 2),
    ];
    let l = local(NET);
    let (peers, _) = select_leases(&leases, &l, BackendType::HostGw, &host());
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node.as_deref(), Some("host-2"));
    let why = reasons(&leases, &l, BackendType::HostGw, &host());
    assert_eq!(why.len(), 4, "{why:?}");
    for w in &why {
        assert!(
            w.contains("is not a /24 of the network 10.244.0.0/16"),
            "{w}"
        );
    }
    // And desired state has no route outside the network.
    let (st, _) = HostGw.desired(&l, &peers.iter().collect::<Vec<_>>());
    assert_eq!(
        st.routes.keys().copied().collect::<Vec<IpNet>>(),
        vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn a_network_that_reaches_into_the_underlay_does_not_take_it() {
    // A config whose network covers the hosts' own: the subnets that overlap
    // the host's networks or foreign routes are skipped, the rest work.
    let l = local(r#"{"Network":"198.16.0.0/14","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#);
    let mut l = l;
    l.subnet = "198.16.1.0-24".parse().unwrap();
    let leases = [
        hostgw("198.18.5.0-24", "a", "198.18.0.12", 2),
        hostgw("198.16.7.0-24", "b", "198.18.0.13", 3),
    ];
    let (peers, skipped) = select_leases(&leases, &l, BackendType::HostGw, &host());
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node.as_deref(), Some("b"));
    assert!(
        skipped[0]
            .reason
            .contains("overlaps 198.18.0.0/16, a network of this host"),
        "{skipped:?}"
    );
}

#[test]
fn a_foreign_route_to_a_peers_subnet_stays_and_the_peer_is_skipped() {
    let mut h = host();
    h.foreign_routes.insert("10.244.9.0/24".parse().unwrap());
    let leases = [
        hostgw("10.244.9.0-24", "host-9", "198.18.0.19", 2),
        hostgw("10.244.2.0-24", "host-2", "198.18.0.12", 3),
    ];
    let l = local(NET);
    let (peers, skipped) = select_leases(&leases, &l, BackendType::HostGw, &h);
    assert_eq!(peers.len(), 1);
    assert!(
        skipped[0].reason.contains("weft does not own") && skipped[0].reason.contains("left alone"),
        "{skipped:?}"
    );
}

#[test]
fn between_two_leases_the_older_keeps_a_public_ip_or_a_subnet_for_every_backend() {
    let l = local(NET);
    // The newer lease (revision 9) claims host-2's public IP.
    let leases = [
        hostgw("10.244.3.0-24", "thief", "198.18.0.12", 9),
        hostgw("10.244.2.0-24", "host-2", "198.18.0.12", 2),
    ];
    let (peers, skipped) = select_leases(&leases, &l, BackendType::HostGw, &host());
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node.as_deref(), Some("host-2"));
    assert_eq!(skipped[0].node.as_deref(), Some("thief"));
    assert!(
        skipped[0].reason.contains("already host-2's"),
        "{skipped:?}"
    );
    // vxlan too (different MACs, same IP).
    let vx = |n: &str| BackendData::Vxlan {
        vni: 1,
        vtep_mac: vtep_mac(n),
    };
    let lv = local(r#"{"Network":"10.244.0.0/16"}"#);
    let leases = [
        lease("10.244.3.0-24", "thief", "198.18.0.12", &vx("thief"), 9),
        lease("10.244.2.0-24", "host-2", "198.18.0.12", &vx("host-2"), 2),
    ];
    let (peers, _) = select_leases(&leases, &lv, BackendType::Vxlan, &host());
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node.as_deref(), Some("host-2"));
    // Two keys for one IPv4 subnet (one of them dual stack): the older.
    let dual = hostgw("10.244.2.0-24&fd77::-64", "copy", "198.18.0.14", 8);
    let leases = [dual, hostgw("10.244.2.0-24", "host-2", "198.18.0.12", 2)];
    let (peers, skipped) = select_leases(&leases, &l, BackendType::HostGw, &host());
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node.as_deref(), Some("host-2"));
    assert!(skipped[0]
        .reason
        .contains("subnet 10.244.2.0/24 is already host-2's"));
}

fn route(dev_name: &str) -> RouteTarget {
    RouteTarget {
        via: Some("198.18.0.12".parse().unwrap()),
        dev: dev(dev_name),
        onlink: false,
    }
}

#[test]
fn weft_deletes_only_its_routes_inside_the_network_or_on_its_devices() {
    let l = local(NET);
    let mut have = NetState::default();
    // Proto-87 routes: one of ours in the network, one someone made by hand
    // elsewhere, one on a weft device outside the network.
    have.routes
        .insert("10.244.5.0/24".parse().unwrap(), route("eth0"));
    have.routes
        .insert("172.31.0.0/16".parse().unwrap(), route("eth0"));
    have.routes
        .insert("203.0.113.0/24".parse().unwrap(), route("weft.1"));
    in_scope(&mut have, &l.network);
    let left: BTreeSet<String> = have.routes.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        left,
        BTreeSet::from(["10.244.5.0/24".to_string(), "203.0.113.0/24".to_string()])
    );
    let changes = diff(&NetState::default(), &have);
    assert!(changes
        .iter()
        .all(|c| !c.to_string().contains("172.31.0.0/16")));
}

#[tokio::test]
async fn routes_are_made_exclusively_and_replaced_only_when_weft_owns_them() {
    let want_target = route("eth0");
    let mut want = NetState::default();
    want.routes
        .insert("10.244.2.0/24".parse().unwrap(), want_target.clone());
    // Not observed (not ours): an exclusive add.
    let changes = diff(&want, &NetState::default());
    assert!(matches!(
        changes.as_slice(),
        [Change::Route(RouteChange::Set { replace: false, .. })]
    ));
    assert!(changes[0].to_string().starts_with("ip route add"));
    // Observed (ours) with another gateway: a replace.
    let mut have = NetState::default();
    let mut other = want_target.clone();
    other.via = Some("198.18.0.99".parse().unwrap());
    have.routes.insert("10.244.2.0/24".parse().unwrap(), other);
    let changes = diff(&want, &have);
    assert!(matches!(
        changes.as_slice(),
        [Change::Route(RouteChange::Set { replace: true, .. })]
    ));
    // The fake kernel refuses an exclusive add over an existing route.
    let dp = FakeDataplane::with_devices(&["eth0"]);
    dp.tamper(|st| *st = have.clone());
    let errors = dp
        .apply(&[Change::Route(RouteChange::Set {
            dst: "10.244.2.0/24".parse().unwrap(),
            target: want_target,
            replace: false,
        })])
        .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
}
