//! The weft-controller binary: flags, environment, start-up without etcd,
//! and shutdown on SIGTERM.

use futures::StreamExt;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weft_lease::client::ControllerClient;
use weft_tests::bins::workspace_bin;
use weft_tests::etcd;
use weft_tests::process::{spawn_tied, stop};

fn free_addr() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

struct Proc {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
    }
}

fn controller(env: &[(&str, &str)], args: &[&str]) -> Proc {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd =
        Command::new(workspace_bin("weft-controller").unwrap_or_else(|e| panic!("{e:#}")));
    cmd.envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap());
    Proc {
        child: spawn_tied(cmd).unwrap(),
        log,
    }
}

async fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let http = reqwest::Client::new();
    while http.get(format!("{url}/healthz")).send().await.is_err() {
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
    let mut p = controller(
        &[
            ("WEFT_CONTROLLER_ETCD_ENDPOINTS", &etcd_url),
            ("WEFT_CONTROLLER_LISTEN", &addr),
        ],
        &["--etcd-prefix", &prefix, "--watch-heartbeat", "1"],
    );
    let url = format!("http://{addr}");
    wait_healthy(&url).await;
    let client = ControllerClient::new(&url).unwrap();
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
        let s = stop(&mut p.child, Duration::from_secs(10));
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
    assert!(status.1.contains("serving the lease API"), "{}", status.1);
    assert!(status.1.contains("shutting down"), "{}", status.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_etcd_is_down_and_says_why() {
    let dead = free_addr();
    let addr = free_addr();
    let p = controller(
        &[],
        &[
            "--etcd-endpoints",
            &format!("http://{dead}"),
            "--listen",
            &addr,
        ],
    );
    let url = format!("http://{addr}");
    wait_healthy(&url).await;
    let client = ControllerClient::new(&url).unwrap();
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
