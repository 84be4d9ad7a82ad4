//! `weftctl`: look at and change a weft network through its controller.
//!
//! Exit codes: 0 success; 1 the controller refused, or a local error, or
//! (for `status`) the controller answered that it is not ready (its reasons
//! are printed: a missing config needs a person); 2 bad usage; 3 the
//! controller (or, for `node rekey`, the node) could not be reached or is
//! temporarily unavailable (`5xx`, e.g. etcd down; the node's rotation
//! limit): the one failure that a retry may fix.

mod pki;
mod table;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use weft_lease::client::{ClientError, ControllerClient};
use weft_lease::node_control::{self, ControlReply};
use weft_lease::tls::ClientTlsFiles;

/// Operate a weft network through its controller.
#[derive(Debug, Parser)]
#[command(version = env!("WEFT_VERSION"), about)]
struct Cli {
    /// Controller URL; several replicas separated by commas (the next is
    /// tried when one cannot be reached or cannot serve).
    #[arg(
        long,
        env = "WEFT_CONTROLLER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    controller: String,
    /// CA certificate (PEM) that signed the controller's certificate; for
    /// an https:// controller.
    #[arg(long, env = "WEFT_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM): O=weft:admins to change things,
    /// O=weft:nodes to read.
    #[arg(long, env = "WEFT_CERT_FILE", global = true)]
    cert_file: Option<PathBuf>,
    /// Key (PEM) of --cert-file.
    #[arg(long, env = "WEFT_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The network config.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// All leases.
    #[command(subcommand)]
    Leases(LeasesCmd),
    /// One node's lease.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Controller readiness, subnet usage, and every lease with its TTL.
    Status,
    /// Names that resolve across the cluster (`<name>.<domain>`).
    #[command(subcommand)]
    Names(NamesCmd),
    /// Talk to a node daemon on this host (its status listener).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Certificates for a small cluster: PEM files in one directory.
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(Debug, Subcommand)]
enum PkiCmd {
    /// A new CA: ca.pem and ca-key.pem (never replaces an existing one).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// The controller's certificate: server.pem, server-key.pem.
    Server {
        #[arg(long)]
        dir: PathBuf,
        /// Every name and address nodes use to reach the controller.
        #[arg(long = "host", required = true, num_args = 1..)]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing certificate (a rotation).
        #[arg(long)]
        force: bool,
        /// Let this group read the key (0640), e.g. the user a service
        /// runs as: weft-controller.
        #[arg(long)]
        key_group: Option<String>,
    },
    /// A node's certificate (CN=NAME, O=weft:nodes): node-NAME.pem and
    /// node-NAME-key.pem.
    Node {
        name: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace an existing certificate (a rotation).
        #[arg(long)]
        force: bool,
        /// Let this group read the key (0640), e.g. the user a service
        /// runs as: weft-controller.
        #[arg(long)]
        key_group: Option<String>,
    },
    /// An administrator's certificate (CN=NAME, O=weft:admins):
    /// admin-NAME.pem and admin-NAME-key.pem.
    Admin {
        name: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace an existing certificate (a rotation).
        #[arg(long)]
        force: bool,
        /// Let this group read the key (0640), e.g. the user a service
        /// runs as: weft-controller.
        #[arg(long)]
        key_group: Option<String>,
    },
}

fn pki(cmd: PkiCmd) -> Result<ExitCode> {
    use pki::{Options, Request};
    let (dir, req, opts) = match cmd {
        PkiCmd::Init { dir, days } => (
            dir,
            Request::Ca,
            Options {
                days,
                ..Options::default()
            },
        ),
        PkiCmd::Server {
            dir,
            hosts,
            days,
            force,
            key_group,
        } => (
            dir,
            Request::Server { hosts },
            Options {
                days,
                force,
                key_group,
            },
        ),
        PkiCmd::Node {
            name,
            dir,
            days,
            force,
            key_group,
        } => (
            dir,
            Request::Node { name },
            Options {
                days,
                force,
                key_group,
            },
        ),
        PkiCmd::Admin {
            name,
            dir,
            days,
            force,
            key_group,
        } => (
            dir,
            Request::Admin { name },
            Options {
                days,
                force,
                key_group,
            },
        ),
    };
    for f in pki::issue(&dir, &req, &opts)? {
        println!("wrote {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// ipsec and wireguard backends: rotate the node's key pair now (new
    /// epoch published in its lease; peers switch over without losing
    /// traffic).
    Rekey {
        /// The node's control socket (`weft-node --control-socket`); only
        /// root may use it.
        #[arg(long, env = "WEFT_NODE_SOCKET", default_value = node_control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NetworkCmd {
    /// Print the effective config (defaults filled in).
    Get,
    /// Validate and store a config (flannel's JSON format).
    Set {
        /// File with the config; `-` reads standard input.
        #[arg(long)]
        file: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum LeasesCmd {
    /// List leases and reservations with their time left.
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum NamesCmd {
    /// Every name with its addresses and whose container it is.
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// A name for something that is not a container (admins); it stays
    /// until removed. Several addresses may share a name.
    Add {
        name: weft_config::DnsName,
        address: std::net::IpAddr,
    },
    /// Remove one name's address (any record; a container's comes back
    /// while the container has it).
    Remove {
        name: weft_config::DnsName,
        address: std::net::IpAddr,
    },
}

#[derive(Debug, Subcommand)]
enum LeaseCmd {
    /// Release every lease and reservation of a node.
    Release { node: String },
    /// Reserve a subnet for a node; it never expires and no one else gets it.
    Reserve {
        /// e.g. 10.244.7.0/24
        subnet: String,
        #[arg(long)]
        node: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weftctl: {}", explain(&e));
            if retryable(&e) {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Whether the same command may succeed later unchanged.
fn retryable(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. }) => true,
        Some(ClientError::Api { status, .. }) => *status >= 500 || *status == 429,
        _ => e
            .downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_connect() || r.is_timeout()),
    }
}

/// One line an operator can act on.
fn explain(e: &anyhow::Error) -> String {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. }) => {
            format!("{e:#} (is weft-controller running? set --controller or WEFT_CONTROLLER)")
        }
        Some(ClientError::Api { body, .. }) => format!("{} [{}]", body.message, body.error),
        _ => format!("{e:#}"),
    }
}

/// `rekey` on the node's control socket.
async fn rekey(socket: &Path) -> Result<ExitCode> {
    // A rotation waits for a reconcile pass and for the controller.
    let timeout = std::time::Duration::from_secs(120);
    // As for the controller: 3 when a retry may help.
    let code = |retryable: bool| ExitCode::from(if retryable { 3 } else { 1 });
    match node_control::request(socket, "rekey", timeout).await {
        Ok(ControlReply::Rotated { epoch }) => {
            println!("key rotated: epoch {epoch}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(ControlReply::Refused {
            error,
            message,
            retryable,
        }) => {
            eprintln!("weftctl: {message} [{error}]");
            Ok(code(retryable))
        }
        Ok(other) => {
            eprintln!("weftctl: the node answered {other:?} to a rotation");
            Ok(code(false))
        }
        Err(e) => {
            eprintln!("weftctl: {e}");
            Ok(code(e.retryable()))
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let command = match cli.command {
        Command::Pki(cmd) => return pki(cmd),
        Command::Node(NodeCmd::Rekey { socket }) => return rekey(&socket).await,
        other => other,
    };
    let tls = ClientTlsFiles::from_flags(cli.ca_file, cli.cert_file, cli.key_file)?;
    let client = ControllerClient::with_tls(&cli.controller, tls)?;
    match command {
        Command::Pki(_) | Command::Node(_) => unreachable!("handled above"),
        Command::Network(NetworkCmd::Get) => {
            let view = client.network().await?;
            match view.config {
                Some(cfg) if view.valid => println!("{}", serde_json::to_string_pretty(&cfg)?),
                _ => {
                    eprintln!(
                        "weftctl: the stored network config is invalid: {}",
                        view.error.unwrap_or_default()
                    );
                    eprintln!("stored text: {}", view.raw);
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Network(NetworkCmd::Set { file }) => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading standard input")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let view = client.set_network(&text).await?;
            println!("network config stored (revision {})", view.revision);
            let ready = client.readiness().await?;
            for w in ready.warnings {
                println!("warning: {w}");
            }
        }
        Command::Leases(LeasesCmd::List { output }) => {
            // TTLs (an etcd request per lease) take an admin certificate;
            // a node's certificate lists without them.
            let list = match client.list(true).await {
                Err(ClientError::Api { status: 403, .. }) => {
                    eprintln!("weftctl: without TTLs (they take an admin certificate)");
                    client.list(false).await?
                }
                other => other?,
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Table => {
                    print!("{}", table::leases(&list.leases));
                    for u in &list.unreadable {
                        println!("unreadable: {} ({})", u.key, u.reason);
                    }
                }
            }
        }
        Command::Lease(LeaseCmd::Release { node }) => {
            let r = client.release(&node).await?;
            let keys: Vec<String> = r.released.iter().map(|k| k.to_cidrs()).collect();
            println!("released {} of {node}", keys.join(", "));
        }
        Command::Lease(LeaseCmd::Reserve { subnet, node }) => {
            let v = client.reserve(&subnet, &node).await?;
            println!("reserved {} for {node}", v.key.to_cidrs());
        }
        Command::Names(NamesCmd::List { output }) => {
            let list = client.list_names().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Table => print!("{}", table::names(&list.names)),
            }
        }
        Command::Names(NamesCmd::Add { name, address }) => {
            let req = weft_lease::api::AddName {
                name: name.clone(),
                address,
            };
            client.add_name(&req).await?;
            println!("{name} -> {address} added");
        }
        Command::Names(NamesCmd::Remove { name, address }) => {
            if client.remove_name(&name, address).await?.removed {
                println!("{name} -> {address} removed");
            } else {
                println!("{name} -> {address} was not there");
            }
        }
        Command::Status => {
            let ready = client.readiness().await?;
            print!("{}", table::status(client.url(), &ready));
            if ready
                .reasons
                .iter()
                .any(|r| r.starts_with("leases not loaded"))
            {
                return Ok(ExitCode::from(1));
            }
            match client.list(true).await {
                Ok(list) => print!("\n{}", table::leases(&list.leases)),
                Err(e) => println!("\nleases: {}", explain(&e.into())),
            }
            if !ready.ready {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
