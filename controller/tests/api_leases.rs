//! The lease endpoints, in process, over a MemoryStore.

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use weft_lease::LeaseStore;

#[tokio::test]
async fn acquire_is_idempotent_and_returns_the_network() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let (status, first) = api.acquire("host-1", "198.18.0.11").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let lease = &first["lease"];
    assert_eq!(lease["node_name"], "host-1");
    assert_eq!(lease["public_ip"], "198.18.0.11");
    assert_eq!(lease["backend_type"], "vxlan");
    assert_eq!(lease["backend_data"]["VtepMAC"], mac_for("198.18.0.11"));
    assert_eq!(lease["reserved"], false);
    assert_eq!(lease["fits_network"], true);
    assert_eq!(lease["ttl_seconds"], 86_400);
    assert_eq!(first["network"]["Network"], "10.244.0.0/16");
    assert_eq!(first["network"]["SubnetLen"], 24);
    let (status, again) = api.acquire("host-1", "198.18.0.11").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["lease"]["key"], lease["key"]);
    assert_eq!(
        again["lease"]["revision"], lease["revision"],
        "nothing changed, nothing written"
    );
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(list["leases"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn changed_attributes_update_the_same_subnet() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    let (status, moved) = api.acquire("host-1", "198.18.0.99").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(moved["lease"]["subnet"], subnet.as_str());
    assert_eq!(moved["lease"]["public_ip"], "198.18.0.99");
    let snap = api.store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert_eq!(snap.leases[0].attrs.public_ip.to_string(), "198.18.0.99");
}

#[tokio::test]
async fn previous_subnet_is_honoured_when_free() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let req = vxlan_req("198.18.0.11", Some("10.244.77.1/24"));
    let (status, body) = api.call(Method::PUT, "/v1/leases/host-1", Some(req)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["lease"]["subnet"], "10.244.77.0/24");
    // Another node asking for the same subnet gets a different one.
    let req = vxlan_req("198.18.0.12", Some("10.244.77.1/24"));
    let (_, body) = api.call(Method::PUT, "/v1/leases/host-2", Some(req)).await;
    assert_ne!(body["lease"]["subnet"], "10.244.77.0/24");
}

#[tokio::test(start_paused = true)]
async fn node_back_after_expiry_gets_its_subnet_again() {
    let api = Api::paused(Some(r#"{"Network":"10.244.0.0/16","LeaseTTL":"10s"}"#)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert!(
        list["leases"].as_array().unwrap().is_empty(),
        "lease expired: {list}"
    );
    let prev = subnet.replace(".0/24", ".1/24");
    let (status, body) = api
        .call(
            Method::PUT,
            "/v1/leases/host-1",
            Some(vxlan_req("198.18.0.11", Some(&prev))),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["lease"]["subnet"], subnet.as_str());
}

#[tokio::test]
async fn renew_keeps_the_lease_and_unknown_nodes_get_404() {
    let api = Api::new(Some(r#"{"Network":"10.244.0.0/16","LeaseTTL":"1h"}"#)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    let (status, body) = api
        .call(Method::POST, "/v1/leases/host-1/renew", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["lease"]["subnet"], subnet.as_str());
    assert_eq!(body["lease"]["ttl_seconds"], 3600);
    let before = api.store.requests().grant;
    api.call(Method::POST, "/v1/leases/host-1/renew", None)
        .await;
    assert_eq!(
        api.store.requests().grant,
        before,
        "renewal keeps the same etcd lease"
    );
    let (status, body) = api
        .call(Method::POST, "/v1/leases/nobody/renew", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "no_lease");
}

#[tokio::test]
async fn release_deletes_and_a_second_release_is_404() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    let (status, body) = api.call(Method::DELETE, "/v1/leases/host-1", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["released"], json!([subnet.replace('/', "-")]));
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert!(list["leases"].as_array().unwrap().is_empty());
    let (status, body) = api.call(Method::DELETE, "/v1/leases/host-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "no_lease");
}

#[tokio::test]
async fn list_with_ttl_reports_time_left() {
    let api = Api::new(Some(r#"{"Network":"10.244.0.0/16","LeaseTTL":"1h"}"#)).await;
    api.subnet_of("host-1", "198.18.0.11").await;
    let (_, list) = api
        .call(Method::GET, "/v1/leases?with_ttl=true", None)
        .await;
    let ttl = list["leases"][0]["ttl_seconds"].as_u64().unwrap();
    assert!((3590..=3600).contains(&ttl), "{ttl}");
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert_eq!(list["leases"][0]["ttl_seconds"], Value::Null);
    assert!(list["revision"].as_i64().unwrap() > 0);
    let (status, body) = api
        .call(Method::GET, "/v1/leases?with_ttl=maybe", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn reservations() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let (status, r) = api
        .call(
            Method::POST,
            "/v1/reservations",
            Some(json!({"subnet":"10.244.9.0/24","node_name":"db-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(r["reserved"], true);
    assert_eq!(r["etcd_lease"], Value::Null);
    // Idempotent.
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/reservations",
            Some(json!({"subnet":"10.244.9.0/24","node_name":"db-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Taken for everybody else.
    let (status, body) = api
        .call(
            Method::POST,
            "/v1/reservations",
            Some(json!({"subnet":"10.244.9.0/24","node_name":"other"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "subnet_taken");
    assert!(body["message"].as_str().unwrap().contains("db-1"));
    // The owner gets its reservation, and it stays a reservation.
    assert_eq!(api.subnet_of("db-1", "198.18.0.20").await, "10.244.9.0/24");
    let snap = api.store.snapshot().await.unwrap();
    assert!(snap.leases[0].is_reservation());
    assert_eq!(snap.leases[0].attrs.public_ip.to_string(), "198.18.0.20");
    // Outside the network, or the wrong size.
    for bad in ["10.99.9.0/24", "10.244.9.0/25", "garbage"] {
        let (status, body) = api
            .call(
                Method::POST,
                "/v1/reservations",
                Some(json!({"subnet": bad, "node_name":"x"})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_subnet");
    }
    // A node's live lease can be turned into a reservation.
    let subnet = api.subnet_of("web-1", "198.18.0.21").await;
    let (status, body) = api
        .call(
            Method::POST,
            "/v1/reservations",
            Some(json!({"subnet": subnet, "node_name":"web-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["reserved"], true);
}

#[tokio::test]
async fn reserved_subnets_are_never_handed_out() {
    // Three subnets; two reserved for nodes that are not up.
    let api = Api::new(Some(r#"{"Network":"10.244.0.0/26"}"#)).await;
    for (s, n) in [("10.244.0.16/28", "a"), ("10.244.0.32/28", "b")] {
        let (status, _) = api
            .call(
                Method::POST,
                "/v1/reservations",
                Some(json!({"subnet": s, "node_name": n})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    assert_eq!(api.subnet_of("c", "198.18.0.3").await, "10.244.0.48/28");
    let (status, body) = api.acquire("d", "198.18.0.4").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "network_exhausted");
    assert_eq!(
        (body["used"].as_u64(), body["total"].as_u64()),
        (Some(3), Some(3))
    );
    assert!(
        body["message"].as_str().unwrap().contains("3 of 3"),
        "{body}"
    );
}

#[tokio::test]
async fn many_concurrent_acquires_get_distinct_subnets() {
    let api = std::sync::Arc::new(Api::new(Some(VXLAN_NET)).await);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let ip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
            api.subnet_of(&format!("node-{i}"), &ip).await
        }));
    }
    let mut seen = HashSet::new();
    let mut exhausted = 0;
    for t in tasks {
        match t.await {
            Ok(s) => assert!(seen.insert(s.clone()), "{s} handed out twice"),
            Err(_) => exhausted += 1,
        }
    }
    // 255 subnets for 200 nodes: everyone gets one.
    assert_eq!((seen.len(), exhausted), (200, 0));
}

#[tokio::test]
async fn a_node_may_be_called_watch() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let (status, body) = api.acquire("watch", "198.18.0.11").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = api.call(Method::DELETE, "/v1/leases/watch", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let (status, body) = api.call(Method::GET, "/v2/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "no_route");
    let (status, body) = api.call(Method::PATCH, "/v1/leases/host-1", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"], "method_not_allowed");
    let (status, body) = api.raw(Method::GET, "/healthz", Body::empty()).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ok\n"[..]));
}

#[tokio::test(start_paused = true)]
async fn a_subnet_whose_lease_ran_out_is_held_for_its_node() {
    // Three subnets (.1, .2, .3; the first /24 is skipped), a 60 s TTL:
    // the hold is one TTL.
    let net = r#"{"Network":"10.244.0.0/22","SubnetLen":24,"LeaseTTL":"60s"}"#;
    let api = Api::paused(Some(net)).await;
    let a = api.subnet_of("host-a", "198.18.0.11").await;
    // host-a is cut off: its lease runs out.
    tokio::time::sleep(std::time::Duration::from_secs(61)).await;
    let (_, list) = api.call(Method::GET, "/v1/leases", None).await;
    assert!(list["leases"].as_array().unwrap().is_empty(), "{list}");
    // Nobody else gets it meanwhile, not even by asking for it.
    let prev = a.replace(".0/24", ".1/24");
    let (status, b) = api
        .call(
            Method::PUT,
            "/v1/leases/host-b",
            Some(vxlan_req("198.18.0.12", Some(&prev))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_ne!(b["lease"]["subnet"], a.as_str());
    let c = api.subnet_of("host-c", "198.18.0.13").await;
    assert_ne!(c, a);
    let (status, d) = api.acquire("host-d", "198.18.0.14").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the held subnet is not free: {d}"
    );
    // host-a comes back: its subnet is there for it.
    assert_eq!(api.subnet_of("host-a", "198.18.0.11").await, a);
    // A release through the API holds nothing: host-d gets host-c's subnet.
    let (status, _) = api.call(Method::DELETE, "/v1/leases/host-c", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.subnet_of("host-d", "198.18.0.14").await, c);
}

#[tokio::test(start_paused = true)]
async fn the_hold_ends() {
    let net = r#"{"Network":"10.244.0.0/22","SubnetLen":24,"LeaseTTL":"60s"}"#;
    let api = Api::paused(Some(net)).await;
    let all = [
        api.subnet_of("host-a", "198.18.0.11").await,
        api.subnet_of("host-b", "198.18.0.12").await,
        api.subnet_of("host-c", "198.18.0.13").await,
    ];
    tokio::time::sleep(std::time::Duration::from_secs(61)).await;
    // All three ran out and are held; after the hold, any node may have one.
    let (status, _) = api.acquire("host-d", "198.18.0.14").await;
    assert_eq!(status, StatusCode::CONFLICT);
    tokio::time::sleep(std::time::Duration::from_secs(61)).await;
    let d = api.subnet_of("host-d", "198.18.0.14").await;
    assert!(all.contains(&d), "{d} is one of {all:?}");
}
