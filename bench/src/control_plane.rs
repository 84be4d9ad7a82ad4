//! The control-plane benchmark.
//!
//! 1. etcd (Debian's, on disk) and the real `weft-controller` binary as
//!    separate processes.
//! 2. Joins: N nodes acquire at once through the API, each with its own
//!    client and connection, three times: over plain HTTP with weft's
//!    client, over plain HTTP with a lean hand-written client (the same
//!    request; the nodes' side shares this machine's cores, so this is the
//!    controller's and etcd's figure), and over HTTPS with weft's client
//!    and a certificate per node (what TLS costs, against the first), each
//!    storm on an empty etcd of its own.
//!    Latency per acquire, total time, each side's CPU, and etcd requests
//!    per acquire (from the controller's `/metrics`).
//! 3. Fan-out (over HTTPS): W watch streams follow the leases; K more nodes
//!    join one at a time; for each, the time from sending the acquire until
//!    every watcher has the lease.
//! 4. Baseline: flannel's acquire pattern replayed against the same etcd
//!    with the same N leases: one prefix Get, one TimeToLive per lease, a
//!    Grant and the claiming Txn (flannel's `getSubnets` + `createSubnet`).

use crate::stats::{ms, summary};
use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use weft_lease::api::{AcquireRequest, LeaseResponse, WatchKind};
use weft_lease::client::ControllerClient;
use weft_lease::tls::ClientTlsFiles;
use weft_lease::{BackendData, SubnetKey};
use weft_tests::bins::workspace_bin;
use weft_tests::controller::{free_addr, tls_args};
use weft_tests::etcd::EtcdServer;
use weft_tests::pki::TestPki;
use weft_tests::process::{spawn_tied, stop};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes joining at once.
    #[arg(long, default_value_t = 1000)]
    nodes: u32,
    /// Watch streams for the fan-out measurement.
    #[arg(long, default_value_t = 1000)]
    watchers: u32,
    /// Lease changes timed for fan-out.
    #[arg(long, default_value_t = 50)]
    changes: u32,
    /// flannel-pattern acquires to time (each costs one TimeToLive per lease).
    #[arg(long, default_value_t = 10)]
    flannel_samples: u32,
    /// Acquires in flight at once during a join storm. Each is a connection
    /// of its own, on one machine: the port range and the open-file limit
    /// (both sides) bound it.
    #[arg(long, default_value_t = 8000)]
    concurrency: u32,
}

/// The network for `total` nodes: 10.244.0.0/16 in /29s (8,190 subnets)
/// while that holds them, else /24s (flannel's default) in the smallest
/// 10.0.0.0/P that does.
fn network_for(total: u32) -> Result<String> {
    if total <= 8000 {
        return Ok(r#"{"Network":"10.244.0.0/16","SubnetLen":29}"#.into());
    }
    // SubnetMin and SubnetMax leave out the first and the last subnet.
    let bits = (1..=16)
        .find(|b| (1u64 << b) >= u64::from(total) + 2)
        .context("at most 65,534 nodes fit 10.0.0.0/8 in /24s")?;
    Ok(format!(
        r#"{{"Network":"10.0.0.0/{}","SubnetLen":24}}"#,
        24 - bits
    ))
}

fn request(i: u32) -> AcquireRequest {
    // Underlay addresses from 198.18.0.0/15, never used for traffic here.
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1)) + i);
    let mac = format!(
        "0e:00:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    );
    AcquireRequest::new(
        Some(ip),
        None,
        &BackendData::Vxlan {
            vni: 1,
            vtep_mac: mac.parse().expect("valid mac"),
        },
        None,
    )
}

/// Sum of the controller's `weft_controller_etcd_requests_total` series.
async fn etcd_requests(client: &ControllerClient) -> Result<HashMap<String, f64>> {
    let text = client.metrics().await?;
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("weft_controller_etcd_requests_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').context("metric line")?;
        let op = labels.split('"').nth(1).unwrap_or("?").to_string();
        out.insert(op, value.parse::<f64>()?);
    }
    Ok(out)
}

struct Controller {
    child: std::process::Child,
    client: ControllerClient,
    url: String,
    /// The PKI, and node `i`'s certificate files at `[i]`.
    tls: Option<(Arc<TestPki>, Arc<Vec<ClientTlsFiles>>)>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
    }
}

impl Controller {
    /// Node `i`'s client: with its own certificate (CN=node-i) on HTTPS, as
    /// each node has one, so every node makes its own TLS handshake.
    fn node(&self, i: u32) -> Result<ControllerClient> {
        Ok(match &self.tls {
            Some((_, nodes)) => {
                let files = nodes
                    .get(i as usize)
                    .context("no certificate made for that node")?;
                ControllerClient::with_tls(&self.url, Some(files.clone()))?
            }
            None => ControllerClient::new(&self.url)?,
        })
    }
}

/// The controller binary on `prefix`, over HTTPS with client certificates
/// from `pki`, or over plain HTTP on loopback without.
async fn start_controller(
    etcd_url: &str,
    prefix: &str,
    tls: Option<(Arc<TestPki>, Arc<Vec<ClientTlsFiles>>)>,
    network: &str,
) -> Result<Controller> {
    let addr = free_addr();
    let mut cmd = Command::new(workspace_bin("weft-controller")?);
    cmd.args([
        "--etcd-endpoints",
        etcd_url,
        "--etcd-prefix",
        prefix,
        "--listen",
        &addr,
        "--log",
        "warn",
    ])
    .stdin(Stdio::null());
    let (url, client) = match &tls {
        Some((pki, _)) => {
            cmd.args(tls_args(pki)?);
            let url = format!("https://{addr}");
            let admin = ControllerClient::with_tls(&url, Some(pki.admin("bench")?))?;
            (url, admin)
        }
        None => {
            let url = format!("http://{addr}");
            (url.clone(), ControllerClient::new(&url)?)
        }
    };
    let child = spawn_tied(cmd)?;
    let mut ctl = Controller {
        child,
        client,
        url,
        tls,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctl.client.readiness().await.is_err() {
        if let Some(status) = ctl.child.try_wait()? {
            bail!("weft-controller exited at start ({status}); its errors are above");
        }
        ensure!(
            Instant::now() < deadline,
            "weft-controller did not answer within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctl.client.set_network(network).await?;
    Ok(ctl)
}

/// What a join storm measured.
struct Joins {
    total: Duration,
    latencies: Vec<Duration>,
    per_acquire: f64,
    deltas: HashMap<String, f64>,
    /// CPU seconds the controller, etcd and this process (the nodes'
    /// side) spent.
    controller_cpu: f64,
    etcd_cpu: f64,
    nodes_cpu: f64,
    /// Acquires sent again after a connection could not be made.
    retries: u32,
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 (11 and 12 after the name).
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// How the nodes of a join storm talk to the controller.
#[derive(Clone, Copy)]
enum NodeSide {
    /// weft's client (what weft-node uses): a reqwest client of its own
    /// per node, over HTTPS with the node's certificate when the
    /// controller has TLS.
    Weft,
    /// The same request, written by hand on a connection of its own per
    /// node (plain HTTP only). The nodes' side shares this machine's two
    /// cores with the controller and etcd; in a cluster it runs on the
    /// nodes. weft's client spends about a third of the storm's CPU here,
    /// this one about half of that, so the storm measures the controller
    /// and etcd.
    Lean,
}

/// One node's way to the controller during a storm.
enum Via {
    Weft(ControllerClient),
    Lean(std::net::SocketAddr),
}

/// Why a storm's acquire failed. Only `Connect` (no connection made
/// within 5 s: the controller's accept queue and handshakes are backed up)
/// is tried again; weft-node tries every error again, a storm fails on the
/// first other one.
enum AcquireError {
    Connect(String),
    Other(anyhow::Error),
}

impl std::fmt::Display for AcquireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcquireError::Connect(e) => write!(f, "connecting: {e}"),
            AcquireError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// `PUT /v1/leases/{node}` as weft-node sends it, on a new connection
/// closed after the answer; the answer's status and lease are checked.
async fn lean_acquire(
    addr: std::net::SocketAddr,
    node: &str,
    req: &AcquireRequest,
) -> Result<LeaseResponse, AcquireError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 30 s in all, as weft's client.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = serde_json::to_vec(req).map_err(|e| AcquireError::Other(e.into()))?;
    let mut conn =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| AcquireError::Connect("no connection within 5 s".into()))?
            .map_err(|e| AcquireError::Connect(e.to_string()))?;
    let _ = conn.set_nodelay(true);
    let mut msg = format!(
        "PUT /v1/leases/{node} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    msg.extend_from_slice(&body);
    let answer = async {
        conn.write_all(&msg).await?;
        let mut answer = Vec::with_capacity(2048);
        // The answer is a few hundred bytes; more than 1 MiB is wrong.
        (&mut conn).take(1 << 20).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout_at(deadline, answer)
        .await
        .map_err(|_| AcquireError::Other(anyhow::anyhow!("no answer within 30 s")))?
        .map_err(|e| AcquireError::Other(e.into()))?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| AcquireError::Other(anyhow::anyhow!("an answer without a header end")))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let body = &answer[split + 4..];
    // The controller's answers carry their length; anything else (chunked,
    // cut short, longer than 1 MiB and cut off here) is refused.
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    if length != Some(body.len()) {
        return Err(AcquireError::Other(anyhow::anyhow!(
            "an answer of {} bytes after its header, content-length {length:?}: {}",
            body.len(),
            head.lines().next().unwrap_or_default()
        )));
    }
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(AcquireError::Other(anyhow::anyhow!(
            "{}: {}",
            head.lines().next().unwrap_or_default(),
            String::from_utf8_lossy(body)
        )));
    }
    serde_json::from_slice(body).map_err(|e| AcquireError::Other(e.into()))
}

/// `n` nodes acquire, each through its own client and connection,
/// `concurrency` at a time (all at once when `n` is smaller).
async fn join_storm(
    ctl: &Controller,
    side: NodeSide,
    etcd: u32,
    n: u32,
    concurrency: u32,
) -> Result<Joins> {
    let lean_addr: Option<std::net::SocketAddr> = match side {
        NodeSide::Weft => None,
        NodeSide::Lean => Some(
            ctl.url
                .strip_prefix("http://")
                .context("the lean client speaks plain HTTP only")?
                .parse()?,
        ),
    };
    let before = etcd_requests(&ctl.client).await?;
    let cpu_before = (
        cpu_seconds(ctl.child.id()),
        cpu_seconds(etcd),
        cpu_seconds(std::process::id()),
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1) as usize));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await?;
        // Made when its turn comes: 50,000 clients at once would hold
        // 50,000 connection pools.
        let via = match lean_addr {
            None => Via::Weft(ctl.node(i)?),
            Some(addr) => Via::Lean(addr),
        };
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let (node, req) = (format!("node-{i}"), request(i));
            // As weft-node does: a connection that could not be made (the
            // controller's accept queue and handshakes are backed up) is
            // tried again; retries are counted.
            let mut retries = 0u32;
            let r = loop {
                let r = match &via {
                    Via::Weft(client) => match client.acquire(&node, &req).await {
                        Err(e @ weft_lease::client::ClientError::Connect { .. }) => {
                            Err(AcquireError::Connect(e.to_string()))
                        }
                        other => other.map_err(|e| AcquireError::Other(e.into())),
                    },
                    Via::Lean(addr) => lean_acquire(*addr, &node, &req).await,
                };
                match r {
                    Err(AcquireError::Connect(_)) if retries < 5 => retries += 1,
                    other => break other,
                }
            };
            drop(via);
            drop(permit);
            (t0.elapsed(), r, retries)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut subnets = HashSet::new();
    let mut retries = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let (lat, r, tries) = t.await?;
        retries += tries;
        let r = r.map_err(|e| {
            anyhow::anyhow!("node-{i}'s acquire failed during the join storm after {lat:?}: {e}")
        })?;
        ensure!(
            subnets.insert(r.lease.key),
            "subnet {} handed out twice",
            r.lease.key
        );
        latencies.push(lat);
    }
    let total = start.elapsed();
    let controller_cpu = cpu_seconds(ctl.child.id()) - cpu_before.0;
    let etcd_cpu = cpu_seconds(etcd) - cpu_before.1;
    let nodes_cpu = cpu_seconds(std::process::id()) - cpu_before.2;
    let after = etcd_requests(&ctl.client).await?;
    let deltas: HashMap<String, f64> = after
        .iter()
        .map(|(op, v)| (op.clone(), v - before.get(op).copied().unwrap_or(0.0)))
        .collect();
    let all: f64 = deltas.values().sum();
    // The controller's health pings count as "other"; they are not part of acquiring.
    let per_acquire = (all - deltas.get("other").copied().unwrap_or(0.0)) / f64::from(n);
    Ok(Joins {
        total,
        latencies,
        per_acquire,
        deltas,
        controller_cpu,
        etcd_cpu,
        nodes_cpu,
        retries,
    })
}

fn print_joins(what: &str, n: u32, j: &mut Joins) {
    println!(
        "joins    {what}: {n} acquires in {:.2} s ({:.0}/s); latency {}",
        j.total.as_secs_f64(),
        f64::from(n) / j.total.as_secs_f64(),
        summary(&mut j.latencies)
    );
    println!(
        "         CPU: controller {:.2} s ({:.2} ms a join), etcd {:.2} s ({:.2} ms a join), the {n} nodes' side {:.2} s (this process); {:.2} cores busy of {}",
        j.controller_cpu,
        j.controller_cpu * 1000.0 / f64::from(n),
        j.etcd_cpu,
        j.etcd_cpu * 1000.0 / f64::from(n),
        j.nodes_cpu,
        (j.controller_cpu + j.etcd_cpu + j.nodes_cpu) / j.total.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let per = |op: &str| j.deltas.get(op).copied().unwrap_or(0.0) / f64::from(n);
    println!(
        "         etcd: {:.2} requests per acquire (grant {:.2}, txn {:.2}, range {:.2}, time_to_live {:.2})",
        j.per_acquire,
        per("grant"),
        per("txn"),
        per("range"),
        per("time_to_live")
    );
    if j.retries > 0 {
        println!(
            "         {} acquires sent again after a connection could not be made within 5 s",
            j.retries
        );
    }
}

pub async fn run(args: Args) -> Result<()> {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start).await??;
    let url = etcd.url();
    let pki = Arc::new(tokio::task::spawn_blocking(TestPki::new).await??);
    let network = network_for(args.nodes + args.changes)?;
    println!(
        "weft control-plane benchmark: {} nodes ({} at once), {} watchers, {} CPUs, network {network}, etcd from {}",
        args.nodes,
        args.concurrency.min(args.nodes),
        args.watchers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        etcd.log_path().display()
    );
    // Certificates for every node (and watcher) first, outside the timing.
    let t0 = Instant::now();
    let for_all = args.nodes.max(args.watchers) + args.changes;
    let made = pki.clone();
    let nodes = tokio::task::spawn_blocking(move || {
        (0..for_all)
            .map(|i| made.node(&format!("node-{i}")))
            .collect::<Result<Vec<_>>>()
    })
    .await??;
    println!(
        "pki      {for_all} node certificates made in {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    // Joins, all at once: over plain HTTP with weft's client, over plain
    // HTTP with the lean client (the controller's and etcd's figure), then
    // over HTTPS with weft's client and a certificate per node, each with
    // a controller and an empty etcd of its own: an etcd that already
    // holds a storm's leases and etcd leases spends about a quarter more
    // CPU on the next storm, so sharing one would favour the first.
    let (net, n, at_once) = (network.as_str(), args.nodes, args.concurrency);
    let plain_storm = |side| async move {
        let etcd = tokio::task::spawn_blocking(EtcdServer::start).await??;
        let etcd_pid = etcd.pid().context("etcd is not running")?;
        let ctl = start_controller(&etcd.url(), "/weft/network", None, net).await?;
        join_storm(&ctl, side, etcd_pid, n, at_once).await
    };
    let mut plain = plain_storm(NodeSide::Weft).await?;
    print_joins("plain HTTP, weft's client", args.nodes, &mut plain);
    let mut lean = plain_storm(NodeSide::Lean).await?;
    print_joins("plain HTTP, lean client", args.nodes, &mut lean);
    let etcd_pid = etcd.pid().context("etcd is not running")?;
    let ctl = start_controller(
        &url,
        "/weft/network",
        Some((pki, Arc::new(nodes))),
        &network,
    )
    .await?;
    let mut tls = join_storm(&ctl, NodeSide::Weft, etcd_pid, args.nodes, args.concurrency).await?;
    print_joins("HTTPS + client certs, weft's client", args.nodes, &mut tls);
    let (rss, peak) = rss_mib(ctl.child.id())?;
    println!(
        "memory   controller with {} leases, right after the storm: RSS {rss:.1} MiB (peak {peak:.1} MiB)",
        args.nodes
    );
    // It gives freed memory back at most every 10 s after a burst of
    // connections.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (settled, _) = rss_mib(ctl.child.id())?;
    println!(
        "memory   controller with {} leases, 12 s after the storm: RSS {settled:.1} MiB",
        args.nodes
    );
    println!(
        "tls      joins take {:.2}x the plain time (both with weft's client); the controller's CPU {:.2}x",
        tls.total.as_secs_f64() / plain.total.as_secs_f64(),
        tls.controller_cpu / plain.controller_cpu.max(1e-9)
    );
    let per_acquire = tls.per_acquire;
    let client = ctl.client.clone();
    // The leases alone: a controller started now loads them from etcd and
    // never saw the storm's thousands of connections.
    {
        let fresh = start_controller(&url, "/weft/network", None, &network).await?;
        let n = fresh.client.list(false).await?.leases.len();
        let (rss, peak) = rss_mib(fresh.child.id())?;
        println!(
            "memory   a controller started with {n} leases in etcd: RSS {rss:.1} MiB (peak {peak:.1} MiB)"
        );
    }
    let (relist, listed) = relist_after_compaction(&ctl, &url).await?;
    println!(
        "relist   a node whose revision was compacted away: 410, list of {listed} leases, watching again: {}",
        ms(relist)
    );

    // Fan-out, over HTTPS: each watcher a node with its own certificate.
    let (fanout, single) = fan_out(&ctl, &args).await?;
    let (mut all_have, mut per_delivery) = fanout;
    let mut single = single;
    println!(
        "fan-out  {} watchers over HTTPS, {} changes: all watchers have it {}; each delivery {}",
        args.watchers,
        args.changes,
        summary(&mut all_have),
        summary(&mut per_delivery)
    );
    println!(
        "single   weft acquire with {} leases: {}",
        args.nodes,
        summary(&mut single)
    );

    // flannel's pattern against the same etcd and leases.
    let (flannel_requests, mut flannel_lat) = flannel_pattern(&url, args.flannel_samples).await?;
    println!(
        "flannel  pattern with {} leases: {:.0} requests per acquire; latency {}",
        args.nodes + args.changes,
        flannel_requests,
        summary(&mut flannel_lat)
    );
    single.sort();
    flannel_lat.sort();
    let weft_p50 = crate::stats::percentile(&single, 50.0);
    let flannel_p50 = crate::stats::percentile(&flannel_lat, 50.0);
    println!(
        "ratio    {:.0}x fewer etcd requests per acquire; single acquire {:.1}x faster (p50 {} vs {})",
        flannel_requests / per_acquire,
        flannel_p50.as_secs_f64() / weft_p50.as_secs_f64().max(1e-9),
        ms(weft_p50),
        ms(flannel_p50)
    );
    drop(client);
    drop(ctl);
    drop(etcd);
    Ok(())
}

/// VmRSS and VmHWM (peak) of a process, in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let mib = |field| Ok::<_, anyhow::Error>(crate::stats::status_kib(pid, field)? as f64 / 1024.0);
    Ok((mib("VmRSS:")?, mib("VmHWM:")?))
}

/// etcd's history is compacted; a node that watches from a revision before
/// that (revision 1) is answered 410, lists every lease and watches again
/// from the list's revision. Returns the time for all of it and the leases
/// listed.
async fn relist_after_compaction(ctl: &Controller, etcd_url: &str) -> Result<(Duration, usize)> {
    let mut etcd = etcd_client::Client::connect([etcd_url], None).await?;
    let rev = etcd
        .status()
        .await?
        .header()
        .context("no header")?
        .revision();
    etcd.compact(rev, None).await?;
    let node = ctl.node(0)?;
    let t0 = Instant::now();
    match node.watch(1).await {
        Err(weft_lease::client::ClientError::Api { status: 410, .. }) => {}
        Err(e) => bail!("a watch from revision 1 after compaction: {e}"),
        Ok(_) => bail!("a watch from revision 1 after compaction was not refused with 410"),
    }
    let list = node.list(false).await?;
    let _stream = node.watch(list.revision + 1).await?;
    Ok((t0.elapsed(), list.leases.len()))
}

type FanOut = ((Vec<Duration>, Vec<Duration>), Vec<Duration>);

/// Opens the watchers, then times `changes` single joins until every watcher
/// has each one.
async fn fan_out(ctl: &Controller, args: &Args) -> Result<FanOut> {
    let client = &ctl.client;
    let revision = client.list(false).await?.revision;
    let (tx, mut rx) = mpsc::unbounded_channel::<(SubnetKey, Instant)>();
    let mut watchers = Vec::new();
    for w in 0..args.watchers {
        let mut stream = ctl.node(w)?.watch(revision + 1).await?;
        let tx = tx.clone();
        watchers.push(tokio::spawn(async move {
            while let Some(Ok(line)) = stream.next().await {
                if line.kind == WatchKind::Put {
                    if let Some(l) = line.lease {
                        if tx.send((l.key, Instant::now())).is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut all_have = Vec::new();
    let mut per_delivery = Vec::new();
    let mut single = Vec::new();
    for k in 0..args.changes {
        let i = args.nodes + k;
        let t0 = Instant::now();
        let lease = client
            .acquire(&format!("node-{i}"), &request(i))
            .await?
            .lease;
        single.push(t0.elapsed());
        let mut got = 0;
        let mut last = t0;
        while got < args.watchers {
            let (key, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("watchers did not all get the change within 30 s")?
                .context("watchers ended")?;
            if key != lease.key {
                bail!("watcher saw {key} while waiting for {}", lease.key);
            }
            got += 1;
            per_delivery.push(at - t0);
            last = last.max(at);
        }
        all_have.push(last - t0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in watchers {
        w.abort();
    }
    Ok(((all_have, per_delivery), single))
}

/// flannel's acquire: list every lease, ask etcd for each one's TTL, grant a
/// lease, claim a subnet with a transaction. Returns requests per acquire
/// and the time each took.
async fn flannel_pattern(url: &str, samples: u32) -> Result<(f64, Vec<Duration>)> {
    let mut c = etcd_client::Client::connect([url], None).await?;
    let mut kv = c.kv_client().max_decoding_message_size(256 << 20);
    let mut lease_client = c.lease_client();
    let mut requests = 0u64;
    let mut times = Vec::new();
    for s in 0..samples {
        let t0 = Instant::now();
        let resp = kv
            .get(
                "/weft/network/subnets",
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        requests += 1;
        for kv in resp.kvs() {
            lease_client.time_to_live(kv.lease(), None).await?;
            requests += 1;
        }
        let grant = lease_client.grant(86_400, None).await?;
        requests += 1;
        let key = format!("/weft-bench-flannel/subnets/sample-{s}");
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                "{}",
                Some(PutOptions::new().with_lease(grant.id())),
            )]);
        c.txn(txn).await?;
        requests += 1;
        times.push(t0.elapsed());
    }
    Ok((requests as f64 / f64::from(samples.max(1)), times))
}

#[cfg(test)]
mod tests {
    use super::network_for;
    use weft_config::NetworkConfig;

    #[test]
    fn the_network_holds_every_node_and_is_the_smallest_that_does() {
        for total in [200, 5050, 8000, 8001, 20_000, 50_050, 65_534] {
            let net = NetworkConfig::parse(&network_for(total).unwrap()).unwrap();
            assert!(net.subnet_count() >= u128::from(total), "{total}: {net:?}");
            if total > 8000 {
                // Half the size would not do.
                assert!(net.subnet_count() / 2 < u128::from(total), "{total}");
            }
        }
        assert!(network_for(65_535).is_err());
    }
}
