//! The NDJSON watch stream.

mod common;

use axum::http::{Method, StatusCode};
use common::*;
use weft_lease::LeaseStore;

#[tokio::test]
async fn puts_deletes_and_heartbeats() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    let from = list["revision"].as_i64().unwrap() + 1;
    let mut lines = Lines::open(&api, &format!("/v1/leases/watch?from_revision={from}"))
        .await
        .unwrap();
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    let put = lines.next_event().await;
    assert_eq!(put["type"], "put");
    assert_eq!(put["lease"]["subnet"], subnet.as_str());
    assert_eq!(put["lease"]["node_name"], "host-1");
    assert!(put["revision"].as_i64().unwrap() >= from);
    api.call(Method::DELETE, "/v1/leases/host-1", None).await;
    let del = lines.next_event().await;
    assert_eq!(del["type"], "delete");
    assert_eq!(del["lease"]["subnet"], subnet.as_str());
    assert!(del["revision"].as_i64() > put["revision"].as_i64());
    // Idle: heartbeats (every 200 ms in tests) carry the revision: at least
    // the delete's (revoking the etcd lease then removes the node's guard
    // key, one revision more, with no lease event).
    let hb = lines.next().await;
    assert_eq!(hb["type"], "heartbeat");
    let (hb_rev, del_rev) = (hb["revision"].as_i64(), del["revision"].as_i64());
    assert!(
        hb_rev >= del_rev && hb_rev <= del_rev.map(|r| r + 1),
        "{hb} after {del}"
    );
}

#[tokio::test]
async fn resume_from_an_older_revision_replays_history() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    let from = list["revision"].as_i64().unwrap() + 1;
    let a = api.subnet_of("a", "198.18.0.1").await;
    let b = api.subnet_of("b", "198.18.0.2").await;
    let mut lines = Lines::open(&api, &format!("/v1/leases/watch?from_revision={from}"))
        .await
        .unwrap();
    assert_eq!(lines.next_event().await["lease"]["subnet"], a.as_str());
    assert_eq!(lines.next_event().await["lease"]["subnet"], b.as_str());
}

#[tokio::test]
async fn many_watchers_get_every_change() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        streams.push(Lines::open(&api, "/v1/leases/watch").await.unwrap());
    }
    let (_, ready) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(ready["watch_clients"], 50);
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    for s in &mut streams {
        let e = s.next_event().await;
        assert_eq!(e["lease"]["subnet"], subnet.as_str());
    }
    drop(streams);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (_, ready) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(ready["watch_clients"], 0, "closed streams are counted down");
}

#[tokio::test]
async fn a_restarted_controller_catches_up_from_the_store() {
    let first = Api::new(Some(VXLAN_NET)).await;
    let (_, list) = first.call(Method::GET, "/v1/leases", None).await;
    let from = list["revision"].as_i64().unwrap() + 1;
    let a = first.subnet_of("a", "198.18.0.1").await;
    first.subnet_of("b", "198.18.0.2").await;
    first.call(Method::DELETE, "/v1/leases/b", None).await;
    // A new controller has no history before its own start: it reads the
    // store as it was at `from - 1` and sends the difference.
    let second = Api::over(first.store.clone(), opts()).await;
    drop(first);
    let mut lines = Lines::open(&second, &format!("/v1/leases/watch?from_revision={from}"))
        .await
        .unwrap();
    let e = lines.next_event().await;
    assert_eq!(
        (e["type"].as_str(), e["lease"]["subnet"].as_str()),
        (Some("put"), Some(a.as_str()))
    );
    let c = second.subnet_of("c", "198.18.0.3").await;
    assert_eq!(lines.next_event().await["lease"]["subnet"], c.as_str());
}

#[tokio::test]
async fn compacted_revision_is_410_and_relisting_recovers() {
    let first = Api::new(Some(VXLAN_NET)).await;
    let (_, list) = first.call(Method::GET, "/v1/leases", None).await;
    let old = list["revision"].as_i64().unwrap() + 1;
    first.subnet_of("a", "198.18.0.1").await;
    first.subnet_of("b", "198.18.0.2").await;
    let now = first.store.snapshot().await.unwrap().revision;
    first.store.compact(now).await.unwrap();
    let second = Api::over(first.store.clone(), opts()).await;
    drop(first);
    let err = Lines::open(&second, &format!("/v1/leases/watch?from_revision={old}"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.0, StatusCode::GONE);
    assert_eq!(err.1["error"], "revision_compacted");
    assert!(
        err.1["message"].as_str().unwrap().contains("list"),
        "{}",
        err.1
    );
    // What a node does next: list, then watch from the list's revision.
    let (_, list) = second.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(list["leases"].as_array().unwrap().len(), 2);
    let from = list["revision"].as_i64().unwrap() + 1;
    let mut lines = Lines::open(&second, &format!("/v1/leases/watch?from_revision={from}"))
        .await
        .unwrap();
    let c = second.subnet_of("c", "198.18.0.3").await;
    assert_eq!(lines.next_event().await["lease"]["subnet"], c.as_str());
}

#[tokio::test]
async fn bad_watch_parameters() {
    let api = Api::new(Some(VXLAN_NET)).await;
    for q in ["from_revision=0", "from_revision=-5", "from_revision=abc"] {
        let err = Lines::open(&api, &format!("/v1/leases/watch?{q}"))
            .await
            .err()
            .unwrap();
        assert_eq!(err.0, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(err.1["error"], "invalid_query");
    }
}

#[tokio::test]
async fn a_revision_older_than_the_history_is_read_from_the_store() {
    let store = weft_lease::MemoryStore::new();
    store.put_config(VXLAN_NET).await.unwrap();
    let mut o = opts();
    o.history = 2;
    let api = Api::over(store, o).await;
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    let from = list["revision"].as_i64().unwrap() + 1;
    for i in 1..=4 {
        api.subnet_of(&format!("n{i}"), &format!("198.18.0.{i}"))
            .await;
    }
    // Two lines kept; from the start, the controller reads the past from the
    // store instead and sends the difference: all four leases.
    let mut lines = Lines::open(&api, &format!("/v1/leases/watch?from_revision={from}"))
        .await
        .unwrap();
    for _ in 0..4 {
        assert_eq!(lines.next_event().await["type"], "put");
    }
}

#[tokio::test]
async fn a_live_stream_that_falls_behind_is_told_to_relist() {
    let store = weft_lease::MemoryStore::new();
    store.put_config(VXLAN_NET).await.unwrap();
    let mut o = opts();
    o.history = 2;
    let api = Api::over(store, o).await;
    let mut lines = Lines::open(&api, "/v1/leases/watch").await.unwrap();
    // Four changes while the client reads nothing: two fall out of history.
    for i in 1..=4 {
        api.subnet_of(&format!("n{i}"), &format!("198.18.0.{i}"))
            .await;
    }
    let e = lines.next().await;
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["message"].as_str().unwrap().contains("list again"), "{e}");
}

#[tokio::test]
async fn closing_ends_open_streams() {
    let api = Api::new(Some(VXLAN_NET)).await;
    api.subnet_of("a", "198.18.0.1").await;
    let mut live = Lines::open(&api, "/v1/leases/watch").await.unwrap();
    let mut replaying = Lines::open(&api, "/v1/leases/watch?from_revision=1")
        .await
        .unwrap();
    assert_eq!(replaying.next_event().await["lease"]["node_name"], "a");
    api.controller.close_streams();
    assert!(live.ended().await, "the live stream ended");
    assert!(replaying.ended().await, "the replaying stream ended");
    // New streams after closing end at once too: the server is going away.
    let mut late = Lines::open(&api, "/v1/leases/watch").await.unwrap();
    assert!(late.ended().await);
}
