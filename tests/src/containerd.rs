//! A private containerd for tests: its own root, state, sockets and runc
//! root under a temporary directory, started inside a lab host's network
//! namespace and tied to the test process. `ctr --cni` reads CNI configs
//! from `/etc/cni/net.d` and plugins from `/opt/cni/bin` only; [`Ctr::run_cni`]
//! runs it in a private mount namespace where those two paths are bind
//! mounts of test directories, so nothing is written to the real ones.

use crate::process::{spawn_tied, stop};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The paths `ctr --cni` reads.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";

/// A running containerd.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    netns: String,
    child: Option<Child>,
    /// Mount points this fixture had to create (removed again on drop).
    created: Vec<PathBuf>,
    run_dir_existed: bool,
}

fn tool(name: &str) -> Result<PathBuf> {
    crate::bins::system_tool(name, if name == "runc" { "runc" } else { "containerd" })
}

impl Containerd {
    /// Starts containerd in network namespace `netns`, state under `dir`.
    pub fn start(dir: &Path, netns: &str) -> Result<Containerd> {
        let containerd = tool("containerd")?;
        tool("ctr")?;
        tool("runc")?;
        std::fs::create_dir_all(dir)?;
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd-ttrpc.sock"
[debug]
  address = "{d}/debug.sock"
"#,
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let run_dir_existed = Path::new("/run/containerd").exists();
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        // nsenter switches only the network namespace: containerd and runc
        // need the host's /sys (cgroups), which `ip netns exec` remounts.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg(&containerd)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_tied(cmd).context("starting containerd")?;
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            netns: netns.to_string(),
            child: Some(child),
            created: Vec::new(),
            run_dir_existed,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c
            .ctr(&["version"])
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            if Instant::now() > deadline {
                bail!("containerd did not come up; log:\n{}", c.log_tail(20));
            }
            if let Some(ch) = c.child.as_mut() {
                if let Some(st) = ch.try_wait()? {
                    bail!("containerd exited ({st}); log:\n{}", c.log_tail(20));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(c)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The last lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn ctr_cmd(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.socket());
        cmd
    }

    /// `ctr <args>` against this containerd, from the root namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Ok(self.ctr_cmd().args(args).stdin(Stdio::null()).output()?)
    }

    /// `ctr <args>`, failing with its stderr unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an OCI image-layout tarball.
    pub fn import(&self, tarball: &Path) -> Result<()> {
        let path = tarball.display().to_string();
        self.ctr_ok(&["images", "import", "--snapshotter", "native", &path])?;
        Ok(())
    }

    /// Makes sure the paths `ctr --cni` reads exist as mount points.
    fn mount_points(&mut self) -> Result<()> {
        for p in [CNI_CONF_DIR, CNI_BIN_DIR] {
            let mut missing = Vec::new();
            let mut q = Path::new(p);
            while !q.exists() {
                missing.push(q.to_path_buf());
                q = q.parent().context("a path with a parent")?;
            }
            std::fs::create_dir_all(p).with_context(|| format!("creating {p}"))?;
            // Deepest first, so removal on drop works bottom-up.
            self.created.extend(missing);
        }
        Ok(())
    }

    /// Starts `ctr run --rm --cni <args>` inside the host's network
    /// namespace, with `conf_dir` seen as /etc/cni/net.d and `bin_dir` as
    /// /opt/cni/bin. Output goes to `log`.
    pub fn run_cni(
        &mut self,
        conf_dir: &Path,
        bin_dir: &Path,
        args: &[&str],
        log: &Path,
    ) -> Result<Child> {
        self.mount_points()?;
        let d = self.dir.display();
        let script = r#"mount --bind "$1" /etc/cni/net.d && mount --bind "$2" /opt/cni/bin && shift 2 && exec "$@""#;
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(conf_dir)
        .arg(bin_dir)
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", self.netns))
        .arg("ctr")
        .arg("--address")
        .arg(self.socket())
        .args(["run", "--rm", "--cni", "--snapshotter", "native"])
        .arg(format!("--runc-root={d}/runc"))
        .arg(format!("--fifo-dir={d}/fifo"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?);
        Ok(spawn_tied(cmd)?)
    }

    /// Kills and removes every task and container (for cleanup).
    fn remove_all(&self) {
        let list = |what: &str| -> Vec<String> {
            self.ctr(&[what, "list", "--quiet"])
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
                        .filter(|l| !l.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        for t in list("tasks") {
            let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", &t]);
            let _ = self.ctr(&["tasks", "delete", "--force", &t]);
        }
        for c in list("containers") {
            let _ = self.ctr(&["containers", "delete", &c]);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all();
        if let Some(mut c) = self.child.take() {
            stop(&mut c, Duration::from_secs(10));
        }
        // Each path's missing directories were recorded deepest first.
        for p in &self.created {
            // Only ever empty directories: the test bind-mounted over them.
            let _ = std::fs::remove_dir(p);
        }
        // containerd 1.6 keeps shim sockets under /run/containerd/s
        // whatever its state dir, and `ctr tasks exec` its FIFOs under
        // /run/containerd/fifo; remove them if this fixture created them.
        if !self.run_dir_existed {
            for p in [
                "/run/containerd/s",
                "/run/containerd/fifo",
                "/run/containerd",
            ] {
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}
