//! The wireguard backend's desired state, its peer checks, and convergence
//! on the fake dataplane. Pure: no root, no WireGuard in the kernel.

use ipnet::IpNet;
use std::net::SocketAddr;
use std::sync::Arc;
use weft_backends::kinds::link::Link;
use weft_backends::peer::{select_leases, HostView, Peer, Skipped};
use weft_backends::{
    diff, Backend, Change, Dataplane, ExternalIface, FakeDataplane, LocalNode, NetState, WgKey,
    Wireguard, WireguardChange,
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
