//! `weft-controller`: serves the lease API over etcd.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use weft_controller::tls::ServerTlsFiles;
use weft_controller::{Controller, Options};
use weft_lease::store::EtcdTls;
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
    /// CA certificate (PEM) that signed etcd's certificate; for https://
    /// endpoints.
    #[arg(long, env = "WEFT_CONTROLLER_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd run with --client-cert-auth.
    #[arg(long, env = "WEFT_CONTROLLER_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// Key (PEM) of --etcd-certfile.
    #[arg(long, env = "WEFT_CONTROLLER_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user, when etcd has authentication enabled.
    #[arg(long, env = "WEFT_CONTROLLER_ETCD_USERNAME")]
    etcd_username: Option<String>,
    /// Password of --etcd-username (prefer the environment variable: a flag
    /// shows in the process list).
    #[arg(long, env = "WEFT_CONTROLLER_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// Address to serve the API on. Without TLS, only a loopback address
    /// (or --insecure-listen).
    #[arg(long, env = "WEFT_CONTROLLER_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The controller's certificate (PEM, chain): serve HTTPS.
    #[arg(long, env = "WEFT_CONTROLLER_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// Key (PEM) of --tls-cert-file.
    #[arg(long, env = "WEFT_CONTROLLER_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// CA (PEM) that signs client certificates; every client must present
    /// one. CN = identity, O = role (weft:nodes, weft:admins).
    #[arg(long, env = "WEFT_CONTROLLER_CLIENT_CA_FILE")]
    client_ca_file: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback --listen anyway. Anyone who
    /// reaches it can take over any node's lease; the log and /readyz say
    /// so.
    #[arg(long, env = "WEFT_CONTROLLER_INSECURE_LISTEN")]
    insecure_listen: bool,
    /// Also serve /healthz, /readyz and /metrics (no lease data) over plain
    /// HTTP on this address, for probes and scrapers without a certificate.
    #[arg(long, env = "WEFT_CONTROLLER_HEALTHZ_LISTEN")]
    healthz_listen: Option<SocketAddr>,
    /// How long the subnet of a lease that ran out (its node stopped
    /// renewing) is kept from other nodes (Go duration; `0`: not at all).
    /// Default: the network's lease TTL, at most 10m.
    #[arg(long, env = "WEFT_CONTROLLER_EXPIRED_QUARANTINE")]
    expired_quarantine: Option<String>,
    /// Watch streams (one per node) served at once; more are answered 429
    /// and retry.
    #[arg(long, env = "WEFT_CONTROLLER_MAX_WATCHERS", default_value_t = 16_384)]
    max_watchers: usize,
    /// Seconds between heartbeat lines on idle watch streams.
    #[arg(long, env = "WEFT_CONTROLLER_WATCH_HEARTBEAT", default_value_t = 10)]
    watch_heartbeat: u64,
    /// Lease changes kept in memory for watch streams that resume (at most
    /// 64 MiB of them); a node that resumes from further back is served
    /// from etcd, or lists again.
    #[arg(long, env = "WEFT_CONTROLLER_WATCH_HISTORY", default_value_t = 16_384)]
    watch_history: usize,
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
    if args.max_watchers == 0 {
        anyhow::bail!("--max-watchers must be at least 1");
    }
    if args.watch_history == 0 {
        anyhow::bail!("--watch-history must be at least 1");
    }
    if args.watch_heartbeat == 0 {
        anyhow::bail!("--watch-heartbeat must be at least 1 second");
    }
    let server_tls = ServerTlsFiles::from_flags(
        args.tls_cert_file.clone(),
        args.tls_key_file.clone(),
        args.client_ca_file.clone(),
    )?
    .map(|files| files.config())
    .transpose()?;
    let expired_quarantine = match args.expired_quarantine.as_deref().map(str::trim) {
        None => None,
        Some("0") => Some(Duration::ZERO),
        Some(d) => Some(
            weft_config::parse_duration(d)
                .map_err(|e| anyhow::anyhow!("--expired-quarantine {d:?}: {e}"))?,
        ),
    };
    let mut opts = Options {
        heartbeat: Duration::from_secs(args.watch_heartbeat),
        expired_quarantine,
        max_watchers: args.max_watchers,
        history: args.watch_history,
        ..Options::default()
    };
    match (
        &server_tls,
        args.listen.ip().is_loopback(),
        args.insecure_listen,
    ) {
        (Some(_), _, true) => {
            tracing::warn!("--insecure-listen has no effect: the API is served over HTTPS")
        }
        (None, false, false) => anyhow::bail!(
            "refusing to serve the lease API without TLS on {}: anyone who reaches it could take \
             over any node's lease. Give --tls-cert-file, --tls-key-file and --client-ca-file \
             (`weftctl pki` makes them), listen on a loopback address, or accept the risk with \
             --insecure-listen",
            args.listen
        ),
        (None, false, true) => {
            let warning = format!(
                "the lease API is served without TLS on {} (--insecure-listen): anyone who \
                 reaches it can take over any node's lease",
                args.listen
            );
            tracing::warn!("{warning}");
            opts.insecure = Some(warning);
        }
        _ => {}
    }
    let mut etcd = EtcdOptions::new(args.etcd_endpoints.clone(), &args.etcd_prefix);
    if args.etcd_cafile.is_some() || args.etcd_certfile.is_some() || args.etcd_keyfile.is_some() {
        etcd.tls = Some(EtcdTls {
            ca: args.etcd_cafile.clone(),
            cert: args.etcd_certfile.clone(),
            key: args.etcd_keyfile.clone(),
        });
    }
    etcd.user = match (args.etcd_username.clone(), args.etcd_password.clone()) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        (Some(_), None) => anyhow::bail!("--etcd-username needs --etcd-password"),
        (None, Some(_)) => anyhow::bail!("--etcd-password needs --etcd-username"),
    };
    let store = EtcdStore::connect(etcd)
        .await
        .with_context(|| format!("etcd client for {:?}", args.etcd_endpoints))?;
    let controller = Controller::start(Arc::new(store), opts);
    if let Some(addr) = args.healthz_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--healthz-listen)"))?;
        let health = weft_controller::serve_health(listener, &controller, std::future::pending());
        tokio::spawn(async move {
            if let Err(e) = health.await {
                tracing::error!("health listener on {addr}: {e}");
            }
        });
        tracing::info!(listen = %addr, "serving /healthz, /readyz and /metrics");
    }
    let listener =
        listen(args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    match server_tls {
        Some(tls) => {
            tracing::info!(listen = %args.listen, prefix = %args.etcd_prefix,
                "serving the lease API over HTTPS (client certificates required)");
            weft_controller::serve_tls(listener, &controller, tls, shutdown_signal()).await?;
        }
        None => {
            tracing::info!(listen = %args.listen, prefix = %args.etcd_prefix,
                "serving the lease API over plain HTTP");
            weft_controller::serve(listener, &controller, shutdown_signal()).await?;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The API's socket, with a backlog for a cluster starting at once: with
/// the usual 1024, thousands of nodes connecting together overflow it and
/// wait for SYN retransmits (1 s, then 3 s). The kernel caps it at
/// net.core.somaxconn.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
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
