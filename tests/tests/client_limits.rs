//! The controller client against a controller that misbehaves (or whoever
//! answers in its place): answers and watch lines larger than any real one
//! are refused, not held in memory.

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use weft_lease::client::{ControllerClient, MAX_BODY, MAX_WATCH_LINE};

async fn fake(router: Router) -> ControllerClient {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    ControllerClient::new(&url).unwrap()
}

/// `n` bytes of `b`, sent in 1 MiB chunks.
fn endless(n: usize, b: u8) -> Body {
    let chunk = bytes::Bytes::from(vec![b; 1 << 20]);
    let chunks = n.div_ceil(1 << 20);
    Body::from_stream(futures::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    ))
}

#[tokio::test]
async fn an_answer_larger_than_the_cap_is_refused() {
    let client = fake(Router::new().route(
        "/v1/leases",
        get(|| async { endless(MAX_BODY + (2 << 20), b' ') }),
    ))
    .await;
    let e = client.list(false).await.unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
}

#[tokio::test]
async fn a_watch_line_longer_than_the_cap_ends_the_stream() {
    let client = fake(Router::new().route(
        "/v1/leases/watch",
        get(|| async { endless(MAX_WATCH_LINE * 8, b'x') }),
    ))
    .await;
    let mut lines = client.watch(1).await.unwrap();
    let first = lines.next().await.expect("an item");
    let e = first.unwrap_err();
    assert!(e.to_string().contains("watch line longer than"), "{e}");
    assert!(lines.next().await.is_none(), "the stream ends");
}
