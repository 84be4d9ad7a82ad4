//! The node's key pairs on disk, one file per backend that has one
//! (`<state dir>/ipsec-key.json`, `<state dir>/wireguard-key.json`; both
//! X25519), mode 0600 in a directory of mode 0700, written atomically
//! (temporary file, fsync, rename, fsync of the directory), created on
//! first start and reused after restarts. The private key is never logged.

use crate::ipsec::keys::NodeKey;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Which backend's key, and its file under the state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Which {
    pub file: &'static str,
    /// For logs: "IPsec", "WireGuard".
    pub what: &'static str,
}

/// The ipsec backend's key.
pub const IPSEC: Which = Which {
    file: "ipsec-key.json",
    what: "IPsec",
};

/// The wireguard backend's key.
pub const WIREGUARD: Which = Which {
    file: "wireguard-key.json",
    what: "WireGuard",
};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    epoch: u64,
    /// Base64 of the X25519 secret.
    private_key: String,
    /// Base64 of the public key, for operators (checked on load).
    public_key: String,
}

/// Why the key cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a weft key file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("generating a key: {0}")]
    Generate(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyStoreError + '_ {
    move |source| KeyStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The key file's path.
pub fn path(state_dir: &Path, which: Which) -> PathBuf {
    state_dir.join(which.file)
}

/// Makes the state directory (mode 0700) if it is missing.
fn ensure_dir(dir: &Path) -> Result<(), KeyStoreError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        tracing::info!(dir = %dir.display(), "created the state directory");
    }
    Ok(())
}

/// Where the key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Read from the state directory: it was in use before.
    Loaded,
    /// Made now: no peer has seen it.
    Created,
}

/// Loads the key, or makes epoch 1 and stores it when there is none.
pub fn load_or_create(
    state_dir: &Path,
    which: Which,
) -> Result<(NodeKey, KeyOrigin), KeyStoreError> {
    let p = path(state_dir, which);
    match load(&p)? {
        Some(k) => {
            tracing::info!(file = %p.display(), epoch = k.epoch(), public_key = %public_b64(&k), "loaded the {} key", which.what);
            Ok((k, KeyOrigin::Loaded))
        }
        None => {
            ensure_dir(state_dir)?;
            let k = NodeKey::generate(1).map_err(|e| KeyStoreError::Generate(e.to_string()))?;
            store(state_dir, which, &k)?;
            tracing::info!(file = %p.display(), epoch = 1, public_key = %public_b64(&k), "created a {} key", which.what);
            Ok((k, KeyOrigin::Created))
        }
    }
}

/// The public key in base64, as the lease carries it.
pub fn public_b64(k: &NodeKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(k.public())
}

/// Reads the key file; `None` if there is none.
pub fn load(p: &Path) -> Result<Option<NodeKey>, KeyStoreError> {
    let meta = match fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(p)(e)),
    };
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %p.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the key file was readable by others; setting mode 0600");
        fs::set_permissions(p, fs::Permissions::from_mode(0o600)).map_err(io(p))?;
    }
    let text = Zeroizing::new(fs::read_to_string(p).map_err(io(p))?);
    parse_key(&text)
        .map(Some)
        .map_err(|reason| KeyStoreError::Invalid {
            path: p.to_path_buf(),
            reason,
        })
}

/// Reads the key file's text: the key, or why it is not one.
pub fn parse_key(text: &str) -> Result<NodeKey, String> {
    let s: Stored = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let raw = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(s.private_key.as_bytes())
            .map_err(|e| format!("private_key is not base64: {e}"))?,
    );
    let secret: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| format!("private_key is {} bytes, not 32", raw.len()))?;
    if s.epoch == 0 {
        return Err("epoch must be at least 1".into());
    }
    let k = NodeKey::from_secret(secret, s.epoch);
    if public_b64(&k) != s.public_key {
        return Err("public_key does not belong to private_key (edited by hand?)".into());
    }
    Ok(k)
}

/// Writes the key atomically with mode 0600.
pub fn store(state_dir: &Path, which: Which, k: &NodeKey) -> Result<(), KeyStoreError> {
    ensure_dir(state_dir)?;
    let p = path(state_dir, which);
    let body = Zeroizing::new(
        serde_json::to_string_pretty(&Stored {
            epoch: k.epoch(),
            private_key: base64::engine::general_purpose::STANDARD.encode(*k.secret_bytes()),
            public_key: public_b64(k),
        })
        .expect("a struct of strings serializes"),
    );
    let mut text = Zeroizing::new(body.as_bytes().to_vec());
    text.push(b'\n');
    write_private(state_dir, &p, &text)
}

/// Writes `path` in `state_dir` atomically with mode 0600: a fresh temporary
/// file, synced, renamed over it, and the directory synced.
fn write_private(state_dir: &Path, path: &Path, body: &[u8]) -> Result<(), KeyStoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = state_dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(body)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(state_dir))
}

/// The largest PSK file read.
pub const MAX_PSK: u64 = 4096;

/// Reads the cluster PSK from a node-local file (`--ipsec-psk-file`): a
/// regular file (not a link) owned by root (or the user weft-node runs
/// as), mode 0600 or stricter, at most
/// [`MAX_PSK`] bytes. Anything else is refused: whoever could write or read
/// it could read the traffic. A trailing newline is not part of the key.
pub fn read_psk(file: &Path) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    use std::os::unix::fs::MetadataExt;
    let invalid = |reason: String| KeyStoreError::Invalid {
        path: file.to_path_buf(),
        reason,
    };
    let meta = fs::symlink_metadata(file).map_err(io(file))?;
    if !meta.file_type().is_file() {
        return Err(invalid(
            "not a regular file (links are not followed)".into(),
        ));
    }
    // Root, or whoever weft-node runs as (root in production; tests run as
    // anyone).
    let me = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if meta.uid() != 0 && meta.uid() != me {
        return Err(invalid(format!("owned by uid {}, not root", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "mode {:o}: others may read or write it; chmod 600",
            meta.mode() & 0o777
        )));
    }
    if meta.len() > MAX_PSK {
        return Err(invalid(format!(
            "{} bytes; a PSK file holds at most {MAX_PSK}",
            meta.len()
        )));
    }
    let mut raw = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    {
        use std::io::Read;
        let f = fs::File::open(file).map_err(io(file))?;
        f.take(MAX_PSK + 1)
            .read_to_end(&mut raw)
            .map_err(io(file))?;
    }
    if raw.len() as u64 > MAX_PSK {
        return Err(invalid("it grew while being read".into()));
    }
    psk_from_bytes(raw).map_err(invalid)
}

/// The PSK in a PSK file's bytes: without trailing newlines, not empty, at
/// most [`MAX_PSK`] bytes.
pub fn psk_from_bytes(mut raw: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>, String> {
    if raw.len() as u64 > MAX_PSK {
        return Err(format!(
            "{} bytes; a PSK file holds at most {MAX_PSK}",
            raw.len()
        ));
    }
    while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        raw.pop();
    }
    if raw.is_empty() {
        return Err("the PSK file is empty".into());
    }
    Ok(raw)
}

/// The file where the node remembers the backend it last ran.
fn backend_path(state_dir: &Path) -> PathBuf {
    state_dir.join("backend")
}

/// The backend this node last ran, from its state directory.
pub fn remembered_backend(state_dir: &Path) -> Result<Option<String>, KeyStoreError> {
    let p = backend_path(state_dir);
    match fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&p)(e)),
    }
}

/// Remembers `backend` as the one this node runs (atomically, 0600).
pub fn remember_backend(state_dir: &Path, backend: &str) -> Result<(), KeyStoreError> {
    ensure_dir(state_dir)?;
    write_private(
        state_dir,
        &backend_path(state_dir),
        format!("{backend}\n").as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("weft");
        let (a, origin) = load_or_create(&state, IPSEC).unwrap();
        assert_eq!((a.epoch(), origin), (1, KeyOrigin::Created));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path(&state, IPSEC)), 0o600);
        assert_eq!(mode(&state), 0o700);
        let (b, origin) = load_or_create(&state, IPSEC).unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(a.public(), b.public());
        assert_eq!(*a.secret_bytes(), *b.secret_bytes());
        // A rotation is stored and read back.
        let c = NodeKey::generate(2).unwrap();
        store(&state, IPSEC, &c).unwrap();
        let (d, _) = load_or_create(&state, IPSEC).unwrap();
        assert_eq!((d.epoch(), d.public()), (2, c.public()));
        assert_eq!(mode(&path(&state, IPSEC)), 0o600);
    }

    #[test]
    fn a_loose_mode_is_tightened_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let k = NodeKey::generate(3).unwrap();
        store(dir.path(), IPSEC, &k).unwrap();
        let p = path(dir.path(), IPSEC);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(&p).unwrap().unwrap().epoch(), 3);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let text = fs::read_to_string(&p).unwrap();
        let other = NodeKey::generate(3).unwrap();
        fs::write(&p, text.replace(&public_b64(&k), &public_b64(&other))).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("does not belong"), "{e}");
        fs::write(&p, "{").unwrap();
        assert!(matches!(load(&p), Err(KeyStoreError::Invalid { .. })));
        fs::write(
            &p,
            r#"{"epoch":1,"private_key":"c2hvcnQ=","public_key":""}"#,
        )
        .unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("5 bytes"), "{e}");
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let (k, _) = load_or_create(dir.path(), IPSEC).unwrap();
        let secret = base64::engine::general_purpose::STANDARD.encode(*k.secret_bytes());
        assert!(fs::read_to_string(path(dir.path(), IPSEC))
            .unwrap()
            .contains(&secret));
        assert!(!format!("{k:?}").contains(&secret));
    }

    #[test]
    fn psk_files_are_read_without_the_newline_and_only_when_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("psk");
        fs::write(&p, "s3cret\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_psk(&p).unwrap().as_slice(), b"s3cret");
        fs::write(&p, "\n").unwrap();
        assert!(read_psk(&p).is_err());
        assert!(read_psk(&dir.path().join("missing")).is_err());
        // Readable by others.
        fs::write(&p, "s3cret").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_psk(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        // A link, even to a good file.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = read_psk(&link).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Too long.
        fs::write(&p, vec![b'k'; 5000]).unwrap();
        let e = read_psk(&p).unwrap_err().to_string();
        assert!(e.contains("at most 4096"), "{e}");
    }
}
