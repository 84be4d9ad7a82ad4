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
//! [`Masquerade`] keeps these tables from the reconcile loop. It installs
//! them on the first pass and whenever the node's networks change; on every
//! full pass it reads them back (`nft -j list table`), and if they are not
//! what it installed (an `nft flush ruleset`, a rule deleted by hand) it
//! installs them again, as a deleted route comes back. A family the
//! network no longer has loses its table.

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
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

const POD_TO_POD: &str = "pod to pod: keep the source";
const OUTSIDE_TO_PODS: &str = "outside to our pods: keep the source";
const TO_OUTSIDE: &str = "pods to outside the cluster";
const HOST_TO_PODS: &str = "this host to remote pods";

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
        POD_TO_POD,
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", eq, cluster),
            matches(proto, "daddr", eq, pods),
            Statement::Return(None),
        ],
        POD_TO_POD,
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", ne, cluster),
            matches(proto, "daddr", eq, pods),
            Statement::Return(None),
        ],
        OUTSIDE_TO_PODS,
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", eq, cluster),
            matches(proto, "daddr", ne, multicast),
            masquerade(),
        ],
        TO_OUTSIDE,
    ));
    batch.add(rule(
        family,
        vec![
            matches(proto, "saddr", ne, cluster),
            matches(proto, "daddr", eq, cluster),
            masquerade(),
        ],
        HOST_TO_PODS,
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

/// How long one `nft` run may take: the reconcile loop waits for it.
const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `nft -j <args>` (with `input` on stdin), in the C locale, killed
/// after [`NFT_TIMEOUT`]; its stdout, or why it failed (with nft's stderr).
async fn nft(args: &[&str], input: Option<String>) -> Result<String, NftError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new("nft");
    cmd.arg("-j")
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let run = async {
        let mut child = cmd.spawn().map_err(|e| {
            NftError(if e.kind() == std::io::ErrorKind::NotFound {
                "nft is not installed (the nftables package)".to_string()
            } else {
                format!("cannot run nft: {e}")
            })
        })?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(|e| NftError(format!("writing to nft: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| NftError(format!("waiting for nft: {e}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NftError(format!(
                "nft {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            Err(NftError(format!(
                "nft {} took over {NFT_TIMEOUT:?}",
                args.join(" ")
            )))
        })
}

/// Why `nft` failed, for people.
#[derive(Debug)]
struct NftError(String);

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Applies the ruleset with `nft -j -f -` (one transaction).
pub async fn apply(rules: Nftables<'static>) -> Result<(), String> {
    let text = serde_json::to_string(&rules).map_err(|e| e.to_string())?;
    nft(&["-f", "-"], Some(text))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Checks that `nft` runs here (`--ip-masq` needs it), saying why not.
pub async fn probe() -> Result<(), String> {
    nft(&["list", "tables"], None)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The networks the rules are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nets {
    pub cluster4: Option<IpNet>,
    pub pods4: Option<IpNet>,
    pub cluster6: Option<IpNet>,
    pub pods6: Option<IpNet>,
}

/// Both families weft may have a table in.
const FAMILIES: [&str; 2] = ["ip", "ip6"];

/// The rules' comments, in the order [`family_rules`] adds them: a table
/// holds one rule for each.
const RULES: [&str; 5] = [
    POD_TO_POD,
    POD_TO_POD,
    OUTSIDE_TO_PODS,
    TO_OUTSIDE,
    HOST_TO_PODS,
];

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

    /// The rules, and the removal of the table of a family without them.
    fn ruleset(&self) -> Nftables<'static> {
        let mut rules = ruleset(self.cluster4, self.pods4, self.cluster6, self.pods6);
        let wanted = self.families();
        let items = rules.objects.to_mut();
        for family in FAMILIES.iter().filter(|f| !wanted.contains(f)) {
            let table = || {
                NfListObject::Table(Table {
                    family: if *family == "ip" {
                        NfFamily::IP
                    } else {
                        NfFamily::IP6
                    },
                    name: Cow::Borrowed(TABLE),
                    handle: None,
                })
            };
            // Added first, so deleting it never fails.
            items.push(NfObject::CmdObject(NfCmd::Add(table())));
            items.push(NfObject::CmdObject(NfCmd::Delete(table())));
        }
        rules
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

    /// Whether `tables` (one listing per family of [`FAMILIES`]) are what
    /// these networks install: every wanted family's table with its
    /// chain's rules, no table in the others.
    fn installed_in(&self, tables: &[serde_json::Value]) -> bool {
        let wanted = self.families();
        FAMILIES.iter().zip(tables).all(|(family, listing)| {
            if !wanted.contains(family) {
                return listing.is_null();
            }
            let mut comments: Vec<&str> = listing
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("rule")?.get("comment")?.as_str())
                .collect();
            comments.sort_unstable();
            let mut expected = RULES.to_vec();
            expected.sort_unstable();
            comments == expected
        })
    }
}

/// What a [`Masquerade::reconcile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// The tables were as installed, or were not read back.
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
    /// Installs the rules for `nets` if they are not installed yet (or
    /// were for other networks); with `check`, also if the tables are not
    /// as they were left.
    pub async fn reconcile(&mut self, nets: Nets, check: bool) -> Result<Done, String> {
        let done = match &self.installed {
            Some((n, seen)) if *n == nets => {
                if !check {
                    return Ok(Done::Nothing);
                }
                if read_back().await? == *seen {
                    return Ok(Done::Nothing);
                }
                Done::Restored
            }
            _ => Done::Installed,
        };
        self.installed = None;
        apply(nets.ruleset()).await?;
        let seen = read_back().await?;
        if !nets.installed_in(&seen) {
            // Changed again at once (a flush right after ours): the next
            // pass installs again.
            return Err("the tables were changed while they were being installed".into());
        }
        self.installed = Some((nets, seen));
        Ok(done)
    }
}

/// weft's tables (one per [`FAMILIES`]) as nft lists them, without what
/// differs between two installs of the same rules (handles, nft's
/// metainfo); `null` for a table that is not there.
async fn read_back() -> Result<Vec<serde_json::Value>, String> {
    let mut tables = Vec::new();
    for family in FAMILIES {
        match nft(&["list", "table", family, TABLE], None).await {
            Ok(text) => {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("nft printed JSON it cannot read back: {e}"))?;
                tables.push(normalized(&v));
            }
            Err(e) if e.0.contains("No such file or directory") => {
                tables.push(serde_json::Value::Null)
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(tables)
}

/// `nft -j` output without metainfo and handles.
fn normalized(v: &serde_json::Value) -> serde_json::Value {
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
        .into_iter()
        .flatten()
        .filter(|i| i.get("metainfo").is_none())
        .cloned()
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
        let a = normalized(&listing(3, "1.0.6", "pods to outside the cluster"));
        let b = normalized(&listing(9, "1.0.9", "pods to outside the cluster"));
        assert_eq!(a, b);
        let c = normalized(&listing(3, "1.0.6", "something else"));
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

    #[test]
    fn a_table_counts_as_installed_with_its_rules_and_nothing_elsewhere() {
        let v4 = Nets {
            cluster4: Some("10.244.0.0/16".parse().unwrap()),
            pods4: Some("10.244.3.0/24".parse().unwrap()),
            cluster6: None,
            pods6: None,
        };
        let table = |comments: &[&str]| {
            let mut items = vec![serde_json::json!({"table": {"family": "ip", "name": "weft"}})];
            items.extend(
                comments
                    .iter()
                    .map(|c| serde_json::json!({"rule": {"chain": "postrouting", "comment": c}})),
            );
            serde_json::Value::Array(items)
        };
        let full = table(&RULES);
        assert!(v4.installed_in(&[full.clone(), serde_json::Value::Null]));
        // A rule missing, a table flushed, a table left in the other family.
        assert!(!v4.installed_in(&[table(&RULES[1..]), serde_json::Value::Null]));
        assert!(!v4.installed_in(&[serde_json::Value::Null, serde_json::Value::Null]));
        assert!(!v4.installed_in(&[full.clone(), full]));
    }

    #[test]
    fn a_family_without_rules_loses_its_table() {
        let v4 = Nets {
            cluster4: Some("10.244.0.0/16".parse().unwrap()),
            pods4: Some("10.244.3.0/24".parse().unwrap()),
            cluster6: Some("fd77::/48".parse().unwrap()),
            pods6: None,
        };
        let json = serde_json::to_value(v4.ruleset()).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        let last: Vec<String> = cmds[cmds.len() - 2..]
            .iter()
            .map(|c| {
                let (verb, obj) = c.as_object().unwrap().iter().next().unwrap();
                format!("{verb} {}", obj["table"]["family"].as_str().unwrap())
            })
            .collect();
        assert_eq!(last, ["add ip6", "delete ip6"]);
    }
}
