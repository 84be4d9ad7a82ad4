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
        shared.write().reset(snap);
        publish(&shared, rev);
        tracing::info!(revision = rev, leases, "loaded leases from the store");
        if follow(&shared, rev + 1, &mut backoff).await {
            tracing::warn!("store history was compacted past our position; listing again");
        }
    }
}

/// Follows the store from `from`; returns when a re-list is needed.
async fn follow(shared: &Shared, mut from: i64, backoff: &mut Backoff) -> bool {
    loop {
        let mut stream = match shared.store.watch(from).await {
            Ok(s) => s,
            Err(StoreError::Compacted { .. }) => return true,
            Err(e) => {
                shared.store_failed("watching leases", &e);
                backoff.wait().await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
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
                Err(StoreError::Compacted { .. }) => return true,
                Err(e) => {
                    shared.store_failed("watching leases", &e);
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}

/// Pings the store so readiness reflects an outage even when idle.
pub(crate) async fn health(shared: Arc<Shared>) {
    loop {
        match shared.store.ping().await {
            Ok(()) => shared.store_ok(),
            Err(e) => shared.store_failed("store health check", &e),
        }
        tokio::time::sleep(shared.opts.health_interval).await;
    }
}
