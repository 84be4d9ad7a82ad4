//! `GET /v1/leases/watch?from_revision=N`: an NDJSON stream of lease
//! changes for nodes, served from the cache's history. One store watch
//! feeds every stream; each line is serialized once and shared.
//! `GET /v1/names/watch` serves the name records' changes the same way.

use crate::cache::{line, Cache, History, WatchLine};
use crate::error::ControllerError;
use crate::Shared;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use weft_lease::api::{NameEvent, WatchEvent, WatchKind};
use weft_lease::{Lease, StoreError, SubnetKey};

#[derive(Debug, Deserialize)]
pub(crate) struct WatchParams {
    /// First revision wanted (list revision + 1); absent: from now.
    from_revision: Option<i64>,
}

/// Decrements the client gauge when the stream goes away (and gives back
/// its place under `--max-watchers`).
struct ClientGuard(
    Arc<Shared>,
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.metrics.watch_clients.dec();
    }
}

/// What a stream follows.
#[derive(Debug, Clone, Copy)]
enum Feed {
    Leases,
    Names,
}

impl Feed {
    fn history(self, cache: &Cache) -> &History {
        match self {
            Feed::Leases => &cache.history,
            Feed::Names => &cache.names.history,
        }
    }

    fn heartbeat(self, revision: i64) -> Bytes {
        match self {
            Feed::Leases => line(&WatchEvent::heartbeat(revision)),
            Feed::Names => line(&NameEvent::heartbeat(revision)),
        }
    }

    fn error(self, revision: i64, message: &str) -> Bytes {
        match self {
            Feed::Leases => line(&WatchEvent::error(revision, message.into())),
            Feed::Names => line(&NameEvent::error(revision, message.into())),
        }
    }
}

/// One node's stream: lines waiting to be sent and how far it has got.
struct Stream {
    feed: Feed,
    guard: ClientGuard,
    pending: Vec<Bytes>,
    /// Revision of the last line queued; `None` once the stream must end.
    cursor: Option<i64>,
    applied: tokio::sync::watch::Receiver<i64>,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Stream {
    /// The next bytes to send, or `None` when the stream ends.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        let shared = self.guard.0.clone();
        loop {
            if !self.pending.is_empty() {
                // Everything queued in one chunk: fewer writes under load.
                let chunk: Vec<u8> = self.pending.drain(..).flat_map(|b| b.to_vec()).collect();
                return Some(Bytes::from(chunk));
            }
            let cursor = self.cursor?;
            if *self.closing.borrow_and_update() {
                return None;
            }
            tokio::select! {
                _ = self.closing.changed() => return None,
                changed = self.applied.changed() => {
                    changed.ok()?;
                    let cache = shared.read();
                    match self.feed.history(&cache).since(cursor) {
                        Some((lines, last)) => {
                            self.pending.extend(lines);
                            self.cursor = Some(last);
                        }
                        None => {
                            // Further behind than the history reaches: the
                            // node must re-list.
                            self.pending.push(self.feed.error(
                                cache.revision,
                                "watch fell behind the controller's history; list again",
                            ));
                            self.cursor = None;
                        }
                    }
                }
                _ = tokio::time::sleep(shared.opts.heartbeat) => {
                    let revision = shared.read().revision;
                    self.pending.push(self.feed.heartbeat(revision));
                }
            }
        }
    }
}

pub(crate) async fn handler(
    State(s): State<Arc<Shared>>,
    params: Result<Query<WatchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ControllerError> {
    let Query(params) = params.map_err(|e| ControllerError::bad("invalid_query", e.body_text()))?;
    let place = s.limits.watcher()?;
    let (initial, cursor) = catch_up(&s, params.from_revision).await?;
    Ok(stream(s, Feed::Leases, place, initial, cursor))
}

/// `GET /v1/names/watch?from_revision=N`: the name records' changes. A
/// revision older than the controller's history is `410 Gone` (names are
/// listed again: there are few of them).
pub(crate) async fn names_handler(
    State(s): State<Arc<Shared>>,
    params: Result<Query<WatchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ControllerError> {
    let Query(params) = params.map_err(|e| ControllerError::bad("invalid_query", e.body_text()))?;
    let place = s.limits.watcher()?;
    let (initial, cursor) = {
        let cache = s.read();
        if !cache.synced {
            return Err(ControllerError::NotReady(
                "names not loaded from the store yet".into(),
            ));
        }
        match params.from_revision {
            None => (Vec::new(), cache.revision),
            Some(n) if n < 1 => {
                return Err(ControllerError::bad(
                    "invalid_query",
                    "from_revision must be at least 1",
                ))
            }
            Some(n) => cache.names.history.since(n - 1).ok_or_else(|| {
                ControllerError::Gone(format!(
                    "revision {n} is older than the controller's history; list the names again (GET /v1/names) and watch from the list's revision + 1"
                ))
            })?,
        }
    };
    Ok(stream(s, Feed::Names, place, initial, cursor))
}

/// The streaming response of one watcher.
fn stream(
    s: Arc<Shared>,
    feed: Feed,
    place: tokio::sync::OwnedSemaphorePermit,
    initial: Vec<Bytes>,
    cursor: i64,
) -> Response {
    let cursor = Some(cursor);
    s.metrics.watch_clients.inc();
    let guard = ClientGuard(s.clone(), place);
    let mut applied = s.applied.subscribe();
    // Changes applied since `catch_up` read the history must not be taken
    // as seen: look at the history once more before waiting.
    applied.mark_changed();
    let state = Stream {
        feed,
        guard,
        pending: initial,
        cursor,
        applied,
        closing: s.closing.subscribe(),
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), st))
    });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// The lines a new stream starts with, and the revision they bring it to.
async fn catch_up(s: &Shared, from: Option<i64>) -> Result<(Vec<Bytes>, i64), ControllerError> {
    let after = {
        let cache = s.read();
        if !cache.synced {
            return Err(ControllerError::NotReady(
                "leases not loaded from the store yet".into(),
            ));
        }
        match from {
            None => return Ok((Vec::new(), cache.revision)),
            Some(n) if n < 1 => {
                return Err(ControllerError::bad(
                    "invalid_query",
                    "from_revision must be at least 1",
                ))
            }
            Some(n) => {
                if let Some(found) = cache.history.since(n - 1) {
                    return Ok(found);
                }
                n - 1
            }
        }
    };
    // Older than the controller's history (e.g. the controller restarted):
    // read the leases as they were at that revision and send the difference.
    let then = s
        .limits
        .past(after, || async {
            match s.store.snapshot_at(after).await {
                Ok(old) => Ok(Arc::new(
                    old.leases
                        .into_iter()
                        .map(|l| (l.key, l))
                        .collect::<BTreeMap<SubnetKey, Lease>>(),
                )),
                Err(StoreError::Compacted { .. }) => Err(ControllerError::Gone(format!(
                    "revision {} is compacted; list the leases again (GET /v1/leases) and watch from the list's revision + 1",
                    after + 1
                ))),
                Err(e) => Err(ControllerError::Store(e)),
            }
        })
        .await?;
    let cache = s.read();
    let mut lines = Vec::new();
    let rev = cache.revision;
    for (key, l) in then.iter() {
        if !cache.leases.contains_key(key) {
            lines.push(line(&WatchEvent {
                kind: WatchKind::Delete,
                revision: rev,
                lease: Some(cache.view(l, None)),
                message: None,
            }));
        }
    }
    for l in cache.leases.values() {
        if then.get(&l.key) != Some(l) {
            lines.push(line(&WatchEvent {
                kind: WatchKind::Put,
                revision: rev,
                lease: Some(cache.view(l, None)),
                message: None,
            }));
        }
    }
    Ok((lines, rev))
}
