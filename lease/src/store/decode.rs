//! Key layout under the prefix and decoding of raw entries, shared by both
//! stores so they read exactly the same things the same way.

use super::{CorruptEntry, StoreEvent};
use crate::attrs::LeaseAttrs;
use crate::key::SubnetKey;
use crate::lease::{Lease, LeaseId};
use crate::names::{decode_name, names_prefix, parse_name_key, StoredName};

/// The config key, relative to the prefix.
pub fn config_key() -> &'static str {
    "config"
}

/// The directory of lease keys, relative to the prefix.
pub fn subnets_prefix() -> &'static str {
    "subnets/"
}

/// The key recording which subnet a node holds, relative to the prefix:
/// `nodes/<name>`, its value the subnet key, attached to the same etcd
/// lease. Claims compare it, so one node never gets two subnets even from
/// two controller replicas. flannel reads only `subnets/` and ignores it.
pub fn node_key(node: &str) -> String {
    format!("nodes/{node}")
}

/// What a raw key/value under the prefix is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    Config(String),
    Lease(Lease),
    Corrupt(CorruptEntry),
    /// A name record.
    Name(StoredName),
    /// A key under `names/` that cannot be read: the name and address
    /// when the key is readable (the record is gone for readers).
    UnreadableName(Option<(weft_config::DnsName, std::net::IpAddr)>),
    /// Not ours (another directory under the prefix).
    Other,
}

/// Reads one entry. `rel_key` is relative to the prefix.
pub(crate) fn decode_entry(
    rel_key: &str,
    value: &[u8],
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
) -> Entry {
    if rel_key == config_key() {
        return match std::str::from_utf8(value) {
            Ok(s) => Entry::Config(s.to_string()),
            Err(_) => Entry::Config(String::from_utf8_lossy(value).into_owned()),
        };
    }
    if rel_key.starts_with(names_prefix()) {
        return match decode_name(rel_key, value, mod_revision, lease) {
            Ok(n) => Entry::Name(n),
            Err(_) => Entry::UnreadableName(parse_name_key(rel_key).ok()),
        };
    }
    let Some(name) = rel_key.strip_prefix(subnets_prefix()) else {
        return Entry::Other;
    };
    let key: SubnetKey = match name.parse() {
        Ok(k) => k,
        Err(e) => {
            return Entry::Corrupt(CorruptEntry {
                key: rel_key.to_string(),
                subnet: None,
                reason: e.to_string(),
                mod_revision,
            })
        }
    };
    match LeaseAttrs::from_json(value) {
        Ok(attrs) => Entry::Lease(Lease {
            key,
            attrs,
            etcd_lease: (lease != 0).then_some(LeaseId(lease)),
            create_revision,
            mod_revision,
        }),
        Err(e) => Entry::Corrupt(CorruptEntry {
            key: rel_key.to_string(),
            subnet: Some(key),
            reason: format!("value is not lease JSON: {e}"),
            mod_revision,
        }),
    }
}

/// Turns a deletion of `rel_key` into an event, if the key is ours.
pub(crate) fn decode_delete(rel_key: &str, revision: i64) -> Option<StoreEvent> {
    if rel_key == config_key() {
        return Some(StoreEvent::ConfigDelete { revision });
    }
    if rel_key.starts_with(names_prefix()) {
        let (name, address) = parse_name_key(rel_key).ok()?;
        return Some(StoreEvent::NameDelete {
            name,
            address,
            revision,
        });
    }
    let name = rel_key.strip_prefix(subnets_prefix())?;
    Some(match name.parse() {
        Ok(key) => StoreEvent::Delete { key, revision },
        Err(_) => StoreEvent::CorruptDeleted {
            key: rel_key.to_string(),
            revision,
        },
    })
}

/// Turns a put into an event, if the key is ours.
pub(crate) fn decode_put(
    rel_key: &str,
    value: &[u8],
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
) -> Option<StoreEvent> {
    match decode_entry(rel_key, value, create_revision, mod_revision, lease) {
        Entry::Config(text) => Some(StoreEvent::ConfigPut {
            text,
            revision: mod_revision,
        }),
        Entry::Lease(l) => Some(StoreEvent::Put(l)),
        Entry::Corrupt(c) => Some(StoreEvent::Corrupt(c)),
        Entry::Name(n) => Some(StoreEvent::NamePut(n)),
        Entry::UnreadableName(key) => key.map(|(name, address)| StoreEvent::NameDelete {
            name,
            address,
            revision: mod_revision,
        }),
        Entry::Other => None,
    }
}

/// Adds an entry to a snapshot being built.
pub(crate) fn add_to_snapshot(snap: &mut super::Snapshot, entry: Entry, mod_revision: i64) {
    match entry {
        Entry::Config(text) => snap.config = Some((text, mod_revision)),
        Entry::Lease(l) => snap.leases.push(l),
        Entry::Corrupt(c) => snap.corrupt.push(c),
        Entry::Name(n) => snap.names.push(n),
        Entry::UnreadableName(_) | Entry::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_kind() {
        assert_eq!(
            decode_entry("config", b"{}", 1, 1, 0),
            Entry::Config("{}".into())
        );
        assert_eq!(decode_entry("other/thing", b"{}", 1, 1, 0), Entry::Other);
        match decode_entry(
            "subnets/10.244.3.0-24",
            br#"{"PublicIP":"198.18.0.1"}"#,
            4,
            5,
            77,
        ) {
            Entry::Lease(l) => {
                assert_eq!(l.key.to_string(), "10.244.3.0-24");
                assert_eq!(l.etcd_lease, Some(LeaseId(77)));
                assert_eq!((l.create_revision, l.mod_revision), (4, 5));
            }
            other => panic!("{other:?}"),
        }
        match decode_entry("subnets/10.244.3.0-24", b"{not json", 4, 5, 0) {
            Entry::Corrupt(c) => assert_eq!(c.subnet.unwrap().to_string(), "10.244.3.0-24"),
            other => panic!("{other:?}"),
        }
        match decode_entry("subnets/garbage", b"{}", 4, 5, 0) {
            Entry::Corrupt(c) => assert_eq!(c.subnet, None),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode_delete("subnets/10.244.3.0-24", 9),
            Some(StoreEvent::Delete {
                key: "10.244.3.0-24".parse().unwrap(),
                revision: 9
            })
        );
        assert_eq!(decode_delete("elsewhere", 9), None);
    }
}
