//! Plain-text tables for people.

use std::time::Duration;
use weft_config::format_duration;
use weft_lease::api::{LeaseView, NameView, Readiness};

/// Left-aligned columns separated by two spaces.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn expires(l: &LeaseView) -> String {
    if l.reserved {
        "never (reserved)".into()
    } else {
        match l.ttl_seconds {
            Some(s) => human_ttl(s),
            None => "-".into(),
        }
    }
}

/// Time left, as precise as is useful: seconds are noise above an hour.
fn human_ttl(secs: u64) -> String {
    let shown = if secs >= 3600 { secs - secs % 60 } else { secs };
    format_duration(Duration::from_secs(shown))
}

/// The names table: one row per name and address.
pub(crate) fn names(names: &[NameView]) -> String {
    if names.is_empty() {
        return "no names\n".into();
    }
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            let r = &n.record;
            vec![
                r.name.to_string(),
                r.address.to_string(),
                r.node
                    .as_ref()
                    .map_or_else(|| "(operator)".into(), |n| n.to_string()),
                r.container_id
                    .as_deref()
                    .map_or_else(|| "-".into(), |c| c.chars().take(12).collect()),
            ]
        })
        .collect();
    render(&["NAME", "ADDRESS", "NODE", "CONTAINER"], &rows)
}

/// The lease table.
pub(crate) fn leases(leases: &[LeaseView]) -> String {
    if leases.is_empty() {
        return "no leases\n".into();
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            vec![
                l.key.to_cidrs(),
                l.node_name.clone().unwrap_or_else(|| "(flannel)".into()),
                l.public_ip
                    .map(|ip| ip.to_string())
                    .or_else(|| l.public_ipv6.map(|ip| ip.to_string()))
                    .unwrap_or_else(|| "-".into()),
                if l.backend_type.is_empty() {
                    "-".into()
                } else {
                    l.backend_type.clone()
                },
                expires(l),
                if l.fits_network {
                    String::new()
                } else {
                    "outside network".into()
                },
            ]
        })
        .collect();
    render(
        &[
            "SUBNET",
            "NODE",
            "PUBLIC IP",
            "BACKEND",
            "EXPIRES IN",
            "NOTE",
        ],
        &rows,
    )
}

/// The status summary.
pub(crate) fn status(url: &str, r: &Readiness) -> String {
    let mut out = String::new();
    let state = if r.ready { "ready" } else { "NOT READY" };
    out.push_str(&format!("controller  {url}  {state}\n"));
    for reason in &r.reasons {
        out.push_str(&format!("  reason    {reason}\n"));
    }
    out.push_str(&format!(
        "store       {} (revision {})\n",
        r.store, r.revision
    ));
    out.push_str(&format!(
        "subnets     {} used, {} free of {}\n",
        r.subnets_used,
        r.subnets_total.saturating_sub(r.subnets_used),
        r.subnets_total
    ));
    out.push_str(&format!(
        "leases      {} leases, {} reservations, {} watching nodes\n",
        r.leases, r.reservations, r.watch_clients
    ));
    for w in &r.warnings {
        out.push_str(&format!("warning     {w}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(
        key: &str,
        node: Option<&str>,
        ttl: Option<u64>,
        reserved: bool,
        fits: bool,
    ) -> LeaseView {
        let key: weft_lease::SubnetKey = key.parse().unwrap();
        LeaseView {
            key,
            subnet: key.ipv4(),
            ipv6_subnet: key.ipv6(),
            node_name: node.map(str::to_string),
            public_ip: Some("198.18.0.11".parse().unwrap()),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: None,
            reserved,
            etcd_lease: None,
            ttl_seconds: ttl,
            fits_network: fits,
            revision: 1,
        }
    }

    #[test]
    fn lease_table_lines_up_and_says_what_each_lease_is() {
        let out = leases(&[
            view("10.244.3.0-24", Some("host-1"), Some(86_340), false, true),
            view("10.244.10.0-24", None, Some(90), false, true),
            view("10.99.1.0-24", Some("db"), None, true, false),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("SUBNET          NODE"), "{out}");
        assert!(
            lines[1].contains("host-1") && lines[1].contains("23h59m"),
            "{out}"
        );
        assert!(
            lines[2].contains("(flannel)") && lines[2].contains("1m30s"),
            "{out}"
        );
        assert!(
            lines[3].contains("never (reserved)") && lines[3].ends_with("outside network"),
            "{out}"
        );
        // Columns line up: every row has NODE at the same offset.
        let col = lines[0].find("NODE").unwrap();
        assert_eq!(&lines[1][col..col + 6], "host-1");
        assert_eq!(leases(&[]), "no leases\n");
        assert_eq!(human_ttl(7199), "1h59m");
        assert_eq!(human_ttl(3599), "59m59s");
    }

    #[test]
    fn names_table_says_whose_each_name_is() {
        let rec = |name: &str, addr: &str, node: Option<&str>, id: Option<&str>| NameView {
            record: weft_lease::names::NameRecord {
                name: name.parse().unwrap(),
                address: addr.parse().unwrap(),
                node: node.map(|n| weft_lease::NodeName::new(n).unwrap()),
                container_id: id.map(str::to_string),
            },
            revision: 3,
        };
        let out = names(&[
            rec(
                "web",
                "10.244.3.5",
                Some("host-1"),
                Some("0123456789abcdef"),
            ),
            rec("gateway", "fdc6:7765:6675::9", None, None),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME     ADDRESS"), "{out}");
        assert!(lines[1].ends_with("host-1      0123456789ab"), "{out}");
        assert!(
            lines[2].contains("(operator)") && lines[2].ends_with('-'),
            "{out}"
        );
        assert_eq!(names(&[]), "no names\n");
    }

    #[test]
    fn status_summary() {
        let r = Readiness {
            ready: false,
            reasons: vec!["store unreachable: x".into()],
            warnings: vec!["1 lease(s) outside".into()],
            store: "etcd http://127.0.0.1:2379 prefix /weft/network".into(),
            revision: 7,
            subnets_total: 255,
            subnets_used: 3,
            leases: 2,
            reservations: 1,
            leases_outside_network: 1,
            unreadable_entries: 0,
            watch_clients: 4,
        };
        let out = status("http://c:7070", &r);
        assert!(out.contains("NOT READY"));
        assert!(out.contains("reason    store unreachable: x"));
        assert!(out.contains("3 used, 252 free of 255"));
        assert!(out.contains("2 leases, 1 reservations, 4 watching nodes"));
        assert!(out.contains("warning     1 lease(s) outside"));
    }
}
