//! The wireguard backend's desired state, its peer checks, and convergence
//! on the fake dataplane. Pure: no root, no WireGuard in the kernel.

use ipnet::IpNet;
use std::net::SocketAddr;
use std::sync::Arc;
use weft_backends::kinds::link::Link;
use weft_backends::peer::{select_leases, HostView, Peer, Skipped};
use weft_backends::{
    diff, Backend, Change, Dataplane, ExternalIface, FakeDataplane, LinkChange, LocalNode,
    NetState, WgKey, Wireguard, WireguardChange,
};
use weft_config::{BackendConfig, BackendType, NetworkConfig, WireguardConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, Lease, LeaseAttrs};

fn net(text: &str) -> Arc<NetworkConfig> {
    Arc::new(NetworkConfig::parse(text).unwrap())
}

fn config() -> Arc<NetworkConfig> {
    net(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":25}}"#,
    )
}

fn wg_config(n: &NetworkConfig) -> WireguardConfig {
    match &n.backend {
        BackendConfig::Wireguard(w) => w.clone(),
        other => panic!("not wireguard: {other:?}"),
    }
}

fn local(n: Arc<NetworkConfig>) -> LocalNode {
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
        n,
    )
}

/// A node's private key: fixed per node, so runs are alike.
fn secret(i: u8) -> [u8; 32] {
    [i; 32]
}

fn public(i: u8) -> [u8; 32] {
    *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret(i))).as_bytes()
}

fn lease(key: &str, node: &str, ip: &str, public_key: [u8; 32]) -> LeaseView {
    let l = Lease {
        key: key.parse().unwrap(),
        attrs: LeaseAttrs::new(
            node,
            Some(ip.parse().unwrap()),
            None,
            &BackendData::Wireguard { public_key },
        ),
        etcd_lease: None,
        create_revision: 1,
        mod_revision: 1,
    };
    LeaseView::new(&l, true, None)
}

fn select(leases: &[LeaseView], local: &LocalNode) -> (Vec<Peer>, Vec<Skipped>) {
    select_leases(leases, local, BackendType::Wireguard, &HostView::default())
}

fn three_hosts() -> Vec<LeaseView> {
    vec![
        lease("10.244.1.0-24", "host-1", "198.18.0.11", public(1)),
        lease("10.244.2.0-24", "host-2", "198.18.0.12", public(2)),
        lease("10.244.3.0-24", "host-3", "198.18.0.13", public(3)),
    ]
}

fn desired(wg: &Wireguard, local: &LocalNode, leases: &[LeaseView]) -> (NetState, Vec<Skipped>) {
    let (peers, mut skipped) = select(leases, local);
    let refs: Vec<&Peer> = peers.iter().collect();
    let (st, more) = wg.desired(local, &refs);
    skipped.extend(more);
    (st, skipped)
}

#[test]
fn one_device_one_route_and_a_peer_per_node() {
    let n = config();
    let local = local(n.clone());
    let wg = Wireguard::new(wg_config(&n), secret(1));
    assert_eq!(wg.public_key(), WgKey(public(1)));
    assert_eq!(
        wg.lease_data("host-1"),
        BackendData::Wireguard {
            public_key: public(1)
        }
    );
    assert_eq!(wg.pod_mtu(1500), 1420);
    let (st, skipped) = desired(&wg, &local, &three_hosts());
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(matches!(
        st.links["weft-wg"],
        Link::Wireguard(ref l) if l.mtu == 1420 && l.up
    ));
    assert_eq!(st.wg_devices["weft-wg"].listen_port, 51820);
    let addrs: Vec<_> = st
        .addresses
        .keys()
        .map(|(d, a)| (d.to_string(), *a))
        .collect();
    assert_eq!(
        addrs,
        [("weft-wg".to_string(), "10.244.1.0/32".parse().unwrap())]
    );
    // One route for the whole network: a subnet without a peer is dropped
    // by WireGuard, never sent in the clear.
    assert_eq!(st.routes.len(), 1);
    let r = &st.routes[&"10.244.0.0/16".parse::<IpNet>().unwrap()];
    assert_eq!((r.via, &*r.dev), (None, "weft-wg"));
    // And under it a blackhole, for when the device is down or gone.
    let fallbacks: Vec<IpNet> = st.fallback_routes.keys().copied().collect();
    assert_eq!(fallbacks, ["10.244.0.0/16".parse::<IpNet>().unwrap()]);
    assert_eq!(st.wg_peers.len(), 2);
    for (i, ip) in [(2u8, "198.18.0.12"), (3, "198.18.0.13")] {
        let p = &st.wg_peers[&("weft-wg".into(), WgKey(public(i)))];
        assert_eq!(
            p.endpoint,
            Some(SocketAddr::new(ip.parse().unwrap(), 51820))
        );
        assert_eq!(
            p.allowed_ips,
            [format!("10.244.{i}.0/24").parse::<IpNet>().unwrap()]
        );
        assert_eq!(p.keepalive, 25);
        assert!(p.psk.is_none());
    }
    // Nothing a VXLAN or XFRM backend would have.
    assert!(st.fdb.is_empty() && st.neighbours.is_empty() && st.xfrm_states.is_empty());
}

#[test]
fn leases_it_cannot_trust_are_skipped_with_the_reason() {
    let n = config();
    let local = local(n.clone());
    let wg = Wireguard::new(wg_config(&n), secret(1));
    let mut leases = three_hosts();
    // Our own key under another name: it would take our traffic.
    leases.push(lease("10.244.4.0-24", "clone", "198.18.0.14", public(1)));
    // host-2's key again, on a newer lease.
    leases.push(lease("10.244.5.0-24", "copycat", "198.18.0.15", public(2)));
    let (st, skipped) = desired(&wg, &local, &leases);
    let reasons: Vec<String> = skipped.iter().map(|s| s.to_string()).collect();
    assert_eq!(skipped.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("clone") && r.contains("is ours")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("copycat") && r.contains("already used by host-2")),
        "{reasons:?}"
    );
    assert_eq!(st.wg_peers.len(), 2);
    assert_eq!(
        st.wg_peers[&("weft-wg".into(), WgKey(public(2)))].allowed_ips,
        ["10.244.2.0/24".parse::<IpNet>().unwrap()]
    );
}

#[tokio::test]
async fn the_fake_kernel_converges_and_a_removed_peer_comes_back() {
    let n = net(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="}}"#,
    );
    let local = local(n.clone());
    let wg = Wireguard::new(wg_config(&n), secret(1));
    let (want, _) = desired(&wg, &local, &three_hosts());
    assert!(want.wg_peers.values().all(|p| p.psk.is_some()));
    let fake = FakeDataplane::with_devices(&["eth0"]);
    let changes = diff(&want, &fake.observe().await.unwrap());
    // The device first, its settings and peers before the route into it;
    // the blackhole under it before that route.
    let pos = |f: &dyn Fn(&Change) -> bool| changes.iter().position(f).unwrap();
    let fallback = pos(&|c| matches!(c, Change::Fallback(_)));
    let link = pos(&|c| matches!(c, Change::Link(_)));
    let device = pos(&|c| matches!(c, Change::Wireguard(WireguardChange::SetDevice { .. })));
    let route = pos(&|c| matches!(c, Change::Route(_)));
    assert!(link < device && device < route, "{changes:#?}");
    assert!(fallback < route, "{changes:#?}");
    // No key in what is logged.
    let text: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("wg set weft-wg private-key <key> listen-port 51820")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("allowed-ips 10.244.2.0/24") && t.contains("preshared-key <key>")),
        "{text:?}"
    );
    assert!(fake.apply(&changes).await.is_empty());
    assert_eq!(fake.state(), want);
    assert!(diff(&want, &fake.state()).is_empty(), "idempotent");
    // `wg set weft-wg peer <host-2> remove`, and an endpoint changed by hand.
    fake.tamper(|st| {
        st.wg_peers.remove(&("weft-wg".into(), WgKey(public(2))));
        st.wg_peers
            .get_mut(&("weft-wg".into(), WgKey(public(3))))
            .unwrap()
            .endpoint = Some("198.18.9.9:51820".parse().unwrap());
    });
    let repair = diff(&want, &fake.state());
    assert_eq!(repair.len(), 2, "{repair:#?}");
    // The peer that is gone is made with its allowed IPs; the one whose
    // endpoint changed keeps its own, never left without any for a moment.
    for c in &repair {
        let Change::Wireguard(WireguardChange::SetPeer {
            key, replace_ips, ..
        }) = c
        else {
            panic!("{c:?}");
        };
        assert_eq!(*replace_ips, *key == WgKey(public(2)), "{c:?}");
    }
    // What the kernel keeps of the device is its public key, never the
    // private one.
    let kept = &fake.state().wg_devices["weft-wg"];
    assert!(kept.private_key.is_none());
    assert_eq!(kept.public_key, WgKey(public(1)));
    assert!(fake.apply(&repair).await.is_empty());
    assert_eq!(fake.state(), want);
    // A peer that left is removed; the device stays.
    let (fewer, _) = desired(&wg, &local, &three_hosts()[..2]);
    let leave = diff(&fewer, &fake.state());
    assert_eq!(
        leave,
        [Change::Wireguard(WireguardChange::DelPeer {
            dev: "weft-wg".into(),
            key: WgKey(public(3)),
        })]
    );
    // Another backend: the device goes, and everything on it with it; the
    // blackhole last but one, the device last.
    let gone = diff(&NetState::default(), &fake.state());
    assert_eq!(gone.len(), 2, "{gone:#?}");
    assert!(matches!(gone[0], Change::Fallback(_)), "{gone:#?}");
    assert!(fake.apply(&gone).await.is_empty());
    assert_eq!(fake.state(), NetState::default());
}

#[test]
fn the_config_takes_flannels_fields_and_refuses_bad_ones() {
    let n = net(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPort":51000,"ListenPortV6":51001,"MTU":1380,"Mode":"auto","PersistentKeepaliveInterval":10}}"#,
    );
    let w = wg_config(&n);
    assert_eq!(
        (w.listen_port, w.listen_port_v6, w.mtu),
        (51000, 51001, Some(1380))
    );
    assert_eq!(w.mode.as_str(), "auto");
    assert_eq!(w.persistent_keepalive, 10);
    // Written back with every default spelled out, and read again alike.
    let again = NetworkConfig::parse(&n.to_json().to_string()).unwrap();
    assert_eq!(wg_config(&again), w);
    for (bad, field) in [
        (r#"{"Type":"wireguard","PSK":"short"}"#, "Backend.PSK"),
        (r#"{"Type":"wireguard","PSK":"AAAA"}"#, "Backend.PSK"),
        (
            r#"{"Type":"wireguard","PSK":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#,
            "Backend.PSK",
        ),
        (r#"{"Type":"wireguard","Mode":"both"}"#, "Backend.Mode"),
        (r#"{"Type":"wireguard","ListenPort":70000}"#, "ListenPort"),
        (
            r#"{"Type":"wireguard","ListenPortV6":51820}"#,
            "Backend.ListenPortV6",
        ),
        (r#"{"Type":"wireguard","MTU":100}"#, "Backend.MTU"),
        (r#"{"Type":"wireguard","Port":1}"#, "Port"),
    ] {
        let text = format!(r#"{{"Network":"10.244.0.0/16","Backend":{bad}}}"#);
        let e = NetworkConfig::parse(&text).unwrap_err().to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
    // The PSK never shows in Debug output.
    let psk = net(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="}}"#,
    );
    let shown = format!("{:?}", wg_config(&psk));
    assert!(
        shown.contains("redacted") && !shown.contains("AQEB"),
        "{shown}"
    );
}

#[tokio::test]
async fn a_device_named_weft_wg_that_is_not_wireguard_is_replaced_and_never_programmed() {
    let n = config();
    let local = local(n.clone());
    let wg = Wireguard::new(wg_config(&n), secret(1));
    let (want, _) = desired(&wg, &local, &three_hosts());
    let fake = FakeDataplane::with_devices(&["eth0"]);
    // What `ip link add weft-wg type dummy` leaves, and a weft name this
    // node does not need (no IPv6 here).
    fake.tamper(|st| {
        st.links
            .insert("weft-wg".into(), Link::Foreign("dummy".into()));
        st.links
            .insert("weft-wg-v6".into(), Link::Foreign("bridge".into()));
    });
    let changes = diff(&want, &fake.state());
    assert_eq!(
        changes[0],
        Change::Link(LinkChange::Delete {
            name: "weft-wg".into(),
            foreign: Some("dummy".into()),
        }),
        "{changes:#?}"
    );
    assert!(
        !changes[1..]
            .iter()
            .any(|c| matches!(c, Change::Link(LinkChange::Delete { .. }))),
        "weft-wg-v6 is not weft's to delete: {changes:#?}"
    );
    assert!(fake.apply(&changes).await.is_empty());
    let have = fake.state();
    assert!(matches!(have.links["weft-wg"], Link::Wireguard(_)));
    assert_eq!(have.links["weft-wg-v6"], Link::Foreign("bridge".into()));
    assert_eq!(diff(&want, &have), [], "converged, the bridge left alone");
}

#[tokio::test]
async fn a_rotated_key_changes_the_device_and_the_lease_data_and_nothing_else() {
    let n = config();
    let local = local(n.clone());
    let wg = Wireguard::new(wg_config(&n), secret(1));
    let (want, _) = desired(&wg, &local, &three_hosts());
    let fake = FakeDataplane::with_devices(&["eth0"]);
    assert!(fake.apply(&diff(&want, &fake.state())).await.is_empty());
    wg.rotate(secret(9));
    assert_eq!(wg.public_key(), WgKey(public(9)));
    // The lease keeps the old key until the device has the new one: a
    // renewal meanwhile must not publish a key peers cannot reach yet.
    assert_eq!(
        wg.lease_data("host-1"),
        BackendData::Wireguard {
            public_key: public(1)
        }
    );
    let (rotated, _) = desired(&wg, &local, &three_hosts());
    let changes = diff(&rotated, &fake.state());
    assert_eq!(changes.len(), 1, "{changes:#?}");
    let Change::Wireguard(WireguardChange::SetDevice { dev, device }) = &changes[0] else {
        panic!("{changes:#?}");
    };
    assert_eq!(&**dev, "weft-wg");
    assert_eq!(device.public_key, WgKey(public(9)));
    assert!(!changes[0].to_string().contains(&format!("{:?}", secret(9))));
    assert!(fake.apply(&changes).await.is_empty());
    assert_eq!(diff(&rotated, &fake.state()), []);
    wg.publish();
    assert_eq!(
        wg.lease_data("host-1"),
        BackendData::Wireguard {
            public_key: public(9)
        }
    );
    // Our new key in another node's lease is refused; the old one is a
    // key like any other.
    let (_, skipped) = desired(
        &wg,
        &local,
        &[
            lease("10.244.8.0-24", "host-8", "198.18.0.18", public(9)),
            lease("10.244.7.0-24", "host-7", "198.18.0.17", public(1)),
        ],
    );
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].reason.contains("is ours"), "{skipped:?}");
}

#[test]
fn an_ipv6_only_network_gets_peers_in_every_mode() {
    for (mode, dev, port) in [
        ("separate", "weft-wg-v6", 51821),
        ("auto", "weft-wg", 51820),
        ("ipv6", "weft-wg", 51820),
    ] {
        let n = net(&format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fdc6:7765:6675::/48","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
        ));
        let mut me = local(n.clone());
        me.subnet = "0.0.0.0-0&fdc6:7765:6675:1::-64".parse().unwrap();
        let wg = Wireguard::new(wg_config(&n), secret(1));
        let six = |v6: Option<&str>| {
            let l = Lease {
                key: "0.0.0.0-0&fdc6:7765:6675:2::-64".parse().unwrap(),
                attrs: LeaseAttrs::new(
                    "host-2",
                    Some("198.18.0.12".parse().unwrap()),
                    v6.map(|a| a.parse().unwrap()),
                    &BackendData::Wireguard {
                        public_key: public(2),
                    },
                ),
                etcd_lease: None,
                create_revision: 1,
                mod_revision: 1,
            };
            LeaseView::new(&l, true, None)
        };
        let (st, skipped) = desired(&wg, &me, &[six(Some("fdc6:7765:6674:18::c"))]);
        assert!(skipped.is_empty(), "{mode}: {skipped:?}");
        let p = &st.wg_peers[&(dev.into(), WgKey(public(2)))];
        assert_eq!(
            p.allowed_ips,
            ["fdc6:7765:6675:2::/64".parse::<IpNet>().unwrap()],
            "{mode}"
        );
        assert_eq!(
            p.endpoint,
            Some(SocketAddr::new(
                "fdc6:7765:6674:18::c".parse().unwrap(),
                port
            )),
            "{mode}"
        );
        assert_eq!(st.wg_peers.len(), 1, "{mode}: {st:?}");
        // A peer without a public IPv6 address cannot be reached: skipped,
        // saying so (auto would reach it over IPv4).
        let (st, skipped) = desired(&wg, &me, &[six(None)]);
        if mode == "auto" {
            assert_eq!(st.wg_peers.len(), 1, "{mode}");
        } else {
            assert_eq!(skipped.len(), 1, "{mode}: {skipped:?}");
            assert!(skipped[0].reason.contains("no public IPv6"), "{skipped:?}");
        }
    }
}
