//! The CNI commands.

use crate::ipam::{IpamError, Range, Store};
use crate::net::{
    describe, host_veth_name, legacy_host_veth_name, owned, veth_alias, NetError, Netlink, Removal,
};
use crate::spec::{Attachment, CniError, CniResult, Code, Interface, IpConfig, NetConf, Route};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use weft_config::SubnetEnv;

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `KEY=VALUE;...` (names come from some of them).
    pub args: String,
}

impl Env {
    /// Reads and checks the variables `command` needs.
    pub fn read(command: &str, get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let need = |k: &str| -> Result<String, CniError> {
            get(k)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| CniError::new(Code::InvalidEnv, format!("{k} is not set")))
        };
        let container_id = need("CNI_CONTAINERID")?;
        if container_id.chars().any(|c| c.is_control() || c == '/') {
            return Err(CniError::new(
                Code::InvalidEnv,
                "CNI_CONTAINERID contains '/' or control characters",
            ));
        }
        let ifname = need("CNI_IFNAME")?;
        if ifname.len() > 15 {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!(
                    "CNI_IFNAME {ifname:?} is {} bytes long; interface names have at most 15",
                    ifname.len()
                ),
            ));
        }
        if ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name"),
            ));
        }
        // DEL may come after the namespace is gone, without CNI_NETNS.
        let netns = if command == "DEL" {
            get("CNI_NETNS").unwrap_or_default()
        } else {
            need("CNI_NETNS")?
        };
        Ok(Env {
            container_id,
            netns,
            ifname,
            args: get("CNI_ARGS").unwrap_or_default(),
        })
    }
}

fn io(e: impl std::fmt::Display) -> CniError {
    CniError::new(Code::Io, e.to_string())
}

impl From<NetError> for CniError {
    fn from(e: NetError) -> Self {
        CniError::new(Code::Io, e.to_string())
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        match e {
            IpamError::Exhausted { .. } => CniError::new(Code::NoFreeAddress, e.to_string()),
            IpamError::Io { .. } => CniError::new(Code::Io, e.to_string()),
        }
    }
}

/// The node's lease as weft-node wrote it, and its subnets: IPv4 first,
/// then IPv6 (dual stack); at least one.
fn subnet_env(path: &Path) -> Result<(SubnetEnv, Vec<IpNet>), CniError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "not found: is weft-node running on this host?".to_string()
        } else {
            e.to_string()
        };
        CniError::new(
            Code::TryAgainLater,
            format!("subnet file {}: {why}", path.display()),
        )
    })?;
    let env = SubnetEnv::parse(&text).map_err(|e| {
        CniError::new(
            Code::TryAgainLater,
            format!("subnet file {}: {e}", path.display()),
        )
    })?;
    let subnets: Vec<IpNet> = env
        .subnet
        .map(IpNet::V4)
        .into_iter()
        .chain(env.ipv6_subnet.map(IpNet::V6))
        .collect();
    if subnets.is_empty() {
        return Err(CniError::new(
            Code::TryAgainLater,
            format!(
                "subnet file {} has neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET",
                path.display()
            ),
        ));
    }
    Ok((env, subnets))
}

/// The subnets as the messages name them.
fn listed(subnets: &[IpNet]) -> String {
    let all: Vec<String> = subnets.iter().map(|s| s.trunc().to_string()).collect();
    all.join(" and ")
}

/// The node's lease, which must still be held: past its expiry the subnet
/// may be handed to another node, so no container gets an address from it.
fn held_lease(path: &Path) -> Result<(SubnetEnv, Vec<IpNet>), CniError> {
    let (env, subnets) = subnet_env(path)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(t) = env.lease_expires.filter(|t| *t <= now) {
        return Err(CniError::new(
            Code::TryAgainLater,
            format!(
                "this node's lease of {} ran out {}s ago (weft-node could not renew it; \
                 see its /readyz): no new containers until it holds a lease again",
                listed(&subnets),
                now - t
            ),
        ));
    }
    Ok((env, subnets))
}

fn open_netns(path: &str) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(
            Code::UnknownContainer,
            format!("network namespace {path}: {e}"),
        )
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io)
}

/// ADD: attach the container.
pub fn add(conf: &NetConf, env: &Env) -> Result<CniResult, CniError> {
    // One range per family the node's lease holds: IPv4, IPv6
    // (FLANNEL_IPV6_SUBNET), or both.
    let (senv, subnets) = held_lease(&conf.subnet_file)?;
    // Names are checked before anything is made.
    let names = crate::names::requested(conf, &env.args)?;
    let ranges = subnets
        .iter()
        .map(|s| Range::new(*s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            CniError::new(
                Code::InvalidConfig,
                format!("subnet file {}: {e}", conf.subnet_file.display()),
            )
        })?;
    let clusters: Vec<IpNet> = senv
        .network
        .map(IpNet::V4)
        .into_iter()
        .chain(senv.ipv6_network.map(IpNet::V6))
        .collect();
    // What weft-node writes is consistent; a file that is not gives no
    // container an address.
    for s in &subnets {
        let bad = |why: String| {
            CniError::new(
                Code::InvalidConfig,
                format!("subnet file {}: {why}", conf.subnet_file.display()),
            )
        };
        if let IpNet::V6(v6) = s {
            let a = v6.addr();
            if a.is_multicast() || a.is_loopback() || a.is_unicast_link_local() {
                return Err(bad(format!("{s} is not a unicast IPv6 network for pods")));
            }
        }
        if let Some(c) = clusters
            .iter()
            .find(|c| c.addr().is_ipv4() == s.addr().is_ipv4())
            .filter(|c| !c.contains(&s.trunc()))
        {
            return Err(bad(format!(
                "the node subnet {s} is not inside the network {c}"
            )));
        }
    }
    let mtu = conf
        .mtu
        .filter(|m| *m > 0)
        .unwrap_or(if senv.mtu > 0 { senv.mtu } else { 1500 });
    let ns = open_netns(&env.netns)?;
    let mut result = match &conf.prev_result {
        Some(p) => CniResult::from_json(p)?,
        None => CniResult::default(),
    };
    let result = runtime()?.block_on(async {
        let host = Netlink::here()?;
        let cont = Netlink::in_ns(&ns)?;
        if cont.link(&env.ifname).await?.is_some() {
            return Err(CniError::new(
                Code::InterfaceExists,
                format!("interface {} already exists in the container", env.ifname),
            ));
        }
        let ips = {
            let store = Store::open(&conf.data_dir, &conf.name)?;
            let mut ips = Vec::new();
            for range in &ranges {
                match store.allocate(range, &env.container_id, &env.ifname) {
                    Ok(ip) => ips.push(ip),
                    Err(e) => {
                        // None of this attachment's addresses stay taken.
                        if let Err(r) = store.release(&env.container_id, &env.ifname) {
                            eprintln!("weft-cni: releasing the addresses of this ADD: {r}");
                        }
                        return Err(e.into());
                    }
                }
            }
            ips
        };
        let hv = host_veth_name(&env.container_id, &env.ifname);
        let alias = veth_alias(&env.container_id, &env.ifname);
        let mut bridge_index = None;
        let made = async {
            let gateways = ranges
                .iter()
                .map(|r| IpNet::new(r.gateway, r.subnet.prefix_len()).map_err(io))
                .collect::<Result<Vec<_>, _>>()?;
            let bridge = host
                .ensure_bridge(&conf.bridge, &gateways, &clusters, mtu)
                .await?;
            bridge_index = Some(bridge.index);
            // A leftover of an ADD of this attachment that stopped halfway
            // goes; anything else with the name is someone else's.
            if let Removal::NotOurs(what) =
                host.delete_veth(&hv, &alias, Some(bridge.index)).await?
            {
                return Err(CniError::new(
                    Code::InterfaceExists,
                    format!(
                        "host interface {hv} (this attachment's name) is already {what}; \
                         it is left alone"
                    ),
                ));
            }
            let hl = host
                .add_veth(
                    &hv,
                    &env.ifname,
                    &ns,
                    mtu,
                    bridge.index,
                    conf.hairpin_mode,
                    &alias,
                )
                .await?;
            // Per family: the default route, or the cluster network, via
            // the bridge.
            let routes: Vec<(IpNet, IpAddr)> = ranges
                .iter()
                .filter_map(|r| {
                    let v4 = r.gateway.is_ipv4();
                    let dst = if conf.is_default_gateway {
                        Some(if v4 {
                            IpNet::V4(Ipv4Net::default())
                        } else {
                            IpNet::V6(Ipv6Net::default())
                        })
                    } else {
                        clusters.iter().find(|c| c.addr().is_ipv4() == v4).copied()
                    };
                    dst.map(|d| (d, r.gateway))
                })
                .collect();
            let addrs = ranges
                .iter()
                .zip(&ips)
                .map(|(r, ip)| IpNet::new(*ip, r.subnet.prefix_len()).map_err(io))
                .collect::<Result<Vec<_>, _>>()?;
            let cl = cont
                .setup_container_if(&env.ifname, &addrs, &routes)
                .await?;
            Ok::<_, CniError>((bridge, hl, cl, addrs, routes))
        }
        .await;
        let (bridge, hl, cl, addrs, routes) = match made {
            Ok(m) => m,
            Err(e) => {
                // Leave nothing half-made behind (only what is ours).
                let _ = host.delete_veth(&hv, &alias, bridge_index).await;
                if let Ok(store) = Store::open(&conf.data_dir, &conf.name) {
                    let _ = store.release(&env.container_id, &env.ifname);
                }
                return Err(e);
            }
        };
        let base = result.interfaces.len();
        result.interfaces.push(Interface {
            name: bridge.name,
            mac: bridge.mac,
            sandbox: None,
        });
        result.interfaces.push(Interface {
            name: hl.name,
            mac: hl.mac,
            sandbox: None,
        });
        result.interfaces.push(Interface {
            name: cl.name,
            mac: cl.mac,
            sandbox: Some(env.netns.clone()),
        });
        result
            .ips
            .extend(addrs.iter().zip(&ranges).map(|(a, r)| IpConfig {
                address: *a,
                gateway: r.gateway,
                interface: base + 2,
            }));
        result.routes.extend(
            routes
                .into_iter()
                .map(|(dst, gw)| Route { dst, gw: Some(gw) }),
        );
        // The node's name server on the bridge gateway, when it serves.
        if let (Some(domain), true) = (&senv.dns_domain, result.dns.is_null()) {
            let servers: Vec<String> = ranges.iter().map(|r| r.gateway.to_string()).collect();
            result.dns = serde_json::json!({
                "nameservers": servers,
                "domain": domain.as_str(),
                "search": [domain.as_str()],
            });
        }
        Ok(result)
    })?;
    // Kept (and the node told) once the container is attached; an entry
    // without names removes any a stale attachment of this name had.
    let store = Store::open(&conf.data_dir, &conf.name)?;
    let addresses: Vec<IpAddr> = result.ips.iter().map(|ip| ip.address.addr()).collect();
    let mut had = false;
    crate::names::update(&store, |f| {
        had = f.remove(&env.container_id, &env.ifname);
        f.set(crate::names::entry(
            &env.container_id,
            &env.ifname,
            names.clone(),
            addresses,
        ))
    })?;
    drop(store);
    if !names.is_empty() || had {
        crate::names::tell_node(&conf.node_socket);
    }
    Ok(result)
}

/// DEL: detach the container; succeeds when there is nothing left to do.
pub fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let store = Store::open(&conf.data_dir, &conf.name)?;
    store.release(&env.container_id, &env.ifname)?;
    let others = store.entries()?;
    // DEL succeeds whatever the names file's state (a failure is only
    // reported): the container is gone.
    let mut named = false;
    if let Err(e) =
        crate::names::update(&store, |f| named = f.remove(&env.container_id, &env.ifname))
    {
        eprintln!("weft-cni: withdrawing the container's names: {}", e.msg);
    }
    drop(store);
    if named {
        crate::names::tell_node(&conf.node_socket);
    }
    runtime()?.block_on(async {
        let host = Netlink::here()?;
        remove_host_veth(&host, conf, &env.container_id, &env.ifname, &others).await
    })
}

/// Deletes an attachment's host veth if it is the attachment's; a link of
/// someone else's with its name is left alone and reported on stderr (the
/// runtime's log), as DEL must still succeed. The 32-bit name of weft-cni
/// 0.1 is tried too, unless an attachment still in the store (`others`)
/// has the same one: an unmarked veth with it might be theirs.
async fn remove_host_veth(
    host: &Netlink,
    conf: &NetConf,
    container_id: &str,
    ifname: &str,
    others: &[crate::ipam::Entry],
) -> Result<(), CniError> {
    let alias = veth_alias(container_id, ifname);
    let bridge = host.link(&conf.bridge).await?.map(|b| b.index);
    let legacy = legacy_host_veth_name(container_id, ifname);
    let shared = others.iter().any(|e| {
        (e.container_id != container_id || e.ifname != ifname)
            && legacy_host_veth_name(&e.container_id, &e.ifname) == legacy
    });
    let names = [
        Some(host_veth_name(container_id, ifname)),
        (!shared).then_some(legacy),
    ];
    for name in names.into_iter().flatten() {
        if let Removal::NotOurs(what) = host.delete_veth(&name, &alias, bridge).await? {
            eprintln!(
                "weft-cni: {name} is {what}, not the host side of {ifname} of container \
                 {container_id}; left alone"
            );
        }
    }
    Ok(())
}

/// CHECK: is the attachment still what ADD made (and prevResult says)?
pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if !conf.at_least(0, 4) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("CHECK is not part of CNI {}", conf.cni_version),
        ));
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "CHECK needs prevResult (the result of ADD)",
        )
    })?;
    let prev = CniResult::from_json(prev)?;
    let (senv, _) = subnet_env(&conf.subnet_file)?;
    let mtu = conf
        .mtu
        .filter(|m| *m > 0)
        .unwrap_or(if senv.mtu > 0 { senv.mtu } else { 1500 });
    let ns = open_netns(&env.netns)?;
    let mine = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| {
            CniError::new(
                Code::CheckFailed,
                format!("prevResult has no interface {} in a sandbox", env.ifname),
            )
        })?;
    let want: Vec<&IpConfig> = prev.ips.iter().filter(|ip| ip.interface == mine).collect();
    let mut problems = Vec::new();
    runtime()?.block_on(async {
        let host = Netlink::here()?;
        let cont = Netlink::in_ns(&ns)?;
        match cont.link(&env.ifname).await? {
            None => problems.push(format!(
                "interface {} is missing from the container",
                env.ifname
            )),
            Some(l) => {
                if !l.up {
                    problems.push(format!("{} is down", env.ifname));
                }
                if l.mtu != mtu {
                    problems.push(format!("{} has MTU {} instead of {mtu}", env.ifname, l.mtu));
                }
                let have = cont.addresses(l.index).await?;
                for ip in &want {
                    if !have.contains(&ip.address) {
                        problems.push(format!(
                            "{} lacks address {} (has {:?})",
                            env.ifname, ip.address, have
                        ));
                    }
                    let ours = match ip.address {
                        IpNet::V4(_) => senv.subnet.map(IpNet::V4),
                        IpNet::V6(_) => senv.ipv6_subnet.map(IpNet::V6),
                    };
                    match ours {
                        Some(s) if Range::of(s).usable(ip.address.addr()) => {}
                        Some(s) => problems.push(format!(
                            "address {} is not in this node's subnet {s}",
                            ip.address
                        )),
                        None => problems.push(format!(
                            "address {} is of a family this node's lease has no subnet of",
                            ip.address
                        )),
                    }
                }
                let routes = cont.routes().await?;
                for r in &prev.routes {
                    if !routes
                        .iter()
                        .any(|(d, g, _)| *d == r.dst && (r.gw.is_none() || *g == r.gw))
                    {
                        problems.push(format!("route {} via {:?} is missing", r.dst, r.gw));
                    }
                }
            }
        }
        let alias = veth_alias(&env.container_id, &env.ifname);
        let mut hv = host_veth_name(&env.container_id, &env.ifname);
        let mut host_side = host.link(&hv).await?;
        if host_side.is_none() {
            // Attached by weft-cni 0.1, before names got longer.
            let legacy = legacy_host_veth_name(&env.container_id, &env.ifname);
            if let Some(l) = host.link(&legacy).await? {
                (hv, host_side) = (legacy, Some(l));
            }
        }
        let bridge = host.link(&conf.bridge).await?;
        match (host_side, bridge) {
            (None, _) => problems.push(format!("host side {hv} is missing")),
            (Some(_), None) => problems.push(format!("bridge {} is missing", conf.bridge)),
            (Some(h), Some(b)) if h.master != Some(b.index) => {
                problems.push(format!("{hv} is not attached to {}", conf.bridge))
            }
            (Some(h), Some(b)) if !owned(&h, &alias, Some(b.index)) => problems.push(format!(
                "{hv} is {}, not this attachment's host side",
                describe(&h)
            )),
            _ => {}
        }
        Ok::<_, CniError>(())
    })?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            Code::CheckFailed,
            format!(
                "attachment of {} is not as set up: {}",
                env.ifname,
                problems.join("; ")
            ),
        ))
    }
}

/// STATUS: can ADD work now?
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    if !conf.at_least(1, 1) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("STATUS is not part of CNI {}", conf.cni_version),
        ));
    }
    let (_, subnets) =
        held_lease(&conf.subnet_file).map_err(|e| CniError::new(Code::NotAvailable, e.msg))?;
    for s in subnets {
        Range::new(s).map_err(|e| {
            CniError::new(
                Code::NotAvailable,
                format!("subnet file {}: {e}", conf.subnet_file.display()),
            )
        })?;
    }
    Ok(())
}

/// GC: release what no valid attachment holds.
pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    if !conf.at_least(1, 1) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("GC is not part of CNI {}", conf.cni_version),
        ));
    }
    let valid: Vec<Attachment> = conf.valid_attachments.clone().unwrap_or_default();
    let is_valid = |container_id: &str, ifname: &str| {
        valid
            .iter()
            .any(|a| a.container_id == container_id && a.ifname == ifname)
    };
    let store = Store::open(&conf.data_dir, &conf.name)?;
    let freed = store.retain(|e| is_valid(&e.container_id, &e.ifname))?;
    let mut withdrawn = false;
    if let Err(e) = crate::names::update(&store, |f| {
        let before = f.attachments.len();
        f.attachments
            .retain(|a| is_valid(&a.container_id, &a.ifname));
        withdrawn = f.attachments.len() != before;
    }) {
        eprintln!(
            "weft-cni: withdrawing the names of containers that are gone: {}",
            e.msg
        );
    }
    drop(store);
    if withdrawn {
        crate::names::tell_node(&conf.node_socket);
    }
    let kept = Store::open(&conf.data_dir, &conf.name)?.entries()?;
    runtime()?.block_on(async {
        let host = Netlink::here()?;
        // Every attachment gets its turn; the failures are told together.
        let mut failed = Vec::new();
        for e in &freed {
            if let Err(err) = remove_host_veth(&host, conf, &e.container_id, &e.ifname, &kept).await
            {
                failed.push(format!("{} of {}: {}", e.ifname, e.container_id, err.msg));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                Code::Io,
                format!("removing host veths: {}", failed.join("; ")),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_checks() {
        let ok = [
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(Env::read("ADD", env(&ok)).unwrap().ifname, "eth0");
        let e = Env::read(
            "ADD",
            env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]),
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (Code::InvalidEnv, "CNI_NETNS is not set")
        );
        assert!(Env::read(
            "DEL",
            env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")])
        )
        .is_ok());
        for bad in ["averyveryverylongname", "a/b", "eth 0", "..", "a:b"] {
            let v = [
                ("CNI_CONTAINERID", "abc"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", bad),
            ];
            assert_eq!(
                Env::read("ADD", env(&v)).unwrap_err().code,
                Code::InvalidEnv,
                "{bad}"
            );
        }
        let v = [
            ("CNI_CONTAINERID", "a/../b"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(
            Env::read("ADD", env(&v)).unwrap_err().code,
            Code::InvalidEnv
        );
    }

    #[test]
    fn a_missing_subnet_file_says_try_again() {
        let e = subnet_env(Path::new("/nonexistent/subnet.env")).unwrap_err();
        assert_eq!(e.code, Code::TryAgainLater);
        assert!(e.msg.contains("is weft-node running"), "{}", e.msg);
    }
}
