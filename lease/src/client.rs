//! An HTTP client for the controller API, used by `weftctl`, `weft-node`
//! and the benchmarks.

use crate::api::{
    AcquireRequest, ApiError, LeaseList, LeaseResponse, LeaseView, NetworkView, Readiness,
    ReleaseResponse, ReserveRequest, WatchEvent,
};
use bytes::{Buf, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use std::time::Duration;
use thiserror::Error;

/// What went wrong talking to the controller.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The controller could not be reached.
    #[error("cannot reach the controller at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The controller answered with an error.
    #[error("controller answered {status}: {} ({})", body.message, body.error)]
    Api { status: u16, body: ApiError },
    /// The answer could not be read.
    #[error("unexpected answer from the controller: {0}")]
    Decode(String),
    /// The URL given for the controller is not usable.
    #[error("bad controller URL {0:?}: expected http://HOST:PORT")]
    BadUrl(String),
}

impl ClientError {
    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A stream of watch lines; ends when the controller closes the stream.
pub type WatchLines = BoxStream<'static, Result<WatchEvent, ClientError>>;

/// Client for one controller URL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ControllerClient {
    base: String,
    http: reqwest::Client,
}

/// Deadline of every request but the watch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The error an answer with a failure status carries.
fn api_error(status: reqwest::StatusCode, bytes: &[u8]) -> ClientError {
    let body = serde_json::from_slice::<ApiError>(bytes).unwrap_or_else(|_| ApiError {
        error: "http_error".into(),
        message: String::from_utf8_lossy(bytes).trim().to_string(),
        used: None,
        total: None,
    });
    ClientError::Api {
        status: status.as_u16(),
        body,
    }
}

/// Escapes a path segment; node names are validated by the controller, but
/// whatever the caller passes must not change which route is hit.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ControllerClient {
    /// A client for `base`, e.g. `http://198.18.0.1:7070`.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(ClientError::BadUrl(base));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(ControllerClient { base, http })
    }

    /// The controller URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn connect_err(&self, e: reqwest::Error) -> ClientError {
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            src = s.source();
        }
        ClientError::Connect {
            url: self.base.clone(),
            reason,
        }
    }

    /// Sends a request; the status and body of the answer.
    async fn raw(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Option<Duration>,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes), ClientError> {
        let req = match timeout {
            Some(t) => req.timeout(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| self.connect_err(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.connect_err(e))?;
        Ok((status, bytes))
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.raw(req, Some(REQUEST_TIMEOUT)).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Acquires (or updates) the node's lease.
    pub async fn acquire(
        &self,
        node: &str,
        req: &AcquireRequest,
    ) -> Result<LeaseResponse, ClientError> {
        let url = format!("{}/v1/leases/{}", self.base, segment(node));
        self.send(self.http.put(url).json(req)).await
    }

    /// Renews the node's lease.
    pub async fn renew(&self, node: &str) -> Result<LeaseResponse, ClientError> {
        let url = format!("{}/v1/leases/{}/renew", self.base, segment(node));
        self.send(self.http.post(url)).await
    }

    /// Releases every lease the node holds.
    pub async fn release(&self, node: &str) -> Result<ReleaseResponse, ClientError> {
        let url = format!("{}/v1/leases/{}", self.base, segment(node));
        self.send(self.http.delete(url)).await
    }

    /// Lists leases; `with_ttl` also asks etcd for the time left on each.
    pub async fn list(&self, with_ttl: bool) -> Result<LeaseList, ClientError> {
        let url = format!("{}/v1/leases?with_ttl={with_ttl}", self.base);
        self.send(self.http.get(url)).await
    }

    /// Reserves a subnet for a node.
    pub async fn reserve(&self, subnet: &str, node: &str) -> Result<LeaseView, ClientError> {
        let url = format!("{}/v1/reservations", self.base);
        let body = ReserveRequest {
            subnet: subnet.to_string(),
            node_name: node.to_string(),
        };
        self.send(self.http.post(url).json(&body)).await
    }

    /// The stored network config.
    pub async fn network(&self) -> Result<NetworkView, ClientError> {
        self.send(self.http.get(format!("{}/v1/network", self.base)))
            .await
    }

    /// Validates and stores a network config.
    pub async fn set_network(&self, text: &str) -> Result<NetworkView, ClientError> {
        let req = self
            .http
            .put(format!("{}/v1/network", self.base))
            .header("content-type", "application/json")
            .body(text.to_string());
        self.send(req).await
    }

    /// Readiness and counts; answered also when not ready.
    pub async fn readiness(&self) -> Result<Readiness, ClientError> {
        let (_, bytes) = self
            .raw(
                self.http.get(format!("{}/readyz", self.base)),
                Some(REQUEST_TIMEOUT),
            )
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The Prometheus metrics text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (status, bytes) = self
            .raw(
                self.http.get(format!("{}/metrics", self.base)),
                Some(REQUEST_TIMEOUT),
            )
            .await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Follows lease changes with a revision `>= from_revision`. A `410`
    /// answer means that revision is gone: list again and watch from there.
    pub async fn watch(&self, from_revision: i64) -> Result<WatchLines, ClientError> {
        let url = format!(
            "{}/v1/leases/watch?from_revision={from_revision}",
            self.base
        );
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.connect_err(e))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| self.connect_err(e))?;
            return Err(api_error(status, &bytes));
        }
        let client = self.clone();
        let bytes = resp.bytes_stream();
        let lines = futures::stream::unfold(
            (bytes, BytesMut::new(), client),
            |(mut bytes, mut buf, client)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line = buf.split_to(pos);
                        buf.advance(1);
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let item = serde_json::from_slice::<WatchEvent>(&line)
                            .map_err(|e| ClientError::Decode(format!("watch line: {e}")));
                        return Some((item, (bytes, buf, client)));
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            return Some((Err(client.connect_err(e)), (bytes, buf, client)))
                        }
                        None => return None,
                    }
                }
            },
        );
        Ok(lines.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_escaped() {
        assert_eq!(segment("host-1.example"), "host-1.example");
        assert_eq!(segment("a/../b"), "a%2F..%2Fb");
        assert_eq!(segment("x y"), "x%20y");
    }

    #[test]
    fn urls_are_checked() {
        assert!(ControllerClient::new("http://127.0.0.1:7070/").is_ok());
        assert!(ControllerClient::new("127.0.0.1:7070").is_err());
        assert!(ControllerClient::new("https://x").is_err());
    }
}
