//! The CNI benchmark: ADD and DEL latency over N containers on one host,
//! weft-cni against Debian's reference `bridge` + `host-local` configured
//! the same way (bridge, gateway, default route, hairpin, MTU). Each call
//! is timed from spawning the plugin to its exit, as a runtime sees it;
//! the two plugins' calls alternate, so both see the same machine load.

use crate::stats::{percentile, summary};
use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use weft_tests::cni::{call_here, reference, reference_conf, weft_cni, weft_conf, Attach};
use weft_tests::netns::{require_root, Netns};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Containers per plugin (at most 250: one /24 each).
    #[arg(long, default_value_t = 200)]
    containers: u32,
}

/// Timings of one plugin.
#[derive(Debug, Default)]
struct Timings {
    add: Vec<Duration>,
    del: Vec<Duration>,
}

/// One timed call; fails the benchmark if the plugin fails.
fn timed(
    plugin: &Path,
    command: &str,
    conf: &serde_json::Value,
    attach: &Attach<'_>,
) -> Result<Duration> {
    let start = Instant::now();
    let answer = call_here(plugin, command, conf, Some(attach))?;
    let took = start.elapsed();
    ensure!(
        answer.ok,
        "{} {command} for {} failed: {} ({})",
        plugin.display(),
        attach.container_id,
        answer.out,
        answer.stderr.trim()
    );
    Ok(took)
}

pub fn run_bench(args: Args) -> Result<()> {
    require_root();
    ensure!(
        (1..=250).contains(&args.containers),
        "--containers must be 1..=250"
    );
    let n = args.containers as usize;
    let ours = weft_cni()?;
    let theirs = reference("bridge")?;
    reference("host-local")?;

    let host = Netns::new("cnibench")?;
    let dir = tempfile::tempdir()?;
    let env = dir.path().join("subnet.env");
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )?;
    let wconf = weft_conf("1.0.0", &env, &dir.path().join("weft-networks"));
    let rconf = reference_conf(
        &dir.path().join("ref-networks"),
        "10.244.6.0/24",
        "10.244.6.1",
        1450,
    );

    eprintln!("creating {} container namespaces", 2 * n);
    let mut containers: Vec<(Netns, Netns)> = Vec::with_capacity(n);
    for _ in 0..n {
        containers.push((Netns::new("cw")?, Netns::new("cr")?));
    }
    let paths: Vec<(String, String)> = containers
        .iter()
        .map(|(w, r)| {
            (
                w.path().display().to_string(),
                r.path().display().to_string(),
            )
        })
        .collect();

    // Plugins run as children of a thread inside the host namespace.
    let (w, r) = host
        .run_in(move || -> Result<(Timings, Timings)> {
            let mut w = Timings::default();
            let mut r = Timings::default();
            let ids: Vec<(String, String)> =
                (0..n).map(|i| (format!("w{i}"), format!("r{i}"))).collect();
            let eth0 = |container_id, netns| Attach {
                container_id,
                netns,
                ifname: "eth0",
            };
            let pairs: Vec<(Attach<'_>, Attach<'_>)> = ids
                .iter()
                .zip(&paths)
                .map(|((wid, rid), (wp, rp))| (eth0(wid, wp), eth0(rid, rp)))
                .collect();
            for (wa, ra) in &pairs {
                w.add.push(timed(&ours, "ADD", &wconf, wa)?);
                r.add.push(timed(&theirs, "ADD", &rconf, ra)?);
            }
            for (wa, ra) in &pairs {
                w.del.push(timed(&ours, "DEL", &wconf, wa)?);
                r.del.push(timed(&theirs, "DEL", &rconf, ra)?);
            }
            Ok((w, r))
        })
        .context("running in the host namespace")??;

    // Both left their stores empty.
    for sub in ["weft-networks/weft", "ref-networks/ref"] {
        let left = std::fs::read_dir(dir.path().join(sub))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .parse::<std::net::Ipv4Addr>()
                            .is_ok()
                    })
                    .count()
            })
            .unwrap_or(0);
        ensure!(left == 0, "{sub}: {left} addresses left after DEL");
    }

    println!("CNI ADD/DEL latency, {n} containers on one host (spawn to exit, calls alternating)");
    report("ADD", w.add, r.add);
    report("DEL", w.del, r.del);
    Ok(())
}

fn report(what: &str, mut ours: Vec<Duration>, mut theirs: Vec<Duration>) {
    let o = summary(&mut ours);
    let t = summary(&mut theirs);
    let ratio = |p: f64| {
        percentile(&theirs, p).as_secs_f64() / percentile(&ours, p).as_secs_f64().max(1e-9)
    };
    println!("{what} weft-cni:              {o}");
    println!("{what} bridge + host-local:   {t}");
    println!(
        "{what} reference / weft-cni:  p50 {:.1}x  p99 {:.1}x",
        ratio(50.0),
        ratio(99.0)
    );
}
