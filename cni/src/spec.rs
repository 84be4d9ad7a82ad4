//! The CNI specification's types: network configuration in, results and
//! errors out, with the differences between spec versions.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use weft_config::cidr;

/// Versions this plugin speaks.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes from the CNI specification (100 and up are ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// The interface name is taken in the container, or the host side's
    /// name by a link that is not this attachment's.
    InterfaceExists = 100,
    /// The node's subnet has no free address.
    NoFreeAddress = 101,
    /// CHECK found the attachment different from what was set up.
    CheckFailed = 102,
}

/// A CNI error: printed as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
        }
    }

    /// The error JSON for `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code as u32, "msg": self.msg})
    }
}

/// An attachment the runtime still uses (for GC).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

fn default_subnet_file() -> PathBuf {
    PathBuf::from("/run/weft/subnet.env")
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/cni/networks")
}

fn default_bridge() -> String {
    "weft0".into()
}

fn yes() -> bool {
    true
}

fn default_node_socket() -> PathBuf {
    PathBuf::from("/run/weft/node.sock")
}

/// Per-container arguments a runtime puts in the network config itself
/// (the CNI conventions' `args`), as far as weft-cni uses them:
/// `{"args": {"cni": {"aliases": ["web"]}}}`, for runtimes that pass
/// neither capabilities nor `CNI_ARGS` (containerd's `ctr run --cni`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfArgs {
    #[serde(default)]
    pub cni: CniConfArgs,
}

/// The `cni` part of [`ConfArgs`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CniConfArgs {
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// What the runtime passes per container (`runtimeConfig`), as far as
/// weft-cni uses it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    /// The `aliases` capability: names per network.
    #[serde(default)]
    pub aliases: std::collections::HashMap<String, Vec<String>>,
}

/// The network configuration on standard input. Fields the plugin does not
/// know (runtime settings, other plugins' options) are ignored, as the
/// spec asks.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(default = "default_subnet_file")]
    pub subnet_file: PathBuf,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// Default route via the bridge (else only the cluster network).
    #[serde(default = "yes")]
    pub is_default_gateway: bool,
    #[serde(default = "yes")]
    pub hairpin_mode: bool,
    /// Overrides subnet.env's MTU.
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub args: ConfArgs,
    /// weft-node's control socket, told when names change.
    #[serde(default = "default_node_socket")]
    pub node_socket: PathBuf,
}

/// A valid network name: also a directory name under `dataDir`.
pub fn check_name(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            Code::InvalidConfig,
            format!("network name {name:?} is invalid: use letters, digits, '_', '.', '-', starting with a letter or digit"),
        ))
    }
}

impl NetConf {
    /// Parses the configuration and checks what every command needs.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("network configuration is not valid: {e}"),
            )
        })?;
        if !SUPPORTED.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {:?} is not supported (supported: {})",
                    conf.cni_version,
                    SUPPORTED.join(", ")
                ),
            ));
        }
        check_name(&conf.name)?;
        if conf.bridge.is_empty() || conf.bridge.len() > 15 || conf.bridge.contains('/') {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!(
                    "bridge name {:?} is not a valid interface name",
                    conf.bridge
                ),
            ));
        }
        Ok(conf)
    }

    /// Whether the configuration's version is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        let mut parts = self
            .cni_version
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (a, b) >= (major, minor)
    }
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: IpAddr,
    /// Index into `interfaces`.
    pub interface: usize,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// A plugin's result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    /// Whatever an earlier plugin in the chain put in `dns`.
    pub dns: Value,
}

impl CniResult {
    /// The result JSON in the shape of `version`: before 1.0.0 each
    /// address carries `"version": "4"`.
    pub fn to_json(&self, version: &str) -> Value {
        let old = version.starts_with("0.");
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({"address": ip.address.to_string(), "gateway": ip.gateway.to_string(), "interface": ip.interface});
                if old {
                    v["version"] = json!(if ip.address.addr().is_ipv4() { "4" } else { "6" });
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| match r.gw {
                Some(gw) => json!({"dst": r.dst.to_string(), "gw": gw.to_string()}),
                None => json!({"dst": r.dst.to_string()}),
            })
            .collect();
        json!({
            "cniVersion": version,
            "interfaces": self.interfaces,
            "ips": ips,
            "routes": routes,
            "dns": if self.dns.is_null() { json!({}) } else { self.dns.clone() },
        })
    }

    /// Reads a previous result (any supported version), both families;
    /// fields we do not use are left out.
    pub fn from_json(v: &Value) -> Result<Self, CniError> {
        let bad = |what: &str| CniError::new(Code::Decode, format!("prevResult: {what}"));
        let interfaces: Vec<Interface> = match v.get("interfaces") {
            None | Some(Value::Null) => Vec::new(),
            Some(i) => serde_json::from_value(i.clone()).map_err(|e| bad(&e.to_string()))?,
        };
        let mut ips = Vec::new();
        for ip in v.get("ips").and_then(Value::as_array).into_iter().flatten() {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("an ip without address"))?;
            let Some(address) = parse_net(address) else {
                continue;
            };
            let unspecified = match address {
                IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let gateway = ip
                .get("gateway")
                .and_then(Value::as_str)
                .and_then(|g| g.parse::<IpAddr>().ok())
                .filter(|g| g.is_ipv4() == address.addr().is_ipv4())
                .unwrap_or(unspecified);
            let interface = ip.get("interface").and_then(Value::as_u64).unwrap_or(0) as usize;
            ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
        let mut routes = Vec::new();
        for r in v
            .get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(dst) = r.get("dst").and_then(Value::as_str).and_then(parse_net) else {
                continue;
            };
            let gw = match r.get("gw").and_then(Value::as_str) {
                None => None,
                Some(g) => match g.parse::<IpAddr>() {
                    Ok(g) if g.is_ipv4() == dst.addr().is_ipv4() => Some(g),
                    _ => return Err(bad(&format!("route to {dst} via {g:?}"))),
                },
            };
            routes.push(Route { dst, gw });
        }
        Ok(CniResult {
            interfaces,
            ips,
            routes,
            // `{}` is how an empty dns section is written.
            dns: v
                .get("dns")
                .cloned()
                .filter(|d| d.as_object().is_none_or(|o| !o.is_empty()))
                .unwrap_or(Value::Null),
        })
    }
}

/// A CIDR of either family, as CNI results write them.
fn parse_net(text: &str) -> Option<IpNet> {
    cidr::parse_v4(text)
        .map(IpNet::V4)
        .or_else(|| cidr::parse_v6(text).map(IpNet::V6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "weft0".into(),
                    mac: "02:77:00:00:00:01".into(),
                    sandbox: None,
                },
                Interface {
                    name: "veth1".into(),
                    mac: "02:00:00:00:00:02".into(),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:03".into(),
                    sandbox: Some("/run/netns/c1".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.3.5/24".parse().unwrap(),
                gateway: "10.244.3.1".parse().unwrap(),
                interface: 2,
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.3.1".parse().unwrap()),
            }],
            dns: Value::Null,
        }
    }

    #[test]
    fn results_take_the_shape_of_the_version() {
        let r = sample();
        let v1 = r.to_json("1.0.0");
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert_eq!(v1["ips"][0]["address"], "10.244.3.5/24");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["interfaces"][2]["sandbox"], "/run/netns/c1");
        assert!(v1["interfaces"][0].get("sandbox").is_none());
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(CniResult::from_json(&v04).unwrap(), r);
        assert_eq!(CniResult::from_json(&v1).unwrap(), r);
    }

    #[test]
    fn the_deploy_conflist_gives_the_documented_defaults() {
        // A runtime hands each plugin its entry with the list's cniVersion
        // and name added.
        let list: Value =
            serde_json::from_str(include_str!("../../deploy/10-weft.conflist")).unwrap();
        let mut entry = list["plugins"][0].clone();
        entry["cniVersion"] = list["cniVersion"].clone();
        entry["name"] = list["name"].clone();
        let c = NetConf::parse(entry.to_string().as_bytes()).unwrap();
        assert_eq!(c.name, "weft");
        assert_eq!(c.subnet_file, default_subnet_file());
        assert_eq!(c.data_dir, default_data_dir());
        assert_eq!(c.bridge, default_bridge());
        assert!(c.is_default_gateway && c.hairpin_mode);
        assert_eq!(list["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn config_parsing_and_errors() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","runtimeConfig":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(c.bridge, "weft0");
        assert_eq!(c.subnet_file, PathBuf::from("/run/weft/subnet.env"));
        assert!(c.is_default_gateway && c.hairpin_mode);
        assert!(c.at_least(1, 0) && !c.at_least(1, 1));
        let e = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, Code::Decode);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"weft","type":"weft-cni"}"#)
            .unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        for bad in ["", "../etc", "a/b", ".hidden", "x..y"] {
            let text = format!(r#"{{"cniVersion":"1.0.0","name":"{bad}","type":"weft-cni"}}"#);
            assert_eq!(
                NetConf::parse(text.as_bytes()).unwrap_err().code,
                Code::InvalidConfig,
                "{bad}"
            );
        }
        let e = CniError::new(Code::NoFreeAddress, "full");
        assert_eq!(
            e.to_json("0.4.0"),
            json!({"cniVersion":"0.4.0","code":101,"msg":"full"})
        );
    }
}
