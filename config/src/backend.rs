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
    /// Kernel WireGuard between the nodes' public IPs.
    Wireguard,
}

impl BackendType {
    /// The name used in configs and in leases' `BackendType`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
            BackendType::Ipsec => "ipsec",
            BackendType::Wireguard => "wireguard",
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
            "wireguard" => Ok(BackendType::Wireguard),
            other => Err(format!(
                "unknown backend type {other:?} (weft supports vxlan, host-gw, ipsec and wireguard)"
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

/// Which address families a wireguard backend tunnels, and over what
/// (flannel's `Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireguardMode {
    /// One device per family: `weft-wg` carries IPv4 over IPv4,
    /// `weft-wg-v6` IPv6 over IPv6 (flannel's default).
    #[default]
    Separate,
    /// One device, `weft-wg`, for both families; peers are reached over
    /// IPv6 where they have a public IPv6 address, else over IPv4.
    Auto,
    /// One device, `weft-wg`, for both families, over IPv4.
    Ipv4,
    /// One device, `weft-wg`, for both families, over IPv6.
    Ipv6,
}

impl WireguardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WireguardMode::Separate => "separate",
            WireguardMode::Auto => "auto",
            WireguardMode::Ipv4 => "ipv4",
            WireguardMode::Ipv6 => "ipv6",
        }
    }
}

/// Options of the wireguard backend, with flannel's names and defaults.
#[derive(Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// A preshared key (`PSK`, base64 of 32 bytes) mixed into every
    /// handshake, as flannel takes it.
    pub psk: Option<[u8; 32]>,
    /// UDP port of `weft-wg` (`ListenPort`, default 51820).
    pub listen_port: u16,
    /// UDP port of `weft-wg-v6` (`ListenPortV6`, default 51821).
    pub listen_port_v6: u16,
    /// Overrides the device MTU (`MTU`); default is the underlay MTU - 80.
    pub mtu: Option<u32>,
    pub mode: WireguardMode,
    /// Seconds between keepalives to each peer (`PersistentKeepaliveInterval`,
    /// default 0: none).
    pub persistent_keepalive: u16,
}

impl fmt::Debug for WireguardConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireguardConfig")
            .field("psk", &self.psk.map(|_| "<redacted>"))
            .field("listen_port", &self.listen_port)
            .field("listen_port_v6", &self.listen_port_v6)
            .field("mtu", &self.mtu)
            .field("mode", &self.mode)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

impl Default for WireguardConfig {
    fn default() -> Self {
        WireguardConfig {
            psk: None,
            listen_port: 51820,
            listen_port_v6: 51821,
            mtu: None,
            mode: WireguardMode::Separate,
            persistent_keepalive: 0,
        }
    }
}

/// The `Backend` section, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Vxlan(VxlanConfig),
    HostGw,
    Ipsec(IpsecConfig),
    Wireguard(WireguardConfig),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Vxlan(VxlanConfig::default())
    }
}

const VXLAN_FIELDS: &[&str] = &["Type", "VNI", "Port", "DirectRouting", "MTU", "GBP"];
const HOSTGW_FIELDS: &[&str] = &["Type"];
const IPSEC_FIELDS: &[&str] = &["Type", "PSK"];
const WIREGUARD_FIELDS: &[&str] = &[
    "Type",
    "PSK",
    "ListenPort",
    "ListenPortV6",
    "MTU",
    "Mode",
    "PersistentKeepaliveInterval",
];

/// An MTU field: absent or 0 is the default; below 576 is refused.
fn mtu_field(f: &mut Fields, name: &str) -> Result<Option<u32>, ConfigError> {
    match f.uint("MTU", 65_535)? {
        None | Some(0) => Ok(None),
        Some(mtu) if mtu < 576 => Err(ConfigError::field(
            name,
            format!("{mtu} is below 576, the smallest MTU weft supports"),
        )),
        Some(mtu) => Ok(Some(mtu as u32)),
    }
}

impl BackendConfig {
    /// Which backend this is.
    pub fn backend_type(&self) -> BackendType {
        match self {
            BackendConfig::Vxlan(_) => BackendType::Vxlan,
            BackendConfig::HostGw => BackendType::HostGw,
            BackendConfig::Ipsec(_) => BackendType::Ipsec,
            BackendConfig::Wireguard(_) => BackendType::Wireguard,
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
                    "required: one of vxlan, host-gw, ipsec, wireguard",
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
                cfg.mtu = mtu_field(&mut f, "Backend.MTU")?;
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
            BackendType::Wireguard => {
                let mut f = Fields::new(
                    object,
                    "Backend.",
                    WIREGUARD_FIELDS,
                    "Type, PSK, ListenPort, ListenPortV6, MTU, Mode, PersistentKeepaliveInterval",
                )?;
                let mut cfg = WireguardConfig::default();
                if let Some(psk) = f.string("PSK")? {
                    use base64::Engine;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(psk.trim().as_bytes())
                        .map_err(|e| {
                            ConfigError::field(
                                "Backend.PSK",
                                format!("not base64 (as `wg genpsk` prints a key): {e}"),
                            )
                        })?;
                    let key: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
                        ConfigError::field(
                            "Backend.PSK",
                            format!("{} bytes; a WireGuard preshared key is 32", raw.len()),
                        )
                    })?;
                    if key == [0; 32] {
                        return Err(ConfigError::field(
                            "Backend.PSK",
                            "all zeros, which WireGuard takes as no preshared key",
                        ));
                    }
                    cfg.psk = Some(key);
                }
                match f.uint("ListenPort", 65_535)? {
                    None | Some(0) => {}
                    Some(p) => cfg.listen_port = p as u16,
                }
                match f.uint("ListenPortV6", 65_535)? {
                    None | Some(0) => {}
                    Some(p) => cfg.listen_port_v6 = p as u16,
                }
                cfg.mtu = mtu_field(&mut f, "Backend.MTU")?;
                cfg.mode = match f.string("Mode")?.as_deref() {
                    None | Some("separate") => WireguardMode::Separate,
                    Some("auto") => WireguardMode::Auto,
                    Some("ipv4") => WireguardMode::Ipv4,
                    Some("ipv6") => WireguardMode::Ipv6,
                    Some(other) => {
                        return Err(ConfigError::field(
                            "Backend.Mode",
                            format!("{other:?}: expected separate, auto, ipv4 or ipv6"),
                        ))
                    }
                };
                if let Some(s) = f.uint("PersistentKeepaliveInterval", 65_535)? {
                    cfg.persistent_keepalive = s as u16;
                }
                if cfg.mode == WireguardMode::Separate && cfg.listen_port == cfg.listen_port_v6 {
                    return Err(ConfigError::field(
                        "Backend.ListenPortV6",
                        format!(
                            "{} is also ListenPort: in separate mode the two devices need a port each",
                            cfg.listen_port_v6
                        ),
                    ));
                }
                Ok(BackendConfig::Wireguard(cfg))
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
            BackendConfig::Wireguard(w) => {
                let mut m = Map::new();
                m.insert("Type".into(), json!("wireguard"));
                if let Some(psk) = &w.psk {
                    use base64::Engine;
                    m.insert(
                        "PSK".into(),
                        json!(base64::engine::general_purpose::STANDARD.encode(psk)),
                    );
                }
                m.insert("ListenPort".into(), json!(w.listen_port));
                m.insert("ListenPortV6".into(), json!(w.listen_port_v6));
                if let Some(mtu) = w.mtu {
                    m.insert("MTU".into(), json!(mtu));
                }
                m.insert("Mode".into(), json!(w.mode.as_str()));
                m.insert(
                    "PersistentKeepaliveInterval".into(),
                    json!(w.persistent_keepalive),
                );
                Value::Object(m)
            }
        }
    }
}
