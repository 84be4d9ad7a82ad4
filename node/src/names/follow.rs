//! Following the name records: list, then the controller's names watch;
//! list again when told to (410, an error line), reconnect when the
//! stream ends or goes silent. As the lease follower does.

use super::Names;
use crate::retry::{until_ok, Backoff};
use futures::StreamExt;
use std::time::Duration;
use weft_lease::api::WatchKind;
use weft_lease::client::ControllerClient;

/// Follows the controller's name records into `names`, forever.
pub async fn follow(client: ControllerClient, names: Names, silence: Duration) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let list = until_ok("listing names from the controller", || client.list_names()).await;
        let n = list.names.len();
        names.update(|t| t.load(list.revision, list.names.into_iter().map(|v| v.record)));
        tracing::info!(names = n, revision = list.revision, "name list loaded");
        let mut from = list.revision + 1;
        'watch: loop {
            let mut stream = match client.watch_names(from).await {
                Ok(s) => s,
                Err(e) if e.status() == Some(410) => {
                    tracing::info!(
                        "the controller no longer has revision {from} of the names; listing again"
                    );
                    break 'watch;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        "watching names: {e}; retrying in {delay:?} (names answer as they were)"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            loop {
                let line = match tokio::time::timeout(silence, stream.next()).await {
                    Err(_) => {
                        tracing::warn!("no word from the controller on the names watch in {silence:?}; reconnecting");
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::warn!("names watch broke: {e}; reconnecting");
                        break;
                    }
                    Ok(Some(Ok(line))) => line,
                };
                backoff.reset();
                match line.kind {
                    WatchKind::Put | WatchKind::Delete => {
                        let Some(view) = line.name else { continue };
                        from = from.max(line.revision + 1);
                        let r = view.record;
                        tracing::debug!(name = %r.name, address = %r.address, put = (line.kind == WatchKind::Put), "name changed");
                        names.update(|t| {
                            t.revision = t.revision.max(line.revision);
                            if line.kind == WatchKind::Put {
                                t.put(r);
                            } else {
                                t.delete(&r.name, r.address);
                            }
                        });
                    }
                    WatchKind::Heartbeat => {}
                    WatchKind::Error => {
                        tracing::info!(
                            "controller: {}; listing the names again",
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
