//! The reconcile benchmark.
//!
//! 1. weft's reconcile pass (the daemon's own code: select peers, desired
//!    state, observe, diff, apply over netlink) programming N vxlan peers
//!    into a fresh namespace from empty; then single peers added and
//!    removed; then a pass with nothing to do (the periodic resync).
//! 2. The floor: the same kernel objects made by iproute2 from batch files
//!    (`ip -batch`, `bridge -batch`) in another fresh namespace.
//! 3. The daemon: a lab host whose weft-node follows N leases written to
//!    the lab's etcd; the time until it has programmed them all and its
//!    resident memory then.

use crate::stats::{ms, status_kib, summary};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_backends::peer::read;
use weft_backends::{
    route_metric, vtep_mac, Dataplane, ExternalIface, LocalNode, NetlinkDataplane, Vxlan,
};
use weft_config::{NetworkConfig, VxlanConfig};
use weft_lease::api::LeaseView;
use weft_lease::{BackendData, Lease, LeaseAttrs, SubnetKey};
use weft_node::peers::PeerTable;
use weft_node::reconcile::{Pass, Reconciler};
use weft_node::status::Status;
use weft_tests::lab::{Lab, LabConfig};
use weft_tests::netns::{run, Netns};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Peer counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    peers: Vec<u32>,
    /// Single additions and removals to time.
    #[arg(long, default_value_t = 20)]
    changes: u32,
    /// Skip the daemon measurement (lab + etcd).
    #[arg(long)]
    no_daemon: bool,
}

/// The network for `total` peers (and the local node): 10.244.0.0/16 in
/// /29s while that holds them, else 10.240.0.0/12 in /29s (131,070
/// subnets). Peer subnets count up from 10.244.0.8 either way.
pub fn network_for(total: u32) -> Result<&'static str> {
    ensure!(
        total <= 90_000,
        "at most 90,000 peers fit the benchmark's network"
    );
    Ok(if total < 8_190 {
        r#"{"Network":"10.244.0.0/16","SubnetLen":29}"#
    } else {
        r#"{"Network":"10.240.0.0/12","SubnetLen":29}"#
    })
}

/// Peer `i`'s subnet (the `i + 1`th /29 from 10.244.0.0, inside
/// [`network_for`]'s network) and addresses.
pub fn peer(i: u32) -> (SubnetKey, String, BackendData) {
    let base = u32::from(std::net::Ipv4Addr::new(10, 244, 0, 0)) + 8 * (i + 1);
    let key = SubnetKey::v4(
        format!("{}/29", std::net::Ipv4Addr::from(base))
            .parse()
            .expect("valid"),
    );
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 1, 0)) + i);
    let data = BackendData::Vxlan {
        vni: 1,
        vtep_mac: vtep_mac(&format!("bench-peer-{i}")),
    };
    (key, ip.to_string(), data)
}

fn lease(i: u32) -> LeaseView {
    let (key, ip, data) = peer(i);
    let l = Lease {
        key,
        attrs: LeaseAttrs::new(
            &format!("bench-peer-{i}"),
            Some(ip.parse().expect("valid")),
            None,
            &data,
        ),
        etcd_lease: None,
        create_revision: 1,
        mod_revision: i64::from(i) + 1,
    };
    LeaseView::new(&l, true, None)
}

fn host_ns() -> Result<Netns> {
    let ns = Netns::new("bench")?;
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "wire0",
    ])?;
    ns.ip(&["addr", "add", "198.18.0.1/16", "dev", "eth0"])?;
    ns.ip(&["link", "set", "wire0", "up"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(ns)
}

fn local(ns: &Netns, network: &str) -> Result<LocalNode> {
    let idx = ns.ip_json(&["link", "show", "eth0"])?[0]["ifindex"]
        .as_u64()
        .context("ifindex")? as u32;
    Ok(LocalNode::new(
        "bench-local",
        "10.244.0.0-29".parse()?,
        "198.18.0.1".parse()?,
        ExternalIface {
            name: "eth0".into(),
            index: idx,
            mtu: 1500,
            addr: "198.18.0.1/16".parse()?,
        },
        Arc::new(NetworkConfig::parse(network)?),
    ))
}

fn table(range: impl Iterator<Item = u32>) -> PeerTable {
    PeerTable::new(
        1,
        range
            .map(lease)
            .map(|l| (l.key, read(&l)))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// weft's reconcile: from empty, single changes, and a pass with nothing to do.
async fn weft(
    n: u32,
    changes: u32,
) -> Result<(Duration, Vec<Duration>, Vec<Duration>, Duration, usize)> {
    let ns = host_ns()?;
    let local = local(&ns, network_for(n + changes)?)?;
    let dp = Arc::new(NetlinkDataplane::in_netns(&ns.path())?);
    let status = Arc::new(Status::new("bench"));
    let mut r = Reconciler::new(
        dp.clone(),
        Arc::new(Vxlan::new(VxlanConfig::default())),
        status,
    );
    let mut t = table(0..n);
    let start = Instant::now();
    let o = r.reconcile_once(&local, &t).await;
    let full = start.elapsed();
    ensure!(
        o.errors.is_empty(),
        "errors programming {n} peers: {:?}",
        &o.errors[..o.errors.len().min(3)]
    );
    let objects = dp.observe().await?.object_count();
    ensure!(
        objects == 3 * n as usize + 2,
        "expected {} objects, found {objects}",
        3 * n + 2
    );
    let mut adds = Vec::new();
    let mut removes = Vec::new();
    for k in 0..changes {
        let extra = lease(n + k);
        t.insert(extra.key, read(&extra));
        // As the daemon does when a lease arrives.
        let s = Instant::now();
        let o = r.reconcile(&local, &t, Pass::Event).await;
        adds.push(s.elapsed());
        ensure!(
            o.changes == 3 && o.errors.is_empty(),
            "adding one peer made {} changes, errors {:?}",
            o.changes,
            o.errors
        );
        t.remove(&extra.key);
        let s = Instant::now();
        let o = r.reconcile(&local, &t, Pass::Event).await;
        removes.push(s.elapsed());
        ensure!(
            o.changes == 3 && o.errors.is_empty(),
            "removing one peer made {} changes",
            o.changes
        );
    }
    let s = Instant::now();
    let o = r.reconcile_once(&local, &t).await;
    let idle = s.elapsed();
    ensure!(
        o.changes == 0,
        "a pass with nothing to do made {} changes",
        o.changes
    );
    Ok((full, adds, removes, idle, objects))
}

/// iproute2 making the same objects from batch files; with `metrics`
/// false, routes as flannel makes them (all with metric 0).
fn floor(n: u32, metrics: bool) -> Result<Duration> {
    let ns = host_ns()?;
    let dir = tempfile_dir()?;
    let own = vtep_mac("bench-local");
    let mut links = String::new();
    writeln!(links, "link add weft.1 address {own} mtu 1450 type vxlan id 1 dstport 8472 local 198.18.0.1 dev eth0 nolearning")?;
    writeln!(links, "link set weft.1 up")?;
    writeln!(links, "addr add 10.244.0.0/32 dev weft.1")?;
    let mut fdb = String::new();
    let mut routes = String::new();
    for i in 0..n {
        let (key, ip, data) = peer(i);
        let BackendData::Vxlan { vtep_mac, .. } = data else {
            bail!("vxlan data")
        };
        let net = key.ipv4().context("v4")?;
        writeln!(
            links,
            "neigh replace {} lladdr {vtep_mac} dev weft.1 nud permanent",
            net.network()
        )?;
        writeln!(
            fdb,
            "fdb replace {vtep_mac} dev weft.1 dst {ip} self permanent"
        )?;
        let metric = if metrics {
            route_metric(&ipnet::IpNet::V4(net))
        } else {
            0
        };
        writeln!(
            routes,
            "route replace {net} via {} dev weft.1 onlink proto 87 metric {metric}",
            net.network(),
        )?;
    }
    let files = [("links", links), ("fdb", fdb), ("routes", routes)];
    for (name, text) in &files {
        std::fs::write(dir.join(name), text)?;
    }
    let start = Instant::now();
    let path = |n: &str| dir.join(n).display().to_string();
    run("ip", &["-n", ns.name(), "-batch", &path("links")])?;
    run("bridge", &["-n", ns.name(), "-batch", &path("fdb")])?;
    run("ip", &["-n", ns.name(), "-batch", &path("routes")])?;
    let took = start.elapsed();
    let routes = ns.ip(&["route", "show", "proto", "87"])?.lines().count();
    ensure!(
        routes == n as usize,
        "iproute2 made {routes} routes, not {n}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(took)
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("weft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The daemon following N leases written to the lab's etcd.
fn daemon(n: u32) -> Result<(Duration, u64, u64, u64)> {
    let network = network_for(n + 1)?;
    let mut cfg = LabConfig::for_test(1, "vxlan");
    cfg.name = format!("b{}", std::process::id());
    cfg.pods_per_host = 0;
    cfg.network = Some(network.to_string());
    let lab = Lab::up(cfg)?;
    let before = status_kib(lab.pid("node-1")?, "VmRSS:")?;
    let own = lab.host(1)?.subnet;
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.state.fabric])
        .arg(&exe)
        .args(["inject-leases", "--count", &n.to_string()])
        .args(
            own.map(|s| vec!["--skip".to_string(), s.to_string()])
                .unwrap_or_default(),
        )
        .output()?;
    ensure!(
        out.status.success(),
        "inject-leases: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.wait_for(
        Duration::from_secs(120),
        &format!("the node to program {n} peers"),
        || {
            let s = lab.node_status(1)?;
            Ok(s["peers"].as_u64().unwrap_or(0) as u32 >= n - 1
                && s["errors"].as_array().is_some_and(|e| e.is_empty()))
        },
    )?;
    let took = start.elapsed();
    // One more resync with everything in place before reading the memory.
    std::thread::sleep(Duration::from_secs(3));
    let pid = lab.pid("node-1")?;
    let (after, peak) = (status_kib(pid, "VmRSS:")?, status_kib(pid, "VmHWM:")?);
    lab.down()?;
    Ok((took, before, after, peak))
}

pub async fn run_bench(args: Args) -> Result<()> {
    weft_tests::netns::require_root();
    for &n in &args.peers {
        // On one thread, as weft-node runs.
        let changes = args.changes;
        let (full, mut adds, mut removes, idle, objects) = tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(weft(n, changes))
        })
        .await??;
        let (floor, flannel) = tokio::task::spawn_blocking(move || {
            Ok::<_, anyhow::Error>((floor(n, true)?, floor(n, false)?))
        })
        .await??;
        println!("reconcile {n} vxlan peers ({objects} kernel objects) from empty:");
        println!(
            "  weft      {:.3} s ({:.0} objects/s)",
            full.as_secs_f64(),
            objects as f64 / full.as_secs_f64()
        );
        println!(
            "  iproute2  {:.3} s (ip -batch + bridge -batch, the floor)",
            floor.as_secs_f64()
        );
        println!(
            "  ratio     {:.2}x the floor",
            full.as_secs_f64() / floor.as_secs_f64()
        );
        println!(
            "  iproute2, every route with metric 0 (as flannel makes them): {:.3} s ({:.1}x weft)",
            flannel.as_secs_f64(),
            flannel.as_secs_f64() / full.as_secs_f64()
        );
        println!("  one peer added:   {}", summary(&mut adds));
        println!("  one peer removed: {}", summary(&mut removes));
        println!(
            "  periodic resync with nothing to do (kernel read back): {}",
            ms(idle)
        );
        if !args.no_daemon {
            let (took, before, after, peak) =
                tokio::task::spawn_blocking(move || daemon(n)).await??;
            println!(
                "  daemon: {n} leases followed and programmed in {:.2} s; RSS {:.1} MiB (idle before: {:.1} MiB, peak {:.1} MiB)",
                took.as_secs_f64(),
                after as f64 / 1024.0,
                before as f64 / 1024.0,
                peak as f64 / 1024.0
            );
        }
    }
    Ok(())
}

/// Writes `count` vxlan leases (reservations) straight into etcd, in
/// transactions of 100. Runs inside the lab's fabric namespace.
pub async fn inject(count: u32, skip: Option<String>) -> Result<()> {
    let mut c = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
    let skip: Option<SubnetKey> = skip.map(|s| SubnetKey::from_cidrs(&s)).transpose()?;
    let mut ops = Vec::new();
    let mut i = 0;
    let mut written = 0;
    while written < count {
        let (key, ip, data) = peer(i);
        i += 1;
        if Some(key) == skip {
            continue;
        }
        let attrs = LeaseAttrs::new(&format!("bench-peer-{i}"), Some(ip.parse()?), None, &data);
        ops.push(etcd_client::TxnOp::put(
            format!("/weft/network/subnets/{key}"),
            attrs.to_json(),
            None,
        ));
        written += 1;
        if ops.len() == 100 || written == count {
            c.txn(etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_holds_every_peer_and_the_local_node() {
        for total in [1, 8_189, 8_190, 50_020, 90_000] {
            let cfg = NetworkConfig::parse(network_for(total).unwrap()).unwrap();
            let pool = cfg.ipv4.as_ref().unwrap();
            let local: SubnetKey = "10.244.0.0-29".parse().unwrap();
            assert!(pool.network().contains(&local.ipv4().unwrap()));
            let last = peer(total - 1).0.ipv4().unwrap();
            assert!(
                pool.network().contains(&last),
                "{last} outside {} for {total} peers",
                pool.network()
            );
            assert_eq!(last.prefix_len(), pool.subnet_len());
        }
        assert!(network_for(90_001).is_err());
    }
}
