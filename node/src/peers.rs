//! Following the leases: list, then the controller's watch stream; re-list
//! when told to (410, an error line), reconnect when the stream ends or
//! goes silent. The result is one table of leases, shared through a
//! `watch` channel: bursts of changes collapse into the latest table.

use crate::retry::{until_ok, Backoff};
use crate::status::Status;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use weft_backends::peer::{read, Candidate};
use weft_lease::api::WatchKind;
use weft_lease::client::ControllerClient;
use weft_lease::SubnetKey;

/// All leases as last seen, each read and checked once on arrival.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerTable {
    /// Whether a full list has been loaded; until then nothing is
    /// reconciled (a restart must not remove routes it has not seen yet).
    pub synced: bool,
    pub revision: i64,
    pub leases: BTreeMap<SubnetKey, Candidate>,
}

/// Follows the controller's leases into `tx`, forever.
pub async fn follow(
    client: ControllerClient,
    tx: watch::Sender<Arc<PeerTable>>,
    silence: Duration,
    status: Arc<Status>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let list = until_ok("listing leases from the controller", || client.list(false)).await;
        let n = list.leases.len();
        tx.send_modify(|t| {
            let t = Arc::make_mut(t);
            t.synced = true;
            t.revision = list.revision;
            t.leases = list.leases.iter().map(|l| (l.key, read(l))).collect();
        });
        tracing::info!(leases = n, revision = list.revision, "lease list loaded");
        let mut from = list.revision + 1;
        // Watch until a re-list is needed.
        'watch: loop {
            let mut stream = match client.watch(from).await {
                Ok(s) => s,
                Err(e) if e.status() == Some(410) => {
                    tracing::info!("the controller no longer has revision {from}; listing again");
                    break 'watch;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!("watching leases: {e}; retrying in {delay:?} (the data plane stays as it is)");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            status.watch_restarts.inc();
            loop {
                let line = match tokio::time::timeout(silence, stream.next()).await {
                    Err(_) => {
                        tracing::warn!("no word from the controller in {silence:?}; reconnecting");
                        break;
                    }
                    Ok(None) => {
                        tracing::info!("the controller closed the lease watch; reconnecting");
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!("lease watch broke: {e}; reconnecting");
                        break;
                    }
                    Ok(Some(Ok(line))) => line,
                };
                backoff.reset();
                match line.kind {
                    WatchKind::Put | WatchKind::Delete => {
                        let Some(lease) = line.lease else { continue };
                        from = from.max(line.revision + 1);
                        let put = line.kind == WatchKind::Put;
                        tracing::debug!(subnet = %lease.key, node = ?lease.node_name, put, "lease changed");
                        tx.send_modify(|t| {
                            let t = Arc::make_mut(t);
                            t.revision = t.revision.max(line.revision);
                            if put {
                                t.leases.insert(lease.key, read(&lease));
                            } else {
                                t.leases.remove(&lease.key);
                            }
                        });
                    }
                    WatchKind::Heartbeat => {}
                    WatchKind::Error => {
                        tracing::info!(
                            "controller: {}; listing again",
                            line.message.unwrap_or_default()
                        );
                        break 'watch;
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}
