//! The store conformance suite against a real etcd server.

use std::sync::Arc;
use weft_lease::conformance::Store;
use weft_lease::{EtcdOptions, EtcdStore};
use weft_tests::etcd;

async fn fresh() -> Store {
    let url = tokio::task::spawn_blocking(|| etcd::shared().to_string())
        .await
        .expect("start etcd");
    let store = EtcdStore::connect(EtcdOptions::new(vec![url], etcd::unique_prefix("conf")))
        .await
        .expect("connect to etcd");
    Arc::new(store)
}

weft_lease::conformance_tests!(
    #[ignore = "needs etcd; run by scripts/test"]
    fresh
);
