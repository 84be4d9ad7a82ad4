//! The `Backend` section of the network config: which data plane the nodes
//! program, and its options.

use crate::fields::Fields;
use crate::ConfigError;
use serde_json::{json, Map, Value};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The data planes weft can program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendType {
    /// VXLAN overlay (`weft.<VNI>`).
    Vxlan,
    /// Plain routes via each peer's public IP; peers must share an L2.
    HostGw,
    /// ESP tunnel mode between the nodes' public IPs.
    Ipsec,
}

impl BackendType {
    /// The name used in configs and in leases' `BackendType`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
            BackendType::Ipsec => "ipsec",
        }
    }
}

impl fmt::Display for BackendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vxlan" => Ok(BackendType::Vxlan),
            "host-gw" => Ok(BackendType::HostGw),
            "ipsec" => Ok(BackendType::Ipsec),
            other => Err(format!(
                "unknown backend type {other:?} (weft supports vxlan, host-gw and ipsec)"
            )),
        }
    }
}

/// Options of the vxlan backend, with flannel's names and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// VXLAN network identifier (`VNI`, default 1).
    pub vni: u32,
    /// UDP port (`Port`, default 8472, the Linux default).
    pub port: u16,
    /// Route to peers on the same L2 directly instead of through VXLAN.
    pub direct_routing: bool,
    /// Overrides the device MTU (`MTU`); default is the underlay MTU - 50.
    pub mtu: Option<u32>,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: 1,
            port: 8472,
            direct_routing: false,
            mtu: None,
        }
    }
}

/// Options of the ipsec backend.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpsecConfig {
    /// Path of a file holding a cluster secret mixed into key derivation.
    pub psk_file: Option<PathBuf>,
}

/// The `Backend` section, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Vxlan(VxlanConfig),
    HostGw,
    Ipsec(IpsecConfig),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Vxlan(VxlanConfig::default())
    }
}

const VXLAN_FIELDS: &[&str] = &["Type", "VNI", "Port", "DirectRouting", "MTU", "GBP"];
const HOSTGW_FIELDS: &[&str] = &["Type"];
const IPSEC_FIELDS: &[&str] = &["Type", "PSK"];

impl BackendConfig {
    /// Which backend this is.
    pub fn backend_type(&self) -> BackendType {
        match self {
            BackendConfig::Vxlan(_) => BackendType::Vxlan,
            BackendConfig::HostGw => BackendType::HostGw,
            BackendConfig::Ipsec(_) => BackendType::Ipsec,
        }
    }

    pub(crate) fn from_value(value: Value) -> Result<Self, ConfigError> {
        let Value::Object(object) = value else {
            return Err(ConfigError::field(
                "Backend",
                format!("expected an object like {{\"Type\":\"vxlan\"}}, got {value}"),
            ));
        };
        let type_name = object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("Type"))
            .map(|(_, v)| v.clone());
        let backend_type = match type_name {
            None | Some(Value::Null) => {
                return Err(ConfigError::field(
                    "Backend.Type",
                    "required: one of vxlan, host-gw, ipsec",
                ))
            }
            Some(Value::String(s)) => {
                BackendType::from_str(&s).map_err(|e| ConfigError::field("Backend.Type", e))?
            }
            Some(other) => {
                return Err(ConfigError::field(
                    "Backend.Type",
                    format!("expected a string, got {other}"),
                ))
            }
        };
        match backend_type {
            BackendType::Vxlan => {
                let mut f = Fields::new(
                    object,
                    "Backend.",
                    VXLAN_FIELDS,
                    "Type, VNI, Port, DirectRouting, MTU, GBP",
                )?;
                let mut cfg = VxlanConfig::default();
                if let Some(vni) = f.uint("VNI", 0xFF_FFFF)? {
                    cfg.vni = vni as u32;
                }
                match f.uint("Port", 65_535)? {
                    None | Some(0) => {}
                    Some(port) => cfg.port = port as u16,
                }
                cfg.direct_routing = f.bool("DirectRouting")?.unwrap_or(false);
                cfg.mtu = match f.uint("MTU", 65_535)? {
                    None | Some(0) => None,
                    Some(mtu) if mtu < 576 => {
                        return Err(ConfigError::field(
                            "Backend.MTU",
                            format!("{mtu} is below 576, the smallest MTU weft supports"),
                        ))
                    }
                    Some(mtu) => Some(mtu as u32),
                };
                if f.bool("GBP")? == Some(true) {
                    return Err(ConfigError::field(
                        "Backend.GBP",
                        "VXLAN group-based policy is not supported by weft",
                    ));
                }
                Ok(BackendConfig::Vxlan(cfg))
            }
            BackendType::HostGw => {
                Fields::new(object, "Backend.", HOSTGW_FIELDS, "Type")?;
                Ok(BackendConfig::HostGw)
            }
            BackendType::Ipsec => {
                let mut f = Fields::new(object, "Backend.", IPSEC_FIELDS, "Type, PSK")?;
                let psk_file = match f.string("PSK")? {
                    None => None,
                    Some(p) if p.starts_with('/') && !p.contains('\0') => Some(PathBuf::from(p)),
                    Some(p) => {
                        return Err(ConfigError::field(
                            "Backend.PSK",
                            format!("expected an absolute path to a file holding the cluster secret, got {p:?}"),
                        ))
                    }
                };
                Ok(BackendConfig::Ipsec(IpsecConfig { psk_file }))
            }
        }
    }

    /// The section as flannel-style JSON, with every default spelled out.
    pub fn to_json(&self) -> Value {
        match self {
            BackendConfig::Vxlan(v) => {
                let mut m = Map::new();
                m.insert("Type".into(), json!("vxlan"));
                m.insert("VNI".into(), json!(v.vni));
                m.insert("Port".into(), json!(v.port));
                m.insert("DirectRouting".into(), json!(v.direct_routing));
                if let Some(mtu) = v.mtu {
                    m.insert("MTU".into(), json!(mtu));
                }
                Value::Object(m)
            }
            BackendConfig::HostGw => json!({"Type": "host-gw"}),
            BackendConfig::Ipsec(i) => match &i.psk_file {
                Some(p) => json!({"Type": "ipsec", "PSK": p}),
                None => json!({"Type": "ipsec"}),
            },
        }
    }
}
