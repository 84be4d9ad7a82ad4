//! The controller against a secured etcd, as production etcd runs: TLS with
//! client certificates (`--client-cert-auth`), and users and roles
//! (`etcdctl auth enable`). What goes wrong (a wrong CA, no client
//! certificate, a bad password) is said by `/readyz` and the log.

use std::time::Duration;
use weft_lease::api::AcquireRequest;
use weft_lease::client::ControllerClient;
use weft_lease::BackendData;
use weft_tests::controller::{free_addr, tls_args, wait_readiness, ControllerProcess};
use weft_tests::etcd::{EtcdServer, EtcdServerTls};
use weft_tests::etcdctl::etcdctl_with;
use weft_tests::pki::{TestPki, Validity};

const NETWORK: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

/// etcd over TLS with client-certificate authentication, and the client
/// certificate the controller should use.
struct SecureEtcd {
    server: EtcdServer,
    pki: TestPki,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
}

async fn secure_etcd() -> SecureEtcd {
    tokio::task::spawn_blocking(|| {
        let pki = TestPki::new().unwrap();
        let (cert, key) = pki
            .issue(
                "etcd",
                "127.0.0.1",
                None,
                &["127.0.0.1", "localhost"],
                Validity::Now,
            )
            .unwrap();
        let (client_cert, client_key) = pki
            .client("etcd-client", "weft-controller", None, Validity::Now)
            .map(|f| (f.cert.unwrap(), f.key.unwrap()))
            .unwrap();
        let server = EtcdServer::start_with(Some(EtcdServerTls {
            cert,
            key,
            trusted_ca: pki.ca_file(),
            client_cert_auth: true,
        }))
        .unwrap_or_else(|e| panic!("{e:#}"));
        SecureEtcd {
            server,
            pki,
            client_cert,
            client_key,
        }
    })
    .await
    .unwrap()
}

/// A controller process (itself on HTTPS) and an admin client for it.
struct Ctl {
    process: ControllerProcess,
    client: ControllerClient,
}

fn controller(env: &[(&str, &str)], etcd_args: &[&str]) -> Ctl {
    let pki = TestPki::shared();
    let addr = free_addr();
    let mut args: Vec<String> = vec!["--listen".into(), addr.clone()];
    args.extend(tls_args(&pki).unwrap());
    args.extend(etcd_args.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = ControllerProcess::spawn(env, &args).unwrap_or_else(|e| panic!("{e:#}"));
    let client = ControllerClient::with_tls(
        &format!("https://{addr}"),
        Some(pki.admin("etcd-tests").unwrap()),
    )
    .unwrap();
    Ctl { process, client }
}

/// Waits until the controller reports a reason containing `needle`; panics
/// with what it reported and its log otherwise.
async fn reason_says(ctl: &Ctl, needle: &str) -> String {
    let found = wait_readiness(&ctl.client, Duration::from_secs(20), |r| {
        r.reasons.iter().any(|x| x.contains(needle))
    })
    .await;
    match found {
        Ok(r) => {
            let said = r.reasons.join("; ");
            eprintln!("readyz says: {said}");
            said
        }
        Err(last) => panic!(
            "no reason saying {needle:?}: {last}\nlog:\n{}",
            ctl.process.log()
        ),
    }
}

async fn works(ctl: &Ctl) {
    // Answering, and past the first list from etcd.
    wait_readiness(&ctl.client, Duration::from_secs(20), |r| {
        r.reasons.iter().all(|x| !x.contains("not loaded"))
    })
    .await
    .unwrap_or_else(|last| panic!("no answer: {last}\n{}", ctl.process.log()));
    ctl.client.set_network(NETWORK).await.unwrap();
    wait_readiness(&ctl.client, Duration::from_secs(20), |r| r.ready)
        .await
        .unwrap_or_else(|last| panic!("not ready: {last}\n{}", ctl.process.log()));
    let lease = ctl
        .client
        .acquire(
            "node-1",
            &AcquireRequest::new(
                Some("198.18.0.11".parse().unwrap()),
                None,
                &BackendData::HostGw,
                None,
            ),
        )
        .await
        .unwrap();
    assert_eq!(lease.lease.node_name.as_deref(), Some("node-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn etcd_with_client_certificates() {
    let etcd = secure_etcd().await;
    let url = etcd.server.url();
    let (ca, cert, key) = (
        etcd.pki.ca_file().display().to_string(),
        etcd.client_cert.display().to_string(),
        etcd.client_key.display().to_string(),
    );
    // Flannel's flag names; the environment works as well.
    let ctl = controller(
        &[
            ("WEFT_CONTROLLER_ETCD_CERTFILE", &cert),
            ("WEFT_CONTROLLER_ETCD_KEYFILE", &key),
        ],
        &["--etcd-endpoints", &url, "--etcd-cafile", &ca],
    );
    works(&ctl).await;
    // What the controller wrote is there for etcdctl with the same files.
    let keys = etcdctl_with(
        &url,
        &["--cacert", &ca, "--cert", &cert, "--key", &key],
        &["get", "--prefix", "--keys-only", "/weft/network/subnets/"],
    )
    .unwrap();
    assert!(keys.contains("/weft/network/subnets/10.244."), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn a_wrong_ca_or_a_missing_certificate_is_named() {
    let etcd = secure_etcd().await;
    let url = etcd.server.url();
    let ca = etcd.pki.ca_file().display().to_string();
    let other = TestPki::new().unwrap();
    let wrong_ca = other.ca_file().display().to_string();
    let (cert, key) = (
        etcd.client_cert.display().to_string(),
        etcd.client_key.display().to_string(),
    );
    let ctl = controller(
        &[],
        &[
            "--etcd-endpoints",
            &url,
            "--etcd-cafile",
            &wrong_ca,
            "--etcd-certfile",
            &cert,
            "--etcd-keyfile",
            &key,
        ],
    );
    let said = reason_says(&ctl, "not signed by the CA in --etcd-cafile").await;
    assert!(said.contains("store unreachable"), "{said}");
    assert!(
        ctl.process.log().contains("--etcd-cafile"),
        "{}",
        ctl.process.log()
    );
    drop(ctl);
    // The right CA but no client certificate.
    let ctl = controller(&[], &["--etcd-endpoints", &url, "--etcd-cafile", &ca]);
    reason_says(&ctl, "etcd refused our client certificate").await;
    assert!(
        ctl.process.log().contains("--etcd-certfile"),
        "{}",
        ctl.process.log()
    );
    // And a certificate from another CA is refused the same way.
    let foreign = other
        .client("x", "weft-controller", None, Validity::Now)
        .unwrap();
    let (fc, fk) = (
        foreign.cert.unwrap().display().to_string(),
        foreign.key.unwrap().display().to_string(),
    );
    drop(ctl);
    let ctl = controller(
        &[],
        &[
            "--etcd-endpoints",
            &url,
            "--etcd-cafile",
            &ca,
            "--etcd-certfile",
            &fc,
            "--etcd-keyfile",
            &fk,
        ],
    );
    reason_says(&ctl, "etcd refused our client certificate").await;
}

/// etcd with authentication on: root, and a user `weft` whose role may read
/// and write the prefix.
async fn etcd_with_users() -> EtcdServer {
    let server = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let url = server.url();
    let run = |args: &[&str]| {
        etcdctl_with(&url, &[], args).unwrap_or_else(|e| panic!("{e:#}"));
    };
    run(&["user", "add", "root:rootpw"]);
    run(&["role", "add", "weft"]);
    run(&[
        "role",
        "grant-permission",
        "weft",
        "readwrite",
        "--prefix=true",
        "/weft/",
    ]);
    run(&["user", "add", "weft:s3cret"]);
    run(&["user", "grant-role", "weft", "weft"]);
    run(&["auth", "enable"]);
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn etcd_with_a_user_and_a_password() {
    let etcd = etcd_with_users().await;
    let url = etcd.url();
    let ctl = controller(
        &[("WEFT_CONTROLLER_ETCD_PASSWORD", "s3cret")],
        &["--etcd-endpoints", &url, "--etcd-username", "weft"],
    );
    works(&ctl).await;
    // The password is not in the log.
    assert!(
        !ctl.process.log().contains("s3cret"),
        "{}",
        ctl.process.log()
    );
    // Without a user, etcd refuses even reads.
    let denied = etcdctl_with(&url, &[], &["get", "/weft/network/config"]);
    assert!(denied.is_err(), "{denied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn a_bad_password_or_no_user_is_named() {
    let etcd = etcd_with_users().await;
    let url = etcd.url();
    let ctl = controller(
        &[("WEFT_CONTROLLER_ETCD_PASSWORD", "wrong")],
        &["--etcd-endpoints", &url, "--etcd-username", "weft"],
    );
    reason_says(&ctl, "check --etcd-username and --etcd-password").await;
    assert!(
        !ctl.process.log().contains("wrong\""),
        "{}",
        ctl.process.log()
    );
    drop(ctl);
    let ctl = controller(&[], &["--etcd-endpoints", &url]);
    reason_says(&ctl, "give --etcd-username and --etcd-password").await;
    // A user whose role does not cover the prefix.
    let ctl2 = controller(
        &[("WEFT_CONTROLLER_ETCD_PASSWORD", "s3cret")],
        &[
            "--etcd-endpoints",
            &url,
            "--etcd-username",
            "weft",
            "--etcd-prefix",
            "/elsewhere/network",
        ],
    );
    reason_says(&ctl2, "lacks permission").await;
}
