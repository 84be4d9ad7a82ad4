//! Container names (service discovery): the records under `names/` as the
//! cache holds them, with their own watch history for `GET
//! /v1/names/watch`, and the operations on them.
//!
//! A node registers the whole set of its containers' names at once (`PUT
//! /v1/leases/{node}/names`); the controller makes the store hold exactly
//! that set for the node, each record attached to the node's etcd lease,
//! and only for addresses inside the node's own subnets: a node cannot
//! answer for another node's containers. A node may add its containers to
//! a name other nodes' containers have (that is how a service spans
//! nodes), but not to a name an operator made (`POST /v1/names`).

use crate::cache::{History, WatchLine};
use crate::error::ControllerError;
use crate::Shared;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use weft_config::DnsName;
use weft_lease::api::{
    AddName, NameEvent, NameList, NameView, NodeNameEntry, NodeNames, NodeNamesResult, RefusedName,
    RemovedName, WatchKind, MAX_NODE_NAMES,
};
use weft_lease::names::{check_container_id, NameRecord, StoredName};
use weft_lease::{LeaseId, NodeName, StoreError};

/// The name records in the store, and the watch lines of their changes.
#[derive(Debug)]
pub(crate) struct Names {
    pub records: BTreeMap<(DnsName, IpAddr), StoredName>,
    pub history: History,
}

fn view(n: &StoredName) -> NameView {
    NameView {
        record: n.record.clone(),
        revision: n.mod_revision,
    }
}

impl WatchLine for NameEvent {
    fn heartbeat(revision: i64) -> Self {
        NameEvent {
            kind: WatchKind::Heartbeat,
            revision,
            name: None,
            message: None,
        }
    }

    fn error(revision: i64, message: String) -> Self {
        NameEvent {
            kind: WatchKind::Error,
            revision,
            name: None,
            message: Some(message),
        }
    }
}

impl Names {
    pub(crate) fn new(history: History) -> Self {
        Names {
            records: BTreeMap::new(),
            history,
        }
    }

    fn record(&mut self, kind: WatchKind, revision: i64, n: &StoredName) {
        let event = NameEvent {
            kind,
            revision,
            name: Some(view(n)),
            message: None,
        };
        self.history.push(revision, crate::cache::line(&event));
    }

    /// Replaces the records with those of a snapshot at `revision`; after
    /// the first load the differences become watch lines.
    pub(crate) fn reset(&mut self, names: Vec<StoredName>, revision: i64, first: bool) {
        let old = std::mem::take(&mut self.records);
        for n in names {
            self.records
                .insert((n.record.name.clone(), n.record.address), n);
        }
        if first {
            self.history.restart_at(revision);
            return;
        }
        for (k, n) in &old {
            if !self.records.contains_key(k) {
                self.record(WatchKind::Delete, revision, n);
            }
        }
        let changed: Vec<StoredName> = self
            .records
            .iter()
            .filter(|(k, n)| old.get(*k) != Some(*n))
            .map(|(_, n)| n.clone())
            .collect();
        for n in &changed {
            self.record(WatchKind::Put, revision, n);
        }
    }

    pub(crate) fn put(&mut self, n: StoredName) {
        self.record(WatchKind::Put, n.mod_revision, &n);
        self.records
            .insert((n.record.name.clone(), n.record.address), n);
    }

    pub(crate) fn delete(&mut self, name: DnsName, address: IpAddr, revision: i64) {
        if let Some(old) = self.records.remove(&(name, address)) {
            self.record(WatchKind::Delete, revision, &old);
        }
    }

    /// The records of `node`'s containers.
    pub(crate) fn of_node(&self, node: &NodeName) -> Vec<StoredName> {
        self.records
            .values()
            .filter(|n| n.record.node.as_ref() == Some(node))
            .cloned()
            .collect()
    }
}

/// Checks what a node sends before anything is written.
fn check_request(node: &NodeName, req: &NodeNames) -> Result<(), ControllerError> {
    if req.names.len() > MAX_NODE_NAMES {
        return Err(ControllerError::bad(
            "too_many_names",
            format!(
                "node {node} sent {} names; a node registers at most {MAX_NODE_NAMES}",
                req.names.len()
            ),
        ));
    }
    for e in &req.names {
        if let Some(id) = &e.container_id {
            check_container_id(id).map_err(|why| {
                ControllerError::bad("invalid_container_id", format!("{}: {why}", e.name))
            })?;
        }
    }
    Ok(())
}

impl Shared {
    /// `GET /v1/names`.
    pub(crate) fn list_names(&self) -> Result<NameList, ControllerError> {
        let cache = self.read();
        if !cache.synced {
            return Err(ControllerError::NotReady(
                "names not loaded from the store yet".into(),
            ));
        }
        Ok(NameList {
            revision: cache.revision,
            names: cache.names.records.values().map(view).collect(),
        })
    }

    /// Makes the store hold exactly `req`'s names for `node`.
    pub(crate) async fn sync_node_names(
        &self,
        node: &NodeName,
        req: &NodeNames,
    ) -> Result<NodeNamesResult, ControllerError> {
        check_request(node, req)?;
        let _guard = self.lock_node(node).await;
        let (leases, current, operators) = {
            let cache = self.read();
            if !cache.synced {
                return Err(ControllerError::NotReady(
                    "names not loaded from the store yet".into(),
                ));
            }
            let wanted: BTreeSet<&DnsName> = req.names.iter().map(|e| &e.name).collect();
            let operators: BTreeSet<DnsName> = cache
                .names
                .records
                .values()
                .filter(|n| n.record.node.is_none() && wanted.contains(&n.record.name))
                .map(|n| n.record.name.clone())
                .collect();
            (
                cache.leases_of(node.as_str()),
                cache.names.of_node(node),
                operators,
            )
        };
        if leases.is_empty() {
            return Err(ControllerError::not_found(
                "no_lease",
                format!(
                    "node {node} holds no lease; its names are registered once it has one (PUT /v1/leases/{node})"
                ),
            ));
        }
        // Records are attached to the etcd lease the node's renewals keep
        // alive (as `renew` picks it: one that fits the network, the oldest),
        // so they go when it runs out; a node holding only a reservation
        // keeps its names until it withdraws them or is released.
        let config = self.read().config.valid().cloned();
        let fits = |l: &weft_lease::Lease| {
            config
                .as_ref()
                .is_some_and(|c| weft_lease::alloc::key_fits(c, &l.key))
        };
        let etcd_lease: Option<LeaseId> = leases
            .iter()
            .filter(|l| l.etcd_lease.is_some())
            .min_by_key(|l| (!fits(l), l.create_revision))
            .and_then(|l| l.etcd_lease);
        let inside = |a: IpAddr| {
            leases.iter().any(|l| match a {
                IpAddr::V4(v4) => l.key.ipv4().is_some_and(|n| n.contains(&v4)),
                IpAddr::V6(v6) => l.key.ipv6().is_some_and(|n| n.contains(&v6)),
            })
        };
        let mut result = NodeNamesResult::default();
        let mut keep: BTreeMap<(DnsName, IpAddr), &NodeNameEntry> = BTreeMap::new();
        for e in &req.names {
            let refuse = |reason: String| RefusedName {
                entry: e.clone(),
                reason,
            };
            if !inside(e.address) {
                result.refused.push(refuse(format!(
                    "{} is outside the subnets of node {node}",
                    e.address
                )));
                continue;
            }
            // An operator's name stays the operator's. (Another node's
            // record for an address inside this node's subnet is left from
            // before the subnet changed hands: this node's container has
            // the address now.)
            if operators.contains(&e.name) {
                result.refused.push(refuse(format!(
                    "{} is an operator's name (weftctl names add); containers cannot join it",
                    e.name
                )));
                continue;
            }
            keep.insert((e.name.clone(), e.address), e);
        }
        let mut last = 0;
        let by_key: BTreeMap<(DnsName, IpAddr), &StoredName> = current
            .iter()
            .map(|n| ((n.record.name.clone(), n.record.address), n))
            .collect();
        for (k, n) in &by_key {
            if !keep.contains_key(k) {
                let rev = self
                    .store
                    .delete_name(&n.record.name, n.record.address)
                    .await
                    .map_err(|e| self.store_err("withdrawing a name", e))?;
                last = last.max(rev);
                result.removed += 1;
            }
        }
        for (k, e) in &keep {
            let record = NameRecord {
                name: e.name.clone(),
                address: e.address,
                node: Some(node.clone()),
                container_id: e.container_id.clone(),
            };
            if by_key
                .get(k)
                .is_some_and(|n| n.record == record && n.etcd_lease == etcd_lease)
            {
                result.unchanged += 1;
                continue;
            }
            match self.store.put_name(&record, etcd_lease).await {
                Ok(rev) => last = last.max(rev),
                Err(StoreError::NotFound(_)) => {
                    return Err(ControllerError::conflict(
                        "lease_expired",
                        format!(
                            "the lease of node {node} ran out while its names were written; acquire it again"
                        ),
                    ))
                }
                Err(e) => return Err(self.store_err("registering a name", e)),
            }
            result.added += 1;
        }
        if result.added + result.removed > 0 {
            tracing::info!(
                %node,
                added = result.added,
                removed = result.removed,
                refused = result.refused.len(),
                "names registered"
            );
        }
        for r in &result.refused {
            tracing::warn!(%node, name = %r.entry.name, address = %r.entry.address, reason = %r.reason, "name refused");
        }
        self.wait_applied(last).await;
        result.revision = last.max(self.read().revision);
        Ok(result)
    }

    /// `POST /v1/names` (admins): a record without a node and without
    /// expiry.
    pub(crate) async fn add_name(&self, req: &AddName) -> Result<NameView, ControllerError> {
        let existing = {
            let cache = self.read();
            if !cache.synced {
                return Err(ControllerError::NotReady(
                    "names not loaded from the store yet".into(),
                ));
            }
            cache
                .names
                .records
                .get(&(req.name.clone(), req.address))
                .and_then(|n| n.record.node.clone())
        };
        if let Some(node) = existing {
            return Err(ControllerError::conflict(
                "name_exists",
                format!(
                    "{} {} is the name of a container on node {node}; it goes when the container does",
                    req.name, req.address
                ),
            ));
        }
        let record = NameRecord {
            name: req.name.clone(),
            address: req.address,
            node: None,
            container_id: None,
        };
        let rev = self
            .store
            .put_name(&record, None)
            .await
            .map_err(|e| self.store_err("adding a name", e))?;
        tracing::info!(name = %req.name, address = %req.address, "name added by an operator");
        self.wait_applied(rev).await;
        Ok(NameView {
            record,
            revision: rev,
        })
    }

    /// `DELETE /v1/names/{name}/{address}` (admins): removes any record.
    pub(crate) async fn remove_name(
        &self,
        name: &DnsName,
        address: IpAddr,
    ) -> Result<RemovedName, ControllerError> {
        let existed = self
            .read()
            .names
            .records
            .contains_key(&(name.clone(), address));
        let rev = self
            .store
            .delete_name(name, address)
            .await
            .map_err(|e| self.store_err("removing a name", e))?;
        if existed {
            tracing::info!(%name, %address, "name removed by an operator");
        }
        self.wait_applied(rev).await;
        Ok(RemovedName {
            removed: existed,
            revision: rev,
        })
    }
}
