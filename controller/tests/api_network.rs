//! Network config, readiness, metrics, and config changes.

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use serde_json::{json, Value};
use weft_lease::LeaseStore;

#[tokio::test]
async fn config_missing_then_set_then_read() {
    let api = Api::new(None).await;
    let (status, body) = api.call(Method::GET, "/v1/network", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_config"))
    );
    let (status, body) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap()
            .contains("no network config"),
        "{body}"
    );
    let (status, body) = api.acquire("host-1", "198.18.0.11").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready"))
    );

    let (status, body) = api
        .raw(
            Method::PUT,
            "/v1/network",
            Body::from(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, view) = api.call(Method::GET, "/v1/network", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["valid"], true);
    assert_eq!(view["config"]["SubnetMin"], "10.244.1.0");
    assert_eq!(view["config"]["Backend"]["Type"], "host-gw");
    assert_eq!(
        view["raw"],
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#
    );
    let (status, body) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["subnets_total"], 255);
}

#[tokio::test]
async fn invalid_config_is_refused_and_nothing_is_written() {
    let api = Api::new(Some(VXLAN_NET)).await;
    for (text, field) in [
        (r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#, "SubnetLen"),
        (r#"{"Network":"10.244.0.0/16","Bogus":1}"#, "Bogus"),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
            "Backend.Type",
        ),
        ("not json", "JSON"),
    ] {
        let (status, bytes) = api.raw(Method::PUT, "/v1/network", Body::from(text)).await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(v["error"], "invalid_config");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{text}: {v}"
        );
    }
    let snap = api.store.snapshot().await.unwrap();
    assert_eq!(snap.config.unwrap().0, VXLAN_NET);
}

#[tokio::test]
async fn invalid_config_written_behind_our_back_is_reported() {
    let api = Api::new(Some(VXLAN_NET)).await;
    api.subnet_of("host-1", "198.18.0.11").await;
    // etcdctl put by hand, bypassing validation.
    api.store
        .put_config(r#"{"Network":"10.244.0.0/30"}"#)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (status, body) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["reasons"][0].as_str().unwrap().contains("invalid"),
        "{body}"
    );
    let (status, view) = api.call(Method::GET, "/v1/network", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["valid"], false);
    assert!(
        view["error"].as_str().unwrap().contains("too small"),
        "{view}"
    );
    let (status, body) = api.acquire("host-2", "198.18.0.12").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready"))
    );
    // Existing nodes can still renew: their data plane must not suffer.
    let (status, body) = api
        .call(Method::POST, "/v1/leases/host-1/renew", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["network"], Value::Null);
}

#[tokio::test]
async fn config_change_moves_nodes_into_the_new_network() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let old = api.subnet_of("host-1", "198.18.0.11").await;
    let (status, _) = api
        .raw(
            Method::PUT,
            "/v1/network",
            Body::from(r#"{"Network":"10.245.0.0/16"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, ready) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(ready["leases_outside_network"], 1);
    assert!(
        ready["warnings"][0].as_str().unwrap().contains(&old),
        "{ready}"
    );
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(list["leases"][0]["fits_network"], false);
    // The node asks again and gets a subnet of the new network; the old one goes.
    let new = api.subnet_of("host-1", "198.18.0.11").await;
    assert!(new.starts_with("10.245."), "{new}");
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    let leases = list["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{list}");
    assert_eq!(leases[0]["subnet"], new.as_str());
    let (_, ready) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(ready["leases_outside_network"], 0);
}

#[tokio::test]
async fn metrics_expose_the_promised_series() {
    let api = Api::new(Some(VXLAN_NET)).await;
    api.subnet_of("host-1", "198.18.0.11").await;
    let (status, bytes) = api.raw(Method::GET, "/metrics", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes).unwrap();
    for series in [
        r#"weft_controller_subnets{state="used"} 1"#,
        r#"weft_controller_subnets{state="free"} 254"#,
        r#"weft_controller_subnets{state="total"} 255"#,
        "weft_controller_acquire_duration_seconds_count 1",
        r#"weft_controller_acquires_total{result="ok"} 1"#,
        "weft_controller_watch_clients 0",
        "weft_controller_etcd_errors_total 0",
        r#"weft_controller_etcd_requests_total{op="grant"} 1"#,
        r#"weft_controller_etcd_requests_total{op="txn"} 1"#,
        "weft_controller_ready 1",
        "# EOF",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
}

#[tokio::test]
async fn readiness_counts() {
    let api = Api::new(Some(VXLAN_NET)).await;
    api.subnet_of("a", "198.18.0.1").await;
    api.call(
        Method::POST,
        "/v1/reservations",
        Some(json!({"subnet":"10.244.200.0/24","node_name":"b"})),
    )
    .await;
    let (_, r) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(r["subnets_used"], 2);
    assert_eq!(r["leases"], 1);
    assert_eq!(r["reservations"], 1);
    assert_eq!(r["store"], "in-memory store");
}

#[tokio::test]
async fn a_longer_subnet_len_never_hands_out_a_subnet_overlapping_live_leases() {
    // Three /28s fill the pool; the network then moves to /29s while they
    // are still leased.
    let api = Api::new(Some(r#"{"Network":"10.244.0.0/26","SubnetLen":28}"#)).await;
    let mut old = Vec::new();
    for (node, ip) in [
        ("a", "198.18.0.1"),
        ("b", "198.18.0.2"),
        ("c", "198.18.0.3"),
    ] {
        old.push(api.subnet_of(node, ip).await);
    }
    let (status, _) = api
        .raw(
            Method::PUT,
            "/v1/network",
            Body::from(r#"{"Network":"10.244.0.0/26","SubnetLen":29}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Only 10.244.0.8/29 overlaps none of them.
    assert_eq!(api.subnet_of("d", "198.18.0.4").await, "10.244.0.8/29");
    let (status, body) = api.acquire("e", "198.18.0.5").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "network_exhausted", "{body}");
    // Nor may an admin reserve a subnet inside another node's old /28.
    let (status, body) = api
        .call(
            Method::POST,
            "/v1/reservations",
            Some(json!({"subnet": "10.244.0.16/29", "node_name": "z"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "subnet_taken", "{body}");
    // a's old /28 goes once a has a new subnet: a /29 inside it.
    let (status, body) = api.call(Method::DELETE, "/v1/leases/d", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api.acquire("a", "198.18.0.1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The list is the controller's cache, which applies the store's
    // changes on a thread of its own: it shows the deletion of a's old
    // lease a moment after the answer.
    let mut list = serde_json::Value::Null;
    for _ in 0..100 {
        list = api.call(Method::GET, "/v1/leases", None).await.1;
        if list["leases"].as_array().map(Vec::len) == Some(3) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let held: Vec<&str> = list["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["subnet"].as_str().unwrap())
        .collect();
    assert_eq!(held.len(), 3, "{list}");
    assert!(!held.contains(&old[0].as_str()), "{list}");
}

#[tokio::test]
async fn two_replicas_racing_for_one_node_give_it_one_subnet() {
    let store = weft_lease::MemoryStore::new();
    store.put_config(VXLAN_NET).await.unwrap();
    let one = Api::over(store.clone(), opts()).await;
    let two = Api::over(store.clone(), opts()).await;
    for i in 1..=20 {
        let (node, ip) = (format!("racer-{i}"), format!("198.18.1.{i}"));
        let ((s1, b1), (s2, b2)) = tokio::join!(one.acquire(&node, &ip), two.acquire(&node, &ip));
        assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{b1} {b2}");
        assert_eq!(b1["lease"]["subnet"], b2["lease"]["subnet"], "{b1} {b2}");
    }
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 20, "{:?}", snap.leases);
}
