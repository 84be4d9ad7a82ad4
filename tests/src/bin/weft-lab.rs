//! `weft-lab`: a weft cluster in network namespaces on this machine.
//!
//! ```text
//! weft-lab up [HOSTS] [--backend vxlan|host-gw] [--ip-masq] [--pods N] [--name NAME]
//!              [--etcd-members N] [--controllers N]
//! weft-lab status [--name NAME]
//! weft-lab ping [--name NAME]
//! weft-lab down [--name NAME | --all]
//! ```

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use weft_tests::lab::{Lab, LabConfig};

#[derive(Debug, Parser)]
#[command(
    name = "weft-lab",
    version = env!("WEFT_VERSION"),
    about = "A weft cluster in network namespaces on this machine (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the lab: fabric with etcd and the controller, HOSTS hosts
    /// running weft-node, pods behind each host.
    Up {
        #[arg(default_value_t = 3)]
        hosts: u32,
        /// ipsec needs a kernel with ESP (scripts/vm-test boots one).
        #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw", "ipsec"])]
        backend: String,
        /// Masquerade pod traffic leaving the cluster network.
        #[arg(long)]
        ip_masq: bool,
        /// Pods per host.
        #[arg(long, default_value_t = 1)]
        pods: u32,
        /// Dual stack: IPv6 on the fabric (fdc6:7765:6674:18::/64) and for
        /// pods (fdc6:7765:6675::/48, a /64 per node) as well as IPv4.
        #[arg(long)]
        ipv6: bool,
        /// etcd members; with more than one (or several controllers) each
        /// member and controller runs in a namespace of its own on the
        /// fabric (198.18.1.K and 198.18.2.K).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
        etcd_members: u32,
        /// Controller replicas; the nodes get all of them in --controller.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
        controllers: u32,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Hosts, subnets, backend and node health.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Pod-to-pod reachability matrix.
    Ping {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Attach one more pod to host HOST through weft-cni ADD.
    AddPod {
        host: u32,
        /// Names for the pod (resolvable as NAME.weft on every host).
        #[arg(long = "as", value_delimiter = ',')]
        names: Vec<String>,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Ask host HOST's name server (from its first pod) for NAME's
    /// addresses, e.g. `weft-lab lookup 2 web.weft`.
    Lookup {
        host: u32,
        /// The name to look up.
        query: String,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Detach pod POD (its namespace name) from host HOST: weft-cni DEL.
    DelPod {
        host: u32,
        pod: String,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Print the CNI network config the lab uses on host HOST.
    CniConf {
        host: u32,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Tear the lab down, also the leftovers of a crashed run.
    Down {
        #[arg(long, default_value = "lab", conflicts_with = "all")]
        name: String,
        /// Every lab on this machine.
        #[arg(long)]
        all: bool,
    },
}

fn status(lab: &Lab) -> String {
    let mut out = format!(
        "lab {} ({} backend{})\n",
        lab.state.name,
        lab.state.backend,
        if lab.state.ip_masq { ", ip-masq" } else { "" }
    );
    let leader = lab
        .etcd_status()
        .ok()
        .and_then(|s| s.into_iter().find(|m| m.1).map(|m| m.0));
    for c in lab.controller_names() {
        let state = match (lab.running(&c), lab.controller_healthy(&c)) {
            (false, _) => "STOPPED",
            (true, true) => "running",
            (true, false) => "running, not answering",
        };
        out.push_str(&format!("{c:<13} {state}\n"));
    }
    for e in lab.etcd_names() {
        let state = match (lab.running(&e), leader.as_deref() == Some(e.as_str())) {
            (false, _) => "STOPPED",
            (true, true) => "running, leader",
            (true, false) => "running",
        };
        out.push_str(&format!("{e:<13} {state}\n"));
    }
    out.push_str(&format!(
        "controllers:  {} (HTTPS with client certificates, PKI in {})\n\n",
        lab.controller_urls().join(","),
        lab.pki_dir().display()
    ));
    out.push_str(&format!(
        "{:<8} {:<14} {:<16} {:<8} {:<6} {}\n",
        "HOST", "PUBLIC IP", "SUBNET", "NODE", "PEERS", "NOTES"
    ));
    for h in &lab.state.hosts {
        let (state, peers, notes) = match lab.node_status(h.index) {
            Ok(s) => (
                if s["ready"] == true {
                    "ready"
                } else {
                    "starting"
                }
                .to_string(),
                s["peers"].to_string(),
                {
                    let mut n: Vec<String> = Vec::new();
                    if let Some(e) = s["errors"].as_array().filter(|e| !e.is_empty()) {
                        n.push(format!("{} errors", e.len()));
                    }
                    if let Some(k) = s["skipped"].as_array().filter(|k| !k.is_empty()) {
                        n.push(format!("{} skipped", k.len()));
                    }
                    n.join(", ")
                },
            ),
            Err(_) if !lab.running(&format!("node-{}", h.index)) => {
                ("STOPPED".into(), "-".into(), String::new())
            }
            Err(e) => ("no answer".into(), "-".into(), format!("{e:#}")),
        };
        let subnet = h.subnet.map_or("-".to_string(), |s| s.to_string());
        out.push_str(&format!(
            "{:<8} {:<14} {:<16} {:<8} {:<6} {}\n",
            h.name, h.ip, subnet, state, peers, notes
        ));
    }
    out.push_str(&format!("\nstate, logs: {}\n", lab.dir().display()));
    out.push_str(&format!(
        "weftctl as the lab's admin: ip netns exec {} weftctl {} leases list\n",
        lab.state.fabric,
        lab.admin_flags().join(" ")
    ));
    out
}

/// The matrix; returns it and whether every pair works.
fn ping(lab: &Lab) -> (String, bool) {
    let pods = lab.pods();
    // A pod by its IPv4 address, or its IPv6 one in an IPv6-only network.
    let name = |p: &weft_tests::lab::PodState| match p.ip6 {
        Some(v6) if p.ip.is_unspecified() => v6.to_string(),
        _ => p.ip.to_string(),
    };
    let mut out = format!("{:<20}", "from \\ to");
    for (_, p) in &pods {
        out.push_str(&format!(" {:<14}", name(p)));
    }
    out.push('\n');
    let mut all = true;
    for (h, a) in &pods {
        out.push_str(&format!("{:<20}", format!("{} (h{h})", name(a))));
        for (_, b) in &pods {
            // Dual stack: "ok ok6", each family on its own.
            let cell = if a == b {
                "-".to_string()
            } else {
                let (v4, v6) = lab.reaches_pod(a, b);
                all &= v4 != Some(false) && v6 != Some(false);
                let mut c = Vec::new();
                if let Some(v4) = v4 {
                    c.push(if v4 { "ok" } else { "FAIL" });
                }
                if let Some(v6) = v6 {
                    c.push(if v6 { "ok6" } else { "FAIL6" });
                }
                c.join(" ")
            };
            out.push_str(&format!(" {cell:<14}"));
        }
        out.push('\n');
    }
    (out, all)
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Cmd::Up {
            hosts,
            backend,
            ip_masq,
            pods,
            ipv6,
            etcd_members,
            controllers,
            name,
        } => {
            if !(1..=200).contains(&hosts) {
                bail!("HOSTS must be between 1 and 200");
            }
            let cfg = LabConfig {
                name,
                hosts,
                backend,
                ip_masq,
                pods_per_host: pods,
                detached: true,
                resync: 5,
                network: None,
                etcd_members,
                controllers,
                etcd_quota_bytes: None,
                controller_args: Vec::new(),
                ipv6,
            };
            let lab = Lab::up(cfg)?;
            print!("{}", status(&lab));
            let (matrix, ok) = ping(&lab);
            println!(
                "\npods were attached by weft-cni (see weft-lab cni-conf 1; add more with weft-lab add-pod 1)\npod-to-pod reachability:\n{matrix}"
            );
            println!("try: weft-lab status | weft-lab ping | weft-lab add-pod 1 --as web | weft-lab lookup 2 web.weft | weft-lab down");
            Ok(ok)
        }
        Cmd::Status { name } => {
            print!("{}", status(&Lab::load(&name)?));
            Ok(true)
        }
        Cmd::Ping { name } => {
            let (matrix, ok) = ping(&Lab::load(&name)?);
            print!("{matrix}");
            Ok(ok)
        }
        Cmd::AddPod { host, names, name } => {
            let mut lab = Lab::load(&name)?;
            let pod = if names.is_empty() {
                lab.new_pod(host)?
            } else {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                lab.new_named_pod(host, &names)?
            };
            println!("pod {} has {}", pod.ns, pod.ip);
            Ok(true)
        }
        Cmd::Lookup { host, query, name } => {
            let lab = Lab::load(&name)?;
            let pod = lab
                .host(host)?
                .pods
                .first()
                .context("the host has no pod to ask from")?
                .ns
                .clone();
            let server = std::net::IpAddr::V4(lab.gateway(host)?);
            let fqdn = format!("{}.", query.trim_end_matches('.'));
            let mut found = false;
            for rtype in [
                hickory_proto::rr::RecordType::A,
                hickory_proto::rr::RecordType::AAAA,
            ] {
                let (code, answers) = weft_tests::dns::ask(&pod, server, &fqdn, rtype)?;
                for a in &answers {
                    println!("{query} {rtype} {a}");
                }
                found |= !answers.is_empty();
                if code != hickory_proto::op::ResponseCode::NoError {
                    println!("{query}: {code} (asked {server} from {pod})");
                    break;
                }
            }
            Ok(found)
        }
        Cmd::DelPod { host, pod, name } => {
            let mut lab = Lab::load(&name)?;
            lab.delete_pod(host, &pod)?;
            println!("pod {pod} removed");
            Ok(true)
        }
        Cmd::CniConf { host, name } => {
            let lab = Lab::load(&name)?;
            lab.host(host)?;
            println!("{}", serde_json::to_string_pretty(&lab.cni_conf(host))?);
            Ok(true)
        }
        Cmd::Down { name, all } => {
            if all {
                let gone = Lab::down_all()?;
                println!("removed {} lab(s) {gone:?}", gone.len());
            } else if Lab::down_by_name(&name)? {
                println!("lab {name} removed");
            } else {
                println!("no lab named {name}");
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("weft-lab: {e:#}");
            ExitCode::from(1)
        }
    }
}
