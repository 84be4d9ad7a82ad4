//! A controller running in this process against a store, serving HTTP on a
//! loopback port, as the e2e tests and benchmarks use it.

use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use weft_controller::{Controller, Options};
use weft_lease::client::ControllerClient;
use weft_lease::{EtcdOptions, EtcdStore, LeaseStore};

/// A serving controller; stops when dropped.
#[derive(Debug)]
pub struct RunningController {
    pub url: String,
    pub client: ControllerClient,
    controller: Option<Controller>,
    server: JoinHandle<()>,
}

impl RunningController {
    /// Serves a controller over `store` on `127.0.0.1:<free port>`.
    pub async fn start(store: Arc<dyn LeaseStore>, opts: Options) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let controller = Controller::start(store, opts);
        let router = controller.router();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let client = ControllerClient::new(&url)?;
        tokio::time::timeout(Duration::from_secs(20), controller.synced())
            .await
            .context("controller did not load the store within 20 s")?;
        Ok(RunningController {
            url,
            client,
            controller: Some(controller),
            server,
        })
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
