//! A busybox container image built on this machine, as an OCI image-layout
//! tarball that `ctr images import` takes: no registry involved. The one
//! layer holds Debian's static busybox and links for the applets tests use.

use anyhow::{ensure, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Where Debian's busybox-static puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets the image links to busybox.
const APPLETS: &[&str] = &[
    "sh", "ping", "ip", "sleep", "touch", "cat", "ls", "nc", "wget", "echo", "test", "[",
    "nslookup", "awk",
];

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A statically linked busybox: a dynamic one would find no libc in the image.
fn static_busybox() -> Result<Vec<u8>> {
    let bin = std::fs::read(BUSYBOX).with_context(|| {
        format!("{BUSYBOX} is missing: install Debian's busybox-static (scripts/test does)")
    })?;
    let interp = b"/lib64/ld-linux";
    ensure!(
        !bin.windows(interp.len()).any(|w| w == interp),
        "{BUSYBOX} is dynamically linked: install busybox-static instead of busybox"
    );
    Ok(bin)
}

fn header(kind: tar::EntryType, path: &str, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_path(path).expect("short ASCII path");
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The root filesystem layer, as an uncompressed tar.
fn layer() -> Result<Vec<u8>> {
    let busybox = static_busybox()?;
    let mut t = tar::Builder::new(Vec::new());
    for dir in ["bin/", "dev/", "etc/", "proc/", "sys/", "tmp/"] {
        let mut h = header(tar::EntryType::Directory, dir, 0, 0o755);
        h.set_cksum();
        t.append(&h, std::io::empty())?;
    }
    let mut h = header(
        tar::EntryType::Regular,
        "bin/busybox",
        busybox.len() as u64,
        0o755,
    );
    h.set_cksum();
    t.append(&h, busybox.as_slice())?;
    for a in APPLETS {
        let mut h = header(tar::EntryType::Symlink, &format!("bin/{a}"), 0, 0o777);
        h.set_link_name("busybox")?;
        h.set_cksum();
        t.append(&h, std::io::empty())?;
    }
    Ok(t.into_inner()?)
}

/// Writes an OCI image-layout tarball of busybox named `name` (e.g.
/// `weft.test/busybox:local`) to `out`.
pub fn busybox_image(name: &str, out: &Path) -> Result<()> {
    let layer = layer()?;
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {
                "org.opencontainers.image.ref.name": name,
                "io.containerd.image.name": name,
            },
        }],
    }))?;
    let mut t = tar::Builder::new(std::fs::File::create(out)?);
    let files: [(String, &[u8]); 5] = [
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
        (format!("blobs/sha256/{layer_digest}"), &layer),
        (format!("blobs/sha256/{config_digest}"), &config),
        (format!("blobs/sha256/{manifest_digest}"), &manifest),
    ];
    for (path, data) in files {
        let mut h = header(tar::EntryType::Regular, &path, data.len() as u64, 0o644);
        h.set_cksum();
        t.append(&h, data)?;
    }
    t.into_inner()?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(
            sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
