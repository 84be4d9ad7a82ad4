//! A lease as stored: its subnet key, attributes, and etcd bookkeeping.

use crate::attrs::LeaseAttrs;
use crate::key::SubnetKey;
use std::fmt;

/// An etcd lease id. Shown as 16 hex digits, exactly as `etcdctl` prints it
/// (so ids can be pasted into `etcdctl lease timetolive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One subnet lease (or reservation) as it is in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The subnet(s) held.
    pub key: SubnetKey,
    /// The lease JSON.
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to; `None` makes it a reservation
    /// that never expires.
    pub etcd_lease: Option<LeaseId>,
    /// Store revision at which the key was created.
    pub create_revision: i64,
    /// Store revision of the key's last change.
    pub mod_revision: i64,
}

impl Lease {
    /// A reservation: a key without an etcd lease, kept until deleted.
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease.is_none()
    }

    /// The owning node, if the lease names one (flannel's leases do not).
    pub fn node_name(&self) -> Option<&str> {
        self.attrs.node_name.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_print_like_etcdctl() {
        assert_eq!(
            LeaseId(0x0e8c_a213_6525_a407).to_string(),
            "0e8ca2136525a407"
        );
        assert_eq!(
            LeaseId(0x694d_8543_30fc_5110).to_string(),
            "694d854330fc5110"
        );
        assert_eq!(LeaseId(1).to_string(), "0000000000000001");
    }
}
