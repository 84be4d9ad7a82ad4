//! The example network configs under deploy/ are valid and mean what the
//! README says.

use weft_config::{BackendConfig, NetworkConfig};

#[test]
fn deploy_network_configs_parse() {
    let vxlan = NetworkConfig::parse(include_str!("../../deploy/network.json")).unwrap();
    assert!(matches!(vxlan.backend, BackendConfig::Vxlan(_)));
    let ipsec = NetworkConfig::parse(include_str!("../../deploy/network-ipsec.json")).unwrap();
    match ipsec.backend {
        // The PSK is a node's flag (--ipsec-psk-file), not the config's.
        BackendConfig::Ipsec(i) => assert_eq!(i.psk_file, None),
        other => panic!("{other:?}"),
    }
}
