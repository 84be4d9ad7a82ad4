//! Pod-to-pod traffic during a fault: every pod pings a pod on another
//! host, five times a second, until stopped; the counts say what was lost.

use crate::lab::Lab;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Pings sent and answered, per pair and in total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loss {
    pub sent: u32,
    pub received: u32,
    /// `ping` runs that could not be started or said nothing readable
    /// (not counted as sent).
    pub failed_runs: u32,
    /// (from, to, sent, received) for pairs that lost any.
    pub lossy: Vec<(Ipv4Addr, Ipv4Addr, u32, u32)>,
}

impl Loss {
    pub fn lost(&self) -> u32 {
        self.sent - self.received
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} pings answered", self.received, self.sent)?;
        if self.failed_runs > 0 {
            write!(f, " ({} ping runs failed to start)", self.failed_runs)?;
        }
        for (a, b, s, r) in &self.lossy {
            write!(f, "; {a} -> {b} lost {} of {s}", s - r)?;
        }
        Ok(())
    }
}

/// A pinging pair: (from, to, its thread answering (sent, received,
/// failed runs)).
type Pair = (Ipv4Addr, Ipv4Addr, JoinHandle<(u32, u32, u32)>);

/// Pings running in the background.
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<Pair>,
}

/// One `ping` run of `count` packets, 0.2 s apart: (sent, received), or
/// `None` when ping could not run or said nothing readable. A reply has
/// 2 s to come (a loaded machine is slow, not lossy).
fn ping_chunk(ns: &str, to: Ipv4Addr, count: u32) -> Option<(u32, u32)> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-q", "-n", "-W", "2", "-i", "0.2", "-c",
        ])
        .arg(count.to_string())
        .arg(to.to_string())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    ping_summary(&String::from_utf8_lossy(&out.stdout))
}

/// (transmitted, received) from ping's summary line.
pub fn ping_summary(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

impl Traffic {
    /// Starts pinging: each pod of host `hosts[k]` pings the first pod of
    /// `hosts[k + 1]` (the last pings the first), so every host's traffic
    /// crosses the fabric.
    pub fn start(lab: &Lab, hosts: &[u32]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (k, h) in hosts.iter().enumerate() {
            let next = hosts[(k + 1) % hosts.len()];
            let (Ok(from), Ok(to)) = (lab.host(*h), lab.host(next)) else {
                continue;
            };
            let (Some(a), Some(b)) = (from.pods.first(), to.pods.first()) else {
                continue;
            };
            let (ns, src, dst) = (a.ns.clone(), a.ip, b.ip);
            let stop = stop.clone();
            let t = std::thread::spawn(move || {
                let (mut sent, mut received, mut failed) = (0, 0, 0);
                while !stop.load(Ordering::Relaxed) {
                    match ping_chunk(&ns, dst, 10) {
                        Some((s, r)) => {
                            sent += s;
                            received += r;
                        }
                        None => {
                            failed += 1;
                            std::thread::sleep(std::time::Duration::from_millis(200));
                        }
                    }
                }
                (sent, received, failed)
            });
            threads.push((src, dst, t));
        }
        Traffic { stop, threads }
    }

    /// Stops (after the ping runs in flight end) and counts.
    pub fn finish(self) -> Loss {
        self.stop.store(true, Ordering::Relaxed);
        let mut loss = Loss::default();
        for (a, b, t) in self.threads {
            let (s, r, f) = t.join().unwrap_or((0, 0, 1));
            loss.sent += s;
            loss.received += r;
            loss.failed_runs += f;
            if r < s {
                loss.lossy.push((a, b, s, r));
            }
        }
        loss
    }
}
