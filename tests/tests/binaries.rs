//! Every binary answers `--version` (version and git commit) and `--help`,
//! at once and without reading standard input (weft-cni is otherwise fed a
//! network configuration there, and a terminal never closes it).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weft_tests::bins::workspace_bin;

const BINARIES: &[&str] = &[
    "weft-controller",
    "weft-node",
    "weft-cni",
    "weftctl",
    "weft-lab",
    "weft-bench",
];

/// Runs `bin arg` with standard input left open; fails if it takes longer
/// than 10 s (it would be waiting for input).
fn run(bin: &str, arg: &str) -> (bool, String) {
    let mut child = Command::new(workspace_bin(bin).unwrap())
        .arg(arg)
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{bin} {arg} did not answer within 10 s (reading standard input?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status.success(), out)
}

/// The commit the build script saw: the repository's, or `unknown` when
/// built outside one.
fn commit_of(version_line: &str) -> &str {
    version_line
        .trim()
        .rsplit_once("(commit ")
        .and_then(|(_, c)| c.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no commit in {version_line:?}"))
}

#[test]
fn every_binary_answers_version_with_the_commit() {
    let in_repo = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.git")).exists();
    let mut commits = Vec::new();
    for bin in BINARIES {
        let (ok, out) = run(bin, "--version");
        assert!(ok, "{bin} --version failed: {out}");
        let expected = format!("{bin} {} (commit ", env!("CARGO_PKG_VERSION"));
        assert!(out.starts_with(&expected), "{bin}: {out:?}");
        let commit = commit_of(&out).to_string();
        if in_repo {
            assert!(
                commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
                "{bin}: commit {commit:?} is not a 12-digit hash"
            );
        }
        commits.push(commit);
    }
    commits.dedup();
    assert_eq!(
        commits.len(),
        1,
        "binaries of one build disagree: {commits:?}"
    );
}

#[test]
fn every_binary_answers_help() {
    for bin in BINARIES {
        let (ok, out) = run(bin, "--help");
        assert!(ok, "{bin} --help failed");
        assert!(out.contains("--version"), "{bin} --help: {out}");
    }
}

#[test]
fn the_controller_refuses_settings_that_cannot_work() {
    for (flag, value) in [
        ("--watch-history", "0"),
        ("--max-watchers", "0"),
        ("--watch-heartbeat", "0"),
    ] {
        let out = Command::new(workspace_bin("weft-controller").unwrap())
            .args([flag, value, "--etcd-endpoints", "http://127.0.0.1:1"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(err.contains(&format!("{flag} must be at least 1")), "{err}");
    }
}
