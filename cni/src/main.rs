//! `weft-cni`: the CNI plugin of weft (spec 1.0.0; 0.3.x, 0.4.0 and 1.1.0
//! configurations too). Attaches containers to the node bridge with an
//! address from the node's subnet, as weft-node wrote it in subnet.env.

use serde_json::json;
use std::io::Read;
use std::process::ExitCode;
use weft_cni::cmd;
use weft_cni::spec::{CniError, Code, NetConf, SUPPORTED};

fn run(command: &str, stdin: &[u8]) -> Result<Option<serde_json::Value>, (CniError, String)> {
    // The version to answer in, as far as the input tells it.
    let version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|x| x.as_str())
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".into());
    let fail = |e: CniError| (e, version.clone());
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED}),
        ));
    }
    let conf = NetConf::parse(stdin).map_err(fail)?;
    let get = |k: &str| std::env::var(k).ok();
    match command {
        "ADD" => {
            let env = cmd::Env::read(command, get).map_err(fail)?;
            let result = cmd::add(&conf, &env).map_err(fail)?;
            Ok(Some(result.to_json(&conf.cni_version)))
        }
        "DEL" => {
            let env = cmd::Env::read(command, get).map_err(fail)?;
            cmd::del(&conf, &env).map_err(fail).map(|_| None)
        }
        "CHECK" => {
            let env = cmd::Env::read(command, get).map_err(fail)?;
            cmd::check(&conf, &env).map_err(fail).map(|_| None)
        }
        "STATUS" => cmd::status(&conf).map_err(fail).map(|_| None),
        "GC" => cmd::gc(&conf).map_err(fail).map(|_| None),
        other => Err(fail(CniError::new(
            Code::InvalidEnv,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        ))),
    }
}

const HELP: &str = "\
weft-cni: the CNI plugin of weft. A container runtime (containerd, CRI-O,
podman) runs it with CNI_COMMAND set and the network configuration on
standard input; it gives the container a veth on the node's bridge and an
address from the node's subnet (weft-node writes it to subnet.env).

Install: /opt/cni/bin/weft-cni, and a network configuration in
/etc/cni/net.d (example: /usr/share/doc/weft-cni/examples/10-weft.conflist).

Commands (CNI_COMMAND): ADD, DEL, CHECK, STATUS, GC, VERSION.
Configuration keys: subnetFile, dataDir, bridge, mtu, isDefaultGateway,
hairpinMode, nodeSocket, args.cni.aliases.

Names (service discovery): runtimeConfig.aliases, CNI_ARGS K8S_POD_NAME and
K8S_POD_NAMESPACE, CNI_ARGS WEFT_NAME=a,b; weft-node serves <name>.<domain>.

Options:
  -h, --help     Print this help
  -V, --version  Print the version
";

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    // A person at a terminal; a runtime never passes arguments. Answered
    // before reading standard input, which a terminal would never close.
    if command.is_empty() {
        match std::env::args().nth(1).as_deref() {
            Some("--version" | "-V") => {
                println!("weft-cni {}", env!("WEFT_VERSION"));
                return ExitCode::SUCCESS;
            }
            Some("--help" | "-h") => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            _ => {}
        }
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let e = CniError::new(Code::Io, format!("reading the configuration: {e}"));
        println!("{}", e.to_json("1.0.0"));
        return ExitCode::from(1);
    }
    if command.is_empty() {
        eprintln!("weft-cni is a CNI plugin: a container runtime runs it with CNI_COMMAND set (see the CNI specification)");
        let e = CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set");
        println!("{}", e.to_json("1.0.0"));
        return ExitCode::from(1);
    }
    match run(&command, &stdin) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((e, version)) => {
            println!("{}", e.to_json(&version));
            ExitCode::from(1)
        }
    }
}
