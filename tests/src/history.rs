//! The lease history of a lab run, and a checker that proves what weft
//! promises about it.
//!
//! [`Recorder`] follows every change under the lab's etcd prefix from
//! revision 1 (`etcdctl watch --rev 1`, which resumes on another member
//! when one fails) into a file. [`History`] replays it revision by
//! revision and checks:
//!
//! - at no revision do two live leases overlap;
//! - at no revision does one node hold two subnets;
//! - a node that kept renewing never lost its lease (no delete, no move);
//! - every acquire answer a node got (its `lease acquired` log line) is a
//!   lease etcd held for that node at that revision;
//! - at the end, every running node routes exactly the other live leases.

use crate::lab::Lab;
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The lab's etcd prefix.
const PREFIX: &str = "/weft/network/";
/// Written at the end: once the recorder has it, it has everything before.
const END_MARK: &str = "/weft/network/history-end";

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: i64,
    /// Relative to the prefix, e.g. `subnets/10.244.5.0-24`.
    pub key: String,
    /// `None`: deleted (by hand, or its etcd lease ran out).
    pub value: Option<String>,
}

/// A lease as the history sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub node: String,
    /// When it was put last.
    pub revision: i64,
}

/// What a node was told: "you hold `subnet`, at `revision`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    pub node: String,
    pub subnet: Ipv4Net,
    pub revision: i64,
}

/// Follows the lab's etcd into a file until [`Recorder::finish`]. etcdctl's
/// watch ends when its member loses the leader ("no leader"); it is started
/// again from the revision after the last one recorded.
#[derive(Debug)]
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    file: PathBuf,
}

/// One `etcdctl watch` after another until `stop`.
fn record(fabric: String, endpoints: String, file: PathBuf, stop: Arc<AtomicBool>) {
    let mut next = 1;
    while !stop.load(Ordering::Relaxed) {
        let open = |f: &PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
        };
        let (Ok(out), Ok(err)) = (open(&file), open(&file.with_file_name("history.err"))) else {
            return;
        };
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &fabric,
            "etcdctl",
            "--endpoints",
            &endpoints,
        ])
        .args([
            "watch",
            "--prefix",
            PREFIX,
            "--rev",
            &next.to_string(),
            "-w",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        if let Ok(mut child) = crate::process::spawn_tied(cmd) {
            while !stop.load(Ordering::Relaxed) && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            crate::process::stop(&mut child, Duration::from_secs(5));
        }
        let mut text = std::fs::read_to_string(&file).unwrap_or_default();
        // A watch stopped mid-line: drop the half line, so the next
        // watch's output starts on a line of its own.
        if !text.is_empty() && !text.ends_with('\n') {
            text.truncate(text.rfind('\n').map_or(0, |p| p + 1));
            let _ = std::fs::write(&file, &text);
        }
        if let Some(last) = History::parse(&text)
            .ok()
            .and_then(|h| h.changes.last().cloned())
        {
            next = last.revision + 1;
        }
        if !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Recorder {
    /// Starts recording (from revision 1, so nothing before is missed).
    pub fn start(lab: &Lab) -> Result<Recorder> {
        let file = lab.dir().join("history.jsonl");
        std::fs::File::create(&file)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (fabric, endpoints) = (lab.state.fabric.clone(), lab.etcd_endpoints().join(","));
        let (f, s) = (file.clone(), stop.clone());
        let thread = std::thread::spawn(move || record(fabric, endpoints, f, s));
        Ok(Recorder {
            stop,
            thread: Some(thread),
            file,
        })
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Writes the end mark, waits until the recording has it, stops the
    /// recorder and reads the history.
    pub fn finish(mut self, lab: &Lab) -> Result<History> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // etcd may be recovering from the last fault: retry the mark.
        loop {
            match lab.etcdctl(&["put", END_MARK, "1"]) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("writing the end mark"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        loop {
            let text = std::fs::read_to_string(&self.file)?;
            let history = History::parse(&text)?;
            if history.changes.iter().any(|c| c.key == "history-end") {
                self.halt();
                return Ok(history);
            }
            if Instant::now() > deadline {
                self.halt();
                bail!(
                    "the recorder never saw the end mark; etcdctl said: {}",
                    std::fs::read_to_string(self.file.with_file_name("history.err"))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.halt();
    }
}

/// `10.244.5.0-24` → 10.244.5.0/24 (IPv4 keys only; the lab is IPv4).
fn subnet_of(rel: &str) -> Option<Ipv4Net> {
    let (ip, len) = rel.strip_prefix("subnets/")?.split_once('-')?;
    Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?)
        .ok()
        .map(|n| n.trunc())
}

/// Every change, in revision order.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub changes: Vec<Change>,
}

impl History {
    /// Reads `etcdctl watch -w json` output (one response per line).
    pub fn parse(text: &str) -> Result<History> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |v: &serde_json::Value| -> Result<String> {
            let s = v.as_str().unwrap_or_default();
            Ok(String::from_utf8(b64.decode(s).context("base64")?)?)
        };
        let mut changes = Vec::new();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
        for (n, line) in lines.iter().enumerate() {
            let resp: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                // A watch stopped while writing leaves half a last line.
                Err(_) if n + 1 == lines.len() => break,
                Err(e) => bail!("watch output {line:?}: {e}"),
            };
            for ev in resp["Events"].as_array().into_iter().flatten() {
                let kv = &ev["kv"];
                let key = decode(&kv["key"])?;
                let Some(rel) = key.strip_prefix(PREFIX) else {
                    continue;
                };
                let deleted = ev["type"].as_i64() == Some(1) || ev["type"] == "DELETE";
                changes.push(Change {
                    revision: kv["mod_revision"].as_i64().context("no mod_revision")?,
                    key: rel.to_string(),
                    value: if deleted {
                        None
                    } else {
                        Some(decode(&kv["value"])?)
                    },
                });
            }
        }
        // A watch that resumed on another member may repeat a response.
        changes.dedup();
        if let Some(w) = changes.windows(2).find(|w| w[1].revision < w[0].revision) {
            bail!("the recording goes back in time: {w:?}");
        }
        Ok(History { changes })
    }

    /// Replays the history, calling `at` with the leases live after each
    /// revision (subnet → holder).
    /// A live lease put again by another node (taken over without a delete
    /// first) is an error.
    fn replay(
        &self,
        mut at: impl FnMut(i64, &BTreeMap<Ipv4Net, Held>) -> Result<()>,
    ) -> Result<()> {
        let mut live: BTreeMap<Ipv4Net, Held> = BTreeMap::new();
        let mut i = 0;
        while i < self.changes.len() {
            let rev = self.changes[i].revision;
            while i < self.changes.len() && self.changes[i].revision == rev {
                let c = &self.changes[i];
                if let Some(subnet) = subnet_of(&c.key) {
                    match &c.value {
                        None => {
                            live.remove(&subnet);
                        }
                        Some(v) => {
                            let attrs: serde_json::Value = serde_json::from_str(v)
                                .with_context(|| format!("lease {} at {rev}: {v:?}", c.key))?;
                            let node = attrs["NodeName"].as_str().unwrap_or_default().to_string();
                            let held = Held {
                                node: node.clone(),
                                revision: rev,
                            };
                            if let Some(was) = live.insert(subnet, held) {
                                if was.node != node {
                                    bail!(
                                        "at revision {rev} lease {subnet} of {} was taken over by {node}",
                                        was.node
                                    );
                                }
                            }
                        }
                    }
                }
                i += 1;
            }
            at(rev, &live)?;
        }
        Ok(())
    }

    /// The leases live at the end.
    pub fn live_at_end(&self) -> Result<BTreeMap<Ipv4Net, Held>> {
        let mut last = BTreeMap::new();
        self.replay(|_, live| {
            last = live.clone();
            Ok(())
        })?;
        Ok(last)
    }

    /// At no revision did two live leases overlap, one node hold two, or a
    /// live lease pass to another node without being deleted first.
    pub fn check_exclusive(&self) -> Result<()> {
        self.replay(|rev, live| {
            let nets: Vec<&Ipv4Net> = live.keys().collect();
            for (a, b) in nets.iter().zip(nets.iter().skip(1)) {
                // Sorted by address: overlapping ones are neighbours.
                if a.contains(&b.network()) || b.contains(&a.network()) {
                    bail!(
                        "at revision {rev} leases {a} ({}) and {b} ({}) overlap",
                        live[a].node,
                        live[b].node
                    );
                }
            }
            let mut by_node: BTreeMap<&str, Vec<&Ipv4Net>> = BTreeMap::new();
            for (net, h) in live {
                by_node.entry(&h.node).or_default().push(net);
            }
            if let Some((node, nets)) = by_node.iter().find(|(n, v)| !n.is_empty() && v.len() > 1) {
                bail!("at revision {rev} node {node} holds {nets:?}");
            }
            Ok(())
        })
    }

    /// Nodes in `kept` (they kept renewing throughout) never lost their
    /// lease: once they held a subnet, they held that same subnet at every
    /// later revision.
    pub fn check_kept(&self, kept: &[String]) -> Result<()> {
        let mut first: BTreeMap<String, Ipv4Net> = BTreeMap::new();
        self.replay(|rev, live| {
            let held: BTreeMap<&str, Ipv4Net> =
                live.iter().map(|(n, h)| (h.node.as_str(), *n)).collect();
            for node in kept {
                match (first.get(node), held.get(node.as_str())) {
                    (None, Some(n)) => {
                        first.insert(node.clone(), *n);
                    }
                    (Some(was), now) if now != Some(was) => {
                        bail!("at revision {rev} node {node}, which kept renewing, lost {was} (now {now:?})")
                    }
                    _ => {}
                }
            }
            Ok(())
        })?;
        if let Some(n) = kept.iter().find(|n| !first.contains_key(*n)) {
            bail!("node {n} never held a lease");
        }
        Ok(())
    }

    /// Every acquire answer names a lease etcd held for that node at that
    /// revision.
    pub fn check_acquires(&self, acquires: &[Acquire]) -> Result<()> {
        let mut by_rev: BTreeMap<i64, Vec<&Acquire>> = BTreeMap::new();
        for a in acquires {
            by_rev.entry(a.revision).or_default().push(a);
        }
        let mut seen = 0;
        self.replay(|rev, live| {
            for a in by_rev.get(&rev).into_iter().flatten() {
                match live.get(&a.subnet) {
                    Some(h) if h.node == a.node => seen += 1,
                    other => bail!(
                        "node {} was told it holds {} at revision {rev}, but etcd had {other:?}",
                        a.node,
                        a.subnet
                    ),
                }
            }
            Ok(())
        })?;
        if seen != acquires.len() {
            let revs: BTreeSet<i64> = self.changes.iter().map(|c| c.revision).collect();
            let missing: Vec<&Acquire> = acquires
                .iter()
                .filter(|a| !revs.contains(&a.revision))
                .collect();
            bail!("acquire answers at revisions with no change in etcd: {missing:?}");
        }
        Ok(())
    }
}

/// The acquire answers the lab's nodes logged (`lease acquired`, with the
/// lease's revision), from every node log in the lab's directory: also
/// those of hosts that have left (`node-<i>.log` and `node-<i>.<n>.log`
/// are host-<i>'s).
pub fn acquires_in_logs(lab: &Lab) -> Result<Vec<Acquire>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(lab.dir())?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(i) = name
            .strip_prefix("node-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.split('.').next())
        else {
            continue;
        };
        let log = std::fs::read_to_string(e.path())?;
        out.extend(acquires_in_log(&format!("host-{i}"), &log)?);
    }
    Ok(out)
}

/// The `lease acquired` lines of one node's log.
pub fn acquires_in_log(node: &str, log: &str) -> Result<Vec<Acquire>> {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        Some(line[at..].split_whitespace().next()?.to_string())
    };
    let mut out = Vec::new();
    for line in log.lines().filter(|l| l.contains("lease acquired")) {
        let (Some(subnet), Some(rev)) = (field(line, "subnet"), field(line, "revision")) else {
            bail!("a lease acquired line without subnet and revision: {line}");
        };
        out.push(Acquire {
            node: node.to_string(),
            subnet: subnet
                .parse()
                .with_context(|| format!("subnet in {line}"))?,
            revision: rev.parse().with_context(|| format!("revision in {line}"))?,
        });
    }
    Ok(out)
}

/// Every running node routes exactly the live leases of the others (read
/// from its kernel: `ip route show proto 87`).
pub fn check_views(lab: &Lab, live: &BTreeMap<Ipv4Net, Held>) -> Result<()> {
    for h in &lab.state.hosts {
        if !lab.running(&format!("node-{}", h.index)) {
            continue;
        }
        let want: BTreeSet<Ipv4Net> = live
            .iter()
            .filter(|(_, held)| held.node != h.name)
            .map(|(n, _)| *n)
            .collect();
        let routes = lab.weft_routes(h.index)?;
        let have: BTreeSet<Ipv4Net> = routes
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        if have != want {
            bail!(
                "{} routes {have:?}, but etcd's other leases are {want:?}",
                h.name
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str) -> Option<String> {
        Some(format!(
            r#"{{"PublicIP":"198.18.0.11","BackendType":"vxlan","NodeName":"{node}"}}"#
        ))
    }

    fn change(revision: i64, subnet: &str, value: Option<String>) -> Change {
        Change {
            revision,
            key: format!("subnets/{subnet}"),
            value,
        }
    }

    fn history(changes: Vec<Change>) -> History {
        History { changes }
    }

    #[test]
    fn parses_etcdctl_watch_json() {
        let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let text = format!(
            "{{\"Header\":{{\"revision\":3}},\"Events\":[{{\"kv\":{{\"key\":\"{}\",\"mod_revision\":2,\"value\":\"{}\"}}}},{{\"type\":1,\"kv\":{{\"key\":\"{}\",\"mod_revision\":3}}}}]}}\n",
            b("/weft/network/subnets/10.244.1.0-24"),
            b(&lease("a").unwrap()),
            b("/weft/network/subnets/10.244.1.0-24"),
        );
        let h = History::parse(&text).unwrap();
        assert_eq!(
            h.changes,
            vec![
                change(2, "10.244.1.0-24", lease("a")),
                change(3, "10.244.1.0-24", None)
            ]
        );
        assert!(h.live_at_end().unwrap().is_empty());
    }

    #[test]
    fn a_half_written_last_line_is_left_out_and_one_in_the_middle_is_an_error() {
        let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let full = format!(
            "{{\"Events\":[{{\"kv\":{{\"key\":\"{}\",\"mod_revision\":2,\"value\":\"{}\"}}}}]}}",
            b("/weft/network/subnets/10.244.1.0-24"),
            b(&lease("a").unwrap()),
        );
        let h = History::parse(&format!("{full}\n{{\"Events\":[{{\"kv\"")).unwrap();
        assert_eq!(h.changes.len(), 1);
        assert!(History::parse(&format!("{{\"Events\":[\n{full}\n")).is_err());
    }

    #[test]
    fn overlapping_leases_are_found() {
        let ok = history(vec![
            change(2, "10.244.1.0-24", lease("a")),
            change(3, "10.244.2.0-24", lease("b")),
        ]);
        ok.check_exclusive().unwrap();
        let bad = history(vec![
            change(2, "10.244.0.0-23", lease("a")),
            change(3, "10.244.1.0-24", lease("b")),
        ]);
        let e = bad.check_exclusive().unwrap_err().to_string();
        assert!(e.contains("revision 3") && e.contains("overlap"), "{e}");
    }

    #[test]
    fn a_lease_taken_over_without_a_delete_is_found() {
        let bad = history(vec![
            change(2, "10.244.1.0-24", lease("a")),
            change(3, "10.244.1.0-24", lease("b")),
        ]);
        let e = bad.check_exclusive().unwrap_err().to_string();
        assert!(e.contains("taken over by b"), "{e}");
        // Renewed or updated by its holder: fine.
        history(vec![
            change(2, "10.244.1.0-24", lease("a")),
            change(3, "10.244.1.0-24", lease("a")),
        ])
        .check_exclusive()
        .unwrap();
    }

    #[test]
    fn a_node_with_two_subnets_is_found() {
        let bad = history(vec![
            change(2, "10.244.1.0-24", lease("a")),
            change(3, "10.244.2.0-24", lease("a")),
        ]);
        let e = bad.check_exclusive().unwrap_err().to_string();
        assert!(e.contains("node a holds"), "{e}");
        // Moving (delete, then a new one) is not holding two.
        history(vec![
            change(2, "10.244.1.0-24", lease("a")),
            change(3, "10.244.1.0-24", None),
            change(4, "10.244.2.0-24", lease("a")),
        ])
        .check_exclusive()
        .unwrap();
    }

    #[test]
    fn a_lost_lease_of_a_renewing_node_is_found() {
        let h = history(vec![
            change(2, "10.244.1.0-24", lease("a")),
            change(3, "10.244.2.0-24", lease("b")),
            change(4, "10.244.1.0-24", None),
        ]);
        h.check_kept(&["b".into()]).unwrap();
        let e = h.check_kept(&["a".into()]).unwrap_err().to_string();
        assert!(
            e.contains("revision 4") && e.contains("lost 10.244.1.0/24"),
            "{e}"
        );
        let e = h.check_kept(&["c".into()]).unwrap_err().to_string();
        assert!(e.contains("never held"), "{e}");
    }

    #[test]
    fn acquire_answers_are_checked_against_etcd() {
        let h = history(vec![
            change(2, "10.244.1.0-24", lease("a")),
            change(5, "10.244.2.0-24", lease("b")),
        ]);
        let told = |node: &str, subnet: &str, revision| Acquire {
            node: node.into(),
            subnet: subnet.parse().unwrap(),
            revision,
        };
        h.check_acquires(&[told("a", "10.244.1.0/24", 2), told("b", "10.244.2.0/24", 5)])
            .unwrap();
        let e = h
            .check_acquires(&[told("b", "10.244.1.0/24", 2)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("told it holds 10.244.1.0/24"), "{e}");
        let e = h
            .check_acquires(&[told("a", "10.244.1.0/24", 3)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no change in etcd"), "{e}");
    }

    #[test]
    fn acquire_lines_are_read_from_logs() {
        let log = "2026-11-28T21:00:00Z  INFO lease acquired subnet=10.244.7.0/24 revision=41 backend=vxlan previous=None\nother line\n";
        let a = acquires_in_log("host-1", log).unwrap();
        assert_eq!(
            a,
            vec![Acquire {
                node: "host-1".into(),
                subnet: "10.244.7.0/24".parse().unwrap(),
                revision: 41
            }]
        );
        assert!(acquires_in_log("h", "INFO lease acquired subnet=10.244.7.0/24").is_err());
    }
}
