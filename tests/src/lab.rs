//! The lab: a weft cluster on one machine, built from network namespaces.
//!
//! ```text
//!  wl-<name>-fab   bridge br0 198.18.0.1/16, etcd on 127.0.0.1:2379,
//!                  weft-controller on 0.0.0.0:7070 (HTTPS, client
//!                  certificates from the lab's `weftctl pki` in pki/),
//!                  health on 127.0.0.1:7071
//!     |  veth h<i> <-> eth0
//!  wl-<name>-h<i>  eth0 198.18.0.(10+i)/16, weft-node, bridge weft0 (pod gateway)
//!     |  veth from weft-cni ADD <-> eth0
//!  wl-<name>-h<i>-p<j>   a pod, attached by weft-cni: eth0 with an address
//!                        from the host's subnet, default route via weft0
//!  wl-<name>-out   "outside the cluster": 198.18.200.1/16 on the fabric
//! ```
//!
//! Tests drive it with processes tied to the test process; `weft-lab` runs
//! them detached and keeps the state in `/run/weft-lab/<name>/state.json`,
//! so `status`, `ping` and `down` find them later (also after a crash).
//! Nothing here talks to addresses outside the lab's own namespaces.

use crate::bins::{system_tool, workspace_bin};
use crate::netns::{http_get, run};
use crate::process::{has_exited, spawn_tied, stop, stop_pid};
use crate::wait::{is_unretryable, unretryable};
use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where lab state lives.
pub const STATE_ROOT: &str = "/run/weft-lab";
/// Every lab namespace starts with this.
pub const NS_PREFIX: &str = "wl-";
/// The fabric's address: where hosts reach the controller.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// An address outside the cluster network, on the fabric.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
/// In a lab with IPv6 ([`LabConfig::ipv6`]): the fabric's /64, a ULA range
/// of weft's own (never the machine's uplink range), and the fabric's and
/// the outside's addresses on it.
pub const FABRIC_IP6: Ipv6Addr = Ipv6Addr::new(0xfdc6, 0x7765, 0x6674, 0x18, 0, 0, 0, 1);
pub const OUTSIDE_IP6: Ipv6Addr = Ipv6Addr::new(0xfdc6, 0x7765, 0x6674, 0x18, 0, 0, 0, 0xc8);
/// The pods' IPv6 network in a lab with IPv6 (a /64 per node).
pub const POD_NETWORK6: &str = "fdc6:7765:6675::/48";

/// Host `i`'s IPv6 address on the fabric, in a lab with IPv6.
pub fn host_ip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfdc6, 0x7765, 0x6674, 0x18, 0, 0, 0, 10 + i as u16)
}
/// The controller's plain-HTTP health listener, inside the fabric.
pub const HEALTHZ: &str = "127.0.0.1:7071";
/// The name in the lab's admin certificate (`pki/admin-lab.pem`).
pub const ADMIN: &str = "lab";

/// etcd member `k`'s address on the fabric (labs with several).
pub fn etcd_ip(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, k as u8)
}

/// Controller `k`'s address on the fabric (labs with several).
pub fn controller_ip(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, k as u8)
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub name: String,
    pub hosts: u32,
    /// `vxlan` or `host-gw`.
    pub backend: String,
    pub ip_masq: bool,
    pub pods_per_host: u32,
    /// Processes outlive this process (the `weft-lab` CLI) or die with it (tests).
    pub detached: bool,
    /// Seconds between the nodes' reconcile passes.
    pub resync: u32,
    /// The network config; default `10.244.0.0/16` with the backend.
    pub network: Option<String>,
    /// etcd members and controllers. With one of each they run inside the
    /// fabric namespace; with more, each runs in a namespace of its own on
    /// the fabric (see [`Lab::cut`]).
    pub etcd_members: u32,
    pub controllers: u32,
    /// etcd's `--quota-backend-bytes` (its default when `None`).
    pub etcd_quota_bytes: Option<u64>,
    /// More arguments for every controller.
    pub controller_args: Vec<String>,
    /// Dual stack: the fabric also carries IPv6 ([`FABRIC_IP6`]), the
    /// default network config adds [`POD_NETWORK6`], pods get both families.
    pub ipv6: bool,
}

impl LabConfig {
    /// A lab for a test: unique name, processes tied to the test.
    pub fn for_test(hosts: u32, backend: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        LabConfig {
            name: format!(
                "t{}x{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            hosts,
            backend: backend.to_string(),
            ip_masq: false,
            pods_per_host: 1,
            detached: false,
            resync: 2,
            network: None,
            etcd_members: 1,
            controllers: 1,
            etcd_quota_bytes: None,
            controller_args: Vec::new(),
            ipv6: false,
        }
    }

    /// A test lab with `members` etcd members and `controllers`
    /// controllers, each in its own namespace.
    pub fn cluster_for_test(hosts: u32, backend: &str, members: u32, controllers: u32) -> Self {
        LabConfig {
            etcd_members: members,
            controllers,
            ..Self::for_test(hosts, backend)
        }
    }
}

/// A process the lab started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcState {
    pub what: String,
    pub ns: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub log: PathBuf,
}

/// A pod.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodState {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a lab with IPv6.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
}

/// A host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostState {
    pub index: u32,
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub subnet: Option<Ipv4Net>,
    pub mtu: u32,
    pub pods: Vec<PodState>,
    /// A host behind a router ([`Lab::start_routed_host`]): the router's
    /// namespace.
    #[serde(default)]
    pub router: Option<String>,
}

/// Everything needed to find and tear down a lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub backend: String,
    pub ip_masq: bool,
    pub pods_per_host: u32,
    pub resync: u32,
    #[serde(default)]
    pub network: Option<String>,
    pub fabric: String,
    pub outside: String,
    pub hosts: Vec<HostState>,
    pub procs: Vec<ProcState>,
    /// 0 (a state file from before) means 1.
    #[serde(default)]
    pub etcd_members: u32,
    #[serde(default)]
    pub controllers: u32,
    /// Namespaces of etcd members and controllers of their own.
    #[serde(default)]
    pub service_ns: Vec<String>,
    #[serde(default)]
    pub controller_args: Vec<String>,
    #[serde(default)]
    pub ipv6: bool,
}

/// A running lab. Dropping a test lab tears it down.
#[derive(Debug)]
pub struct Lab {
    pub state: LabState,
    dir: PathBuf,
    detached: bool,
    children: HashMap<String, Child>,
}

fn ns_run(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// A veth pair: `name` in namespace `ns`, its peer `peer` in `peer_ns`.
fn veth(ns: &str, name: &str, peer_ns: &str, peer: &str) -> Result<()> {
    ns_run(
        ns,
        &[
            "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns,
        ],
    )?;
    Ok(())
}

/// Gives `dev` in namespace `ns` the IPv6 address `ip`/64, usable at once
/// (no duplicate address detection).
fn addr6(ns: &str, dev: &str, ip: Ipv6Addr) -> Result<()> {
    ns_run(
        ns,
        &["addr", "add", &format!("{ip}/64"), "dev", dev, "nodad"],
    )?;
    Ok(())
}

/// Gives `dev` in namespace `ns` the address `cidr` and brings it up.
fn addr_up(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    ns_run(ns, &["addr", "add", cidr, "dev", dev])?;
    ns_run(ns, &["link", "set", dev, "up"])?;
    Ok(())
}

impl Lab {
    fn dir_of(name: &str) -> PathBuf {
        Path::new(STATE_ROOT).join(name)
    }

    /// The state directory (logs, etcd data, subnet.env files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn save(&self) -> Result<()> {
        std::fs::write(
            self.dir.join("state.json"),
            serde_json::to_vec_pretty(&self.state)?,
        )?;
        Ok(())
    }

    /// Loads a lab started earlier (by `weft-lab up`).
    pub fn load(name: &str) -> Result<Lab> {
        let dir = Self::dir_of(name);
        let text = std::fs::read(dir.join("state.json"))
            .with_context(|| format!("no lab named {name:?} (is it up?)"))?;
        Ok(Lab {
            state: serde_json::from_slice(&text)?,
            dir,
            detached: true,
            children: HashMap::new(),
        })
    }

    /// Builds and starts a lab, and waits until every pod reaches every other.
    pub fn up(cfg: LabConfig) -> Result<Lab> {
        crate::netns::require_root();
        for (tool, pkg) in [
            ("ip", "iproute2"),
            ("ping", "iputils-ping"),
            ("nft", "nftables"),
            ("etcd", "etcd-server"),
        ] {
            system_tool(tool, pkg)?;
        }
        if !(1..=9).contains(&cfg.etcd_members) || !(1..=9).contains(&cfg.controllers) {
            bail!("a lab has 1 to 9 etcd members and 1 to 9 controllers");
        }
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_err() {
            bail!("no /proc/sys/net: this is not Linux with network namespaces");
        }
        let dir = Self::dir_of(&cfg.name);
        if dir.join("state.json").exists() {
            bail!(
                "a lab named {:?} is already up; `weft-lab down --name {}` first",
                cfg.name,
                cfg.name
            );
        }
        std::fs::create_dir_all(&dir)?;
        let n = |s: &str| format!("{NS_PREFIX}{}-{s}", cfg.name);
        let mut lab = Lab {
            state: LabState {
                name: cfg.name.clone(),
                backend: cfg.backend.clone(),
                ip_masq: cfg.ip_masq,
                pods_per_host: cfg.pods_per_host,
                resync: cfg.resync,
                network: cfg.network.clone(),
                fabric: n("fab"),
                outside: n("out"),
                hosts: Vec::new(),
                procs: Vec::new(),
                etcd_members: cfg.etcd_members.max(1),
                controllers: cfg.controllers.max(1),
                service_ns: Vec::new(),
                controller_args: cfg.controller_args.clone(),
                ipv6: cfg.ipv6,
            },
            dir,
            detached: cfg.detached,
            children: HashMap::new(),
        };
        let built = (|| {
            lab.build_fabric(cfg.etcd_quota_bytes)?;
            for _ in 0..cfg.hosts {
                lab.add_host_no_wait()?;
            }
            lab.wait_converged(Duration::from_secs(60))
        })();
        match built {
            Ok(()) => Ok(lab),
            Err(e) => {
                // Leave nothing behind, detached or not.
                lab.teardown();
                Err(e)
            }
        }
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        run("ip", &["netns", "add", ns])?;
        ns_run(ns, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build_fabric(&mut self, etcd_quota: Option<u64>) -> Result<()> {
        let fab = self.state.fabric.clone();
        self.add_ns(&fab)?;
        self.save()?;
        // A bridge without a MAC of its own takes its lowest port's; adding a
        // host could then change it under the hosts' ARP caches.
        ns_run(
            &fab,
            &[
                "link",
                "add",
                "br0",
                "address",
                "02:77:65:66:00:01",
                "type",
                "bridge",
            ],
        )?;
        ns_run(
            &fab,
            &["addr", "add", &format!("{FABRIC_IP}/16"), "dev", "br0"],
        )?;
        ns_run(&fab, &["link", "set", "br0", "up"])?;
        let out = self.state.outside.clone();
        self.add_ns(&out)?;
        veth(&fab, "out", &out, "eth0")?;
        ns_run(&fab, &["link", "set", "out", "master", "br0", "up"])?;
        addr_up(&out, "eth0", &format!("{OUTSIDE_IP}/16"))?;
        if self.state.ipv6 {
            addr6(&fab, "br0", FABRIC_IP6)?;
            addr6(&out, "eth0", OUTSIDE_IP6)?;
        }
        self.start_etcd(etcd_quota)?;
        // The lab's PKI, made as an operator makes one.
        let pki = self.pki_dir();
        let pki_s = pki.display().to_string();
        self.weftctl_pki(&["init", "--dir", &pki_s])?;
        let mut server = vec!["server", "--dir", &pki_s];
        let hosts: Vec<String> = [
            FABRIC_IP.to_string(),
            "127.0.0.1".into(),
            "localhost".into(),
        ]
        .into_iter()
        .chain((1..=self.state.controllers).map(|k| controller_ip(k).to_string()))
        .collect();
        for h in &hosts {
            server.extend(["--host", h.as_str()]);
        }
        self.weftctl_pki(&server)?;
        self.weftctl_pki(&["admin", ADMIN, "--dir", &pki_s])?;
        for c in self.controller_names() {
            self.start_controller(&c)?;
        }
        let names = self.controller_names();
        let mut all = self.etcd_names();
        all.extend(names.iter().cloned());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.wait_for(Duration::from_secs(30), "the controllers to answer", || {
            self.still_running(&all)?;
            Ok(names.iter().all(|c| self.controller_healthy(c)))
        })?;
        let config = self.state.network.clone().unwrap_or_else(|| {
            let v6 = if self.state.ipv6 {
                format!(r#""EnableIPv6":true,"IPv6Network":"{POD_NETWORK6}","#)
            } else {
                String::new()
            };
            format!(
                r#"{{"Network":"10.244.0.0/16",{v6}"Backend":{{"Type":"{}"}}}}"#,
                self.state.backend
            )
        });
        self.wait_for(
            Duration::from_secs(30),
            "the controller to take the network config",
            || {
                self.still_running(&all)?;
                match self.weftctl_stdin(&["network", "set", "--file", "-"], &config) {
                    Ok(_) => Ok(true),
                    Err(e) if is_unretryable(&e) => Err(e),
                    Err(_) => Ok(false),
                }
            },
        )?;
        Ok(())
    }

    /// Whether etcd members and controllers run in namespaces of their own.
    fn own_namespaces(&self) -> bool {
        self.state.etcd_members.max(1) > 1 || self.state.controllers.max(1) > 1
    }

    /// `single` in the classic layout, else `each(k)` for k in 1..=`count`.
    fn per_service(&self, count: u32, single: String, each: impl Fn(u32) -> String) -> Vec<String> {
        match self.own_namespaces() {
            false => vec![single],
            true => (1..=count).map(each).collect(),
        }
    }

    /// The lab's etcd processes: `etcd`, or `etcd-1`..`etcd-N`.
    pub fn etcd_names(&self) -> Vec<String> {
        self.per_service(self.state.etcd_members, "etcd".into(), |k| {
            format!("etcd-{k}")
        })
    }

    /// The lab's controllers: `controller`, or `controller-1`..`controller-N`.
    pub fn controller_names(&self) -> Vec<String> {
        self.per_service(self.state.controllers, "controller".into(), |k| {
            format!("controller-{k}")
        })
    }

    /// etcd's client URLs, as seen from the fabric namespace and the
    /// controllers.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.per_service(
            self.state.etcd_members,
            "http://127.0.0.1:2379".into(),
            |k| format!("http://{}:2379", etcd_ip(k)),
        )
    }

    /// The controllers' URLs as the hosts reach them.
    pub fn controller_urls(&self) -> Vec<String> {
        self.per_service(
            self.state.controllers,
            format!("https://{FABRIC_IP}:7070"),
            |k| format!("https://{}:7070", controller_ip(k)),
        )
    }

    /// Runs `nft <args>` inside namespace `ns`.
    pub fn nft_in(ns: &str, args: &[&str]) -> Result<()> {
        let mut all = vec!["netns", "exec", ns, "nft"];
        all.extend_from_slice(args);
        run("ip", &all).map(|_| ())
    }

    /// A namespace of its own on the fabric for a member or controller:
    /// `port` on br0, `eth0` with `ip` inside.
    fn service_namespace(&mut self, short: &str, ip: Ipv4Addr) -> Result<String> {
        let ns = format!("{NS_PREFIX}{}-{short}", self.state.name);
        // Recorded first: teardown finds it whatever fails next.
        self.state.service_ns.push(ns.clone());
        self.save()?;
        self.add_ns(&ns)?;
        let fab = self.state.fabric.clone();
        veth(&fab, short, &ns, "eth0")?;
        ns_run(&fab, &["link", "set", short, "master", "br0", "up"])?;
        addr_up(&ns, "eth0", &format!("{ip}/16"))?;
        Ok(ns)
    }

    fn start_etcd(&mut self, quota: Option<u64>) -> Result<()> {
        let etcd = system_tool("etcd", "etcd-server")?.display().to_string();
        let quota: Vec<String> = quota
            .map(|q| vec!["--quota-backend-bytes".into(), q.to_string()])
            .unwrap_or_default();
        if !self.own_namespaces() {
            let fab = self.state.fabric.clone();
            let data = self.dir.join("etcd-data").display().to_string();
            let mut argv: Vec<String> = [
                etcd.as_str(),
                "--name",
                "lab",
                "--data-dir",
                &data,
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "lab=http://127.0.0.1:2380",
            ]
            .map(String::from)
            .to_vec();
            argv.extend(quota);
            return self.spawn("etcd", &fab, argv);
        }
        let members = self.state.etcd_members;
        let cluster: Vec<String> = (1..=members)
            .map(|k| format!("e{k}=http://{}:2380", etcd_ip(k)))
            .collect();
        let cluster = cluster.join(",");
        for k in 1..=members {
            let ip = etcd_ip(k);
            let ns = self.service_namespace(&format!("e{k}"), ip)?;
            let data = self
                .dir
                .join(format!("etcd-{k}-data"))
                .display()
                .to_string();
            let client = format!("http://{ip}:2379");
            let peer = format!("http://{ip}:2380");
            let listen = format!("{client},http://127.0.0.1:2379");
            let token = format!("wl-{}", self.state.name);
            let name = format!("e{k}");
            let mut argv: Vec<String> = [
                etcd.as_str(),
                "--name",
                &name,
                "--data-dir",
                &data,
                "--listen-client-urls",
                &listen,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &token,
            ]
            .map(String::from)
            .to_vec();
            argv.extend(quota.iter().cloned());
            self.spawn(&format!("etcd-{k}"), &ns, argv)?;
        }
        Ok(())
    }

    fn start_controller(&mut self, what: &str) -> Result<()> {
        let ns = match what.strip_prefix("controller-") {
            None => self.state.fabric.clone(),
            Some(k) => {
                let k: u32 = k.parse()?;
                self.service_namespace(&format!("c{k}"), controller_ip(k))?
            }
        };
        let file = |f: &str| self.pki_dir().join(f).display().to_string();
        let mut argv = vec![
            workspace_bin("weft-controller")?.display().to_string(),
            "--etcd-endpoints".into(),
            self.etcd_endpoints().join(","),
            "--listen".into(),
            "0.0.0.0:7070".into(),
            "--tls-cert-file".into(),
            file("server.pem"),
            "--tls-key-file".into(),
            file("server-key.pem"),
            "--client-ca-file".into(),
            file("ca.pem"),
            "--healthz-listen".into(),
            HEALTHZ.into(),
            "--watch-heartbeat".into(),
            "2".into(),
        ];
        argv.extend(self.state.controller_args.iter().cloned());
        self.spawn(what, &ns, argv)
    }

    /// Whether controller `what` answers its health check.
    pub fn controller_healthy(&self, what: &str) -> bool {
        self.proc(what)
            .is_ok_and(|p| http_get(&p.ns, HEALTHZ, "/healthz").is_ok())
    }

    /// The fabric port of a lab process (`etcd-2`, `controller-1`,
    /// `node-3`).
    fn port_of(&self, what: &str) -> Result<String> {
        if let Some(k) = what.strip_prefix("etcd-") {
            return Ok(format!("e{k}"));
        }
        if let Some(k) = what.strip_prefix("controller-") {
            return Ok(format!("c{k}"));
        }
        if let Some(i) = what.strip_prefix("node-") {
            let i: u32 = i.parse()?;
            if self.host(i)?.router.is_none() {
                return Ok(format!("h{i}"));
            }
            return Ok(format!("r{i}"));
        }
        bail!("{what} has no fabric port of its own (only etcd-K, controller-K and node-I have)")
    }

    /// Cuts `what` off the fabric (its bridge port down): a partition. Its
    /// process keeps running.
    pub fn cut(&self, what: &str) -> Result<()> {
        let port = self.port_of(what)?;
        ns_run(&self.state.fabric, &["link", "set", &port, "down"])?;
        Ok(())
    }

    /// Undoes [`Lab::cut`].
    pub fn heal(&self, what: &str) -> Result<()> {
        let port = self.port_of(what)?;
        ns_run(&self.state.fabric, &["link", "set", &port, "up"])?;
        Ok(())
    }

    /// Sends a signal to a lab process (checked to be the one started):
    /// `libc::SIGKILL` kills it without a chance to clean up, `SIGSTOP`
    /// freezes it, `SIGCONT` thaws it. After SIGKILL the process is reaped
    /// and [`Lab::start`] starts it again.
    pub fn signal(&mut self, what: &str, signal: libc::c_int) -> Result<()> {
        let p = self.proc(what)?.clone();
        if !crate::process::signal_pid(p.pid, &p.argv[0], signal) {
            bail!("{what} (pid {}) is not running", p.pid);
        }
        if signal == libc::SIGKILL {
            if let Some(mut c) = self.children.remove(what) {
                let _ = c.wait();
            } else {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !has_exited(p.pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }

    /// etcd's members as `etcdctl endpoint status` sees them: (process
    /// name, is leader, raft index) for those that answer.
    pub fn etcd_status(&self) -> Result<Vec<(String, bool, u64)>> {
        let names = self.etcd_names();
        let mut out = Vec::new();
        for (name, url) in names.iter().zip(self.etcd_endpoints()) {
            let Ok(text) = self.etcdctl_at(
                &url,
                &[
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                    "--command-timeout",
                    "2s",
                ],
            ) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let s = &v[0]["Status"];
            let id = s["header"]["member_id"].as_u64();
            let leader = s["leader"].as_u64();
            out.push((
                name.clone(),
                id.is_some() && id == leader,
                s["raftIndex"].as_u64().unwrap_or(0),
            ));
        }
        Ok(out)
    }

    /// The etcd member controller `what` is connected to now (its
    /// established connection to a member's client port), if any.
    pub fn etcd_member_of(&self, what: &str) -> Result<Option<String>> {
        let ns = self.proc(what)?.ns.clone();
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "ss",
                "-Htn",
                "state",
                "established",
                "( dport = :2379 )",
            ],
        )?;
        Ok(out.lines().find_map(|l| {
            let peer = l.split_whitespace().nth(3)?;
            let ip: Ipv4Addr = peer.rsplit_once(':')?.0.parse().ok()?;
            let o = ip.octets();
            (o[..3] == [198, 18, 1]).then(|| format!("etcd-{}", o[3]))
        }))
    }

    /// Makes member `to` the leader (`etcdctl move-leader`, sent to the
    /// leader now) and waits until it is.
    pub fn etcd_move_leader(&self, to: &str) -> Result<()> {
        let leader = self.etcd_leader()?;
        if leader == to {
            return Ok(());
        }
        let url = |name: &str| -> Result<String> {
            let k: u32 = name
                .strip_prefix("etcd-")
                .context("not a member")?
                .parse()?;
            Ok(format!("http://{}:2379", etcd_ip(k)))
        };
        let status = self.etcdctl_at(&url(to)?, &["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&status)?;
        let id = v[0]["Status"]["header"]["member_id"]
            .as_u64()
            .context("no member_id")?;
        self.etcdctl_at(&url(&leader)?, &["move-leader", &format!("{id:x}")])?;
        self.wait_for_value(Duration::from_secs(30), &format!("{to} to lead"), || {
            Ok((self.etcd_leader()? == to).then_some(()))
        })
    }

    /// Cuts etcd member `what` off from the other members only (its peer
    /// port, both ways); clients still reach it, and it answers them "no
    /// leader" once it notices. [`Lab::heal_peers`] undoes it.
    pub fn cut_peers(&self, what: &str) -> Result<()> {
        let ns = self.proc(what)?.ns.clone();
        let nft = |args: &[&str]| Self::nft_in(&ns, args);
        nft(&["add", "table", "inet", "weft-lab-cut"])?;
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            nft(&[
                "add",
                "chain",
                "inet",
                "weft-lab-cut",
                chain,
                "{",
                "type",
                "filter",
                "hook",
                hook,
                "priority",
                "0",
                ";",
                "}",
            ])?;
        }
        nft(&[
            "add",
            "rule",
            "inet",
            "weft-lab-cut",
            "in",
            "tcp",
            "dport",
            "2380",
            "drop",
        ])?;
        nft(&[
            "add",
            "rule",
            "inet",
            "weft-lab-cut",
            "out",
            "tcp",
            "dport",
            "2380",
            "drop",
        ])
    }

    /// Undoes [`Lab::cut_peers`].
    pub fn heal_peers(&self, what: &str) -> Result<()> {
        let ns = self.proc(what)?.ns.clone();
        Self::nft_in(&ns, &["delete", "table", "inet", "weft-lab-cut"])
    }

    /// The etcd member that is leader now.
    pub fn etcd_leader(&self) -> Result<String> {
        self.wait_for_value(Duration::from_secs(30), "an etcd leader", || {
            Ok(self
                .etcd_status()?
                .into_iter()
                .find(|(_, leader, _)| *leader)
                .map(|(n, _, _)| n))
        })
    }

    /// Runs `weftctl` against the lab's controller (inside the fabric).
    pub fn weftctl(&self, args: &[&str]) -> Result<String> {
        self.weftctl_stdin(args, "")
    }

    /// The lab's certificates (`weftctl pki`): CA, controller, the admin
    /// certificate `weftctl` uses, one per node.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// Runs `weftctl pki <args>`.
    pub fn weftctl_pki(&self, args: &[&str]) -> Result<String> {
        let bin = workspace_bin("weftctl")?.display().to_string();
        let mut all = vec!["pki"];
        all.extend_from_slice(args);
        run(&bin, &all)
    }

    /// The flags that make weftctl (inside the fabric) an admin of the lab.
    pub fn admin_flags(&self) -> Vec<String> {
        let file = |f: &str| self.pki_dir().join(f).display().to_string();
        let urls = match self.own_namespaces() {
            false => "https://127.0.0.1:7070".to_string(),
            true => self.controller_urls().join(","),
        };
        vec![
            "--controller".into(),
            urls,
            "--ca-file".into(),
            file("ca.pem"),
            "--cert-file".into(),
            file(&format!("admin-{ADMIN}.pem")),
            "--key-file".into(),
            file(&format!("admin-{ADMIN}-key.pem")),
        ]
    }

    /// Runs `weftctl` as the lab's admin with `stdin` as its input.
    pub fn weftctl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        use std::io::Write;
        let bin = workspace_bin("weftctl")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.state.fabric])
            .arg(bin)
            .args(self.admin_flags())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let msg = format!(
                "weftctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            // weftctl exits 3 when the controller is unreachable or
            // unavailable; anything else (a refused config) is final.
            if out.status.code() == Some(3) {
                bail!(msg);
            }
            return Err(unretryable(msg));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// An unretryable error naming the first of `what` that has exited, with
    /// its log tail.
    fn still_running(&self, what: &[&str]) -> Result<()> {
        let exited = |w: &&str| self.proc(w).is_ok_and(|p| has_exited(p.pid));
        match what.iter().copied().find(exited) {
            None => Ok(()),
            Some(w) => Err(unretryable(format!(
                "{w} is not running; its log ends with:\n{}",
                self.log_tail(w, 12)
            ))),
        }
    }

    fn spawn(&mut self, what: &str, ns: &str, argv: Vec<String>) -> Result<()> {
        self.spawn_with_env(what, ns, argv, &[])
    }

    fn spawn_with_env(
        &mut self,
        what: &str,
        ns: &str,
        argv: Vec<String>,
        env: &[(&str, &str)],
    ) -> Result<()> {
        let log = self.dir.join(format!("{what}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        // etcd and friends must not pick up the environment's settings.
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_")
                || k.starts_with("WEFT_")
                || k == "NOTIFY_SOCKET"
                || k.starts_with("WATCHDOG_")
            {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let child = if self.detached {
            cmd.process_group(0);
            cmd.spawn().with_context(|| format!("starting {what}"))?
        } else {
            spawn_tied(cmd).with_context(|| format!("starting {what}"))?
        };
        let pid = child.id();
        self.state.procs.retain(|p| p.what != what);
        self.state.procs.push(ProcState {
            what: what.to_string(),
            ns: ns.to_string(),
            pid,
            argv,
            log,
        });
        if self.detached {
            drop(child);
        } else {
            self.children.insert(what.to_string(), child);
        }
        self.save()
    }

    /// Stops a process of the lab (`etcd`, `controller`, `node-<i>`) by PID.
    pub fn stop(&mut self, what: &str) -> Result<()> {
        let p = self.proc(what)?.clone();
        match self.children.remove(what) {
            Some(mut c) => {
                stop(&mut c, Duration::from_secs(10));
            }
            None => stop_pid(p.pid, &p.argv[0], Duration::from_secs(10)),
        }
        Ok(())
    }

    /// Starts a stopped process again with the same arguments.
    pub fn start(&mut self, what: &str) -> Result<()> {
        self.start_with_env(what, &[])
    }

    /// Starts a stopped process again, with extra environment variables.
    pub fn start_with_env(&mut self, what: &str, env: &[(&str, &str)]) -> Result<()> {
        let p = self.proc(what)?.clone();
        self.spawn_with_env(what, &p.ns, p.argv, env)
    }

    fn proc(&self, what: &str) -> Result<&ProcState> {
        self.state
            .procs
            .iter()
            .find(|p| p.what == what)
            .with_context(|| format!("no process {what} in the lab"))
    }

    /// The last lines of a process's log.
    pub fn log_tail(&self, what: &str, lines: usize) -> String {
        let Ok(p) = self.proc(what) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Adds a host (and its pods) and waits until the cluster converges.
    pub fn add_host(&mut self) -> Result<u32> {
        let i = self.add_host_no_wait()?;
        self.wait_converged(Duration::from_secs(60))?;
        Ok(i)
    }

    fn add_host_no_wait(&mut self) -> Result<u32> {
        let i = self.start_host()?;
        self.finish_host(i)?;
        Ok(i)
    }

    /// Creates host `i`'s namespace and starts its node, without waiting
    /// for a lease. [`Lab::finish_host`] waits for it and adds the pods.
    pub fn start_host(&mut self) -> Result<u32> {
        let i = self.next_index();
        let ip = Ipv4Addr::new(
            198,
            18,
            0,
            10 + u8::try_from(i).context("at most 240 hosts")?,
        );
        let ns = self.add_host_state(i, ip, None)?;
        let fab = self.state.fabric.clone();
        let port = format!("h{i}");
        veth(&fab, &port, &ns, "eth0")?;
        ns_run(&fab, &["link", "set", &port, "master", "br0", "up"])?;
        addr_up(&ns, "eth0", &format!("{ip}/16"))?;
        if self.state.ipv6 {
            addr6(&ns, "eth0", host_ip6(i))?;
        }
        self.start_node_process(i)?;
        Ok(i)
    }

    /// The lowest index no host has (a removed host's index is reused,
    /// as a machine that comes back keeps its name).
    fn next_index(&self) -> u32 {
        (1..)
            .find(|i| !self.state.hosts.iter().any(|h| h.index == *i))
            .unwrap_or(1)
    }

    /// Takes host `i` out of the cluster as an operator decommissions a
    /// machine: stops its node, releases its lease (`weftctl lease
    /// release`), and removes its pods, namespaces and files.
    pub fn remove_host(&mut self, i: u32) -> Result<()> {
        let h = self.host(i)?.clone();
        let node = format!("node-{i}");
        self.stop(&node)?;
        self.weftctl(&["lease", "release", &h.name])?;
        let namespaces = h.pods.iter().map(|p| p.ns.clone());
        for ns in namespaces.chain(h.router.clone()).chain([h.ns.clone()]) {
            run("ip", &["netns", "del", &ns])?;
        }
        for dir in [self.state_dir(i), self.dir.join(format!("h{i}-cni"))] {
            let _ = std::fs::remove_dir_all(dir);
        }
        for file in [self.subnet_file(i), self.control_socket(i)] {
            let _ = std::fs::remove_file(file);
        }
        // A later host-<i> starts a log of its own.
        let log = self.dir.join(format!("{node}.log"));
        let kept = (1..)
            .map(|n| self.dir.join(format!("{node}.{n}.log")))
            .find(|p| !p.exists())
            .unwrap_or_default();
        let _ = std::fs::rename(log, kept);
        self.state.hosts.retain(|x| x.index != i);
        self.state.procs.retain(|p| p.what != node);
        self.save()
    }

    /// Records host `i` (saved at once, so teardown finds it even if the
    /// rest fails) and makes its namespace, and its router's if any;
    /// returns the host's namespace.
    fn add_host_state(&mut self, i: u32, ip: Ipv4Addr, router: Option<String>) -> Result<String> {
        let ns = format!("{NS_PREFIX}{}-h{i}", self.state.name);
        self.add_ns(&ns)?;
        if let Some(r) = &router {
            self.add_ns(r)?;
        }
        self.state.hosts.push(HostState {
            index: i,
            name: format!("host-{i}"),
            ns: ns.clone(),
            ip,
            subnet: None,
            mtu: 0,
            pods: Vec::new(),
            router,
        });
        self.save()?;
        Ok(ns)
    }

    /// Like [`Lab::start_host`], but the host is a routed hop away from
    /// the fabric: it sits on its own /24 (198.18.(100+i).0/24, default
    /// route via the router) behind a router namespace whose fabric leg
    /// answers ARP for that /24 (proxy ARP), so the other hosts' packets to
    /// it cross a router. host-gw cannot reach such a host; vxlan and ipsec
    /// can.
    pub fn start_routed_host(&mut self) -> Result<u32> {
        let i = self.next_index();
        let n = u8::try_from(i)
            .ok()
            .filter(|n| *n < 100)
            .context("at most 99 hosts")?;
        let router = format!("{NS_PREFIX}{}-r{i}", self.state.name);
        let ip = Ipv4Addr::new(198, 18, 100 + n, 10);
        let gw = Ipv4Addr::new(198, 18, 100 + n, 1);
        let ns = self.add_host_state(i, ip, Some(router.clone()))?;
        let fab = self.state.fabric.clone();
        let port = format!("r{i}");
        veth(&fab, &port, &router, "up0")?;
        ns_run(&fab, &["link", "set", &port, "master", "br0", "up"])?;
        addr_up(&router, "up0", &format!("198.18.0.{}/16", 200 + n))?;
        veth(&router, "down0", &ns, "eth0")?;
        addr_up(&router, "down0", &format!("{gw}/24"))?;
        for knob in ["net.ipv4.ip_forward=1", "net.ipv4.conf.up0.proxy_arp=1"] {
            run("ip", &["netns", "exec", &router, "sysctl", "-qw", knob])?;
        }
        addr_up(&ns, "eth0", &format!("{ip}/24"))?;
        ns_run(&ns, &["route", "add", "default", "via", &gw.to_string()])?;
        self.start_node_process(i)?;
        Ok(i)
    }

    /// Waits for host `i`'s lease (its subnet.env) and adds its pods.
    pub fn finish_host(&mut self, i: u32) -> Result<()> {
        // The pods need the node's subnet and MTU, from its subnet.env.
        let env_path = self.subnet_file(i);
        let env = self.wait_for_value(
            Duration::from_secs(30),
            &format!("host-{i} to get a lease"),
            || Ok(weft_node::subnet_env::read(&env_path).ok().flatten()),
        )?;
        if env.subnet.is_none() && env.ipv6_subnet.is_none() {
            bail!("host-{i}'s subnet.env has neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET");
        }
        let h = self.host_mut(i)?;
        // None in an IPv6-only network.
        h.subnet = env.subnet.map(|s| s.trunc());
        h.mtu = env.mtu;
        let pods = self.state.pods_per_host;
        for j in 1..=pods {
            self.add_pod(i, j)?;
        }
        self.save()
    }

    /// Host `i`'s `--state-dir` (its IPsec key).
    pub fn state_dir(&self, i: u32) -> PathBuf {
        self.dir.join(format!("h{i}-state"))
    }

    fn subnet_file(&self, i: u32) -> PathBuf {
        self.dir.join(format!("h{i}-subnet.env"))
    }

    /// The cluster PSK every node's ipsec backend reads: made once per lab,
    /// root-owned 0600, like an operator's.
    pub fn psk_file(&self) -> Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.join("ipsec.psk");
        if !p.exists() {
            let mut key = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
                .context("reading /dev/urandom")?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)?;
            std::io::Write::write_all(&mut f, hex.as_bytes())?;
        }
        Ok(p)
    }

    /// Host `i`'s certificate and key (CN=host-i, O=weft:nodes).
    pub fn node_cert(&self, i: u32) -> (PathBuf, PathBuf) {
        let pki = self.pki_dir();
        (
            pki.join(format!("node-host-{i}.pem")),
            pki.join(format!("node-host-{i}-key.pem")),
        )
    }

    fn start_node_process(&mut self, i: u32) -> Result<()> {
        let ns = self.host(i)?.ns.clone();
        let (cert, key) = self.node_cert(i);
        if !cert.exists() {
            let pki = self.pki_dir().display().to_string();
            self.weftctl_pki(&["node", &format!("host-{i}"), "--dir", &pki])?;
        }
        let mut argv = vec![
            workspace_bin("weft-node")?.display().to_string(),
            "--controller".into(),
            self.controller_urls().join(","),
            "--ca-file".into(),
            self.pki_dir().join("ca.pem").display().to_string(),
            "--cert-file".into(),
            cert.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
            "--node-name".into(),
            format!("host-{i}"),
            "--iface".into(),
            "eth0".into(),
            "--subnet-file".into(),
            self.subnet_file(i).display().to_string(),
            "--healthz".into(),
            "127.0.0.1:9680".into(),
            "--resync".into(),
            self.state.resync.to_string(),
            "--state-dir".into(),
            self.state_dir(i).display().to_string(),
            "--control-socket".into(),
            self.control_socket(i).display().to_string(),
            // Read only by the ipsec backend.
            "--ipsec-psk-file".into(),
            self.psk_file()?.display().to_string(),
            // The names this host's containers have (weft-cni's file in
            // the lab's store), and resolvers for other names: the lab's
            // own file, never the machine's.
            "--cni-names-file".into(),
            self.cni_names_file(i).display().to_string(),
            "--dns-resolv-conf".into(),
            self.resolv_conf()?.display().to_string(),
        ];
        if self.state.ip_masq {
            argv.push("--ip-masq".into());
        }
        self.spawn(&format!("node-{i}"), &ns, argv)
    }

    /// The CNI network configuration a runtime on host `i` would use:
    /// weft-cni reading that host's subnet.env, its IPAM store in the lab
    /// directory.
    pub fn cni_conf(&self, i: u32) -> serde_json::Value {
        let mut conf = crate::cni::weft_conf(
            "1.0.0",
            &self.subnet_file(i),
            &self.dir.join(format!("h{i}-cni")),
        );
        conf["nodeSocket"] = self.control_socket(i).display().to_string().into();
        conf
    }

    /// weft-cni's names file on host `i` (`<dataDir>/weft/names.json`).
    pub fn cni_names_file(&self, i: u32) -> PathBuf {
        self.dir
            .join(format!("h{i}-cni"))
            .join("weft")
            .join("names.json")
    }

    /// The resolv.conf every lab node forwards other names to: none, so
    /// names outside the cluster fail (a node must never send the
    /// machine's resolvers anything from the lab).
    pub fn resolv_conf(&self) -> Result<PathBuf> {
        let p = self.dir.join("resolv.conf");
        if !p.exists() {
            std::fs::write(
                &p,
                "# the lab's resolvers (none: names outside the cluster fail)\n",
            )?;
        }
        Ok(p)
    }

    /// Creates one more pod on host `i` through weft-cni.
    pub fn new_pod(&mut self, i: u32) -> Result<PodState> {
        self.new_pod_with(i, "")
    }

    /// Creates one more pod on host `i` with these names (`WEFT_NAME` in
    /// `CNI_ARGS`); the ADD's error when weft-cni refuses them.
    pub fn new_named_pod(&mut self, i: u32, names: &[&str]) -> Result<PodState> {
        self.new_pod_with(i, &format!("WEFT_NAME={}", names.join(",")))
    }

    fn new_pod_with(&mut self, i: u32, args: &str) -> Result<PodState> {
        let h = self.host(i)?;
        let j = h
            .pods
            .iter()
            .filter_map(|p| p.ns.rsplit_once("-p")?.1.parse::<u32>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        self.add_pod_with(i, j, args)?;
        let h = self.host(i)?;
        h.pods.last().cloned().context("the new pod")
    }

    /// The bridge gateway of host `i` (its name server): the first address
    /// of its IPv4 subnet.
    pub fn gateway(&self, i: u32) -> Result<Ipv4Addr> {
        let s = self
            .host(i)?
            .subnet
            .context("the host has no IPv4 subnet")?;
        Ok(Ipv4Addr::from(u32::from(s.network()) + 1))
    }

    /// Removes a pod the way a runtime does: weft-cni DEL, then the
    /// namespace goes.
    pub fn delete_pod(&mut self, i: u32, pod: &str) -> Result<()> {
        let answer = self.cni(i, "DEL", pod)?;
        if !answer.ok {
            bail!("weft-cni DEL for {pod} failed: {}", answer.msg());
        }
        run("ip", &["netns", "del", pod])?;
        self.host_mut(i)?.pods.retain(|p| p.ns != pod);
        self.save()
    }

    /// Runs weft-cni `command` in host `i`'s namespace for pod namespace
    /// `pod` (its eth0), as a runtime does.
    fn cni(&self, i: u32, command: &str, pod: &str) -> Result<crate::cni::Answer> {
        self.cni_with(i, command, pod, "")
    }

    fn cni_with(&self, i: u32, command: &str, pod: &str, args: &str) -> Result<crate::cni::Answer> {
        let netns = format!("/run/netns/{pod}");
        let attach = crate::cni::Attach {
            container_id: pod,
            netns: &netns,
            ifname: "eth0",
        };
        crate::cni::call_with_args(
            &crate::cni::weft_cni()?,
            &self.host(i)?.ns,
            command,
            &self.cni_conf(i),
            Some(&attach),
            args,
        )
    }

    /// Creates pod `j` on host `i` the way a container runtime does: a new
    /// namespace, then weft-cni ADD inside the host's namespace.
    fn add_pod(&mut self, i: u32, j: u32) -> Result<()> {
        self.add_pod_with(i, j, "")
    }

    fn add_pod_with(&mut self, i: u32, j: u32, args: &str) -> Result<()> {
        let pod = format!("{}-p{j}", self.host(i)?.ns);
        self.add_ns(&pod)?;
        // Saved before the ADD, so a failure still tears the namespace down.
        self.host_mut(i)?.pods.push(PodState {
            ns: pod.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            ip6: None,
        });
        self.save()?;
        let answer = self.cni_with(i, "ADD", &pod, args)?;
        if !answer.ok {
            // A refused ADD leaves no pod behind (weft-cni made nothing).
            let _ = run("ip", &["netns", "del", &pod]);
            self.host_mut(i)?.pods.retain(|p| p.ns != pod);
            self.save()?;
            bail!(
                "weft-cni ADD for {pod} failed: {} (code {:?}); stderr: {}",
                answer.msg(),
                answer.code(),
                answer.stderr.trim()
            );
        }
        let addrs: Vec<IpAddr> = answer.out["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        // IPv4 unspecified: an IPv6-only network.
        let ip = addrs
            .iter()
            .find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let ip6 = addrs.iter().find_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        if ip.is_unspecified() && ip6.is_none() {
            bail!("weft-cni answered without an address: {}", answer.out);
        }
        if self.state.ipv6 && ip6.is_none() {
            bail!("weft-cni gave {pod} no IPv6 address: {}", answer.out);
        }
        if let Some(p) = self.host_mut(i)?.pods.iter_mut().find(|p| p.ns == pod) {
            p.ip = ip;
            p.ip6 = ip6;
        }
        // A lab driven by separate weft-lab commands reads its pods back.
        self.save()
    }

    pub fn host(&self, i: u32) -> Result<&HostState> {
        self.state
            .hosts
            .iter()
            .find(|h| h.index == i)
            .with_context(|| format!("no host {i}"))
    }

    /// `n` /24s of the default network 10.244.0.0/16, from the top, that
    /// no host of the lab holds: for tests that write leases by hand, as
    /// the controller hands out subnets at random and a fixed one may be a
    /// real node's.
    pub fn free_subnets(&self, n: usize) -> Vec<Ipv4Net> {
        let held: Vec<Ipv4Net> = self.state.hosts.iter().filter_map(|h| h.subnet).collect();
        (0..=255u8)
            .rev()
            .map(|x| Ipv4Net::new(Ipv4Addr::new(10, 244, x, 0), 24).expect("a /24"))
            .filter(|s| !held.contains(s))
            .take(n)
            .collect()
    }

    fn host_mut(&mut self, i: u32) -> Result<&mut HostState> {
        self.state
            .hosts
            .iter_mut()
            .find(|h| h.index == i)
            .with_context(|| format!("no host {i}"))
    }

    /// Every pod with its host index.
    pub fn pods(&self) -> Vec<(u32, PodState)> {
        self.state
            .hosts
            .iter()
            .flat_map(|h| h.pods.iter().map(move |p| (h.index, p.clone())))
            .collect()
    }

    /// The node daemon's `/readyz` of host `i`.
    pub fn node_status(&self, i: u32) -> Result<serde_json::Value> {
        let (_, body) = http_get(&self.host(i)?.ns, "127.0.0.1:9680", "/readyz")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Host `i`'s node's `weft_node_changes_applied_total`: grows with
    /// every change the node made to the kernel, so a test can tell a
    /// repair happened even when it cannot catch the broken moment.
    pub fn changes_applied(&self, i: u32) -> Result<u64> {
        let (_, m) = http_get(&self.host(i)?.ns, "127.0.0.1:9680", "/metrics")?;
        m.lines()
            .find_map(|l| l.strip_prefix("weft_node_changes_applied_total "))
            .and_then(|v| v.trim().parse().ok())
            .context("no weft_node_changes_applied_total in /metrics")
    }

    /// Pings `to` from namespace `from`; returns (sent, received).
    pub fn ping(
        &self,
        from: &str,
        to: impl Into<IpAddr>,
        count: u32,
        interval: &str,
    ) -> Result<(u32, u32)> {
        let to: IpAddr = to.into();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                from,
                "ping",
                "-q",
                "-n",
                "-W",
                "1",
                "-i",
                interval,
                "-c",
                &count.to_string(),
            ])
            .arg(to.to_string())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        crate::traffic::ping_summary(&text).with_context(|| format!("ping said: {text}"))
    }

    /// Whether `from` reaches `to` (one ping, a second chance).
    pub fn reaches(&self, from: &str, to: impl Into<IpAddr>) -> bool {
        let to = to.into();
        (0..2).any(|_| matches!(self.ping(from, to, 1, "0.2"), Ok((_, 1))))
    }

    /// Whether pod `a` reaches pod `b` over IPv4 and over IPv6: `None` for
    /// a family one of them lacks.
    pub fn reaches_pod(&self, a: &PodState, b: &PodState) -> (Option<bool>, Option<bool>) {
        let v4 =
            (!a.ip.is_unspecified() && !b.ip.is_unspecified()).then(|| self.reaches(&a.ns, b.ip));
        let v6 = a.ip6.and(b.ip6).map(|b6| self.reaches(&a.ns, b6));
        (v4, v6)
    }

    /// Pod pairs that cannot reach each other, as (from, to) pod IPs: over
    /// IPv4, and over IPv6 between pods that have it.
    pub fn unreachable_pairs(&self) -> Vec<(IpAddr, IpAddr)> {
        let pods = self.pods();
        let mut bad = Vec::new();
        for (_, a) in &pods {
            for (_, b) in pods.iter().filter(|(_, b)| a != b) {
                let (v4, v6) = self.reaches_pod(a, b);
                if v4 == Some(false) {
                    bad.push((a.ip.into(), b.ip.into()));
                }
                if let (Some(false), Some(a6), Some(b6)) = (v6, a.ip6, b.ip6) {
                    bad.push((a6.into(), b6.into()));
                }
            }
        }
        bad
    }

    /// The process id of a lab process (e.g. `node-1`).
    pub fn pid(&self, what: &str) -> Result<u32> {
        Ok(self.proc(what)?.pid)
    }

    /// Waits until every node is ready with every other host as a peer and
    /// every pod reaches every other pod.
    pub fn wait_converged(&self, within: Duration) -> Result<()> {
        // A stopped node keeps its lease and data plane: still a peer.
        let peers = self.state.hosts.len().saturating_sub(1);
        self.wait_for(within, "every node to program every peer", || {
            for h in self
                .state
                .hosts
                .iter()
                .filter(|h| self.running(&format!("node-{}", h.index)))
            {
                let s = self.node_status(h.index).ok();
                let ok = s.as_ref().is_some_and(|s| {
                    s["ready"] == true && s["peers"].as_u64() == Some(peers as u64)
                });
                if !ok {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        self.wait_for(within, "every pod to reach every other pod", || {
            Ok(self.unreachable_pairs().is_empty())
        })
    }

    /// Routes weft installed on host `i` (`ip route show proto 87`).
    pub fn weft_routes(&self, i: u32) -> Result<String> {
        ns_run(&self.host(i)?.ns, &["route", "show", "proto", "87"])
    }

    /// `ip -n <host i's namespace> <args>`.
    pub fn host_ip(&self, i: u32, args: &[&str]) -> Result<String> {
        ns_run(&self.host(i)?.ns, args)
    }

    /// How a process this lab started (and still holds) has ended, if it has.
    pub fn exit_status(&mut self, what: &str) -> Option<std::process::ExitStatus> {
        self.children.get_mut(what)?.try_wait().ok().flatten()
    }

    /// Waits up to `within` for `what` to exit; an error, with its log's
    /// tail, if it keeps running.
    pub fn wait_exit(&mut self, what: &str, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(st) = self.exit_status(what) {
                return Ok(st);
            }
            if std::time::Instant::now() >= deadline {
                bail!("{what} kept running:\n{}", self.log_tail(what, 20));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `etcdctl` against the lab's etcd (inside the fabric), e.g. to
    /// write what the controller would refuse.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        self.etcdctl_at(&self.etcd_endpoints().join(","), args)
    }

    /// Runs `etcdctl` inside the fabric against `endpoints` only.
    pub fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Result<String> {
        let mut all = vec![
            "netns",
            "exec",
            self.state.fabric.as_str(),
            "etcdctl",
            "--endpoints",
            endpoints,
        ];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Host `i`'s `--control-socket` (`weftctl node rekey --socket`).
    pub fn control_socket(&self, i: u32) -> PathBuf {
        self.dir.join(format!("h{i}-node.sock"))
    }

    /// Runs `weftctl` inside host `i`'s namespace (e.g. `node rekey`).
    pub fn host_weftctl(&self, i: u32, args: &[&str]) -> Result<String> {
        let bin = workspace_bin("weftctl")?.display().to_string();
        let ns = self.host(i)?.ns.clone();
        let mut all = vec!["netns", "exec", ns.as_str(), bin.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn running(&self, what: &str) -> bool {
        match self.proc(what) {
            Ok(p) => crate::process::alive_as(p.pid, &p.argv[0]),
            Err(_) => false,
        }
    }

    /// Polls `check` until it says yes; the error names what was awaited.
    pub fn wait_for(
        &self,
        within: Duration,
        what: &str,
        mut check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        self.wait_for_value(within, what, || Ok(check()?.then_some(())))
    }

    /// Polls `check` until it gives a value; the error names what was awaited.
    pub fn wait_for_value<T>(
        &self,
        within: Duration,
        what: &str,
        mut check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + within;
        let mut last_err = String::new();
        loop {
            match check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) if is_unretryable(&e) => {
                    return Err(e.context(format!("gave up waiting for {what}")));
                }
                Err(e) => last_err = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                let mut msg = format!("timed out after {within:?} waiting for {what}");
                if !last_err.is_empty() {
                    msg.push_str(&format!(" (last error: {last_err})"));
                }
                bail!("{msg}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Log tails of every process, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for p in &self.state.procs {
            out.push_str(&format!(
                "--- {} (pid {}) log tail:\n{}\n",
                p.what,
                p.pid,
                self.log_tail(&p.what, 12)
            ));
        }
        out
    }

    /// Stops every process and removes every namespace and the state.
    pub fn down(mut self) -> Result<()> {
        self.teardown();
        Ok(())
    }

    fn teardown(&mut self) {
        // Nodes first, so they do not log a controller that went away.
        let mut procs = self.state.procs.clone();
        procs.sort_by_key(|p| !p.what.starts_with("node-"));
        for p in procs {
            match self.children.remove(&p.what) {
                Some(mut c) => {
                    stop(&mut c, Duration::from_secs(5));
                }
                None => stop_pid(p.pid, &p.argv[0], Duration::from_secs(5)),
            }
        }
        let mut namespaces: Vec<String> = self
            .state
            .hosts
            .iter()
            .flat_map(|h| h.pods.iter().map(|p| p.ns.clone()))
            .collect();
        namespaces.extend(self.state.hosts.iter().map(|h| h.ns.clone()));
        namespaces.extend(self.state.hosts.iter().filter_map(|h| h.router.clone()));
        namespaces.extend(self.state.service_ns.iter().cloned());
        namespaces.push(self.state.outside.clone());
        namespaces.push(self.state.fabric.clone());
        for ns in namespaces {
            let _ = run("ip", &["netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Tears down lab `name` from its state file, and any lab namespace
    /// left without one (a lab whose process crashed before saving).
    pub fn down_by_name(name: &str) -> Result<bool> {
        let found = match Lab::load(name) {
            Ok(mut lab) => {
                lab.teardown();
                true
            }
            Err(_) => false,
        };
        let prefix = format!("{NS_PREFIX}{name}-");
        let mut swept = false;
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let ns = e.file_name().to_string_lossy().into_owned();
                if ns.starts_with(&prefix) {
                    kill_all_in(&ns);
                    let _ = run("ip", &["netns", "del", &ns]);
                    swept = true;
                }
            }
        }
        let _ = std::fs::remove_dir_all(Self::dir_of(name));
        Ok(found || swept)
    }

    /// Tears down every lab on this machine.
    pub fn down_all() -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(STATE_ROOT)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let ns = e.file_name().to_string_lossy().into_owned();
                if let Some(rest) = ns.strip_prefix(NS_PREFIX) {
                    if let Some((name, _)) = rest.rsplit_once('-') {
                        let name = name.split('-').next().unwrap_or(name).to_string();
                        if !names.contains(&name) {
                            names.push(name);
                        }
                    }
                }
            }
        }
        for n in &names {
            Lab::down_by_name(n)?;
        }
        Ok(names)
    }
}

/// Stops every process in a namespace (`ip netns pids`), by PID.
fn kill_all_in(ns: &str) {
    if let Ok(out) = run("ip", &["netns", "pids", ns]) {
        for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if !exe.is_empty() {
                stop_pid(
                    pid,
                    exe.rsplit('/').next().unwrap_or_default(),
                    Duration::from_secs(5),
                );
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "lab {} failed; logs:\n{}",
                self.state.name,
                self.diagnostics()
            );
        }
        self.teardown();
    }
}
