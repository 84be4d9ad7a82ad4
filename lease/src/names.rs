//! Container names (service discovery) as they are kept in the store.
//!
//! One key per name and address: `<prefix>/names/<name>/<address>`, its
//! value `{"NodeName":"host-1","ContainerID":"…"}`. A container's record is
//! attached to its node's etcd lease, so a node that dies takes its names
//! with it; a record made by an operator (`weftctl names add`) has no
//! `NodeName` and no etcd lease and stays until removed. Several records
//! may share a name (a service): the name answers with all of them.
//!
//! ```text
//! etcdctl get --prefix /weft/network/names/
//! /weft/network/names/web/10.244.3.5
//! {"NodeName":"host-1","ContainerID":"4f2c…"}
//! ```

use crate::lease::LeaseId;
use crate::name::NodeName;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use weft_config::DnsName;

/// The directory of name keys, relative to the prefix.
pub fn names_prefix() -> &'static str {
    "names/"
}

/// The key of one record, relative to the prefix.
pub fn name_key(name: &DnsName, address: IpAddr) -> String {
    format!("{}{name}/{address}", names_prefix())
}

/// Longest container ID kept with a record.
pub const MAX_CONTAINER_ID: usize = 256;

/// Checks a container ID as CNI defines it: letters, digits, `_`, `.`
/// and `-`, at most [`MAX_CONTAINER_ID`] characters.
pub fn check_container_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CONTAINER_ID {
        return Err(format!(
            "a container ID has 1 to {MAX_CONTAINER_ID} characters, not {}",
            id.len()
        ));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        Some(c) => Err(format!("{c:?} is not allowed in a container ID")),
        None => Ok(()),
    }
}

/// One name answering with one address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NameRecord {
    pub name: DnsName,
    pub address: IpAddr,
    /// The node whose container has the address; `None` for a record an
    /// operator made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    /// The container, for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// The stored value (the name and address are in the key).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Value {
    #[serde(rename = "NodeName", default, skip_serializing_if = "Option::is_none")]
    node: Option<NodeName>,
    #[serde(
        rename = "ContainerID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    container_id: Option<String>,
}

impl NameRecord {
    /// The key, relative to the prefix.
    pub fn key(&self) -> String {
        name_key(&self.name, self.address)
    }

    /// The value as stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Value {
            node: self.node.clone(),
            container_id: self.container_id.clone(),
        })
        .expect("a name record always serializes")
    }
}

/// A name record as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredName {
    pub record: NameRecord,
    pub etcd_lease: Option<LeaseId>,
    pub mod_revision: i64,
}

/// Reads the name and address out of a key under `names/` (relative to
/// the prefix, directory included).
pub fn parse_name_key(rel_key: &str) -> Result<(DnsName, IpAddr), String> {
    let rest = rel_key
        .strip_prefix(names_prefix())
        .ok_or_else(|| format!("{rel_key:?} is not under {}", names_prefix()))?;
    let (name_text, address_text) = rest
        .rsplit_once('/')
        .ok_or_else(|| format!("{rel_key:?} is not names/<name>/<address>"))?;
    let name: DnsName = name_text.parse().map_err(|e| format!("{rel_key:?}: {e}"))?;
    // Keys are written in one spelling only; another would be a second key
    // for the same record, which a delete of the first would leave behind.
    if name.as_str() != name_text {
        return Err(format!("{rel_key:?}: the name is not in lower case"));
    }
    let address: IpAddr = address_text
        .parse()
        .map_err(|_| format!("{rel_key:?}: {address_text:?} is not an IP address"))?;
    if address.to_string() != address_text {
        return Err(format!(
            "{rel_key:?}: the address is not written as {address}"
        ));
    }
    Ok((name, address))
}

/// Reads one record. `Err` says why the entry is unreadable.
pub(crate) fn decode_name(
    rel_key: &str,
    value: &[u8],
    mod_revision: i64,
    lease: i64,
) -> Result<StoredName, String> {
    let (name, address) = parse_name_key(rel_key)?;
    let v: Value = serde_json::from_slice(value)
        .map_err(|e| format!("{rel_key:?}: value is not a name record: {e}"))?;
    if let Some(id) = &v.container_id {
        check_container_id(id).map_err(|e| format!("{rel_key:?}: {e}"))?;
    }
    Ok(StoredName {
        record: NameRecord {
            name,
            address,
            node: v.node,
            container_id: v.container_id,
        },
        etcd_lease: (lease != 0).then_some(LeaseId(lease)),
        mod_revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NameRecord {
        NameRecord {
            name: "web.shop".parse().unwrap(),
            address: "fdc6:7765:6675:3::5".parse().unwrap(),
            node: Some(NodeName::new("host-1").unwrap()),
            container_id: Some("4f2c_a.b-c".into()),
        }
    }

    #[test]
    fn a_record_round_trips_through_its_key_and_value() {
        let r = record();
        assert_eq!(r.key(), "names/web.shop/fdc6:7765:6675:3::5");
        assert_eq!(
            r.to_json(),
            r#"{"NodeName":"host-1","ContainerID":"4f2c_a.b-c"}"#
        );
        let back = decode_name(&r.key(), r.to_json().as_bytes(), 7, 42).unwrap();
        assert_eq!(back.record, r);
        assert_eq!(back.etcd_lease, Some(LeaseId(42)));
        assert_eq!(back.mod_revision, 7);
        let admin = NameRecord {
            node: None,
            container_id: None,
            ..r
        };
        assert_eq!(admin.to_json(), "{}");
        let back = decode_name(&admin.key(), b"{}", 8, 0).unwrap();
        assert_eq!(back.record, admin);
        assert_eq!(back.etcd_lease, None);
    }

    #[test]
    fn unreadable_keys_and_values_say_why() {
        for (key, value, why) in [
            ("names/web", "{}", "names/<name>/<address>"),
            ("names/web_1/10.244.3.5", "{}", "'_' is not allowed"),
            ("names/Web/10.244.3.5", "{}", "lower case"),
            ("names/web/10.244.3.x", "{}", "not an IP address"),
            ("names/web/fdc6:0::5", "{}", "not written as fdc6::5"),
            ("names/web/10.244.3.5", "{", "not a name record"),
            (
                "names/web/10.244.3.5",
                r#"{"Extra":1}"#,
                "not a name record",
            ),
            (
                "names/web/10.244.3.5",
                r#"{"NodeName":"-x"}"#,
                "not a name record",
            ),
            (
                "names/web/10.244.3.5",
                r#"{"ContainerID":"a/b"}"#,
                "'/' is not allowed",
            ),
            ("subnets/web/10.244.3.5", "{}", "is not under names/"),
        ] {
            let e = decode_name(key, value.as_bytes(), 1, 0).unwrap_err();
            assert!(e.contains(why), "{key} {value}: {e}");
        }
        assert!(check_container_id(&"a".repeat(MAX_CONTAINER_ID)).is_ok());
        assert!(check_container_id(&"a".repeat(MAX_CONTAINER_ID + 1)).is_err());
        assert!(check_container_id("").is_err());
    }
}
