//! Bad input gets a clear error and changes nothing.

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use serde_json::{json, Value};
use weft_lease::LeaseStore;

async fn assert_nothing_written(api: &Api) {
    let snap = api.store.snapshot().await.unwrap();
    assert!(
        snap.leases.is_empty(),
        "bad input wrote a lease: {:?}",
        snap.leases
    );
}

#[tokio::test]
async fn malformed_bodies() {
    let api = Api::new(Some(VXLAN_NET)).await;
    for body in [
        "",
        "{",
        "[]",
        "null",
        r#"{"public_ip":"198.18.0.1"}"#,
        r#"{"public_ip":1,"backend_type":"vxlan"}"#,
    ] {
        let (status, bytes) = api
            .raw(Method::PUT, "/v1/leases/host-1", Body::from(body))
            .await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"], "invalid_json", "{body}");
        assert!(
            v["message"].as_str().unwrap().starts_with("request body"),
            "{v}"
        );
    }
    // Unknown fields are rejected rather than ignored.
    let mut req = vxlan_req("198.18.0.1", None);
    req["public_ipp"] = json!("198.18.0.1");
    let (status, body) = api.call(Method::PUT, "/v1/leases/host-1", Some(req)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().contains("public_ipp"),
        "{body}"
    );
    assert_nothing_written(&api).await;
}

#[tokio::test]
async fn oversized_body_is_413() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let big = format!(
        r#"{{"public_ip":"198.18.0.1","backend_type":"vxlan","x":"{}"}}"#,
        "a".repeat(200_000)
    );
    let (status, bytes) = api
        .raw(Method::PUT, "/v1/leases/host-1", Body::from(big))
        .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"], "body_too_large");
    let (status, _) = api
        .raw(
            Method::PUT,
            "/v1/network",
            Body::from(format!("{{\"Network\":\"{}\"}}", "1".repeat(100_000))),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_nothing_written(&api).await;
}

#[tokio::test]
async fn invalid_node_names() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let long = "a".repeat(254);
    for (path, why) in [
        ("/v1/leases/", "empty"),
        (&format!("/v1/leases/{long}") as &str, "253"),
        ("/v1/leases/a%2Fb", "'/'"),
        ("/v1/leases/..", "start and end"),
        ("/v1/leases/a..b", ".."),
        ("/v1/leases/a%0Ab", "'\\n'"),
        ("/v1/leases/a%00b", "'\\0'"),
        ("/v1/leases/%C3%A9", "'é'"),
    ] {
        let (status, body) = api
            .call(Method::PUT, path, Some(vxlan_req("198.18.0.1", None)))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"], "invalid_node_name", "{path}");
        assert!(
            body["message"].as_str().unwrap().contains(why),
            "{path}: {body}"
        );
    }
    let (status, body) = api
        .call(
            Method::POST,
            "/v1/reservations",
            Some(json!({"subnet":"10.244.9.0/24","node_name":"a/b"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_node_name"))
    );
    let (status, _) = api.call(Method::DELETE, "/v1/leases/a%2F..", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_nothing_written(&api).await;
}

#[tokio::test]
async fn invalid_and_foreign_family_addresses() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let cases = [
        (json!({"public_ip":"198.18.0.300"}), "not an IP address"),
        (json!({"public_ip":"fd77::1"}), "IPv6 address"),
        (json!({"public_ipv6":"198.18.0.1"}), "IPv4 address"),
        (json!({"public_ip":"0.0.0.0"}), "cannot reach"),
        (json!({"public_ip":"224.0.0.5"}), "cannot reach"),
        (
            json!({"public_ip":"10.244.5.5"}),
            "inside the cluster network",
        ),
        (json!({}), "required"),
    ];
    for (ips, why) in cases {
        let mut req =
            json!({"backend_type":"vxlan","backend_data":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}});
        for (k, v) in ips.as_object().unwrap() {
            req[k] = v.clone();
        }
        let (status, body) = api.call(Method::PUT, "/v1/leases/host-1", Some(req)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ips}: {body}");
        assert_eq!(body["error"], "invalid_ip");
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.contains(why) || msg.contains("not an address other nodes can reach"),
            "{ips}: {msg}"
        );
    }
    assert_nothing_written(&api).await;
}

#[tokio::test]
async fn backend_problems() {
    let api = Api::new(Some(VXLAN_NET)).await;
    let mut req = vxlan_req("198.18.0.1", None);
    req["backend_type"] = json!("udp");
    let (status, body) = api.call(Method::PUT, "/v1/leases/h", Some(req)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_backend"))
    );
    let mut req = vxlan_req("198.18.0.1", None);
    req["backend_data"] = json!({"VNI": 1, "VtepMAC": "not-a-mac"});
    let (status, body) = api.call(Method::PUT, "/v1/leases/h", Some(req)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_backend_data"))
    );
    let req = json!({"public_ip":"198.18.0.1","backend_type":"host-gw"});
    let (status, body) = api.call(Method::PUT, "/v1/leases/h", Some(req)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("backend_mismatch"))
    );
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("configured for vxlan"));
    let mut req = vxlan_req("198.18.0.1", None);
    req["previous_subnet"] = json!("10.244.3.0");
    let (status, body) = api.call(Method::PUT, "/v1/leases/h", Some(req)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_subnet"))
    );
    assert_nothing_written(&api).await;
}

#[tokio::test]
async fn exhausted_network_is_409_with_counts() {
    let api = Api::new(Some(r#"{"Network":"10.244.0.0/26"}"#)).await;
    for i in 1..=3 {
        api.subnet_of(&format!("n{i}"), &format!("198.18.0.{i}"))
            .await;
    }
    let (status, body) = api.acquire("n4", "198.18.0.4").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "network_exhausted");
    assert_eq!(body["used"], 3);
    assert_eq!(body["total"], 3);
    // Nothing leaked: no stray etcd lease or key for the refused node.
    let snap = api.store.snapshot().await.unwrap();
    assert_eq!(snap.leases.len(), 3);
    let (_, metrics) = api.raw(Method::GET, "/metrics", Body::empty()).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        text.contains(r#"weft_controller_acquires_total{result="exhausted"} 1"#),
        "{text}"
    );
}

/// Found by fuzzing (fuzz/regressions/api_request): a percent-encoded
/// node name that is not UTF-8 got axum's plain-text rejection.
#[tokio::test]
async fn a_node_name_that_is_not_utf8_gets_a_json_error() {
    let api = Api::new(Some(VXLAN_NET)).await;
    for (method, uri) in [
        (Method::DELETE, "/v1/leases/%FFnode"),
        (Method::PUT, "/v1/leases/%C3%28"),
        (Method::POST, "/v1/leases/%80/renew"),
    ] {
        let (status, body) = api.call(method.clone(), uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}: {body}");
        assert_eq!(body["error"], "invalid_node_name", "{method} {uri}: {body}");
    }
}
