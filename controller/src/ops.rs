//! Lease operations: acquire, renew, release, reserve, list, and the
//! network config. HTTP handlers call these; they hold no HTTP types.

use crate::cache::ConfigState;
use crate::error::ControllerError;
use crate::metrics::Levels;
use crate::{validate, Shared};
use futures::{stream, StreamExt};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_config::NetworkConfig;
use weft_lease::alloc::{self, key_fits, InUse, Occupancy};
use weft_lease::api::{
    AcquireRequest, LeaseList, LeaseResponse, LeaseView, NetworkView, Readiness, ReleaseResponse,
    UnreadableView,
};
use weft_lease::store::{Claim, NodeGuard};
use weft_lease::{Lease, LeaseAttrs, LeaseId, NodeName, StoreError, SubnetKey};

/// Claim attempts before giving up when other writers keep winning.
const MAX_CLAIM_ATTEMPTS: usize = 16;

/// Acquires started over (the config changed, another replica claimed for
/// the node) before answering `409 contention`.
const MAX_RACES: usize = 4;

/// What comes after one claim.
enum Step {
    Done(Lease),
    /// The store moved on: start the acquire over.
    Again,
    /// Claim the same subnet again (the guard or the etcd lease changed).
    SameKey,
    /// The subnet is taken: pick another.
    NextKey,
}

/// What a new lease is claimed under.
struct Claiming<'a> {
    config: &'a Arc<NetworkConfig>,
    /// The revision of the config key `config` was read from.
    config_revision: i64,
    attrs: &'a LeaseAttrs,
    node: &'a NodeName,
    /// The node's leases the acquire looked at and is replacing.
    replacing: &'a [Lease],
    /// Subnets to try first (its previous and its own held ones).
    preferred: &'a [SubnetKey],
    /// Its own expired leases' subnets: free again for it.
    exclude: &'a Occupancy,
    /// Subnets held after other nodes' leases ran out: not given out.
    held: &'a [SubnetKey],
}

/// A subnet this controller is claiming; forgotten on drop.
struct InFlight<'a> {
    shared: &'a Shared,
    config: Arc<NetworkConfig>,
    key: SubnetKey,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        crate::lock(&self.shared.in_flight).remove(&self.config, &self.key);
    }
}

impl Shared {
    /// The valid network config, or why there is none.
    pub(crate) fn config(&self) -> Result<Arc<NetworkConfig>, ControllerError> {
        self.config_at().map(|(c, _)| c)
    }

    /// The valid network config and the revision of its key.
    fn config_at(&self) -> Result<(Arc<NetworkConfig>, i64), ControllerError> {
        let cache = self.read();
        if !cache.synced {
            return Err(ControllerError::NotReady(self.not_synced_reason()));
        }
        match &cache.config {
            ConfigState::Valid {
                config, revision, ..
            } => Ok((config.clone(), *revision)),
            ConfigState::Missing => Err(ControllerError::NotReady(format!(
                "no network config in the store ({}): set one with `weftctl network set --file F`",
                self.store.describe()
            ))),
            ConfigState::Invalid { error, .. } => Err(ControllerError::NotReady(format!(
                "the network config in the store is invalid: {error}"
            ))),
        }
    }

    fn not_synced_reason(&self) -> String {
        match crate::lock(&self.store_error).as_ref() {
            Some(e) => format!("leases not loaded yet: {e}"),
            None => "leases not loaded from the store yet".into(),
        }
    }

    pub(crate) async fn lock_node(&self, node: &NodeName) -> tokio::sync::MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        node.hash(&mut h);
        let stripe = (h.finish() as usize) % self.node_locks.len();
        self.node_locks[stripe].lock().await
    }

    pub(crate) fn store_err(&self, what: &str, e: StoreError) -> ControllerError {
        if matches!(e, StoreError::Unavailable(_)) {
            self.store_failed(what, &e);
        }
        ControllerError::Store(e)
    }

    /// Acquires or refreshes `node`'s lease.
    pub(crate) async fn acquire(
        &self,
        node: &NodeName,
        req: &AcquireRequest,
    ) -> Result<LeaseResponse, ControllerError> {
        let start = Instant::now();
        let result = self.acquire_inner(node, req).await;
        self.metrics
            .acquire_seconds
            .observe(start.elapsed().as_secs_f64());
        self.metrics.acquired(match &result {
            Ok(_) => "ok",
            Err(ControllerError::Exhausted(_)) => "exhausted",
            Err(ControllerError::BadRequest { .. }) => "bad_request",
            Err(ControllerError::Conflict { .. }) => "conflict",
            Err(_) => "error",
        });
        match &result {
            Ok(r) => tracing::debug!(%node, subnet = %r.lease.key, "lease acquired"),
            Err(e) => tracing::info!(%node, error = %e, "lease acquire refused"),
        }
        result
    }

    async fn acquire_inner(
        &self,
        node: &NodeName,
        req: &AcquireRequest,
    ) -> Result<LeaseResponse, ControllerError> {
        for _ in 0..MAX_RACES {
            if let Some(answer) = self.acquire_once(node, req).await? {
                return Ok(answer);
            }
        }
        Err(ControllerError::conflict(
            "contention",
            format!("the network config or node {node}'s lease changed {MAX_RACES} times while acquiring; retry"),
        ))
    }

    /// One acquire; `None` when the store moved on under it (the config
    /// changed, or another replica claimed a subnet for this node) and the
    /// cache has caught up, so that a new attempt sees what happened.
    async fn acquire_once(
        &self,
        node: &NodeName,
        req: &AcquireRequest,
    ) -> Result<Option<LeaseResponse>, ControllerError> {
        let (config, config_revision) = self.config_at()?;
        let want = validate::acquire(req, &config)?;
        let attrs = LeaseAttrs::new(node.as_str(), want.ipv4, want.ipv6, &want.backend);
        let _guard = self.lock_node(node).await;
        let mine = self.read().leases_of(node.as_str());

        // Keep a live lease the node already has: a reservation first, then
        // the subnet it asks for, then the oldest.
        let mut candidates: Vec<&Lease> =
            mine.iter().filter(|l| key_fits(&config, &l.key)).collect();
        candidates.sort_by_key(|l| {
            (
                !l.is_reservation(),
                Some(l.key) != want.previous,
                l.create_revision,
            )
        });
        let mut kept = None;
        let mut expired = Vec::new();
        for l in candidates {
            match l.etcd_lease {
                None => {
                    kept = Some((self.refresh(l, &attrs, None).await?, None));
                    break;
                }
                Some(id) => match self.store.keep_alive(id).await {
                    Ok(ttl) => {
                        kept = Some((self.refresh(l, &attrs, Some(id)).await?, Some(ttl)));
                        break;
                    }
                    Err(StoreError::NotFound(_)) => expired.push(l.key),
                    Err(e) => return Err(self.store_err("renewing a lease", e)),
                },
            }
        }
        let mut flights = Vec::new();
        let (lease, ttl) = match kept {
            Some(k) => k,
            None => {
                // Subnets held after their lease ran out: another node's are
                // not given out; this node's own come first.
                let (held, own) = self.write().quarantined(node.as_str());
                let mut preferred: Vec<SubnetKey> = want.previous.into_iter().collect();
                preferred.extend(own.iter().copied());
                preferred.extend(expired.iter().copied());
                let exclude = Occupancy::from_keys(&config, &expired);
                // Held even when a node names one as its previous subnet.
                let claim = Claiming {
                    config: &config,
                    config_revision,
                    attrs: &attrs,
                    node,
                    replacing: &mine,
                    preferred: &preferred,
                    exclude: &exclude,
                    held: &held,
                };
                let Some(lease) = self.allocate(&claim, &mut flights).await? else {
                    return Ok(None);
                };
                tracing::info!(%node, subnet = %lease.key, "subnet allocated");
                (lease, Some(config.lease_ttl))
            }
        };
        // One node, one lease: retire duplicates and leases outside the network.
        for other in mine
            .iter()
            .filter(|l| l.key != lease.key && !expired.contains(&l.key))
        {
            self.retire(other).await;
        }
        self.wait_applied(lease.mod_revision).await;
        drop(flights);
        let view = self.read().view(&lease, ttl);
        Ok(Some(LeaseResponse {
            lease: view,
            network: config.to_json(),
        }))
    }

    /// Writes new attributes to a lease the node keeps, if they changed.
    async fn refresh(
        &self,
        lease: &Lease,
        attrs: &LeaseAttrs,
        id: Option<LeaseId>,
    ) -> Result<Lease, ControllerError> {
        if &lease.attrs == attrs {
            return Ok(lease.clone());
        }
        tracing::info!(node = ?attrs.node_name, subnet = %lease.key, "lease attributes changed; updating");
        self.store
            .update(lease, attrs, id)
            .await
            .map_err(|e| self.store_err("updating a lease", e))
    }

    /// Claims a free subnet for a new lease. `None` when the store moved on
    /// (see [`Shared::acquire_once`]); the etcd lease is revoked then.
    async fn allocate<'a>(
        &'a self,
        claim: &Claiming<'_>,
        flights: &mut Vec<InFlight<'a>>,
    ) -> Result<Option<Lease>, ControllerError> {
        let config = claim.config;
        let mut id = self
            .store
            .grant(config.lease_ttl)
            .await
            .map_err(|e| self.store_err("granting an etcd lease", e))?;
        // A guard is written with its lease, in one transaction: the node's
        // newest leased subnet tells its revision (a wrong guess costs one
        // more round trip).
        let mut guard = claim
            .replacing
            .iter()
            .filter(|l| l.etcd_lease.is_some())
            .map(|l| l.create_revision)
            .max()
            .map_or(NodeGuard::Absent, NodeGuard::At);
        let mut again: Option<SubnetKey> = None;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let key = match again.take() {
                // Only the guard or the etcd lease was wrong: the same
                // subnet, still held in flight.
                Some(key) => key,
                None => self.pick(claim, flights, id).await?,
            };
            match self.claim_one(claim, &key, &mut id, &mut guard).await? {
                Step::Done(lease) => return Ok(Some(lease)),
                Step::Again => return Ok(None),
                Step::SameKey => again = Some(key),
                Step::NextKey => {}
            }
        }
        let _ = self.store.revoke(id).await;
        Err(ControllerError::conflict(
            "contention",
            format!("other writers took {MAX_CLAIM_ATTEMPTS} subnets in a row; retry"),
        ))
    }

    /// Picks a free subnet and holds it in flight; revokes `id` when none
    /// is free.
    async fn pick<'a>(
        &'a self,
        claim: &Claiming<'_>,
        flights: &mut Vec<InFlight<'a>>,
        id: LeaseId,
    ) -> Result<SubnetKey, ControllerError> {
        let (config, held) = (claim.config, claim.held);
        let picked = {
            let cache = self.read();
            let mut in_flight = crate::lock(&self.in_flight);
            let with_held;
            let extra = if held.is_empty() {
                &*in_flight
            } else {
                let mut e = in_flight.clone();
                for k in held {
                    e.insert(config, k);
                }
                with_held = e;
                &with_held
            };
            let in_use = InUse {
                base: cache.occupancy(),
                extra,
                exclude: claim.exclude,
            };
            let mut rng = crate::lock(&self.rng);
            let picked = alloc::pick(config, &in_use, claim.preferred, &mut *rng);
            if let Ok(key) = &picked {
                in_flight.insert(config, key);
            }
            picked
        };
        let key = match picked {
            Ok(k) => k,
            Err(exhausted) => {
                let _ = self.store.revoke(id).await;
                return Err(exhausted.into());
            }
        };
        // Held until the caller has seen the lease in the cache; a key
        // lost to another writer stays held, so it is not picked again.
        flights.push(InFlight {
            shared: self,
            config: config.clone(),
            key,
        });
        Ok(key)
    }

    /// One claim of `key`, and what to do next.
    async fn claim_one(
        &self,
        claim: &Claiming<'_>,
        key: &SubnetKey,
        id: &mut LeaseId,
        guard: &mut NodeGuard,
    ) -> Result<Step, ControllerError> {
        let node = claim.node.as_str();
        let request = Claim {
            key,
            attrs: claim.attrs,
            node,
            lease: *id,
            config_revision: claim.config_revision,
            guard: *guard,
        };
        match self.store.claim(&request).await {
            Ok(lease) => Ok(Step::Done(lease)),
            Err(StoreError::AlreadyExists(_)) => {
                tracing::debug!(subnet = %key, "subnet taken by another writer; picking again");
                Ok(Step::NextKey)
            }
            Err(StoreError::NotFound(_)) => {
                // The etcd lease vanished (etcd restarted and dropped it).
                *id = self
                    .store
                    .grant(claim.config.lease_ttl)
                    .await
                    .map_err(|e| self.store_err("granting an etcd lease", e))?;
                Ok(Step::SameKey)
            }
            Err(StoreError::ConfigChanged { revision }) => {
                let _ = self.store.revoke(*id).await;
                if revision == 0 {
                    return Err(ControllerError::NotReady(
                        "the network config was deleted from the store while allocating".into(),
                    ));
                }
                tracing::info!(%node, revision, "the network config changed while allocating; starting over with the new one");
                self.wait_applied(revision).await;
                Ok(Step::Again)
            }
            Err(StoreError::NodeClaimed { subnet, revision }) => {
                if revision == 0 {
                    // What it recorded is gone with its etcd lease.
                    *guard = NodeGuard::Absent;
                    return Ok(Step::SameKey);
                }
                let caught_up = self.wait_applied(revision).await;
                let named = subnet.as_deref().and_then(|s| s.parse::<SubnetKey>().ok());
                let replacing = named.is_some_and(|k| claim.replacing.iter().any(|l| l.key == k));
                if !replacing && !caught_up {
                    // The cache has not seen the claim yet: it cannot tell
                    // whether that subnet is still the node's. Start over.
                    tracing::info!(%node, ?subnet, revision, "another writer claimed for this node and the cache lags; starting over");
                    let _ = self.store.revoke(*id).await;
                    return Ok(Step::Again);
                }
                // Written with the guard, so the cache (at or past the
                // guard's revision) shows it unless it is gone since.
                let live = named.filter(|k| {
                    !replacing && self.read().leases_of(node).iter().any(|l| l.key == *k)
                });
                if let Some(k) = live {
                    // Another replica gave this node a subnet meanwhile:
                    // start over, and keep that one.
                    tracing::info!(%node, subnet = %k, "another writer claimed a subnet for this node; keeping that one");
                    let _ = self.store.revoke(*id).await;
                    return Ok(Step::Again);
                }
                // It names the lease being replaced, or one that is gone.
                tracing::debug!(%node, ?subnet, revision, "replacing the node's recorded subnet");
                *guard = NodeGuard::At(revision);
                Ok(Step::SameKey)
            }
            Err(e) => {
                let _ = self.store.revoke(*id).await;
                Err(self.store_err("claiming a subnet", e))
            }
        }
    }

    /// Deletes a lease the node no longer needs, and its etcd lease.
    async fn retire(&self, lease: &Lease) {
        self.write().releasing(lease.key);
        match self.store.delete(&lease.key, lease.mod_revision).await {
            Ok(_) | Err(StoreError::NotFound(_)) => {
                tracing::info!(node = ?lease.node_name(), subnet = %lease.key, "retired a superseded lease");
            }
            Err(e) => {
                tracing::warn!(subnet = %lease.key, error = %e, "could not retire a superseded lease; it expires with its TTL")
            }
        }
        if let Some(id) = lease.etcd_lease {
            let _ = self.store.revoke(id).await;
        }
    }

    /// Renews `node`'s lease.
    pub(crate) async fn renew(&self, node: &NodeName) -> Result<LeaseResponse, ControllerError> {
        let _guard = self.lock_node(node).await;
        let (mine, config) = {
            let cache = self.read();
            (
                cache.leases_of(node.as_str()),
                cache.config.valid().cloned(),
            )
        };
        let fits = |l: &Lease| config.as_ref().is_some_and(|c| key_fits(c, &l.key));
        let mut candidates: Vec<&Lease> = mine.iter().collect();
        candidates.sort_by_key(|l| (!l.is_reservation(), !fits(l), l.create_revision));
        for l in candidates {
            let ttl = match l.etcd_lease {
                None => None,
                Some(id) => match self.store.keep_alive(id).await {
                    Ok(ttl) => Some(ttl),
                    Err(StoreError::NotFound(_)) => continue,
                    Err(e) => return Err(self.store_err("renewing a lease", e)),
                },
            };
            let view = self.read().view(l, ttl);
            return Ok(LeaseResponse {
                lease: view,
                network: config.map_or(serde_json::Value::Null, |c| c.to_json()),
            });
        }
        Err(ControllerError::not_found(
            "no_lease",
            format!("node {node} holds no live lease; acquire one with PUT /v1/leases/{node}"),
        ))
    }

    /// Releases every lease and reservation of `node`.
    pub(crate) async fn release(
        &self,
        node: &NodeName,
    ) -> Result<ReleaseResponse, ControllerError> {
        let _guard = self.lock_node(node).await;
        let mine = self.read().leases_of(node.as_str());
        if mine.is_empty() {
            return Err(ControllerError::not_found(
                "no_lease",
                format!("node {node} holds no lease"),
            ));
        }
        let mut released = Vec::new();
        let mut last = 0;
        for l in &mine {
            self.write().releasing(l.key);
            match self.store.delete(&l.key, l.mod_revision).await {
                Ok(rev) => {
                    last = last.max(rev);
                    released.push(l.key);
                }
                Err(StoreError::NotFound(_)) => released.push(l.key),
                Err(StoreError::Conflict(_)) => {
                    return Err(ControllerError::conflict(
                        "conflict",
                        format!(
                            "lease {} of {node} changed while releasing it; retry",
                            l.key
                        ),
                    ))
                }
                Err(e) => return Err(self.store_err("releasing a lease", e)),
            }
            if let Some(id) = l.etcd_lease {
                if let Err(e) = self.store.revoke(id).await {
                    tracing::warn!(%node, lease = %id, error = %e, "could not revoke the etcd lease; it expires with its TTL");
                }
            }
        }
        // Names on an etcd lease went with its revocation; those of a node
        // that held only a reservation have none and go now.
        let names = self.read().names.of_node(node);
        for n in &names {
            match self
                .store
                .delete_name(&n.record.name, n.record.address)
                .await
            {
                Ok(rev) => last = last.max(rev),
                Err(e) => {
                    tracing::warn!(%node, name = %n.record.name, address = %n.record.address, error = %e, "could not withdraw a released node's name")
                }
            }
        }
        tracing::info!(%node, ?released, names = names.len(), "leases released");
        self.wait_applied(last).await;
        Ok(ReleaseResponse { released })
    }

    /// Reserves `subnet` for `node`: a key without an etcd lease.
    pub(crate) async fn reserve(
        &self,
        subnet: &str,
        node: &NodeName,
    ) -> Result<LeaseView, ControllerError> {
        let config = self.config()?;
        let key = SubnetKey::from_cidrs(subnet)
            .map_err(|e| ControllerError::bad("invalid_subnet", format!("subnet: {e}")))?;
        if !key_fits(&config, &key) {
            return Err(ControllerError::bad(
                "invalid_subnet",
                format!(
                    "subnet {} is not a subnet of this network: {}",
                    key.to_cidrs(),
                    describe_pools(&config)
                ),
            ));
        }
        let _guard = self.lock_node(node).await;
        let (holder, mine) = {
            let cache = self.read();
            let holder = cache
                .leases
                .values()
                .find(|l| {
                    l.key == key
                        || (key.ipv4().is_some() && l.key.ipv4() == key.ipv4())
                        || (key.ipv6().is_some() && l.key.ipv6() == key.ipv6())
                })
                .cloned();
            // A lease of another length (from before a SubnetLen change)
            // that overlaps the subnet, unless it is the node's own.
            let own = Occupancy::from_keys(
                &config,
                cache
                    .leases_of(node.as_str())
                    .iter()
                    .map(|l| &l.key)
                    .collect::<Vec<_>>(),
            );
            let none = Occupancy::default();
            let overlapped = holder.is_none()
                && (InUse {
                    base: cache.occupancy(),
                    extra: &none,
                    exclude: &own,
                })
                .subnet_taken(&key);
            if overlapped {
                return Err(ControllerError::conflict(
                    "subnet_taken",
                    format!(
                        "subnet {} overlaps a lease of another node (of another subnet length); \
                         it is free once that node has moved",
                        key.to_cidrs()
                    ),
                ));
            }
            let corrupt = cache.corrupt.values().any(|c| c.subnet == Some(key));
            if corrupt {
                return Err(ControllerError::conflict(
                    "subnet_taken",
                    format!(
                        "subnet {} is held by an unreadable entry in the store",
                        key.to_cidrs()
                    ),
                ));
            }
            (holder, cache.leases_of(node.as_str()))
        };
        let lease = match holder {
            Some(l) if l.key == key && l.node_name() == Some(node.as_str()) => {
                if l.is_reservation() {
                    l
                } else {
                    let converted = self
                        .store
                        .update(&l, &l.attrs, None)
                        .await
                        .map_err(|e| self.store_err("reserving a subnet", e))?;
                    if let Some(id) = l.etcd_lease {
                        let _ = self.store.revoke(id).await;
                    }
                    converted
                }
            }
            Some(l) => {
                return Err(ControllerError::conflict(
                    "subnet_taken",
                    format!(
                        "subnet {} is held by {}; release it first",
                        l.key.to_cidrs(),
                        l.node_name()
                            .map_or("a flannel node (no NodeName)".to_string(), |n| format!(
                                "node {n}"
                            ))
                    ),
                ))
            }
            None => {
                let mut attrs = mine.first().map(|l| l.attrs.clone()).unwrap_or(LeaseAttrs {
                    public_ip: std::net::Ipv4Addr::UNSPECIFIED,
                    public_ipv6: None,
                    backend_type: config.backend.backend_type().as_str().to_string(),
                    backend_data: None,
                    backend_v6_data: None,
                    node_name: None,
                });
                attrs.node_name = Some(node.to_string());
                self.store
                    .create(&key, &attrs, None)
                    .await
                    .map_err(|e| match e {
                        StoreError::AlreadyExists(_) => ControllerError::conflict(
                            "subnet_taken",
                            format!("subnet {} was just taken; try another", key.to_cidrs()),
                        ),
                        e => self.store_err("reserving a subnet", e),
                    })?
            }
        };
        tracing::info!(%node, subnet = %lease.key, "subnet reserved");
        self.wait_applied(lease.mod_revision).await;
        Ok(self.read().view(&lease, None))
    }

    /// All leases; with `with_ttl`, etcd is asked for each lease's time left.
    pub(crate) async fn list(&self, with_ttl: bool) -> Result<LeaseList, ControllerError> {
        let (revision, leases, unreadable) = {
            let cache = self.read();
            if !cache.synced {
                return Err(ControllerError::NotReady(self.not_synced_reason()));
            }
            let unreadable = cache
                .corrupt
                .values()
                .map(|c| UnreadableView {
                    key: c.key.clone(),
                    reason: c.reason.clone(),
                })
                .collect();
            (
                cache.revision,
                cache.leases.values().cloned().collect::<Vec<_>>(),
                unreadable,
            )
        };
        let ttls: Vec<Option<Duration>> = if with_ttl {
            let ids: Vec<Option<LeaseId>> = leases.iter().map(|l| l.etcd_lease).collect();
            let store = self.store.clone();
            stream::iter(ids.into_iter().map(move |id| {
                let store = store.clone();
                async move {
                    match id {
                        Some(id) => store.time_to_live(id).await,
                        None => Ok(None),
                    }
                }
            }))
            .buffered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| self.store_err("reading lease TTLs", e))?
        } else {
            vec![None; leases.len()]
        };
        let cache = self.read();
        Ok(LeaseList {
            revision,
            leases: leases
                .iter()
                .zip(ttls)
                .map(|(l, ttl)| cache.view(l, ttl))
                .collect(),
            unreadable,
        })
    }

    /// The stored network config.
    pub(crate) fn network(&self) -> Result<NetworkView, ControllerError> {
        let cache = self.read();
        if !cache.synced {
            return Err(ControllerError::NotReady(self.not_synced_reason()));
        }
        match &cache.config {
            ConfigState::Missing => Err(ControllerError::not_found(
                "no_config",
                format!("no network config in the store ({})", self.store.describe()),
            )),
            ConfigState::Invalid {
                raw,
                error,
                revision,
            } => Ok(NetworkView {
                valid: false,
                config: None,
                error: Some(error.clone()),
                raw: raw.clone(),
                revision: *revision,
            }),
            ConfigState::Valid {
                raw,
                config,
                revision,
            } => Ok(NetworkView {
                valid: true,
                config: Some(config.to_json()),
                error: None,
                raw: raw.clone(),
                revision: *revision,
            }),
        }
    }

    /// Validates and stores a network config.
    pub(crate) async fn set_network(&self, text: &str) -> Result<NetworkView, ControllerError> {
        let parsed = NetworkConfig::parse(text)
            .map_err(|e| ControllerError::bad("invalid_config", e.to_string()))?;
        let rev = self
            .store
            .put_config(text.trim())
            .await
            .map_err(|e| self.store_err("writing the network config", e))?;
        tracing::info!(revision = rev, backend = %parsed.backend.backend_type(), "network config written");
        // Let reads that follow see it; the answer is what was written, also
        // when the cache lags behind (a slow etcd watch is no failure).
        self.wait_applied(rev).await;
        Ok(NetworkView {
            valid: true,
            config: Some(parsed.to_json()),
            error: None,
            raw: text.trim().to_string(),
            revision: rev,
        })
    }

    /// Readiness, with the numbers `weftctl status` shows.
    /// `detail`: name example leases in warnings (callers that may read
    /// leases); otherwise only counts.
    pub(crate) fn readiness(&self, detail: bool) -> Readiness {
        let store_error = crate::lock(&self.store_error).clone();
        let damaged = self.damaged();
        let cache = self.read();
        let mut reasons = Vec::new();
        if damaged {
            reasons.push(
                "the lease cache is being reloaded from the store after a panic left it possibly half updated"
                    .into(),
            );
        }
        if let Some(e) = store_error {
            reasons.push(format!("store unreachable: {e}"));
        }
        if !cache.synced {
            reasons.push("leases not loaded from the store yet".into());
        } else {
            match &cache.config {
                ConfigState::Missing => reasons.push(format!(
                    "no network config in the store ({}): set one with `weftctl network set --file F`",
                    self.store.describe()
                )),
                ConfigState::Invalid { error, .. } => {
                    reasons.push(format!("the network config in the store is invalid: {error}"))
                }
                ConfigState::Valid { .. } => {}
            }
        }
        let outside = cache.outside_network();
        let mut warnings = Vec::new();
        if let Some(w) = &self.opts.insecure {
            warnings.push(w.clone());
        }
        if !outside.is_empty() && !detail {
            warnings.push(format!(
                "{} lease(s) outside the current network; their nodes get new subnets when they next acquire",
                outside.len()
            ));
        } else if !outside.is_empty() {
            let names: Vec<String> = outside
                .iter()
                .take(5)
                .map(|l| {
                    format!(
                        "{} ({})",
                        l.key.to_cidrs(),
                        l.node_name().unwrap_or("flannel")
                    )
                })
                .collect();
            warnings.push(format!(
                "{} lease(s) outside the current network, e.g. {}; their nodes get new subnets when they next acquire",
                outside.len(),
                names.join(", ")
            ));
        }
        if !cache.corrupt.is_empty() {
            warnings.push(format!(
                "{} unreadable entr(ies) under subnets/ are skipped (see `weftctl leases list -o json`)",
                cache.corrupt.len()
            ));
        }
        let total = cache.config.valid().map_or(0, |c| c.subnet_count());
        let reservations = cache.leases.values().filter(|l| l.is_reservation()).count() as u64;
        Readiness {
            ready: reasons.is_empty(),
            reasons,
            warnings,
            store: self.store.describe(),
            revision: cache.revision,
            subnets_total: u64::try_from(total).unwrap_or(u64::MAX),
            subnets_used: cache.occupancy().positions_used() as u64,
            leases: cache.leases.len() as u64 - reservations,
            reservations,
            leases_outside_network: outside.len() as u64,
            unreadable_entries: cache.corrupt.len() as u64,
            watch_clients: self.metrics.watch_clients.get().max(0) as u64,
        }
    }

    /// The metrics text.
    pub(crate) fn metrics_text(&self) -> String {
        let r = self.readiness(false);
        let levels = Levels {
            subnets_total: i64::try_from(r.subnets_total).unwrap_or(i64::MAX),
            subnets_used: r.subnets_used as i64,
            leases: r.leases as i64,
            reservations: r.reservations as i64,
            outside_network: r.leases_outside_network as i64,
            unreadable: r.unreadable_entries as i64,
            revision: r.revision,
            ready: r.ready,
            history_bytes: i64::try_from(self.read().history.bytes()).unwrap_or(i64::MAX),
        };
        self.metrics.render(levels, self.store.requests())
    }
}

/// "10.244.0.0/16 in /24 subnets" (and the IPv6 pool), for error messages.
fn describe_pools(config: &NetworkConfig) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &config.ipv4 {
        parts.push(format!("{} in /{} subnets", p.network(), p.subnet_len()));
    }
    if let Some(p) = &config.ipv6 {
        parts.push(format!("{} in /{} subnets", p.network(), p.subnet_len()));
    }
    parts.join(" and ")
}
