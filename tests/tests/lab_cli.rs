//! The weft-lab command: a lab outlives the command that built it, and
//! `down` removes everything, also what a crashed run left without state.

use std::process::Command;
use weft_tests::bins::workspace_bin;

fn weft_lab(args: &[&str]) -> (i32, String, String) {
    let bin = workspace_bin("weft-lab").unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lab_namespaces(name: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<String>>()
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|n: &String| n.starts_with(&format!("wl-{name}-")))
        .collect()
}

fn lab_processes(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for ns in lab_namespaces(name) {
        if let Ok(out) = weft_tests::netns::run("ip", &["netns", "pids", &ns]) {
            pids.extend(out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    pids
}

/// Takes the lab down when the test ends, also when it fails.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = weft_lab(&["down", "--name", &self.0]);
    }
}

#[test]
#[ignore = "needs root; run by scripts/test"]
fn up_status_ping_down_and_recovery_from_a_crash() {
    weft_tests::netns::require_root();
    let name = format!("cli{}", std::process::id());
    let _down = Down(name.clone());
    let (code, out, err) = weft_lab(&["up", "2", "--name", &name]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("host-1") && out.contains("host-2") && out.contains("ready"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
    // The processes outlived the command that started them.
    assert!(
        lab_processes(&name).len() >= 4,
        "etcd, controller and two nodes keep running"
    );
    let (code, out, _) = weft_lab(&["ping", "--name", &name]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.matches(" ok ").count() + out.matches(" ok\n").count(),
        2,
        "{out}"
    );
    // Pods come and go through weft-cni; the state file follows.
    let (code, out, err) = weft_lab(&["add-pod", "2", "--name", &name]);
    assert_eq!(code, 0, "{out}{err}");
    let pod = out.split_whitespace().nth(1).unwrap().to_string();
    assert!(pod.ends_with("-h2-p2"), "{out}");
    let (code, out, _) = weft_lab(&["ping", "--name", &name]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.matches(" ok").count(),
        6,
        "three pods, six pairs: {out}"
    );
    // A named pod answers by name on the other host.
    let (code, out, err) = weft_lab(&["add-pod", "2", "--as", "web", "--name", &name]);
    assert_eq!(code, 0, "{out}{err}");
    let web = out.split_whitespace().nth(3).unwrap().to_string();
    // (It takes a few milliseconds to reach host 1.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (code, out, err) = loop {
        let r = weft_lab(&["lookup", "1", "web.weft", "--name", &name]);
        if r.0 == 0 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, format!("web.weft A {web}\n"));
    let (code, out, _) = weft_lab(&["lookup", "1", "nobody.weft", "--name", &name]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Non-Existent Domain"), "{out}");
    let (code, out, err) = weft_lab(&["del-pod", "2", &pod, "--name", &name]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!lab_namespaces(&name).contains(&pod));
    let (code, out, _) = weft_lab(&["cni-conf", "1", "--name", &name]);
    assert_eq!(code, 0, "{out}");
    let conf: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(conf["type"], "weft-cni");
    assert!(conf["subnetFile"]
        .as_str()
        .unwrap()
        .ends_with("h1-subnet.env"));
    let (code, _, err) = weft_lab(&["up", "2", "--name", &name]);
    assert_eq!(code, 1);
    assert!(err.contains("already up"), "{err}");

    // A crash that lost the state file: down still finds everything.
    std::fs::remove_file(format!("/run/weft-lab/{name}/state.json")).unwrap();
    let (code, out, _) = weft_lab(&["down", "--name", &name]);
    assert_eq!(code, 0, "{out}");
    assert!(
        lab_namespaces(&name).is_empty(),
        "{:?}",
        lab_namespaces(&name)
    );
    let (code, out, _) = weft_lab(&["status", "--name", &name]);
    assert_eq!(code, 1, "{out}");
    let (code, out, _) = weft_lab(&["down", "--name", &name]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("no lab named {name}").as_str())
    );
}
