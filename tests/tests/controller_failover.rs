//! A node's client with several controller replicas (in process, HTTPS with
//! client certificates, one in-memory store behind all of them): it moves to
//! the next replica when one stops, keeps to the one that answered, and
//! the lease it holds is the same whichever replica it talks to.

use futures::StreamExt;
use std::sync::Arc;
use weft_lease::api::WatchKind;
use weft_lease::client::{ClientError, ControllerClient};
use weft_lease::{LeaseStore, MemoryStore};
use weft_tests::controller::{host_gw_request as req, test_options, RunningController};

const NETWORK: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

async fn replicas(n: usize) -> Vec<RunningController> {
    let store = Arc::new(MemoryStore::new());
    store.put_config(NETWORK).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let store: Arc<dyn LeaseStore> = store.clone();
        out.push(
            RunningController::start(store, test_options())
                .await
                .unwrap(),
        );
    }
    out
}

fn node_client(cs: &[RunningController], name: &str) -> ControllerClient {
    let urls: Vec<&str> = cs.iter().map(|c| c.url.as_str()).collect();
    let pki = cs[0].pki.clone().expect("HTTPS controllers");
    ControllerClient::with_tls(&urls.join(","), Some(pki.node(name).unwrap()))
        .unwrap()
        .spread(name)
}

fn index_of(cs: &[RunningController], url: &str) -> usize {
    cs.iter()
        .position(|c| c.url == url)
        .expect("a replica's URL")
}

#[tokio::test]
async fn a_node_moves_to_the_next_replica_when_its_own_stops() {
    let mut cs = replicas(3).await;
    let node = node_client(&cs, "n1");
    let first = node.acquire("n1", &req(11)).await.unwrap().lease;
    let on = index_of(&cs, node.url());

    // The replica the node uses stops: the next request goes elsewhere and
    // answers with the same lease.
    cs[on].stop();
    let again = node.acquire("n1", &req(11)).await.unwrap().lease;
    assert_eq!(
        again.subnet, first.subnet,
        "the same lease from another replica"
    );
    let now_on = index_of(&cs, node.url());
    assert_ne!(now_on, on, "the client moved off the stopped replica");
    node.renew("n1").await.unwrap();
    assert_eq!(
        index_of(&cs, node.url()),
        now_on,
        "and stays where it was answered"
    );

    // A watch starts on a live replica and sees another node's lease.
    let from = node.list(false).await.unwrap().revision + 1;
    let mut watch = node.watch(from).await.unwrap();
    let other = node_client(&cs, "n2");
    let theirs = other.acquire("n2", &req(12)).await.unwrap().lease;
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(ev) = watch.next().await {
            let ev = ev.unwrap();
            if ev.kind == WatchKind::Put && ev.lease.as_ref().map(|l| l.key) == Some(theirs.key) {
                return true;
            }
        }
        false
    })
    .await
    .expect("the watch delivers within 10 s");
    assert!(seen, "the watch on the surviving replica saw n2's lease");

    // Only one replica left: still answered; none left: a clear error
    // naming a controller that could not be reached.
    let last = index_of(&cs, node.url());
    for (i, c) in cs.iter_mut().enumerate() {
        if i != last {
            c.stop();
        }
    }
    node.renew("n1").await.unwrap();
    cs[last].stop();
    match node.renew("n1").await {
        Err(ClientError::Connect { url, .. }) => {
            assert!(cs.iter().any(|c| c.url == url), "{url}")
        }
        other => panic!("expected a connect error with every replica down, got {other:?}"),
    }
}

#[tokio::test]
async fn nodes_spread_over_the_replicas() {
    let cs = replicas(3).await;
    let mut used = [0usize; 3];
    for i in 0..30 {
        let name = format!("node-{i}");
        let c = node_client(&cs, &name);
        c.acquire(&name, &req(20 + i as u8)).await.unwrap();
        used[index_of(&cs, c.url())] += 1;
    }
    assert!(
        used.iter().all(|&n| n >= 3),
        "every replica serves some nodes: {used:?}"
    );
}
