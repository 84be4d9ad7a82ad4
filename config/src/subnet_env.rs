//! `subnet.env`, with flannel's variable names, so that flannel's CNI plugin
//! (and anything else that reads it) works unchanged. Text only: reading
//! and writing the file is the caller's business.

use crate::cidr;
use crate::{DnsName, NetworkConfig};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// What subnet.env says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Option<Ipv4Net>,
    /// The node subnet's first address with its prefix (`10.244.3.1/24`).
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: u32,
    pub ip_masq: bool,
    /// `WEFT_LEASE_EXPIRES`: Unix time the node's lease runs out unless
    /// renewed (weft's own variable; flannel's readers ignore it). weft-cni
    /// adds no container after it: the subnet may be handed to another
    /// node.
    pub lease_expires: Option<u64>,
    /// `WEFT_DNS_DOMAIN`: the node answers DNS for `<name>.<domain>` on the
    /// bridge gateway (weft's own variable, written only while the node
    /// serves names). weft-cni puts it in its result's `dns`.
    pub dns_domain: Option<DnsName>,
}

fn first_host(n: IpNet) -> IpNet {
    let next = match n.network() {
        std::net::IpAddr::V4(a) => std::net::IpAddr::V4((u32::from(a) + 1).into()),
        std::net::IpAddr::V6(a) => std::net::IpAddr::V6((u128::from(a) + 1).into()),
    };
    IpNet::new(next, n.prefix_len()).expect("same prefix length")
}

impl SubnetEnv {
    /// The file for a node holding `v4`/`v6` in `network`.
    pub fn new(
        network: &NetworkConfig,
        v4: Option<Ipv4Net>,
        v6: Option<Ipv6Net>,
        mtu: u32,
        ip_masq: bool,
    ) -> Self {
        SubnetEnv {
            network: network.ipv4.as_ref().map(|p| p.network()),
            subnet: v4.map(|n| match first_host(IpNet::V4(n)) {
                IpNet::V4(v) => v,
                IpNet::V6(_) => unreachable!("an IPv4 net stays IPv4"),
            }),
            ipv6_network: network.ipv6.as_ref().map(|p| p.network()),
            ipv6_subnet: v6.map(|n| match first_host(IpNet::V6(n)) {
                IpNet::V6(v) => v,
                IpNet::V4(_) => unreachable!("an IPv6 net stays IPv6"),
            }),
            mtu,
            ip_masq,
            lease_expires: None,
            dns_domain: None,
        }
    }

    /// The text, in flannel's order.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let (Some(n), Some(sub)) = (self.network, self.subnet) {
            s.push_str(&format!("FLANNEL_NETWORK={n}\nFLANNEL_SUBNET={sub}\n"));
        }
        if let (Some(n), Some(sub)) = (self.ipv6_network, self.ipv6_subnet) {
            s.push_str(&format!(
                "FLANNEL_IPV6_NETWORK={n}\nFLANNEL_IPV6_SUBNET={sub}\n"
            ));
        }
        s.push_str(&format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ip_masq
        ));
        if let Some(t) = self.lease_expires {
            s.push_str(&format!("WEFT_LEASE_EXPIRES={t}\n"));
        }
        if let Some(d) = &self.dns_domain {
            s.push_str(&format!("WEFT_DNS_DOMAIN={d}\n"));
        }
        s
    }

    /// Reads subnet.env text; unknown variables are ignored, bad values are
    /// an error naming the variable.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut env = SubnetEnv {
            network: None,
            subnet: None,
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 0,
            ip_masq: false,
            lease_expires: None,
            dns_domain: None,
        };
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not KEY=VALUE"))?;
            let v = v.trim().trim_matches('"');
            let bad = |what: &str| format!("{k}={v:?} is not {what}");
            match k.trim() {
                "FLANNEL_NETWORK" => {
                    env.network = Some(cidr::parse_v4(v).ok_or_else(|| bad("an IPv4 CIDR"))?)
                }
                "FLANNEL_SUBNET" => {
                    env.subnet = Some(cidr::parse_v4(v).ok_or_else(|| bad("an IPv4 CIDR"))?)
                }
                "FLANNEL_IPV6_NETWORK" => {
                    env.ipv6_network = Some(cidr::parse_v6(v).ok_or_else(|| bad("an IPv6 CIDR"))?)
                }
                "FLANNEL_IPV6_SUBNET" => {
                    env.ipv6_subnet = Some(cidr::parse_v6(v).ok_or_else(|| bad("an IPv6 CIDR"))?)
                }
                "FLANNEL_MTU" => env.mtu = v.parse().map_err(|_| bad("a number"))?,
                "FLANNEL_IPMASQ" => env.ip_masq = v.parse().map_err(|_| bad("true or false"))?,
                "WEFT_LEASE_EXPIRES" => {
                    env.lease_expires = Some(v.parse().map_err(|_| bad("a Unix time"))?)
                }
                "WEFT_DNS_DOMAIN" => {
                    env.dns_domain = Some(v.parse().map_err(|_| bad("a DNS name"))?)
                }
                _ => {}
            }
        }
        Ok(env)
    }

    /// The node's subnets (network addresses), as the file names them.
    pub fn subnets(&self) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
        (
            self.subnet.map(|n| n.trunc()),
            self.ipv6_subnet.map(|n| n.trunc()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannel_format_and_round_trips() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let env = SubnetEnv::new(
            &cfg,
            Some("10.244.3.0/24".parse().unwrap()),
            None,
            1450,
            true,
        );
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        assert_eq!(env.subnets().0.unwrap().to_string(), "10.244.3.0/24");
    }

    #[test]
    fn the_dns_domain_is_weft_s_own_variable() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let mut env = SubnetEnv::new(
            &cfg,
            Some("10.244.3.0/24".parse().unwrap()),
            None,
            1450,
            true,
        );
        env.dns_domain = Some(cfg.dns_domain.clone());
        let text = env.render();
        assert!(text.ends_with("WEFT_DNS_DOMAIN=weft\n"), "{text}");
        assert_eq!(SubnetEnv::parse(&text).unwrap(), env);
        let e = SubnetEnv::parse("WEFT_DNS_DOMAIN=a_b\n").unwrap_err();
        assert!(e.contains("WEFT_DNS_DOMAIN"), "{e}");
    }

    #[test]
    fn dual_stack_variables() {
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd77::/48"}"#,
        )
        .unwrap();
        let env = SubnetEnv::new(
            &cfg,
            Some("10.244.3.0/24".parse().unwrap()),
            Some("fd77:0:0:3::/64".parse().unwrap()),
            1450,
            false,
        );
        let text = env.render();
        assert!(
            text.contains("FLANNEL_IPV6_NETWORK=fd77::/48\nFLANNEL_IPV6_SUBNET=fd77:0:0:3::1/64\n"),
            "{text}"
        );
        assert_eq!(
            SubnetEnv::parse(&text)
                .unwrap()
                .subnets()
                .1
                .unwrap()
                .to_string(),
            "fd77:0:0:3::/64"
        );
    }

    #[test]
    fn reads_what_flannel_wrote_and_rejects_garbage() {
        let flannel = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
        let env = SubnetEnv::parse(flannel).unwrap();
        assert_eq!(env.subnets().0.unwrap().to_string(), "10.5.34.0/24");
        assert_eq!(env.mtu, 1450);
        let e = SubnetEnv::parse("FLANNEL_SUBNET=banana\n").unwrap_err();
        assert!(e.contains("FLANNEL_SUBNET"), "{e}");
        assert!(SubnetEnv::parse("just words").is_err());
        // Read as strictly as flannel reads CIDRs.
        for bad in [
            "FLANNEL_SUBNET=010.5.34.1/24",
            "FLANNEL_NETWORK=10.5.0.0/+16",
        ] {
            assert!(SubnetEnv::parse(bad).is_err(), "{bad}");
        }
    }
}
