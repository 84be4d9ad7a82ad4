//! TLS in a running lab: a node's certificate rotated under the running
//! daemon (no restart), including to one that names another node, which
//! the controller refuses and the node reports.

use std::time::Duration;
use weft_tests::lab::{Lab, LabConfig};

/// The renewal counter of host `i` for `result` (`ok`, `error`, ...).
fn renewals(lab: &Lab, i: u32, result: &str) -> u64 {
    let (_, metrics) =
        weft_tests::netns::http_get(&lab.host(i).unwrap().ns, "127.0.0.1:9680", "/metrics")
            .unwrap();
    let prefix = format!("weft_node_lease_renewals_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Replaces host `i`'s certificate files with the pair `stem` in the lab's
/// PKI (each file replaced atomically, the key first, as `weftctl pki`
/// writes them).
fn install(lab: &Lab, i: u32, stem: &str) {
    let pki = lab.pki_dir();
    let (cert, key) = lab.node_cert(i);
    for (from, to) in [
        (format!("{stem}-key.pem"), key),
        (format!("{stem}.pem"), cert),
    ] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(pki.join(from), &tmp).unwrap();
        std::fs::rename(&tmp, &to).unwrap();
    }
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn a_running_node_takes_rotated_certificates_and_one_naming_another_node_is_refused() {
    weft_tests::netns::require_root();
    let mut cfg = LabConfig::for_test(2, "vxlan");
    // Renewals every 2 s, so every step below is seen quickly.
    cfg.network = Some(r#"{"Network":"10.244.0.0/16","LeaseTTL":"6s"}"#.into());
    let lab = Lab::up(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let pid = lab.pid("node-1").unwrap();
    let pki = lab.pki_dir().display().to_string();
    // A certificate that names host-99, put where host-1's daemon reads.
    lab.weftctl_pki(&["node", "host-99", "--dir", &pki])
        .unwrap();
    install(&lab, 1, "node-host-99");
    lab.wait_for(
        Duration::from_secs(20),
        "host-1 to be refused as host-99",
        || {
            let log = lab.log_tail("node-1", 40);
            Ok(log.contains("TLS files changed")
                && log.contains("403")
                && log.contains("CN=\"host-99\"")
                && log.contains("/v1/leases/host-1"))
        },
    )
    .unwrap();
    let controller = lab.log_tail("controller", 40);
    assert!(
        controller.contains("refused") && controller.contains("host-99"),
        "{controller}"
    );
    // The data plane stays as it was meanwhile.
    assert!(lab.unreachable_pairs().is_empty());
    // A new certificate for host-1 (a rotation, as an operator does it):
    // the same daemon renews with it again.
    lab.weftctl_pki(&["node", "host-1", "--dir", &pki, "--force"])
        .unwrap();
    let ok_before = renewals(&lab, 1, "ok");
    lab.wait_for(
        Duration::from_secs(20),
        "host-1 to renew with its rotated certificate",
        || Ok(renewals(&lab, 1, "ok") > ok_before),
    )
    .unwrap();
    lab.wait_for(Duration::from_secs(20), "host-1 to be ready", || {
        Ok(lab.node_status(1)?["ready"] == true)
    })
    .unwrap();
    assert_eq!(
        lab.pid("node-1").unwrap(),
        pid,
        "the daemon was not restarted"
    );
    lab.wait_converged(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
}
