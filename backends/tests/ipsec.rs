//! The ipsec backend's desired state, pure: SAs, policies and routes per
//! peer; both ends agreeing on every SA; key rotation on either side
//! without a moment where one end sends with an SA the other lacks; gone
//! and bad peers. Time is passed in, never waited for.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use weft_backends::ipsec::keys::NodeKey;
use weft_backends::ipsec::{drop_inbound_spi_collisions, pod_mtu, RekeyCause, Timing};
use weft_backends::peer::{select_leases, HostView};
use weft_backends::{
    diff, Backend, Change, ExternalIface, Ipsec, LocalNode, NetState, XfrmDir, XfrmPolicyId,
    WEFT_XFRM_REQID,
};
use weft_backends::{RouteChange, XfrmPolicyChange, XfrmStateChange};
use weft_config::{BackendType, NetworkConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, Lease, LeaseAttrs};

const SWITCH: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(60);

fn timing() -> Timing {
    Timing {
        switch_delay: SWITCH,
        grace: GRACE,
    }
}

/// A node in the simulation: its view of itself and its backend.
struct Node {
    name: String,
    subnet: String,
    ip: Ipv4Addr,
    backend: Ipsec,
}

impl Node {
    fn new(i: u8, key: NodeKey, psk: Option<&[u8]>) -> Node {
        Node {
            name: format!("host-{i}"),
            subnet: format!("10.244.{i}.0-24"),
            ip: Ipv4Addr::new(198, 18, 0, 10 + i),
            backend: Ipsec::new(key, psk.map(|p| p.to_vec().into()), timing()),
        }
    }

    fn local(&self) -> LocalNode {
        LocalNode::new(
            self.name.clone(),
            self.subnet.parse().unwrap(),
            self.ip,
            ExternalIface {
                name: "eth0".into(),
                index: 2,
                mtu: 1500,
                addr: format!("{}/16", self.ip).parse().unwrap(),
            },
            Arc::new(
                NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec"}}"#)
                    .unwrap(),
            ),
        )
    }

    /// This node's lease as the others see it.
    fn lease(&self) -> LeaseView {
        lease(
            &self.subnet,
            &self.name,
            self.ip,
            &self.backend.lease_data(&self.name),
        )
    }

    /// Desired state given the other nodes' leases.
    fn desired(&self, others: &[LeaseView], now: Instant) -> (NetState, Vec<String>) {
        let (peers, mut skipped) = select_leases(
            others,
            &self.local(),
            BackendType::Ipsec,
            &HostView::default(),
        );
        let refs: Vec<_> = peers.iter().collect();
        let (st, more) = self.backend.desired_at(&self.local(), &refs, now);
        skipped.extend(more);
        (st, skipped.into_iter().map(|s| s.reason).collect())
    }
}

fn lease(key: &str, node: &str, ip: Ipv4Addr, backend: &BackendData) -> LeaseView {
    let l = Lease {
        key: key.parse().unwrap(),
        attrs: LeaseAttrs::new(node, Some(ip), None, backend),
        etcd_lease: None,
        create_revision: 1,
        mod_revision: 1,
    };
    LeaseView::new(&l, true, None)
}

fn key(epoch: u64) -> NodeKey {
    NodeKey::generate(epoch).unwrap()
}

/// SPIs of SAs from `src` to `dst` in `st`.
fn spis(st: &NetState, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u32> {
    let mut v: Vec<u32> = st
        .xfrm_states
        .keys()
        .filter(|id| id.src == IpAddr::V4(src) && id.dst == IpAddr::V4(dst))
        .map(|id| id.spi)
        .collect();
    v.sort();
    v
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn each_peer_gets_two_sas_three_policies_and_a_route_that_both_ends_agree_on() {
    let t0 = Instant::now();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| Node::new(i, key(1), Some(b"psk")))
        .collect();
    for n in &nodes {
        n.backend.published_at(1, t0);
    }
    let leases: Vec<LeaseView> = nodes.iter().map(Node::lease).collect();
    let views: Vec<NetState> = nodes
        .iter()
        .map(|n| {
            let (st, skipped) = n.desired(&leases, t0);
            assert!(skipped.is_empty(), "{skipped:?}");
            st
        })
        .collect();
    let (a, st) = (&nodes[0], &views[0]);
    assert_eq!(st.xfrm_states.len(), 4, "in and out for each of 2 peers");
    assert_eq!(st.xfrm_policies.len(), 6);
    assert_eq!(st.routes.len(), 2);
    for (j, b) in nodes.iter().enumerate().skip(1) {
        let theirs = net(&format!("10.244.{}.0/24", j + 1));
        let out = XfrmPolicyId {
            dir: XfrmDir::Out,
            src: net("10.244.1.0/24"),
            dst: theirs,
        };
        let t = st.xfrm_policies[&out];
        assert_eq!(
            (t.src, t.dst, t.reqid),
            (IpAddr::V4(a.ip), IpAddr::V4(b.ip), WEFT_XFRM_REQID)
        );
        for dir in [XfrmDir::In, XfrmDir::Fwd] {
            let id = XfrmPolicyId {
                dir,
                src: theirs,
                dst: net("10.244.1.0/24"),
            };
            assert_eq!(st.xfrm_policies[&id].src, IpAddr::V4(b.ip));
        }
        let r = &st.routes[&theirs];
        assert_eq!(
            (r.via, &*r.dev, r.onlink),
            (Some(IpAddr::V4(b.ip)), "eth0", true)
        );
        // What a sends to b is exactly what b receives from a: same SPI,
        // same key, computed on each side from its own secret.
        for (from, to) in [(0, j), (j, 0)] {
            let (sf, st_to) = (&views[from], &views[to]);
            let (ipf, ipt) = (nodes[from].ip, nodes[to].ip);
            let sent = spis(sf, ipf, ipt);
            assert_eq!(sent, spis(st_to, ipf, ipt), "{ipf} -> {ipt}");
            let id = sf
                .xfrm_states
                .keys()
                .find(|id| id.src == IpAddr::V4(ipf) && id.dst == IpAddr::V4(ipt))
                .unwrap();
            assert_eq!(sf.xfrm_states[id], st_to.xfrm_states[id]);
            assert_eq!(sf.xfrm_states[id].key.0.len(), 36);
        }
    }
}

#[test]
fn pod_mtu_leaves_room_for_esp_in_tunnel_mode() {
    // 1446 + 2 trailer bytes is a multiple of 4; + 20 + 8 + 8 + 16 = 1500.
    assert_eq!(pod_mtu(1500), 1446);
    assert_eq!((1446 + 2) % 4, 0);
    assert_eq!(pod_mtu(9000), 8946);
    assert_eq!(pod_mtu(1450), 1394);
    assert_eq!(pod_mtu(10), 0);
    let b = Node::new(1, key(1), None).backend;
    assert_eq!(b.pod_mtu(1500), 1446);
}

#[test]
fn a_peer_with_a_bad_key_is_skipped_and_the_others_still_work() {
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let b = Node::new(2, key(1), None);
    a.backend.published_at(1, t0);
    let bad_key = lease(
        "10.244.3.0-24",
        "host-3",
        Ipv4Addr::new(198, 18, 0, 13),
        &BackendData::Ipsec {
            public_key: [0; 32],
            key_epoch: 1,
        },
    );
    // A malformed key never becomes a peer (the lease does not parse).
    let mut garbled = lease(
        "10.244.4.0-24",
        "host-4",
        Ipv4Addr::new(198, 18, 0, 14),
        &BackendData::HostGw,
    );
    garbled.backend_type = "ipsec".into();
    garbled.backend_data = Some(serde_json::json!({"PublicKey": "c2hvcnQ=", "KeyEpoch": 1}).into());
    let (st, skipped) = a.desired(&[b.lease(), bad_key, garbled], t0);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped.iter().any(|s| s.contains("low-order")),
        "{skipped:?}"
    );
    assert!(skipped.iter().any(|s| s.contains("5 bytes")), "{skipped:?}");
    assert_eq!(st.routes.len(), 1);
    assert_eq!(spis(&st, a.ip, b.ip).len(), 1);
}

/// At `now`: every SA one node sends with is one the other has for
/// receiving (so no packet is dropped for want of an SA).
fn agree(x: &NetState, y: &NetState, ix: Ipv4Addr, iy: Ipv4Addr) -> Result<(), String> {
    for (s, r, from, to) in [(x, y, ix, iy), (y, x, iy, ix)] {
        let sending: Vec<_> = s
            .xfrm_states
            .iter()
            .filter(|(id, _)| id.src == IpAddr::V4(from) && id.dst == IpAddr::V4(to))
            .collect();
        if sending.len() != 1 {
            return Err(format!("{from} -> {to}: {} outbound SAs", sending.len()));
        }
        let (id, sa) = sending[0];
        if r.xfrm_states.get(id) != Some(sa) {
            return Err(format!(
                "{from} sends with SPI {:#x} that {to} lacks",
                id.spi
            ));
        }
    }
    Ok(())
}

#[test]
fn rotating_a_key_never_leaves_a_direction_without_a_matching_sa() {
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let b = Node::new(2, key(1), None);
    a.backend.published_at(1, t0);
    b.backend.published_at(1, t0);
    let (sa0, _) = a.desired(&[b.lease()], t0);
    let (sb0, _) = b.desired(&[a.lease()], t0);
    agree(&sa0, &sb0, a.ip, b.ip).unwrap();
    let old_out = spis(&sa0, a.ip, b.ip);

    // a rotates at t1: its new inbound SA goes in at once, nothing else.
    let t1 = t0 + Duration::from_secs(100);
    let a_lease_before = a.lease();
    a.backend.rotate(key(2));
    let (sa1, _) = a.desired(&[b.lease()], t1);
    let changes = diff(&sa1, &sa0);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        matches!(&changes[0], Change::XfrmState(XfrmStateChange::Add { id, .. }) if id.dst == IpAddr::V4(a.ip))
    );
    assert_eq!(
        spis(&sa1, a.ip, b.ip),
        old_out,
        "a still sends with the old SA"
    );
    // b has not seen the new lease yet: still in step.
    agree(
        &sa1,
        &b.desired(std::slice::from_ref(&a_lease_before), t1).0,
        a.ip,
        b.ip,
    )
    .unwrap();
    // a publishes at t2, b sees the lease at t3; check every half second.
    let t2 = t1 + Duration::from_secs(1);
    a.backend.published_at(2, t2);
    let t3 = t2 + Duration::from_millis(300);
    let mut t = t1;
    let mut a_prev = sa1.clone();
    while t < t3 + GRACE + SWITCH + Duration::from_secs(5) {
        let b_view = if t < t3 {
            a_lease_before.clone()
        } else {
            a.lease()
        };
        let (sa, _) = a.desired(&[b.lease()], t);
        let (sb, _) = b.desired(&[b_view], t);
        agree(&sa, &sb, a.ip, b.ip)
            .map_err(|e| format!("at {:?}: {e}", t - t1))
            .unwrap();
        // a's own switch waits for the publication plus the delay.
        if t < t2 + SWITCH {
            assert_eq!(spis(&sa, a.ip, b.ip), old_out, "at {:?}", t - t1);
        }
        a_prev = sa;
        t += Duration::from_millis(500);
    }
    // At the end: one SA each way, both new, the old ones gone.
    let (sa_end, _) = a.desired(&[b.lease()], t);
    assert_eq!(sa_end, a_prev);
    assert_eq!(sa_end.xfrm_states.len(), 2);
    assert_ne!(spis(&sa_end, a.ip, b.ip), old_out);
    assert!(a.backend.next_change_at(t).is_none());
}

#[test]
fn switches_and_grace_ends_are_announced_as_next_changes() {
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let b = Node::new(2, key(1), None);
    a.backend.published_at(1, t0);
    a.desired(&[b.lease()], t0);
    assert_eq!(a.backend.next_change_at(t0), None, "nothing pending");
    // The peer rotates; we see it at t1.
    let t1 = t0 + Duration::from_secs(10);
    b.backend.rotate(key(2));
    let (before, _) = a.desired(&[b.lease()], t1);
    assert_eq!(a.backend.next_change_at(t1), Some(t1 + SWITCH));
    let (after, _) = a.desired(&[b.lease()], t1 + SWITCH);
    let changes = diff(&after, &before);
    assert_eq!(
        changes.len(),
        2,
        "new outbound in, old outbound out: {changes:?}"
    );
    assert!(matches!(
        changes[0],
        Change::XfrmState(XfrmStateChange::Add { .. })
    ));
    assert!(matches!(
        changes[1],
        Change::XfrmState(XfrmStateChange::Del { .. })
    ));
    assert_eq!(
        a.backend.next_change_at(t1 + SWITCH),
        Some(t1 + SWITCH + GRACE)
    );
    let (end, _) = a.desired(&[b.lease()], t1 + SWITCH + GRACE);
    let changes = diff(&end, &after);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        matches!(&changes[0], Change::XfrmState(XfrmStateChange::Del { id }) if id.dst == IpAddr::V4(a.ip))
    );
    assert_eq!(a.backend.key_status().peers_in_transition, 0);
}

#[test]
fn a_peer_that_is_gone_takes_everything_along_at_once() {
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let b = Node::new(2, key(1), None);
    let c = Node::new(3, key(1), None);
    a.backend.published_at(1, t0);
    let (with, _) = a.desired(&[b.lease(), c.lease()], t0);
    let (without, _) = a.desired(&[b.lease()], t0 + Duration::from_secs(1));
    let changes = diff(&without, &with);
    assert_eq!(
        changes.len(),
        1 + 3 + 2,
        "route, 3 policies, 2 SAs: {changes:?}"
    );
    assert!(
        matches!(changes[0], Change::Route(RouteChange::Del { .. })),
        "route first: {changes:?}"
    );
    assert!(without
        .xfrm_states
        .keys()
        .all(|id| id.src != IpAddr::V4(c.ip) && id.dst != IpAddr::V4(c.ip)));
}

#[test]
fn a_tampered_key_gives_sas_the_peer_cannot_match() {
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let b = Node::new(2, key(1), None);
    a.backend.published_at(1, t0);
    b.backend.published_at(1, t0);
    let mut forged = b.lease();
    forged.backend_data = BackendData::Ipsec {
        public_key: key(1).public(),
        key_epoch: 1,
    }
    .to_value()
    .map(Into::into);
    let t1 = t0 + SWITCH + Duration::from_secs(1);
    let (sa, _) = a.desired(&[forged], t1);
    let (sb, _) = b.desired(&[a.lease()], t1);
    assert!(agree(&sa, &sb, a.ip, b.ip).is_err());
}

#[test]
fn a_restarted_node_with_the_same_key_computes_the_same_state() {
    let t0 = Instant::now();
    let k = key(4);
    let a = Node::new(1, k.clone(), Some(b"p"));
    let b = Node::new(2, key(9), Some(b"p"));
    a.backend.published_at(4, t0);
    let (before, _) = a.desired(&[b.lease()], t0);
    let again = Node::new(1, NodeKey::from_secret(*k.secret_bytes(), 4), Some(b"p"));
    again.backend.published_at(4, t0 + Duration::from_secs(30));
    let (after, _) = again.desired(&[b.lease()], t0 + Duration::from_secs(30));
    assert!(diff(&after, &before).is_empty());
    assert_eq!(a.lease().backend_data, again.lease().backend_data);
}

#[tokio::test]
async fn on_the_fake_kernel_it_converges_in_order_and_repairs_hand_deletions() {
    use weft_backends::{Dataplane, FakeDataplane};
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let peers = [
        Node::new(2, key(1), None).lease(),
        Node::new(3, key(1), None).lease(),
    ];
    a.backend.published_at(1, t0);
    let (want, _) = a.desired(&peers, t0);
    let fake = FakeDataplane::with_devices(&["eth0"]);
    let changes = diff(&want, &fake.observe().await.unwrap());
    // SAs, then policies, then routes: no route ever leads into a policy
    // without its SA.
    let rank = |c: &Change| match c {
        Change::XfrmState(XfrmStateChange::Add { .. }) => 0,
        Change::XfrmPolicy(XfrmPolicyChange::Set { .. })
        | Change::XfrmPolicy(XfrmPolicyChange::AddBlock { .. }) => 1,
        Change::Route(RouteChange::Set { .. }) => 2,
        other => panic!("unexpected {other}"),
    };
    let ranks: Vec<u8> = changes.iter().map(rank).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{changes:?}");
    assert!(fake.apply(&changes).await.is_empty());
    assert_eq!(fake.state(), want);
    assert!(diff(&want, &fake.state()).is_empty(), "idempotent");
    // An operator deletes an SA and a policy by hand; the next pass puts
    // them back, and the log line never shows a key.
    let gone_sa = *want.xfrm_states.keys().next().unwrap();
    let gone_pol = *want.xfrm_policies.keys().next().unwrap();
    fake.tamper(|st| {
        st.xfrm_states.remove(&gone_sa);
        st.xfrm_policies.remove(&gone_pol);
    });
    let repair = diff(&want, &fake.state());
    assert_eq!(repair.len(), 2, "{repair:?}");
    let key_hex: String = want.xfrm_states[&gone_sa]
        .key
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for c in &repair {
        assert!(!c.to_string().contains(&key_hex), "{c}");
        assert!(!format!("{c:?}").contains(&key_hex), "{c:?}");
    }
    assert!(fake.apply(&repair).await.is_empty());
    assert_eq!(fake.state(), want);
}

/// Peers whose outbound SAs the backend reports lost right now (it never
/// waits here).
fn lost_now(n: &Node) -> Option<Vec<Ipv4Addr>> {
    use futures::FutureExt;
    match n.backend.rekey_wanted().now_or_never()? {
        RekeyCause::LostOutbound(peers) => Some(peers),
        other => panic!("unexpected {other:?}"),
    }
}

/// One pass as the reconcile loop makes it: the kernel observed, desired
/// state computed, applied (the kernel then has it all).
fn pass(n: &Node, kernel: &NetState, peers: &[LeaseView], at: Instant) -> NetState {
    n.backend.observed(kernel);
    let (want, _) = n.desired(peers, at);
    n.backend.observed(&want);
    want
}

#[test]
fn a_lost_outbound_sa_asks_for_a_new_key_once_and_a_lost_inbound_one_does_not() {
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let (b, c) = (Node::new(2, key(1), None), Node::new(3, key(1), None));
    let peers = [b.lease(), c.lease()];
    a.backend.published_at(1, t0);
    // First pass on a fresh key: nothing installed yet is nothing lost.
    let want = pass(&a, &NetState::default(), &peers, t0);
    assert_eq!(lost_now(&a), None);
    // An inbound SA deleted by hand is simply put back: a new replay
    // window accepts the peer's next sequence numbers.
    let mut have = want.clone();
    let inbound = *have
        .xfrm_states
        .keys()
        .find(|id| id.src == IpAddr::V4(b.ip))
        .unwrap();
    have.xfrm_states.remove(&inbound);
    assert_eq!(pass(&a, &have, &peers, t0), want);
    assert_eq!(lost_now(&a), None);
    // The outbound SA to b: b has seen its sequence numbers, so it needs a
    // new key.
    let outbound = *have
        .xfrm_states
        .keys()
        .find(|id| id.dst == IpAddr::V4(b.ip))
        .unwrap();
    have.xfrm_states.remove(&outbound);
    a.backend.observed(&have);
    assert_eq!(lost_now(&a), Some(vec![b.ip]));
    assert_eq!(lost_now(&a), None, "taken");
    // Until the rotation the SA is not wanted back; its policy is, so
    // packets to b are dropped, not sent with restarted sequence numbers
    // (nor in the clear).
    let (meanwhile, _) = a.desired(&peers, t0);
    assert!(!meanwhile.xfrm_states.contains_key(&outbound));
    assert_eq!(meanwhile.xfrm_policies, want.xfrm_policies);
    assert_eq!(meanwhile.xfrm_blocks, want.xfrm_blocks);
    let again = pass(&a, &meanwhile, &peers, t0);
    assert!(!again.xfrm_states.contains_key(&outbound));
    assert_eq!(lost_now(&a), None, "one report per key");
    // After the rotation a new loss is reported again.
    a.backend.rotate(key(2));
    let want2 = pass(&a, &again, &peers, t0 + Duration::from_secs(1));
    let mut have2 = want2.clone();
    have2.xfrm_states.retain(|id, _| id.dst != IpAddr::V4(c.ip));
    a.backend.observed(&have2);
    assert_eq!(lost_now(&a), Some(vec![c.ip]));
    // A failed rotation puts the report back.
    a.backend
        .rekey_wanted_again(RekeyCause::LostOutbound(vec![c.ip]));
    assert_eq!(lost_now(&a), Some(vec![c.ip]));
}

#[test]
fn after_a_restart_with_the_stored_key_missing_outbound_sas_mean_a_reboot() {
    let t0 = Instant::now();
    let k = key(3);
    let b = Node::new(2, key(1), None);
    let restored = || {
        let n = Node::new(1, NodeKey::from_secret(*k.secret_bytes(), 3), None);
        n.backend.key_restored();
        n.backend.published_at(3, t0);
        n
    };
    // Only restarted: the kernel kept the SAs, nothing to do.
    let a = restored();
    let (before, _) = a.desired(&[b.lease()], t0);
    let a = restored();
    assert_eq!(pass(&a, &before, &[b.lease()], t0), before);
    assert_eq!(lost_now(&a), None);
    // Rebooted: the kernel lost everything, b still has its inbound SA
    // with our old sequence numbers. The outbound SA is not put back.
    let a = restored();
    let after = pass(&a, &NetState::default(), &[b.lease()], t0);
    assert_eq!(lost_now(&a), Some(vec![b.ip]));
    let out: Vec<_> = before
        .xfrm_states
        .keys()
        .filter(|id| id.dst == IpAddr::V4(b.ip))
        .collect();
    assert_eq!(out.len(), 1);
    assert!(!after.xfrm_states.contains_key(out[0]));
    assert_eq!(after.xfrm_policies, before.xfrm_policies);
    // A new key (first start) never reports.
    let fresh = Node::new(1, key(1), None);
    fresh.backend.published_at(1, t0);
    pass(&fresh, &NetState::default(), &[b.lease()], t0);
    assert_eq!(lost_now(&fresh), None);
}

#[test]
fn a_peer_that_leaves_and_comes_back_with_the_same_key_gets_fresh_sas() {
    // Its lease expired (an etcd outage, say) and was taken again; its own
    // kernel kept the inbound SA that has seen our sequence numbers.
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let b = Node::new(2, key(1), None);
    a.backend.published_at(1, t0);
    let with_b = pass(&a, &NetState::default(), &[b.lease()], t0);
    let without_b = pass(&a, &with_b, &[], t0 + Duration::from_secs(1));
    assert_eq!(lost_now(&a), None, "a peer that is gone sends nothing");
    let back = pass(&a, &without_b, &[b.lease()], t0 + Duration::from_secs(2));
    assert_eq!(lost_now(&a), Some(vec![b.ip]));
    // The same keys would give the same SAs: all but the outbound one.
    let mut expected = with_b.clone();
    expected
        .xfrm_states
        .retain(|id, _| id.dst != IpAddr::V4(b.ip));
    assert_eq!(back, expected);
    // The rotation: until the new key is published and the switch is
    // due, the lost SA stays out; then the new generation's goes in.
    let lost_out: Vec<_> = with_b
        .xfrm_states
        .keys()
        .filter(|id| id.dst == IpAddr::V4(b.ip))
        .copied()
        .collect();
    assert_eq!(lost_out.len(), 1);
    a.backend.rotate(key(2));
    let t3 = t0 + Duration::from_secs(3);
    let rotating = pass(&a, &back, &[b.lease()], t3);
    assert!(!rotating.xfrm_states.contains_key(&lost_out[0]));
    assert_eq!(lost_now(&a), None);
    a.backend.published_at(2, t3);
    let switched = pass(
        &a,
        &rotating,
        &[b.lease()],
        t3 + SWITCH + Duration::from_secs(1),
    );
    let out: Vec<_> = switched
        .xfrm_states
        .keys()
        .filter(|id| id.dst == IpAddr::V4(b.ip))
        .collect();
    assert_eq!(out.len(), 1, "{switched:?}");
    assert_ne!(*out[0], lost_out[0]);
    assert_eq!(lost_now(&a), None, "the new SA is fresh");
}

#[test]
fn inbound_sas_that_drew_the_same_spi_keep_the_lowest_source_and_report_the_rest() {
    // Real collisions are one in 2^32 per pair: build the state by hand
    // from a real one, giving three peers' inbound SAs one SPI.
    let t0 = Instant::now();
    let a = Node::new(1, key(1), None);
    let peers: Vec<Node> = (2..=5).map(|i| Node::new(i, key(1), None)).collect();
    let leases: Vec<LeaseView> = peers.iter().map(|p| p.lease()).collect();
    a.backend.published_at(1, t0);
    let (want, _) = a.desired(&leases, t0);
    let me = IpAddr::V4(a.ip);
    let mut st = want.clone();
    let inbound: Vec<_> = want
        .xfrm_states
        .iter()
        .filter(|(id, _)| id.dst == me)
        .map(|(id, sa)| (*id, sa.clone()))
        .collect();
    assert_eq!(inbound.len(), 4);
    let shared = inbound[0].0.spi;
    for (id, sa) in &inbound {
        if [peers[1].ip, peers[2].ip, peers[3].ip].contains(&ip4(id.src)) {
            st.xfrm_states.remove(id);
            let mut moved = *id;
            moved.spi = shared;
            st.xfrm_states.insert(moved, sa.clone());
        }
    }
    let before = st.clone();
    let mut dropped: Vec<Ipv4Addr> = drop_inbound_spi_collisions(&mut st, me)
        .into_iter()
        .map(|id| ip4(id.src))
        .collect();
    dropped.sort();
    // Of the SAs with the shared SPI, the lowest source stays.
    let mut sharing: Vec<Ipv4Addr> = before
        .xfrm_states
        .keys()
        .filter(|id| id.dst == me && id.spi == shared)
        .map(|id| ip4(id.src))
        .collect();
    sharing.sort();
    assert!(sharing.len() >= 3, "{sharing:?}");
    assert_eq!(dropped, sharing[1..].to_vec());
    let left: Vec<_> = st
        .xfrm_states
        .keys()
        .filter(|id| id.dst == me && id.spi == shared)
        .collect();
    assert_eq!(left.len(), 1);
    assert_eq!(ip4(left[0].src), sharing[0]);
    // Nothing else changed; without collisions nothing is dropped.
    assert_eq!(
        st.xfrm_states.len(),
        before.xfrm_states.len() - dropped.len()
    );
    let mut clean = want.clone();
    assert!(drop_inbound_spi_collisions(&mut clean, me).is_empty());
    assert_eq!(clean, want);
    // desired() never holds a collision, and asks for no new key then.
    use futures::FutureExt;
    assert_eq!(a.backend.rekey_wanted().now_or_never(), None);
}

fn ip4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => panic!("not IPv4: {v6}"),
    }
}

#[test]
fn in_a_network_with_ipv6_pod_ipv6_between_nodes_is_dropped_not_sent_in_the_clear() {
    let n = Node::new(1, key(1), None);
    let dual = Arc::new(
        NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fdc6:7765:6675::/48","Backend":{"Type":"ipsec"}}"#,
        )
        .unwrap(),
    );
    let mut me = n.local();
    me.network = dual;
    me.subnet = "10.244.1.0-24&fdc6:7765:6675:1::-64".parse().unwrap();
    let (st, _) = n.backend.desired_at(&me, &[], Instant::now());
    // ipsec carries IPv4 only: the IPv6 network is a blackhole.
    assert_eq!(
        st.fallback_routes.keys().copied().collect::<Vec<_>>(),
        [net("fdc6:7765:6675::/48")]
    );
    // Without IPv6 in the network, none.
    let (st, _) = n.backend.desired_at(&n.local(), &[], Instant::now());
    assert!(st.fallback_routes.is_empty());
}
