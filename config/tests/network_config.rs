//! Config defaults and validation, including flannel's own test cases
//! (`pkg/subnet/config_test.go`) so configs behave as they do under flannel.

use std::time::Duration;
use weft_config::{BackendConfig, BackendType, ConfigError, NetworkConfig, VxlanConfig};

fn field_error(text: &str) -> (String, String) {
    match NetworkConfig::parse(text) {
        Err(ConfigError::Field { field, reason }) => (field, reason),
        other => panic!("expected a field error for {text}, got {other:?}"),
    }
}

#[test]
fn flannel_defaults() {
    let cfg = NetworkConfig::parse(r#"{ "network": "10.3.0.0/16" }"#).unwrap();
    let v4 = cfg.ipv4.unwrap();
    assert_eq!(v4.network().to_string(), "10.3.0.0/16");
    assert_eq!(v4.subnet_min().to_string(), "10.3.1.0");
    assert_eq!(v4.subnet_max().to_string(), "10.3.255.0");
    assert_eq!(v4.subnet_len(), 24);
    assert!(cfg.ipv6.is_none());
    assert_eq!(cfg.backend, BackendConfig::Vxlan(VxlanConfig::default()));
    assert_eq!(cfg.lease_ttl, Duration::from_secs(86_400));
}

#[test]
fn flannel_ipv6_defaults() {
    let cfg = NetworkConfig::parse(
        r#"{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }"#,
    )
    .unwrap();
    assert!(cfg.ipv4.is_none());
    let v6 = cfg.ipv6.unwrap();
    assert_eq!(v6.network().to_string(), "fc00::/48");
    assert_eq!(v6.subnet_min().to_string(), "fc00:0:0:1::");
    assert_eq!(v6.subnet_max().to_string(), "fc00:0:0:ffff::");
    assert_eq!(v6.subnet_len(), 64);
}

#[test]
fn flannel_overrides() {
    let cfg = NetworkConfig::parse(
        r#"{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0", "SubnetLen": 28 }"#,
    )
    .unwrap();
    let v4 = cfg.ipv4.unwrap();
    assert_eq!(v4.subnet_min().to_string(), "10.3.5.0");
    assert_eq!(v4.subnet_max().to_string(), "10.3.8.0");
    assert_eq!(v4.subnet_len(), 28);
    // 10.3.5.0 ..= 10.3.8.0 in steps of 16 addresses.
    assert_eq!(v4.len(), (8 - 5) * 16 + 1);
}

#[test]
fn flannel_ipv6_overrides() {
    let cfg = NetworkConfig::parse(
        r#"{ "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::",
             "IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false }"#,
    )
    .unwrap();
    let v6 = cfg.ipv6.unwrap();
    assert_eq!(v6.subnet_min().to_string(), "fc00:0:0:1::");
    assert_eq!(v6.subnet_max().to_string(), "fc00:0:0:f::");
    assert_eq!(v6.subnet_len(), 124);
}

#[test]
fn dual_stack_defaults_and_pair_count() {
    let cfg = NetworkConfig::parse(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd77::/56"}"#,
    )
    .unwrap();
    assert_eq!(cfg.ipv4.unwrap().len(), 255);
    assert_eq!(cfg.ipv6.unwrap().len(), 255);
    assert_eq!(cfg.subnet_count(), 255);
}

#[test]
fn subnet_len_defaults_for_small_networks() {
    // /22 or shorter: /24 per node.
    let v4 = NetworkConfig::parse(r#"{"Network":"10.0.0.0/22"}"#)
        .unwrap()
        .ipv4
        .unwrap();
    assert_eq!((v4.subnet_len(), v4.len()), (24, 3));
    // Smaller: split into four, skip the first.
    let v4 = NetworkConfig::parse(r#"{"Network":"10.0.0.0/26"}"#)
        .unwrap()
        .ipv4
        .unwrap();
    assert_eq!((v4.subnet_len(), v4.len()), (28, 3));
    let v4 = NetworkConfig::parse(r#"{"Network":"10.0.0.0/28"}"#)
        .unwrap()
        .ipv4
        .unwrap();
    assert_eq!((v4.subnet_len(), v4.len()), (30, 3));
}

#[test]
fn invalid_sizes_are_rejected_with_the_field() {
    let (field, reason) = field_error(r#"{"Network":"10.0.0.0/29"}"#);
    assert_eq!(field, "Network");
    assert!(reason.contains("too small"), "{reason}");

    let (field, reason) = field_error(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#);
    assert_eq!(field, "SubnetLen");
    assert!(reason.contains("/30"), "{reason}");

    let (field, reason) = field_error(r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#);
    assert_eq!(field, "SubnetLen");
    assert!(reason.contains("at least four subnets"), "{reason}");

    let (field, _) =
        field_error(r#"{"EnableIPv6":true,"IPv6Network":"fc00::/125","EnableIPv4":false}"#);
    assert_eq!(field, "IPv6Network");
    let (field, _) = field_error(
        r#"{"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127,"EnableIPv4":false}"#,
    );
    assert_eq!(field, "IPv6SubnetLen");
}

#[test]
fn bounds_must_be_inside_and_aligned() {
    let (field, reason) = field_error(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.4.0.0"}"#);
    assert_eq!(field, "SubnetMin");
    assert!(reason.contains("outside"), "{reason}");
    let (field, reason) = field_error(r#"{"Network":"10.3.0.0/16","SubnetMax":"10.3.8.7"}"#);
    assert_eq!(field, "SubnetMax");
    assert!(reason.contains("boundary"), "{reason}");
    let (field, _) =
        field_error(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.9.0","SubnetMax":"10.3.8.0"}"#);
    assert_eq!(field, "SubnetMin");
}

#[test]
fn missing_network_and_families() {
    let (field, reason) = field_error(r#"{"SubnetLen":24}"#);
    assert_eq!(field, "Network");
    assert!(reason.contains("required"), "{reason}");
    let (field, _) = field_error(r#"{"EnableIPv4":false}"#);
    assert_eq!(field, "EnableIPv4");
    let (field, _) = field_error(r#"{"EnableIPv4":false,"EnableIPv6":true}"#);
    assert_eq!(field, "IPv6Network");
    let (field, reason) = field_error(r#"{"Network":"fc00::/48"}"#);
    assert_eq!(field, "Network");
    assert!(reason.contains("IPv4 CIDR"), "{reason}");
}

#[test]
fn unknown_and_duplicate_fields_are_errors() {
    match NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","Netwrok":"x"}"#) {
        Err(ConfigError::UnknownField { field, .. }) => assert_eq!(field, "Netwrok"),
        other => panic!("{other:?}"),
    }
    match NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan","VNl":2}}"#) {
        Err(ConfigError::UnknownField { field, .. }) => assert_eq!(field, "Backend.VNl"),
        other => panic!("{other:?}"),
    }
    match NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","network":"10.4.0.0/16"}"#) {
        Err(ConfigError::DuplicateField { field }) => assert_eq!(field, "Network"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        NetworkConfig::parse("not json"),
        Err(ConfigError::Syntax(_))
    ));
    assert!(matches!(
        NetworkConfig::parse("[1,2]"),
        Err(ConfigError::Syntax(_))
    ));
}

#[test]
fn backends_and_their_options() {
    let cfg = NetworkConfig::parse(
        r#"{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true}}"#,
    )
    .unwrap();
    assert_eq!(
        cfg.backend,
        BackendConfig::Vxlan(VxlanConfig {
            vni: 42,
            port: 4789,
            direct_routing: true,
            mtu: None
        })
    );
    let cfg =
        NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
    assert_eq!(cfg.backend.backend_type(), BackendType::HostGw);
    let cfg = NetworkConfig::parse(
        r#"{"Network":"10.3.0.0/16","Backend":{"Type":"ipsec","PSK":"/etc/weft/psk"}}"#,
    )
    .unwrap();
    assert_eq!(cfg.backend.backend_type(), BackendType::Ipsec);

    let (field, reason) = field_error(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"udp"}}"#);
    assert_eq!(field, "Backend.Type");
    assert!(reason.contains("udp"), "{reason}");
    let (field, _) = field_error(r#"{"Network":"10.3.0.0/16","Backend":{"VNI":1}}"#);
    assert_eq!(field, "Backend.Type");
    let (field, _) =
        field_error(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#);
    assert_eq!(field, "Backend.VNI");
    let (field, _) =
        field_error(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan","VNI":"1"}}"#);
    assert_eq!(field, "Backend.VNI");
    let (field, _) =
        field_error(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"ipsec","PSK":"relative"}}"#);
    assert_eq!(field, "Backend.PSK");
    let (field, _) = field_error(r#"{"Network":"10.3.0.0/16","Backend":"vxlan"}"#);
    assert_eq!(field, "Backend");
}

#[test]
fn lease_ttl() {
    let cfg = NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","LeaseTTL":"1h30m"}"#).unwrap();
    assert_eq!(cfg.lease_ttl, Duration::from_secs(5400));
    for bad in [r#""1s""#, r#""1500ms""#, r#""soon""#, "60"] {
        let (field, _) = field_error(&format!(r#"{{"Network":"10.3.0.0/16","LeaseTTL":{bad}}}"#));
        assert_eq!(field, "LeaseTTL", "{bad}");
    }
}

#[test]
fn host_bits_are_dropped_like_flannel() {
    let cfg = NetworkConfig::parse(r#"{"Network":"10.3.7.9/16"}"#).unwrap();
    assert_eq!(cfg.ipv4.unwrap().network().to_string(), "10.3.0.0/16");
}

#[test]
fn effective_json_round_trips() {
    for text in [
        r#"{"Network":"10.244.0.0/16"}"#,
        r#"{"Network":"10.244.0.0/16","SubnetLen":26,"Backend":{"Type":"host-gw"},"LeaseTTL":"90s"}"#,
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd77::/48","Backend":{"Type":"vxlan","MTU":1400}}"#,
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd77::/48","Backend":{"Type":"ipsec","PSK":"/x"}}"#,
    ] {
        let cfg = NetworkConfig::parse(text).unwrap();
        let again = NetworkConfig::from_value(cfg.to_json()).unwrap();
        assert_eq!(cfg, again, "{text}");
    }
    let json = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#)
        .unwrap()
        .to_json();
    assert_eq!(json["SubnetMin"], "10.244.1.0");
    assert_eq!(json["Backend"]["Port"], 8472);
    assert_eq!(json["LeaseTTL"], "24h");
}

#[test]
fn dns_domain_defaults_to_weft_and_must_be_a_name() {
    let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
    assert_eq!(cfg.dns_domain.as_str(), "weft");
    assert_eq!(cfg.to_json()["DNSDomain"], "weft");
    let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","DNSDomain":"Cluster.Example"}"#)
        .unwrap();
    assert_eq!(cfg.dns_domain.as_str(), "cluster.example");
    assert_eq!(NetworkConfig::from_value(cfg.to_json()).unwrap(), cfg);
    for bad in ["", "weft.", "a_b", "-x"] {
        let text = format!(r#"{{"Network":"10.244.0.0/16","DNSDomain":{bad:?}}}"#);
        let e = NetworkConfig::parse(&text).unwrap_err();
        assert_eq!(e.field_name(), Some("DNSDomain"), "{bad:?}: {e}");
    }
}

#[test]
fn flannel_enable_nftables_is_accepted() {
    let cfg = NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","EnableNFTables":true}"#).unwrap();
    assert!(cfg.enable_nftables);
}

#[test]
fn the_example_config_in_deploy_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/network.json");
    let text = std::fs::read_to_string(path).unwrap();
    let cfg = NetworkConfig::parse(&text).unwrap();
    assert_eq!(cfg.ipv4.unwrap().network().to_string(), "10.244.0.0/16");
}

/// CIDR text is read as flannel (Go's `net.ParseCIDR`) reads it: an address,
/// a slash and a decimal prefix length. Forms Go refuses are refused too, so
/// flannel and weft nodes sharing a keyspace never disagree about which
/// network a stored config names. (These are the forms the `ipnetwork`
/// crate accepts; README's Development section says why weft uses `ipnet`.)
#[test]
fn cidr_text_is_read_as_flannel_reads_it() {
    for (text, why) in [
        ("10.244.0.0", "no prefix length (not a /32)"),
        ("10.244.0.0/255.255.0.0", "a netmask instead of a length"),
        ("10.244.0.0/+16", "a sign"),
        ("10.244.0.0/ 16", "a space"),
        ("10.244.0.0/33", "too long"),
        ("010.244.0.0/16", "an octet with a leading zero"),
    ] {
        let (field, _) = field_error(&format!(r#"{{"Network":"{text}"}}"#));
        assert_eq!(field, "Network", "{text}: {why}");
    }
    for (text, why) in [("fc00::", "no prefix length"), ("fc00::/+48", "a sign")] {
        let (field, _) = field_error(&format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{text}"}}"#
        ));
        assert_eq!(field, "IPv6Network", "{text}: {why}");
    }
    // What Go takes, weft takes: leading zeros in the length.
    let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/016"}"#).unwrap();
    assert_eq!(cfg.ipv4.unwrap().network().to_string(), "10.244.0.0/16");
    // Host bits are dropped, as Go's ParseCIDR does, and the subnets of the
    // network are then inside it.
    let cfg = NetworkConfig::parse(r#"{"Network":"10.244.5.1/16"}"#).unwrap();
    let v4 = cfg.ipv4.unwrap();
    assert_eq!(v4.network().to_string(), "10.244.0.0/16");
    assert!(v4.contains(&"10.244.1.0/24".parse().unwrap()));
}

/// Found by fuzzing (fuzz/regressions/network_config): an IPv6 network at
/// the end of the address space overflowed computing its last subnet.
#[test]
fn a_network_at_the_end_of_the_address_space() {
    let c = NetworkConfig::parse(
        r#"{"EnableIPv6":true,"Network":"20.244.0.0/6","IPv6Network":"fd10:7::7/4","IPv6SubnetLen":99}"#,
    )
    .unwrap();
    let p = c.ipv6.as_ref().unwrap();
    assert_eq!(p.network().to_string(), "f000::/4");
    assert_eq!(
        p.subnet_max().to_string(),
        "ffff:ffff:ffff:ffff:ffff:ffff:e000:0"
    );
    let c = NetworkConfig::parse(r#"{"Network":"255.0.0.0/8","SubnetLen":24}"#).unwrap();
    assert_eq!(
        c.ipv4.as_ref().unwrap().subnet_max().to_string(),
        "255.255.255.0"
    );
}
