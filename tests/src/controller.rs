//! A controller running in this process against a store, serving HTTPS with
//! client certificates on a loopback port (plain HTTP where that is the
//! point), as the e2e tests and benchmarks use it.

use crate::pki::TestPki;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use weft_controller::{Controller, Options};
use weft_lease::client::ControllerClient;
use weft_lease::tls::ClientTlsFiles;
use weft_lease::{EtcdOptions, EtcdStore, LeaseStore};

/// A serving controller; stops when dropped.
#[derive(Debug)]
pub struct RunningController {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// A client with an admin certificate (may do everything).
    pub client: ControllerClient,
    /// The PKI of the HTTPS controller.
    pub pki: Option<Arc<TestPki>>,
    controller: Option<Controller>,
    server: JoinHandle<()>,
}

impl RunningController {
    /// Serves a controller over `store` on `127.0.0.1:<free port>` over
    /// HTTPS with client certificates ([`TestPki::shared`]), as deployed.
    pub async fn start(store: Arc<dyn LeaseStore>, opts: Options) -> Result<Self> {
        let pki = TestPki::shared();
        let tls = pki.server()?.config()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let controller = Controller::start(store, opts);
        let serving =
            weft_controller::serve_tls(listener, &controller, tls, std::future::pending());
        let server = tokio::spawn(async move {
            let _ = serving.await;
        });
        let client = ControllerClient::with_tls(&url, Some(pki.admin("test-admin")?))?;
        Self::synced(controller, url, client, Some(pki), server).await
    }

    async fn synced(
        controller: Controller,
        url: String,
        client: ControllerClient,
        pki: Option<Arc<TestPki>>,
        server: JoinHandle<()>,
    ) -> Result<Self> {
        tokio::time::timeout(Duration::from_secs(20), controller.synced())
            .await
            .context("controller did not load the store within 20 s")?;
        Ok(RunningController {
            url,
            client,
            pki,
            controller: Some(controller),
            server,
        })
    }

    /// A client with these TLS files (a node's, another CA's, ...).
    pub fn client_with(&self, tls: ClientTlsFiles) -> Result<ControllerClient> {
        Ok(ControllerClient::with_tls(&self.url, Some(tls))?)
    }

    /// Serves a controller over etcd at `etcd_url` under `prefix`.
    pub async fn on_etcd(etcd_url: &str, prefix: &str, opts: Options) -> Result<Self> {
        let store =
            EtcdStore::connect(EtcdOptions::new(vec![etcd_url.to_string()], prefix)).await?;
        Self::start(Arc::new(store), opts).await
    }

    /// Stops serving (drops open streams and background tasks).
    pub fn stop(&mut self) {
        self.server.abort();
        self.controller.take();
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A host-gw node's acquire request, its public address `198.18.0.<last>`.
pub fn host_gw_request(last: u8) -> weft_lease::api::AcquireRequest {
    weft_lease::api::AcquireRequest::new(
        Some(format!("198.18.0.{last}").parse().expect("an IPv4 address")),
        None,
        &weft_lease::BackendData::HostGw,
        None,
    )
}

/// Options for tests: fast heartbeats and health checks.
pub fn test_options() -> Options {
    Options {
        heartbeat: Duration::from_millis(500),
        health_interval: Duration::from_millis(200),
        ..Options::default()
    }
}

/// The weft-controller binary in a child process tied to the test, its
/// output in a temporary file.
#[derive(Debug)]
pub struct ControllerProcess {
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl ControllerProcess {
    /// Starts `weft-controller` with `env` and `args` (no `WEFT_*` from the
    /// test's own environment).
    pub fn spawn(env: &[(&str, &str)], args: &[&str]) -> Result<Self> {
        use std::process::{Command, Stdio};
        let log = tempfile::NamedTempFile::new()?;
        let mut cmd = Command::new(crate::bins::workspace_bin("weft-controller")?);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WEFT_")) {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?);
        Ok(ControllerProcess {
            child: crate::process::spawn_tied(cmd)?,
            log,
        })
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Stops it (SIGTERM, then SIGKILL); how it exited.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        crate::process::stop(&mut self.child, Duration::from_secs(10))
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free `127.0.0.1:<port>`.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    format!("127.0.0.1:{port}")
}

/// Flags that make a controller serve HTTPS with `pki`'s certificates.
pub fn tls_args(pki: &TestPki) -> Result<Vec<String>> {
    let files = pki.server()?;
    Ok(vec![
        "--tls-cert-file".into(),
        files.cert.display().to_string(),
        "--tls-key-file".into(),
        files.key.display().to_string(),
        "--client-ca-file".into(),
        files.client_ca.display().to_string(),
    ])
}

/// Polls `client`'s `/readyz` until `until` holds for it; the last
/// readiness seen when it does not within `within`.
pub async fn wait_readiness(
    client: &ControllerClient,
    within: Duration,
    mut until: impl FnMut(&weft_lease::api::Readiness) -> bool,
) -> std::result::Result<weft_lease::api::Readiness, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = match client.readiness().await {
            Ok(r) if until(&r) => return Ok(r),
            Ok(r) => format!("{r:?}"),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
