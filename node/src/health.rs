//! `/healthz`, `/readyz` (ready after the first full reconcile),
//! `/metrics` of the node daemon, and `POST /v1/rekey` (ipsec backend:
//! rotate the key now; only from loopback).

use crate::rekey::RekeyRequest;
use crate::status::Status;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone)]
struct Api {
    status: Arc<Status>,
    rekey: mpsc::Sender<RekeyRequest>,
}

/// The health API. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(status: Arc<Status>, rekey: mpsc::Sender<RekeyRequest>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/rekey", post(rekey_now))
        .with_state(Api { status, rekey })
}

async fn readyz(State(api): State<Api>) -> Response {
    let snap = api.status.snapshot();
    let code = if snap.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(snap)).into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        api.status.metrics_text(),
    )
        .into_response()
}

fn error(code: StatusCode, error: &str, message: String) -> Response {
    (code, Json(json!({"error": error, "message": message}))).into_response()
}

async fn rekey_now(State(api): State<Api>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    if !peer.ip().is_loopback() {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("key rotation is only accepted from this host, not from {peer}"),
        );
    }
    let (tx, rx) = oneshot::channel();
    if api.rekey.send(tx).await.is_err() {
        return error(
            StatusCode::CONFLICT,
            "not_ipsec",
            "this node does not run the ipsec backend (or is still starting)".into(),
        );
    }
    match rx.await {
        Ok(Ok(epoch)) => Json(json!({"epoch": epoch})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "rekey_failed", e),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the daemon is stopping".into(),
        ),
    }
}
