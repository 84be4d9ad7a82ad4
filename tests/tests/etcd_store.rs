//! The store conformance suite against a real etcd server.

use std::sync::Arc;
use weft_lease::conformance::Store;
use weft_lease::{EtcdOptions, EtcdStore};
use weft_tests::etcd::EtcdServer;

/// A store on an etcd of its own: compaction is global in etcd, so checks
/// that compact or read the past must not share a server. The server lives
/// until the test process exits (it is tied to it), which under nextest is
/// the end of the test.
async fn fresh() -> Store {
    let server = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let url = server.url();
    Box::leak(Box::new(server));
    let store = EtcdStore::connect(EtcdOptions::new(vec![url], "/weft/network"))
        .await
        .expect("connect to etcd");
    Arc::new(store)
}

weft_lease::conformance_tests!(
    #[ignore = "needs etcd; run by scripts/test"]
    fresh
);
