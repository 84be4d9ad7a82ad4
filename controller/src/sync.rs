//! The controller's one store watch: list, then follow changes into the
//! cache; re-watch after errors and re-list after compaction.

use crate::Shared;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use weft_lease::StoreError;

/// Exponential backoff between retries.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn publish(shared: &Shared, revision: i64) {
    shared.applied.send_if_modified(|r| {
        if revision > *r {
            *r = revision;
            true
        } else {
            false
        }
    });
}

/// Keeps the cache in step with the store, forever.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut backoff = Backoff::new();
    loop {
        let snap = match shared.store.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                shared.store_failed("listing leases", &e);
                backoff.wait().await;
                continue;
            }
        };
        shared.store_ok();
        let leases = snap.leases.len();
        let rev = snap.revision;
        // Everything is replaced: whatever a panic left half done is gone.
        shared.cache.clear_poison();
        shared.write().reset(snap);
        shared.repaired();
        publish(&shared, rev);
        tracing::info!(revision = rev, leases, "loaded leases from the store");
        match follow(&shared, rev + 1, &mut backoff).await {
            Relist::Compacted => {
                tracing::warn!("store history was compacted past our position; listing again")
            }
            Relist::Damaged => {}
        }
    }
}

/// Why the cache must be loaded afresh.
enum Relist {
    Compacted,
    Damaged,
}

/// Follows the store from `from`; returns when a re-list is needed.
async fn follow(shared: &Shared, mut from: i64, backoff: &mut Backoff) -> Relist {
    loop {
        let mut stream = match shared.store.watch(from).await {
            Ok(s) => s,
            Err(StoreError::Compacted { .. }) => return Relist::Compacted,
            Err(e) => {
                shared.store_failed("watching leases", &e);
                backoff.wait().await;
                continue;
            }
        };
        loop {
            let item = tokio::select! {
                _ = shared.reload.notified() => return Relist::Damaged,
                item = stream.next() => item,
            };
            let Some(item) = item else { break };
            match item {
                Ok(batch) => {
                    backoff.reset();
                    shared.store_ok();
                    let rev = batch.revision;
                    {
                        let mut cache = shared.write();
                        cache.apply(&batch);
                    }
                    from = from.max(rev + 1);
                    publish(shared, rev);
                }
                Err(StoreError::Compacted { .. }) => return Relist::Compacted,
                Err(e) => {
                    shared.store_failed("watching leases", &e);
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}

/// Pings the store so readiness reflects an outage even when idle, and
/// looks for a poisoned cache lock nobody has touched since.
pub(crate) async fn health(shared: Arc<Shared>) {
    loop {
        shared.damaged();
        match shared.store.ping().await {
            Ok(()) => shared.store_ok(),
            Err(e) => shared.store_failed("store health check", &e),
        }
        tokio::time::sleep(shared.opts.health_interval).await;
    }
}
