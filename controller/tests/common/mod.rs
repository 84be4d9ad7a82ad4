//! Helpers for in-process API tests: a controller over a MemoryStore,
//! driven with tower's `oneshot`.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;
use weft_controller::{Controller, Options};
use weft_lease::{LeaseStore, MemoryStore};

pub const VXLAN_NET: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

pub struct Api {
    pub store: MemoryStore,
    pub controller: Controller,
    pub router: Router,
}

pub fn opts() -> Options {
    Options {
        heartbeat: Duration::from_millis(200),
        history: 1000,
        history_bytes: 64 << 20,
        max_watchers: 100,
        header_timeout: Duration::from_secs(30),
        health_interval: Duration::from_millis(100),
        write_wait: Duration::from_secs(3),
        insecure: None,
        expired_quarantine: None,
        cache_thread: true,
    }
}

impl Api {
    /// A controller over a fresh store holding `config` (if any).
    pub async fn new(config: Option<&str>) -> Api {
        let store = MemoryStore::new();
        if let Some(c) = config {
            store.put_config(c).await.unwrap();
        }
        Api::over(store, opts()).await
    }

    /// As [`Api::new`], for a test on tokio's paused clock: the cache is
    /// updated by the sync task itself (the clock cannot see the cache
    /// thread working, and would jump ahead while it does).
    #[allow(dead_code)]
    pub async fn paused(config: Option<&str>) -> Api {
        let store = MemoryStore::new();
        if let Some(c) = config {
            store.put_config(c).await.unwrap();
        }
        Api::over(
            store,
            Options {
                cache_thread: false,
                ..opts()
            },
        )
        .await
    }

    pub async fn over(store: MemoryStore, opts: Options) -> Api {
        let controller = Controller::start(Arc::new(store.clone()), opts);
        tokio::time::timeout(Duration::from_secs(10), controller.synced())
            .await
            .expect("controller synced");
        let router = controller.router();
        Api {
            store,
            controller,
            router,
        }
    }

    pub async fn raw(&self, method: Method, uri: &str, body: Body) -> (StatusCode, Vec<u8>) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, bytes)
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = match body {
            Some(v) => Body::from(v.to_string()),
            None => Body::empty(),
        };
        let (status, bytes) = self.raw(method, uri, body).await;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    /// Acquires for `node` with a vxlan request; returns status and body.
    pub async fn acquire(&self, node: &str, ip: &str) -> (StatusCode, Value) {
        self.call(
            Method::PUT,
            &format!("/v1/leases/{node}"),
            Some(vxlan_req(ip, None)),
        )
        .await
    }

    /// Acquires and asserts success; returns the subnet.
    pub async fn subnet_of(&self, node: &str, ip: &str) -> String {
        let (status, body) = self.acquire(node, ip).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["lease"]["subnet"].as_str().unwrap().to_string()
    }
}

pub fn mac_for(ip: &str) -> String {
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap_or(1);
    format!("0e:00:00:00:00:{last:02x}")
}

pub fn vxlan_req(ip: &str, previous: Option<&str>) -> Value {
    let mut v = json!({
        "public_ip": ip,
        "backend_type": "vxlan",
        "backend_data": {"VNI": 1, "VtepMAC": mac_for(ip)},
    });
    if let Some(p) = previous {
        v["previous_subnet"] = json!(p);
    }
    v
}

/// Reads NDJSON lines from a streaming response until `n` lines arrive.
pub struct Lines {
    body: Body,
    buf: Vec<u8>,
}

impl Lines {
    pub async fn open(api: &Api, uri: &str) -> Result<Lines, (StatusCode, Value)> {
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let resp = api.router.clone().oneshot(req).await.unwrap();
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            return Err((status, serde_json::from_slice(&bytes).unwrap()));
        }
        Ok(Lines {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// The next line that is not a heartbeat.
    pub async fn next_event(&mut self) -> Value {
        loop {
            let v = self.next().await;
            if v["type"] != "heartbeat" {
                return v;
            }
        }
    }

    /// Waits for the end of the stream, skipping heartbeats; panics on any
    /// other line.
    pub async fn ended(&mut self) -> bool {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                assert_eq!(
                    v["type"], "heartbeat",
                    "unexpected line before the end: {v}"
                );
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(10), self.body.frame()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(frame)) => {
                    if let Ok(data) = frame.unwrap().into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    pub async fn next(&mut self) -> Value {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("a watch line within 10 s")
                .expect("stream still open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}
