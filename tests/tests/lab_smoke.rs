//! The lab comes up and pods reach each other (vxlan, 3 hosts).

use weft_tests::lab::{Lab, LabConfig};

#[test]
#[ignore = "needs root; run by scripts/test"]
fn three_hosts_vxlan() {
    let lab = Lab::up(LabConfig::for_test(3, "vxlan")).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(lab.unreachable_pairs().is_empty());
    lab.down().unwrap();
}
