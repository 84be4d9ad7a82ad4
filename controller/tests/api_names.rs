//! Container names: a node registers its set, the store holds exactly it
//! attached to the node's lease, everyone lists and watches them.

mod common;

use axum::http::{Method, StatusCode};
use common::*;
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_lease::LeaseStore;

/// The `n`th address of a subnet like `10.244.3.0/24`.
fn addr(subnet: &str, n: u32) -> String {
    let net: Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    Ipv4Addr::from(u32::from(net) + n).to_string()
}

async fn sync(api: &Api, node: &str, names: Value) -> (StatusCode, Value) {
    api.call(
        Method::PUT,
        &format!("/v1/leases/{node}/names"),
        Some(json!({ "names": names })),
    )
    .await
}

/// `(name, address, node)` of every record.
async fn records(api: &Api) -> Vec<(String, String, String)> {
    let (status, list) = api.call(Method::GET, "/v1/names", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let mut v: Vec<_> = list["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["address"].as_str().unwrap().to_string(),
                n["node"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_node_s_set_is_held_exactly_and_attached_to_its_lease() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    let (a, b) = (addr(&subnet, 5), addr(&subnet, 6));
    let (status, r) = sync(
        &api,
        "host-1",
        json!([
            {"name": "web", "address": a, "container_id": "c1"},
            {"name": "Web", "address": a, "container_id": "c1"},
            {"name": "api.shop", "address": b},
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(
        (r["added"].as_u64(), r["removed"].as_u64()),
        (Some(2), Some(0)),
        "{r}"
    );
    assert_eq!(
        records(&api).await,
        [
            ("api.shop".into(), b.clone(), "host-1".into()),
            ("web".into(), a.clone(), "host-1".into()),
        ]
    );
    // In etcd's layout, on the node's etcd lease.
    let snap = api.store.snapshot().await.unwrap();
    let lease = snap.leases[0].etcd_lease;
    assert!(lease.is_some());
    assert!(
        snap.names.iter().all(|n| n.etcd_lease == lease),
        "{:?}",
        snap.names
    );
    assert_eq!(snap.names[1].record.key(), format!("names/web/{a}"));
    // The same set again changes nothing; a smaller one withdraws.
    let (_, r) = sync(&api, "host-1", json!([{"name": "web", "address": a, "container_id": "c1"}, {"name": "api.shop", "address": b}])).await;
    assert_eq!(
        (r["added"].as_u64(), r["unchanged"].as_u64()),
        (Some(0), Some(2)),
        "{r}"
    );
    let (_, r) = sync(
        &api,
        "host-1",
        json!([{"name": "web", "address": a, "container_id": "c1"}]),
    )
    .await;
    assert_eq!(r["removed"].as_u64(), Some(1), "{r}");
    assert_eq!(records(&api).await.len(), 1);
    // Releasing the lease takes the names with it.
    api.call(Method::DELETE, "/v1/leases/host-1", None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !records(&api).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "names outlived the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_node_answers_only_for_addresses_in_its_subnets() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let one = api.subnet_of("host-1", "198.18.0.11").await;
    let two = api.subnet_of("host-2", "198.18.0.12").await;
    let (status, r) = sync(
        &api,
        "host-1",
        json!([
            {"name": "web", "address": addr(&one, 5)},
            {"name": "web", "address": addr(&two, 5)},
            {"name": "outside", "address": "10.99.0.1"},
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let refused = r["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2, "{r}");
    assert!(refused[0]["reason"]
        .as_str()
        .unwrap()
        .contains("outside the subnets of node host-1"));
    assert_eq!(
        records(&api).await,
        [("web".into(), addr(&one, 5), "host-1".into())]
    );
    // A shared name: both nodes' containers answer.
    sync(
        &api,
        "host-2",
        json!([{"name": "web", "address": addr(&two, 5)}]),
    )
    .await;
    assert_eq!(records(&api).await.len(), 2);
    // A node without a lease registers nothing.
    let (status, e) = sync(&api, "host-3", json!([])).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
    assert_eq!(e["error"], "no_lease");
}

#[tokio::test]
async fn a_reserved_node_s_names_go_when_it_is_released() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/reservations",
            Some(json!({"subnet": "10.244.9.0/24", "node_name": "db-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, r) = sync(
        &api,
        "db-1",
        json!([{"name": "db", "address": "10.244.9.5"}]),
    )
    .await;
    assert_eq!(r["added"], 1, "{r}");
    // No etcd lease to expire with: it stays while the reservation does.
    assert_eq!(
        api.store.snapshot().await.unwrap().names[0].etcd_lease,
        None
    );
    let (status, v) = api.call(Method::DELETE, "/v1/leases/db-1", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(records(&api).await.is_empty(), "released with its node");
}

#[tokio::test]
async fn bad_requests_are_refused_whole() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    for (body, code) in [
        (
            json!({"names": [{"name": "web_1", "address": addr(&subnet, 5)}]}),
            "invalid_json",
        ),
        (
            json!({"names": [{"name": "web", "address": "nope"}]}),
            "invalid_json",
        ),
        (
            json!({"names": [{"name": "web", "address": addr(&subnet, 5), "container_id": "a/b"}]}),
            "invalid_container_id",
        ),
        (json!({"names": [], "extra": 1}), "invalid_json"),
    ] {
        let (status, e) = api
            .call(Method::PUT, "/v1/leases/host-1/names", Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert_eq!(e["error"], code, "{body}: {e}");
    }
    let many: Vec<Value> = (0..=weft_lease::api::MAX_NODE_NAMES)
        .map(|i| json!({"name": format!("n{i}"), "address": addr(&subnet, 5)}))
        .collect();
    let (status, e) = sync(&api, "host-1", json!(many)).await;
    assert!(
        status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE,
        "{e}"
    );
    assert!(records(&api).await.is_empty());
}

#[tokio::test]
async fn operators_add_and_remove_names_nodes_cannot_take_them() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    let a = addr(&subnet, 7);
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/names",
            Some(json!({"name": "gateway", "address": a})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert!(v.get("node").is_none(), "{v}");
    // Containers cannot join an operator's name, at its address or another.
    let (_, r) = sync(
        &api,
        "host-1",
        json!([{"name": "gateway", "address": a}, {"name": "gateway", "address": addr(&subnet, 8)}]),
    )
    .await;
    let refused = r["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2, "{r}");
    assert!(
        refused
            .iter()
            .all(|x| x["reason"].as_str().unwrap().contains("operator's name")),
        "{r}"
    );
    assert_eq!(
        records(&api).await,
        [("gateway".into(), a.clone(), "".into())]
    );
    // No etcd lease: it stays until removed.
    assert_eq!(
        api.store.snapshot().await.unwrap().names[0].etcd_lease,
        None
    );
    let (status, v) = api
        .call(Method::DELETE, &format!("/v1/names/gateway/{a}"), None)
        .await;
    assert_eq!(
        (status, v["removed"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );
    let (_, v) = api
        .call(Method::DELETE, &format!("/v1/names/gateway/{a}"), None)
        .await;
    assert_eq!(v["removed"], false, "removing again succeeds");
    let (status, e) = api
        .call(Method::DELETE, "/v1/names/bad_name/10.0.0.1", None)
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_name"))
    );
    // A container's record is not an operator's to shadow.
    sync(&api, "host-1", json!([{"name": "web", "address": a}])).await;
    let (status, e) = api
        .call(
            Method::POST,
            "/v1/names",
            Some(json!({"name": "web", "address": a})),
        )
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (StatusCode::CONFLICT, Some("name_exists")),
        "{e}"
    );
}

#[tokio::test]
async fn the_names_watch_follows_changes_and_says_when_it_cannot() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    let (_, list) = api.call(Method::GET, "/v1/names", None).await;
    let from = list["revision"].as_i64().unwrap() + 1;
    let mut lines = Lines::open(&api, &format!("/v1/names/watch?from_revision={from}"))
        .await
        .unwrap();
    // Lease changes are not in the names stream.
    api.subnet_of("host-2", "198.18.0.12").await;
    sync(
        &api,
        "host-1",
        json!([{"name": "web", "address": addr(&subnet, 5)}]),
    )
    .await;
    let put = lines.next_event().await;
    assert_eq!(put["type"], "put", "{put}");
    assert_eq!(put["name"]["name"], "web");
    assert_eq!(put["name"]["node"], "host-1");
    sync(&api, "host-1", json!([])).await;
    let del = lines.next_event().await;
    assert_eq!(del["type"], "delete", "{del}");
    assert!(del["revision"].as_i64() > put["revision"].as_i64());
    // Resuming replays; a revision before the history is 410.
    let mut again = Lines::open(&api, &format!("/v1/names/watch?from_revision={from}"))
        .await
        .unwrap();
    assert_eq!(again.next_event().await["type"], "put");
    let (status, e) = Lines::open(&api, "/v1/names/watch?from_revision=1")
        .await
        .err()
        .expect("revision 1 is before the controller's history");
    assert_eq!(status, StatusCode::GONE, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("GET /v1/names"),
        "{e}"
    );
}
