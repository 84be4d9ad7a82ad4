//! The reconcile loop against the fake dataplane, with paused time.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use weft_backends::ipsec::keys::NodeKey;
use weft_backends::ipsec::{Ipsec, RekeyCause, Timing};
use weft_backends::peer::read;
use weft_backends::{vtep_mac, Dataplane, ExternalIface, FakeDataplane, LocalNode, Vxlan};
use weft_config::{NetworkConfig, VxlanConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, Lease, LeaseAttrs};
use weft_node::peers::PeerTable;
use weft_node::reconcile::{Kicker, Reconciler};
use weft_node::status::Status;

fn local(subnet: &str) -> Arc<LocalNode> {
    Arc::new(LocalNode::new(
        "host-1",
        subnet.parse().unwrap(),
        "198.18.0.11".parse().unwrap(),
        ExternalIface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            addr: "198.18.0.11/16".parse().unwrap(),
        },
        Arc::new(NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap()),
    ))
}

fn lease(i: u32) -> LeaseView {
    lease_with(
        i,
        BackendData::Vxlan {
            vni: 1,
            vtep_mac: vtep_mac(&format!("host-{i}")),
        },
    )
}

/// Host `i`'s lease (subnet 10.244.i.0/24, public IP 198.18.0.(10+i)).
fn lease_with(i: u32, backend: BackendData) -> LeaseView {
    let l = Lease {
        key: format!("10.244.{i}.0-24").parse().unwrap(),
        attrs: LeaseAttrs::new(
            &format!("host-{i}"),
            Some(format!("198.18.0.{}", 10 + i).parse().unwrap()),
            None,
            &backend,
        ),
        etcd_lease: None,
        create_revision: 1,
        mod_revision: 1,
    };
    LeaseView::new(&l, true, None)
}

fn table(ids: &[u32]) -> PeerTable {
    PeerTable::new(
        1,
        ids.iter()
            .map(|i| lease(*i))
            .map(|l| (l.key, read(&l)))
            .collect(),
    )
}

struct Setup {
    fake: Arc<FakeDataplane>,
    status: Arc<Status>,
    local: watch::Sender<Option<Arc<LocalNode>>>,
    peers: watch::Sender<PeerTable>,
}

fn start(resync: Duration) -> Setup {
    let fake = Arc::new(FakeDataplane::with_devices(&["eth0"]));
    let status = Arc::new(Status::new("host-1"));
    let (local_tx, local_rx) = watch::channel(None);
    let (peers_tx, peers_rx) = watch::channel(PeerTable::default());
    let r = Reconciler::new(
        fake.clone(),
        Arc::new(Vxlan::new(VxlanConfig::default())),
        status.clone(),
    );
    tokio::spawn(r.run(local_rx, peers_rx, resync));
    Setup {
        fake,
        status,
        local: local_tx,
        peers: peers_tx,
    }
}

/// Lets the loop run until it is idle (paused time advances only then).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_happens_before_the_first_full_list() {
    let s = start(Duration::from_secs(10));
    s.local.send_replace(Some(local("10.244.1.0-24")));
    settle().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        s.fake.applied().is_empty(),
        "a restarted node must not act on an empty peer list"
    );
    assert!(!s.status.snapshot().ready);
    s.peers.send_replace(table(&[1, 2, 3]));
    settle().await;
    let st = s.fake.observe().await.unwrap();
    assert_eq!(st.routes.len(), 2, "own lease excluded");
    assert!(s.status.snapshot().ready);
    assert_eq!(s.status.snapshot().peers, 2);
}

#[tokio::test(start_paused = true)]
async fn every_lease_change_is_reconciled() {
    let s = start(Duration::from_secs(3600));
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(table(&[2]));
    settle().await;
    assert_eq!(s.fake.observe().await.unwrap().routes.len(), 1);
    s.peers.send_replace(table(&[2, 3, 4]));
    settle().await;
    assert_eq!(s.fake.observe().await.unwrap().routes.len(), 3);
    s.peers.send_replace(table(&[4]));
    settle().await;
    let st = s.fake.observe().await.unwrap();
    assert_eq!(st.routes.len(), 1);
    assert_eq!(st.fdb.len(), 1);
    // The local subnet changes: the device address follows.
    s.local.send_replace(Some(local("10.244.9.0-24")));
    settle().await;
    let st = s.fake.observe().await.unwrap();
    assert!(
        st.addresses
            .keys()
            .any(|(_, a)| a.to_string() == "10.244.9.0/32"),
        "{:?}",
        st.addresses
    );
    assert_eq!(st.addresses.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_periodic_resync_restores_what_was_deleted_by_hand() {
    let s = start(Duration::from_secs(10));
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(table(&[2, 3]));
    settle().await;
    let want = s.fake.observe().await.unwrap();
    s.fake.tamper(|st| {
        st.routes.clear();
        st.links.clear();
    });
    settle().await;
    assert_ne!(
        s.fake.observe().await.unwrap(),
        want,
        "nothing notices before the resync"
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    settle().await;
    assert_eq!(s.fake.observe().await.unwrap(), want);
}

#[tokio::test(start_paused = true)]
async fn failures_are_reported_and_retried_and_other_peers_still_programmed() {
    let s = start(Duration::from_secs(10));
    s.fake.fail_changes_containing("10.244.3.0/24");
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(table(&[2, 3, 4]));
    settle().await;
    let snap = s.status.snapshot();
    assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
    assert!(snap.errors[0].contains("10.244.3.0/24"));
    assert!(snap.ready, "a full pass happened, with errors reported");
    assert_eq!(s.fake.observe().await.unwrap().routes.len(), 2);
    assert!(s
        .status
        .metrics_text()
        .contains("weft_node_reconcile_errors_total 1"));
    s.fake.heal();
    tokio::time::sleep(Duration::from_secs(11)).await;
    settle().await;
    assert!(s.status.snapshot().errors.is_empty());
    assert_eq!(s.fake.observe().await.unwrap().routes.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn bad_leases_are_skipped_and_listed() {
    let s = start(Duration::from_secs(10));
    let mut bad = lease(5);
    bad.backend_data = Some(serde_json::json!({"garbage": true}).into());
    let mut t = table(&[2]);
    t.insert(bad.key, read(&bad));
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(t);
    settle().await;
    let snap = s.status.snapshot();
    assert_eq!(snap.peers, 1);
    assert_eq!(snap.skipped.len(), 1);
    assert!(
        snap.skipped[0].starts_with("10.244.5.0/24 (host-5)"),
        "{:?}",
        snap.skipped
    );
    assert!(s
        .status
        .metrics_text()
        .contains("weft_node_skipped_peers 1"));
}

#[tokio::test(start_paused = true)]
async fn lease_changes_reuse_the_last_observation_and_the_resync_reads_the_kernel() {
    let s = start(Duration::from_secs(10));
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(table(&[2]));
    settle().await;
    let first = s.fake.observations();
    assert_eq!(first, 1, "the first pass observes");
    s.peers.send_replace(table(&[2, 3]));
    settle().await;
    s.peers.send_replace(table(&[2, 3, 4]));
    settle().await;
    assert_eq!(
        s.fake.observations(),
        first,
        "lease changes do not read the kernel back"
    );
    assert_eq!(s.fake.observe().await.unwrap().routes.len(), 3);
    let before = s.fake.observations();
    tokio::time::sleep(Duration::from_secs(11)).await;
    settle().await;
    assert_eq!(s.fake.observations(), before + 1, "the resync observes");
}

#[tokio::test(start_paused = true)]
async fn a_steady_stream_of_changes_does_not_postpone_the_repair() {
    let s = start(Duration::from_secs(10));
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(table(&[2, 3]));
    settle().await;
    s.fake.tamper(|st| st.routes.clear());
    // A lease change every second, for 15 seconds.
    for k in 0..15u32 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ids: Vec<u32> = if k % 2 == 0 {
            vec![2, 3, 4]
        } else {
            vec![2, 3]
        };
        s.peers.send_replace(table(&ids));
        settle().await;
    }
    let st = s.fake.observe().await.unwrap();
    assert!(
        st.routes.contains_key(&"10.244.2.0/24".parse().unwrap()),
        "repaired within the resync interval: {:?}",
        st.routes
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_failure_the_next_pass_reads_the_kernel() {
    let s = start(Duration::from_secs(3600));
    s.fake.fail_changes_containing("10.244.3.0/24");
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(table(&[2, 3]));
    settle().await;
    let n = s.fake.observations();
    s.fake.heal();
    s.peers.send_replace(table(&[2, 3, 4]));
    settle().await;
    assert_eq!(s.fake.observations(), n + 1, "a pass after errors observes");
    assert_eq!(
        s.fake.observe().await.unwrap().routes.len(),
        3,
        "and repairs what failed"
    );
}

/// An ipsec peer's lease with this key.
fn ipsec_lease(i: u32, key: &weft_backends::ipsec::keys::NodeKey) -> LeaseView {
    lease_with(
        i,
        BackendData::Ipsec {
            public_key: key.public(),
            key_epoch: key.epoch(),
        },
    )
}

/// Host 1's reconcile loop with the ipsec backend on a fake kernel (no
/// resync: only leases, kicks and the backend's clock wake it).
struct IpsecLoop {
    fake: Arc<FakeDataplane>,
    ipsec: Arc<Ipsec>,
    kicker: Kicker,
    peers: watch::Sender<PeerTable>,
    /// Kept: the loop stops when its senders go away.
    _local: watch::Sender<Option<Arc<LocalNode>>>,
}

fn ipsec_loop(timing: Timing) -> IpsecLoop {
    let fake = Arc::new(FakeDataplane::with_devices(&["eth0"]));
    let status = Arc::new(Status::new("host-1"));
    let ipsec = Arc::new(Ipsec::new(NodeKey::generate(1).unwrap(), None, timing));
    ipsec.published(1);
    let (local_tx, local_rx) = watch::channel(None);
    let (peers, peers_rx) = watch::channel(PeerTable::default());
    let r = Reconciler::new(fake.clone(), ipsec.clone(), status);
    let kicker = r.kicker();
    tokio::spawn(r.run(local_rx, peers_rx, Duration::from_secs(3600)));
    let mut local = (*local("10.244.1.0-24")).clone();
    local.network = Arc::new(
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec"}}"#).unwrap(),
    );
    local_tx.send_replace(Some(Arc::new(local)));
    IpsecLoop {
        fake,
        ipsec,
        kicker,
        peers,
        _local: local_tx,
    }
}

/// A peer table holding host 2 with key `k`.
fn ipsec_peer(k: &NodeKey) -> PeerTable {
    let l = ipsec_lease(2, k);
    PeerTable::new(1, [(l.key, read(&l))].into_iter().collect())
}

#[tokio::test(start_paused = true)]
async fn an_outbound_sa_deleted_before_any_later_pass_still_asks_for_a_new_key() {
    // Installed by a pass woken by the lease, deleted before any other
    // pass ran: the SA was in the kernel and may have carried packets.
    let IpsecLoop {
        fake,
        ipsec,
        kicker,
        peers: peers_tx,
        _local,
    } = ipsec_loop(Timing::default());
    peers_tx.send_replace(ipsec_peer(&NodeKey::generate(1).unwrap()));
    settle().await;
    let out = *fake
        .state()
        .xfrm_states
        .keys()
        .find(|id| id.src.to_string() == "198.18.0.11")
        .unwrap();
    fake.tamper(|st| {
        st.xfrm_states.remove(&out);
    });
    // Not put back (its sequence numbers are burnt); its policy stays, so
    // packets to the peer are dropped until the rotation.
    let o = kicker.full_pass().await.unwrap();
    assert!(o.errors.is_empty() && o.changes == 0, "{o:?}");
    assert!(!fake.state().xfrm_states.contains_key(&out));
    assert!(fake
        .state()
        .xfrm_policies
        .keys()
        .any(|p| p.dst.to_string() == "10.244.2.0/24"));
    use futures::FutureExt;
    assert_eq!(
        ipsec.rekey_wanted().now_or_never(),
        Some(RekeyCause::LostOutbound(vec!["198.18.0.12"
            .parse()
            .unwrap()]))
    );
}

#[tokio::test(start_paused = true)]
async fn ipsec_switches_happen_on_time_without_waiting_for_the_resync_and_kicks_run_a_pass() {
    let timing = Timing::default();
    let IpsecLoop {
        fake,
        ipsec,
        kicker,
        peers: peers_tx,
        _local,
    } = ipsec_loop(timing);
    let k1 = NodeKey::generate(1).unwrap();
    peers_tx.send_replace(ipsec_peer(&k1));
    settle().await;
    let out_spis = || {
        let st = fake.state();
        let mut v: Vec<u32> = st
            .xfrm_states
            .keys()
            .filter(|id| id.src.to_string() == "198.18.0.11")
            .map(|id| id.spi)
            .collect();
        v.sort();
        v
    };
    let first = out_spis();
    assert_eq!(first.len(), 1);
    assert_eq!(fake.state().xfrm_states.len(), 2);

    // The peer rotates: its new inbound SA at once, the outbound switch
    // after the switch delay, the old inbound one gone after the grace.
    let k2 = NodeKey::generate(2).unwrap();
    peers_tx.send_replace(ipsec_peer(&k2));
    settle().await;
    assert_eq!(fake.state().xfrm_states.len(), 3, "new inbound SA added");
    assert_eq!(out_spis(), first, "still sending with the old SA");
    tokio::time::sleep(timing.switch_delay + Duration::from_millis(10)).await;
    settle().await;
    assert_ne!(
        out_spis(),
        first,
        "switched without a lease change or resync"
    );
    assert_eq!(out_spis().len(), 1);
    tokio::time::sleep(timing.grace).await;
    settle().await;
    assert_eq!(
        fake.state().xfrm_states.len(),
        2,
        "old inbound SA gone after the grace"
    );

    // A kick runs a full pass at once (it observes the kernel).
    let observed = fake.observations();
    let o = kicker.full_pass().await.unwrap();
    assert!(o.errors.is_empty(), "{o:?}");
    assert_eq!(fake.observations(), observed + 1);

    // The outbound SA disappears behind weft's back: the next full pass
    // does not put it back (the peer would drop the restarted sequence
    // numbers) and asks for a new key.
    use futures::FutureExt;
    assert_eq!(ipsec.rekey_wanted().now_or_never(), None);
    let out = *fake
        .state()
        .xfrm_states
        .keys()
        .find(|id| id.src.to_string() == "198.18.0.11")
        .unwrap();
    fake.tamper(|st| {
        st.xfrm_states.remove(&out);
    });
    let o = kicker.full_pass().await.unwrap();
    assert!(o.errors.is_empty() && o.changes == 0, "{o:?}");
    assert!(!fake.state().xfrm_states.contains_key(&out));
    assert_eq!(
        ipsec.rekey_wanted().now_or_never(),
        Some(weft_backends::ipsec::RekeyCause::LostOutbound(vec![
            "198.18.0.12".parse().unwrap()
        ]))
    );
}

/// What a pass that plans every lease makes of `t`.
fn desired_for(t: &PeerTable, l: &LocalNode) -> weft_backends::NetState {
    use weft_backends::peer::{select, HostView};
    use weft_backends::Backend;
    let vx = Vxlan::new(VxlanConfig::default());
    let (peers, _) = select(
        t.leases().values(),
        l,
        weft_config::BackendType::Vxlan,
        &HostView::default(),
    );
    vx.desired(l, &peers).0
}

#[tokio::test(start_paused = true)]
async fn single_lease_changes_are_planned_alone_and_end_where_a_full_pass_would() {
    let s = start(Duration::from_secs(3600));
    let l = local("10.244.1.0-24");
    s.local.send_replace(Some(l.clone()));
    s.peers.send_replace(table(&[2, 3]));
    settle().await;
    let alone = || s.status.reconciles_changed_only.get();
    assert_eq!(alone(), 0, "a new table is planned whole");
    // Host 5 claims host 4's public IP; host 3 moves to another IP.
    let mut clone = lease(5);
    clone.public_ip = lease(4).public_ip;
    let mut moved = lease(3);
    moved.public_ip = Some("198.18.0.99".parse().unwrap());
    let steps: Vec<(&str, LeaseView, bool, bool)> = vec![
        ("host 4 joins", lease(4), true, true),
        ("host 2 leaves", lease(2), false, true),
        ("host 3 moves", moved, true, true),
        ("host 5 claims host 4's IP", clone.clone(), true, false),
        ("host 4 leaves, host 5 gets its IP", lease(4), false, false),
        ("host 6 joins", lease(6), true, true),
    ];
    for (what, l2, put, planned_alone) in steps {
        let before = alone();
        s.peers.send_modify(|t| {
            if put {
                t.insert(l2.key, read(&l2));
            } else {
                t.remove(&l2.key);
            }
        });
        settle().await;
        assert_eq!(alone() - before, u64::from(planned_alone), "{what}");
        let want = desired_for(&s.peers.borrow(), &l);
        assert_eq!(s.fake.observe().await.unwrap(), want, "{what}");
    }
    let snap = s.status.snapshot();
    assert_eq!(snap.peers, 3, "hosts 3, 5 and 6: {snap:?}");
    assert!(snap.skipped.is_empty(), "{:?}", snap.skipped);
}

#[tokio::test(start_paused = true)]
async fn a_change_that_fails_on_a_changed_only_pass_is_repaired_by_the_next_pass() {
    let s = start(Duration::from_secs(3600));
    s.local.send_replace(Some(local("10.244.1.0-24")));
    s.peers.send_replace(table(&[2]));
    settle().await;
    let alone = s.status.reconciles_changed_only.get();
    s.fake.fail_changes_containing("10.244.3.0/24");
    let three = lease(3);
    s.peers.send_modify(|t| t.insert(three.key, read(&three)));
    settle().await;
    assert_eq!(s.status.reconciles_changed_only.get(), alone + 1);
    assert_eq!(s.status.snapshot().errors.len(), 1);
    assert_eq!(s.fake.observe().await.unwrap().routes.len(), 1);
    // (The test's own reads count too.)
    let seen = s.fake.observations();
    s.fake.heal();
    let four = lease(4);
    s.peers.send_modify(|t| t.insert(four.key, read(&four)));
    settle().await;
    assert_eq!(
        s.fake.observations(),
        seen + 1,
        "after errors a pass reads the kernel back"
    );
    assert_eq!(
        s.status.reconciles_changed_only.get(),
        alone + 1,
        "and plans every lease"
    );
    assert!(s.status.snapshot().errors.is_empty());
    let l = local("10.244.1.0-24");
    assert_eq!(
        s.fake.observe().await.unwrap(),
        desired_for(&s.peers.borrow(), &l)
    );
}
