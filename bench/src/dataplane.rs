//! The data-plane benchmark: iperf3 pod to pod over four paths, measured
//! round-robin in one run so that machine noise hits all of them alike.
//!
//! - weft vxlan: a 2-host lab as weft programs it;
//! - flannel vxlan: an identical lab whose nodes are stopped and whose weft
//!   objects are replaced with flannel's own commands (`flannel.1`);
//! - weft host-gw: a 2-host host-gw lab;
//! - veth: two namespaces joined by one veth pair, the ceiling;
//! - weft ipsec: a 2-host ipsec lab (needs kernel ESP: run it inside the VM
//!   with `scripts/vm-test bench`);
//! - weft wireguard: a 2-host wireguard lab (needs kernel WireGuard: the
//!   VM too).
//!
//! `--paths` picks which; ratios are printed for the pairs that ran.

use crate::stats::percentile;
use anyhow::{ensure, Context, Result};
use std::process::{Command, Stdio};
use std::time::Duration;
use weft_tests::lab::{Lab, LabConfig};
use weft_tests::netns::{run, Netns};
use weft_tests::process::{spawn_tied, stop};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    /// Rounds over the paths.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Paths to measure, in order: vxlan, flannel-vxlan, host-gw, veth,
    /// ipsec, wireguard.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vxlan,flannel-vxlan,host-gw,veth",
        value_parser = ["vxlan", "flannel-vxlan", "host-gw", "veth", "ipsec", "wireguard"]
    )]
    paths: Vec<String>,
}

/// Display names of the paths.
fn title(path: &str) -> &'static str {
    match path {
        "vxlan" => "weft vxlan",
        "flannel-vxlan" => "flannel vxlan (hand-made)",
        "host-gw" => "weft host-gw",
        "veth" => "direct veth",
        "wireguard" => "weft wireguard",
        _ => "weft ipsec",
    }
}

/// Gbit/s from `from` namespace to `to` address, with a server in `server_ns`.
fn iperf(server_ns: &str, from: &str, to: &str, seconds: u32, port: u16) -> Result<f64> {
    let mut server = Command::new("ip");
    server
        .args([
            "netns",
            "exec",
            server_ns,
            "iperf3",
            "-s",
            "-1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = spawn_tied(server)?;
    // Start the client only once the server listens.
    let listening = (0..100).any(|_| {
        let ss = run(
            "ip",
            &[
                "netns",
                "exec",
                server_ns,
                "ss",
                "-Htln",
                &format!("sport = :{port}"),
            ],
        )
        .unwrap_or_default();
        if ss.trim().is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            false
        } else {
            true
        }
    });
    let out = listening
        .then(|| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    from,
                    "iperf3",
                    "-J",
                    "-c",
                    to,
                    "-p",
                    &port.to_string(),
                    "-t",
                    &seconds.to_string(),
                ])
                .output()
        })
        .transpose()?;
    stop(&mut server, Duration::from_secs(2));
    let out = out.context("the iperf3 server did not start listening")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("iperf3 from {from} to {to}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without sum_received")?;
    Ok(bps / 1e9)
}

/// Replaces weft's VXLAN objects on a 2-host lab with flannel's commands.
fn flannelize(lab: &mut Lab) -> Result<()> {
    lab.stop("node-1")?;
    lab.stop("node-2")?;
    let hosts: Vec<_> = lab.state.hosts.clone();
    for h in &hosts {
        lab.host_ip(h.index, &["link", "del", "weft.1"])?;
        let ip = h.ip.to_string();
        lab.host_ip(
            h.index,
            &[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &ip,
                "dev",
                "eth0",
                "nolearning",
                "dstport",
                "8472",
            ],
        )?;
        lab.host_ip(h.index, &["link", "set", "flannel.1", "mtu", "1450"])?;
        let subnet = h.subnet.context("subnet")?;
        lab.host_ip(
            h.index,
            &[
                "addr",
                "add",
                &format!("{}/32", subnet.network()),
                "dev",
                "flannel.1",
            ],
        )?;
        lab.host_ip(h.index, &["link", "set", "flannel.1", "up"])?;
    }
    let macs: Vec<String> = hosts
        .iter()
        .map(|h| {
            let j: serde_json::Value =
                serde_json::from_str(&lab.host_ip(h.index, &["-j", "link", "show", "flannel.1"])?)?;
            Ok(j[0]["address"].as_str().context("mac")?.to_string())
        })
        .collect::<Result<_>>()?;
    for (a, b) in [(0, 1), (1, 0)] {
        let (me, peer) = (&hosts[a], &hosts[b]);
        let subnet = peer.subnet.context("subnet")?;
        let gw = subnet.network().to_string();
        lab.host_ip(
            me.index,
            &[
                "neigh",
                "replace",
                &gw,
                "lladdr",
                &macs[b],
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ],
        )?;
        run(
            "bridge",
            &[
                "-n",
                &me.ns,
                "fdb",
                "replace",
                &macs[b],
                "dev",
                "flannel.1",
                "dst",
                &peer.ip.to_string(),
                "self",
                "permanent",
            ],
        )?;
        lab.host_ip(
            me.index,
            &[
                "route",
                "replace",
                &subnet.to_string(),
                "via",
                &gw,
                "dev",
                "flannel.1",
                "onlink",
            ],
        )?;
    }
    ensure!(
        lab.unreachable_pairs().is_empty(),
        "the hand-made flannel configuration does not connect the pods"
    );
    Ok(())
}

fn veth_pair() -> Result<(Netns, Netns)> {
    let a = Netns::new("veth-a")?;
    let b = Netns::new("veth-b")?;
    a.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        b.name(),
    ])?;
    a.ip(&["addr", "add", "10.244.250.1/30", "dev", "eth0"])?;
    b.ip(&["addr", "add", "10.244.250.2/30", "dev", "eth0"])?;
    a.ip(&["link", "set", "eth0", "up"])?;
    b.ip(&["link", "set", "eth0", "up"])?;
    Ok((a, b))
}

pub fn run_bench(args: Args) -> Result<()> {
    weft_tests::netns::require_root();
    weft_tests::bins::system_tool("iperf3", "iperf3")?;
    let pods = |lab: &Lab| -> Result<(String, String, String)> {
        let p1 = &lab.host(1)?.pods[0];
        let p2 = &lab.host(2)?.pods[0];
        Ok((p2.ns.clone(), p1.ns.clone(), p2.ip.to_string()))
    };
    let lab = |backend: &str, tag: &str| -> Result<Lab> {
        let mut cfg = LabConfig::for_test(2, backend);
        cfg.name = format!("dp{tag}{}", std::process::id());
        Lab::up(cfg)
    };
    // Everything set up first; labs and namespaces live until the end.
    let mut labs = Vec::new();
    let mut veths = Vec::new();
    let mut paths: Vec<(&str, (String, String, String))> = Vec::new();
    for (n, p) in args.paths.iter().enumerate() {
        let tag = format!("{n}");
        let endpoints = match p.as_str() {
            "vxlan" | "host-gw" | "ipsec" | "wireguard" => {
                let l = lab(p, &tag)?;
                let e = pods(&l)?;
                labs.push(l);
                e
            }
            "flannel-vxlan" => {
                let mut l = lab("vxlan", &tag)?;
                flannelize(&mut l)?;
                let e = pods(&l)?;
                labs.push(l);
                e
            }
            _ => {
                let (va, vb) = veth_pair()?;
                let e = (
                    vb.name().to_string(),
                    va.name().to_string(),
                    "10.244.250.2".to_string(),
                );
                veths.push((va, vb));
                e
            }
        };
        paths.push((title(p), endpoints));
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..args.rounds {
        for (i, (_, (server, client, to))) in paths.iter().enumerate() {
            let g = iperf(server, client, to, args.seconds, 5201 + i as u16)?;
            results[i].push(g);
        }
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }
    let median = |v: &[f64]| {
        let mut d: Vec<Duration> = v.iter().map(|g| Duration::from_secs_f64(*g)).collect();
        d.sort();
        percentile(&d, 50.0).as_secs_f64()
    };
    println!(
        "iperf3 pod to pod, {} s x {} rounds, median Gbit/s:",
        args.seconds, args.rounds
    );
    let med: Vec<f64> = results.iter().map(|r| median(r)).collect();
    for ((name, _), (m, all)) in paths.iter().zip(med.iter().zip(&results)) {
        let runs: Vec<String> = all.iter().map(|g| format!("{g:.2}")).collect();
        println!("  {name:<28} {m:>6.2}   (runs: {})", runs.join(", "));
    }
    let of = |name: &str| {
        paths
            .iter()
            .position(|(n, _)| *n == title(name))
            .map(|i| med[i])
    };
    for (a, b) in [
        ("vxlan", "flannel-vxlan"),
        ("host-gw", "veth"),
        ("vxlan", "veth"),
        ("ipsec", "vxlan"),
        ("ipsec", "host-gw"),
        ("wireguard", "vxlan"),
        ("wireguard", "ipsec"),
        ("wireguard", "host-gw"),
        ("vxlan", "host-gw"),
    ] {
        if let (Some(x), Some(y)) = (of(a), of(b)) {
            println!(
                "  {:<44} {:.3}",
                format!("{} / {}:", title(a), title(b)),
                x / y
            );
        }
    }
    drop(labs);
    Ok(())
}
