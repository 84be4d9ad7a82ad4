//! `weft-bench`: benchmarks that print figures. Goals are checked by reading
//! these figures (recorded in bench/README.md), never by timed assertions.

mod control_plane;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "weft benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Nodes joining through the controller API on a real etcd, watch
    /// fan-out, and flannel's etcd access pattern as the baseline.
    ControlPlane(control_plane::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::ControlPlane(args) => control_plane::run(args).await,
    }
}
