//! The controller's API as any client may call it (without TLS, as in
//! tests): request bodies, paths and query strings. Nothing panics, every
//! answer is a status with a JSON body, and the controller keeps serving.
#![no_main]

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;
use weft_controller::{Controller, Options};
use weft_lease::{LeaseStore, MemoryStore};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24}"#;

struct World {
    rt: tokio::runtime::Runtime,
    store: MemoryStore,
    router: axum::Router,
    _controller: Controller,
}

/// One controller for every input (a new one per input would run at a
/// few inputs a second). After each input the network config is put back
/// and, past 64 leases, the leases are cleared, so inputs do not drift into
/// a full or changed network. What an answer must be (JSON, no 500) does
/// not depend on that state.
fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = {
            let _inside = rt.enter();
            MemoryStore::new()
        };
        let (controller, router) = rt.block_on(async {
            store.put_config(CONFIG).await.expect("config");
            let c = Controller::start(Arc::new(store.clone()), Options::default());
            c.synced().await;
            let r = c.router();
            (c, r)
        });
        World {
            rt,
            store,
            router,
            _controller: controller,
        }
    })
}

async fn reset(store: &MemoryStore) {
    let Ok(snap) = store.snapshot().await else {
        return;
    };
    if snap.config.as_ref().map(|(t, _)| t.as_str()) != Some(CONFIG) {
        let _ = store.put_config(CONFIG).await;
    }
    if snap.leases.len() > 64 {
        for l in &snap.leases {
            let _ = store.delete(&l.key, l.mod_revision).await;
        }
    }
}

const ROUTES: &[(&str, &str)] = &[
    ("PUT", "/v1/leases/"),
    ("POST", "/v1/leases/"),
    ("DELETE", "/v1/leases/"),
    ("POST", "/v1/reservations"),
    ("PUT", "/v1/network"),
    ("GET", "/v1/leases?"),
    ("GET", "/v1/network"),
    ("GET", "/readyz"),
];

fuzz_target!(|data: &[u8]| {
    // First byte: the route; up to the first NUL: the path's tail (a node
    // name, a query); the rest: the body.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (method, base) = ROUTES[usize::from(pick) % ROUTES.len()];
    let (tail, body) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&rest[..0], rest),
    };
    let mut uri = String::from(base);
    uri.extend(
        tail.iter()
            .filter(|b| b.is_ascii_graphic() && **b != b'#')
            .map(|b| char::from(*b)),
    );
    if method == "POST" && base == "/v1/leases/" {
        uri.push_str("/renew");
    }
    let Ok(req) = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(&uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let w = world();
    let (status, bytes) = w.rt.block_on(async {
        let resp = w.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        reset(&w.store).await;
        (status, bytes)
    });
    assert!(
        serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
        "{method} {uri}: {status} with a body that is not JSON: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{method} {uri}");
});
