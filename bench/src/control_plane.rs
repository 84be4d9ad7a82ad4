//! The control-plane benchmark.
//!
//! 1. etcd (Debian's, on disk) and the real `weft-controller` binary as
//!    separate processes.
//! 2. Joins: N nodes acquire at once through the API. Latency per acquire,
//!    total time, and etcd requests per acquire (from the controller's
//!    `/metrics`).
//! 3. Fan-out: W watch streams follow the leases; K more nodes join one at a
//!    time; for each, the time from sending the acquire until every watcher
//!    has the lease.
//! 4. Baseline: flannel's acquire pattern replayed against the same etcd
//!    with the same N leases: one prefix Get, one TimeToLive per lease, a
//!    Grant and the claiming Txn (flannel's `getSubnets` + `createSubnet`).

use crate::stats::{ms, summary};
use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use weft_lease::api::{AcquireRequest, WatchKind};
use weft_lease::client::ControllerClient;
use weft_lease::{BackendData, SubnetKey};
use weft_tests::bins::workspace_bin;
use weft_tests::etcd::EtcdServer;
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
}

impl Drop for Controller {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
    }
}

async fn start_controller(etcd_url: &str) -> Result<Controller> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = Command::new(workspace_bin("weft-controller")?);
    cmd.args([
        "--etcd-endpoints",
        etcd_url,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--log",
        "warn",
    ])
    .stdin(Stdio::null());
    let child = spawn_tied(cmd)?;
    let client = ControllerClient::new(&format!("http://127.0.0.1:{port}"))?;
    let mut ctl = Controller { child, client };
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
    Ok(ctl)
}

pub async fn run(args: Args) -> Result<()> {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start).await??;
    let url = etcd.url();
    let ctl = start_controller(&url).await?;
    let client = ctl.client.clone();
    // /29 per node: 8191 subnets, room for 5000 nodes and the fan-out joins.
    client
        .set_network(r#"{"Network":"10.244.0.0/16","SubnetLen":29}"#)
        .await?;
    println!(
        "weft control-plane benchmark: {} nodes, {} watchers, {} CPUs, etcd from {}",
        args.nodes,
        args.watchers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        etcd.log_path().display()
    );

    // Joins, all at once.
    let before = etcd_requests(&client).await?;
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.nodes)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let r = client.acquire(&format!("node-{i}"), &request(i)).await;
                (t0.elapsed(), r)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut subnets = HashSet::new();
    for t in tasks {
        let (lat, r) = t.await?;
        let r = r.context("acquire failed during the join storm")?;
        ensure!(
            subnets.insert(r.lease.key),
            "subnet {} handed out twice",
            r.lease.key
        );
        latencies.push(lat);
    }
    let total = start.elapsed();
    let after = etcd_requests(&client).await?;
    let delta =
        |op: &str| after.get(op).copied().unwrap_or(0.0) - before.get(op).copied().unwrap_or(0.0);
    let all: f64 = after.keys().map(|op| delta(op)).sum();
    // The controller's health pings count as "other"; they are not part of acquiring.
    let per_acquire = (all - delta("other")) / f64::from(args.nodes);
    println!(
        "joins    {} acquires in {:.2} s ({:.0}/s); latency {}",
        args.nodes,
        total.as_secs_f64(),
        f64::from(args.nodes) / total.as_secs_f64(),
        summary(&mut latencies)
    );
    println!(
        "etcd     {:.2} requests per acquire (grant {:.2}, txn {:.2}, range {:.2}, time_to_live {:.2})",
        per_acquire,
        delta("grant") / f64::from(args.nodes),
        delta("txn") / f64::from(args.nodes),
        delta("range") / f64::from(args.nodes),
        delta("time_to_live") / f64::from(args.nodes)
    );

    // Fan-out.
    let (fanout, single) = fan_out(&client, &args).await?;
    let (mut all_have, mut per_delivery) = fanout;
    let mut single = single;
    println!(
        "fan-out  {} watchers, {} changes: all watchers have it {}; each delivery {}",
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
    drop(ctl);
    drop(etcd);
    Ok(())
}

type FanOut = ((Vec<Duration>, Vec<Duration>), Vec<Duration>);

/// Opens the watchers, then times `changes` single joins until every watcher
/// has each one.
async fn fan_out(client: &ControllerClient, args: &Args) -> Result<FanOut> {
    let revision = client.list(false).await?.revision;
    let (tx, mut rx) = mpsc::unbounded_channel::<(SubnetKey, Instant)>();
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let mut stream = client.watch(revision + 1).await?;
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
