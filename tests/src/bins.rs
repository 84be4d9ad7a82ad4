//! Finding the workspace's binaries and system tools.

use crate::wait::unretryable;
use anyhow::Result;
use std::path::PathBuf;

/// Path of a binary built from this workspace (`weft-controller`, ...).
/// Test executables live in `target/<profile>/deps/`; binaries one up.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        return Err(unretryable(format!(
            "{} is not built; run `cargo build --workspace --bins` (scripts/test does)",
            path.display()
        )));
    }
    Ok(path)
}

/// Path of a system tool, or an error naming the Debian package.
pub fn system_tool(name: &str, package: &str) -> Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/bin",
        "/usr/sbin",
        "/sbin",
    ]) {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(unretryable(format!(
        "{name} is not installed: this test needs it; install Debian's {package} package (scripts/test does)"
    )))
}
