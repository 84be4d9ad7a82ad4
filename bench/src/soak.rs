//! The soak: a lab whose hosts join, leave and restart without pause, with
//! short lease TTLs, for M minutes. The controller's and one node's memory
//! (VmRSS) are sampled; after a warm-up, neither may grow by more than 5%
//! between the first and the last window. At the end the lease history is
//! checked (weft_tests::history) and every node must route exactly etcd's
//! other leases. Containers with names come and go on every host at the
//! same time; at the end each name must resolve, on host-1's name server,
//! to exactly the containers that still have it. Exits non-zero when
//! anything fails.

use crate::stats::median;
use anyhow::{bail, Context, Result};
use hickory_proto::op::ResponseCode;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use weft_tests::history::{acquires_in_logs, check_views, Recorder};
use weft_tests::lab::{Lab, LabConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// Hosts that stay up throughout (host-1's node is the one sampled).
    #[arg(long, default_value_t = 3)]
    stable: u32,
    /// Further hosts that join, leave and restart.
    #[arg(long, default_value_t = 4)]
    churn: u32,
    /// Lease TTL of the network (renewals every third of it).
    #[arg(long, default_value = "6s")]
    ttl: String,
    /// Seed of the sequence of joins, leaves and restarts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The controller's `--watch-history` (lease changes it keeps for
    /// resuming watches). Small, so the history is full before the
    /// warm-up ends and what grows after it is not the history filling up
    /// to its bound (16,384 changes by default, about 5 MiB here).
    #[arg(long, default_value_t = 50)]
    watch_history: usize,
    /// Containers with names alive at once at most (on any host).
    #[arg(long, default_value_t = 8)]
    named: usize,
    /// Allowed growth of each process's memory, in percent.
    #[arg(long, default_value_t = 5.0)]
    max_growth: f64,
}

/// xorshift64: a reproducible sequence from --seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    crate::stats::status_kib(pid, "VmRSS:")
}

#[derive(Debug, Default)]
struct Counts {
    joins: u32,
    leaves: u32,
    restarts: u32,
    named: u32,
    named_deleted: u32,
}

/// The names the soak's containers take: few, so a name often has several
/// containers and loses and regains them.
const NAMES: [&str; 4] = ["soak-a", "soak-b", "soak-c", "soak-d"];

/// A container with a name, made by the soak.
struct Named {
    host: u32,
    ns: String,
    name: &'static str,
    ip: Ipv4Addr,
}

/// Adds a named container on a random host or deletes one (a host's
/// removal takes its containers with it; `named` forgets them there).
fn churn_names(
    lab: &mut Lab,
    rng: &mut Rng,
    named: &mut Vec<Named>,
    max: usize,
    counts: &mut Counts,
) -> Result<()> {
    if named.len() < max && (named.is_empty() || rng.next(2) == 0) {
        let hosts: Vec<u32> = lab.state.hosts.iter().map(|h| h.index).collect();
        let host = hosts[rng.next(hosts.len())];
        add_named(lab, host, NAMES[rng.next(NAMES.len())], named, counts)?;
    } else if !named.is_empty() {
        let gone = named.swap_remove(rng.next(named.len()));
        lab.delete_pod(gone.host, &gone.ns)?;
        counts.named_deleted += 1;
    }
    Ok(())
}

/// Makes a container named `name` on host `host` and records it.
fn add_named(
    lab: &mut Lab,
    host: u32,
    name: &'static str,
    named: &mut Vec<Named>,
    counts: &mut Counts,
) -> Result<()> {
    let pod = lab.new_named_pod(host, &[name])?;
    named.push(Named {
        host,
        ns: pod.ns,
        name,
        ip: pod.ip,
    });
    counts.named += 1;
    Ok(())
}

/// Whether every name resolves on host-1's name server (asked from its
/// first container) to exactly the addresses of the containers that have
/// it; the first that does not, when one does not.
fn names_match(lab: &Lab, named: &[Named]) -> Result<Option<String>> {
    let mut want: BTreeMap<&str, Vec<String>> = NAMES.iter().map(|n| (*n, vec![])).collect();
    for n in named {
        want.entry(n.name).or_default().push(n.ip.to_string());
    }
    let host = lab.host(1)?;
    let asker = &host.pods.first().context("host-1 has no container")?.ns;
    let server = IpAddr::V4(lab.gateway(1)?);
    for (name, mut addrs) in want {
        addrs.sort();
        // The lab's network has the default domain.
        let got = weft_tests::dns::addresses(asker, server, &format!("{name}.weft."))?;
        let right = match &got {
            Ok(a) => *a == addrs,
            Err(code) => addrs.is_empty() && *code == ResponseCode::NXDomain,
        };
        if !right {
            return Ok(Some(format!("{name}: {got:?}, want {addrs:?}")));
        }
    }
    Ok(None)
}

pub fn run_bench(args: Args) -> Result<()> {
    weft_tests::netns::require_root();
    if args.minutes <= 0.0 || args.stable == 0 {
        bail!("--minutes must be positive and --stable at least 1");
    }
    let run = Duration::from_secs_f64(args.minutes * 60.0);
    // Windows of a quarter of the run (at most a minute) after a warm-up
    // of a quarter (at most 5 minutes).
    let warm = (run / 4).min(Duration::from_secs(300));
    let window = (run / 4).min(Duration::from_secs(60));
    let mut cfg = LabConfig::for_test(args.stable, "vxlan");
    cfg.detached = false;
    cfg.controller_args = vec!["--watch-history".into(), args.watch_history.to_string()];
    cfg.network = Some(format!(
        r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"vxlan"}},"LeaseTTL":"{}"}}"#,
        args.ttl
    ));
    let mut lab = Lab::up(cfg)?;
    let rec = Recorder::start(&lab)?;
    let controller = lab.pid("controller")?;
    let node = lab.pid("node-1")?;
    let stable: Vec<u32> = (1..=args.stable).collect();
    let mut rng = Rng(args.seed.max(1));
    let mut counts = Counts::default();
    let mut named: Vec<Named> = Vec::new();
    let mut samples: Vec<(Duration, u64, u64)> = Vec::new();
    let start = Instant::now();
    let mut next_sample = Duration::ZERO;
    println!(
        "soak: {} stable hosts, up to {} more joining, leaving and restarting; LeaseTTL {}; \
         controller --watch-history {}; {:.1} min",
        args.stable, args.churn, args.ttl, args.watch_history, args.minutes
    );
    while start.elapsed() < run {
        let churning: Vec<u32> = lab
            .state
            .hosts
            .iter()
            .map(|h| h.index)
            .filter(|i| !stable.contains(i))
            .collect();
        let action = match rng.next(3) {
            0 if churning.len() < args.churn as usize => 0,
            _ if churning.is_empty() => 0,
            a => a.max(1),
        };
        match action {
            0 => {
                let i = lab.start_host()?;
                lab.finish_host(i)?;
                counts.joins += 1;
            }
            1 => {
                let gone = churning[rng.next(churning.len())];
                lab.remove_host(gone)?;
                named.retain(|n| n.host != gone);
                counts.leaves += 1;
            }
            _ => {
                let what = format!("node-{}", churning[rng.next(churning.len())]);
                lab.stop(&what)?;
                lab.start(&what)?;
                counts.restarts += 1;
            }
        }
        churn_names(&mut lab, &mut rng, &mut named, args.named, &mut counts)?;
        if start.elapsed() >= next_sample {
            samples.push((start.elapsed(), rss_kib(controller)?, rss_kib(node)?));
            next_sample += Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    samples.push((start.elapsed(), rss_kib(controller)?, rss_kib(node)?));
    // Every host that is still there converges, and the history holds.
    let history = rec.finish(&lab)?;
    history.check_exclusive()?;
    let kept: Vec<String> = stable.iter().map(|i| format!("host-{i}")).collect();
    history.check_kept(&kept)?;
    let acquires = acquires_in_logs(&lab)?;
    history.check_acquires(&acquires)?;
    let live = history.live_at_end()?;
    lab.wait_for(
        Duration::from_secs(60),
        "every node's routes to match etcd's leases",
        || check_views(&lab, &live).map(|()| true),
    )?;
    // The check must find a name that resolves: when none is left, one
    // more container gets one, on the last stable host (another host than
    // the one asked, when there is one).
    if named.is_empty() {
        add_named(&mut lab, args.stable, NAMES[0], &mut named, &mut counts)?;
    }
    let mut wrong = None;
    let named_ok = lab.wait_for(
        Duration::from_secs(60),
        "every name to resolve to exactly its containers on host-1",
        || {
            wrong = names_match(&lab, &named)?;
            Ok(wrong.is_none())
        },
    );
    if let Err(e) = named_ok {
        match wrong {
            Some(wrong) => bail!("{e}: {wrong}"),
            None => return Err(e),
        }
    }
    let in_window = |from: Duration, to: Duration, pick: fn(&(Duration, u64, u64)) -> u64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 >= from && s.0 <= to)
            .map(|s| pick(s) as f64)
            .collect();
        median(&v)
    };
    let end = samples.last().map_or(run, |s| s.0);
    let mut failed = Vec::new();
    println!(
        "{} joins, {} leaves, {} restarts; {} lease changes in etcd, {} acquire answers checked; \
         no overlap, no node with two subnets, stable hosts kept their leases, every node's \
         routes match etcd",
        counts.joins,
        counts.leaves,
        counts.restarts,
        history.changes.len(),
        acquires.len()
    );
    println!(
        "{} named containers made, {} deleted (more went with their hosts), {} alive at the \
         end: every name resolves on host-1 to exactly its containers",
        counts.named,
        counts.named_deleted,
        named.len()
    );
    println!(
        "{:<22} {:>12} {:>14} {:>14} {:>8}",
        "memory (VmRSS, MiB)", "at start", "after warm-up", "at the end", "growth"
    );
    for (name, pick) in [
        (
            "weft-controller",
            (|s: &(Duration, u64, u64)| s.1) as fn(&(Duration, u64, u64)) -> u64,
        ),
        ("weft-node (host-1)", |s| s.2),
    ] {
        let first = samples.first().map_or(0.0, |s| pick(s) as f64);
        let base = in_window(warm, warm + window, pick);
        let last = in_window(end.saturating_sub(window), end, pick);
        let growth = (last / base - 1.0) * 100.0;
        println!(
            "{name:<22} {:>12.1} {:>14.1} {:>14.1} {:>7.1}%",
            first / 1024.0,
            base / 1024.0,
            last / 1024.0,
            growth
        );
        if !growth.is_finite() || growth > args.max_growth {
            failed.push(format!("{name} grew by {growth:.1}%"));
        }
    }
    println!(
        "(medians of the samples, one per 5 s, in the window after a warm-up of {} s and in the \
         last {} s)",
        warm.as_secs(),
        window.as_secs()
    );
    drop(lab);
    if !failed.is_empty() {
        bail!(
            "memory grew by more than {}%: {}",
            args.max_growth,
            failed.join("; ")
        );
    }
    Ok(())
}
