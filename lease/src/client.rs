//! An HTTP(S) client for the controller API, used by `weftctl`, `weft-node`
//! and the benchmarks.

use crate::api::{
    AcquireRequest, ApiError, LeaseList, LeaseResponse, LeaseView, NetworkView, Readiness,
    ReleaseResponse, ReserveRequest, WatchEvent,
};
use crate::tls::ClientTlsFiles;
use bytes::{Buf, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
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
    #[error("bad controller URL {0:?}: expected https://HOST:PORT (or http:// without TLS)")]
    BadUrl(String),
    /// The TLS settings are incomplete, or their files do not load.
    #[error("TLS: {0}")]
    Tls(String),
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

/// Client for one controller URL. Cheap to clone (clones share the
/// connection pool and the TLS files' state).
#[derive(Debug, Clone)]
pub struct ControllerClient {
    base: String,
    http: Arc<Http>,
}

/// The HTTP client, rebuilt when the TLS files change (a rotated
/// certificate is used without a restart).
#[derive(Debug)]
struct Http {
    tls: Option<ClientTlsFiles>,
    state: Mutex<HttpState>,
}

#[derive(Debug)]
struct HttpState {
    client: reqwest::Client,
    /// The files as the current client was built from them.
    stamp: Vec<FileStamp>,
    /// Files that failed to load (not retried until they change again).
    failed: Option<Vec<FileStamp>>,
    checked: Instant,
}

/// What tells a file's content changed without reading it.
type FileStamp = Option<(SystemTime, u64, u64)>;

/// How often the TLS files are looked at.
const TLS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

fn stamps(tls: &ClientTlsFiles) -> Vec<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    tls.paths()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

fn build_http(tls: Option<&ClientTlsFiles>) -> Result<reqwest::Client, ClientError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        let config = tls.config().map_err(|e| ClientError::Tls(e.to_string()))?;
        b = b.use_preconfigured_tls(config).https_only(true);
    }
    b.build().map_err(|e| ClientError::Tls(e.to_string()))
}

/// Deadline of every request but the watch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a watch's answer to start (its headers); the stream itself
/// has none, the node reconnects after a silence.
const WATCH_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read: a lease list of 100,000 nodes is about 60 MiB.
/// A controller (or whoever stands in for one) cannot make a client hold
/// more.
pub const MAX_BODY: usize = 128 << 20;
/// The largest watch line: one lease and its metadata is under 2 KiB.
pub const MAX_WATCH_LINE: usize = 256 << 10;

/// Reads `resp`'s body, refusing more than `limit` bytes.
async fn capped_body(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<bytes::Bytes, ClientErrorKind> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ClientErrorKind::TooLarge(limit));
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(ClientErrorKind::Transport)? {
        if buf.len() + chunk.len() > limit {
            return Err(ClientErrorKind::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// How reading a body failed.
enum ClientErrorKind {
    Transport(reqwest::Error),
    TooLarge(usize),
}

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
    /// A plain-HTTP client for `base`, e.g. `http://127.0.0.1:7070`.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_tls(base, None)
    }

    /// A client for `base`: `https://...` with `tls` (the CA that signed the
    /// controller's certificate, and this client's certificate), or
    /// `http://...` without. Mixing them is an error: TLS files with an
    /// `http://` URL would send the credentials' holder's requests in the
    /// clear.
    pub fn with_tls(base: &str, tls: Option<ClientTlsFiles>) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        let scheme_ok = match (base.split_once("://"), &tls) {
            (Some(("http", host)), None) | (Some(("https", host)), Some(_)) => !host.is_empty(),
            (Some(("https", _)), None) => {
                return Err(ClientError::Tls(format!(
                    "{base} is HTTPS: give the controller's CA with --ca-file (and this \
                     client's --cert-file and --key-file)"
                )))
            }
            (Some(("http", _)), Some(_)) => {
                return Err(ClientError::Tls(format!(
                    "TLS files are given but {base} is plain HTTP; use https://"
                )))
            }
            _ => false,
        };
        if !scheme_ok {
            return Err(ClientError::BadUrl(base));
        }
        let client = build_http(tls.as_ref())?;
        let stamp = tls.as_ref().map(stamps).unwrap_or_default();
        let state = HttpState {
            client,
            stamp,
            failed: None,
            checked: Instant::now(),
        };
        Ok(ControllerClient {
            base,
            http: Arc::new(Http {
                tls,
                state: Mutex::new(state),
            }),
        })
    }

    /// The HTTP client for the next request; rebuilt first when the TLS
    /// files changed (looked at most once a second). Files that do not load
    /// (a rotation half written) keep the previous client, with a warning.
    fn http(&self) -> reqwest::Client {
        let mut st = self.http.state.lock().expect("client state lock");
        if let Some(tls) = &self.http.tls {
            if st.checked.elapsed() >= TLS_CHECK_INTERVAL {
                st.checked = Instant::now();
                let now = stamps(tls);
                if now != st.stamp && st.failed.as_ref() != Some(&now) {
                    match build_http(Some(tls)) {
                        Ok(client) => {
                            tracing::info!(
                                cert = ?tls.cert,
                                "TLS files changed: new connections use them"
                            );
                            st.client = client;
                            st.stamp = now;
                            st.failed = None;
                        }
                        Err(e) => {
                            tracing::warn!(
                                "TLS files changed but do not load ({e}); keeping the previous ones"
                            );
                            st.failed = Some(now);
                        }
                    }
                }
            }
        }
        st.client.clone()
    }

    /// The controller URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn body_err(&self, e: ClientErrorKind) -> ClientError {
        match e {
            ClientErrorKind::Transport(e) => self.connect_err(e),
            ClientErrorKind::TooLarge(n) => {
                ClientError::Decode(format!("the answer is larger than {n} bytes; not read"))
            }
        }
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
        let bytes = capped_body(resp, MAX_BODY)
            .await
            .map_err(|e| self.body_err(e))?;
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
        self.send(self.http().put(url).json(req)).await
    }

    /// Renews the node's lease.
    pub async fn renew(&self, node: &str) -> Result<LeaseResponse, ClientError> {
        let url = format!("{}/v1/leases/{}/renew", self.base, segment(node));
        self.send(self.http().post(url)).await
    }

    /// Releases every lease the node holds.
    pub async fn release(&self, node: &str) -> Result<ReleaseResponse, ClientError> {
        let url = format!("{}/v1/leases/{}", self.base, segment(node));
        self.send(self.http().delete(url)).await
    }

    /// Lists leases; `with_ttl` also asks etcd for the time left on each.
    pub async fn list(&self, with_ttl: bool) -> Result<LeaseList, ClientError> {
        let url = format!("{}/v1/leases?with_ttl={with_ttl}", self.base);
        self.send(self.http().get(url)).await
    }

    /// Reserves a subnet for a node.
    pub async fn reserve(&self, subnet: &str, node: &str) -> Result<LeaseView, ClientError> {
        let url = format!("{}/v1/reservations", self.base);
        let body = ReserveRequest {
            subnet: subnet.to_string(),
            node_name: node.to_string(),
        };
        self.send(self.http().post(url).json(&body)).await
    }

    /// The stored network config.
    pub async fn network(&self) -> Result<NetworkView, ClientError> {
        self.send(self.http().get(format!("{}/v1/network", self.base)))
            .await
    }

    /// Validates and stores a network config.
    pub async fn set_network(&self, text: &str) -> Result<NetworkView, ClientError> {
        let req = self
            .http()
            .put(format!("{}/v1/network", self.base))
            .header("content-type", "application/json")
            .body(text.to_string());
        self.send(req).await
    }

    /// Readiness and counts; answered also when not ready.
    pub async fn readiness(&self) -> Result<Readiness, ClientError> {
        let (_, bytes) = self
            .raw(
                self.http().get(format!("{}/readyz", self.base)),
                Some(REQUEST_TIMEOUT),
            )
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The Prometheus metrics text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (status, bytes) = self
            .raw(
                self.http().get(format!("{}/metrics", self.base)),
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
        let resp = tokio::time::timeout(WATCH_START_TIMEOUT, self.http().get(url).send())
            .await
            .map_err(|_| ClientError::Connect {
                url: self.base.clone(),
                reason: format!("no answer to the watch within {WATCH_START_TIMEOUT:?}"),
            })?
            .map_err(|e| self.connect_err(e))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = capped_body(resp, 64 << 10)
                .await
                .map_err(|e| self.body_err(e))?;
            return Err(api_error(status, &bytes));
        }
        let client = self.clone();
        let bytes = resp.bytes_stream().boxed();
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
                    if buf.len() > MAX_WATCH_LINE {
                        // A line this long is no lease: end the stream (the
                        // node reconnects and lists again).
                        let e = ClientError::Decode(format!(
                            "watch line longer than {MAX_WATCH_LINE} bytes"
                        ));
                        buf.clear();
                        return Some((Err(e), (futures::stream::empty().boxed(), buf, client)));
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
        assert!(ControllerClient::new("http://").is_err());
        let tls = ClientTlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: None,
            key: None,
        };
        let e = ControllerClient::with_tls("http://127.0.0.1:7070", Some(tls.clone())).unwrap_err();
        assert!(e.to_string().contains("use https://"), "{e}");
        let e = ControllerClient::with_tls("https://127.0.0.1:7070", Some(tls)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = ControllerClient::new("https://127.0.0.1:7070").unwrap_err();
        assert!(e.to_string().contains("--ca-file"), "{e}");
    }
}
