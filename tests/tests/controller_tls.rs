//! The controller's HTTPS API with client certificates (in process, on the
//! in-memory store): who may do what, what the handshake refuses, the watch
//! stream over TLS, certificates made by openssl, and a client that picks
//! up rotated certificate files.

use futures::StreamExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use weft_lease::client::{ClientError, ControllerClient};
use weft_lease::tls::ClientTlsFiles;
use weft_lease::{LeaseStore, MemoryStore};
use weft_tests::controller::{host_gw_request as req, test_options, RunningController};
use weft_tests::pki::{TestPki, Validity};

const NETWORK: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

async fn controller() -> RunningController {
    let store = MemoryStore::new();
    store.put_config(NETWORK).await.unwrap();
    RunningController::start(Arc::new(store), test_options())
        .await
        .unwrap()
}

fn pki(c: &RunningController) -> Arc<TestPki> {
    c.pki.clone().expect("an HTTPS controller")
}

/// The 403's message, which must name the caller and the action.
fn forbidden(r: Result<impl std::fmt::Debug, ClientError>) -> String {
    match r {
        Err(ClientError::Api { status: 403, body }) => {
            assert_eq!(body.error, "forbidden");
            body.message
        }
        other => panic!("expected 403 forbidden, got {other:?}"),
    }
}

/// The handshake failure's text; no HTTP answer at all.
fn refused_in_handshake(r: Result<impl std::fmt::Debug, ClientError>) -> String {
    match r {
        Err(ClientError::Connect { reason, .. }) => reason,
        other => panic!("expected the TLS handshake to fail, got {other:?}"),
    }
}

#[tokio::test]
async fn a_node_certificate_acts_only_on_its_own_lease() {
    let c = controller().await;
    let a = c.client_with(pki(&c).node("node-a").unwrap()).unwrap();
    // Its own lease: acquire, renew, release.
    a.acquire("node-a", &req(11)).await.unwrap();
    a.renew("node-a").await.unwrap();
    // Another node's: all refused, the identity and the action named.
    c.client.acquire("node-b", &req(12)).await.unwrap();
    let m = forbidden(a.acquire("node-b", &req(11)).await);
    assert!(
        m.contains("CN=\"node-a\"") && m.contains("PUT /v1/leases/node-b"),
        "{m}"
    );
    let m = forbidden(a.renew("node-b").await);
    assert!(m.contains("POST /v1/leases/node-b/renew"), "{m}");
    let m = forbidden(a.release("node-b").await);
    assert!(m.contains("DELETE /v1/leases/node-b"), "{m}");
    // node-b's lease is untouched.
    let list = c.client.list(false).await.unwrap();
    let b = list
        .leases
        .iter()
        .find(|l| l.node_name.as_deref() == Some("node-b"))
        .expect("node-b keeps its lease");
    assert_eq!(b.public_ip, Some("198.18.0.12".parse().unwrap()));
    // Not the network, not reservations.
    let m = forbidden(a.set_network(NETWORK).await);
    assert!(m.contains("PUT /v1/network") && m.contains("admin"), "{m}");
    forbidden(a.reserve("10.244.77.0/24", "node-a").await);
    // But it reads what a node needs.
    assert_eq!(a.list(false).await.unwrap().leases.len(), 2);
    assert!(a.network().await.unwrap().valid);
    a.release("node-a").await.unwrap();
    // Refusals are counted.
    let metrics = c.client.metrics().await.unwrap();
    assert!(
        metrics.contains("weft_controller_requests_forbidden_total 5"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_admin_certificate_does_everything() {
    let c = controller().await;
    let admin = &c.client;
    admin.set_network(NETWORK).await.unwrap();
    // Reserved first: node-x's subnet is drawn at random.
    admin.reserve("10.244.77.0/24", "db-1").await.unwrap();
    admin.acquire("node-x", &req(21)).await.unwrap();
    admin.renew("node-x").await.unwrap();
    let released = admin.release("node-x").await.unwrap();
    assert_eq!(released.released.len(), 1);
    admin.release("db-1").await.unwrap();
    assert!(admin.list(false).await.unwrap().leases.is_empty());
}

#[tokio::test]
async fn a_certificate_without_a_weft_role_may_do_nothing_but_health() {
    let c = controller().await;
    let files = pki(&c)
        .client("stranger", "node-a", Some("example:ops"), Validity::Now)
        .unwrap();
    let s = c.client_with(files).unwrap();
    let m = forbidden(s.list(false).await);
    assert!(m.contains("weft:nodes or weft:admins"), "{m}");
    forbidden(s.acquire("node-a", &req(31)).await);
    // Health answers, with counts and no lease names.
    c.client.acquire("node-secret", &req(32)).await.unwrap();
    let ready = s.readiness().await.unwrap();
    assert_eq!(ready.leases, 1);
    let text = serde_json::to_string(&ready).unwrap();
    assert!(
        !text.contains("node-secret") && !text.contains("10.244."),
        "{text}"
    );
    assert!(s
        .metrics()
        .await
        .unwrap()
        .contains("weft_controller_leases"));
}

#[tokio::test]
async fn no_expired_or_foreign_certificates_are_refused_in_the_handshake() {
    let c = controller().await;
    let p = pki(&c);
    // No certificate at all.
    let bare = ControllerClient::with_tls(
        &c.url,
        Some(ClientTlsFiles {
            ca: p.ca_file(),
            cert: None,
            key: None,
        }),
    )
    .unwrap();
    let why = refused_in_handshake(bare.list(false).await);
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    // Expired.
    let expired = p
        .client("expired", "node-a", Some("weft:nodes"), Validity::Expired)
        .unwrap();
    refused_in_handshake(c.client_with(expired).unwrap().list(false).await);
    // Signed by another CA (with a name and role that would be allowed).
    let other = TestPki::new().unwrap();
    let mut foreign = other.node("node-a").unwrap();
    foreign.ca = p.ca_file();
    refused_in_handshake(
        c.client_with(foreign)
            .unwrap()
            .acquire("node-a", &req(41))
            .await,
    );
    // And a client that does not trust the controller's CA refuses it.
    let mut distrust = p.node("node-a").unwrap();
    distrust.ca = other.ca_file();
    let why = refused_in_handshake(c.client_with(distrust).unwrap().list(false).await);
    assert!(why.contains("invalid peer certificate"), "{why}");
    // Nothing got through; the controller counted the handshakes.
    assert!(c.client.list(false).await.unwrap().leases.is_empty());
    let metrics = c.client.metrics().await.unwrap();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weft_controller_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(failures >= 3, "{metrics}");
}

#[tokio::test]
async fn the_watch_stream_over_tls() {
    let c = controller().await;
    let a = c.client_with(pki(&c).node("node-a").unwrap()).unwrap();
    let from = a.list(false).await.unwrap().revision + 1;
    let mut watch = a.watch(from).await.unwrap();
    c.client.acquire("node-b", &req(51)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = watch.next().await {
            if let Some(l) = line.unwrap().lease {
                return l;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("a lease line within 10 s");
    assert_eq!(got.node_name.as_deref(), Some("node-b"));
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl is needed (Debian package openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn certificates_made_by_openssl_work_the_same() {
    // A CA and a node certificate made with openssl (RSA keys), nothing
    // from weft: the controller trusts that CA for clients.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=openssl CA",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "node-key.pem",
            "-out",
            "node.csr",
            "-subj",
            "/O=weft:nodes/CN=node-o",
        ],
    );
    std::fs::write(d.join("ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "node.pem",
            "-days",
            "1",
            "-extfile",
            "ext",
        ],
    );
    let p = TestPki::shared();
    let mut server = p.server().unwrap();
    server.client_ca = d.join("ca.pem");
    let store = MemoryStore::new();
    store.put_config(NETWORK).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let controller = weft_controller::Controller::start(Arc::new(store), test_options());
    let serving = weft_controller::serve_tls(
        listener,
        &controller,
        server.config().unwrap(),
        std::future::pending(),
    );
    let task = tokio::spawn(serving);
    controller.synced().await;
    let node = ControllerClient::with_tls(
        &url,
        Some(ClientTlsFiles {
            ca: p.ca_file(),
            cert: Some(d.join("node.pem")),
            key: Some(d.join("node-key.pem")),
        }),
    )
    .unwrap();
    let lease = node.acquire("node-o", &req(61)).await.unwrap();
    assert_eq!(lease.lease.node_name.as_deref(), Some("node-o"));
    forbidden(node.acquire("node-p", &req(62)).await);
    task.abort();
}

#[tokio::test]
async fn a_client_uses_rotated_certificate_files_without_a_restart() {
    let c = controller().await;
    let p = pki(&c);
    // The files a node is configured with.
    let files = p.node("rotating").unwrap();
    let (cert, key) = (files.cert.clone().unwrap(), files.key.clone().unwrap());
    let client = c.client_with(files).unwrap();
    client.acquire("rotating", &req(71)).await.unwrap();
    // Rotated to a certificate naming another node: the client must now
    // present it (and be refused for "rotating"), which proves it re-read
    // the files; no connection of the old client is reused.
    let other = p.node("someone-else").unwrap();
    let install = |from: &ClientTlsFiles| {
        std::fs::copy(from.key.as_ref().unwrap(), &key).unwrap();
        std::fs::copy(from.cert.as_ref().unwrap(), &cert).unwrap();
    };
    install(&other);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let m = forbidden(client.renew("rotating").await);
    assert!(m.contains("someone-else"), "{m}");
    // A rotation half written (junk in the certificate file) keeps the
    // last good pair.
    std::fs::write(&cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let m = forbidden(client.renew("rotating").await);
    assert!(m.contains("someone-else"), "{m}");
    // A new certificate for the node's own name: accepted again.
    let fresh = p
        .client("rotating-2", "rotating", Some("weft:nodes"), Validity::Now)
        .unwrap();
    install(&fresh);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client.renew("rotating").await.unwrap();
}

/// A raw HTTPS request as node-a (the typed client encodes paths itself;
/// these are what an attacker holding node-a's certificate could send).
async fn raw(c: &RunningController, method: &str, path: &str) -> (u16, String) {
    let files = pki(c).node("node-a").unwrap();
    let tls = files.config().unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let resp = http
        .request(method.parse().unwrap(), format!("{}{path}", c.url))
        .header("content-type", "application/json")
        .body(r#"{"public_ip":"198.18.0.81","backend_type":"host-gw"}"#)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn odd_paths_and_methods_give_a_node_nothing_more() {
    let c = controller().await;
    c.client.acquire("node-b", &req(82)).await.unwrap();
    for (method, path) in [
        // Another node, spelled otherwise.
        ("PUT", "/v1/leases/node%2Db"),
        ("PUT", "/v1/leases/node-b/"),
        ("PUT", "/v1/leases/node-a%2F..%2Fnode-b"),
        ("DELETE", "/v1/leases/node%2db"),
        ("POST", "/v1/leases/node-b/renew/"),
        ("PUT", "/v1/leases/w%61tch"),
        ("PUT", "/v1/leases/%FF"),
        ("PUT", "/v1/leases/"),
        ("PUT", "/v1/leases//node-b"),
        // Other methods, admin routes.
        ("HEAD", "/v1/network"),
        ("OPTIONS", "/v1/leases/node-a"),
        ("PATCH", "/v1/leases/node-a"),
        ("PUT", "/v1/network"),
        ("POST", "/v1/reservations"),
        ("GET", "/v1/leases?with_ttl=true"),
        ("GET", "/v1/leases?with_ttl=1"),
    ] {
        let (status, body) = raw(&c, method, path).await;
        assert!(
            matches!(status, 400 | 403 | 404 | 405),
            "{method} {path}: {status} {body}"
        );
    }
    // node-b's lease is as it was; node-a got nothing.
    let leases = c.client.list(false).await.unwrap().leases;
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].node_name.as_deref(), Some("node-b"));
    assert_eq!(leases[0].public_ip, Some("198.18.0.82".parse().unwrap()));
    // While its own name, percent-encoded or not, works.
    let (status, body) = raw(&c, "PUT", "/v1/leases/node%2Da").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn clients_that_never_finish_a_handshake_do_not_lock_others_out() {
    let c = controller().await;
    let addr = c.url.trim_start_matches("https://").to_string();
    // More silent connections than handshakes are served at once.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // A real client gets through once the silent ones time out (5 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match c.client.list(false).await {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "still locked out: {e}"
            ),
        }
    }
    drop(idle);
    let metrics = c.client.metrics().await.unwrap();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weft_controller_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(failures >= 256, "{failures}");
}
