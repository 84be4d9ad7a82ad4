//! Registering this node's containers' names with the controller.
//!
//! What the containers have is in weft-cni's names file
//! (`<dataDir>/<network>/names.json`), which survives restarts of both.
//! The registrar makes the controller hold exactly that set for this node
//! (one idempotent request with the whole set), whenever the file changes
//! (weft-cni wakes it over the control socket), whenever the node's
//! records the controller shows differ from it (after a lease ran out and
//! took them, or someone removed one), and every few seconds in case a
//! wake-up was lost.

use super::Names;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use weft_config::{NamesFile, MAX_NAMES_FILE};
use weft_lease::api::{NodeNameEntry, NodeNames, MAX_NODE_NAMES};
use weft_lease::client::ControllerClient;
use weft_lease::names::check_container_id;
use weft_lease::NodeName;

/// How often the file is looked at without a wake-up.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long the controller's view may differ from what was sent before
/// it is sent again (its watch lags the answer a little).
const DRIFT_WAIT: Duration = Duration::from_secs(2);

/// How often names the controller refused are offered again (an
/// operator's record may have gone, a lagging replica caught up).
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// After a failed registration, the wait before the next one grows from
/// the first to the second (a wake-up from weft-cni tries at once).
const ERROR_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// The registrar of one node.
#[derive(Debug)]
pub struct Registrar {
    pub client: ControllerClient,
    pub node: NodeName,
    /// weft-cni's names file.
    pub file: PathBuf,
    pub names: Names,
    /// Woken by the control socket's `names` request.
    pub wake: Arc<Notify>,
}

/// The entries a names file asks for, at most [`MAX_NODE_NAMES`].
pub fn desired(file: &Path) -> Result<BTreeSet<NodeNameEntry>, String> {
    let shown = file.display();
    let text = match std::fs::metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(format!("{shown}: {e}")),
        Ok(m) if m.len() > MAX_NAMES_FILE => {
            return Err(format!(
                "{shown} has {} bytes; at most {MAX_NAMES_FILE} are read",
                m.len()
            ))
        }
        Ok(_) => std::fs::read_to_string(file).map_err(|e| format!("{shown}: {e}"))?,
    };
    let parsed = NamesFile::parse(&text).map_err(|e| format!("{shown}: {e}"))?;
    // One entry per name and address, whatever the file repeats.
    let mut out: std::collections::BTreeMap<_, NodeNameEntry> = Default::default();
    for a in parsed.attachments {
        let container_id = check_container_id(&a.container_id)
            .is_ok()
            .then(|| a.container_id.clone());
        for name in &a.names {
            for address in &a.addresses {
                out.entry((name.clone(), *address))
                    .or_insert_with(|| NodeNameEntry {
                        name: name.clone(),
                        address: *address,
                        container_id: container_id.clone(),
                    });
            }
        }
    }
    if out.len() > MAX_NODE_NAMES {
        tracing::warn!(
            file = %shown,
            entries = out.len(),
            "more names and addresses than a node registers ({MAX_NODE_NAMES}); the rest are left out"
        );
    }
    Ok(out.into_values().take(MAX_NODE_NAMES).collect())
}

/// A file's identity and version: read again only when it changes (every
/// name change in the cluster wakes the registrar).
type Stamp = (u64, u64, std::time::SystemTime);

fn stamp(file: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

impl Registrar {
    /// Keeps the controller's records of this node equal to the file,
    /// forever.
    pub async fn run(self) {
        let mut read: Option<(Option<Stamp>, BTreeSet<NodeNameEntry>)> = None;
        let mut sent: Option<BTreeSet<NodeNameEntry>> = None;
        let mut refused: BTreeSet<NodeNameEntry> = BTreeSet::new();
        let mut last_try: Option<Instant> = None;
        let mut last_error = String::new();
        let mut backoff = crate::retry::Backoff::new(ERROR_BACKOFF.0, ERROR_BACKOFF.1);
        let mut not_before: Option<Instant> = None;
        loop {
            let woken = tokio::select! {
                _ = self.wake.notified() => true,
                _ = self.names.changed() => false,
                _ = tokio::time::sleep(CHECK_EVERY) => false,
            };
            if !woken && not_before.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            // Until the list is loaded, what the controller holds is not known.
            if !self.names.read().synced {
                continue;
            }
            let now = stamp(&self.file);
            let want = match read.as_ref().filter(|(s, _)| *s == now && now.is_some()) {
                Some((_, w)) => Ok(w.clone()),
                None => desired(&self.file),
            };
            let want = match want {
                Ok(w) => {
                    read = Some((now, w.clone()));
                    w
                }
                Err(e) => {
                    if e != last_error {
                        tracing::warn!("names of this node's containers: {e}; registered names stay as they are");
                        last_error = e;
                    }
                    continue;
                }
            };
            let have: BTreeSet<NodeNameEntry> = self
                .names
                .read()
                .of_node(&self.node)
                .map(|r| NodeNameEntry {
                    name: r.name.clone(),
                    address: r.address,
                    container_id: r.container_id.clone(),
                })
                .collect();
            let expected: BTreeSet<NodeNameEntry> = want.difference(&refused).cloned().collect();
            let new_set = sent.as_ref() != Some(&want);
            let since = |d: Duration| last_try.is_none_or(|t| t.elapsed() >= d);
            let drifted = have != expected && since(DRIFT_WAIT);
            let retry_refused = !refused.is_empty() && since(REFUSED_RETRY);
            if !new_set && !drifted && !retry_refused {
                continue;
            }
            last_try = Some(Instant::now());
            let req = NodeNames {
                names: want.iter().cloned().collect(),
            };
            match self.client.sync_names(self.node.as_str(), &req).await {
                Ok(r) => {
                    if r.added + r.removed > 0 || new_set {
                        tracing::info!(
                            names = want.len(),
                            added = r.added,
                            removed = r.removed,
                            refused = r.refused.len(),
                            "names registered with the controller"
                        );
                    }
                    for x in &r.refused {
                        tracing::warn!(name = %x.entry.name, address = %x.entry.address, reason = %x.reason, "the controller refused a name");
                    }
                    refused = r.refused.into_iter().map(|x| x.entry).collect();
                    sent = Some(want);
                    last_error.clear();
                    backoff.reset();
                    not_before = None;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    not_before = Some(Instant::now() + delay);
                    let e = e.to_string();
                    if e != last_error {
                        tracing::warn!("registering names: {e}; trying again (next in {delay:?} or when a container's names change)");
                        last_error = e;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_config::AttachmentNames;

    #[test]
    fn the_file_gives_every_name_with_every_address() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("names.json");
        assert!(desired(&file).unwrap().is_empty(), "no file: no names");
        let f = NamesFile {
            attachments: vec![AttachmentNames {
                container_id: "c0ffee".into(),
                ifname: "eth0".into(),
                names: vec!["web".parse().unwrap(), "api".parse().unwrap()],
                addresses: vec![
                    "10.244.3.5".parse().unwrap(),
                    "fdc6:7765:6675:3::5".parse().unwrap(),
                ],
            }],
        };
        std::fs::write(&file, f.render()).unwrap();
        let d = desired(&file).unwrap();
        assert_eq!(d.len(), 4);
        assert!(d
            .iter()
            .all(|e| e.container_id.as_deref() == Some("c0ffee")));
        std::fs::write(&file, "{garbage").unwrap();
        assert!(desired(&file).unwrap_err().contains("not a names file"));
        let big = vec![b' '; MAX_NAMES_FILE as usize + 1];
        std::fs::write(&file, big).unwrap();
        assert!(desired(&file).unwrap_err().contains("at most"));
    }
}
