//! The network config as a whole: parsing, flannel's defaults and checks.

use crate::backend::BackendConfig;
use crate::cidr;
use crate::dns::{DnsName, DEFAULT_DNS_DOMAIN};
use crate::duration::{format_duration, parse_duration};
use crate::fields::Fields;
use crate::pool::{Family, Ipv4Pool, Ipv6Pool, SubnetPool, V4, V6};
use crate::ConfigError;
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// Lease TTL when the config does not set `LeaseTTL` (flannel's 24h).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// etcd does not grant leases shorter than about two seconds.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// etcd's largest lease TTL.
const MAX_LEASE_TTL: Duration = Duration::from_secs(9_000_000_000);

const FIELDS: &[&str] = &[
    "EnableIPv4",
    "EnableIPv6",
    "EnableNFTables",
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "Backend",
    "LeaseTTL",
    "DNSDomain",
];
const FIELDS_TEXT: &str = "EnableIPv4, EnableIPv6, EnableNFTables, Network, SubnetLen, SubnetMin, \
SubnetMax, IPv6Network, IPv6SubnetLen, IPv6SubnetMin, IPv6SubnetMax, Backend, LeaseTTL, DNSDomain";

/// A validated network configuration with all defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The IPv4 pool, when `EnableIPv4` (the default).
    pub ipv4: Option<Ipv4Pool>,
    /// The IPv6 pool, when `EnableIPv6`.
    pub ipv6: Option<Ipv6Pool>,
    /// The data plane and its options.
    pub backend: BackendConfig,
    /// How long a lease lives without renewal.
    pub lease_ttl: Duration,
    /// flannel's `EnableNFTables`; weft always uses nftables, kept so that
    /// flannel configs load unchanged.
    pub enable_nftables: bool,
    /// weft's `DNSDomain`: container names are served as `<name>.<domain>`
    /// (default `weft`; flannel ignores the field).
    pub dns_domain: DnsName,
}

/// The raw, per-family fields before defaults.
struct FamilyFields<A, N> {
    network: Option<N>,
    subnet_len: Option<u64>,
    min: Option<A>,
    max: Option<A>,
}

/// The names of one family's fields, for error messages.
struct Names {
    network: &'static str,
    subnet_len: &'static str,
    min: &'static str,
    max: &'static str,
    max_subnet_len: u8,
    min_useful_prefix: u8,
    default_len: u8,
}

const V4_NAMES: Names = Names {
    network: "Network",
    subnet_len: "SubnetLen",
    min: "SubnetMin",
    max: "SubnetMax",
    max_subnet_len: 30,
    min_useful_prefix: 28,
    default_len: 24,
};

const V6_NAMES: Names = Names {
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    min: "IPv6SubnetMin",
    max: "IPv6SubnetMax",
    max_subnet_len: 126,
    min_useful_prefix: 124,
    default_len: 64,
};

impl NetworkConfig {
    /// Parses and validates config text as stored in etcd.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        Self::from_value(value)
    }

    /// Validates an already-parsed JSON value.
    pub fn from_value(value: Value) -> Result<Self, ConfigError> {
        let Value::Object(object) = value else {
            return Err(ConfigError::Syntax(format!(
                "expected a JSON object, got {value}"
            )));
        };
        let mut f = Fields::new(object, "", FIELDS, FIELDS_TEXT)?;
        let enable_ipv4 = f.bool("EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = f.bool("EnableIPv6")?.unwrap_or(false);
        let enable_nftables = f.bool("EnableNFTables")?.unwrap_or(false);
        let v4 = FamilyFields::<std::net::Ipv4Addr, Ipv4Net> {
            network: f.parsed_with(
                "Network",
                "an IPv4 CIDR such as 10.244.0.0/16",
                cidr::parse_v4,
            )?,
            subnet_len: f.uint("SubnetLen", 32)?,
            min: f.parsed("SubnetMin", "an IPv4 address")?,
            max: f.parsed("SubnetMax", "an IPv4 address")?,
        };
        let v6 = FamilyFields::<std::net::Ipv6Addr, Ipv6Net> {
            network: f.parsed_with(
                "IPv6Network",
                "an IPv6 CIDR such as fd77::/48",
                cidr::parse_v6,
            )?,
            subnet_len: f.uint("IPv6SubnetLen", 128)?,
            min: f.parsed("IPv6SubnetMin", "an IPv6 address")?,
            max: f.parsed("IPv6SubnetMax", "an IPv6 address")?,
        };
        let backend = match f.take("Backend") {
            None => BackendConfig::default(),
            Some(v) => BackendConfig::from_value(v)?,
        };
        let lease_ttl = match f.string("LeaseTTL")? {
            None => DEFAULT_LEASE_TTL,
            Some(s) => parse_lease_ttl(&s)?,
        };
        let dns_domain = match f.string("DNSDomain")? {
            None => DEFAULT_DNS_DOMAIN
                .parse()
                .expect("the default domain is a name"),
            Some(s) => s
                .parse()
                .map_err(|e: crate::DnsNameError| ConfigError::field("DNSDomain", e.to_string()))?,
        };
        if !enable_ipv4 && !enable_ipv6 {
            return Err(ConfigError::field(
                "EnableIPv4",
                "at least one of EnableIPv4 and EnableIPv6 must be true",
            ));
        }
        let ipv4 = if enable_ipv4 {
            Some(build_pool::<V4>(
                v4,
                &V4_NAMES,
                "EnableIPv4 is true (the default)",
            )?)
        } else {
            None
        };
        let ipv6 = if enable_ipv6 {
            Some(build_pool::<V6>(v6, &V6_NAMES, "EnableIPv6 is true")?)
        } else {
            None
        };
        Ok(NetworkConfig {
            ipv4,
            ipv6,
            backend,
            lease_ttl,
            enable_nftables,
            dns_domain,
        })
    }

    /// The effective config as flannel-style JSON, with every default spelled out.
    /// Parsing the result gives back an equal config.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("EnableIPv4".into(), json!(self.ipv4.is_some()));
        if let Some(p) = &self.ipv4 {
            m.insert("Network".into(), json!(p.network().to_string()));
            m.insert("SubnetLen".into(), json!(p.subnet_len()));
            m.insert("SubnetMin".into(), json!(p.subnet_min().to_string()));
            m.insert("SubnetMax".into(), json!(p.subnet_max().to_string()));
        }
        m.insert("EnableIPv6".into(), json!(self.ipv6.is_some()));
        if let Some(p) = &self.ipv6 {
            m.insert("IPv6Network".into(), json!(p.network().to_string()));
            m.insert("IPv6SubnetLen".into(), json!(p.subnet_len()));
            m.insert("IPv6SubnetMin".into(), json!(p.subnet_min().to_string()));
            m.insert("IPv6SubnetMax".into(), json!(p.subnet_max().to_string()));
        }
        if self.enable_nftables {
            m.insert("EnableNFTables".into(), json!(true));
        }
        m.insert("Backend".into(), self.backend.to_json());
        m.insert("LeaseTTL".into(), json!(format_duration(self.lease_ttl)));
        m.insert("DNSDomain".into(), json!(self.dns_domain.as_str()));
        Value::Object(m)
    }

    /// How many node subnets the network holds (pairs, when dual-stack).
    pub fn subnet_count(&self) -> u128 {
        match (&self.ipv4, &self.ipv6) {
            (Some(a), Some(b)) => a.len().min(b.len()),
            (Some(a), None) => a.len(),
            (None, Some(b)) => b.len(),
            (None, None) => 0,
        }
    }
}

fn parse_lease_ttl(text: &str) -> Result<Duration, ConfigError> {
    let ttl = parse_duration(text).map_err(|e| ConfigError::field("LeaseTTL", e))?;
    if ttl.subsec_nanos() != 0 {
        return Err(ConfigError::field(
            "LeaseTTL",
            format!("{text:?} is not a whole number of seconds (etcd leases count seconds)"),
        ));
    }
    if ttl < MIN_LEASE_TTL || ttl > MAX_LEASE_TTL {
        return Err(ConfigError::field(
            "LeaseTTL",
            format!(
                "{text:?} is outside {}..={} (use a reservation for a subnet that never expires)",
                format_duration(MIN_LEASE_TTL),
                format_duration(MAX_LEASE_TTL)
            ),
        ));
    }
    Ok(ttl)
}

/// flannel's `CheckNetworkConfig` for one address family.
fn build_pool<N: Family>(
    raw: FamilyFields<N::Addr, N::Net>,
    names: &Names,
    enabled_by: &str,
) -> Result<SubnetPool<N>, ConfigError> {
    let network = raw
        .network
        .ok_or_else(|| ConfigError::field(names.network, format!("required when {enabled_by}")))?;
    let prefix = N::net_len(&network);
    // Host bits are dropped, as flannel does when it parses the CIDR.
    let network = N::net(
        N::from_bits(N::to_bits(N::net_addr(&network)) & mask::<N>(prefix)),
        prefix,
    );
    if prefix == 0 {
        return Err(ConfigError::field(
            names.network,
            format!("{network} spans the whole address space; pick a private range"),
        ));
    }
    let subnet_len = match raw.subnet_len {
        Some(len) if len > 0 => {
            let len = len as u8;
            if len > names.max_subnet_len {
                return Err(ConfigError::field(
                    names.subnet_len,
                    format!(
                        "/{len} leaves no room for a gateway and pods; use /{} or shorter",
                        names.max_subnet_len
                    ),
                ));
            }
            if len < prefix.saturating_add(2) {
                return Err(ConfigError::field(
                    names.subnet_len,
                    format!(
                        "/{len} is too short for {network}: the network must hold at least four subnets (SubnetLen >= /{})",
                        prefix + 2
                    ),
                ));
            }
            len
        }
        _ => {
            if prefix > names.min_useful_prefix {
                return Err(ConfigError::field(
                    names.network,
                    format!(
                        "{network} is too small; the smallest useful network is a /{}",
                        names.min_useful_prefix
                    ),
                ));
            } else if prefix <= names.default_len - 2 {
                names.default_len
            } else {
                prefix + 2
            }
        }
    };
    let size: u128 = 1u128 << (N::BITS - subnet_len);
    let net_bits = N::to_bits(N::net_addr(&network));
    let net_last = net_bits | !mask::<N>(prefix) & full::<N>();
    let inside = |a: N::Addr| {
        let b = N::to_bits(a);
        b >= net_bits && b <= net_last
    };
    let aligned = |a: N::Addr| N::to_bits(a) & (size - 1) == 0;
    let min = match raw.min {
        None => N::from_bits(net_bits + size),
        Some(a) if !inside(a) => {
            return Err(ConfigError::field(
                names.min,
                format!("{a} is outside {}", names.network),
            ))
        }
        Some(a) => a,
    };
    let max = match raw.max {
        // (Not net_last + 1 - size: the last IPv6 network ends at 2^128 - 1.)
        None => N::from_bits(net_last - (size - 1)),
        Some(a) if !inside(a) => {
            return Err(ConfigError::field(
                names.max,
                format!("{a} is outside {}", names.network),
            ))
        }
        Some(a) => a,
    };
    for (name, a) in [(names.min, min), (names.max, max)] {
        if !aligned(a) {
            return Err(ConfigError::field(
                name,
                format!("{a} is not on a /{subnet_len} boundary"),
            ));
        }
    }
    if N::to_bits(min) > N::to_bits(max) {
        return Err(ConfigError::field(
            names.min,
            format!("{min} is above {} {max}", names.max),
        ));
    }
    Ok(SubnetPool::new_unchecked(network, subnet_len, min, max))
}

fn full<N: Family>() -> u128 {
    if N::BITS == 128 {
        u128::MAX
    } else {
        (1u128 << N::BITS) - 1
    }
}

fn mask<N: Family>(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        full::<N>() & !((1u128 << (N::BITS - prefix)).wrapping_sub(1)) & full::<N>()
    }
}
