//! `weft-node`: the per-node daemon.

use anyhow::{anyhow, Context};
use clap::Parser;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use weft_lease::tls::ClientTlsFiles;
use weft_lease::NodeName;
use weft_node::daemon::{self, Options};
use weft_node::iface::IfaceChoice;

/// Keeps this node's subnet lease and programs the overlay to every peer.
#[derive(Debug, Parser)]
#[command(version = env!("WEFT_VERSION"), about)]
struct Args {
    /// Controller URL: https://HOST:PORT (with the TLS files below), or
    /// http:// for a controller without TLS. Several replicas: URLs
    /// separated by commas; the node starts on one its name picks (nodes
    /// spread over them) and moves to the next when one cannot be reached,
    /// does not answer within 10 s, or answers 502/503/504.
    #[arg(long, env = "WEFT_NODE_CONTROLLER")]
    controller: String,
    /// CA certificate (PEM) that signed the controller's certificate.
    #[arg(long, env = "WEFT_NODE_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// This node's certificate (PEM; CN = the node name, O = weft:nodes).
    /// Re-read when the file changes: rotate it without a restart.
    #[arg(long, env = "WEFT_NODE_CERT_FILE")]
    cert_file: Option<PathBuf>,
    /// Key (PEM) of --cert-file; re-read with it.
    #[arg(long, env = "WEFT_NODE_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long, env = "WEFT_NODE_NODE_NAME")]
    node_name: Option<String>,
    /// External interface by name.
    #[arg(long, env = "WEFT_NODE_IFACE", conflicts_with = "iface_regex")]
    iface: Option<String>,
    /// External interface: the first whose name matches.
    #[arg(long, env = "WEFT_NODE_IFACE_REGEX")]
    iface_regex: Option<String>,
    /// Address to publish; also picks the interface holding it unless
    /// --iface/--iface-regex is given (e.g. behind NAT).
    #[arg(long, env = "WEFT_NODE_PUBLIC_IP")]
    public_ip: Option<Ipv4Addr>,
    /// IPv6 address to publish in a network with IPv6 (default: the
    /// interface's first global IPv6 address).
    #[arg(long, env = "WEFT_NODE_PUBLIC_IPV6")]
    public_ipv6: Option<std::net::Ipv6Addr>,
    /// Where to write the lease for CNI plugins.
    #[arg(
        long,
        env = "WEFT_NODE_SUBNET_FILE",
        default_value = "/run/weft/subnet.env"
    )]
    subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network.
    #[arg(long, env = "WEFT_NODE_IP_MASQ")]
    ip_masq: bool,
    /// Address for /healthz, /readyz and /metrics; `off` to disable.
    #[arg(long, env = "WEFT_NODE_HEALTHZ", default_value = "127.0.0.1:9680")]
    healthz: String,
    /// The control socket (root only) for `weftctl node rekey`; `off` to
    /// disable.
    #[arg(
        long,
        env = "WEFT_NODE_CONTROL_SOCKET",
        default_value = weft_lease::node_control::DEFAULT_SOCKET
    )]
    control_socket: String,
    /// Seconds between reconcile passes when nothing changes.
    #[arg(long, env = "WEFT_NODE_RESYNC", default_value_t = 10)]
    resync: u64,
    /// Directory for state that must survive restarts: the ipsec backend's
    /// key pair (`ipsec-key.json`, mode 0600).
    #[arg(long, env = "WEFT_NODE_STATE_DIR", default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// ipsec backend: rotate the key pair this often (Go duration, e.g.
    /// `24h`, `90m`; `0` only on demand: SIGUSR1 or `weftctl node rekey`).
    #[arg(long, env = "WEFT_NODE_IPSEC_REKEY_INTERVAL", default_value = "24h")]
    ipsec_rekey_interval: String,
    /// wireguard backend: rotate the key pair this often (`0`, the
    /// default: only on demand, SIGUSR1 or `weftctl node rekey`).
    /// WireGuard's sessions take fresh keys every two minutes anyway; the
    /// key pair is the node's identity.
    #[arg(long, env = "WEFT_NODE_WIREGUARD_REKEY_INTERVAL", default_value = "0")]
    wireguard_rekey_interval: String,
    /// ipsec backend: the cluster PSK, a root-owned 0600 file (at most 4
    /// KiB) with the same secret on every node.
    #[arg(long, env = "WEFT_NODE_IPSEC_PSK_FILE")]
    ipsec_psk_file: Option<PathBuf>,
    /// ipsec backend: run without a PSK (anyone who can write a lease into
    /// etcd can then set up SAs with this node).
    #[arg(long, env = "WEFT_NODE_IPSEC_ALLOW_NO_PSK")]
    ipsec_allow_no_psk: bool,
    /// Start vxlan or host-gw on a node that ran ipsec (its pod traffic is
    /// then unencrypted); refused without this.
    #[arg(long, env = "WEFT_NODE_ALLOW_BACKEND_CHANGE")]
    allow_backend_change: bool,
    /// Do not serve names (DNS) to containers on the bridge gateway.
    #[arg(long, env = "WEFT_NODE_NO_DNS")]
    no_dns: bool,
    /// Port of the name server on the bridge gateway.
    #[arg(long, env = "WEFT_NODE_DNS_PORT", default_value_t = 53)]
    dns_port: u16,
    /// Where the host's resolvers are (`nameserver` lines): names outside
    /// the cluster are forwarded to them.
    #[arg(
        long,
        env = "WEFT_NODE_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    dns_resolv_conf: PathBuf,
    /// weft-cni's names file (`<dataDir>/<network>/names.json`): the names
    /// this node's containers have, registered with the controller.
    #[arg(
        long,
        env = "WEFT_NODE_CNI_NAMES_FILE",
        default_value = "/var/lib/cni/networks/weft/names.json"
    )]
    cni_names_file: PathBuf,
    /// Log filter, e.g. `info` or `weft_node=debug`.
    #[arg(long, env = "WEFT_NODE_LOG", default_value = "info")]
    log: String,
}

fn host_name() -> anyhow::Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(name.trim().to_string())
}

/// A rotation interval: `0` (only on demand) or at least a minute (a
/// rotation takes ipsec's switch delay plus its grace period to settle).
fn rekey_interval(flag: &str, text: &str) -> anyhow::Result<Duration> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d = weft_config::parse_duration(text).map_err(|e| anyhow!("{flag} {text:?}: {e}"))?;
    if d < Duration::from_secs(60) {
        anyhow::bail!(
            "{flag} must be at least 1m (or 0 for on demand only); a rotation takes a while to settle"
        );
    }
    Ok(d)
}

fn options(a: Args) -> anyhow::Result<Options> {
    let name = match a.node_name {
        Some(n) => n,
        None => host_name()?,
    };
    let node_name =
        NodeName::new(name.clone()).map_err(|e| anyhow!("--node-name {name:?}: {e}"))?;
    let iface = match (a.iface, a.iface_regex, a.public_ip) {
        (Some(n), _, _) => IfaceChoice::Name(n),
        (None, Some(re), _) => IfaceChoice::Regex(
            regex::Regex::new(&re).with_context(|| format!("--iface-regex {re:?}"))?,
        ),
        (None, None, Some(ip)) => IfaceChoice::Holding(ip),
        (None, None, None) => IfaceChoice::DefaultRoute,
    };
    let healthz = match a.healthz.as_str() {
        "off" | "" => None,
        addr => Some(
            addr.parse::<SocketAddr>()
                .with_context(|| format!("--healthz {addr:?}: expected ADDR:PORT or off"))?,
        ),
    };
    if a.resync == 0 {
        anyhow::bail!("--resync must be at least 1 second");
    }
    let ipsec_rekey_interval = rekey_interval("--ipsec-rekey-interval", &a.ipsec_rekey_interval)?;
    let wireguard_rekey_interval =
        rekey_interval("--wireguard-rekey-interval", &a.wireguard_rekey_interval)?;
    let tls = ClientTlsFiles::from_flags(a.ca_file, a.cert_file, a.key_file)?;
    Ok(Options {
        controller: a.controller,
        tls,
        node_name,
        iface,
        public_ip: a.public_ip,
        public_ipv6: a.public_ipv6,
        subnet_file: a.subnet_file,
        ip_masq: a.ip_masq,
        healthz,
        control_socket: match a.control_socket.as_str() {
            "off" | "" => None,
            p => Some(PathBuf::from(p)),
        },
        resync: Duration::from_secs(a.resync),
        watch_silence: Duration::from_secs(45),
        state_dir: a.state_dir,
        ipsec_rekey_interval,
        wireguard_rekey_interval,
        ipsec_psk_file: a.ipsec_psk_file,
        ipsec_allow_no_psk: a.ipsec_allow_no_psk,
        allow_backend_change: a.allow_backend_change,
        dns: (!a.no_dns).then_some(daemon::DnsOptions {
            port: a.dns_port,
            resolv_conf: a.dns_resolv_conf,
        }),
        cni_names_file: a.cni_names_file,
    })
}

// One thread is plenty for a node daemon, and keeps its memory small.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        // The netlink crates log every message they send or receive at
        // trace level, key attributes (WireGuard's private key and PSK,
        // the SAs' AEAD keys) included: never, whatever --log says.
        Ok(f) => f
            .add_directive("netlink_proto=off".parse().expect("a valid directive"))
            .add_directive("genetlink=off".parse().expect("a valid directive"))
            .add_directive("netlink_sys=off".parse().expect("a valid directive")),
        Err(e) => {
            eprintln!("weft-node: --log {:?}: {e}", args.log);
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let result = match options(args) {
        Ok(opts) => {
            tracing::info!(node = %opts.node_name, controller = %opts.controller, "weft-node starting");
            daemon::run(opts, shutdown()).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that says what is wrong, in the journal too.
            tracing::error!("{e:#}");
            eprintln!("weft-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
