//! Limits on what one caller can make the controller do: watch streams,
//! lists with TTLs, slow or idle connections.

mod common;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;
use weft_controller::{Controller, Options};
use weft_lease::{LeaseStore, MemoryStore};

#[tokio::test]
async fn watch_streams_beyond_max_watchers_are_refused_until_one_closes() {
    let store = MemoryStore::new();
    store.put_config(VXLAN_NET).await.unwrap();
    let api = Api::over(
        store,
        Options {
            max_watchers: 3,
            ..opts()
        },
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Lines::open(&api, "/v1/leases/watch").await.unwrap());
    }
    let req = Request::get("/v1/leases/watch")
        .body(Body::empty())
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
    let (code, body) = Lines::open(&api, "/v1/leases/watch").await.err().unwrap();
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"], "too_many_watchers");
    assert!(body["message"].as_str().unwrap().contains("--max-watchers"));
    // Everything else still works, and the open streams get changes.
    let subnet = api.subnet_of("host-1", "198.18.0.11").await;
    for s in &mut open {
        assert_eq!(s.next_event().await["lease"]["subnet"], subnet.as_str());
    }
    // A stream that closes gives its place back.
    drop(open.pop());
    let mut again = None;
    for _ in 0..50 {
        match Lines::open(&api, "/v1/leases/watch").await {
            Ok(l) => {
                again = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(again.is_some(), "a closed stream's place was not freed");
}

#[tokio::test]
async fn lists_with_ttls_are_rate_limited_lists_without_are_not() {
    let api = Api::new(Some(VXLAN_NET)).await;
    api.subnet_of("host-1", "198.18.0.11").await;
    for _ in 0..5 {
        let (code, _) = api
            .call(Method::GET, "/v1/leases?with_ttl=true", None)
            .await;
        assert_eq!(code, StatusCode::OK);
    }
    let req = Request::get("/v1/leases?with_ttl=true")
        .body(Body::empty())
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let after: u64 = resp.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(after, 1, "one list per second");
    for _ in 0..20 {
        let (code, _) = api.call(Method::GET, "/v1/leases", None).await;
        assert_eq!(code, StatusCode::OK);
    }
    // A second later there is room for one more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, _) = api
        .call(Method::GET, "/v1/leases?with_ttl=true", None)
        .await;
    assert_eq!(code, StatusCode::OK);
}

/// Reads from `s` until the peer closes (`Ok(bytes)`), or fails after
/// `within`.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(got)
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed_on_the_plain_listener() {
    let store = MemoryStore::new();
    store.put_config(VXLAN_NET).await.unwrap();
    let controller = Controller::start(
        std::sync::Arc::new(store),
        Options {
            header_timeout: Duration::from_secs(1),
            ..opts()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = weft_controller::serve(listener, &controller, std::future::pending());
    tokio::select! {
        _ = server => panic!("the server stopped"),
        _ = async {
            // Headers that never end: the connection is closed.
            let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
            slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            let got = read_until_closed(&mut slow, Duration::from_secs(10)).await;
            assert!(got.is_some(), "a connection with unfinished headers stayed open");
            // A finished request is answered; the idle connection after it
            // is closed too.
            let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
            idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let got = read_until_closed(&mut idle, Duration::from_secs(10))
                .await
                .expect("an idle keep-alive connection stayed open");
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        } => {}
    }
}
