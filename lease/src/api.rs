//! Types of the controller's HTTP API (`/v1`), shared by the controller,
//! `weftctl`, `weft-node` and the benchmarks. Bodies are JSON.

use crate::attrs::{BackendData, JsonText, LeaseAttrs};
use crate::key::SubnetKey;
use crate::lease::Lease;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// Largest request body the controller reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// `PUT /v1/leases/{node}`: acquire the node's lease, or update it.
///
/// Addresses and subnets are text so that the controller can say exactly
/// what is wrong with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// Underlay IPv4 address (required unless the node has only IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// Underlay IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ipv6: Option<String>,
    /// `vxlan`, `host-gw` or `ipsec`; must match the network's backend.
    pub backend_type: String,
    /// Backend data as it goes into the lease (e.g. VNI and VtepMAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<Value>,
    /// The subnet(s) the node had before, from its subnet.env:
    /// `10.244.3.1/24` or `10.244.3.0/24,fd77::/64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_subnet: Option<String>,
}

impl AcquireRequest {
    /// A request with typed values.
    pub fn new(
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        backend: &BackendData,
        previous: Option<&SubnetKey>,
    ) -> Self {
        AcquireRequest {
            public_ip: public_ip.map(|a| a.to_string()),
            public_ipv6: public_ipv6.map(|a| a.to_string()),
            backend_type: backend.backend_type().as_str().to_string(),
            backend_data: backend.to_value(),
            previous_subnet: previous.map(|k| k.to_cidrs()),
        }
    }
}

/// A lease as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseView {
    /// flannel's key form, e.g. `10.244.3.0-24`.
    pub key: SubnetKey,
    #[serde(with = "weft_config::cidr::opt_v4")]
    pub subnet: Option<Ipv4Net>,
    #[serde(with = "weft_config::cidr::opt_v6")]
    pub ipv6_subnet: Option<Ipv6Net>,
    /// Owner; `null` for leases written by flannel.
    pub node_name: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend_type: String,
    pub backend_data: Option<JsonText>,
    /// A reservation never expires.
    pub reserved: bool,
    /// The etcd lease id in hex, as `etcdctl lease list` prints it.
    pub etcd_lease: Option<String>,
    /// Seconds left before expiry, when known.
    pub ttl_seconds: Option<u64>,
    /// Whether the subnet belongs to the current network config.
    pub fits_network: bool,
    /// Store revision of the lease's last change.
    pub revision: i64,
}

impl LeaseView {
    /// The API view of a stored lease.
    pub fn new(lease: &Lease, fits_network: bool, ttl: Option<Duration>) -> Self {
        LeaseView {
            key: lease.key,
            subnet: lease.key.ipv4(),
            ipv6_subnet: lease.key.ipv6(),
            node_name: lease.attrs.node_name.clone(),
            public_ip: lease.attrs.public_ipv4(),
            public_ipv6: lease.attrs.public_ipv6,
            backend_type: lease.attrs.backend_type.clone(),
            backend_data: lease.attrs.backend_data.clone(),
            reserved: lease.is_reservation(),
            etcd_lease: lease.etcd_lease.map(|l| l.to_string()),
            ttl_seconds: ttl.map(|d| d.as_secs()),
            fits_network,
            revision: lease.mod_revision,
        }
    }

    /// The lease attributes (flannel JSON) this view shows.
    pub fn attrs(&self) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: self.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: self.public_ipv6,
            backend_type: self.backend_type.clone(),
            backend_data: self.backend_data.clone(),
            backend_v6_data: None,
            node_name: self.node_name.clone(),
        }
    }
}

/// Answer to acquire and renew: the lease and the effective network config
/// (flannel field names, all defaults filled in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub lease: LeaseView,
    pub network: Value,
}

/// `DELETE /v1/leases/{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// Keys released.
    pub released: Vec<SubnetKey>,
}

/// `POST /v1/reservations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// `10.244.7.0/24` (or `10.244.7.0/24,fd77:0:0:7::/64` for dual stack).
    pub subnet: String,
    pub node_name: String,
}

/// An entry under `subnets/` that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableView {
    pub key: String,
    pub reason: String,
}

/// `GET /v1/leases`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseList {
    /// Watch from `revision + 1` to follow changes after this list.
    pub revision: i64,
    pub leases: Vec<LeaseView>,
    #[serde(default)]
    pub unreadable: Vec<UnreadableView>,
}

/// Kinds of lines in the watch stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchKind {
    /// A lease was created or changed.
    Put,
    /// A lease went away (released, expired, deleted).
    Delete,
    /// Nothing happened; the stream is alive at `revision`.
    Heartbeat,
    /// The controller ends the stream; re-list and watch again.
    Error,
}

/// One line of `GET /v1/leases/watch` (NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: WatchKind,
    pub revision: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `GET /v1/network`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkView {
    /// Whether the stored config validates.
    pub valid: bool,
    /// The effective config (defaults filled in), when valid.
    pub config: Option<Value>,
    /// Why it does not validate.
    pub error: Option<String>,
    /// The text as stored in etcd.
    pub raw: String,
    /// Store revision of the config's last change.
    pub revision: i64,
}

/// `GET /readyz` (200 when ready, 503 otherwise) with the numbers that
/// `weftctl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// Why not ready.
    pub reasons: Vec<String>,
    /// Problems that do not stop the controller (e.g. leases outside the
    /// network after a config change).
    pub warnings: Vec<String>,
    /// The store, e.g. `etcd http://127.0.0.1:2379 prefix /weft/network`.
    pub store: String,
    /// Store revision the controller has seen.
    pub revision: i64,
    /// Subnets in the network's pool.
    pub subnets_total: u64,
    /// Pool subnets leased or reserved.
    pub subnets_used: u64,
    pub leases: u64,
    pub reservations: u64,
    pub leases_outside_network: u64,
    pub unreadable_entries: u64,
    pub watch_clients: u64,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable code, e.g. `network_exhausted`.
    pub error: String,
    /// What happened and what to do, for people.
    pub message: String,
    /// Subnets in use, for `network_exhausted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// Subnets in the pool, for `network_exhausted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// Most names one node registers (its containers' names and addresses).
pub const MAX_NODE_NAMES: usize = 512;

/// One of a node's names in `PUT /v1/leases/{node}/names`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeNameEntry {
    pub name: weft_config::DnsName,
    pub address: std::net::IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// `PUT /v1/leases/{node}/names`: every name the node's containers have
/// now. The controller makes the store hold exactly these for the node,
/// attached to its lease (idempotent: the same set again changes nothing).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeNames {
    pub names: Vec<NodeNameEntry>,
}

/// An entry of [`NodeNames`] the controller did not keep, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedName {
    pub entry: NodeNameEntry,
    pub reason: String,
}

/// The answer to `PUT /v1/leases/{node}/names`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeNamesResult {
    /// Store revision once the changes are in.
    pub revision: i64,
    pub added: u64,
    pub removed: u64,
    pub unchanged: u64,
    /// Entries not kept (an address outside the node's subnets, a name
    /// and address an operator's record already holds).
    #[serde(default)]
    pub refused: Vec<RefusedName>,
}

/// A name record as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameView {
    #[serde(flatten)]
    pub record: crate::names::NameRecord,
    /// Revision of the record's last change.
    pub revision: i64,
}

/// `GET /v1/names`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameList {
    /// Watch from `revision + 1` (`GET /v1/names/watch`) to follow changes.
    pub revision: i64,
    pub names: Vec<NameView>,
}

/// One line of `GET /v1/names/watch` (NDJSON): `put` and `delete` carry
/// the record, `heartbeat` and `error` as in the lease watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEvent {
    #[serde(rename = "type")]
    pub kind: WatchKind,
    pub revision: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<NameView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /v1/names` (admins): a name for something that is not a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddName {
    pub name: weft_config::DnsName,
    pub address: std::net::IpAddr,
}

/// The answer to `DELETE /v1/names/{name}/{address}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedName {
    /// Whether there was such a record.
    pub removed: bool,
    pub revision: i64,
}
