//! Masquerading with flannel's semantics, as one nftables transaction in
//! tables weft owns (`ip weft`, `ip6 weft`):
//!
//! - pod to pod (anywhere in the cluster network): never masqueraded;
//! - traffic from outside the cluster to this node's pods: kept as is;
//! - pods to outside the cluster (not multicast): masqueraded;
//! - the host to remote pods: masqueraded, so replies come back.
//!
//! The transaction adds the table, deletes it and adds it again with its
//! chain and rules, so whatever was there is replaced atomically.
//!
//! [`Masquerade`] keeps the tables so from the reconcile loop: on every
//! full pass it reads them back (`nft -j list table`), and if they are not
//! what it installed (an `nft flush ruleset`, a rule deleted by hand) it
//! installs them again, as a deleted route comes back.

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::collections::HashSet;
use weft_backends::LocalNode;

/// The nftables table weft owns.
pub const TABLE: &str = "weft";
const CHAIN: &str = "postrouting";

fn prefix(net: IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn field(proto: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(proto),
            field: Cow::Borrowed(name),
        },
    )))
}

fn matches(
    proto: &'static str,
    name: &'static str,
    op: Operator,
    net: IpNet,
) -> Statement<'static> {
    Statement::Match(Match {
        left: field(proto, name),
        right: prefix(net),
        op,
    })
}

fn masquerade() -> Statement<'static> {
    Statement::Masquerade(Some(NAT {
        addr: None,
        family: None,
        port: None,
        flags: Some(HashSet::from([NATFlag::FullyRandom])),
    }))
}

fn rule(
    family: NfFamily,
    expr: Vec<Statement<'static>>,
    comment: &'static str,
) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(CHAIN),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: Some(Cow::Borrowed(comment)),
    })
}

/// The rules of one family, added to `batch`.
fn family_rules(
    batch: &mut Batch<'static>,
    family: NfFamily,
    proto: &'static str,
    cluster: IpNet,
    pods: IpNet,
    multicast: IpNet,
) {
    let table = || Table {
        family,
        name: Cow::Borrowed(TABLE),
        handle: None,
    };
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));
    batch.add(NfListObject::Chain(Chain {
        family,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(CHAIN),
        newname: None,
        handle: None,
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(100),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }));
    let (eq, ne) = (Operator::EQ, Operator::NEQ);
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", eq, pods),
            matches(proto, "daddr", eq, cluster),
            Statement::Return(None),
        ],
        "pod to pod: keep the source",
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", eq, cluster),
            matches(proto, "daddr", eq, pods),
            Statement::Return(None),
        ],
        "pod to pod: keep the source",
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", ne, cluster),
            matches(proto, "daddr", eq, pods),
            Statement::Return(None),
        ],
        "outside to our pods: keep the source",
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", eq, cluster),
            matches(proto, "daddr", ne, multicast),
            masquerade(),
        ],
        "pods to outside the cluster",
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", ne, cluster),
            matches(proto, "daddr", eq, cluster),
            masquerade(),
        ],
        "this host to remote pods",
    ));
}

/// The whole ruleset for the node's subnet(s) in the cluster network(s).
pub fn ruleset(
    cluster4: Option<IpNet>,
    pods4: Option<IpNet>,
    cluster6: Option<IpNet>,
    pods6: Option<IpNet>,
) -> Nftables<'static> {
    let mut batch = Batch::new();
    if let (Some(c), Some(p)) = (cluster4, pods4) {
        family_rules(
            &mut batch,
            NfFamily::IP,
            "ip",
            c,
            p,
            "224.0.0.0/4".parse().expect("valid"),
        );
    }
    if let (Some(c), Some(p)) = (cluster6, pods6) {
        family_rules(
            &mut batch,
            NfFamily::IP6,
            "ip6",
            c,
            p,
            "ff00::/8".parse().expect("valid"),
        );
    }
    batch.to_nftables()
}

/// Applies the ruleset with `nft -j -f -` (one transaction).
pub async fn apply(rules: Nftables<'static>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || nftables::helper::apply_ruleset(&rules))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("nft: {e} (is the nftables package installed?)"))
}

/// Checks that `nft` runs here (`--ip-masq` needs it), saying why not.
pub async fn probe() -> Result<(), String> {
    tokio::task::spawn_blocking(|| {
        nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, ["list", "tables"])
    })
    .await
    .map_err(|e| e.to_string())?
    .map(drop)
    .map_err(|e| format!("nft: {e} (is the nftables package installed?)"))
}

/// The networks the rules are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nets {
    pub cluster4: Option<IpNet>,
    pub pods4: Option<IpNet>,
    pub cluster6: Option<IpNet>,
    pub pods6: Option<IpNet>,
}

impl Nets {
    /// The local node's: the cluster network(s) and its own subnet(s).
    pub fn of(local: &LocalNode) -> Self {
        let network = &local.network;
        Nets {
            cluster4: network.ipv4.as_ref().map(|p| p.network().into()),
            pods4: local.subnet.ipv4().map(Into::into),
            cluster6: network.ipv6.as_ref().map(|p| p.network().into()),
            pods6: local.subnet.ipv6().map(Into::into),
        }
    }

    fn ruleset(&self) -> Nftables<'static> {
        ruleset(self.cluster4, self.pods4, self.cluster6, self.pods6)
    }

    /// The families that have rules: `ip`, `ip6`.
    fn families(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.cluster4.is_some() && self.pods4.is_some() {
            f.push("ip");
        }
        if self.cluster6.is_some() && self.pods6.is_some() {
            f.push("ip6");
        }
        f
    }
}

/// What a [`Masquerade::reconcile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// The tables were as installed.
    Nothing,
    /// Installed for the first time, or for new networks.
    Installed,
    /// Put back: they had been changed or removed behind weft's back.
    Restored,
}

/// Keeps weft's masquerade tables installed (see the module's comment).
#[derive(Debug, Default)]
pub struct Masquerade {
    /// The networks last installed, and the tables as read back then.
    installed: Option<(Nets, Vec<serde_json::Value>)>,
}

impl Masquerade {
    /// Installs the rules for `nets` unless the tables are as they were
    /// left.
    pub async fn reconcile(&mut self, nets: Nets) -> Result<Done, String> {
        let families = nets.families();
        let now = read_back(&families).await?;
        let done = match &self.installed {
            Some((n, seen)) if *n == nets && *seen == now => return Ok(Done::Nothing),
            Some((n, _)) if *n == nets => Done::Restored,
            _ => Done::Installed,
        };
        apply(nets.ruleset()).await?;
        let seen = read_back(&families).await?;
        self.installed = Some((nets, seen));
        Ok(done)
    }
}

/// weft's tables of `families` as nft lists them, without what changes
/// from listing to listing (handles, nft's version); an empty list for a
/// table that is not there.
async fn read_back(families: &[&'static str]) -> Result<Vec<serde_json::Value>, String> {
    let families = families.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut tables = Vec::new();
        for family in families {
            let listed = nftables::helper::get_current_ruleset_raw(
                nftables::helper::DEFAULT_NFT,
                ["list", "table", family, TABLE],
            );
            let text = match listed {
                Ok(t) => t,
                Err(nftables::helper::NftablesError::NftFailed { stderr, .. })
                    if stderr.contains("No such file or directory") =>
                {
                    tables.push(serde_json::Value::Null);
                    continue;
                }
                Err(e) => return Err(format!("nft: {e}")),
            };
            let mut v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("nft printed JSON it cannot read back: {e}"))?;
            tables.push(normalized(&mut v));
        }
        Ok(tables)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// `nft -j` output without metainfo and handles.
fn normalized(v: &mut serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut items: Vec<serde_json::Value> = v["nftables"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.get("metainfo").is_none())
        .collect();
    items.iter_mut().for_each(strip);
    serde_json::Value::Array(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_the_table_and_carries_flannels_rules() {
        let rules = ruleset(
            Some("10.244.0.0/16".parse().unwrap()),
            Some("10.244.3.0/24".parse().unwrap()),
            None,
            None,
        );
        let json = serde_json::to_value(&rules).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        let verbs: Vec<String> = cmds
            .iter()
            .map(|c| c.as_object().unwrap().keys().next().unwrap().clone())
            .collect();
        assert_eq!(
            verbs,
            ["add", "delete", "add", "add", "add", "add", "add", "add", "add"]
        );
        assert_eq!(cmds[3]["add"]["chain"]["hook"], "postrouting");
        assert_eq!(cmds[3]["add"]["chain"]["type"], "nat");
        let text = json.to_string();
        assert!(
            text.contains("\"10.244.3.0\"") && text.contains("\"10.244.0.0\""),
            "{text}"
        );
        assert!(text.contains("224.0.0.0"), "{text}");
        assert_eq!(text.matches("masquerade").count(), 2);
        assert!(text.contains("fully-random"));
        let both = ruleset(
            Some("10.244.0.0/16".parse().unwrap()),
            Some("10.244.3.0/24".parse().unwrap()),
            Some("fd77::/48".parse().unwrap()),
            Some("fd77:0:0:3::/64".parse().unwrap()),
        );
        let both = serde_json::to_string(&both).unwrap();
        assert!(
            both.contains("\"ip6\"") && both.contains("ff00::"),
            "{both}"
        );
    }

    #[test]
    fn listings_compare_without_handles_or_nft_version() {
        let listing = |handle: u64, version: &str, rule: &str| {
            serde_json::json!({"nftables": [
                {"metainfo": {"version": version, "json_schema_version": 1}},
                {"table": {"family": "ip", "name": "weft", "handle": handle}},
                {"rule": {"family": "ip", "table": "weft", "chain": "postrouting",
                          "handle": handle + 1, "comment": rule, "expr": []}}
            ]})
        };
        let a = normalized(&mut listing(3, "1.0.6", "pods to outside the cluster"));
        let b = normalized(&mut listing(9, "1.0.9", "pods to outside the cluster"));
        assert_eq!(a, b);
        let c = normalized(&mut listing(3, "1.0.6", "something else"));
        assert_ne!(a, c);
        assert_eq!(a.as_array().unwrap().len(), 2);
    }

    #[test]
    fn rules_are_made_only_for_families_with_both_networks() {
        let nets = Nets {
            cluster4: Some("10.244.0.0/16".parse().unwrap()),
            pods4: Some("10.244.3.0/24".parse().unwrap()),
            cluster6: Some("fd77::/48".parse().unwrap()),
            pods6: None,
        };
        assert_eq!(nets.families(), ["ip"]);
        let both = Nets {
            pods6: Some("fd77:0:0:3::/64".parse().unwrap()),
            ..nets
        };
        assert_eq!(both.families(), ["ip", "ip6"]);
    }
}
