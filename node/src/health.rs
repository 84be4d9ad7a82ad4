//! `/healthz`, `/readyz` (ready after the first full reconcile) and
//! `/metrics` of the node daemon. Reading only: what changes the node
//! goes through the control socket ([`crate::control`]).

use crate::status::Status;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

#[derive(Clone)]
struct Api {
    status: Arc<Status>,
}

/// The health API.
pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Api { status })
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
