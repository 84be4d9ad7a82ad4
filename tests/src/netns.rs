//! Throwaway network namespaces for privileged tests, with `ip -j` and
//! `bridge -j` as the oracle. Names carry the owning process id, so
//! namespaces left by a crashed run are removed by the next one.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "weftt-";

/// Fails the test with a clear message unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root to create network namespaces: run it with scripts/test (as root)"
    );
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (install iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Removes namespaces of earlier test processes that are gone.
fn sweep() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

/// A network namespace deleted on drop (with every link in it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with loopback up.
    pub fn new(label: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        sweep();
        let name = format!(
            "{PREFIX}{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n <ns> -j <args>` as JSON (an empty answer is an empty array).
    pub fn ip_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let out = self.ip(&all)?;
        Ok(if out.trim().is_empty() {
            Value::Array(vec![])
        } else {
            serde_json::from_str(&out)?
        })
    }

    /// `bridge -n <ns> -j <args>` as JSON.
    pub fn bridge_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-n", &self.name, "-j"];
        all.extend_from_slice(args);
        let out = run("bridge", &all)?;
        Ok(if out.trim().is_empty() {
            Value::Array(vec![])
        } else {
            serde_json::from_str(&out)?
        })
    }

    /// Runs `f` on a fresh thread inside this namespace (sockets it makes
    /// stay in the namespace), and returns its result.
    pub fn run_in<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        in_ns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A plain HTTP GET from inside namespace `ns` (e.g. a daemon's /readyz on
/// its loopback). Returns the status code and body.
pub fn http_get(ns: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let nspath = PathBuf::from("/run/netns").join(ns);
    let addr = addr.to_string();
    let path = path.to_string();
    std::thread::spawn(move || -> Result<(u16, String)> {
        let f = std::fs::File::open(&nspath)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock: std::net::SocketAddr = addr.parse()?;
        let mut s = std::net::TcpStream::connect_timeout(&sock, std::time::Duration::from_secs(2))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("HTTP status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// Runs `f` on a fresh thread inside the named namespace and returns its
/// result. Only that thread changes namespace.
pub fn in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    spawn_in_ns(ns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
}

/// Starts `f` on a thread inside the named namespace; join it for the result.
pub fn spawn_in_ns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<R>>> {
    let path = PathBuf::from("/run/netns").join(ns);
    let ns =
        std::fs::File::open(&path).with_context(|| format!("no namespace {}", path.display()))?;
    Ok(std::thread::spawn(move || -> Result<R> {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    }))
}
