//! The daemon: pick the interface, get the network config and a lease,
//! write subnet.env, set up forwarding, then follow the leases and
//! reconcile (routes, devices, masquerade rules), renewing the lease as it
//! goes. On shutdown the data plane stays as it is, so a restart is
//! hitless.

use crate::control::{self, ControlSocket};
use crate::iface::{self, IfaceChoice};
use crate::keystore;
use crate::peers::{self, PeerTable};
use crate::reconcile::Reconciler;
use crate::rekey::{RekeyRequest, Rekeyer};
use crate::retry::{until_ok, Backoff};
use crate::status::{self, Status};
use crate::subnet_env::{self, SubnetEnv};
use crate::{health, masq, system};
use anyhow::{anyhow, bail, Context, Result};
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use weft_backends::{
    for_config, Backend, Context as BackendContext, ExternalIface, Ipsec, Keyed, LocalNode,
    NetlinkDataplane,
};
use weft_config::{BackendConfig, BackendType, NetworkConfig};
use weft_lease::api::{AcquireRequest, LeaseResponse};
use weft_lease::client::{ClientError, ControllerClient};
use weft_lease::{NodeName, SubnetKey};

/// Settings of the daemon, from flags and environment.
#[derive(Debug, Clone)]
pub struct Options {
    pub controller: String,
    /// HTTPS to the controller: its CA, this node's certificate and key.
    pub tls: Option<weft_lease::tls::ClientTlsFiles>,
    pub node_name: NodeName,
    pub iface: IfaceChoice,
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address to publish (default: the interface's).
    pub public_ipv6: Option<Ipv6Addr>,
    pub subnet_file: PathBuf,
    pub ip_masq: bool,
    pub healthz: Option<SocketAddr>,
    /// The control socket for `weftctl node rekey` (root only).
    pub control_socket: Option<PathBuf>,
    /// Reconcile at least this often.
    pub resync: Duration,
    /// Reconnect the lease watch after this long without a line.
    pub watch_silence: Duration,
    /// Where the node keeps state that must survive restarts (the IPsec key).
    pub state_dir: PathBuf,
    /// Rotate the IPsec key this often (zero: only on demand).
    pub ipsec_rekey_interval: Duration,
    /// Rotate the WireGuard key this often (zero: only on demand).
    pub wireguard_rekey_interval: Duration,
    /// The cluster PSK for the ipsec backend (a node-local file).
    pub ipsec_psk_file: Option<PathBuf>,
    /// Run ipsec without a PSK.
    pub ipsec_allow_no_psk: bool,
    /// Start a backend weaker than the one this node ran before (ipsec to
    /// vxlan or host-gw: pod traffic in the clear).
    pub allow_backend_change: bool,
    /// Serve names to containers (`None`: `--no-dns`).
    pub dns: Option<DnsOptions>,
    /// weft-cni's names file: the names this node's containers have.
    pub cni_names_file: PathBuf,
}

/// The name server's settings.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    pub port: u16,
    /// The host's resolvers, for names outside the cluster.
    pub resolv_conf: PathBuf,
}

/// What the lease-keeping task needs.
struct Keeper {
    client: ControllerClient,
    opts: Options,
    public_ip: Ipv4Addr,
    /// Published in a network with IPv6.
    public_ipv6: Option<Ipv6Addr>,
    ext: ExternalIface,
    backend: Arc<dyn Backend>,
    ipsec: Option<Arc<Ipsec>>,
    status: Arc<Status>,
    local: watch::Sender<Option<Arc<LocalNode>>>,
    /// subnet.env as last written (its expiry moves with each renewal).
    env: std::sync::Mutex<Option<SubnetEnv>>,
    /// The domain the name server serves (fixed when it starts, whatever a
    /// later config says), for subnet.env; `None` with `--no-dns`.
    dns_domain: Option<weft_config::DnsName>,
}

/// When a lease runs out unless renewed, as Unix time.
fn lease_expiry(resp: &LeaseResponse) -> Option<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    resp.lease.ttl_seconds.map(|t| now + t)
}

impl Keeper {
    fn request(&self, previous: Option<&SubnetKey>) -> AcquireRequest {
        AcquireRequest::new(
            Some(self.public_ip),
            self.public_ipv6,
            &self.backend.lease_data(self.opts.node_name.as_str()),
            previous,
        )
    }

    /// Makes `resp` the node's lease: local node and subnet.env (the
    /// reconcile loop installs the masquerade rules for it).
    async fn install(&self, resp: &LeaseResponse, network: Arc<NetworkConfig>) -> Result<()> {
        let key = resp.lease.key;
        let old = self.local.borrow().as_ref().map(|l| l.subnet);
        if let Some(old) = old.filter(|o| *o != key) {
            tracing::warn!(
                old = %old.to_cidrs(),
                new = %key.to_cidrs(),
                "this node's subnet changed; pods started on the old subnet need restarting"
            );
        }
        let mtu = self.backend.pod_mtu(self.ext.mtu);
        let mut env = SubnetEnv::new(&network, key.ipv4(), key.ipv6(), mtu, self.opts.ip_masq);
        env.lease_expires = lease_expiry(resp);
        env.dns_domain = self.dns_domain.clone();
        subnet_env::write(&env, &self.opts.subnet_file)
            .with_context(|| format!("writing {}", self.opts.subnet_file.display()))?;
        *self.env.lock().expect("env lock") = Some(env);
        self.lease_held();
        let local = LocalNode::new(
            self.opts.node_name.as_str(),
            key,
            self.public_ip,
            self.ext.clone(),
            network,
        );
        self.status.update(|s| s.subnet = Some(key.to_cidrs()));
        self.local.send_replace(Some(Arc::new(local)));
        Ok(())
    }

    /// The lease is held again (or still): new pods are welcome.
    fn lease_held(&self) {
        if self.status.snapshot().lease_expired.is_some() {
            tracing::info!("our lease is held again; taking new pods");
        }
        self.status.update(|s| s.lease_expired = None);
    }

    /// A renewal succeeded: subnet.env gets the new expiry.
    fn renewed(&self, resp: &LeaseResponse) {
        let mut env = self.env.lock().expect("env lock");
        if let Some(env) = env.as_mut() {
            env.lease_expires = lease_expiry(resp);
            if let Err(e) = subnet_env::write(env, &self.opts.subnet_file) {
                tracing::warn!("writing {}: {e}", self.opts.subnet_file.display());
            }
        }
        drop(env);
        self.lease_held();
    }

    /// A renewal failed: past the lease's expiry, stop taking new pods (the
    /// controller may give the subnet to another node once its quarantine
    /// ends); the data plane stays as it is.
    fn check_expiry(&self) {
        let expires = self
            .env
            .lock()
            .expect("env lock")
            .as_ref()
            .and_then(|e| e.lease_expires);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(t) = expires.filter(|t| *t <= now) {
            if self.status.snapshot().lease_expired.is_none() {
                let why = format!(
                    "our lease expired {}s ago without a renewal (is the controller reachable?): \
                     no new pods until it is renewed",
                    now - t
                );
                tracing::error!("{why}");
                self.status.update(|s| s.lease_expired = Some(why));
            }
        }
    }

    /// The lease is gone (released, deleted, expired): no new pods until
    /// we hold one again; subnet.env says so to weft-cni.
    fn lease_lost(&self, why: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(env) = self.env.lock().expect("env lock").as_mut() {
            env.lease_expires = Some(now);
            if let Err(e) = subnet_env::write(env, &self.opts.subnet_file) {
                tracing::warn!("writing {}: {e}", self.opts.subnet_file.display());
            }
        }
        let why = format!("{why}: no new pods until this node holds a lease again");
        self.status.update(|s| s.lease_expired = Some(why));
    }

    /// What is wrong with our lease as the store has it now, if anything:
    /// gone, or changed by someone else (its node, public IP or backend
    /// data are no longer what this node publishes).
    fn tampered(&self, current: &LeaseResponse, table: &PeerTable) -> Option<String> {
        // Until the table has caught up with our own write, it may not
        // show it yet.
        if !table.synced || table.revision < current.lease.revision {
            return None;
        }
        let key = current.lease.key.to_cidrs();
        let name = self.opts.node_name.as_str();
        let changed = match table.leases().get(&current.lease.key) {
            None => {
                return Some(format!(
                    "our lease is gone from the store: {key} (released, or deleted by someone; \
                     store revision {})",
                    table.revision
                ))
            }
            Some(Err(s)) => format!("is unreadable now: {}", s.reason),
            Some(Ok(p)) if p.node.as_deref() != Some(name) => {
                format!("now names node {:?}", p.node.as_deref().unwrap_or(""))
            }
            Some(Ok(p)) if p.public_ip != self.public_ip => {
                format!(
                    "now has public IP {} (ours is {})",
                    p.public_ip, self.public_ip
                )
            }
            Some(Ok(p)) if p.public_ipv6 != self.public_ipv6 => {
                format!(
                    "now has public IPv6 address {:?} (ours is {:?})",
                    p.public_ipv6, self.public_ipv6
                )
            }
            Some(Ok(p)) if p.backend != self.backend.lease_data(name) => {
                format!("now has backend data {:?}, not ours", p.backend)
            }
            Some(Ok(_)) => return None,
        };
        Some(format!(
            "our lease was rewritten in the store by someone else: {key} {changed} (store \
             revision {})",
            table.revision
        ))
    }

    /// Renews the lease for ever; re-acquires when it is gone or no longer
    /// fits the network, and at once when the store shows it gone or
    /// changed by someone else (a renewal may be an hour away).
    async fn keep(self, mut current: LeaseResponse, mut table: watch::Receiver<PeerTable>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut delay = renew_interval(&current);
        let mut following = true;
        loop {
            let renew_at = tokio::time::Instant::now() + delay;
            // Wait for the renewal, looking at every change of the leases.
            let tampered = loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(renew_at) => break None,
                    r = table.changed(), if following => {
                        if r.is_err() {
                            following = false;
                            continue;
                        }
                        let tampered = self.tampered(&current, &table.borrow_and_update());
                        if let Some(why) = tampered {
                            break Some(why);
                        }
                    }
                }
            };
            if let Some(why) = tampered {
                self.status
                    .renewals
                    .get_or_create(&vec![("result", "tampered")])
                    .inc();
                tracing::warn!("{why}; acquiring again");
                if why.starts_with("our lease is gone") {
                    self.lease_lost("our lease is gone from the store");
                }
                current = self.reacquire(Some(current.lease.key)).await;
                delay = renew_interval(&current);
                continue;
            }
            match self.client.renew(self.opts.node_name.as_str()).await {
                Ok(resp) => {
                    self.status
                        .renewals
                        .get_or_create(&vec![("result", "ok")])
                        .inc();
                    backoff.reset();
                    let moved = resp.lease.key != current.lease.key;
                    let misfit = !resp.lease.fits_network && !resp.network.is_null();
                    current = if moved || misfit {
                        tracing::info!(
                            subnet = %resp.lease.key.to_cidrs(),
                            "the controller has another lease for this node, or ours left the network; acquiring again"
                        );
                        self.reacquire(Some(current.lease.key)).await
                    } else {
                        self.renewed(&resp);
                        resp
                    };
                    delay = renew_interval(&current);
                }
                Err(ClientError::Api { status: 404, .. }) => {
                    self.status
                        .renewals
                        .get_or_create(&vec![("result", "lost")])
                        .inc();
                    tracing::warn!(subnet = %current.lease.key.to_cidrs(), "our lease is gone (expired or released); acquiring again");
                    self.lease_lost("our lease is gone (expired or released)");
                    current = self.reacquire(Some(current.lease.key)).await;
                    delay = renew_interval(&current);
                }
                Err(e) => {
                    self.status
                        .renewals
                        .get_or_create(&vec![("result", "error")])
                        .inc();
                    delay = backoff.next_delay();
                    tracing::warn!("renewing the lease: {e}; retrying in {delay:?} (the data plane stays as it is)");
                    self.check_expiry();
                }
            }
        }
    }

    async fn reacquire(&self, previous: Option<SubnetKey>) -> LeaseResponse {
        loop {
            let epoch = self.ipsec.as_ref().map(|i| i.epoch());
            let req = self.request(previous.as_ref());
            let resp = until_ok("acquiring a lease", || {
                self.client.acquire(self.opts.node_name.as_str(), &req)
            })
            .await;
            if let (Some(i), Some(e)) = (&self.ipsec, epoch) {
                i.published(e);
            }
            let network = match NetworkConfig::from_value(resp.network.clone()) {
                Ok(n) => Arc::new(n),
                Err(e) => {
                    tracing::warn!("the controller sent a network config we cannot read: {e}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            if network.backend.backend_type() != self.backend.backend_type() {
                tracing::error!(
                    running = %self.backend.backend_type(),
                    configured = %network.backend.backend_type(),
                    "the network's backend changed; restart weft-node to switch"
                );
            }
            match self.install(&resp, network).await {
                Ok(()) => {
                    tracing::info!(
                        subnet = %resp.lease.key.to_cidrs(),
                        revision = resp.lease.revision,
                        previous = ?previous.map(|p| p.to_cidrs()),
                        "lease acquired"
                    );
                    return resp;
                }
                Err(e) => {
                    tracing::error!("{e:#}; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}

/// Renew at a third of the TTL (at most hourly): two chances to fail.
fn renew_interval(resp: &LeaseResponse) -> Duration {
    let ttl = resp.lease.ttl_seconds.map_or(3600, |t| t.max(1));
    Duration::from_secs((ttl / 3).clamp(1, 3600))
}

/// Fetches the network config, waiting for the controller as long as it takes.
async fn network(client: &ControllerClient) -> NetworkConfig {
    until_ok(
        &format!("getting the network config from {}", client.url()),
        || async {
            let view = client.network().await.map_err(|e| e.to_string())?;
            match (view.valid, view.config) {
                (true, Some(c)) => NetworkConfig::from_value(c).map_err(|e| e.to_string()),
                _ => Err(format!(
                    "the stored network config is invalid: {}",
                    view.error.unwrap_or_default()
                )),
            }
        },
    )
    .await
}

/// The backend the network config asks for, and the one whose key
/// rotates, built by [`for_config`]. What the node adds: a kernel that can
/// run an encrypting backend (checked first, so a node that cannot encrypt
/// never pretends to), the cluster PSK for ipsec (a node-local file), and
/// the logs.
async fn make_backend(
    network: &NetworkConfig,
    opts: &Options,
    dp: &NetlinkDataplane,
) -> Result<(Arc<dyn Backend>, Option<Keyed>)> {
    check_backend_change(
        network.backend.backend_type(),
        &opts.state_dir,
        opts.allow_backend_change,
    )?;
    let mut ctx = BackendContext::new(&opts.state_dir);
    match &network.backend {
        BackendConfig::Ipsec(cfg) => {
            dp.probe_ipsec().await.map_err(|e| {
                anyhow!(
                    "the ipsec backend cannot run on this kernel ({}): {e}",
                    kernel_release()
                )
            })?;
            if let Some(f) = &cfg.psk_file {
                tracing::warn!(
                    "the network config names a PSK file ({}); it is ignored: the PSK is a \
                     node's own setting (--ipsec-psk-file), not something the cluster config \
                     (which every node can read, and etcd's writers can change) decides",
                    f.display()
                );
            }
            ctx.ipsec_psk = match (&opts.ipsec_psk_file, opts.ipsec_allow_no_psk) {
                (Some(f), _) => Some(keystore::read_psk(f).context("--ipsec-psk-file")?),
                (None, true) => {
                    tracing::warn!(
                        "ipsec without a PSK (--ipsec-allow-no-psk): any node whose lease the \
                         others accept can set up SAs with them"
                    );
                    None
                }
                (None, false) => bail!(
                    "the ipsec backend needs the cluster PSK: give --ipsec-psk-file (the same \
                     secret on every node, a root-owned 0600 file), or --ipsec-allow-no-psk to \
                     run without one (then anyone who can write a lease into etcd can set up \
                     SAs with every node)"
                ),
            };
        }
        BackendConfig::Wireguard(_) => {
            dp.probe_wireguard().await.map_err(|e| {
                anyhow!(
                    "the wireguard backend cannot run on this kernel ({}): {e}",
                    kernel_release()
                )
            })?;
        }
        BackendConfig::Vxlan(_) | BackendConfig::HostGw => {}
    }
    let psk = ctx.ipsec_psk.is_some();
    let built = for_config(&network.backend, &ctx)?;
    match (&network.backend, &built.keyed) {
        (BackendConfig::Ipsec(_), Some(k)) => tracing::info!(
            epoch = k.epoch(),
            psk,
            rekey_every = ?opts.ipsec_rekey_interval,
            "ipsec backend: ESP tunnel mode, {}", weft_backends::state::XFRM_AEAD
        ),
        (BackendConfig::Wireguard(cfg), Some(k @ Keyed::Wireguard(wg, _))) => tracing::info!(
            public_key = %wg.public_key(),
            epoch = k.epoch(),
            mode = cfg.mode.as_str(),
            port = cfg.listen_port,
            psk = cfg.psk.is_some(),
            rekey_every = ?opts.wireguard_rekey_interval,
            "wireguard backend"
        ),
        _ => {}
    }
    Ok((built.backend, built.keyed))
}

/// Refuses to go from an encrypting backend to one that is not, unless
/// told to; remembers the backend that runs.
fn check_backend_change(wanted: BackendType, state_dir: &Path, allow: bool) -> Result<()> {
    let before = keystore::remembered_backend(state_dir)?;
    let encrypts =
        |b: &str| b == BackendType::Ipsec.as_str() || b == BackendType::Wireguard.as_str();
    if let Some(b) = &before {
        if encrypts(b) && !encrypts(wanted.as_str()) {
            if !allow {
                bail!(
                    "refusing to start the {wanted} backend: this node ran {b} (remembered in \
                     {}), and {wanted} sends pod traffic between nodes unencrypted. If the \
                     network's backend was changed on purpose, give --allow-backend-change",
                    state_dir.display()
                );
            }
            tracing::warn!("switching from {b} to {wanted} (--allow-backend-change): pod traffic between nodes is no longer encrypted");
        }
    }
    if before.as_deref() != Some(wanted.as_str()) {
        keystore::remember_backend(state_dir, wanted.as_str())?;
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| "Linux".into())
}

/// Runs the daemon until `shutdown`; returns an error only for problems
/// that waiting cannot fix (no usable interface, a backend this kernel or
/// build cannot run).
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<()> {
    let status = Arc::new(Status::new(opts.node_name.as_str()));
    let mut tasks = JoinSet::new();
    let (rekey_tx, rekey_rx) = mpsc::channel(4);
    let names_wake = Arc::new(tokio::sync::Notify::new());
    if let Some(addr) = opts.healthz {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--healthz {addr}: cannot listen"))?;
        let router = health::router(status.clone());
        tasks.spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
    }
    if let Some(path) = &opts.control_socket {
        let socket = ControlSocket::bind(path)?;
        tracing::info!(socket = %path.display(), "control socket for weftctl node rekey (root only)");
        tasks.spawn(socket.serve(rekey_tx, names_wake.clone(), control::Policy::default()));
    }
    tokio::select! {
        r = start(opts, status, &mut tasks, rekey_rx, names_wake) => r,
        _ = shutdown => {
            tracing::info!("stopping; the data plane stays in place");
            system::sd_notify("STOPPING=1");
            Ok(())
        }
    }
    // Dropping `tasks` stops every task; nothing is removed from the kernel.
}

async fn start(
    opts: Options,
    status: Arc<Status>,
    tasks: &mut JoinSet<()>,
    rekey_rx: mpsc::Receiver<RekeyRequest>,
    names_wake: Arc<tokio::sync::Notify>,
) -> Result<()> {
    let dp = Arc::new(NetlinkDataplane::new().context("netlink")?);
    if opts.ip_masq {
        masq::probe()
            .await
            .map_err(|e| anyhow!("--ip-masq needs nftables: {e}"))?;
    }
    // With replicas, nodes start on different ones (by name).
    let client = ControllerClient::with_tls(&opts.controller, opts.tls.clone())?
        .spread(opts.node_name.as_str());

    status.phase("choosing the external interface");
    let ifaces = dp.interfaces().await?;
    let chosen = iface::choose(
        &ifaces,
        dp.default_route_interface().await?,
        &opts.iface,
        opts.public_ip,
    )
    .map_err(|e| anyhow!(e))?;
    tracing::info!(iface = %chosen.ext.name, public_ip = %chosen.public_ip, mtu = chosen.ext.mtu, "external interface");

    let previous = match subnet_env::read(&opts.subnet_file) {
        Ok(env) => env.as_ref().and_then(subnet_env::key),
        Err(e) => {
            tracing::warn!("ignoring {e}");
            None
        }
    };

    // The backend comes from the network config; the lease request carries
    // the backend's data, and the controller checks both agree.
    let (network, backend, keyed, lease, public_ipv6) = loop {
        status.phase(format!(
            "waiting for the network config from {}",
            opts.controller
        ));
        let network = network(&client).await;
        let (backend, keyed) = make_backend(&network, &opts, &dp).await?;
        status.update(|s| s.backend = Some(backend.backend_type().to_string()));
        status.phase(format!("acquiring a lease from {}", opts.controller));
        // As flannel: a public IPv6 address only in a network with IPv6
        // (wireguard's auto mode would otherwise reach peers over it).
        let public_ipv6 = network
            .ipv6
            .is_some()
            .then(|| opts.public_ipv6.or(chosen.public_ipv6))
            .flatten();
        if network.ipv6.is_some() && public_ipv6.is_none() {
            tracing::warn!(
                iface = %chosen.ext.name,
                "the network has IPv6 but this node has no public IPv6 address (none on the \
                 interface, no --public-ipv6): peers reach its IPv6 pods only through backends \
                 that carry IPv6 over IPv4 (vxlan)"
            );
        }
        let req = AcquireRequest::new(
            Some(chosen.public_ip),
            public_ipv6,
            &backend.lease_data(opts.node_name.as_str()),
            previous.as_ref(),
        );
        let got = until_ok("acquiring a lease", || async {
            match client.acquire(opts.node_name.as_str(), &req).await {
                Err(ClientError::Api { body, .. }) if body.error == "backend_mismatch" => Ok(None),
                Err(e) => Err(e),
                Ok(r) => Ok(Some(r)),
            }
        })
        .await;
        match got {
            Some(lease) => break (network, backend, keyed, lease, public_ipv6),
            None => {
                tracing::info!("the network's backend changed meanwhile; reading the config again")
            }
        }
    };
    tracing::info!(
        subnet = %lease.lease.key.to_cidrs(),
        revision = lease.lease.revision,
        backend = %backend.backend_type(),
        previous = ?previous.map(|p| p.to_cidrs()),
        "lease acquired"
    );
    system::enable_forwarding(network.ipv6.is_some()).map_err(|e| anyhow!(e))?;
    let ipsec = keyed.as_ref().and_then(Keyed::ipsec).cloned();
    if let Some(i) = &ipsec {
        i.published(i.epoch());
        status.ipsec_keys(&i.key_status());
    }

    let (local_tx, local_rx) = watch::channel(None);
    let keeper = Keeper {
        client: client.clone(),
        opts: opts.clone(),
        public_ip: chosen.public_ip,
        public_ipv6,
        ext: chosen.ext.clone(),
        backend: backend.clone(),
        ipsec: ipsec.clone(),
        status: status.clone(),
        local: local_tx,
        env: std::sync::Mutex::new(None),
        dns_domain: opts.dns.as_ref().map(|_| network.dns_domain.clone()),
    };
    let network = Arc::new(network);
    keeper.install(&lease, network.clone()).await?;
    start_names(
        &opts,
        &client,
        &network,
        local_rx.clone(),
        names_wake,
        tasks,
    );

    let (peers_tx, peers_rx) = watch::channel(PeerTable::default());
    tasks.spawn(peers::follow(
        client.clone(),
        peers_tx,
        opts.watch_silence,
        status.clone(),
    ));
    let mut reconciler = Reconciler::new(dp, backend, status.clone());
    if opts.ip_masq {
        reconciler = reconciler.with_masquerade();
    }
    let heartbeat = reconciler.heartbeat.clone();
    if let Some(keyed) = keyed {
        let interval = match keyed {
            Keyed::Ipsec(_) => opts.ipsec_rekey_interval,
            Keyed::Wireguard(..) => opts.wireguard_rekey_interval,
        };
        let rekeyer = Rekeyer {
            keyed,
            state_dir: opts.state_dir.clone(),
            kicker: reconciler.kicker(),
            client: client.clone(),
            node_name: opts.node_name.to_string(),
            public_ip: chosen.public_ip,
            public_ipv6,
            local: local_rx.clone(),
            status: status.clone(),
        };
        tasks.spawn(rekeyer.run(interval, rekey_rx));
    } else {
        // The control socket answers `no_key` from now on.
        drop(rekey_rx);
    }
    tasks.spawn(reconciler.run(local_rx, peers_rx.clone(), opts.resync));
    tasks.spawn(keeper.keep(lease, peers_rx));

    status.phase("programming the data plane");
    // Tasks whose ending is not a failure (READY and the status line)
    // live in their own set.
    let mut once = JoinSet::new();
    let ready_status = status.clone();
    once.spawn(async move {
        while !ready_status.snapshot().ready {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = ready_status.snapshot();
        tracing::info!(peers = s.peers, "ready");
        let mut shown = systemd_status(&s);
        system::sd_notify(&format!("READY=1\nSTATUS={shown}"));
        // `systemctl status weft-node` follows the node: peers come and
        // go, a lease runs out, a reconcile fails.
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = systemd_status(&ready_status.snapshot());
            if now != shown {
                system::sd_notify(&format!("STATUS={now}"));
                shown = now;
            }
        }
    });
    if let Some(every) = system::watchdog_interval() {
        // Pet the watchdog only while the reconcile loop makes progress.
        let stale_after = (opts.resync * 3).max(every * 2).as_millis() as u64;
        tasks.spawn(async move {
            let origin = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let beat = heartbeat.load(Ordering::Relaxed);
                let now = origin.elapsed().as_millis() as u64;
                if beat == 0 || now.saturating_sub(beat) < stale_after {
                    system::sd_notify("WATCHDOG=1");
                }
            }
        });
    }
    // Every task in `tasks` runs for ever; one ending is a bug worth a
    // restart. `once` is dropped (and its tasks stopped) when we return.
    let _once = once;
    match tasks.join_next().await {
        Some(Err(e)) if e.is_panic() => Err(anyhow!("a task panicked: {e}")),
        _ => Err(anyhow!("a daemon task stopped unexpectedly")),
    }
}

/// Names: follows the cluster's, registers this node's containers', and
/// (unless `--no-dns`) serves them on the bridge gateway.
fn start_names(
    opts: &Options,
    client: &ControllerClient,
    network: &NetworkConfig,
    mut local: watch::Receiver<Option<Arc<LocalNode>>>,
    wake: Arc<tokio::sync::Notify>,
    tasks: &mut JoinSet<()>,
) {
    use crate::names::{self, answer::Zone, forward::Forwarder, server};
    let table = names::Names::default();
    tasks.spawn(names::follow::follow(
        client.clone(),
        table.clone(),
        opts.watch_silence,
    ));
    tasks.spawn(
        names::register::Registrar {
            client: client.clone(),
            node: opts.node_name.clone(),
            file: opts.cni_names_file.clone(),
            names: table.clone(),
            wake,
        }
        .run(),
    );
    let Some(dns) = &opts.dns else {
        tracing::info!("--no-dns: containers' names are registered but not served here");
        return;
    };
    let networks: Vec<ipnet::IpNet> = network
        .ipv4
        .as_ref()
        .map(|p| ipnet::IpNet::V4(p.network()))
        .into_iter()
        .chain(network.ipv6.as_ref().map(|p| ipnet::IpNet::V6(p.network())))
        .collect();
    // Forwarding into the pod network could reach this server again.
    let forwarder = Forwarder::from_resolv_conf(&dns.resolv_conf, networks.clone());
    let zone = Zone {
        domain: network.dns_domain.clone(),
        networks,
    };
    let server = server::Server::new(zone, table, forwarder);
    // The bridge gateways: the first address of each of the node's subnets.
    let port = dns.port;
    let gateways = move |l: &Option<Arc<LocalNode>>| -> Vec<SocketAddr> {
        let Some(l) = l else { return Vec::new() };
        let v4 = l
            .subnet
            .ipv4()
            .map(|n| std::net::IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 1)));
        let v6 = l
            .subnet
            .ipv6()
            .map(|n| std::net::IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1)));
        v4.into_iter()
            .chain(v6)
            .map(|a| SocketAddr::new(a, port))
            .collect()
    };
    let (addrs_tx, addrs_rx) = watch::channel(gateways(&local.borrow_and_update()));
    tasks.spawn(async move {
        while local.changed().await.is_ok() {
            let now = gateways(&local.borrow_and_update());
            addrs_tx.send_if_modified(|a| {
                let changed = *a != now;
                *a = now;
                changed
            });
        }
        // The keeper is gone; the daemon is stopping.
        std::future::pending::<()>().await
    });
    tasks.spawn(server::run(server, addrs_rx));
}

/// The one-line state `systemctl status` shows (sd_notify's STATUS=).
fn systemd_status(s: &status::Snapshot) -> String {
    let subnet = s.subnet.as_deref().unwrap_or("no subnet");
    let peers = match s.peers {
        1 => "1 peer".to_string(),
        n => format!("{n} peers"),
    };
    let mut line = format!("subnet {subnet}, {peers}");
    if let Some(expired) = &s.lease_expired {
        line.push_str(&format!("; lease expired: {expired}"));
    } else if !s.ready {
        line.push_str(&format!("; not ready: {}", s.phase));
    }
    let count =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    if !s.errors.is_empty() {
        line.push_str(&format!(
            "; {} failed",
            count(s.errors.len(), "change", "changes")
        ));
    }
    if !s.skipped.is_empty() {
        line.push_str(&format!(
            "; {} skipped",
            count(s.skipped.len(), "lease", "leases")
        ));
    }
    line
}

#[cfg(test)]
mod status_line_tests {
    use super::*;

    #[test]
    fn the_systemd_status_line_names_what_is_wrong() {
        let mut s = status::Snapshot {
            ready: true,
            subnet: Some("10.244.3.0/24".into()),
            peers: 1,
            ..Default::default()
        };
        assert_eq!(systemd_status(&s), "subnet 10.244.3.0/24, 1 peer");
        s.peers = 4;
        s.errors = vec!["route 10.244.4.0/24: EEXIST".into()];
        assert_eq!(
            systemd_status(&s),
            "subnet 10.244.3.0/24, 4 peers; 1 change failed"
        );
        s.errors.clear();
        s.ready = false;
        s.phase = "waiting for the controller".into();
        s.lease_expired = Some("no renewal since 12:00:00".into());
        assert_eq!(
            systemd_status(&s),
            "subnet 10.244.3.0/24, 4 peers; lease expired: no renewal since 12:00:00"
        );
        s.lease_expired = None;
        assert_eq!(
            systemd_status(&s),
            "subnet 10.244.3.0/24, 4 peers; not ready: waiting for the controller"
        );
    }
}

#[cfg(test)]
mod backend_change_tests {
    use super::*;

    #[test]
    fn a_node_that_ran_ipsec_refuses_a_weaker_backend_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("weft");
        // Nothing remembered: anything starts, and is remembered.
        check_backend_change(BackendType::Ipsec, &state, false).unwrap();
        assert_eq!(
            keystore::remembered_backend(&state).unwrap().as_deref(),
            Some("ipsec")
        );
        for weaker in [BackendType::Vxlan, BackendType::HostGw] {
            let e = check_backend_change(weaker, &state, false).unwrap_err();
            assert!(e.to_string().contains("--allow-backend-change"), "{e}");
            assert_eq!(
                keystore::remembered_backend(&state).unwrap().as_deref(),
                Some("ipsec"),
                "a refusal changes nothing"
            );
        }
        check_backend_change(BackendType::Ipsec, &state, false).unwrap();
        // Allowed: it switches and remembers, and the way back is free.
        check_backend_change(BackendType::Vxlan, &state, true).unwrap();
        assert_eq!(
            keystore::remembered_backend(&state).unwrap().as_deref(),
            Some("vxlan")
        );
        check_backend_change(BackendType::HostGw, &state, false).unwrap();
        check_backend_change(BackendType::Ipsec, &state, false).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(state.join("backend"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
