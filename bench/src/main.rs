//! `weft-bench`: benchmarks that print figures. Goals are checked by reading
//! these figures (recorded in bench/README.md), never by timed assertions.

mod cni;
mod control_plane;
mod convergence;
mod dataplane;
mod dns;
mod reconcile;
mod soak;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version = env!("WEFT_VERSION"), about = "weft benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Nodes joining through the controller API on a real etcd, watch
    /// fan-out, and flannel's etcd access pattern as the baseline.
    ControlPlane(control_plane::Args),
    /// Programming N peers into the kernel, against iproute2's batch mode;
    /// single changes; the daemon's memory with N peers. Needs root.
    Reconcile(reconcile::Args),
    /// iperf3 pod to pod over weft vxlan, flannel's hand-made vxlan, weft
    /// host-gw and a direct veth pair. Needs root.
    Dataplane(dataplane::Args),
    /// Time from a new host's lease until every other host has programmed
    /// it, in a lab of 20 hosts. Needs root.
    Convergence(convergence::Args),
    /// weft-cni ADD and DEL latency against the reference bridge +
    /// host-local plugins, N containers on one host. Needs root.
    Cni(cni::Args),
    /// Names: how fast a new container's name answers on every other host
    /// of 20, and weft-node's name server against dnsmasq. Needs root.
    Dns(dns::Args),
    /// Hosts joining, leaving and restarting for M minutes with short
    /// lease TTLs: memory of the controller and a node, and the lease
    /// history checked at the end. Needs root.
    Soak(soak::Args),
    /// (Used by `reconcile`: writes leases into the lab's etcd.)
    #[command(hide = true)]
    InjectLeases {
        #[arg(long)]
        count: u32,
        #[arg(long)]
        skip: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::ControlPlane(args) => control_plane::run(args).await,
        Command::Reconcile(args) => reconcile::run_bench(args).await,
        Command::Convergence(args) => {
            tokio::task::spawn_blocking(move || convergence::run_bench(args)).await?
        }
        Command::Dataplane(args) => {
            tokio::task::spawn_blocking(move || dataplane::run_bench(args)).await?
        }
        Command::Soak(args) => tokio::task::spawn_blocking(move || soak::run_bench(args)).await?,
        Command::Cni(args) => tokio::task::spawn_blocking(move || cni::run_bench(args)).await?,
        Command::Dns(args) => tokio::task::spawn_blocking(move || dns::run_bench(args)).await?,
        Command::InjectLeases { count, skip } => reconcile::inject(count, skip).await,
    }
}
