//! Store outages, unreadable entries, and leases written by flannel.

mod common;

use axum::http::{Method, StatusCode};
use common::*;
use std::time::Duration;
use weft_lease::LeaseStore;

#[tokio::test]
async fn store_outage_is_503_with_a_reason_and_recovers() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let a = api.subnet_of("a", "198.18.0.1").await;
    api.store.set_available(false);
    let (status, body) = api.acquire("b", "198.18.0.2").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "etcd_unavailable");
    assert!(
        body["message"].as_str().unwrap().contains("unavailable"),
        "{body}"
    );
    let (status, body) = api.call(Method::POST, "/v1/leases/a/renew", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("store unreachable"),
        "{body}"
    );
    // Reads are served from the cache meanwhile.
    let (status, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["leases"][0]["subnet"], a.as_str());

    api.store.set_available(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = api.call(Method::GET, "/readyz", None).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready again after recovery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = api.subnet_of("b", "198.18.0.2").await;
    assert_ne!(a, b);
    // The watch resumed: the new lease reached the cache.
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(list["leases"].as_array().unwrap().len(), 2);
    let (_, metrics) = api
        .raw(Method::GET, "/metrics", axum::body::Body::empty())
        .await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        !text.contains("weft_controller_etcd_errors_total 0"),
        "errors counted"
    );
}

#[tokio::test]
async fn corrupt_entries_are_skipped_and_their_subnets_stay_taken() {
    let store = weft_lease::MemoryStore::new();
    store
        .put_config(r#"{"Network":"10.244.0.0/26"}"#)
        .await
        .unwrap();
    store
        .put_raw("subnets/10.244.0.16-28", "{definitely not json", None)
        .await
        .unwrap();
    store
        .put_raw("subnets/what-is-this", "{}", None)
        .await
        .unwrap();
    let api = Api::over(store, opts()).await;
    let (status, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(list["leases"].as_array().unwrap().is_empty());
    assert_eq!(list["unreadable"].as_array().unwrap().len(), 2, "{list}");
    let x = api.subnet_of("x", "198.18.0.1").await;
    let y = api.subnet_of("y", "198.18.0.2").await;
    for s in [&x, &y] {
        assert_ne!(s.as_str(), "10.244.0.16/28");
    }
    let (status, body) = api.acquire("z", "198.18.0.3").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the unreadable key holds its subnet: {body}"
    );
    // Overwriting a live lease with garbage at runtime: skipped, reported.
    let xkey = x.replace('/', "-");
    api.store
        .put_raw(&format!("subnets/{xkey}"), "garbage", None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, ready) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(ready["unreadable_entries"], 3);
    assert_eq!(ready["ready"], true);
}

#[tokio::test]
async fn flannel_leases_are_listed_watched_and_never_handed_out() {
    let store = weft_lease::MemoryStore::new();
    store
        .put_config(r#"{"Network":"10.244.0.0/26","Backend":{"Type":"vxlan"}}"#)
        .await
        .unwrap();
    let api = Api::over(store, opts()).await;
    let mut lines = Lines::open(&api, "/v1/leases/watch").await.unwrap();
    let id = api.store.grant(Duration::from_secs(3600)).await.unwrap();
    let flannel = r#"{"PublicIP":"198.18.0.50","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    api.store
        .put_raw("subnets/10.244.0.16-28", flannel, Some(id))
        .await
        .unwrap();
    let e = lines.next_event().await;
    assert_eq!(e["type"], "put");
    assert_eq!(e["lease"]["subnet"], "10.244.0.16/28");
    assert_eq!(e["lease"]["node_name"], serde_json::Value::Null);
    assert_eq!(e["lease"]["public_ip"], "198.18.0.50");
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(
        list["leases"][0]["backend_data"]["VtepMAC"],
        "c6:d2:32:6f:8f:44"
    );
    let a = api.subnet_of("a", "198.18.0.1").await;
    let b = api.subnet_of("b", "198.18.0.2").await;
    assert!(a != "10.244.0.16/28" && b != "10.244.0.16/28");
    let (status, _) = api.acquire("c", "198.18.0.3").await;
    assert_eq!(status, StatusCode::CONFLICT);
    // And weft's own leases read as flannel reads them (its LeaseAttrs).
    let snap = api.store.snapshot().await.unwrap();
    let ours = snap
        .leases
        .iter()
        .find(|l| l.node_name() == Some("a"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ours.attrs.to_json()).unwrap();
    assert_eq!(v["PublicIP"], "198.18.0.1");
    assert_eq!(v["BackendType"], "vxlan");
    assert_eq!(v["BackendData"]["VNI"], 1);
}

#[tokio::test]
async fn duplicate_leases_of_one_node_are_retired() {
    // Two controllers racing for one node could each create a lease; the
    // node's next acquire keeps one and deletes the other.
    let api = Api::new(Some(VXLAN_NET)).await;
    let first = api.subnet_of("a", "198.18.0.1").await;
    let attrs = api.store.snapshot().await.unwrap().leases[0].attrs.clone();
    let id = api.store.grant(Duration::from_secs(60)).await.unwrap();
    api.store
        .create(&"10.244.200.0-24".parse().unwrap(), &attrs, Some(id))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        api.subnet_of("a", "198.18.0.1").await,
        first,
        "the older lease is kept"
    );
    let snap = api.store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert_eq!(
        api.store.time_to_live(id).await.unwrap(),
        None,
        "its etcd lease is revoked"
    );
}
