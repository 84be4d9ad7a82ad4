//! Names (service discovery) on the node: the cluster's name records
//! followed from the controller ([`follow`]), this node's containers'
//! names registered with it ([`register`]), and the name server on the
//! bridge gateway that answers from them and forwards the rest
//! ([`server`], [`answer`], [`forward`]).

pub mod answer;
pub mod follow;
pub mod forward;
pub mod register;
pub mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use weft_config::DnsName;
use weft_lease::names::NameRecord;
use weft_lease::NodeName;

/// Every name record as the controller last said, indexed both ways.
#[derive(Debug, Default)]
pub struct NameTable {
    /// Whether a full list has been loaded.
    pub synced: bool,
    pub revision: i64,
    by_name: BTreeMap<DnsName, BTreeMap<IpAddr, NameRecord>>,
    by_address: BTreeMap<IpAddr, BTreeSet<DnsName>>,
    /// For each name that is a proper suffix of some names (`shop` of
    /// `web.shop`), how many: such a name exists in DNS without addresses.
    below: BTreeMap<DnsName, usize>,
}

/// The proper suffixes of a name (`b.c` and `c` of `a.b.c`).
fn suffixes(name: &DnsName) -> impl Iterator<Item = DnsName> + '_ {
    let s = name.as_str();
    s.match_indices('.')
        .filter_map(move |(i, _)| s[i + 1..].parse().ok())
}

impl NameTable {
    /// Replaces everything with a full list.
    pub fn load(&mut self, revision: i64, records: impl IntoIterator<Item = NameRecord>) {
        *self = NameTable::default();
        for r in records {
            self.put(r);
        }
        self.revision = revision;
        self.synced = true;
    }

    pub fn put(&mut self, r: NameRecord) {
        self.by_address
            .entry(r.address)
            .or_default()
            .insert(r.name.clone());
        if !self.by_name.contains_key(&r.name) {
            for s in suffixes(&r.name) {
                *self.below.entry(s).or_default() += 1;
            }
        }
        self.by_name
            .entry(r.name.clone())
            .or_default()
            .insert(r.address, r);
    }

    pub fn delete(&mut self, name: &DnsName, address: IpAddr) {
        if let Some(m) = self.by_name.get_mut(name) {
            m.remove(&address);
            if m.is_empty() {
                self.by_name.remove(name);
                for s in suffixes(name) {
                    if let Some(n) = self.below.get_mut(&s) {
                        *n -= 1;
                        if *n == 0 {
                            self.below.remove(&s);
                        }
                    }
                }
            }
        }
        if let Some(s) = self.by_address.get_mut(&address) {
            s.remove(name);
            if s.is_empty() {
                self.by_address.remove(&address);
            }
        }
    }

    /// The addresses of `name`; `None` when there is no such name.
    pub fn addresses(&self, name: &DnsName) -> Option<impl Iterator<Item = IpAddr> + '_> {
        self.by_name.get(name).map(|m| m.keys().copied())
    }

    /// Whether some record names `name` or a name below it (`shop` when
    /// `web.shop` exists): such a name exists in DNS, with no address.
    pub fn has_below(&self, name: &DnsName) -> bool {
        self.by_name.contains_key(name) || self.below.contains_key(name)
    }

    /// The names of `address`.
    pub fn names_of(&self, address: IpAddr) -> impl Iterator<Item = &DnsName> {
        self.by_address.get(&address).into_iter().flatten()
    }

    /// The records of `node`'s containers.
    pub fn of_node<'a>(&'a self, node: &'a NodeName) -> impl Iterator<Item = &'a NameRecord> + 'a {
        self.by_name
            .values()
            .flat_map(|m| m.values())
            .filter(move |r| r.node.as_ref() == Some(node))
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.by_name.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The table shared by the follower (one writer), the registrar and the
/// name server (readers), with a notification readers can wait on.
#[derive(Debug, Clone, Default)]
pub struct Names {
    table: Arc<RwLock<NameTable>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Names {
    /// Reads the table.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, NameTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the table and wakes whoever waits for a change.
    pub fn update<T>(&self, f: impl FnOnce(&mut NameTable) -> T) -> T {
        let out = {
            let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
            f(&mut t)
        };
        self.notify.notify_waiters();
        out
    }

    /// Waits for the next change.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, addr: &str, node: &str) -> NameRecord {
        NameRecord {
            name: name.parse().unwrap(),
            address: addr.parse().unwrap(),
            node: Some(NodeName::new(node).unwrap()),
            container_id: None,
        }
    }

    #[test]
    fn the_table_answers_both_ways() {
        let mut t = NameTable::default();
        t.load(
            4,
            [
                rec("web", "10.244.1.5", "a"),
                rec("web", "10.244.2.5", "b"),
                rec("api.shop", "10.244.1.5", "a"),
            ],
        );
        let web: DnsName = "web".parse().unwrap();
        let addrs: Vec<IpAddr> = t.addresses(&web).unwrap().collect();
        assert_eq!(addrs.len(), 2);
        let names: Vec<&str> = t
            .names_of("10.244.1.5".parse().unwrap())
            .map(DnsName::as_str)
            .collect();
        assert_eq!(names, ["api.shop", "web"]);
        assert!(t.has_below(&"shop".parse().unwrap()));
        assert!(!t.has_below(&"hop".parse().unwrap()));
        t.put(rec("a.b.shop", "10.244.1.6", "a"));
        assert!(t.has_below(&"b.shop".parse().unwrap()));
        t.delete(&"a.b.shop".parse().unwrap(), "10.244.1.6".parse().unwrap());
        assert!(!t.has_below(&"b.shop".parse().unwrap()));
        assert!(
            t.has_below(&"shop".parse().unwrap()),
            "api.shop is still there"
        );
        assert!(t.addresses(&"shop".parse().unwrap()).is_none());
        let a = NodeName::new("a").unwrap();
        assert_eq!(t.of_node(&a).count(), 2);
        t.delete(&web, "10.244.1.5".parse().unwrap());
        t.delete(&web, "10.244.9.9".parse().unwrap());
        assert_eq!(t.len(), 2);
        t.delete(&web, "10.244.2.5".parse().unwrap());
        assert!(t.addresses(&web).is_none());
        assert_eq!(t.names_of("10.244.2.5".parse().unwrap()).count(), 0);
        assert!(t.synced && t.revision == 4);
    }
}
