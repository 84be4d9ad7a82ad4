//! Calling CNI plugins the way a container runtime does: `CNI_*`
//! environment, the network configuration on stdin, JSON on stdout; run
//! inside the host's network namespace.

use crate::bins::workspace_bin;
use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's reference plugins live (package containernetworking-plugins).
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

/// The weft-cni binary.
pub fn weft_cni() -> Result<PathBuf> {
    workspace_bin("weft-cni")
}

/// A reference plugin, or an error naming the package.
pub fn reference(name: &str) -> Result<PathBuf> {
    let p = Path::new(REFERENCE_DIR).join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: install Debian's containernetworking-plugins package (scripts/test does)",
        p.display()
    );
    Ok(p)
}

/// What a plugin answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub ok: bool,
    pub out: Value,
    pub stderr: String,
}

impl Answer {
    /// The error code, for a failed call.
    pub fn code(&self) -> Option<u64> {
        self.out["code"].as_u64()
    }

    pub fn msg(&self) -> String {
        self.out["msg"].as_str().unwrap_or_default().to_string()
    }
}

/// One attachment's identity.
#[derive(Debug, Clone)]
pub struct Attach<'a> {
    pub container_id: &'a str,
    /// Path of the container's network namespace (empty: none, for DEL).
    pub netns: &'a str,
    pub ifname: &'a str,
}

/// Runs `plugin` with `command` for `attach` inside namespace `host_ns`.
pub fn call(
    plugin: &Path,
    host_ns: &str,
    command: &str,
    conf: &Value,
    attach: Option<&Attach<'_>>,
) -> Result<Answer> {
    call_with_args(plugin, host_ns, command, conf, attach, "")
}

/// As [`call`], with `CNI_ARGS` (`KEY=VALUE;...`).
pub fn call_with_args(
    plugin: &Path,
    host_ns: &str,
    command: &str,
    conf: &Value,
    attach: Option<&Attach<'_>>,
    args: &str,
) -> Result<Answer> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host_ns]).arg(plugin);
    if !args.is_empty() {
        cmd.env("CNI_ARGS", args);
    }
    invoke(cmd, plugin, command, conf, attach)
}

/// Runs `plugin` in the calling thread's network namespace (a child
/// process starts in the namespace of the thread that forks it): what a
/// runtime's own call costs, without `ip netns exec`.
pub fn call_here(
    plugin: &Path,
    command: &str,
    conf: &Value,
    attach: Option<&Attach<'_>>,
) -> Result<Answer> {
    invoke(Command::new(plugin), plugin, command, conf, attach)
}

fn invoke(
    mut cmd: Command,
    plugin: &Path,
    command: &str,
    conf: &Value,
    attach: Option<&Attach<'_>>,
) -> Result<Answer> {
    let cni_path = format!(
        "{}:{}",
        plugin
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        REFERENCE_DIR
    );
    cmd.env("CNI_COMMAND", command)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(a) = attach {
        cmd.env("CNI_CONTAINERID", a.container_id)
            .env("CNI_IFNAME", a.ifname);
        if !a.netns.is_empty() {
            cmd.env("CNI_NETNS", a.netns);
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("plugin printed: {text}"))?
    };
    Ok(Answer {
        ok: out.status.success(),
        out: value,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The reference plugins' equivalent of [`weft_conf`]: `bridge` with
/// `host-local` IPAM on `subnet`, gateway its first address, default route,
/// hairpin, the given MTU.
pub fn reference_conf(data_dir: &Path, subnet: &str, gateway: &str, mtu: u32) -> Value {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cni0",
        "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "mtu": mtu,
        "ipam": {"type": "host-local", "dataDir": data_dir,
                 "ranges": [[{"subnet": subnet, "gateway": gateway}]]}
    })
}

/// weft-cni's network configuration.
pub fn weft_conf(version: &str, subnet_file: &Path, data_dir: &Path) -> Value {
    serde_json::json!({
        "cniVersion": version,
        "name": "weft",
        "type": "weft-cni",
        "subnetFile": subnet_file,
        "dataDir": data_dir,
        "bridge": "weft0",
        "isDefaultGateway": true
    })
}
