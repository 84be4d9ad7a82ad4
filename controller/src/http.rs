//! The HTTP API (`/v1`, health, metrics) as axum handlers over [`Shared`].

use crate::error::ControllerError;
use crate::tls::{Caller, Role};
use crate::{watch, Shared};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::Arc;
use weft_lease::api::{AcquireRequest, AddName, NodeNames, ReserveRequest, MAX_BODY_BYTES};
use weft_lease::NodeName;

type AppState = State<Arc<Shared>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/leases", get(list))
        // A node may be called "watch": PUT and DELETE on this path are
        // still lease operations.
        .route(
            "/v1/leases/watch",
            get(watch::handler)
                .put(acquire_watch_named)
                .delete(release_watch_named),
        )
        .route(
            "/v1/leases/",
            put(empty_name).delete(empty_name).post(empty_name),
        )
        .route("/v1/leases/{node}", put(acquire).delete(release))
        .route("/v1/leases/{node}/renew", post(renew))
        .route("/v1/leases/{node}/names", put(node_names))
        .route("/v1/names", get(list_names).post(add_name))
        .route("/v1/names/watch", get(watch::names_handler))
        .route(
            "/v1/names/{name}/{address}",
            axum::routing::delete(remove_name),
        )
        .route("/v1/reservations", post(reserve))
        .route("/v1/network", get(network).put(set_network))
        // Every route above: the caller must be allowed (crate::auth), and
        // the cache must be whole.
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), intact))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::auth::authorize,
        ))
        .merge(health_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// `/healthz`, `/readyz` and `/metrics`: open to every client (counts and
/// reasons, no lease data).
fn health_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Only the health routes (`--healthz-listen`).
pub(crate) fn health_router(shared: Arc<Shared>) -> Router {
    health_routes()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

/// The node name in the path; one that is not valid UTF-8 once
/// percent-decoded gets the API's JSON error like any other bad name.
fn node_name(raw: Result<Path<String>, PathRejection>) -> Result<NodeName, ControllerError> {
    let Path(raw) = raw.map_err(|e| {
        ControllerError::bad("invalid_node_name", format!("node name: {}", e.body_text()))
    })?;
    NodeName::new(raw).map_err(|e| ControllerError::bad("invalid_node_name", e.to_string()))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ControllerError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ControllerError::TooLarge(format!(
                "request body is larger than {MAX_BODY_BYTES} bytes"
            ))
        } else {
            ControllerError::bad("bad_body", format!("cannot read the request body: {e}"))
        }
    })
}

/// Reads a JSON body whatever its content type (operators use curl).
fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ControllerError> {
    let bytes = body_bytes(body)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ControllerError::bad("invalid_json", format!("request body: {e}")))
}

fn text_body(body: Result<Bytes, BytesRejection>) -> Result<String, ControllerError> {
    let bytes = body_bytes(body)?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ControllerError::bad("invalid_json", "request body is not UTF-8"))
}

async fn acquire(
    State(s): AppState,
    node: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let node = node_name(node)?;
    let req: AcquireRequest = json_body(body)?;
    Ok(Json(s.acquire(&node, &req).await?))
}

async fn acquire_watch_named(
    state: AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    acquire(state, Ok(Path("watch".to_string())), body).await
}

async fn empty_name() -> ControllerError {
    ControllerError::bad(
        "invalid_node_name",
        weft_lease::NodeNameError::Empty.to_string(),
    )
}

async fn release(
    State(s): AppState,
    node: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let node = node_name(node)?;
    Ok(Json(s.release(&node).await?))
}

async fn release_watch_named(state: AppState) -> Result<impl IntoResponse, ControllerError> {
    release(state, Ok(Path("watch".to_string()))).await
}

async fn renew(
    State(s): AppState,
    node: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let node = node_name(node)?;
    Ok(Json(s.renew(&node).await?))
}

async fn node_names(
    State(s): AppState,
    node: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let node = node_name(node)?;
    let req: NodeNames = json_body(body)?;
    Ok(Json(s.sync_node_names(&node, &req).await?))
}

async fn list_names(State(s): AppState) -> Result<impl IntoResponse, ControllerError> {
    Ok(Json(s.list_names()?))
}

async fn add_name(
    State(s): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let req: AddName = json_body(body)?;
    Ok((StatusCode::CREATED, Json(s.add_name(&req).await?)))
}

async fn remove_name(
    State(s): AppState,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let Path((name, address)) =
        path.map_err(|e| ControllerError::bad("invalid_name", format!("path: {}", e.body_text())))?;
    let name: weft_config::DnsName = name.parse().map_err(|e: weft_config::DnsNameError| {
        ControllerError::bad("invalid_name", e.to_string())
    })?;
    let address: std::net::IpAddr = address.parse().map_err(|_| {
        ControllerError::bad(
            "invalid_address",
            format!("{address:?} is not an IP address"),
        )
    })?;
    Ok(Json(s.remove_name(&name, address).await?))
}

async fn reserve(
    State(s): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let req: ReserveRequest = json_body(body)?;
    let node = node_name(Ok(Path(req.node_name)))?;
    let view = s.reserve(&req.subnet, &node).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(default)]
    with_ttl: bool,
}

async fn list(
    State(s): AppState,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let Query(params) = params.map_err(|e| ControllerError::bad("invalid_query", e.body_text()))?;
    // With TTLs a list costs etcd one request per lease: limited.
    let _running = params.with_ttl.then(|| s.limits.ttl_list()).transpose()?;
    Ok(Json(s.list(params.with_ttl).await?))
}

async fn network(State(s): AppState) -> Result<impl IntoResponse, ControllerError> {
    Ok(Json(s.network()?))
}

async fn set_network(
    State(s): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ControllerError> {
    let text = text_body(body)?;
    Ok(Json(s.set_network(&text).await?))
}

/// Alive and able to serve: fails while the cache is reloaded after a
/// panic (a supervisor that probes it restarts a controller stuck there).
async fn healthz(State(s): AppState) -> Response {
    if s.damaged() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the lease cache is being reloaded from the store after a panic\n",
        )
            .into_response();
    }
    "ok\n".into_response()
}

/// Refuses API requests while the cache may be half updated.
async fn intact(
    State(s): AppState,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.damaged() {
        return ControllerError::NotReady(
            "the lease cache is being reloaded from the store after a panic; try again shortly"
                .into(),
        )
        .into_response();
    }
    next.run(req).await
}

async fn readyz(State(s): AppState, caller: Option<axum::Extension<Caller>>) -> Response {
    // Leases are named only to callers who may read them; the open health
    // listener and certificates without a role get counts.
    let detail = match caller.as_deref() {
        Some(Caller::Unauthenticated) => true,
        Some(Caller::Cert { role, .. }) => *role != Role::None,
        None => false,
    };
    let r = s.readiness(detail);
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

async fn metrics(State(s): AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics_text(),
    )
        .into_response()
}

async fn not_found() -> ControllerError {
    ControllerError::not_found(
        "no_route",
        "no such endpoint; see DESIGN.md for the /v1 API",
    )
}

async fn method_not_allowed() -> Response {
    let body =
        ControllerError::bad("method_not_allowed", "method not allowed on this endpoint").body();
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}
