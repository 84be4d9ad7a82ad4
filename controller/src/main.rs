//! `weft-controller`: serves the lease API over etcd.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weft_controller::{Controller, Options};
use weft_lease::{EtcdOptions, EtcdStore};

/// Hands out one subnet per node from the network config in etcd and serves
/// the lease API.
#[derive(Debug, Parser)]
#[command(version = env!("WEFT_VERSION"), about)]
struct Args {
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix in etcd; `/coreos.com/network` shares flannel's keys.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_ETCD_PREFIX",
        default_value = "/weft/network"
    )]
    etcd_prefix: String,
    /// Address to serve the API on.
    #[arg(long, env = "WEFT_CONTROLLER_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Seconds between heartbeat lines on idle watch streams.
    #[arg(long, env = "WEFT_CONTROLLER_WATCH_HEARTBEAT", default_value_t = 10)]
    watch_heartbeat: u64,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `weft=debug`.
    #[arg(long, env = "WEFT_CONTROLLER_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if args.watch_heartbeat == 0 {
        anyhow::bail!("--watch-heartbeat must be at least 1 second");
    }
    let store = EtcdStore::connect(EtcdOptions::new(
        args.etcd_endpoints.clone(),
        &args.etcd_prefix,
    ))
    .await
    .with_context(|| format!("etcd client for {:?}", args.etcd_endpoints))?;
    let opts = Options {
        heartbeat: Duration::from_secs(args.watch_heartbeat),
        ..Options::default()
    };
    let controller = Controller::start(Arc::new(store), opts);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, prefix = %args.etcd_prefix, "serving the lease API");
    weft_controller::serve(listener, &controller, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
