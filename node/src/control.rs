//! The control socket (`--control-socket`, default `/run/weft/node.sock`):
//! `weftctl node rekey` asks for a key rotation (ipsec, wireguard) here. The socket is
//! mode 0600 and every caller's credentials are checked (root only), and
//! rotations asked for here are at least [`REKEY_SPACING`] apart. The
//! protocol is in [`weft_lease::node_control`].

use crate::rekey::RekeyRequest;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tokio::time::Instant;
use weft_lease::node_control::{ControlReply, MAX_REQUEST};

/// The least time between two rotations asked for on the socket.
pub const REKEY_SPACING: Duration = Duration::from_secs(30);

/// Connections served at once; more are answered `busy`.
const MAX_CONNECTIONS: usize = 8;

/// How long a caller may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Who may ask, and how often.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The only uid served (0 in the daemon; tests use their own).
    pub uid: u32,
    pub rekey_spacing: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            uid: 0,
            rekey_spacing: REKEY_SPACING,
        }
    }
}

/// A bound control socket; dropping it removes the socket file (if it is
/// still the one this process made).
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl ControlSocket {
    /// Binds `path` (mode 0600). A stale socket left by a daemon that died
    /// is replaced; a socket another daemon still answers on, or a file
    /// that is not a socket, is an error.
    pub fn bind(path: &Path) -> Result<Self> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir)
                    .with_context(|| {
                        format!("--control-socket {shown}: creating {}", dir.display())
                    })?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    bail!("--control-socket {shown}: another process (a second weft-node?) is serving it");
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("--control-socket {shown}: removing the stale socket"))?;
                tracing::info!(socket = %shown, "replaced a stale control socket");
            }
            Ok(_) => bail!(
                "--control-socket {shown}: exists and is not a socket; remove it or choose another path"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("--control-socket {shown}")),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("--control-socket {shown}: cannot listen"))?;
        // Connections made before this chmod are still checked by uid.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("--control-socket {shown}: chmod 0600"))?;
        let ino = std::fs::symlink_metadata(path)
            .with_context(|| format!("--control-socket {shown}"))?
            .ino();
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
            ino,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers requests until dropped. `rekey` goes to the rotation task;
    /// when that channel is closed the node's backend has no key.
    pub async fn serve(
        self,
        rekey: mpsc::Sender<RekeyRequest>,
        names: Arc<tokio::sync::Notify>,
        policy: Policy,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let last_rekey: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tokio::spawn(answer(
                    stream,
                    ControlReply::refused("busy", "too many requests at once", true),
                ));
                continue;
            };
            let (rekey, last_rekey, names) = (rekey.clone(), last_rekey.clone(), names.clone());
            tokio::spawn(async move {
                let _slot = slot;
                handle(stream, rekey, &names, policy, last_rekey).await;
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Only our own socket: a newer daemon may have replaced it.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn answer(mut stream: UnixStream, reply: ControlReply) {
    let mut line = serde_json::to_string(&reply).unwrap_or_default();
    line.push('\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(line.as_bytes())).await;
}

async fn handle(
    mut stream: UnixStream,
    rekey: mpsc::Sender<RekeyRequest>,
    names: &tokio::sync::Notify,
    policy: Policy,
    last_rekey: Arc<Mutex<Option<Instant>>>,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("control socket: no peer credentials ({e}); refused");
            return;
        }
    };
    let (uid, pid) = (cred.uid(), cred.pid());
    if uid != policy.uid {
        tracing::warn!(
            uid,
            pid,
            "control socket: refused a caller that is not root"
        );
        let msg = format!("only root may use the control socket (you are uid {uid})");
        return answer(stream, ControlReply::refused("forbidden", msg, false)).await;
    }
    let mut line = String::new();
    let read = {
        let mut r = BufReader::new(&mut stream).take(MAX_REQUEST as u64);
        tokio::time::timeout(REQUEST_TIMEOUT, r.read_line(&mut line)).await
    };
    let command = match read {
        Ok(Ok(_)) if line.ends_with('\n') => line.trim_end().to_string(),
        Ok(Ok(_)) => {
            let msg =
                format!("one request line of at most {MAX_REQUEST} bytes, ended by a newline");
            return answer(stream, ControlReply::refused("bad_request", msg, false)).await;
        }
        Ok(Err(e)) => {
            tracing::debug!("control socket: reading a request: {e}");
            return;
        }
        Err(_) => {
            let msg = format!("no request line within {REQUEST_TIMEOUT:?}");
            return answer(stream, ControlReply::refused("bad_request", msg, false)).await;
        }
    };
    let reply = match command.as_str() {
        "rekey" => rekey_now(&rekey, policy, &last_rekey, pid).await,
        // weft-cni changed its names file: register it now.
        "names" => {
            names.notify_one();
            ControlReply::NamesQueued
        }
        other => ControlReply::refused(
            "unknown_command",
            format!(
                "unknown request {:?}; this node understands: rekey, names",
                other.escape_debug().to_string()
            ),
            false,
        ),
    };
    answer(stream, reply).await;
}

async fn rekey_now(
    rekey: &mpsc::Sender<RekeyRequest>,
    policy: Policy,
    last_rekey: &Mutex<Option<Instant>>,
    pid: Option<i32>,
) -> ControlReply {
    if rekey.is_closed() {
        return ControlReply::refused(
            "no_key",
            "this node's backend has no key to rotate (ipsec and wireguard have)",
            false,
        );
    }
    {
        let mut last = last_rekey.lock().await;
        if let Some(t) = *last {
            let since = t.elapsed();
            if since < policy.rekey_spacing {
                let wait = (policy.rekey_spacing - since).as_secs() + 1;
                tracing::warn!(
                    pid,
                    "control socket: a rotation was asked for {since:?} after the last; refused"
                );
                return ControlReply::refused(
                    "rate_limited",
                    format!(
                        "the last rotation asked for here was {}s ago; at most one per {}s (try again in {wait}s)",
                        since.as_secs(),
                        policy.rekey_spacing.as_secs()
                    ),
                    true,
                );
            }
        }
        *last = Some(Instant::now());
    }
    tracing::info!(pid, "control socket: key rotation asked for");
    let (tx, rx) = oneshot::channel();
    if rekey.send(tx).await.is_err() {
        return ControlReply::refused(
            "no_key",
            "this node's backend has no key to rotate (ipsec and wireguard have)",
            false,
        );
    }
    match rx.await {
        Ok(Ok(epoch)) => ControlReply::Rotated { epoch },
        Ok(Err(e)) => ControlReply::refused("rekey_failed", e, true),
        Err(_) => ControlReply::refused("stopping", "the daemon is stopping", true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_lease::node_control::request;

    fn me() -> u32 {
        std::fs::metadata("/proc/self").unwrap().uid()
    }

    fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("run").join("node.sock")
    }

    /// A rotation task that answers every request with the next epoch.
    fn rotator() -> (mpsc::Sender<RekeyRequest>, tokio::task::JoinHandle<u32>) {
        let (tx, mut rx) = mpsc::channel::<RekeyRequest>(4);
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Some(reply) = rx.recv().await {
                n += 1;
                let _ = reply.send(Ok(u64::from(n) + 1));
            }
            n
        });
        (tx, task)
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_rotation_is_answered_with_its_epoch_and_the_next_one_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let sock = ControlSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (tx, task) = rotator();
        let policy = Policy {
            uid: me(),
            rekey_spacing: Duration::from_secs(3600),
        };
        let server = tokio::spawn(sock.serve(tx, Default::default(), policy));
        assert_eq!(
            request(&path, "rekey", WAIT).await.unwrap(),
            ControlReply::Rotated { epoch: 2 }
        );
        match request(&path, "rekey", WAIT).await.unwrap() {
            ControlReply::Refused {
                error,
                retryable,
                message,
            } => {
                assert_eq!(error, "rate_limited");
                assert!(retryable);
                assert!(message.contains("at most one per 3600s"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        server.abort();
        let _ = server.await;
        // Dropping the socket removed its file, and only one rotation ran.
        assert!(!path.exists());
        assert_eq!(task.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn another_uid_unknown_requests_and_no_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let (tx, task) = rotator();
        // Served for another uid: this caller is refused, nothing rotates.
        let sock = ControlSocket::bind(&path).unwrap();
        let other = Policy {
            uid: me().wrapping_add(1),
            ..Policy::default()
        };
        let server = tokio::spawn(sock.serve(tx.clone(), Default::default(), other));
        match request(&path, "rekey", WAIT).await.unwrap() {
            ControlReply::Refused { error, message, .. } => {
                assert_eq!(error, "forbidden");
                assert!(message.contains(&format!("uid {}", me())), "{message}");
            }
            other => panic!("{other:?}"),
        }
        server.abort();
        let _ = server.await;
        let sock = ControlSocket::bind(&path).unwrap();
        let policy = Policy {
            uid: me(),
            ..Policy::default()
        };
        let server = tokio::spawn(sock.serve(tx, Default::default(), policy));
        for bad in ["reboot", "", "rekey now"] {
            match request(&path, bad, WAIT).await.unwrap() {
                ControlReply::Refused { error, .. } => {
                    assert_eq!(error, "unknown_command", "{bad:?}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // A line longer than the limit is refused without being read on.
        let long = "x".repeat(MAX_REQUEST * 4);
        match request(&path, &long, WAIT).await.unwrap() {
            ControlReply::Refused { error, .. } => assert_eq!(error, "bad_request"),
            other => panic!("{other:?}"),
        }
        server.abort();
        let _ = server.await;
        assert_eq!(task.await.unwrap_or(0), 0, "nothing rotated");
        // No key (vxlan, host-gw): the rotation task is gone.
        let (closed, rx) = mpsc::channel::<RekeyRequest>(1);
        drop(rx);
        let sock = ControlSocket::bind(&path).unwrap();
        let server = tokio::spawn(sock.serve(closed, Default::default(), policy));
        match request(&path, "rekey", WAIT).await.unwrap() {
            ControlReply::Refused { error, .. } => assert_eq!(error, "no_key"),
            other => panic!("{other:?}"),
        }
        server.abort();
    }

    #[tokio::test]
    async fn names_wakes_the_registrar_as_weft_cni_asks() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let sock = ControlSocket::bind(&path).unwrap();
        let (tx, _task) = rotator();
        let wake = Arc::new(tokio::sync::Notify::new());
        let policy = Policy {
            uid: me(),
            ..Policy::default()
        };
        let server = tokio::spawn(sock.serve(tx, wake.clone(), policy));
        assert_eq!(
            request(&path, "names", WAIT).await.unwrap(),
            ControlReply::NamesQueued
        );
        tokio::time::timeout(WAIT, wake.notified())
            .await
            .expect("the registrar is woken");
        // weft-cni's own client (blocking, another process) gets the same.
        let cni = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                use std::io::{BufRead, Write};
                let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
                s.write_all(b"names\n").unwrap();
                let mut line = String::new();
                std::io::BufReader::new(s).read_line(&mut line).unwrap();
                line
            }
        });
        assert_eq!(cni.await.unwrap().trim(), r#"{"result":"names_queued"}"#);
        server.abort();
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_or_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Stale: a socket nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = ControlSocket::bind(&path).unwrap();
        // Live: a second daemon must not take it over.
        let e = ControlSocket::bind(&path).unwrap_err();
        assert!(format!("{e:#}").contains("another process"), "{e:#}");
        drop(live);
        assert!(!path.exists());
        // Not a socket: left alone.
        std::fs::write(&path, "keep me").unwrap();
        let e = ControlSocket::bind(&path).unwrap_err();
        assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        // Nobody there: a clear error for weftctl.
        std::fs::remove_file(&path).unwrap();
        let e = request(&path, "rekey", WAIT).await.unwrap_err();
        assert!(e.retryable());
        assert!(e.to_string().contains("is weft-node running"), "{e}");
    }
}
