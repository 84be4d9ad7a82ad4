//! Container names (service discovery): which names a container asks for,
//! where weft-cni keeps them, and telling weft-node.
//!
//! Names come from the runtime config's `aliases` capability (podman's and
//! netavark's convention: `{"aliases": {"<network>": ["web", ...]}}`), from
//! `args.cni.aliases` in the network config (for runtimes such as `ctr run
//! --cni` that pass nothing else), from `K8S_POD_NAME` / `K8S_POD_NAMESPACE`
//! in `CNI_ARGS` (`<pod>.<namespace>`) and from `WEFT_NAME` in `CNI_ARGS`
//! (several separated by commas). They
//! are kept in `names.json` in the address store, under its lock, so
//! weft-node finds them after either restarts; ADD, DEL and GC then wake
//! weft-node over its control socket (local, root only) to register or
//! withdraw them at once.

use crate::ipam::Store;
use crate::spec::{CniError, Code, NetConf};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;
use weft_config::{AttachmentNames, DnsName, NamesFile, MAX_NAMES_PER_CONTAINER, NAMES_FILE};

/// The names a container asks for, checked; none is fine.
pub fn requested(conf: &NetConf, cni_args: &str) -> Result<Vec<DnsName>, CniError> {
    let mut names: Vec<DnsName> = Vec::new();
    let mut push = |n: DnsName| {
        if !names.contains(&n) {
            names.push(n);
        }
    };
    let runtime = conf.runtime_config.aliases.get(&conf.name);
    for (a, from) in runtime
        .into_iter()
        .flatten()
        .map(|a| (a, "runtimeConfig.aliases"))
        .chain(
            conf.args
                .cni
                .aliases
                .iter()
                .map(|a| (a, "args.cni.aliases")),
        )
    {
        let n = a.parse().map_err(|e| {
            CniError::new(
                Code::InvalidConfig,
                format!("{from} of network {}: {e}", conf.name),
            )
        })?;
        push(n);
    }
    let (mut pod, mut namespace) = (None, None);
    for pair in cni_args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            ));
        };
        match k {
            "K8S_POD_NAME" => pod = Some(v),
            "K8S_POD_NAMESPACE" => namespace = Some(v),
            "WEFT_NAME" => {
                for one in v.split(',') {
                    push(one.parse().map_err(|e| {
                        CniError::new(Code::InvalidEnv, format!("CNI_ARGS WEFT_NAME: {e}"))
                    })?);
                }
            }
            _ => {}
        }
    }
    // Kubernetes allows pod names DNS does not (a label of 64 or more
    // characters, 253 with the namespace): such a pod still starts,
    // without the name.
    if let Some(pod) = pod.filter(|p| !p.is_empty()) {
        let full = match namespace.filter(|n| !n.is_empty()) {
            Some(ns) => format!("{pod}.{ns}"),
            None => pod.to_string(),
        };
        match full.parse() {
            Ok(n) => push(n),
            Err(e) => eprintln!(
                "weft-cni: the pod gets no name from CNI_ARGS K8S_POD_NAME and K8S_POD_NAMESPACE: {e}"
            ),
        }
    }
    if names.len() > MAX_NAMES_PER_CONTAINER {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "the container asks for {} names; at most {MAX_NAMES_PER_CONTAINER}",
                names.len()
            ),
        ));
    }
    Ok(names)
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::new(Code::Io, format!("{}: {e}", path.display()))
}

/// The names file of a store (empty when there is none yet). One that
/// cannot be read as a names file is moved aside (`names.json.corrupt`,
/// for a person to look at) and counts as empty: it must not stop every
/// ADD and DEL on the node. weft-node then withdraws the names it listed
/// until their containers are added again.
pub fn read(store: &Store) -> Result<NamesFile, CniError> {
    let path = store.dir().join(NAMES_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match NamesFile::parse(&text) {
            Ok(f) => Ok(f),
            Err(e) => {
                let aside = store.dir().join(format!("{NAMES_FILE}.corrupt"));
                eprintln!(
                    "weft-cni: {}: {e}; moved to {} and started anew",
                    path.display(),
                    aside.display()
                );
                std::fs::rename(&path, &aside).map_err(|e| io_err(&path, e))?;
                Ok(NamesFile::default())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NamesFile::default()),
        Err(e) => Err(io_err(&path, e)),
    }
}

/// Changes the names file of a store (whose lock the caller holds):
/// written to a temporary file and renamed, so weft-node never reads half
/// of it.
pub fn update(store: &Store, change: impl FnOnce(&mut NamesFile)) -> Result<(), CniError> {
    let mut file = read(store)?;
    let before = file.clone();
    change(&mut file);
    if file == before {
        return Ok(());
    }
    let path = store.dir().join(NAMES_FILE);
    let tmp = store.dir().join(format!("{NAMES_FILE}.tmp"));
    std::fs::write(&tmp, file.render()).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
}

/// An attachment's entry.
pub fn entry(
    container_id: &str,
    ifname: &str,
    names: Vec<DnsName>,
    addresses: Vec<std::net::IpAddr>,
) -> AttachmentNames {
    AttachmentNames {
        container_id: container_id.into(),
        ifname: ifname.into(),
        names,
        addresses,
    }
}

/// How long weft-node gets to answer.
const TELL_TIMEOUT: Duration = Duration::from_secs(2);

/// Wakes weft-node to register the names file now. Best effort: a node
/// that is not running reads the file when it starts, so a failure is
/// only reported on stderr (the runtime's log).
pub fn tell_node(socket: &Path) {
    if let Err(e) = exchange(socket) {
        eprintln!(
            "weft-cni: weft-node at {}: {e}; it registers the container's names when it next reads {NAMES_FILE}",
            socket.display()
        );
    }
}

fn exchange(socket: &Path) -> Result<(), String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TELL_TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(TELL_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"names\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(s, 4096))
        .read_line(&mut line)
        .map_err(|e| format!("no answer: {e}"))?;
    if line.contains("\"refused\"") {
        return Err(format!("refused: {}", line.trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft-cni"{extra}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    fn names(v: &[DnsName]) -> Vec<&str> {
        v.iter().map(DnsName::as_str).collect()
    }

    #[test]
    fn names_come_from_aliases_pod_and_weft_name() {
        let c = conf(r#","runtimeConfig":{"aliases":{"weft":["web","Api"],"other":["x"]}}"#);
        let got = requested(
            &c,
            "IgnoreUnknown=1;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;WEFT_NAME=web,cache",
        )
        .unwrap();
        assert_eq!(names(&got), ["web", "api", "cache", "web-0.shop"]);
        let c = conf(r#","args":{"cni":{"aliases":["db"],"ips":["10.244.3.9"]}}"#);
        assert_eq!(names(&requested(&c, "").unwrap()), ["db"]);
        let c = conf(r#","args":{"cni":{"aliases":["db!"]}}"#);
        assert!(requested(&c, "")
            .unwrap_err()
            .msg
            .contains("args.cni.aliases"));
        assert!(requested(&conf(""), "").unwrap().is_empty());
        assert_eq!(
            names(&requested(&conf(""), "K8S_POD_NAME=solo").unwrap()),
            ["solo"]
        );
    }

    #[test]
    fn names_that_are_not_rfc1123_are_refused_clearly() {
        let c = conf(r#","runtimeConfig":{"aliases":{"weft":["web_1"]}}"#);
        let e = requested(&c, "").unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(
            e.msg.contains("runtimeConfig.aliases") && e.msg.contains("RFC 1123"),
            "{}",
            e.msg
        );
        // A Kubernetes pod whose name DNS cannot carry starts without it.
        let long = format!("K8S_POD_NAME={};K8S_POD_NAMESPACE=x", "p".repeat(70));
        assert!(requested(&conf(""), &long).unwrap().is_empty());
        assert!(
            requested(&conf(""), "K8S_POD_NAME=Web_0;K8S_POD_NAMESPACE=x")
                .unwrap()
                .is_empty()
        );
        for args in ["WEFT_NAME=a b", "WEFT_NAME=", "novalue"] {
            let e = requested(&conf(""), args).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnv, "{args}: {}", e.msg);
            assert!(e.msg.contains("CNI_ARGS"), "{args}: {}", e.msg);
        }
        let many: Vec<String> = (0..=MAX_NAMES_PER_CONTAINER)
            .map(|i| format!("n{i}"))
            .collect();
        let e = requested(&conf(""), &format!("WEFT_NAME={}", many.join(","))).unwrap_err();
        assert!(e.msg.contains("at most"), "{}", e.msg);
    }

    #[test]
    fn the_names_file_is_changed_under_the_store_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "weft").unwrap();
        assert_eq!(read(&store).unwrap(), NamesFile::default());
        let web: DnsName = "web".parse().unwrap();
        update(&store, |f| {
            f.set(entry(
                "c1",
                "eth0",
                vec![web.clone()],
                vec!["10.244.3.5".parse().unwrap()],
            ))
        })
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("weft").join(NAMES_FILE)).unwrap();
        assert!(text.contains("\"web\""), "{text}");
        // The address store does not take it for an address.
        assert!(store.entries().unwrap().is_empty());
        update(&store, |f| {
            f.remove("c1", "eth0");
        })
        .unwrap();
        assert!(read(&store).unwrap().attachments.is_empty());
        // Garbage is moved aside, not a failure of every ADD and DEL.
        std::fs::write(dir.path().join("weft").join(NAMES_FILE), "garbage").unwrap();
        assert_eq!(read(&store).unwrap(), NamesFile::default());
        let aside = dir
            .path()
            .join("weft")
            .join(format!("{NAMES_FILE}.corrupt"));
        assert_eq!(std::fs::read_to_string(aside).unwrap(), "garbage");
        assert!(!dir.path().join("weft").join(NAMES_FILE).exists());
    }

    #[test]
    fn telling_a_node_that_is_not_there_is_no_failure() {
        tell_node(Path::new("/nonexistent/weft-node.sock"));
        assert!(exchange(Path::new("/nonexistent/weft-node.sock")).is_err());
    }
}
