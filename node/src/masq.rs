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

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::collections::HashSet;

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
}
