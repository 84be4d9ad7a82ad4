//! Errors of controller operations, each with its HTTP status and code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use thiserror::Error;
use weft_lease::alloc::Exhausted;
use weft_lease::api::ApiError;
use weft_lease::StoreError;

/// Why a request could not be served.
#[derive(Debug, Error)]
pub enum ControllerError {
    /// The request is malformed; `code` names what (e.g. `invalid_node_name`).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The request body is larger than the API accepts.
    #[error("{0}")]
    TooLarge(String),
    /// The thing asked for does not exist.
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// The request conflicts with the current state.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The caller's certificate does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// No subnet is free.
    #[error("{0}")]
    Exhausted(#[from] Exhausted),
    /// The controller cannot serve this yet (no valid config, not synced).
    #[error("{0}")]
    NotReady(String),
    /// A watch asked for history that is gone; list again.
    #[error("{0}")]
    Gone(String),
    /// A limit on costly requests was reached; try again after
    /// `retry_after` seconds (429 with `Retry-After`).
    #[error("{message}")]
    TooMany {
        code: &'static str,
        message: String,
        retry_after: u64,
    },
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl ControllerError {
    pub(crate) fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ControllerError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ControllerError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ControllerError::NotFound {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ControllerError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ControllerError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ControllerError::NotFound { .. } => StatusCode::NOT_FOUND,
            ControllerError::Forbidden(_) => StatusCode::FORBIDDEN,
            ControllerError::Conflict { .. } | ControllerError::Exhausted(_) => {
                StatusCode::CONFLICT
            }
            ControllerError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControllerError::Gone(_) => StatusCode::GONE,
            ControllerError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            ControllerError::Store(e) => match e {
                StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                StoreError::Conflict(_)
                | StoreError::AlreadyExists(_)
                | StoreError::ConfigChanged { .. }
                | StoreError::NodeClaimed { .. } => StatusCode::CONFLICT,
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                StoreError::Compacted { .. } => StatusCode::GONE,
                StoreError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// The body of the error answer.
    pub fn body(&self) -> ApiError {
        let (error, message) = match self {
            ControllerError::BadRequest { code, message }
            | ControllerError::NotFound { code, message }
            | ControllerError::Conflict { code, message }
            | ControllerError::TooMany { code, message, .. } => (*code, message.clone()),
            ControllerError::Exhausted(e) => (
                "network_exhausted",
                format!("{e}; release unused leases or widen the network (weftctl leases list)"),
            ),
            ControllerError::NotReady(m) => ("not_ready", m.clone()),
            ControllerError::Forbidden(m) => ("forbidden", m.clone()),
            ControllerError::TooLarge(m) => ("body_too_large", m.clone()),
            ControllerError::Gone(m) => ("revision_compacted", m.clone()),
            ControllerError::Store(e) => match e {
                StoreError::Unavailable(m) => (
                    "etcd_unavailable",
                    format!(
                        "etcd cannot serve this: {m}; nodes keep their data plane, retry later"
                    ),
                ),
                StoreError::Conflict(_)
                | StoreError::AlreadyExists(_)
                | StoreError::ConfigChanged { .. }
                | StoreError::NodeClaimed { .. } => ("conflict", format!("{e}; retry")),
                StoreError::NotFound(_) => ("not_found", e.to_string()),
                StoreError::Compacted { .. } => ("revision_compacted", e.to_string()),
                StoreError::Other(_) => ("store_error", e.to_string()),
            },
        };
        let (used, total) = match self {
            ControllerError::Exhausted(e) => (
                Some(u64::try_from(e.used).unwrap_or(u64::MAX)),
                Some(u64::try_from(e.total).unwrap_or(u64::MAX)),
            ),
            _ => (None, None),
        };
        ApiError {
            error: error.to_string(),
            message,
            used,
            total,
        }
    }
}

impl IntoResponse for ControllerError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if let ControllerError::TooMany { retry_after, .. } = self {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(retry_after),
            );
        }
        resp
    }
}
