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
    /// `https://127.0.0.1:<port>`, or `http://` from [`Self::start_plain`].
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

    /// The same over plain HTTP, every caller trusted: for tests where
    /// plain HTTP is the point.
    pub async fn start_plain(store: Arc<dyn LeaseStore>, opts: Options) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let controller = Controller::start(store, opts);
        let router = controller.router();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let client = ControllerClient::new(&url)?;
        Self::synced(controller, url, client, None, server).await
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

/// Options for tests: fast heartbeats and health checks.
pub fn test_options() -> Options {
    Options {
        heartbeat: Duration::from_millis(500),
        health_interval: Duration::from_millis(200),
        ..Options::default()
    }
}
