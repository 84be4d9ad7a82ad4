//! The controller's one store watch: list, then follow changes into the
//! cache; re-watch after errors and re-list after compaction.

use crate::Shared;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use weft_lease::store::{Snapshot, WatchBatch};
use weft_lease::StoreError;

/// A store change for the cache.
enum Change {
    Batch(WatchBatch),
    Reset(Snapshot),
}

/// Applies store changes to the cache on a thread of its own, in order,
/// and publishes each applied revision.
///
/// What the cache keeps (leases, history lines, indexes) lives as long as
/// the leases; what connections allocate lives for a request. Made on the
/// request threads, every lease would sit among thousands of connections'
/// buffers, and after a join storm the allocator could give back only the
/// pages with no lease on them: 50,000 joins over HTTPS, 8,000 at a time,
/// left about 210 MiB resident for 70 MiB of state. glibc gives each thread
/// a heap of its own (while there are fewer than eight per core), so the
/// copies made here keep the cache's memory together, and the request
/// threads' heaps can be given back whole. The originals are handed back
/// and dropped by the sync task, so that their memory is reused on its
/// thread and not for the next copies.
enum Applier {
    Thread {
        jobs: tokio::sync::mpsc::Sender<Job>,
        /// Originals already copied, waiting to be dropped by the sync task.
        done: Arc<std::sync::Mutex<Vec<Change>>>,
        /// Told when the thread has applied everything queued, so that the
        /// originals do not wait for the next change.
        idle: Arc<tokio::sync::Notify>,
    },
    /// Applied by the sync task itself (`Options::cache_thread` off).
    Inline(Arc<Shared>),
}

/// A change for the thread, when it came, and whom to tell once applied
/// (whether it applied without a panic).
type Job = (Change, tokio::time::Instant, Option<oneshot::Sender<bool>>);

/// Changes queued for the thread before the sync task waits.
const QUEUED: usize = 1024;

impl Applier {
    fn start(shared: Arc<Shared>) -> Self {
        if !shared.opts.cache_thread {
            return Applier::Inline(shared);
        }
        let (jobs, mut rx) = tokio::sync::mpsc::channel::<Job>(QUEUED);
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let idle = Arc::new(tokio::sync::Notify::new());
        let (handed_back, caught_up, on_thread) = (done.clone(), idle.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("weft-cache".into())
            .spawn(move || {
                // Ends when the sync task (and its sender) is gone.
                while let Some((change, now, applied)) = rx.blocking_recv() {
                    let ok = apply_caught(&on_thread, &change, now);
                    crate::lock(&handed_back).push(change);
                    if let Some(tx) = applied {
                        let _ = tx.send(ok);
                    }
                    if rx.is_empty() {
                        caught_up.notify_one();
                    }
                }
            });
        match spawned {
            Ok(_) => Applier::Thread { jobs, done, idle },
            Err(e) => {
                tracing::warn!(
                    "cannot start the cache thread ({e}); the cache is updated by the sync task, \
                     and memory freed after join storms may not go back to the system"
                );
                Applier::Inline(shared)
            }
        }
    }

    /// Queues a batch of changes; `Err` if the thread is gone.
    async fn batch(&self, batch: WatchBatch) -> Result<(), ()> {
        self.send(Change::Batch(batch), None).await
    }

    /// Replaces the cache with `snap`, waiting until that is done, and
    /// gives the memory the old state (and the list) took back. `Ok(false)`
    /// if applying it panicked; `Err` if the thread is gone.
    async fn load(&self, snap: Snapshot) -> Result<bool, ()> {
        let large = snap.leases.len() >= 1000;
        let (tx, rx) = oneshot::channel();
        self.send(Change::Reset(snap), Some(tx)).await?;
        let ok = rx.await.map_err(|_| ())?;
        self.sweep();
        if large {
            let _ = tokio::task::spawn_blocking(weft_lease::memory::give_back).await;
        }
        Ok(ok)
    }

    async fn send(&self, change: Change, applied: Option<oneshot::Sender<bool>>) -> Result<(), ()> {
        let now = tokio::time::Instant::now();
        match self {
            Applier::Thread { jobs, .. } => {
                self.sweep();
                jobs.send((change, now, applied)).await.map_err(|_| ())
            }
            Applier::Inline(shared) => {
                let ok = apply_caught(shared, &change, now);
                if let Some(tx) = applied {
                    let _ = tx.send(ok);
                }
                Ok(())
            }
        }
    }

    /// Resolves when the thread has applied everything queued (never for
    /// the inline applier, which has nothing left over).
    async fn caught_up(&self) {
        match self {
            Applier::Thread { idle, .. } => idle.notified().await,
            Applier::Inline(_) => std::future::pending().await,
        }
    }

    /// Drops the originals of the changes applied since the last sweep.
    fn sweep(&self) {
        if let Applier::Thread { done, .. } = self {
            let applied = std::mem::take(&mut *crate::lock(done));
            drop(applied);
        }
    }
}

/// [`apply`]; `false` if it panicked, which marks the cache damaged (half
/// applied, perhaps): 503 until the sync task has loaded it again.
fn apply_caught(shared: &Shared, change: &Change, now: tokio::time::Instant) -> bool {
    let applied =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(shared, change, now)));
    if applied.is_err() {
        shared.mark_damaged();
    }
    applied.is_ok()
}

/// Applies one change (a copy of it, made on this thread) and publishes
/// its revision.
fn apply(shared: &Shared, change: &Change, now: tokio::time::Instant) {
    match change {
        Change::Batch(b) => {
            // Copied before the lock is taken: readers wait only for the
            // update itself.
            let copy = b.clone();
            shared.write().apply(copy, now);
            publish(shared, b.revision);
        }
        Change::Reset(snap) => {
            let (leases, rev) = (snap.leases.len(), snap.revision);
            // Everything is replaced: whatever a panic left half done is gone.
            shared.cache.clear_poison();
            let copy = snap.clone();
            shared.write().reset(copy, now);
            shared.repaired();
            publish(shared, rev);
            tracing::info!(revision = rev, leases, "loaded leases from the store");
        }
    }
}

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
    let applier = Applier::start(shared.clone());
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
        let rev = snap.revision;
        match applier.load(snap).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!("loading the leases into the cache failed; listing again");
                backoff.wait().await;
                continue;
            }
            Err(()) => return gone(&shared),
        }
        match follow(&shared, &applier, rev + 1, &mut backoff).await {
            Relist::Compacted => {
                tracing::warn!("store history was compacted past our position; listing again")
            }
            Relist::Damaged => {}
            Relist::Gone => return gone(&shared),
        }
    }
}

/// The cache thread ended (it does not, short of a bug): nothing follows
/// the store any more, so the cache is damaged for good: requests get 503
/// and `/healthz` fails until a restart.
fn gone(shared: &Shared) {
    tracing::error!(
        "the cache thread ended; this controller no longer follows the store: restart it"
    );
    shared
        .damaged
        .store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Why the cache must be loaded afresh.
enum Relist {
    Compacted,
    Damaged,
    /// The cache thread is gone: nothing to follow for.
    Gone,
}

/// Follows the store from `from`; returns when a re-list is needed.
async fn follow(
    shared: &Shared,
    applier: &Applier,
    mut from: i64,
    backoff: &mut Backoff,
) -> Relist {
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
                _ = applier.caught_up() => {
                    applier.sweep();
                    continue;
                }
                item = stream.next() => item,
            };
            let Some(item) = item else { break };
            match item {
                Ok(batch) => {
                    backoff.reset();
                    shared.store_ok();
                    let rev = batch.revision;
                    if applier.batch(batch).await.is_err() {
                        return Relist::Gone;
                    }
                    from = from.max(rev + 1);
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
