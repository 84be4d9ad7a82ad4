//! Network configuration for weft.
//!
//! The configuration lives in etcd under `<prefix>/config` as JSON with
//! flannel's field names, so a flannel cluster's config works unchanged:
//!
//! ```
//! use weft_config::NetworkConfig;
//!
//! let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)?;
//! let v4 = cfg.ipv4.as_ref().expect("IPv4 is on by default");
//! assert_eq!(v4.subnet_len(), 24);
//! assert_eq!(v4.subnet_min().to_string(), "10.244.1.0");
//! # Ok::<(), weft_config::ConfigError>(())
//! ```
//!
//! [`NetworkConfig::parse`] applies flannel's defaults and `CheckNetworkConfig`
//! rules; a value of [`NetworkConfig`] is therefore always valid. Field names
//! match case-insensitively (as Go's `encoding/json` does); unknown fields are
//! an error that names the field. This crate does no I/O.

mod backend;
pub mod cidr;
mod dns;
mod duration;
mod error;
mod fields;
mod network;
mod pool;
mod subnet_env;

pub use backend::{
    BackendConfig, BackendType, IpsecConfig, VxlanConfig, WireguardConfig, WireguardMode,
};
pub use dns::{
    AttachmentNames, DnsName, DnsNameError, NamesFile, DEFAULT_DNS_DOMAIN, MAX_DNS_LABEL,
    MAX_DNS_NAME, MAX_NAMES_FILE, MAX_NAMES_PER_CONTAINER, NAMES_FILE,
};
pub use duration::{format_duration, parse_duration};
pub use error::ConfigError;
pub use network::{NetworkConfig, DEFAULT_LEASE_TTL};
pub use pool::{Ipv4Pool, Ipv6Pool, SubnetPool};
pub use subnet_env::SubnetEnv;
