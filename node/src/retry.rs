//! Retrying with backoff, logging why we wait without flooding the log.

use std::future::Future;
use std::time::Duration;

/// Exponential backoff from `first` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            next: first,
            first,
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Runs `attempt` until it succeeds, waiting with backoff in between. Each
/// new reason for failing is logged at warn level ("waiting for ..."), a
/// repeated one at debug.
pub async fn until_ok<T, E: std::fmt::Display, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut last = String::new();
    loop {
        match attempt().await {
            Ok(v) => {
                if !last.is_empty() {
                    tracing::info!("{what}: done after retrying");
                }
                return v;
            }
            Err(e) => {
                let msg = e.to_string();
                let delay = backoff.next_delay();
                if msg != last {
                    tracing::warn!("{what}: {msg}; retrying (next in {delay:?})");
                    last = msg;
                } else {
                    tracing::debug!("{what}: {msg}; retrying in {delay:?}");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let seen: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(seen, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn until_ok_keeps_trying() {
        let n = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let v = until_ok("test", || async {
            if n.fetch_add(1, Ordering::SeqCst) < 3 {
                Err("not yet")
            } else {
                Ok(42)
            }
        })
        .await;
        assert_eq!(v, 42);
        assert_eq!(n.load(Ordering::SeqCst), 4);
        // 0.5 + 1 + 2 seconds of backoff, in paused time.
        assert_eq!(start.elapsed(), Duration::from_millis(3500));
    }
}
