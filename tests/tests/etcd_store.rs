//! The store conformance suite against a real etcd server.

use std::sync::Arc;
use weft_lease::conformance::Store;
use weft_lease::{EtcdOptions, EtcdStore};
use weft_tests::etcd::EtcdServer;

/// An etcd server of its own, started off the runtime's threads.
async fn etcd() -> EtcdServer {
    tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A store on an etcd of its own: compaction is global in etcd, so checks
/// that compact or read the past must not share a server. The server lives
/// until the test process exits (it is tied to it), which under nextest is
/// the end of the test.
async fn fresh() -> Store {
    let server = etcd().await;
    let url = server.url();
    Box::leak(Box::new(server));
    let store = EtcdStore::connect(EtcdOptions::new(vec![url], "/weft/network"))
        .await
        .expect("connect to etcd");
    Arc::new(store)
}

weft_lease::conformance_tests!(
    #[ignore = "needs etcd; run by scripts/test"]
    fresh
);

/// A watch that catches up over many large changes gets them in one etcd
/// response of several MiB (etcd batches up to 1000 revisions); gRPC's
/// default 4 MiB limit would end every such watch with an error, and the
/// controller would re-list and watch again forever.
#[tokio::test]
#[ignore = "needs etcd; run by scripts/test"]
async fn a_watch_catching_up_over_more_than_4_mib_of_changes_reads_them_all() {
    use futures::StreamExt;
    let server = etcd().await;
    let url = server.url();
    let store = EtcdStore::connect(EtcdOptions::new(vec![url.clone()], "/weft/network"))
        .await
        .expect("connect to etcd");
    // Five transactions of 100 leases with 12 KiB each (etcd takes at most
    // 128 operations and 1.5 MiB per request): 6 MB of changes.
    let pad = "x".repeat(12 * 1024);
    let etcdctl = weft_tests::bins::system_tool("etcdctl", "etcd-client").unwrap();
    for t in 0..5u32 {
        // No compares, the puts on success, no failure requests.
        let mut script = String::from("\n");
        for i in 0..100u32 {
            let n = t * 100 + i;
            // etcdctl's txn syntax mangles quotes: a plain value (an
            // unreadable lease is an event all the same).
            script.push_str(&format!(
                "put /weft/network/subnets/10.{}.{}.0-24 {pad}\n",
                n / 256,
                n % 256
            ));
        }
        script.push_str("\n\n");
        let mut child = std::process::Command::new(&etcdctl)
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &url, "txn"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("SUCCESS"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let one = weft_tests::etcdctl::etcdctl(
        &url,
        &[
            "get",
            "--print-value-only",
            "/weft/network/subnets/10.0.7.0-24",
        ],
    )
    .unwrap();
    assert_eq!(one.trim_end().len(), pad.len(), "the values as written");
    let mut watch = weft_lease::LeaseStore::watch(&store, 1).await.unwrap();
    let mut seen = 0;
    while seen < 500 {
        let batch = tokio::time::timeout(std::time::Duration::from_secs(30), watch.next())
            .await
            .expect("watch answered within 30 s")
            .expect("watch still open")
            .unwrap_or_else(|e| panic!("after {seen} leases: {e}"));
        seen += batch.events.len();
        eprintln!(
            "batch at {}: {} events, {seen} seen",
            batch.revision,
            batch.events.len()
        );
    }
    assert_eq!(seen, 500);
    drop(server);
}

/// With several endpoints, a dead one costs one failed connection attempt:
/// requests (reads, compare-and-set transactions that were never sent,
/// watches) move on to the next endpoint and stay there. etcd-client's own
/// balancing would send a share of all requests to the dead one for as
/// long as it is down.
#[tokio::test]
#[ignore = "needs etcd; run by scripts/test"]
async fn a_dead_endpoint_in_the_list_fails_no_request() {
    use futures::StreamExt;
    use weft_lease::{BackendData, LeaseAttrs, LeaseStore, SubnetKey};
    let server = etcd().await;
    // Ports nobody listens on: bound, then released.
    let dead = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let endpoints = vec![dead(), dead(), server.url()];
    let attrs = LeaseAttrs::new(
        "node-a",
        Some("198.18.0.11".parse().unwrap()),
        None,
        &BackendData::Vxlan {
            vni: 1,
            vtep_mac: "0e:00:00:00:00:01".parse().unwrap(),
        },
    );
    // Each store starts at an endpoint of its own choosing (two in three
    // are dead); over ten stores, nearly surely some start on a dead one.
    for s in 0..10u32 {
        let store = EtcdStore::connect(EtcdOptions::new(endpoints.clone(), "/weft/network"))
            .await
            .expect("connect");
        for i in 0..5u32 {
            // A transaction: sent once, unless it never reached etcd.
            let key: SubnetKey = format!("10.244.{}.0-24", s * 5 + i).parse().unwrap();
            let lease = store
                .create(&key, &attrs, None)
                .await
                .unwrap_or_else(|e| panic!("store {s} create {i}: {e}"));
            let snap = store
                .snapshot()
                .await
                .unwrap_or_else(|e| panic!("read {i}: {e}"));
            assert!(snap.revision >= lease.mod_revision);
            store
                .ping()
                .await
                .unwrap_or_else(|e| panic!("ping {i}: {e}"));
        }
        let mut w = store.watch(0).await.expect("watch");
        let rev = store
            .put_config(r#"{"Network":"10.244.0.0/16"}"#)
            .await
            .unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), w.next())
            .await
            .expect("a watch event within 10 s")
            .expect("stream open")
            .expect("no watch error");
        assert!(got.revision >= rev, "{got:?}");
    }
}

/// Claims that arrive while eight claim transactions are on their way go
/// to etcd together: 200 claims at once take far fewer than 200
/// transactions, and those sent together share a revision. One claim's
/// etcd lease is gone, which makes etcd refuse its whole batch: the others
/// in it are applied all the same. (The conformance suite checks that
/// batches answer as the claims one by one would.)
#[tokio::test]
#[ignore = "needs etcd; run by scripts/test"]
async fn claims_made_at_once_go_to_etcd_in_few_transactions() {
    use std::time::Duration;
    use weft_lease::store::{Claim, NodeGuard};
    use weft_lease::{BackendData, LeaseAttrs, SubnetKey};
    let store = fresh().await;
    let c = store
        .put_config(r#"{"Network":"10.244.0.0/16","SubnetLen":24}"#)
        .await
        .unwrap();
    const N: usize = 200;
    let keys: Vec<SubnetKey> = (0..N)
        .map(|i| format!("10.244.{i}.0-24").parse().unwrap())
        .collect();
    let nodes: Vec<String> = (0..N).map(|i| format!("batch-{i}")).collect();
    let attrs: Vec<LeaseAttrs> = nodes
        .iter()
        .map(|n| {
            LeaseAttrs::new(
                n,
                Some("198.18.2.1".parse().unwrap()),
                None,
                &BackendData::HostGw,
            )
        })
        .collect();
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(store.grant(Duration::from_secs(60)).await.unwrap());
    }
    let gone = 100;
    store.revoke(ids[gone]).await.unwrap();
    let claims: Vec<Claim<'_>> = (0..N)
        .map(|i| Claim {
            key: &keys[i],
            attrs: &attrs[i],
            node: &nodes[i],
            lease: ids[i],
            config_revision: c,
            guard: NodeGuard::Absent,
        })
        .collect();
    let before = store.requests().txn;
    let answers = futures::future::join_all(claims.iter().map(|cl| store.claim(cl))).await;
    let sent = store.requests().txn - before;
    let mut revisions = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        match a {
            Ok(lease) => {
                assert_eq!(lease.key, keys[i]);
                revisions.push(lease.create_revision);
            }
            Err(weft_lease::StoreError::NotFound(_)) if i == gone => {}
            Err(e) => panic!("claim {i}: {e}"),
        }
    }
    assert_eq!(
        revisions.len(),
        N - 1,
        "every claim but the one on a gone lease"
    );
    revisions.sort();
    revisions.dedup();
    // About 8 alone, 6 batches of 32 and the 32 of the refused one alone
    // (fewer claims in a batch if some were answered before the last ones
    // were queued).
    assert!(sent <= N as u64 / 2, "{N} claims took {sent} transactions");
    assert!(
        revisions.len() < N / 2,
        "{} revisions: the claims were not sent together",
        revisions.len()
    );
    let stored = store.snapshot().await.unwrap().leases;
    assert_eq!(stored.len(), N - 1);
}

/// etcd frozen (SIGSTOP) under 60 claims at once: the claims sent alone
/// time out, then the batches, whose claims are told etcd did not answer
/// (any claims still waiting then go alone); every claim answers
/// `Unavailable` within a few request timeouts, none hangs. After etcd
/// thaws, 60 claims at once all succeed: no slot was lost.
#[tokio::test]
#[ignore = "needs etcd; run by scripts/test"]
async fn claims_waiting_on_a_frozen_etcd_fail_and_the_store_recovers() {
    use std::time::{Duration, Instant};
    use weft_lease::store::{Claim, NodeGuard};
    use weft_lease::{BackendData, LeaseAttrs, LeaseStore, StoreError, SubnetKey};
    let server = etcd().await;
    let mut opts = EtcdOptions::new(vec![server.url()], "/weft/network");
    opts.request_timeout = Duration::from_secs(2);
    let store = EtcdStore::connect(opts).await.expect("connect to etcd");
    let c = store
        .put_config(r#"{"Network":"10.244.0.0/16","SubnetLen":24}"#)
        .await
        .unwrap();
    const N: usize = 60;
    let nodes: Vec<String> = (0..2 * N).map(|i| format!("frozen-{i}")).collect();
    let keys: Vec<SubnetKey> = (0..2 * N)
        .map(|i| format!("10.244.{i}.0-24").parse().unwrap())
        .collect();
    let attrs: Vec<LeaseAttrs> = nodes
        .iter()
        .map(|n| LeaseAttrs::new(n, None, None, &BackendData::HostGw))
        .collect();
    let mut ids = Vec::new();
    for _ in 0..2 * N {
        ids.push(store.grant(Duration::from_secs(60)).await.unwrap());
    }
    let claim = |i: usize| Claim {
        key: &keys[i],
        attrs: &attrs[i],
        node: &nodes[i],
        lease: ids[i],
        config_revision: c,
        guard: NodeGuard::Absent,
    };
    let claims: Vec<Claim<'_>> = (0..N).map(claim).collect();
    let pid = server.pid().expect("etcd runs");
    let signal = |sig| assert!(weft_tests::process::signal_pid(pid, "etcd", sig));
    signal(libc::SIGSTOP);
    let start = Instant::now();
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join_all(claims.iter().map(|cl| store.claim(cl))),
    )
    .await;
    signal(libc::SIGCONT);
    let answers = answers.expect("claims on a frozen etcd hung for 30 s");
    for (i, a) in answers.iter().enumerate() {
        assert!(
            matches!(a, Err(StoreError::Unavailable(_))),
            "claim {i} on a frozen etcd: {a:?}"
        );
    }
    // Alone, then in batches (then alone, for claims still waiting when a
    // batch failed): at most three timeouts of 2 s.
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let claims: Vec<Claim<'_>> = (N..2 * N).map(claim).collect();
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join_all(claims.iter().map(|cl| store.claim(cl))),
    )
    .await
    .expect("claims after etcd thawed hung");
    for (i, a) in answers.into_iter().enumerate() {
        let lease = a.unwrap_or_else(|e| panic!("claim {} after etcd thawed: {e}", N + i));
        assert_eq!(lease.key, keys[N + i]);
    }
}
