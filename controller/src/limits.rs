//! Limits on what one caller can make the controller (and etcd behind it)
//! do: open watch streams, lists with TTLs (one etcd request per lease),
//! and watches that start before the cache's history (a read of the whole
//! keyspace at an old revision).

use crate::error::ControllerError;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use weft_lease::{Lease, SubnetKey};

/// Lists with TTLs: this many at once in a burst, then one per
/// [`TTL_LIST_EVERY`].
pub(crate) const TTL_LIST_BURST: u32 = 5;
pub(crate) const TTL_LIST_EVERY: Duration = Duration::from_secs(1);
/// Catch-ups read from etcd at once; more wait up to [`CATCH_UP_WAIT`].
pub(crate) const CATCH_UPS: usize = 4;
pub(crate) const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// Past snapshots kept: nodes that reconnect after a controller restart
/// mostly ask for the same revision, and one read serves them all.
const PAST_KEPT: usize = 4;

/// A token bucket: `burst` at once, one more every `every`.
#[derive(Debug)]
pub(crate) struct Bucket {
    burst: u32,
    every: Duration,
    /// Tokens (scaled by `every` in nanoseconds) and when last refilled.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub(crate) fn new(burst: u32, every: Duration) -> Self {
        Bucket {
            burst,
            every,
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    /// Takes a token, or says how long until there is one.
    pub(crate) fn take(&self) -> Result<(), Duration> {
        let mut st = crate::lock(&self.state);
        let now = Instant::now();
        let gained = now.duration_since(st.1).as_secs_f64() / self.every.as_secs_f64();
        st.0 = (st.0 + gained).min(f64::from(self.burst));
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            Ok(())
        } else {
            Err(self.every.mul_f64(1.0 - st.0))
        }
    }
}

/// Leases as they were at a past revision.
pub(crate) type Past = Arc<BTreeMap<SubnetKey, Lease>>;

/// The controller's limits and what they need.
#[derive(Debug)]
pub(crate) struct Limits {
    pub max_watchers: usize,
    watchers: Arc<Semaphore>,
    ttl_lists: Bucket,
    ttl_running: tokio::sync::Mutex<()>,
    catch_ups: Semaphore,
    past: Mutex<VecDeque<(i64, Past)>>,
}

fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Limits {
    pub(crate) fn new(max_watchers: usize) -> Self {
        Limits {
            max_watchers,
            watchers: Arc::new(Semaphore::new(max_watchers)),
            ttl_lists: Bucket::new(TTL_LIST_BURST, TTL_LIST_EVERY),
            ttl_running: tokio::sync::Mutex::new(()),
            catch_ups: Semaphore::new(CATCH_UPS),
            past: Mutex::new(VecDeque::new()),
        }
    }

    /// A place for one more watch stream, held while it is open.
    pub(crate) fn watcher(&self) -> Result<OwnedSemaphorePermit, ControllerError> {
        self.watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| ControllerError::TooMany {
                code: "too_many_watchers",
                message: format!(
                    "this controller serves at most {} watch streams at once (--max-watchers); \
                     try again, or another controller",
                    self.max_watchers
                ),
                retry_after: 5,
            })
    }

    /// Permission for a list with TTLs; hold the guard while it runs.
    pub(crate) fn ttl_list(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, ControllerError> {
        let running = self
            .ttl_running
            .try_lock()
            .map_err(|_| ControllerError::TooMany {
                code: "rate_limited",
                message: "another list with TTLs is running (each asks etcd about every lease); \
                          try again in a moment, or list without TTLs"
                    .into(),
                retry_after: 1,
            })?;
        self.ttl_lists
            .take()
            .map_err(|wait| ControllerError::TooMany {
                code: "rate_limited",
                message: format!(
                    "lists with TTLs are limited to {TTL_LIST_BURST} at once and one per {}s \
                     after that (each asks etcd about every lease); try again in {}s",
                    TTL_LIST_EVERY.as_secs(),
                    secs(wait)
                ),
                retry_after: secs(wait),
            })?;
        Ok(running)
    }

    /// The leases at `revision`: from the few kept, else read with `read`
    /// (at most [`CATCH_UPS`] at once; a caller that waited longer than
    /// [`CATCH_UP_WAIT`] is told to come back).
    pub(crate) async fn past<F, Fut>(&self, revision: i64, read: F) -> Result<Past, ControllerError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Past, ControllerError>>,
    {
        if let Some(p) = self.kept(revision) {
            return Ok(p);
        }
        let _permit = tokio::time::timeout(CATCH_UP_WAIT, self.catch_ups.acquire())
            .await
            .map_err(|_| ControllerError::TooMany {
                code: "too_many_catch_ups",
                message: format!(
                    "{CATCH_UPS} watches from before this controller's history are being read \
                     from etcd; try again"
                ),
                retry_after: 2,
            })?
            .map_err(|_| ControllerError::NotReady("shutting down".into()))?;
        // Someone else may have read it while we waited.
        if let Some(p) = self.kept(revision) {
            return Ok(p);
        }
        let p = read().await?;
        let mut kept = crate::lock(&self.past);
        kept.push_back((revision, p.clone()));
        while kept.len() > PAST_KEPT {
            kept.pop_front();
        }
        Ok(p)
    }

    fn kept(&self, revision: i64) -> Option<Past> {
        crate::lock(&self.past)
            .iter()
            .find(|(r, _)| *r == revision)
            .map(|(_, p)| p.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_gives_its_burst_then_one_per_interval() {
        let b = Bucket::new(3, Duration::from_secs(2));
        for _ in 0..3 {
            b.take().unwrap();
        }
        let wait = b.take().unwrap_err();
        assert!(
            wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let wait = b.take().unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        tokio::time::advance(Duration::from_secs(1)).await;
        b.take().unwrap();
        assert!(b.take().is_err());
        // Idle for long: the burst again, not more.
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..3 {
            b.take().unwrap();
        }
        assert!(b.take().is_err());
    }

    #[tokio::test]
    async fn watchers_are_capped_and_a_closed_one_frees_its_place() {
        let l = Limits::new(2);
        let a = l.watcher().unwrap();
        let _b = l.watcher().unwrap();
        let e = l.watcher().unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.body().error, "too_many_watchers");
        drop(a);
        let _c = l.watcher().unwrap();
    }

    #[tokio::test]
    async fn one_list_with_ttls_at_a_time_within_the_rate() {
        let l = Limits::new(1);
        let running = l.ttl_list().unwrap();
        assert_eq!(l.ttl_list().unwrap_err().body().error, "rate_limited");
        drop(running);
        for _ in 1..TTL_LIST_BURST {
            drop(l.ttl_list().unwrap());
        }
        let e = l.ttl_list().unwrap_err();
        assert!(
            e.body().message.contains("try again in 1s"),
            "{}",
            e.body().message
        );
    }

    #[tokio::test]
    async fn past_snapshots_are_read_once_and_at_most_a_few_at_once() {
        let l = Arc::new(Limits::new(1));
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        // Many callers for the same revision while the first read waits.
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (l, reads, gate) = (l.clone(), reads.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                l.past(7, || async move {
                    reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    gate.notified().await;
                    Ok(Past::default())
                })
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Only CATCH_UPS reads started; the rest wait for a permit.
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), CATCH_UPS);
        for _ in 0..CATCH_UPS {
            gate.notify_one();
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // Those that waited found the snapshot kept.
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), CATCH_UPS);
    }
}
