//! An HTTP(S) client for the controller API, used by `weftctl`, `weft-node`
//! and the benchmarks.

use crate::api::{
    AcquireRequest, AddName, ApiError, LeaseList, LeaseResponse, LeaseView, NameEvent, NameList,
    NameView, NetworkView, NodeNames, NodeNamesResult, Readiness, ReleaseResponse, RemovedName,
    ReserveRequest, WatchEvent,
};
use crate::tls::ClientTlsFiles;
use bytes::{Buf, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The lines of a names watch, as they arrive.
pub type NameLines = BoxStream<'static, Result<NameEvent, ClientError>>;

/// Client for the controller: one URL, or several replicas of it. Cheap to
/// clone (clones share the connection pool, the TLS files' state and which
/// replica answered last).
///
/// With several URLs a request goes to the replica that answered last; when
/// that one cannot be reached, does not answer in time, or answers that it
/// is not able to serve (502, 503, 504), the next one is tried, and so on
/// once round. Any other answer (a 403, a 409) is final: every replica
/// would give it.
#[derive(Debug, Clone)]
pub struct ControllerClient {
    bases: Arc<[String]>,
    /// Index into `bases` of the replica to try first.
    current: Arc<AtomicUsize>,
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
/// Deadline of one attempt (a request, a watch's start) when there are
/// other replicas to try.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(10);
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
    ///
    /// `urls` may list several replicas, separated by commas
    /// (`https://a:7070,https://b:7070`); all must use the same scheme.
    pub fn with_tls(urls: &str, tls: Option<ClientTlsFiles>) -> Result<Self, ClientError> {
        let mut bases: Vec<String> = Vec::new();
        for url in urls.split(',').map(str::trim) {
            let base = check_url(url, tls.is_some())?;
            if !bases.contains(&base) {
                bases.push(base);
            }
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
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            http: Arc::new(Http {
                tls,
                state: Mutex::new(state),
            }),
        })
    }

    /// Starts with the replica `key` hashes to (a node's name), so that
    /// nodes spread over the replicas instead of all using the first.
    pub fn spread(self, key: &str) -> Self {
        // FNV-1a: stable across runs and builds, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let n = self.bases.len() as u64;
        self.current.store((h % n) as usize, Ordering::Relaxed);
        self
    }
}

/// Checks one controller URL against the TLS settings; the URL without a
/// trailing slash.
fn check_url(url: &str, tls: bool) -> Result<String, ClientError> {
    let base = url.trim_end_matches('/').to_string();
    {
        let scheme_ok = match (base.split_once("://"), tls) {
            (Some(("http", host)), false) | (Some(("https", host)), true) => {
                !host.is_empty() && !host.contains('/')
            }
            (Some(("https", _)), false) => {
                return Err(ClientError::Tls(format!(
                    "{base} is HTTPS: give the controller's CA with --ca-file (and this \
                     client's --cert-file and --key-file)"
                )))
            }
            (Some(("http", _)), true) => {
                return Err(ClientError::Tls(format!(
                    "TLS files are given but {base} is plain HTTP; use https://"
                )))
            }
            _ => false,
        };
        if !scheme_ok {
            return Err(ClientError::BadUrl(base));
        }
    }
    Ok(base)
}

/// Whether another replica may answer where this one failed: it could not
/// be reached or did not answer in time, or said it cannot serve now.
fn try_another(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } => true,
        ClientError::Api { status, .. } => matches!(status, 502..=504),
        _ => false,
    }
}

impl ControllerClient {
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

    /// The controller URL: the replica requests go to first (the one
    /// that answered last).
    pub fn url(&self) -> &str {
        &self.bases[self.first()]
    }

    /// Every replica's URL, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.bases
    }

    fn first(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.bases.len()
    }

    /// The deadline of one attempt: with replicas to fall back on, a
    /// replica that hangs (stopped, overloaded) is given up on sooner.
    fn attempt_timeout(&self, alone: Duration) -> Duration {
        if self.bases.len() > 1 {
            alone.min(FAILOVER_TIMEOUT)
        } else {
            alone
        }
    }

    fn body_err(base: &str, e: ClientErrorKind) -> ClientError {
        match e {
            ClientErrorKind::Transport(e) => Self::connect_err(base, e),
            ClientErrorKind::TooLarge(n) => {
                ClientError::Decode(format!("the answer is larger than {n} bytes; not read"))
            }
        }
    }

    fn connect_err(base: &str, e: reqwest::Error) -> ClientError {
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            src = s.source();
        }
        ClientError::Connect {
            url: base.to_string(),
            reason,
        }
    }

    /// Runs `attempt` against one replica after another, from the one that
    /// answered last, until one answers with something other than "cannot
    /// serve" (see [`ControllerClient`]); that one is tried first next time.
    /// `attempt` returns its result and, when another replica should be
    /// asked, why. The last replica's result is returned as it is.
    async fn over_replicas<T, F, Fut>(&self, attempt: F) -> Result<T, ClientError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = (Result<T, ClientError>, Option<String>)>,
    {
        let n = self.bases.len();
        let first = self.first();
        let mut tried = 0;
        loop {
            let i = (first + tried) % n;
            let base = &self.bases[i];
            tried += 1;
            let (result, retry) = attempt(base.clone()).await;
            match retry {
                Some(why) if tried < n => {
                    tracing::warn!(
                        controller = %base,
                        next = %self.bases[(first + tried) % n],
                        "controller replica failed ({why}); trying the next one"
                    );
                }
                _ => {
                    if retry.is_none() && result.is_ok() && i != first {
                        self.current.store(i, Ordering::Relaxed);
                        tracing::info!(controller = %base, "using this controller replica");
                    }
                    return result;
                }
            }
        }
    }

    /// Sends a request for `path` over the replicas ([`Self::over_replicas`]):
    /// the status and body of the answer, or the last failure.
    async fn exchange(
        &self,
        path: &str,
        make: impl Fn(reqwest::Client, String) -> reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes), ClientError> {
        let timeout = self.attempt_timeout(REQUEST_TIMEOUT);
        self.over_replicas(|base| {
            let req = make(self.http(), format!("{base}{path}")).timeout(timeout);
            async move {
                let answer = async {
                    let resp = req.send().await.map_err(|e| Self::connect_err(&base, e))?;
                    let status = resp.status();
                    let bytes = capped_body(resp, MAX_BODY)
                        .await
                        .map_err(|e| Self::body_err(&base, e))?;
                    Ok((status, bytes))
                }
                .await;
                let retry = match &answer {
                    Ok((status, bytes)) if (502..=504).contains(&status.as_u16()) => {
                        Some(api_error(*status, bytes).to_string())
                    }
                    Err(e) if try_another(e) => Some(e.to_string()),
                    Ok(_) | Err(_) => None,
                };
                (answer, retry)
            }
        })
        .await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        path: &str,
        make: impl Fn(reqwest::Client, String) -> reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.exchange(path, make).await?;
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
        let path = format!("/v1/leases/{}", segment(node));
        self.send(&path, |http, url| http.put(url).json(req)).await
    }

    /// Renews the node's lease.
    pub async fn renew(&self, node: &str) -> Result<LeaseResponse, ClientError> {
        let path = format!("/v1/leases/{}/renew", segment(node));
        self.send(&path, |http, url| http.post(url)).await
    }

    /// Releases every lease the node holds.
    pub async fn release(&self, node: &str) -> Result<ReleaseResponse, ClientError> {
        let path = format!("/v1/leases/{}", segment(node));
        self.send(&path, |http, url| http.delete(url)).await
    }

    /// Lists leases; `with_ttl` also asks etcd for the time left on each.
    pub async fn list(&self, with_ttl: bool) -> Result<LeaseList, ClientError> {
        let path = format!("/v1/leases?with_ttl={with_ttl}");
        self.send(&path, |http, url| http.get(url)).await
    }

    /// Reserves a subnet for a node. (Sent again to another replica after
    /// a failure, a reservation that the first one did make answers 409.)
    pub async fn reserve(&self, subnet: &str, node: &str) -> Result<LeaseView, ClientError> {
        let body = ReserveRequest {
            subnet: subnet.to_string(),
            node_name: node.to_string(),
        };
        self.send("/v1/reservations", |http, url| http.post(url).json(&body))
            .await
    }

    /// The stored network config.
    pub async fn network(&self) -> Result<NetworkView, ClientError> {
        self.send("/v1/network", |http, url| http.get(url)).await
    }

    /// Validates and stores a network config.
    pub async fn set_network(&self, text: &str) -> Result<NetworkView, ClientError> {
        self.send("/v1/network", |http, url| {
            http.put(url)
                .header("content-type", "application/json")
                .body(text.to_string())
        })
        .await
    }

    /// Readiness and counts; answered also when not ready. With replicas,
    /// a ready one's answer if any is ready.
    pub async fn readiness(&self) -> Result<Readiness, ClientError> {
        let (_, bytes) = self.exchange("/readyz", |http, url| http.get(url)).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The Prometheus metrics text (of the replica that answers).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (status, bytes) = self.exchange("/metrics", |http, url| http.get(url)).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Follows lease changes with a revision `>= from_revision`. A `410`
    /// answer means that revision is gone: list again and watch from there.
    /// The stream comes from one replica (tried in turn, as requests are);
    /// when it ends the caller watches again, maybe from another.
    pub async fn watch(&self, from_revision: i64) -> Result<WatchLines, ClientError> {
        self.ndjson(format!("/v1/leases/watch?from_revision={from_revision}"))
            .await
    }

    /// Makes the controller hold exactly these names for `node`'s
    /// containers.
    pub async fn sync_names(
        &self,
        node: &str,
        names: &NodeNames,
    ) -> Result<NodeNamesResult, ClientError> {
        let path = format!("/v1/leases/{}/names", segment(node));
        self.send(&path, |http, url| http.put(url).json(names))
            .await
    }

    /// Every name record.
    pub async fn list_names(&self) -> Result<NameList, ClientError> {
        self.send("/v1/names", |http, url| http.get(url)).await
    }

    /// Adds a name for something that is not a container (admins).
    pub async fn add_name(&self, req: &AddName) -> Result<NameView, ClientError> {
        self.send("/v1/names", |http, url| http.post(url).json(req))
            .await
    }

    /// Removes a name record (admins).
    pub async fn remove_name(
        &self,
        name: &weft_config::DnsName,
        address: std::net::IpAddr,
    ) -> Result<RemovedName, ClientError> {
        let path = format!("/v1/names/{name}/{}", segment(&address.to_string()));
        self.send(&path, |http, url| http.delete(url)).await
    }

    /// Follows name record changes with a revision `>= from_revision`, as
    /// [`Client::watch`] follows leases (`410`: list the names again).
    pub async fn watch_names(&self, from_revision: i64) -> Result<NameLines, ClientError> {
        self.ndjson(format!("/v1/names/watch?from_revision={from_revision}"))
            .await
    }

    /// An NDJSON stream of `T` from `path`.
    async fn ndjson<T: DeserializeOwned + Send + 'static>(
        &self,
        path: String,
    ) -> Result<BoxStream<'static, Result<T, ClientError>>, ClientError> {
        let timeout = self.attempt_timeout(WATCH_START_TIMEOUT);
        let (base, resp) = self
            .over_replicas(|base| {
                let url = format!("{base}{path}");
                let send = self.http().get(url).send();
                async move {
                    let started = match tokio::time::timeout(timeout, send).await {
                        Err(_) => Err(ClientError::Connect {
                            url: base.clone(),
                            reason: format!("no answer to the watch within {timeout:?}"),
                        }),
                        Ok(r) => r.map_err(|e| Self::connect_err(&base, e)),
                    };
                    let resp = match started {
                        Ok(resp) => resp,
                        Err(e) => {
                            let why = try_another(&e).then(|| e.to_string());
                            return (Err(e), why);
                        }
                    };
                    let status = resp.status();
                    if status.is_success() {
                        return (Ok((base, resp)), None);
                    }
                    let e = match capped_body(resp, 64 << 10).await {
                        Ok(bytes) => api_error(status, &bytes),
                        Err(e) => Self::body_err(&base, e),
                    };
                    let why = try_another(&e).then(|| e.to_string());
                    (Err(e), why)
                }
            })
            .await?;
        let bytes = resp.bytes_stream().boxed();
        let lines = futures::stream::unfold(
            (bytes, BytesMut::new(), base),
            |(mut bytes, mut buf, base)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line = buf.split_to(pos);
                        buf.advance(1);
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let item = serde_json::from_slice::<T>(&line)
                            .map_err(|e| ClientError::Decode(format!("watch line: {e}")));
                        return Some((item, (bytes, buf, base)));
                    }
                    if buf.len() > MAX_WATCH_LINE {
                        // A line this long is no lease: end the stream (the
                        // node reconnects and lists again).
                        let e = ClientError::Decode(format!(
                            "watch line longer than {MAX_WATCH_LINE} bytes"
                        ));
                        buf.clear();
                        return Some((Err(e), (futures::stream::empty().boxed(), buf, base)));
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            let e = Self::connect_err(&base, e);
                            return Some((Err(e), (bytes, buf, base)));
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
    use std::sync::atomic::AtomicU32;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stand-in controller on 127.0.0.1: answers every request with
    /// `status` and `body`, counting them.
    struct Fake {
        url: String,
        hits: Arc<AtomicU32>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Fake {
        async fn start(status: u16, body: &'static str) -> Fake {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let hits = Arc::new(AtomicU32::new(0));
            let counted = hits.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        return;
                    };
                    let counted = counted.clone();
                    tokio::spawn(async move {
                        let mut req = Vec::new();
                        let mut buf = [0u8; 4096];
                        // Headers only: the requests tested have no body
                        // or a small one in the same read.
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        counted.fetch_add(1, Ordering::SeqCst);
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(answer.as_bytes()).await;
                    });
                }
            });
            Fake { url, hits, task }
        }

        fn hits(&self) -> u32 {
            self.hits.load(Ordering::SeqCst)
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A replica that accepts connections and never answers (a stopped
    /// process: the kernel still completes the TCP handshake).
    async fn hanging() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        (url, task)
    }

    /// A loopback URL where nothing listens (connections are refused).
    async fn refused_url() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    const NETWORK: &str = r#"{"valid":true,"config":{"Network":"10.244.0.0/16"},"error":null,"raw":"{}","revision":1}"#;

    fn net_ok(r: Result<NetworkView, ClientError>) {
        if let Err(e) = r {
            panic!("expected an answer: {e}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_replica_is_skipped_and_the_one_that_answered_is_kept() {
        let down = refused_url().await;
        let up = Fake::start(200, NETWORK).await;
        let c = ControllerClient::new(&format!("{down}, {}/", up.url)).unwrap();
        assert_eq!(c.urls(), [down.clone(), up.url.clone()]);
        assert_eq!(c.url(), down);
        net_ok(c.network().await);
        assert_eq!(up.hits(), 1);
        assert_eq!(c.url(), up.url, "the replica that answered is tried first");
        // Clones share it.
        net_ok(c.clone().network().await);
        assert_eq!(up.hits(), 2);
    }

    #[tokio::test]
    async fn cannot_serve_answers_fail_over_and_other_answers_are_final() {
        let busy = Fake::start(503, r#"{"error":"not_ready","message":"etcd down"}"#).await;
        let up = Fake::start(200, NETWORK).await;
        let c = ControllerClient::new(&format!("{},{}", busy.url, up.url)).unwrap();
        net_ok(c.network().await);
        assert_eq!((busy.hits(), up.hits()), (1, 1));

        let denied = Fake::start(403, r#"{"error":"forbidden","message":"no"}"#).await;
        let c = ControllerClient::new(&format!("{},{}", denied.url, up.url)).unwrap();
        let e = c.network().await.unwrap_err();
        assert_eq!(e.status(), Some(403), "{e}");
        assert_eq!(up.hits(), 1, "a refusal is not asked of another replica");
        assert_eq!(c.url(), denied.url);
    }

    #[tokio::test]
    async fn when_every_replica_fails_the_last_failure_is_returned() {
        let busy = Fake::start(503, r#"{"error":"not_ready","message":"etcd down"}"#).await;
        let down = refused_url().await;
        let c = ControllerClient::new(&format!("{},{down}", busy.url)).unwrap();
        let e = c.network().await.unwrap_err();
        assert!(
            matches!(&e, ClientError::Connect { url, .. } if *url == down),
            "{e}"
        );
        let c = ControllerClient::new(&format!("{down},{}", busy.url)).unwrap();
        let e = c.network().await.unwrap_err();
        assert_eq!(e.status(), Some(503), "{e}");
        assert_eq!(c.url(), down, "no replica answered: the first stays first");
    }

    #[tokio::test]
    async fn a_replica_that_does_not_answer_is_given_up_after_the_failover_timeout() {
        let (stuck, task) = hanging().await;
        let up = Fake::start(200, NETWORK).await;
        let c = ControllerClient::new(&format!("{stuck},{}", up.url)).unwrap();
        let started = Instant::now();
        net_ok(c.network().await);
        let took = started.elapsed();
        assert!(took >= FAILOVER_TIMEOUT, "{took:?}");
        assert!(
            took < REQUEST_TIMEOUT,
            "not the single-controller deadline: {took:?}"
        );
        assert_eq!(c.url(), up.url);
        task.abort();
    }

    #[tokio::test]
    async fn a_watch_starts_on_the_next_replica() {
        let down = refused_url().await;
        let up = Fake::start(200, "").await;
        let c = ControllerClient::new(&format!("{down},{}", up.url)).unwrap();
        let mut lines = c.watch(5).await.unwrap();
        assert!(lines.next().await.is_none(), "the fake's stream is empty");
        assert_eq!(c.url(), up.url);
    }

    #[test]
    fn nodes_spread_over_replicas() {
        let urls = "http://10.0.0.1:7070,http://10.0.0.2:7070,http://10.0.0.3:7070";
        let mut used = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..300 {
            let c = ControllerClient::new(urls)
                .unwrap()
                .spread(&format!("node-{i}"));
            *used.entry(c.url().to_string()).or_default() += 1;
        }
        assert_eq!(used.len(), 3, "{used:?}");
        assert!(used.values().all(|&n| n > 60), "{used:?}");
        // The same name always starts on the same replica.
        let a = ControllerClient::new(urls).unwrap().spread("node-7");
        let b = ControllerClient::new(urls).unwrap().spread("node-7");
        assert_eq!(a.url(), b.url());
    }

    #[test]
    fn every_url_in_a_list_is_checked() {
        assert!(ControllerClient::new("http://a:1,http://b:2").is_ok());
        let e = ControllerClient::new("http://a:1,b:2").unwrap_err();
        assert!(matches!(e, ClientError::BadUrl(ref u) if u == "b:2"), "{e}");
        assert!(
            ControllerClient::new("http://a:1,").is_err(),
            "an empty entry"
        );
        let e = ControllerClient::new("http://a:1,https://b:2").unwrap_err();
        assert!(e.to_string().contains("--ca-file"), "{e}");
        let c = ControllerClient::new("http://a:1,http://a:1/").unwrap();
        assert_eq!(c.urls().len(), 1, "duplicates are one replica");
        assert!(
            ControllerClient::new("http://a:1/v1").is_err(),
            "a path is no controller URL"
        );
    }

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
