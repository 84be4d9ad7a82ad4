//! The weft-controller binary: flags, environment, start-up without etcd,
//! and shutdown on SIGTERM.

use futures::StreamExt;
use std::process::Command;
use std::time::{Duration, Instant};
use weft_lease::client::ControllerClient;
use weft_tests::bins::workspace_bin;
use weft_tests::controller::{free_addr, tls_args, ControllerProcess};
use weft_tests::etcd;
use weft_tests::pki::TestPki;

fn controller(env: &[(&str, &str)], args: &[&str]) -> ControllerProcess {
    ControllerProcess::spawn(env, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// An admin client for an HTTPS controller at `addr`.
fn admin(addr: &str) -> ControllerClient {
    ControllerClient::with_tls(
        &format!("https://{addr}"),
        Some(TestPki::shared().admin("binary-tests").unwrap()),
    )
    .unwrap()
}

async fn wait_healthy(client: &ControllerClient) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.readiness().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "controller did not start serving"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd; run by scripts/test"]
async fn serves_with_env_and_flags_and_stops_on_sigterm() {
    let etcd_url = tokio::task::spawn_blocking(|| etcd::shared().to_string())
        .await
        .unwrap();
    let prefix = etcd::unique_prefix("bin");
    let addr = free_addr();
    // TLS from the environment, as /etc/default/weft-controller sets it.
    let tls = TestPki::shared().server().unwrap();
    let (cert, key, ca) = (
        tls.cert.display().to_string(),
        tls.key.display().to_string(),
        tls.client_ca.display().to_string(),
    );
    let mut p = controller(
        &[
            ("WEFT_CONTROLLER_ETCD_ENDPOINTS", &etcd_url),
            ("WEFT_CONTROLLER_LISTEN", &addr),
            ("WEFT_CONTROLLER_TLS_CERT_FILE", &cert),
            ("WEFT_CONTROLLER_TLS_KEY_FILE", &key),
            ("WEFT_CONTROLLER_CLIENT_CA_FILE", &ca),
        ],
        &["--etcd-prefix", &prefix, "--watch-heartbeat", "1"],
    );
    let client = admin(&addr);
    wait_healthy(&client).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = client.readiness().await.unwrap();
        if r.reasons.iter().any(|x| x.contains("no network config")) || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!r.ready);
    assert!(r.store.contains(&prefix), "{}", r.store);
    client
        .set_network(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
        .await
        .unwrap();
    assert!(client.readiness().await.unwrap().ready);
    // A node following the leases must not hold up shutdown.
    let mut watch = client.watch(1).await.unwrap();
    let first = watch.next().await;
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = p.stop();
        (s, p.log())
    })
    .await
    .unwrap();
    assert!(
        status.0.unwrap().success(),
        "exit on SIGTERM: {:?}\n{}",
        status.0,
        status.1
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown with an open watch took {:?}",
        started.elapsed()
    );
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(5), watch.collect::<Vec<_>>())
        .await
        .expect("the watch stream ended with the controller");
    assert!(
        rest.iter().all(|l| l.is_ok()),
        "the stream ended cleanly: {rest:?}"
    );
    assert!(
        status.1.contains("serving the lease API over HTTPS"),
        "{}",
        status.1
    );
    assert!(status.1.contains("shutting down"), "{}", status.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_etcd_is_down_and_says_why() {
    let dead = free_addr();
    let addr = free_addr();
    let mut args = vec![
        "--etcd-endpoints".to_string(),
        format!("http://{dead}"),
        "--listen".into(),
        addr.clone(),
    ];
    args.extend(tls_args(&TestPki::shared()).unwrap());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = controller(&[], &args);
    let client = admin(&addr);
    wait_healthy(&client).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client.readiness().await.unwrap();
        assert!(!r.ready);
        if r.reasons.iter().any(|x| x.starts_with("store unreachable")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reason given: {:?}",
            r.reasons
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = client.list(false).await.unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert!(
        p.log().contains(&dead),
        "the log names the etcd endpoint:\n{}",
        p.log()
    );
}

#[test]
fn bad_flags_fail_with_a_message() {
    let bin = workspace_bin("weft-controller").unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(&bin)
        .args(["--listen", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
    let out = Command::new(&bin)
        .args(["--etcd-prefix", "relative/path", "--listen", &free_addr()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must start with '/'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_tls_only_loopback_unless_insecure_listen() {
    let bin = workspace_bin("weft-controller").unwrap_or_else(|e| panic!("{e:#}"));
    // Refused before anything is bound (198.18.0.1 is not on this host).
    let out = Command::new(&bin)
        .args(["--listen", "198.18.0.1:7070"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve the lease API without TLS on 198.18.0.1:7070")
            && err.contains("--tls-cert-file")
            && err.contains("--insecure-listen"),
        "{err}"
    );
    // Half the TLS flags: which are missing.
    let out = Command::new(&bin)
        .args(["--listen", &free_addr(), "--tls-cert-file", "/x.pem"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-key-file, --client-ca-file missing"),
        "{err}"
    );
    // Files that do not load: named.
    let out = Command::new(&bin)
        .args([
            "--listen",
            &free_addr(),
            "--tls-cert-file",
            "/nonexistent/server.pem",
            "--tls-key-file",
            "/nonexistent/server-key.pem",
            "--client-ca-file",
            "/nonexistent/ca.pem",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn insecure_listen_serves_and_warns() {
    // In a namespace of its own: 198.18.77.1 exists only there.
    weft_tests::netns::require_root();
    let ns = weft_tests::netns::Netns::new("insecure").unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&["addr", "add", "198.18.77.1/32", "dev", "lo"])
        .unwrap();
    let bin = workspace_bin("weft-controller").unwrap_or_else(|e| panic!("{e:#}"));
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()])
        .arg(&bin)
        .args([
            "--listen",
            "198.18.77.1:7070",
            "--insecure-listen",
            "--etcd-endpoints",
            "http://127.0.0.1:9",
        ])
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap());
    let mut child = weft_tests::process::spawn_tied(cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let readyz = loop {
        if let Ok((_, body)) = weft_tests::netns::http_get(ns.name(), "198.18.77.1:7070", "/readyz")
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no answer; log:\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    weft_tests::process::stop(&mut child, Duration::from_secs(5));
    assert!(
        readyz.contains("without TLS on 198.18.77.1:7070 (--insecure-listen)"),
        "{readyz}"
    );
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(log.contains("anyone who reaches it can take over"), "{log}");
}
