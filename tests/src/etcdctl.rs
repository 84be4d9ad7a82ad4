//! `etcdctl`, the operator's tool, as an independent view of etcd in tests.

use crate::bins::system_tool;
use anyhow::{bail, Context, Result};
use std::process::Command;

/// Runs `etcdctl --endpoints URL <args>` (API v3) and returns stdout.
pub fn etcdctl(url: &str, args: &[&str]) -> Result<String> {
    etcdctl_with(url, &[], args)
}

/// The same with global flags first (`--cacert`, `--cert`, `--user`, ...).
pub fn etcdctl_with(url: &str, flags: &[&str], args: &[&str]) -> Result<String> {
    let bin = system_tool("etcdctl", "etcd-client")?;
    let out = Command::new(bin)
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(url)
        .args(flags)
        .args(args)
        .output()
        .context("running etcdctl")?;
    if !out.status.success() {
        bail!(
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Number of etcd leases, from `etcdctl lease list` ("found N leases").
pub fn lease_count(url: &str) -> Result<usize> {
    let out = etcdctl(url, &["lease", "list"])?;
    let first = out.lines().next().unwrap_or_default();
    first
        .strip_prefix("found ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected etcdctl output: {out}"))
}

/// Grants an etcd lease with etcdctl; returns its hex id.
pub fn grant(url: &str, ttl_secs: u64) -> Result<String> {
    let out = etcdctl(url, &["lease", "grant", &ttl_secs.to_string()])?;
    // "lease 694d854330fc5110 granted with TTL(600s)"
    out.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("unexpected etcdctl output: {out}"))
}
