//! Checking an acquire request against the network config: pure, so each
//! bad input has a unit test.

use crate::ControllerError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_config::{BackendType, NetworkConfig};
use weft_lease::api::AcquireRequest;
use weft_lease::{BackendData, BackendDataError, SubnetKey};

/// What a valid acquire request asks for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Wanted {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub backend: BackendData,
    pub previous: Option<SubnetKey>,
}

fn parse_ip(field: &'static str, text: &str) -> Result<IpAddr, ControllerError> {
    text.trim().parse().map_err(|_| {
        ControllerError::bad(
            "invalid_ip",
            format!("{field}: {text:?} is not an IP address"),
        )
    })
}

fn check_v4(text: &str, config: &NetworkConfig) -> Result<Ipv4Addr, ControllerError> {
    let ip = match parse_ip("public_ip", text)? {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => {
            return Err(ControllerError::bad(
                "invalid_ip",
                format!("public_ip: {text} is an IPv6 address; send it as public_ipv6"),
            ))
        }
    };
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(ControllerError::bad(
            "invalid_ip",
            format!("public_ip: {ip} is not an address other nodes can reach"),
        ));
    }
    if let Some(pool) = &config.ipv4 {
        if pool.network().contains(&ip) {
            return Err(ControllerError::bad(
                "invalid_ip",
                format!(
                    "public_ip: {ip} is inside the cluster network {}; the underlay must use other addresses",
                    pool.network()
                ),
            ));
        }
    }
    Ok(ip)
}

fn check_v6(text: &str, config: &NetworkConfig) -> Result<Ipv6Addr, ControllerError> {
    let ip = match parse_ip("public_ipv6", text)? {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(_) => {
            return Err(ControllerError::bad(
                "invalid_ip",
                format!("public_ipv6: {text} is an IPv4 address; send it as public_ip"),
            ))
        }
    };
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(ControllerError::bad(
            "invalid_ip",
            format!("public_ipv6: {ip} is not an address other nodes can reach"),
        ));
    }
    if let Some(pool) = &config.ipv6 {
        if pool.network().contains(&ip) {
            return Err(ControllerError::bad(
                "invalid_ip",
                format!(
                    "public_ipv6: {ip} is inside the cluster network {}",
                    pool.network()
                ),
            ));
        }
    }
    Ok(ip)
}

/// Validates `req` for `config`.
pub(crate) fn acquire(
    req: &AcquireRequest,
    config: &NetworkConfig,
) -> Result<Wanted, ControllerError> {
    let ipv4 = req
        .public_ip
        .as_deref()
        .map(|t| check_v4(t, config))
        .transpose()?;
    let ipv6 = req
        .public_ipv6
        .as_deref()
        .map(|t| check_v6(t, config))
        .transpose()?;
    if ipv4.is_none() && ipv6.is_none() {
        return Err(ControllerError::bad(
            "invalid_ip",
            "public_ip or public_ipv6 is required: the address other nodes reach this node on",
        ));
    }
    let backend =
        BackendData::parse(&req.backend_type, req.backend_data.as_ref()).map_err(|e| match e {
            BackendDataError::UnknownType(_) => {
                ControllerError::bad("unknown_backend", e.to_string())
            }
            BackendDataError::Invalid { .. } => {
                ControllerError::bad("invalid_backend_data", e.to_string())
            }
        })?;
    let configured: BackendType = config.backend.backend_type();
    if backend.backend_type() != configured {
        return Err(ControllerError::conflict(
            "backend_mismatch",
            format!(
                "node runs the {} backend but the network is configured for {configured}",
                backend.backend_type()
            ),
        ));
    }
    let previous = match req.previous_subnet.as_deref() {
        None | Some("") => None,
        Some(text) => Some(SubnetKey::from_cidrs(text).map_err(|e| {
            ControllerError::bad("invalid_subnet", format!("previous_subnet: {e}"))
        })?),
    };
    Ok(Wanted {
        ipv4,
        ipv6,
        backend,
        previous,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
    }

    fn req(ip: Option<&str>, ip6: Option<&str>) -> AcquireRequest {
        AcquireRequest {
            public_ip: ip.map(str::to_string),
            public_ipv6: ip6.map(str::to_string),
            backend_type: "vxlan".into(),
            backend_data: Some(json!({"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"})),
            previous_subnet: None,
        }
    }

    fn code(r: Result<Wanted, ControllerError>) -> &'static str {
        match r {
            Err(ControllerError::BadRequest { code, .. })
            | Err(ControllerError::Conflict { code, .. }) => code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_normal_request() {
        let mut r = req(Some("198.18.0.11"), None);
        r.previous_subnet = Some("10.244.3.1/24".into());
        let w = acquire(&r, &config()).unwrap();
        assert_eq!(w.ipv4, Some("198.18.0.11".parse().unwrap()));
        assert_eq!(w.previous, Some("10.244.3.0-24".parse().unwrap()));
    }

    #[test]
    fn rejects_bad_addresses() {
        let c = config();
        for bad in [
            "",
            "198.18.0",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "127.0.0.1",
            "fd77::1",
            "10.244.3.9",
        ] {
            assert_eq!(
                code(acquire(&req(Some(bad), None), &c)),
                "invalid_ip",
                "{bad}"
            );
        }
        for bad in ["::", "ff02::1", "::1", "198.18.0.1", "nonsense"] {
            assert_eq!(
                code(acquire(&req(None, Some(bad)), &c)),
                "invalid_ip",
                "{bad}"
            );
        }
        assert_eq!(code(acquire(&req(None, None), &c)), "invalid_ip");
        let msg = acquire(&req(Some("fd77::1"), None), &c)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("public_ipv6"), "{msg}");
    }

    #[test]
    fn rejects_bad_backends() {
        let c = config();
        let mut r = req(Some("198.18.0.11"), None);
        r.backend_type = "udp".into();
        assert_eq!(code(acquire(&r, &c)), "unknown_backend");
        let mut r = req(Some("198.18.0.11"), None);
        r.backend_data = Some(json!({"VNI": 1}));
        assert_eq!(code(acquire(&r, &c)), "invalid_backend_data");
        let mut r = req(Some("198.18.0.11"), None);
        r.backend_type = "host-gw".into();
        r.backend_data = None;
        assert_eq!(code(acquire(&r, &c)), "backend_mismatch");
    }

    #[test]
    fn rejects_bad_previous_subnet() {
        let mut r = req(Some("198.18.0.11"), None);
        r.previous_subnet = Some("10.244.3.0".into());
        assert_eq!(code(acquire(&r, &config())), "invalid_subnet");
    }
}
