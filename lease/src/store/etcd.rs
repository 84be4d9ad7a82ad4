//! The etcd-backed [`LeaseStore`].
//!
//! Keys: `<prefix>/config` and `<prefix>/subnets/<subnet key>`, exactly as
//! flannel lays them out. A subnet is claimed by a transaction that succeeds
//! only if no key holds it yet (`create_revision == 0` over the range of keys
//! that start with its IPv4 part), so any number of writers can allocate at
//! once without double allocation.

use super::batch::{Batches, Expect, Outcome, Pending, Turn};
use super::decode::{add_to_snapshot, decode_delete, decode_entry, decode_put};
use super::{
    Claim, LeaseStore, NodeGuard, RequestCounts, Snapshot, StoreError, StoreResult, WatchBatch,
    WatchStream,
};
use crate::attrs::LeaseAttrs;
use crate::key::SubnetKey;
use crate::lease::{Lease, LeaseId};
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Reads the TLS files for etcd-client.
fn tls_options(tls: &EtcdTls) -> StoreResult<etcd_client::TlsOptions> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| StoreError::Other(format!("cannot read {}: {e}", p.display())))
    };
    let mut opts = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca {
        opts = opts.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            opts = opts.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Other(
                "--etcd-certfile and --etcd-keyfile go together".into(),
            ))
        }
    }
    Ok(opts)
}

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/weft/network` or flannel's `/coreos.com/network`.
    pub prefix: String,
    /// Deadline for each request.
    pub request_timeout: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// TLS to etcd (`https://` endpoints): its CA, and a client certificate
    /// when etcd runs with `--client-cert-auth`.
    pub tls: Option<EtcdTls>,
    /// User and password when etcd has authentication enabled.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdOptions {
    /// Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "<redacted>")))
            .finish()
    }
}

/// PEM files for TLS to etcd (flannel's `--etcd-cafile`, `--etcd-certfile`,
/// `--etcd-keyfile`).
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl EtcdOptions {
    /// Options with default timeouts (5 s per request, 3 s to connect).
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            tls: None,
            user: None,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    range: AtomicU64,
    txn: AtomicU64,
    put: AtomicU64,
    grant: AtomicU64,
    keep_alive: AtomicU64,
    time_to_live: AtomicU64,
    revoke: AtomicU64,
    watch: AtomicU64,
    other: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Lease store on a real etcd (v3 API).
#[derive(Clone)]
pub struct EtcdStore {
    conn: Arc<Conn>,
    prefix: String,
    endpoints: Vec<String>,
    counts: Arc<Counters>,
    batches: Arc<Batches>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// `first` and the messages of `source` and its sources, as one line;
/// tonic hides the useful part ("connection refused") in the sources.
fn chain(first: String, mut source: Option<&dyn std::error::Error>) -> String {
    let mut s = first;
    while let Some(c) = source {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        source = c.source();
    }
    s
}

/// One client per etcd endpoint, each made on first use: with a user,
/// making it authenticates, which needs etcd up and the password right;
/// until then every request fails with the reason (readiness and the log
/// show it) and the next one tries again.
///
/// Requests go to one endpoint, the one in use, and move to the next when
/// it cannot be reached (see [`EtcdStore::on_endpoint`]). etcd-client's own
/// balancing over several endpoints sends every request to a random one,
/// and a member that is down fails its share of them.
struct Conn {
    options: ConnectOptions,
    /// No new attempt on another endpoint starts after this.
    request_timeout: Duration,
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint in use.
    current: AtomicUsize,
}

struct Endpoint {
    url: String,
    /// When a request to it last failed: for a second after, requests try
    /// the others first.
    failed_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether its last request got an answer: failures and recoveries are
    /// logged when this changes, not per request.
    answering: std::sync::atomic::AtomicBool,
    client: tokio::sync::OnceCell<Client>,
    /// The last failure to make the client: requests fail fast with it for
    /// [`CONNECT_RETRY`] instead of each trying (and waiting) in turn.
    failed: std::sync::Mutex<Option<(std::time::Instant, StoreError)>>,
}

/// Where a new store starts among `n` endpoints: varies between processes
/// (and over time), so controllers started together spread over the
/// members.
fn spread_start(n: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    (nanos ^ std::process::id() as usize) % n
}

/// What the out-of-space error starts with (see [`map_err`]).
const NOSPACE: &str = "etcd is out of space";

/// Whether another endpoint may answer what this one could not: not when
/// the whole cluster says no (it is out of space, or our credentials are
/// wrong), only when this member cannot be reached or has no leader.
fn moves_on(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable(m) => {
            let d = m.to_ascii_lowercase();
            !(m.starts_with(NOSPACE)
                || d.contains("authentication failed")
                || d.contains("permission denied")
                || d.contains("user name is empty")
                || d.contains("token is not provided"))
        }
        _ => false,
    }
}

/// Whether a failed request surely never took effect, so sending it again
/// (to another endpoint) cannot apply it twice: it was never sent (no
/// connection), or the member refused it for want of a leader.
fn never_applied(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable(m) => {
            let m = m.to_ascii_lowercase();
            // tonic's wording for a connection that was never made, and
            // etcd's refusal before it looks at a request.
            ["tcp connect error", "error trying to connect"]
                .iter()
                .any(|s| m.contains(s))
                || m.contains("unavailable: etcdserver: no leader")
        }
        _ => false,
    }
}

/// How long a failure to connect (or authenticate) is answered from memory.
const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// The largest gRPC message read from etcd (reads and watch responses);
/// etcd's own default request limit is 1.5 MiB per value, so this is
/// about lists and transactions of many leases.
const MAX_MESSAGE: usize = 256 << 20;

/// What an operator can act on, for failures whose cause is buried in
/// TLS or gRPC details.
fn hint(detail: &str) -> Option<&'static str> {
    let d = detail.to_ascii_lowercase();
    if d.contains("unknownissuer") || d.contains("badsignature") {
        Some("etcd's certificate is not signed by the CA in --etcd-cafile")
    } else if d.contains("notvalidforname") {
        Some("etcd's certificate does not name the host of --etcd-endpoints")
    } else if d.contains("invalid peer certificate: expired") {
        Some("etcd's certificate has expired (or this host's clock is wrong)")
    } else if d.contains("certificaterequired")
        || d.contains("certificate required")
        || d.contains("badcertificate")
        || d.contains("unknownca")
        || d.contains("bad certificate")
    {
        Some(
            "etcd refused our client certificate: give --etcd-certfile and --etcd-keyfile \
             signed by etcd's --trusted-ca-file",
        )
    } else if d.contains("authentication failed") {
        Some("etcd authentication failed: check --etcd-username and --etcd-password")
    } else if d.contains("user name is empty") || d.contains("token is not provided") {
        Some("etcd has authentication enabled: give --etcd-username and --etcd-password")
    } else if d.contains("permission denied") {
        Some("the etcd user lacks permission: grant its role readwrite on the prefix")
    } else if d.contains("invalidcontenttype") || d.contains("corrupt message") {
        Some("is that an https:// etcd endpoint given as http://?")
    } else {
        None
    }
}

fn with_hint(detail: String) -> String {
    match hint(&detail) {
        Some(h) => format!("{h} ({detail})"),
        None => detail,
    }
}

fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    match &e {
        E::GRpcStatus(s) => match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                use std::error::Error as _;
                StoreError::Unavailable(with_hint(format!(
                    "{}: {}",
                    s.code(),
                    chain(s.message().to_string(), s.source())
                )))
            }
            Code::NotFound => StoreError::NotFound(s.message().to_string()),
            // Nothing can be written until an operator acts; readers and
            // renewals still work, and a node retries later.
            Code::ResourceExhausted if s.message().contains("space exceeded") => {
                StoreError::Unavailable(format!(
                    "{NOSPACE} (its NOSPACE alarm is raised, nothing can be written): \
                     compact its history, defragment every member and disarm the alarm \
                     (etcdctl compact, etcdctl defrag, etcdctl alarm disarm), or raise \
                     --quota-backend-bytes ({})",
                    s.message()
                ))
            }
            // Wrong password, no user, no permission: etcd is there, but
            // nothing works until the credentials are fixed.
            Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated
                if hint(s.message()).is_some() =>
            {
                StoreError::Unavailable(with_hint(format!("{}: {}", s.code(), s.message())))
            }
            _ => StoreError::Other(format!("{}: {}", s.code(), s.message())),
        },
        E::TransportError(_) | E::IoError(_) => StoreError::Unavailable(with_hint(chain(
            e.to_string(),
            std::error::Error::source(&e),
        ))),
        E::LeaseKeepAliveError(m) if m.contains("not found") => StoreError::NotFound(m.clone()),
        E::LeaseKeepAliveError(_) | E::WatchError(_) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Other(chain(e.to_string(), std::error::Error::source(&e))),
    }
}

fn compacted_in(e: &StoreError) -> bool {
    matches!(e, StoreError::Other(m) if m.contains("compacted"))
}

impl EtcdStore {
    /// Creates a client. Connection is lazy: this succeeds while etcd is
    /// down (or refuses our credentials), and requests fail with
    /// `Unavailable` and the reason until it is up. Settings that cannot
    /// work (a TLS file that does not load, TLS with http://) fail here.
    pub async fn connect(opts: EtcdOptions) -> StoreResult<Self> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Other("no etcd endpoints given".into()));
        }
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') || prefix.len() < 2 {
            return Err(StoreError::Other(format!(
                "etcd prefix {:?} must start with '/' and name a directory, e.g. /weft/network",
                opts.prefix
            )));
        }
        for e in &opts.endpoints {
            let ok = match e.split_once("://") {
                Some(("http" | "https", rest)) => {
                    !rest.is_empty() && !rest.contains(char::is_whitespace)
                }
                _ => false,
            };
            if !ok {
                return Err(StoreError::Other(format!(
                    "etcd endpoint {e:?} is not http(s)://HOST:PORT"
                )));
            }
        }
        let https = opts
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https != 0 && https != opts.endpoints.len() {
            return Err(StoreError::Other(
                "etcd endpoints mix http:// and https://".into(),
            ));
        }
        let mut connect = ConnectOptions::new()
            .with_timeout(opts.request_timeout)
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        match (&opts.tls, https > 0) {
            // Without a CA nothing would be trusted (no system roots here).
            (Some(tls), true) if tls.ca.is_none() => {
                return Err(StoreError::Other(
                    "https:// etcd endpoints need --etcd-cafile (the CA of etcd's certificate)"
                        .into(),
                ))
            }
            (Some(tls), true) => connect = connect.with_tls(tls_options(tls)?),
            (Some(_), false) => {
                return Err(StoreError::Other(
                    "--etcd-cafile, --etcd-certfile and --etcd-keyfile need https:// endpoints"
                        .into(),
                ))
            }
            (None, true) => {
                return Err(StoreError::Other(
                    "https:// etcd endpoints need --etcd-cafile (the CA of etcd's certificate)"
                        .into(),
                ))
            }
            (None, false) => {}
        }
        let authenticated = opts.user.is_some();
        if let Some((user, password)) = &opts.user {
            if user.is_empty() {
                return Err(StoreError::Other("--etcd-username is empty".into()));
            }
            connect = connect
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let count = opts.endpoints.len();
        let store = EtcdStore {
            conn: Arc::new(Conn {
                options: connect,
                request_timeout: opts.request_timeout,
                endpoints: opts
                    .endpoints
                    .iter()
                    .map(|url| Endpoint {
                        url: url.clone(),
                        failed_at: std::sync::Mutex::new(None),
                        answering: std::sync::atomic::AtomicBool::new(true),
                        client: tokio::sync::OnceCell::new(),
                        failed: std::sync::Mutex::new(None),
                    })
                    .collect(),
                // Controllers started together spread over the members.
                current: AtomicUsize::new(spread_start(count)),
            }),
            prefix,
            endpoints: opts.endpoints,
            counts: Arc::default(),
            batches: Arc::default(),
        };
        // Without a user, making a client does no I/O: a bad setting shows
        // here. With one it authenticates, which waits for etcd: the first
        // request does that.
        if !authenticated {
            for i in 0..count {
                store.client_at(i).await?;
            }
        }
        Ok(store)
    }

    /// Endpoint `i`'s client; made (and authenticated) on first use.
    async fn client_at(&self, i: usize) -> StoreResult<&Client> {
        let ep = &self.conn.endpoints[i];
        if let Some(c) = ep.client.get() {
            return Ok(c);
        }
        if let Some((at, e)) = &*ep.failed.lock().expect("etcd connect lock") {
            if at.elapsed() < CONNECT_RETRY {
                return Err(e.clone());
            }
        }
        let made = ep
            .client
            .get_or_try_init(|| async {
                // Requests queued behind a failed attempt fail with its
                // error instead of each trying (and waiting) again.
                if let Some((at, e)) = &*ep.failed.lock().expect("etcd connect lock") {
                    if at.elapsed() < CONNECT_RETRY {
                        return Err(e.clone());
                    }
                }
                Client::connect([&ep.url], Some(self.conn.options.clone()))
                    .await
                    .map_err(map_err)
            })
            .await;
        if let Err(e) = &made {
            *ep.failed.lock().expect("etcd connect lock") =
                Some((std::time::Instant::now(), e.clone()));
        }
        made
    }

    /// Endpoint `i` failed: the next request goes to the one after it
    /// (unless another request has moved on already).
    fn endpoint_failed(&self, i: usize, e: &StoreError) {
        let n = self.conn.endpoints.len();
        let ep = &self.conn.endpoints[i];
        *ep.failed_at.lock().expect("endpoint lock") = Some(std::time::Instant::now());
        let was_answering = ep.answering.swap(false, Ordering::Relaxed);
        let moved = n > 1
            && self
                .conn
                .current
                .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if was_answering && moved {
            tracing::warn!(
                "etcd endpoint {} failed ({e}); using {} from now on",
                ep.url,
                self.conn.endpoints[(i + 1) % n].url
            );
        }
    }

    /// Endpoint `i` answered.
    fn endpoint_answered(&self, i: usize) {
        let ep = &self.conn.endpoints[i];
        if !ep.answering.swap(true, Ordering::Relaxed) && self.conn.endpoints.len() > 1 {
            tracing::info!("etcd endpoint {} answers again", ep.url);
        }
    }

    /// Whether endpoint `i` failed less than [`CONNECT_RETRY`] ago.
    fn failed_lately(&self, i: usize) -> bool {
        self.conn.endpoints[i]
            .failed_at
            .lock()
            .expect("endpoint lock")
            .is_some_and(|at| at.elapsed() < CONNECT_RETRY)
    }

    /// Runs `op` with the client of the endpoint in use. When that endpoint
    /// cannot be reached, the store moves to the next one for good, and
    /// `op` is tried there too if that is safe: `repeatable` (a read, a
    /// keep-alive: doing it twice changes nothing) or the failed attempt
    /// surely never took effect. Every endpoint is tried at most once,
    /// those that failed within the last second only when no other is
    /// left, and no new attempt starts after the request timeout.
    async fn on_endpoint<T, F, Fut>(&self, repeatable: bool, op: F) -> StoreResult<T>
    where
        F: Fn(usize, &Client) -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let n = self.conn.endpoints.len();
        let first = self.conn.current.load(Ordering::Relaxed) % n;
        let started = std::time::Instant::now();
        // Those that failed lately go last.
        let mut order: Vec<usize> = (0..n).map(|k| (first + k) % n).collect();
        order.sort_by_key(|i| self.failed_lately(*i));
        let mut last = None;
        for (tried, i) in order.into_iter().enumerate() {
            if tried > 0 && started.elapsed() >= self.conn.request_timeout {
                break;
            }
            let result = match self.client_at(i).await {
                Ok(c) => op(i, c).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if moves_on(&e) => {
                    self.endpoint_failed(i, &e);
                    let again = repeatable || never_applied(&e);
                    last = Some(e);
                    if !again {
                        break;
                    }
                }
                other => {
                    self.endpoint_answered(i);
                    return other;
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Unavailable("no etcd endpoint answered".into())))
    }

    /// The key prefix in use (no trailing slash).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full(&self, rel: &str) -> String {
        format!("{}/{}", self.prefix, rel)
    }

    fn subnet_full(&self, key: &SubnetKey) -> String {
        self.full(&format!("{}{}", super::subnets_prefix(), key))
    }

    /// The key range holding `key`'s subnets: every key holding its IPv4
    /// subnet starts with its part and is either exactly it or continues
    /// with '&'; '\'' is the byte after '&', so the range covers exactly
    /// those keys. An IPv6-only key is held only by itself.
    fn holders(&self, key: &SubnetKey) -> (String, String) {
        holder_range(&self.prefix, key)
    }

    fn rel<'a>(&self, full: &'a [u8]) -> Option<&'a str> {
        let s = std::str::from_utf8(full).ok()?;
        s.strip_prefix(&self.prefix)?.strip_prefix('/')
    }

    async fn read(&self, revision: Option<i64>) -> StoreResult<Snapshot> {
        if let Some(r) = revision.filter(|r| *r < 1) {
            // etcd reads revision 0 as "latest"; we mean "before anything",
            // which is empty unless history has been compacted away.
            bump(&self.counts.range);
            let probe = GetOptions::new()
                .with_prefix()
                .with_revision(1)
                .with_limit(1)
                .with_keys_only();
            let key = self.full("");
            return match self
                .on_endpoint(true, |_, c| {
                    let (key, probe, mut kv) = (key.clone(), probe.clone(), kv(c));
                    async move { kv.get(key, Some(probe)).await.map_err(map_err) }
                })
                .await
            {
                Ok(_) => Ok(Snapshot::default()),
                Err(e) if compacted_in(&e) => Err(StoreError::Compacted {
                    requested: r,
                    compacted: 0,
                }),
                Err(e) => Err(e),
            };
        }
        bump(&self.counts.range);
        let mut opts = GetOptions::new().with_prefix();
        if let Some(r) = revision {
            opts = opts.with_revision(r);
        }
        let key = self.full("");
        let resp = self
            .on_endpoint(true, |_, c| {
                let (key, opts, mut kv) = (key.clone(), opts.clone(), kv(c));
                async move { kv.get(key, Some(opts)).await.map_err(map_err) }
            })
            .await
            .map_err(|e| match (revision, compacted_in(&e)) {
                // etcd does not say how far it compacted; 0 means unknown.
                (Some(requested), true) => StoreError::Compacted {
                    requested,
                    compacted: 0,
                },
                _ => e,
            })?;
        let mut snap = Snapshot {
            revision: revision.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision())),
            ..Snapshot::default()
        };
        for kv in resp.kvs() {
            let Some(rel) = self.rel(kv.key()) else {
                continue;
            };
            let entry = decode_entry(
                rel,
                kv.value(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.lease(),
            );
            add_to_snapshot(&mut snap, entry, kv.mod_revision());
        }
        Ok(snap)
    }

    /// Sends a transaction: once, unless it surely never took effect (a
    /// compare-and-set sent twice could report its own first write as a
    /// conflict).
    async fn txn(&self, txn: Txn) -> StoreResult<etcd_client::TxnResponse> {
        self.on_endpoint(false, |_, c| {
            let (txn, mut kv) = (txn.clone(), kv(c));
            async move { kv.txn(txn).await.map_err(map_err) }
        })
        .await
    }

    /// Sends one claim in a transaction of its own, which reads back what
    /// stopped it; the revision it was applied at.
    async fn claim_alone(&self, pending: Pending) -> StoreResult<i64> {
        bump(&self.counts.txn);
        let Pending {
            expect,
            range: (start, end),
            node,
            compares,
            puts,
        } = pending;
        let txn = Txn::new().when(compares).and_then(puts).or_else([
            TxnOp::get(self.full(super::config_key()), Some(keys_only())),
            TxnOp::get(start, Some(count_of(end))),
            TxnOp::get(node, None),
        ]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            return Ok(header_rev(resp.header()));
        }
        let (config, mut claims) = compares_read(&resp, 1)
            .map_err(|e| StoreError::Other(format!("claiming {}: {e}", expect.key)))?;
        let (holders, node) = claims.pop().unwrap_or_default();
        Err(expect.verdict(config, holders, node).unwrap_or_else(|| {
            StoreError::Other(format!(
                "claiming {}: etcd refused the transaction, but what its compares read holds",
                expect.key
            ))
        }))
    }

    /// Sends waiting claims in batches until none waits, then gives its
    /// slot back (see [`BatchTask`]).
    async fn send_batches(&self) {
        loop {
            let batch = self.batches.next();
            if batch.is_empty() {
                return;
            }
            let n = batch.len();
            let mut compares = Vec::with_capacity(3 * n);
            let mut puts = Vec::with_capacity(2 * n);
            let mut reads = Vec::with_capacity(1 + 2 * n);
            let mut waiting = Vec::with_capacity(n);
            reads.push(TxnOp::get(
                self.full(super::config_key()),
                Some(keys_only()),
            ));
            for q in batch {
                let Pending {
                    expect,
                    range: (start, end),
                    node,
                    compares: c,
                    puts: p,
                } = q.claim;
                compares.extend(c);
                puts.extend(p);
                reads.push(TxnOp::get(start, Some(count_of(end))));
                reads.push(TxnOp::get(node, None));
                waiting.push((expect, q.done));
            }
            bump(&self.counts.txn);
            let txn = Txn::new().when(compares).and_then(puts).or_else(reads);
            let outcomes: Vec<Outcome> = match self.txn(txn).await {
                Ok(resp) if resp.succeeded() => {
                    let rev = header_rev(resp.header());
                    waiting.iter().map(|_| Outcome::Committed(rev)).collect()
                }
                Ok(resp) => match compares_read(&resp, n) {
                    Ok((config, claims)) => waiting
                        .iter()
                        .zip(claims)
                        .map(|((expect, _), (holders, node))| {
                            match expect.verdict(config, holders, node) {
                                Some(why) => Outcome::Refused(why),
                                None => Outcome::Again,
                            }
                        })
                        .collect(),
                    Err(e) => {
                        tracing::warn!(claims = n, error = %e, "could not read why etcd refused a batch of claims; sending each alone");
                        waiting.iter().map(|_| Outcome::Alone).collect()
                    }
                },
                Err(e) if refused_before_apply(&e) => {
                    let smaller = too_large(&e).then(|| self.batches.too_large(n));
                    if self.batches.warn_now() || smaller.is_some() {
                        tracing::warn!(claims = n, error = %e, smaller, "etcd refused a batch of claims; sending each alone");
                    }
                    waiting.iter().map(|_| Outcome::Alone).collect()
                }
                Err(e) => {
                    // Applied or not: etcd did not say.
                    if matches!(e, StoreError::Unavailable(_)) {
                        self.batches.release_all();
                    }
                    waiting.iter().map(|_| Outcome::Failed(e.clone())).collect()
                }
            };
            for ((_, done), outcome) in waiting.into_iter().zip(outcomes) {
                let _ = done.send(outcome);
            }
        }
    }

    /// After a failed compare-and-set, tells "gone" from "changed".
    fn cas_failure(resp: &etcd_client::TxnResponse, what: String) -> StoreError {
        let gone = resp
            .op_responses()
            .iter()
            .any(|r| matches!(r, TxnOpResponse::Get(g) if g.kvs().is_empty()));
        if gone {
            StoreError::NotFound(what)
        } else {
            StoreError::Conflict(what)
        }
    }
}

/// A claim's transaction (see [`LeaseStore::claim`]), under `prefix`.
fn claim_pending(prefix: &str, claim: &Claim<'_>) -> Pending {
    let full = |rel: &str| format!("{prefix}/{rel}");
    let subnet = full(&format!("{}{}", super::subnets_prefix(), claim.key));
    let node = full(&super::node_key(claim.node));
    let (start, end) = holder_range(prefix, claim.key);
    // Batches rely on it: a claim writes inside its own range only.
    debug_assert!(start <= subnet && subnet < end && !(start <= node && node < end));
    let node_cmp = match claim.guard {
        NodeGuard::Absent => Compare::version(node.clone(), CompareOp::Equal, 0),
        NodeGuard::At(rev) => Compare::mod_revision(node.clone(), CompareOp::Equal, rev),
    };
    let put = || Some(PutOptions::new().with_lease(claim.lease.0));
    Pending {
        expect: Expect {
            key: *claim.key,
            config_revision: claim.config_revision,
            guard: claim.guard,
        },
        compares: [
            Compare::mod_revision(
                full(super::config_key()),
                CompareOp::Equal,
                claim.config_revision,
            ),
            Compare::create_revision(start.clone(), CompareOp::Equal, 0).with_range(end.clone()),
            node_cmp,
        ],
        puts: [
            TxnOp::put(subnet, claim.attrs.to_json(), put()),
            TxnOp::put(node.clone(), claim.key.to_string(), put()),
        ],
        range: (start, end),
        node,
    }
}

/// The key range holding `key`'s subnets under `prefix`: every key holding
/// its IPv4 subnet starts with its part and is either exactly it or
/// continues with '&'; '\'' is the byte after '&', so the range covers
/// exactly those keys. An IPv6-only key is held only by itself.
fn holder_range(prefix: &str, key: &SubnetKey) -> (String, String) {
    match key.ipv4_part() {
        Some(part) => {
            let start = format!("{prefix}/{}{part}", super::subnets_prefix());
            let end = format!("{start}'");
            (start, end)
        }
        None => {
            let full = format!("{prefix}/{}{key}", super::subnets_prefix());
            let mut end = full.clone().into_bytes();
            end.push(0);
            (full, String::from_utf8(end).unwrap_or_default())
        }
    }
}

fn keys_only() -> GetOptions {
    GetOptions::new().with_keys_only()
}

fn count_of(end: String) -> GetOptions {
    GetOptions::new().with_range(end).with_count_only()
}

/// What the compares of `n` claims read, from a failed claim transaction's
/// reads: the config key's revision (0 when gone), then for each claim the
/// count of keys holding its subnet and its node's guard key (value and
/// revision).
#[allow(clippy::type_complexity)]
fn compares_read(
    resp: &etcd_client::TxnResponse,
    n: usize,
) -> Result<(i64, Vec<(i64, Option<(String, i64)>)>), String> {
    let gets: Vec<_> = resp
        .op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect();
    if gets.len() != 1 + 2 * n {
        return Err(format!(
            "etcd answered a failed transaction with {} reads, not {}",
            gets.len(),
            1 + 2 * n
        ));
    }
    let config = gets[0].kvs().first().map_or(0, |kv| kv.mod_revision());
    let claims = gets[1..]
        .chunks(2)
        .map(|pair| {
            let node = pair[1].kvs().first().map(|kv| {
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                )
            });
            (pair[0].count(), node)
        })
        .collect();
    Ok((config, claims))
}

/// Whether etcd refused a transaction before applying any of it: an etcd
/// lease it names is gone, or it is too large or malformed. Anything else
/// (a broken connection, an overloaded server) may have been applied.
fn refused_before_apply(e: &StoreError) -> bool {
    match e {
        StoreError::NotFound(_) => true,
        StoreError::Other(m) => too_large(e) || m.contains("duplicate key given in txn request"),
        _ => false,
    }
}

/// Whether etcd said a transaction was too large (its `--max-txn-ops` or
/// `--max-request-bytes`).
fn too_large(e: &StoreError) -> bool {
    matches!(e, StoreError::Other(m) if [
        "too many operations in txn request",
        "request is too large",
        "larger than max",
    ]
    .iter()
    .any(|s| m.contains(s)))
}

/// A direct claim's slot, given back when it is dropped; claims that wait
/// then go in batches, from a task of their own.
struct Slot<'a>(&'a EtcdStore);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.0.batches.leave() {
            BatchTask::spawn(self.0);
        }
    }
}

/// A task sending batches on a slot it holds. Dropped after it ran, it
/// gives the slot back (or starts the next task if claims came meanwhile);
/// dropped before it ever ran (the runtime is going away), it lets the
/// waiting claims go alone.
struct BatchTask {
    store: EtcdStore,
    ran: bool,
}

impl BatchTask {
    fn spawn(store: &EtcdStore) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let task = BatchTask {
                    store: store.clone(),
                    ran: false,
                };
                rt.spawn(task.run());
            }
            Err(_) => store.batches.abandon(),
        }
    }

    async fn run(mut self) {
        self.ran = true;
        self.store.send_batches().await;
    }
}

impl Drop for BatchTask {
    fn drop(&mut self) {
        if !self.ran {
            self.store.batches.abandon();
        } else if self.store.batches.leave() {
            BatchTask::spawn(&self.store);
        }
    }
}

/// The KV API of a client (a handle on the same connection: cloning the
/// whole client would copy every API's handle, for every request).
fn kv(c: &Client) -> KvClient {
    // Large clusters list many leases in one response.
    c.kv_client().max_decoding_message_size(MAX_MESSAGE)
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, |h| h.revision())
}

#[async_trait]
impl LeaseStore for EtcdStore {
    async fn snapshot(&self) -> StoreResult<Snapshot> {
        self.read(None).await
    }

    async fn snapshot_at(&self, revision: i64) -> StoreResult<Snapshot> {
        self.read(Some(revision)).await
    }

    async fn watch(&self, from_revision: i64) -> StoreResult<WatchStream> {
        bump(&self.counts.watch);
        let mut opts = WatchOptions::new().with_prefix();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let key = self.full("");
        let (at, mut ws) = self
            .on_endpoint(true, |i, c| {
                let (key, opts) = (key.clone(), opts.clone());
                let watch = c.watch_client();
                async move {
                    watch
                        // One watch response carries a whole transaction's
                        // events (a list's worth after a restore): the same
                        // limit as reads.
                        .max_decoding_message_size(MAX_MESSAGE)
                        .watch(key, Some(opts))
                        .await
                        .map(|stream| (i, stream))
                        .map_err(map_err)
                }
            })
            .await?;
        let store = self.clone();
        Ok(super::task_stream(move |tx| async move {
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return,
                    m = ws.message() => m,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let e = StoreError::Unavailable("etcd closed the watch".into());
                        store.endpoint_failed(at, &e);
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(e) => {
                        let e = map_err(e);
                        if moves_on(&e) {
                            store.endpoint_failed(at, &e);
                        }
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if resp.canceled() {
                    let err = if resp.compact_revision() > 0 {
                        StoreError::Compacted {
                            requested: from_revision,
                            compacted: resp.compact_revision(),
                        }
                    } else {
                        // e.g. "no leader": this member is cut off.
                        let e = StoreError::Unavailable(format!(
                            "etcd cancelled the watch: {}",
                            resp.cancel_reason()
                        ));
                        store.endpoint_failed(at, &e);
                        e
                    };
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                if resp.created() && resp.events().is_empty() {
                    continue;
                }
                let mut batch = WatchBatch {
                    revision: header_rev(resp.header()),
                    events: Vec::with_capacity(resp.events().len()),
                };
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Some(rel) = store.rel(kv.key()) else {
                        continue;
                    };
                    let event = match ev.event_type() {
                        EventType::Put => decode_put(
                            rel,
                            kv.value(),
                            kv.create_revision(),
                            kv.mod_revision(),
                            kv.lease(),
                        ),
                        EventType::Delete => decode_delete(rel, kv.mod_revision()),
                    };
                    batch.events.extend(event);
                }
                // A watch that is catching up gets old events under a header
                // with the current revision; resuming from that header would
                // skip the events still to come. The last event's revision is
                // the safe resume point.
                if let Some(last) = batch.events.last() {
                    batch.revision = last.revision();
                }
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
        }))
    }

    async fn put_config(&self, text: &str) -> StoreResult<i64> {
        bump(&self.counts.put);
        let key = self.full(super::config_key());
        // Not sent twice: a newer config written in between would be
        // overwritten.
        let resp = self
            .on_endpoint(false, |_, c| {
                let (key, mut kv) = (key.clone(), kv(c));
                async move { kv.put(key, text, None).await.map_err(map_err) }
            })
            .await?;
        Ok(header_rev(resp.header()))
    }

    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        bump(&self.counts.grant);
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .on_endpoint(false, |_, c| {
                let mut leases = c.lease_client();
                async move { leases.grant(secs, None).await.map_err(map_err) }
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Other(format!(
                "etcd refused the lease: {}",
                resp.error()
            )));
        }
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, id: LeaseId) -> StoreResult<Duration> {
        // etcd-client's keep-alive consumes the first answer; a second
        // message on the same stream reports the TTL it was reset to.
        bump(&self.counts.keep_alive);
        self.on_endpoint(true, |_, c| {
            let mut leases = c.lease_client();
            async move {
                let (mut keeper, mut stream) = leases
                    .keep_alive(id.0)
                    .await
                    .map_err(map_err)
                    .map_err(|e| match e {
                        StoreError::NotFound(_) => StoreError::NotFound(format!("etcd lease {id}")),
                        other => other,
                    })?;
                bump(&self.counts.keep_alive);
                keeper.keep_alive().await.map_err(map_err)?;
                match stream.message().await.map_err(map_err)? {
                    Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
                    Some(_) => Err(StoreError::NotFound(format!("etcd lease {id}"))),
                    None => Err(StoreError::Unavailable(
                        "etcd closed the keep-alive stream".into(),
                    )),
                }
            }
        })
        .await
    }

    async fn time_to_live(&self, id: LeaseId) -> StoreResult<Option<Duration>> {
        bump(&self.counts.time_to_live);
        let resp = self
            .on_endpoint(true, |_, c| {
                let mut leases = c.lease_client();
                async move { leases.time_to_live(id.0, None).await.map_err(map_err) }
            })
            .await?;
        Ok((resp.ttl() >= 0).then(|| Duration::from_secs(resp.ttl() as u64)))
    }

    async fn revoke(&self, id: LeaseId) -> StoreResult<()> {
        bump(&self.counts.revoke);
        // Revoking twice: the second finds it gone, which is success.
        match self
            .on_endpoint(true, |_, c| {
                let mut leases = c.lease_client();
                async move { leases.revoke(id.0).await.map_err(map_err) }
            })
            .await
        {
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn create(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        lease: Option<LeaseId>,
    ) -> StoreResult<Lease> {
        bump(&self.counts.txn);
        let full = self.subnet_full(key);
        let (start, end) = self.holders(key);
        let guard = Compare::create_revision(start, CompareOp::Equal, 0).with_range(end);
        let put = PutOptions::new().with_lease(lease.map_or(0, |l| l.0));
        let txn = Txn::new().when([guard]).and_then([TxnOp::put(
            full.clone(),
            attrs.to_json(),
            Some(put),
        )]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists(*key));
        }
        let rev = header_rev(resp.header());
        Ok(Lease {
            key: *key,
            attrs: attrs.clone(),
            etcd_lease: lease,
            create_revision: rev,
            mod_revision: rev,
        })
    }

    async fn claim(&self, claim: &Claim<'_>) -> StoreResult<Lease> {
        let committed = |rev| Lease {
            key: *claim.key,
            attrs: claim.attrs.clone(),
            etcd_lease: Some(claim.lease),
            create_revision: rev,
            mod_revision: rev,
        };
        // A claim another one held back may try once more in a batch.
        let mut again = true;
        let pending =
            loop {
                match self.batches.enter(claim_pending(&self.prefix, claim)) {
                    Turn::Now(pending) => {
                        let _slot = Slot(self);
                        return self.claim_alone(pending).await.map(committed);
                    }
                    Turn::Wait(rx) => match rx.await {
                        Ok(Outcome::Committed(rev)) => return Ok(committed(rev)),
                        Ok(Outcome::Refused(e) | Outcome::Failed(e)) => return Err(e),
                        Ok(Outcome::Again) if again => again = false,
                        Ok(Outcome::Again | Outcome::Alone) => {
                            break claim_pending(&self.prefix, claim)
                        }
                        Err(_) => return Err(StoreError::Unavailable(
                            "the batch carrying this claim was abandoned; it may have been applied"
                                .into(),
                        )),
                    },
                }
            };
        self.claim_alone(pending).await.map(committed)
    }

    async fn update(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        lease: Option<LeaseId>,
    ) -> StoreResult<Lease> {
        bump(&self.counts.txn);
        let full = self.subnet_full(&current.key);
        let put = PutOptions::new().with_lease(lease.map_or(0, |l| l.0));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                current.mod_revision,
            )])
            .and_then([TxnOp::put(full.clone(), attrs.to_json(), Some(put))])
            .or_else([TxnOp::get(full, None)]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(Self::cas_failure(&resp, format!("lease {}", current.key)));
        }
        Ok(Lease {
            key: current.key,
            attrs: attrs.clone(),
            etcd_lease: lease,
            create_revision: current.create_revision,
            mod_revision: header_rev(resp.header()),
        })
    }

    async fn delete(&self, key: &SubnetKey, mod_revision: i64) -> StoreResult<i64> {
        bump(&self.counts.txn);
        let full = self.subnet_full(key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::delete(full.clone(), None)])
            .or_else([TxnOp::get(full, None)]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(Self::cas_failure(&resp, format!("lease {key}")));
        }
        Ok(header_rev(resp.header()))
    }

    async fn put_raw(&self, key: &str, value: &str, lease: Option<LeaseId>) -> StoreResult<i64> {
        bump(&self.counts.put);
        let opts = PutOptions::new().with_lease(lease.map_or(0, |l| l.0));
        let key = self.full(key);
        let resp = self
            .on_endpoint(false, |_, c| {
                let (key, opts, mut kv) = (key.clone(), opts.clone(), kv(c));
                async move { kv.put(key, value, Some(opts)).await.map_err(map_err) }
            })
            .await?;
        Ok(header_rev(resp.header()))
    }

    async fn delete_raw(&self, key: &str) -> StoreResult<i64> {
        bump(&self.counts.txn);
        let key = self.full(key);
        let resp = self
            .on_endpoint(true, |_, c| {
                let (key, mut kv) = (key.clone(), kv(c));
                async move { kv.delete(key, None).await.map_err(map_err) }
            })
            .await?;
        Ok(header_rev(resp.header()))
    }

    async fn compact(&self, revision: i64) -> StoreResult<()> {
        bump(&self.counts.other);
        // Compacting again to the same revision reports it compacted.
        match self
            .on_endpoint(true, |_, c| {
                let mut kv = kv(c);
                async move { kv.compact(revision, None).await.map_err(map_err) }
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if compacted_in(&e) => Err(StoreError::Compacted {
                requested: revision,
                compacted: 0,
            }),
            Err(e) => Err(e),
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        bump(&self.counts.other);
        self.on_endpoint(true, |_, c| {
            let mut maintenance = c.maintenance_client();
            async move { maintenance.status().await.map(|_| ()).map_err(map_err) }
        })
        .await
    }

    fn requests(&self) -> RequestCounts {
        let c = &self.counts;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            range: l(&c.range),
            txn: l(&c.txn),
            put: l(&c.put),
            grant: l(&c.grant),
            keep_alive: l(&c.keep_alive),
            time_to_live: l(&c.time_to_live),
            revoke: l(&c.revoke),
            watch: l(&c.watch),
            other: l(&c.other),
        }
    }

    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(key: &str, node: &str) -> Pending {
        let key: SubnetKey = key.parse().unwrap();
        let attrs = LeaseAttrs::new(node, None, None, &crate::BackendData::HostGw);
        let claim = Claim {
            key: &key,
            attrs: &attrs,
            node,
            lease: LeaseId(1),
            config_revision: 3,
            guard: NodeGuard::Absent,
        };
        claim_pending("/weft/network", &claim)
    }

    #[test]
    fn claims_that_read_what_another_writes_never_share_a_batch() {
        let v4 = pending("10.244.7.0-24", "a");
        let v6_only = SubnetKey::new(None, Some("fd42:0:0:7::/64".parse().unwrap()))
            .unwrap()
            .to_string();
        // The same IPv4 subnet, with an IPv6 one: etcd's compare of either
        // covers the other's key.
        assert!(v4.clashes(&pending("10.244.7.0-24&fd42:0:0:7::-64", "b")));
        // The same node.
        assert!(v4.clashes(&pending("10.244.8.0-24", "a")));
        // A subnet whose key starts like it (10.244.7 / 10.244.70).
        assert!(!v4.clashes(&pending("10.244.70.0-24", "b")));
        assert!(!v4.clashes(&pending("10.244.7.0-25", "b")));
        // An IPv6-only subnet is held by its own key only.
        assert!(pending(&v6_only, "b").clashes(&pending(&v6_only, "c")));
        assert!(!pending(&v6_only, "b").clashes(&pending("0.0.0.0-0&fd42:0:0:8::-64", "c")));
        assert!(!v4.clashes(&pending(&v6_only, "b")));
    }

    #[test]
    fn only_refusals_that_applied_nothing_send_a_batch_claim_by_claim() {
        let status = |s: tonic::Status| map_err(etcd_client::Error::GRpcStatus(s));
        let refused = [
            status(tonic::Status::not_found(
                "etcdserver: requested lease not found",
            )),
            status(tonic::Status::invalid_argument(
                "etcdserver: too many operations in txn request",
            )),
            status(tonic::Status::invalid_argument(
                "etcdserver: duplicate key given in txn request",
            )),
            status(tonic::Status::invalid_argument(
                "etcdserver: request is too large",
            )),
        ];
        for e in &refused {
            assert!(refused_before_apply(e), "{e}");
        }
        assert!(too_large(&refused[1]) && too_large(&refused[3]));
        assert!(!too_large(&refused[0]) && !too_large(&refused[2]));
        // It may have been applied: the answer was lost, or etcd was busy.
        for e in [
            status(tonic::Status::internal("h2 protocol error: stream reset")),
            status(tonic::Status::resource_exhausted(
                "etcdserver: too many requests",
            )),
            status(tonic::Status::unavailable("etcdserver: request timed out")),
            status(tonic::Status::deadline_exceeded(
                "context deadline exceeded",
            )),
        ] {
            assert!(!refused_before_apply(&e), "{e}");
        }
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let mut o = EtcdOptions::new(vec!["http://127.0.0.1:2379".into()], "/weft/network");
        o.user = Some(("weft".into(), "s3cret".into()));
        let text = format!("{o:?}");
        assert!(text.contains("weft") && !text.contains("s3cret"), "{text}");
    }

    #[test]
    fn hints_name_what_to_fix() {
        let h = |d: &str| hint(d).unwrap_or_default();
        assert!(h("invalid peer certificate: UnknownIssuer").contains("--etcd-cafile"));
        assert!(h("invalid peer certificate: NotValidForName").contains("--etcd-endpoints"));
        assert!(h("invalid peer certificate: Expired").contains("expired"));
        assert!(h("received fatal alert: BadCertificate").contains("--etcd-certfile"));
        assert!(
            h("etcdserver: authentication failed, invalid user ID or password")
                .contains("--etcd-password")
        );
        assert!(hint("connection refused").is_none());
    }

    #[test]
    fn only_requests_that_never_took_effect_are_sent_again() {
        let u = |m: &str| StoreError::Unavailable(m.into());
        for m in [
            "The service is currently unavailable: tcp connect error: transport error: Connection refused (os error 111)",
            "The service is currently unavailable: tcp connect error: transport error: deadline has elapsed",
            "The service is currently unavailable: etcdserver: no leader",
        ] {
            assert!(moves_on(&u(m)) && never_applied(&u(m)), "{m}");
        }
        // Sent, answer lost: it may have been applied.
        for m in [
            "Unknown error: h2 protocol error: error reading a body from connection: stream closed because of a broken pipe",
            "The operation was cancelled: Timeout expired: transport error",
            "connection reset by peer",
            "etcdserver: leader changed",
        ] {
            assert!(moves_on(&u(m)) && !never_applied(&u(m)), "{m}");
        }
        let other = StoreError::Conflict("lease".into());
        assert!(!moves_on(&other) && !never_applied(&other));
        // The whole cluster says no: another member would say the same.
        let full = map_err(etcd_client::Error::GRpcStatus(
            tonic::Status::resource_exhausted("etcdserver: mvcc: database space exceeded"),
        ));
        assert!(!moves_on(&full));
        assert!(!moves_on(&u(
            "etcd authentication failed: check --etcd-username and --etcd-password (InvalidArgument: etcdserver: authentication failed, invalid user ID or password)"
        )));
    }

    #[test]
    fn out_of_space_says_what_to_do() {
        let e = map_err(etcd_client::Error::GRpcStatus(
            tonic::Status::resource_exhausted("etcdserver: mvcc: database space exceeded"),
        ));
        let StoreError::Unavailable(m) = e else {
            panic!("{e:?}")
        };
        assert!(
            m.contains("NOSPACE") && m.contains("etcdctl alarm disarm"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn settings_that_cannot_work_fail_at_once() {
        async fn err(o: EtcdOptions) -> String {
            EtcdStore::connect(o).await.unwrap_err().to_string()
        }
        let opts = |e: &str| EtcdOptions::new(vec![e.into()], "/weft/network");
        assert!(err(opts("127.0.0.1:2379")).await.contains("not http(s)://"));
        assert!(err(opts("https://127.0.0.1:2379"))
            .await
            .contains("--etcd-cafile"));
        let mut o = opts("https://127.0.0.1:2379");
        o.tls = Some(EtcdTls {
            ca: None,
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
        });
        assert!(err(o).await.contains("--etcd-cafile"));
        let mut o = opts("http://127.0.0.1:2379");
        o.tls = Some(EtcdTls::default());
        assert!(err(o).await.contains("need https://"));
        let mut o = EtcdOptions::new(
            vec!["http://127.0.0.1:1".into(), "https://127.0.0.1:2".into()],
            "/weft/network",
        );
        o.user = Some(("weft".into(), "x".into()));
        assert!(err(o).await.contains("mix"));
    }
}
