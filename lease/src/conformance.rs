//! The store conformance suite: what every [`LeaseStore`] must do, checked
//! the same way against [`MemoryStore`](crate::MemoryStore) and a real etcd.
//!
//! Use [`conformance_tests!`](crate::conformance_tests) with an async
//! function that returns a fresh, empty store; it expands to one test per
//! check.

use crate::store::{Claim, LeaseStore, NodeGuard, StoreError, StoreEvent, WatchStream};
use crate::{BackendData, Lease, LeaseAttrs, LeaseId, SubnetKey};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// A store under test.
pub type Store = Arc<dyn LeaseStore>;

/// Expands to one `#[tokio::test]` per conformance check. `$make` is an
/// async fn returning a fresh `Arc<dyn LeaseStore>`; attributes given before
/// it (e.g. `#[ignore = "..."]`) go on every test.
#[macro_export]
macro_rules! conformance_tests {
    ($(#[$attr:meta])* $make:path) => {
        $crate::conformance_tests!(@each [$(#[$attr])*] $make;
            create_claims_a_subnet_once,
            dual_stack_keys_guard_the_ipv4_subnet,
            concurrent_creates_have_one_winner,
            reservation_has_no_lease_and_stays,
            expired_lease_is_deleted_and_watch_reports_it,
            keep_alive_renews_the_same_lease,
            update_is_compare_and_set,
            delete_is_compare_and_set,
            revoke_deletes_keys_and_is_idempotent,
            watch_replays_from_a_revision_then_follows,
            compaction_is_reported,
            snapshot_at_reads_the_past,
            snapshot_at_zero_is_empty_until_compacted,
            corrupt_entries_are_reported_not_fatal,
            config_is_stored_and_watched,
            flannel_written_lease_is_read,
            unknown_etcd_lease_is_not_found,
            claim_checks_the_config_the_subnet_and_the_node,
            concurrent_claims_for_one_node_have_one_winner,
            a_storm_of_claims_ends_as_one_by_one,
            requests_are_counted,
            names_live_and_die_with_their_lease,
            unreadable_names_are_gone_for_readers
        );
    };
    (@each $attrs:tt $make:path; $($name:ident),*) => {
        $( $crate::conformance_tests!(@one $attrs $make, $name); )*
    };
    (@one [$(#[$attr:meta])*] $make:path, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            let store = $make().await;
            $crate::conformance::$name(store).await;
        }
    };
}

fn key(s: &str) -> SubnetKey {
    s.parse().expect("test key")
}

fn attrs(node: &str, ip: &str) -> LeaseAttrs {
    LeaseAttrs::new(
        node,
        Some(ip.parse().expect("test ip")),
        None,
        &BackendData::Vxlan {
            vni: 1,
            vtep_mac: "0e:00:00:00:00:01".parse().expect("test mac"),
        },
    )
}

/// Reads watch events one at a time across batches.
struct Events {
    stream: WatchStream,
    pending: VecDeque<StoreEvent>,
}

impl Events {
    fn new(stream: WatchStream) -> Self {
        Events {
            stream,
            pending: VecDeque::new(),
        }
    }

    async fn next(&mut self, within: Duration) -> Result<StoreEvent, StoreError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => panic!("no watch event within {within:?}"),
                Ok(None) => panic!("watch stream ended"),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(batch))) => {
                    for e in &batch.events {
                        assert!(
                            e.revision() <= batch.revision,
                            "event after its batch revision: {batch:?}"
                        );
                    }
                    self.pending.extend(batch.events);
                }
            }
        }
    }
}

pub async fn create_claims_a_subnet_once(store: Store) {
    let k = key("10.244.3.0-24");
    let id = store.grant(Duration::from_secs(60)).await.unwrap();
    let a = attrs("host-1", "198.18.0.11");
    let lease = store.create(&k, &a, Some(id)).await.unwrap();
    assert_eq!(lease.key, k);
    assert_eq!(lease.etcd_lease, Some(id));
    assert_eq!(lease.create_revision, lease.mod_revision);
    let err = store
        .create(&k, &attrs("host-2", "198.18.0.12"), None)
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::AlreadyExists(k));
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert_eq!(snap.leases[0].attrs, a);
    assert_eq!(snap.leases[0].etcd_lease, Some(id));
    assert_eq!(snap.leases[0].mod_revision, lease.mod_revision);
    assert!(snap.revision >= lease.mod_revision);
}

pub async fn dual_stack_keys_guard_the_ipv4_subnet(store: Store) {
    let v4 = key("10.244.3.0-24");
    let dual = key("10.244.3.0-24&fd77:0:0:3::-64");
    store
        .create(&v4, &attrs("a", "198.18.0.1"), None)
        .await
        .unwrap();
    assert!(matches!(
        store.create(&dual, &attrs("b", "198.18.0.2"), None).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let dual2 = key("10.244.4.0-24&fd77:0:0:4::-64");
    store
        .create(&dual2, &attrs("c", "198.18.0.3"), None)
        .await
        .unwrap();
    assert!(matches!(
        store
            .create(&key("10.244.4.0-24"), &attrs("d", "198.18.0.4"), None)
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    // A longer address with the same leading text is another subnet.
    store
        .create(&key("10.244.30.0-24"), &attrs("e", "198.18.0.5"), None)
        .await
        .unwrap();
    store
        .create(&key("10.244.3.0-25"), &attrs("f", "198.18.0.6"), None)
        .await
        .unwrap();
    assert_eq!(store.snapshot().await.unwrap().leases.len(), 4);
}

pub async fn concurrent_creates_have_one_winner(store: Store) {
    let k = key("10.244.9.0-24");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create(&k, &attrs(&format!("n{i}"), "198.18.0.9"), None)
                .await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(won, 1);
}

pub async fn reservation_has_no_lease_and_stays(store: Store) {
    let k = key("10.244.7.0-24");
    let r = store
        .create(&k, &attrs("reserved-node", "0.0.0.0"), None)
        .await
        .unwrap();
    assert!(r.is_reservation());
    let snap = store.snapshot().await.unwrap();
    assert!(snap.leases[0].is_reservation());
    assert_eq!(snap.leases[0].node_name(), Some("reserved-node"));
}

pub async fn expired_lease_is_deleted_and_watch_reports_it(store: Store) {
    let k = key("10.244.5.0-24");
    let id = store.grant(Duration::from_secs(2)).await.unwrap();
    let lease = store
        .create(&k, &attrs("short", "198.18.0.5"), Some(id))
        .await
        .unwrap();
    let reserved = key("10.244.6.0-24");
    store
        .create(&reserved, &attrs("keeper", "198.18.0.6"), None)
        .await
        .unwrap();
    let mut events = Events::new(store.watch(lease.mod_revision + 1).await.unwrap());
    // The reservation's put comes first, then the expiry.
    loop {
        match events.next(Duration::from_secs(20)).await.unwrap() {
            StoreEvent::Put(l) => assert_eq!(l.key, reserved),
            StoreEvent::Delete {
                key: gone,
                revision,
            } => {
                assert_eq!(gone, k);
                assert!(revision > lease.mod_revision);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert_eq!(snap.leases[0].key, reserved);
    assert!(matches!(
        store.keep_alive(id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.time_to_live(id).await.unwrap(), None);
}

pub async fn keep_alive_renews_the_same_lease(store: Store) {
    let k = key("10.244.8.0-24");
    let id = store.grant(Duration::from_secs(3)).await.unwrap();
    store
        .create(&k, &attrs("renewer", "198.18.0.8"), Some(id))
        .await
        .unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let ttl = store.keep_alive(id).await.unwrap();
        assert_eq!(ttl, Duration::from_secs(3));
    }
    // 6 s after the grant, twice the TTL: still there, same etcd lease.
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert_eq!(snap.leases[0].etcd_lease, Some(id));
    let left = store.time_to_live(id).await.unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(3) && left >= Duration::from_secs(1),
        "{left:?}"
    );
}

pub async fn update_is_compare_and_set(store: Store) {
    let k = key("10.244.10.0-24");
    let id = store.grant(Duration::from_secs(60)).await.unwrap();
    let first = store
        .create(&k, &attrs("u", "198.18.0.10"), Some(id))
        .await
        .unwrap();
    let changed = attrs("u", "198.18.0.110");
    let second = store.update(&first, &changed, Some(id)).await.unwrap();
    assert!(second.mod_revision > first.mod_revision);
    assert_eq!(second.create_revision, first.create_revision);
    // A stale read loses.
    assert!(matches!(
        store
            .update(&first, &attrs("u", "198.18.0.210"), Some(id))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases[0].attrs, changed);
    assert_eq!(snap.leases[0].etcd_lease, Some(id));
    // Detaching from the etcd lease turns it into a reservation.
    let third = store.update(&second, &changed, None).await.unwrap();
    store.revoke(id).await.unwrap();
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert!(snap.leases[0].is_reservation());
    store.delete(&k, third.mod_revision).await.unwrap();
    assert!(matches!(
        store.update(&third, &changed, None).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn delete_is_compare_and_set(store: Store) {
    let k = key("10.244.11.0-24");
    let l = store
        .create(&k, &attrs("d", "198.18.0.11"), None)
        .await
        .unwrap();
    assert!(matches!(
        store.delete(&k, l.mod_revision - 1).await,
        Err(StoreError::Conflict(_))
    ));
    let rev = store.delete(&k, l.mod_revision).await.unwrap();
    assert!(rev > l.mod_revision);
    assert!(matches!(
        store.delete(&k, l.mod_revision).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.snapshot().await.unwrap().leases.is_empty());
}

pub async fn revoke_deletes_keys_and_is_idempotent(store: Store) {
    let id = store.grant(Duration::from_secs(60)).await.unwrap();
    store
        .create(&key("10.244.12.0-24"), &attrs("r", "198.18.0.12"), Some(id))
        .await
        .unwrap();
    store.revoke(id).await.unwrap();
    assert!(store.snapshot().await.unwrap().leases.is_empty());
    store.revoke(id).await.unwrap();
}

pub async fn watch_replays_from_a_revision_then_follows(store: Store) {
    let a = store
        .create(&key("10.244.13.0-24"), &attrs("a", "198.18.0.13"), None)
        .await
        .unwrap();
    let b = store
        .create(&key("10.244.14.0-24"), &attrs("b", "198.18.0.14"), None)
        .await
        .unwrap();
    let c = store
        .create(&key("10.244.15.0-24"), &attrs("c", "198.18.0.15"), None)
        .await
        .unwrap();
    let mut events = Events::new(store.watch(b.mod_revision).await.unwrap());
    let first = events.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(first, StoreEvent::Put(b.clone()));
    assert_eq!(
        events.next(Duration::from_secs(10)).await.unwrap(),
        StoreEvent::Put(c.clone())
    );
    let rev = store.delete(&a.key, a.mod_revision).await.unwrap();
    assert_eq!(
        events.next(Duration::from_secs(10)).await.unwrap(),
        StoreEvent::Delete {
            key: a.key,
            revision: rev
        }
    );
}

pub async fn compaction_is_reported(store: Store) {
    let a = store
        .create(&key("10.244.16.0-24"), &attrs("a", "198.18.0.16"), None)
        .await
        .unwrap();
    store.delete(&a.key, a.mod_revision).await.unwrap();
    let b = store
        .create(&key("10.244.17.0-24"), &attrs("b", "198.18.0.17"), None)
        .await
        .unwrap();
    store.compact(b.mod_revision).await.unwrap();
    assert!(matches!(
        store.snapshot_at(a.mod_revision).await,
        Err(StoreError::Compacted { requested, .. }) if requested == a.mod_revision
    ));
    let res = match store.watch(a.mod_revision).await {
        Err(e) => Err(e),
        Ok(s) => Events::new(s).next(Duration::from_secs(10)).await,
    };
    assert!(matches!(res, Err(StoreError::Compacted { .. })), "{res:?}");
    // The compaction revision itself is still readable.
    let snap = store.snapshot_at(b.mod_revision).await.unwrap();
    assert_eq!(snap.leases.len(), 1);
}

pub async fn snapshot_at_reads_the_past(store: Store) {
    store
        .put_config(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let a = store
        .create(&key("10.244.18.0-24"), &attrs("a", "198.18.0.18"), None)
        .await
        .unwrap();
    store.delete(&a.key, a.mod_revision).await.unwrap();
    store
        .create(&key("10.244.19.0-24"), &attrs("b", "198.18.0.19"), None)
        .await
        .unwrap();
    let past = store.snapshot_at(a.mod_revision).await.unwrap();
    assert_eq!(past.revision, a.mod_revision);
    assert_eq!(past.leases.len(), 1);
    assert_eq!(past.leases[0].key, a.key);
    assert!(past.config.is_some());
    let now = store.snapshot().await.unwrap();
    assert_eq!(now.leases.len(), 1);
    assert_eq!(now.leases[0].key, key("10.244.19.0-24"));
}

pub async fn snapshot_at_zero_is_empty_until_compacted(store: Store) {
    store
        .put_config(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let a = store
        .create(&key("10.244.22.0-24"), &attrs("a", "198.18.0.22"), None)
        .await
        .unwrap();
    let before_anything = store.snapshot_at(0).await.unwrap();
    assert!(before_anything.leases.is_empty() && before_anything.config.is_none());
    store.compact(a.mod_revision).await.unwrap();
    assert!(matches!(
        store.snapshot_at(0).await,
        Err(StoreError::Compacted { .. })
    ));
}

pub async fn corrupt_entries_are_reported_not_fatal(store: Store) {
    store
        .create(&key("10.244.20.0-24"), &attrs("ok", "198.18.0.20"), None)
        .await
        .unwrap();
    let start = store.snapshot().await.unwrap().revision;
    let mut events = Events::new(store.watch(start + 1).await.unwrap());
    store
        .put_raw("subnets/10.244.21.0-24", "{not json", None)
        .await
        .unwrap();
    store
        .put_raw("subnets/not-a-subnet", "{}", None)
        .await
        .unwrap();
    store.put_raw("elsewhere/ignored", "x", None).await.unwrap();
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert_eq!(snap.corrupt.len(), 2);
    let with_subnet: Vec<_> = snap.corrupt.iter().filter_map(|c| c.subnet).collect();
    assert_eq!(with_subnet, vec![key("10.244.21.0-24")]);
    for _ in 0..2 {
        match events.next(Duration::from_secs(10)).await.unwrap() {
            StoreEvent::Corrupt(c) => assert!(c.key.starts_with("subnets/")),
            other => panic!("expected a corrupt entry, got {other:?}"),
        }
    }
    // The unreadable key still holds its subnet.
    assert!(matches!(
        store
            .create(&key("10.244.21.0-24"), &attrs("x", "198.18.0.21"), None)
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
}

pub async fn config_is_stored_and_watched(store: Store) {
    let start = store.snapshot().await.unwrap();
    assert!(start.config.is_none());
    let mut events = Events::new(store.watch(start.revision + 1).await.unwrap());
    let text = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
    let rev = store.put_config(text).await.unwrap();
    assert_eq!(
        events.next(Duration::from_secs(10)).await.unwrap(),
        StoreEvent::ConfigPut {
            text: text.into(),
            revision: rev
        }
    );
    assert_eq!(
        store.snapshot().await.unwrap().config,
        Some((text.to_string(), rev))
    );
}

pub async fn flannel_written_lease_is_read(store: Store) {
    let id = store.grant(Duration::from_secs(60)).await.unwrap();
    let json = r#"{"PublicIP":"198.18.0.50","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    store
        .put_raw("subnets/10.244.50.0-24", json, Some(id))
        .await
        .unwrap();
    let snap = store.snapshot().await.unwrap();
    let l = &snap.leases[0];
    assert_eq!(l.key, key("10.244.50.0-24"));
    assert_eq!(l.node_name(), None);
    assert_eq!(l.etcd_lease, Some(id));
    assert!(l.attrs.backend().is_ok());
}

pub async fn unknown_etcd_lease_is_not_found(store: Store) {
    let bogus = LeaseId(0x7777_0000_1234);
    assert!(matches!(
        store
            .create(
                &key("10.244.60.0-24"),
                &attrs("x", "198.18.0.60"),
                Some(bogus)
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.keep_alive(bogus).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.time_to_live(bogus).await.unwrap(), None);
    assert!(store.snapshot().await.unwrap().leases.is_empty());
}

fn claim<'a>(
    k: &'a SubnetKey,
    a: &'a LeaseAttrs,
    node: &'a str,
    lease: LeaseId,
    config_revision: i64,
    guard: NodeGuard,
) -> Claim<'a> {
    Claim {
        key: k,
        attrs: a,
        node,
        lease,
        config_revision,
        guard,
    }
}

pub async fn claim_checks_the_config_the_subnet_and_the_node(store: Store) {
    let c1 = store
        .put_config(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let id = store.grant(Duration::from_secs(60)).await.unwrap();
    let (k1, k2, k3) = (
        key("10.244.1.0-24"),
        key("10.244.2.0-24"),
        key("10.244.3.0-24"),
    );
    let a1 = attrs("n1", "198.18.0.1");
    let a2 = attrs("n2", "198.18.0.2");
    let mut events = Events::new(store.watch(c1 + 1).await.unwrap());

    let first = store
        .claim(&claim(&k1, &a1, "n1", id, c1, NodeGuard::Absent))
        .await
        .unwrap();
    assert_eq!((first.key, first.etcd_lease), (k1, Some(id)));
    // A second subnet for the same node is refused, naming the first.
    assert_eq!(
        store
            .claim(&claim(&k2, &a1, "n1", id, c1, NodeGuard::Absent))
            .await,
        Err(StoreError::NodeClaimed {
            subnet: Some(k1.to_string()),
            revision: first.mod_revision
        })
    );
    // A taken subnet is refused before the node's guard is looked at.
    assert_eq!(
        store
            .claim(&claim(&k1, &a2, "n2", id, c1, NodeGuard::Absent))
            .await,
        Err(StoreError::AlreadyExists(k1))
    );
    // A subnet chosen under an older config is refused.
    let c2 = store
        .put_config(r#"{"Network":"10.244.0.0/15"}"#)
        .await
        .unwrap();
    assert_eq!(
        store
            .claim(&claim(&k3, &a2, "n2", id, c1, NodeGuard::Absent))
            .await,
        Err(StoreError::ConfigChanged { revision: c2 })
    );
    // Expecting a guard that is not there is refused too.
    assert_eq!(
        store
            .claim(&claim(
                &k3,
                &a2,
                "n2",
                id,
                c2,
                NodeGuard::At(first.mod_revision)
            ))
            .await,
        Err(StoreError::NodeClaimed {
            subnet: None,
            revision: 0
        })
    );
    // Superseding: the node's guard as last read.
    let second = store
        .claim(&claim(
            &k2,
            &a1,
            "n1",
            id,
            c2,
            NodeGuard::At(first.mod_revision),
        ))
        .await
        .unwrap();
    assert_eq!(
        store
            .claim(&claim(
                &k3,
                &a1,
                "n1",
                id,
                c2,
                NodeGuard::At(first.mod_revision)
            ))
            .await,
        Err(StoreError::NodeClaimed {
            subnet: Some(k2.to_string()),
            revision: second.mod_revision
        })
    );
    // The guards are not leases: the watch and the snapshot show the two
    // subnets only, nothing corrupt.
    let expect_lease = |e: StoreEvent, want: &Lease| match e {
        StoreEvent::Put(l) => {
            assert_eq!((l.key, l.mod_revision), (want.key, want.mod_revision))
        }
        e => panic!("expected the lease {}, got {e:?}", want.key),
    };
    expect_lease(events.next(Duration::from_secs(5)).await.unwrap(), &first);
    match events.next(Duration::from_secs(5)).await.unwrap() {
        StoreEvent::ConfigPut { revision, .. } if revision == c2 => {}
        e => panic!("expected the config at {c2}, got {e:?}"),
    }
    expect_lease(events.next(Duration::from_secs(5)).await.unwrap(), &second);
    let snap = store.snapshot().await.unwrap();
    let mut keys: Vec<_> = snap.leases.iter().map(|l| l.key).collect();
    keys.sort();
    assert_eq!(keys, vec![k1, k2]);
    assert!(snap.corrupt.is_empty(), "{:?}", snap.corrupt);

    // The guard goes with the etcd lease: the node may claim afresh.
    store.revoke(id).await.unwrap();
    let id2 = store.grant(Duration::from_secs(60)).await.unwrap();
    store
        .claim(&claim(&k3, &a1, "n1", id2, c2, NodeGuard::Absent))
        .await
        .unwrap();
    assert!(matches!(
        store
            .claim(&claim(
                &key("10.244.4.0-24"),
                &a2,
                "n2",
                id,
                c2,
                NodeGuard::Absent
            ))
            .await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn concurrent_claims_for_one_node_have_one_winner(store: Store) {
    let c = store
        .put_config(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = store.grant(Duration::from_secs(60)).await.unwrap();
            let k = key(&format!("10.244.{}.0-24", 20 + i));
            let a = attrs("twin", "198.18.0.20");
            store
                .claim(&claim(&k, &a, "twin", id, c, NodeGuard::Absent))
                .await
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(l) => won.push(l.key),
            Err(StoreError::NodeClaimed {
                subnet: Some(_), ..
            }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases.iter().map(|l| l.key).collect::<Vec<_>>(), won);
}

/// 60 claims at once (a store may send them together): pairs for the same
/// subnet, pairs for the same node, a dual-stack subnet and the IPv4 one
/// inside it, one under an old config. Each answer is what it would be one
/// by one. (An etcd lease that is gone: `claim_checks_the_config_the_subnet_and_the_node`,
/// and in a batch, `tests/tests/etcd_store.rs`.)
pub async fn a_storm_of_claims_ends_as_one_by_one(store: Store) {
    let old = store
        .put_config(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let c = store
        .put_config(r#"{"Network":"10.244.0.0/16","SubnetLen":24}"#)
        .await
        .unwrap();
    const N: usize = 60;
    // Claim i: subnet 10.244.(100 + i).0/24 on node storm-i, but for these.
    let mut subnets: Vec<String> = (0..N).map(|i| format!("10.244.{}.0-24", 100 + i)).collect();
    let mut nodes: Vec<String> = (0..N).map(|i| format!("storm-{i}")).collect();
    for k in (9..17).step_by(2) {
        subnets[k] = subnets[k - 1].clone();
    }
    for k in (17..25).step_by(2) {
        nodes[k] = nodes[k - 1].clone();
    }
    subnets[26] = format!("{}&fd77:0:0:7::-64", subnets[25]);
    let stale = 59;
    let clashing = |i: usize| (8..24).contains(&i) || i == 25 || i == 26;
    let keys: Vec<SubnetKey> = subnets.iter().map(|s| key(s)).collect();
    let attrs: Vec<LeaseAttrs> = (0..N)
        .map(|i| attrs(&nodes[i], &format!("198.18.1.{i}")))
        .collect();
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(store.grant(Duration::from_secs(60)).await.unwrap());
    }
    let claims: Vec<Claim<'_>> = (0..N)
        .map(|i| {
            let config = if i == stale { old } else { c };
            claim(
                &keys[i],
                &attrs[i],
                &nodes[i],
                ids[i],
                config,
                NodeGuard::Absent,
            )
        })
        .collect();
    let answers = futures::future::join_all(claims.iter().map(|cl| store.claim(cl))).await;

    let won: Vec<&Lease> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    let holds = |l: &Lease, k: &SubnetKey| l.key.ipv4() == k.ipv4() || l.key == *k;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(l) => {
                assert_eq!((l.key, l.node_name()), (keys[i], Some(nodes[i].as_str())));
                assert_eq!(l.etcd_lease, Some(ids[i]));
            }
            Err(StoreError::ConfigChanged { revision }) if i == stale => assert_eq!(*revision, c),
            // Refused only for a claim that won.
            Err(StoreError::AlreadyExists(k)) if clashing(i) => {
                assert_eq!(*k, keys[i]);
                assert!(
                    won.iter().any(|l| holds(l, k)),
                    "claim {i}: {k} is held by no claim that won"
                );
            }
            Err(StoreError::NodeClaimed {
                subnet: Some(s), ..
            }) if clashing(i) => {
                let holder = won.iter().find(|l| l.node_name() == Some(&nodes[i]));
                assert_eq!(
                    holder.map(|l| l.key.to_string()).as_ref(),
                    Some(s),
                    "claim {i}"
                );
            }
            Err(e) => panic!("claim {i} ({} for {}): {e}", keys[i], nodes[i]),
        }
    }
    for i in (0..N).filter(|&i| !clashing(i) && i != stale) {
        assert!(
            answers[i].is_ok(),
            "claim {i}, alone on its subnet and node, was refused"
        );
    }
    // Of each clashing pair exactly one won.
    for k in (9..24).step_by(2).chain([26]) {
        let pair = [k - 1, k];
        let n = pair.iter().filter(|&&i| answers[i].is_ok()).count();
        assert_eq!(n, 1, "claims {pair:?}: {n} won");
    }
    // The store holds exactly what was answered, at the revisions answered.
    let seen = |ls: &mut dyn Iterator<Item = &Lease>| {
        let mut v: Vec<(SubnetKey, i64, Option<LeaseId>)> = ls
            .map(|l| (l.key, l.create_revision, l.etcd_lease))
            .collect();
        v.sort();
        v
    };
    let stored = store.snapshot().await.unwrap().leases;
    assert_eq!(seen(&mut stored.iter()), seen(&mut won.iter().copied()));
}

pub async fn requests_are_counted(store: Store) {
    let before = store.requests();
    let id = store.grant(Duration::from_secs(60)).await.unwrap();
    store
        .create(&key("10.244.61.0-24"), &attrs("c", "198.18.0.61"), Some(id))
        .await
        .unwrap();
    let after = store.requests();
    assert_eq!(after.grant - before.grant, 1);
    assert_eq!(after.txn - before.txn, 1);
    assert_eq!(after.total() - before.total(), 2);
}

fn name_record(name: &str, address: &str, node: Option<&str>) -> crate::names::NameRecord {
    crate::names::NameRecord {
        name: name.parse().expect("test name"),
        address: address.parse().expect("test address"),
        node: node.map(|n| crate::NodeName::new(n).expect("test node")),
        container_id: node.map(|_| "c0ffee".to_string()),
    }
}

pub async fn names_live_and_die_with_their_lease(store: Store) {
    let id = store.grant(Duration::from_secs(60)).await.unwrap();
    let web1 = name_record("web", "10.244.3.5", Some("host-1"));
    let web2 = name_record("web", "fdc6:7765:6675:3::5", Some("host-1"));
    let db = name_record("db.shop", "10.244.9.9", None);
    let start = store.snapshot().await.unwrap().revision;
    store.put_name(&web1, Some(id)).await.unwrap();
    store.put_name(&web2, Some(id)).await.unwrap();
    let rev = store.put_name(&db, None).await.unwrap();
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.revision, rev);
    assert!(
        snap.leases.is_empty(),
        "names are no leases: {:?}",
        snap.leases
    );
    let mut got: Vec<_> = snap
        .names
        .iter()
        .map(|n| (n.record.clone(), n.etcd_lease))
        .collect();
    got.sort();
    let mut want = vec![
        (web1.clone(), Some(id)),
        (web2.clone(), Some(id)),
        (db.clone(), None),
    ];
    want.sort();
    assert_eq!(got, want);
    // The watch sees them, then the lease's end takes its names only.
    let mut events = Events::new(store.watch(start + 1).await.unwrap());
    for want in [&web1, &web2, &db] {
        match events.next(Duration::from_secs(10)).await.unwrap() {
            StoreEvent::NamePut(n) => assert_eq!(&n.record, want),
            other => panic!("unexpected {other:?}"),
        }
    }
    store.revoke(id).await.unwrap();
    let mut gone = Vec::new();
    for _ in 0..2 {
        match events.next(Duration::from_secs(10)).await.unwrap() {
            StoreEvent::NameDelete {
                name,
                address,
                revision,
            } => {
                assert!(revision > rev);
                gone.push((name.to_string(), address.to_string()));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    gone.sort();
    assert_eq!(
        gone,
        [
            ("web".to_string(), "10.244.3.5".to_string()),
            ("web".to_string(), "fdc6:7765:6675:3::5".to_string())
        ]
    );
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.names.len(), 1);
    assert_eq!(snap.names[0].record, db);
    // A dead lease takes no new names; deleting is idempotent.
    assert!(matches!(
        store.put_name(&web1, Some(id)).await,
        Err(StoreError::NotFound(_))
    ));
    let rev = store.delete_name(&db.name, db.address).await.unwrap();
    match events.next(Duration::from_secs(10)).await.unwrap() {
        StoreEvent::NameDelete { name, revision, .. } => {
            assert_eq!(name, db.name);
            assert_eq!(revision, rev);
        }
        other => panic!("unexpected {other:?}"),
    }
    let again = store.delete_name(&db.name, db.address).await.unwrap();
    assert!(again >= rev);
    assert!(store.snapshot().await.unwrap().names.is_empty());
}

pub async fn unreadable_names_are_gone_for_readers(store: Store) {
    let web = name_record("web", "10.244.3.5", Some("host-1"));
    let rev = store.put_name(&web, None).await.unwrap();
    let mut events = Events::new(store.watch(rev + 1).await.unwrap());
    // Someone writes garbage over the record, and a key that is no name.
    store.put_raw(&web.key(), "{not json", None).await.unwrap();
    store
        .put_raw("names/web_1/10.244.3.6", "{}", None)
        .await
        .unwrap();
    store
        .put_raw("names/web/not-an-ip", "{}", None)
        .await
        .unwrap();
    let back = store
        .put_name(&name_record("db", "10.244.3.7", None), None)
        .await
        .unwrap();
    match events.next(Duration::from_secs(10)).await.unwrap() {
        StoreEvent::NameDelete { name, address, .. } => {
            assert_eq!((name, address), (web.name.clone(), web.address));
        }
        other => panic!("unexpected {other:?}"),
    }
    // The unreadable keys make no event; the next good record does.
    match events.next(Duration::from_secs(10)).await.unwrap() {
        StoreEvent::NamePut(n) => assert_eq!(n.mod_revision, back),
        other => panic!("unexpected {other:?}"),
    }
    let snap = store.snapshot().await.unwrap();
    let names: Vec<String> = snap
        .names
        .iter()
        .map(|n| n.record.name.to_string())
        .collect();
    assert_eq!(names, ["db"]);
    assert!(
        snap.corrupt.is_empty(),
        "names are not subnets: {:?}",
        snap.corrupt
    );
}
