//! The controller against a real etcd server.

use futures::StreamExt;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_lease::api::{AcquireRequest, WatchKind};
use weft_lease::client::{ClientError, ControllerClient, WatchLines};
use weft_lease::{BackendData, LeaseStore, SubnetKey};
use weft_tests::controller::{test_options, RunningController};
use weft_tests::etcd::{self, EtcdServer};
use weft_tests::etcdctl;

fn req(i: u32) -> AcquireRequest {
    let ip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
    let mac = format!("0e:00:00:00:{:02x}:{:02x}", i / 256, i % 256);
    AcquireRequest::new(
        Some(ip.parse().unwrap()),
        None,
        &BackendData::Vxlan {
            vni: 1,
            vtep_mac: mac.parse().unwrap(),
        },
        None,
    )
}

/// The next put or delete on a watch stream (heartbeats skipped).
async fn next_change(watch: &mut WatchLines) -> (WatchKind, SubnetKey) {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a watch line within 10 s")
            .expect("stream open")
            .unwrap();
        if let Some(l) = line.lease {
            return (line.kind, l.key);
        }
    }
}

async fn own_etcd() -> EtcdServer {
    tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn shared_etcd() -> String {
    tokio::task::spawn_blocking(|| etcd::shared().to_string())
        .await
        .unwrap()
}

async fn wait_ready(client: &ControllerClient, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = client.readiness().await {
            if r.ready {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "controller not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` controllers on one etcd under `/weft/network`, with `network` set
/// and every one ready.
async fn replicas(url: &str, n: usize, network: &str) -> Vec<RunningController> {
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(
            RunningController::on_etcd(url, "/weft/network", test_options())
                .await
                .unwrap(),
        );
    }
    replicas[0].client.set_network(network).await.unwrap();
    for r in &replicas {
        wait_ready(&r.client, Duration::from_secs(10)).await;
    }
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn three_replicas_and_500_concurrent_acquires_give_500_distinct_subnets() {
    let server = own_etcd().await;
    let url = server.url();
    let replicas = replicas(&url, 3, r#"{"Network":"10.244.0.0/16","SubnetLen":26}"#).await;
    let clients: Vec<ControllerClient> = replicas.iter().map(|r| r.client.clone()).collect();
    let mut tasks = Vec::new();
    for i in 0..500u32 {
        let client = clients[i as usize % 3].clone();
        tasks.push(tokio::spawn(async move {
            client.acquire(&format!("node-{i}"), &req(i)).await
        }));
    }
    let mut subnets = HashSet::new();
    for t in tasks {
        let resp = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("acquire failed: {e}"));
        assert!(
            subnets.insert(resp.lease.key),
            "{} handed out twice",
            resp.lease.key
        );
    }
    assert_eq!(subnets.len(), 500);
    // etcd agrees: 500 keys, and exactly one etcd lease each (none orphaned).
    let keys = etcdctl::etcdctl(
        &url,
        &["get", "--prefix", "--keys-only", "/weft/network/subnets/"],
    )
    .unwrap();
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 500);
    assert_eq!(etcdctl::lease_count(&url).unwrap(), 500);
    // Every replica sees all of them.
    for c in &clients {
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.list(false).await.unwrap().leases.len() < 500 {
            assert!(Instant::now() < deadline, "replica lagging");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn one_node_acquiring_on_three_replicas_at_once_holds_one_subnet() {
    let server = own_etcd().await;
    let url = server.url();
    let replicas = replicas(&url, 3, r#"{"Network":"10.244.0.0/16","SubnetLen":24}"#).await;
    for i in 0..30u32 {
        let node = format!("twin-{i}");
        let tasks: Vec<_> = replicas
            .iter()
            .map(|r| {
                let (client, node) = (r.client.clone(), node.clone());
                tokio::spawn(async move { client.acquire(&node, &req(i)).await })
            })
            .collect();
        let mut got = HashSet::new();
        for t in tasks {
            let resp = t.await.unwrap().unwrap_or_else(|e| panic!("{node}: {e}"));
            got.insert(resp.lease.key);
        }
        assert_eq!(got.len(), 1, "{node} was given {got:?}");
    }
    // etcd agrees: one subnet, one guard and one etcd lease per node.
    let count = |dir: &str| {
        etcdctl::etcdctl(&url, &["get", "--prefix", "--keys-only", dir])
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .count()
    };
    assert_eq!(count("/weft/network/subnets/"), 30);
    assert_eq!(count("/weft/network/nodes/"), 30);
    assert_eq!(etcdctl::lease_count(&url).unwrap(), 30);
    let guard = etcdctl::etcdctl(
        &url,
        &["get", "--print-value-only", "/weft/network/nodes/twin-0"],
    )
    .unwrap();
    let lease = replicas[0].client.renew("twin-0").await.unwrap();
    assert_eq!(guard.trim(), lease.lease.key.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn renewal_keeps_one_etcd_lease_per_node() {
    let server = own_etcd().await;
    let c = RunningController::on_etcd(&server.url(), "/weft/network", test_options())
        .await
        .unwrap();
    c.client
        .set_network(r#"{"Network":"10.244.0.0/16","LeaseTTL":"1h"}"#)
        .await
        .unwrap();
    let first = c.client.acquire("host-1", &req(1)).await.unwrap();
    for _ in 0..3 {
        let renewed = c.client.renew("host-1").await.unwrap();
        assert_eq!(renewed.lease.etcd_lease, first.lease.etcd_lease);
        assert_eq!(renewed.lease.ttl_seconds, Some(3600));
        c.client.acquire("host-1", &req(1)).await.unwrap();
    }
    assert_eq!(etcdctl::lease_count(&server.url()).unwrap(), 1);
    // etcdctl shows the key attached to it with the network's TTL.
    let id = first.lease.etcd_lease.unwrap();
    let ttl = etcdctl::etcdctl(&server.url(), &["lease", "timetolive", &id, "--keys"]).unwrap();
    assert!(ttl.contains("granted with TTL(3600s)"), "{ttl}");
    assert!(
        ttl.contains(&format!("/weft/network/subnets/{}", first.lease.key)),
        "{ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn short_ttl_lease_expires_and_the_watch_reports_it_while_reservations_stay() {
    let url = shared_etcd().await;
    let prefix = etcd::unique_prefix("expiry");
    let c = RunningController::on_etcd(&url, &prefix, test_options())
        .await
        .unwrap();
    c.client
        .set_network(r#"{"Network":"10.244.0.0/16","LeaseTTL":"2s"}"#)
        .await
        .unwrap();
    let reserved = c.client.reserve("10.244.50.0/24", "db-1").await.unwrap();
    let list = c.client.list(false).await.unwrap();
    let mut watch = c.client.watch(list.revision + 1).await.unwrap();
    let lease = c.client.acquire("short", &req(7)).await.unwrap().lease;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_put = false;
    loop {
        let line = tokio::time::timeout_at(deadline.into(), watch.next())
            .await
            .expect("expiry reported within 20 s")
            .expect("stream open")
            .unwrap();
        match line.kind {
            WatchKind::Put => saw_put |= line.lease.as_ref().unwrap().key == lease.key,
            WatchKind::Delete => {
                assert_eq!(line.lease.unwrap().key, lease.key);
                break;
            }
            _ => {}
        }
    }
    assert!(saw_put);
    let after = c.client.list(true).await.unwrap();
    assert_eq!(after.leases.len(), 1);
    assert_eq!(after.leases[0].key, reserved.key);
    assert!(after.leases[0].reserved);
    // The owner of the reservation gets it.
    let got = c.client.acquire("db-1", &req(8)).await.unwrap();
    assert_eq!(got.lease.key, reserved.key);
    assert!(got.lease.reserved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn restarting_the_controller_loses_nothing() {
    let url = shared_etcd().await;
    let prefix = etcd::unique_prefix("restart");
    let mut c = RunningController::on_etcd(&url, &prefix, test_options())
        .await
        .unwrap();
    c.client
        .set_network(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let mut before = Vec::new();
    for i in 0..20 {
        before.push(
            c.client
                .acquire(&format!("n{i}"), &req(i))
                .await
                .unwrap()
                .lease
                .key,
        );
    }
    let rev = c.client.list(false).await.unwrap().revision;
    c.stop();
    let c2 = RunningController::on_etcd(&url, &prefix, test_options())
        .await
        .unwrap();
    let list = c2.client.list(false).await.unwrap();
    assert_eq!(list.leases.len(), 20);
    assert!(list.revision >= rev);
    for (i, key) in before.iter().enumerate() {
        let again = c2
            .client
            .acquire(&format!("n{i}"), &req(i as u32))
            .await
            .unwrap();
        assert_eq!(&again.lease.key, key, "node n{i} kept its subnet");
        c2.client.renew(&format!("n{i}")).await.unwrap();
    }
    assert_eq!(
        c2.client.network().await.unwrap().config.unwrap()["Network"],
        "10.244.0.0/16"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn compaction_makes_a_watcher_get_410_and_relisting_recovers() {
    // Compaction is global in etcd: this test has a server of its own.
    let server = own_etcd().await;
    let url = server.url();
    let prefix = "/weft/network";
    let mut c = RunningController::on_etcd(&url, prefix, test_options())
        .await
        .unwrap();
    c.client
        .set_network(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let old = c.client.list(false).await.unwrap().revision + 1;
    c.client.acquire("a", &req(1)).await.unwrap();
    c.client.acquire("b", &req(2)).await.unwrap();
    let now: i64 = serde_json::from_str::<Value>(
        &etcdctl::etcdctl(&url, &["endpoint", "status", "-w", "json"]).unwrap(),
    )
    .unwrap()[0]["Status"]["header"]["revision"]
        .as_i64()
        .unwrap();
    etcdctl::etcdctl(&url, &["compact", &now.to_string()]).unwrap();
    // A fresh controller has no history of its own; the store's is gone.
    c.stop();
    let c2 = RunningController::on_etcd(&url, prefix, test_options())
        .await
        .unwrap();
    let err = c2.client.watch(old).await.err().expect("410");
    assert_eq!(err.status(), Some(410), "{err}");
    let list = c2.client.list(false).await.unwrap();
    assert_eq!(list.leases.len(), 2);
    let mut watch = c2.client.watch(list.revision + 1).await.unwrap();
    let lease = c2.client.acquire("c", &req(3)).await.unwrap().lease;
    assert_eq!(next_change(&mut watch).await, (WatchKind::Put, lease.key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn etcd_stopped_and_restarted_mid_run() {
    let mut server = own_etcd().await;
    let url = server.url();
    let c = RunningController::on_etcd(&url, "/weft/network", test_options())
        .await
        .unwrap();
    c.client
        .set_network(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    let a = c.client.acquire("a", &req(1)).await.unwrap().lease;
    let list = c.client.list(false).await.unwrap();
    let mut watch = c.client.watch(list.revision + 1).await.unwrap();

    tokio::task::block_in_place(|| server.stop());
    match c.client.acquire("b", &req(2)).await {
        Err(ClientError::Api { status: 503, body }) => {
            assert_eq!(body.error, "etcd_unavailable", "{}", body.message)
        }
        other => panic!("expected 503 while etcd is down, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c.client.readiness().await.unwrap();
        if !r.ready {
            assert!(
                r.reasons[0].contains("store unreachable"),
                "{:?}",
                r.reasons
            );
            break;
        }
        assert!(Instant::now() < deadline, "outage not reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reads are still answered from the cache: nodes can re-list.
    assert_eq!(c.client.list(false).await.unwrap().leases[0].key, a.key);

    tokio::task::block_in_place(|| server.restart()).unwrap();
    wait_ready(&c.client, Duration::from_secs(30)).await;
    let b = c.client.acquire("b", &req(2)).await.unwrap().lease;
    assert_ne!(a.key, b.key);
    // A stream opened before the outage sees the lease made after it.
    assert_eq!(next_change(&mut watch).await, (WatchKind::Put, b.key));
    assert_eq!(
        c.client.renew("a").await.unwrap().lease.key,
        a.key,
        "a's lease survived the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn flannel_interop_on_the_coreos_prefix() {
    let server = own_etcd().await;
    let url = server.url();
    let p = "/coreos.com/network";
    // What an operator of a flannel cluster has in etcd, written with etcdctl.
    etcdctl::etcdctl(
        &url,
        &[
            "put",
            &format!("{p}/config"),
            r#"{"Network":"10.244.0.0/26","Backend":{"Type":"vxlan"}}"#,
        ],
    )
    .unwrap();
    let id = etcdctl::grant(&url, 600).unwrap();
    let flannel = r#"{"PublicIP":"198.18.0.50","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    etcdctl::etcdctl(
        &url,
        &[
            "put",
            &format!("--lease={id}"),
            &format!("{p}/subnets/10.244.0.16-28"),
            flannel,
        ],
    )
    .unwrap();

    let c = RunningController::on_etcd(&url, p, test_options())
        .await
        .unwrap();
    let list = c.client.list(true).await.unwrap();
    assert_eq!(list.leases.len(), 1);
    let fl = &list.leases[0];
    assert_eq!(fl.node_name, None);
    assert_eq!(fl.public_ip, Some("198.18.0.50".parse().unwrap()));
    assert_eq!(fl.etcd_lease.as_deref(), Some(id.as_str()));
    assert!(fl.ttl_seconds.unwrap() > 500);
    let mut watch = c.client.watch(list.revision + 1).await.unwrap();

    // Two free subnets for weft nodes; the flannel one is never handed out.
    let a = c.client.acquire("a", &req(1)).await.unwrap().lease;
    let b = c.client.acquire("b", &req(2)).await.unwrap().lease;
    for l in [&a, &b] {
        assert_ne!(l.key.to_string(), "10.244.0.16-28");
    }
    let err = c.client.acquire("c", &req(3)).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    // A flannel lease that goes away shows in the watch stream.
    etcdctl::etcdctl(&url, &["lease", "revoke", &id]).unwrap();
    let mut kinds = Vec::new();
    let flannel_key: SubnetKey = "10.244.0.16-28".parse().unwrap();
    while !kinds.contains(&(WatchKind::Delete, flannel_key)) {
        kinds.push(next_change(&mut watch).await);
    }
    // weft's lease as flannel reads it: its key, its LeaseAttrs JSON, its TTL.
    let key = format!("{p}/subnets/{}", a.key);
    let value = etcdctl::etcdctl(&url, &["get", &key, "--print-value-only"]).unwrap();
    let v: Value = serde_json::from_str(value.trim()).unwrap();
    assert_eq!(v["PublicIP"], "198.18.0.2");
    assert_eq!(v["BackendType"], "vxlan");
    assert_eq!(v["BackendData"]["VNI"], 1);
    assert_eq!(v["BackendData"]["VtepMAC"], "0e:00:00:00:00:01");
    assert_eq!(v["NodeName"], "a");
    let ttl = etcdctl::etcdctl(
        &url,
        &[
            "lease",
            "timetolive",
            a.etcd_lease.as_deref().unwrap(),
            "--keys",
        ],
    )
    .unwrap();
    assert!(ttl.contains(&key), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn store_requests_per_acquire() {
    // A new node costs two etcd requests (grant + claim transaction); a
    // returning node one keep-alive stream; neither depends on cluster size.
    let url = shared_etcd().await;
    let prefix = etcd::unique_prefix("requests");
    let store = Arc::new(
        weft_lease::EtcdStore::connect(weft_lease::EtcdOptions::new(vec![url.clone()], &prefix))
            .await
            .unwrap(),
    );
    let c = RunningController::start(store.clone(), test_options())
        .await
        .unwrap();
    c.client
        .set_network(r#"{"Network":"10.244.0.0/16"}"#)
        .await
        .unwrap();
    for i in 0..50 {
        c.client.acquire(&format!("n{i}"), &req(i)).await.unwrap();
    }
    let before = store.requests();
    c.client.acquire("new", &req(99)).await.unwrap();
    let after = store.requests();
    assert_eq!(after.grant - before.grant, 1);
    assert_eq!(after.txn - before.txn, 1);
    assert_eq!(after.range - before.range, 0, "no list per acquire");
    assert_eq!(
        after.time_to_live - before.time_to_live,
        0,
        "no TTL lookups per acquire"
    );
}
