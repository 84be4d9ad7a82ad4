//! A real etcd server for tests and benchmarks: Debian's `etcd` binary on
//! loopback ports with a temporary data directory, stopped by PID on drop.

use crate::process::{spawn_tied, stop};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running (or stopped, restartable) etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    binary: PathBuf,
    tls: Option<EtcdServerTls>,
}

/// etcd serving its clients over TLS, as production etcd does.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// `--cert-file`, `--key-file`: etcd's own certificate.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--trusted-ca-file`: the CA of client certificates.
    pub trusted_ca: PathBuf,
    /// `--client-cert-auth`: refuse clients without such a certificate.
    pub client_cert_auth: bool,
}

fn find_etcd() -> Result<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/sbin"])
    {
        let p = Path::new(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("etcd is not installed: this test needs a real etcd server; install Debian's etcd-server package (scripts/test does this)")
}

const DIR_PREFIX: &str = "weft-etcd-";

/// Removes data dirs left by test processes that are gone. The per-process
/// shared server is killed with its process but its directory is not (statics
/// are never dropped), so each start cleans up after earlier runs.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts a fresh etcd and waits until it is healthy.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Starts a fresh etcd, over TLS when `tls` is given.
    pub fn start_with(tls: Option<EtcdServerTls>) -> Result<Self> {
        let binary = find_etcd()?;
        sweep_stale_dirs();
        let mut last_err = None;
        // Another process may grab a port between probing and binding.
        for _ in 0..5 {
            let mut server = EtcdServer {
                child: None,
                dir: tempfile::Builder::new()
                    .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
                    .tempdir()?,
                client_port: free_port()?,
                peer_port: free_port()?,
                binary: binary.clone(),
                tls: tls.clone(),
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn launch(&mut self) -> Result<()> {
        let c = self.url();
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--name", "weft-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("weft-test={p}")])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.trusted_ca);
            if tls.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        // Debian's defaults file is not for us; keep etcd's own defaults.
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let child =
            spawn_tied(cmd).with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "etcd exited with {status} at start; log: {}",
                    self.log_tail()
                );
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                bail!(
                    "etcd did not become healthy in 20 s; log: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        if self.tls.is_some() {
            // No TLS client here: etcd says when it serves.
            return std::fs::read_to_string(self.log_path())
                .is_ok_and(|l| l.contains("ready to serve client requests"));
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// The client URL, e.g. `http://127.0.0.1:40123` (`https://` over TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Where etcd's output goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Stops etcd (SIGTERM, then SIGKILL) and keeps its data for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, Duration::from_secs(5));
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One etcd per test process, started on first use and killed when the
/// process exits. Tests isolate themselves with [`unique_prefix`]; a test
/// that compacts (global in etcd) or reads past revisions of other tests'
/// keys must start its own [`EtcdServer`] instead.
pub fn shared() -> &'static str {
    static SHARED: OnceLock<(String, std::sync::Mutex<EtcdServer>)> = OnceLock::new();
    &SHARED
        .get_or_init(|| {
            let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e:#}"));
            (server.url(), std::sync::Mutex::new(server))
        })
        .0
}

/// A key prefix no other test in this run uses.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "/weft-test/{}-{}-{}/network",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
