//! The node daemon's control socket: a Unix socket only root may use
//! (the daemon checks the caller's credentials), for operations that change
//! the node: the key rotation of ipsec and wireguard (`weftctl node rekey`),
//! and `names` from weft-cni when a container's names changed.
//!
//! The protocol is one request line and one answer line per connection:
//! the client writes `rekey\n`, the daemon answers with one JSON object
//! ([`ControlReply`]) and a newline, then closes.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Where weft-node listens unless told otherwise (`--control-socket`).
pub const DEFAULT_SOCKET: &str = "/run/weft/node.sock";

/// The longest request line the daemon reads (bytes, newline included).
pub const MAX_REQUEST: usize = 64;

/// The longest answer line a client reads (bytes).
pub const MAX_REPLY: usize = 4096;

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlReply {
    /// The key was rotated; peers switch over within seconds.
    Rotated { epoch: u64 },
    /// `names`: the node reads weft-cni's names file and registers it now.
    NamesQueued,
    /// Nothing was done.
    Refused {
        /// A stable word: `forbidden`, `rate_limited`, `no_key`,
        /// `unknown_command`, `rekey_failed`, `busy`, `stopping`.
        error: String,
        message: String,
        /// Asking again later may succeed.
        retryable: bool,
    },
}

impl ControlReply {
    pub fn refused(error: &str, message: impl Into<String>, retryable: bool) -> Self {
        ControlReply::Refused {
            error: error.into(),
            message: message.into(),
            retryable,
        }
    }
}

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "{path}: {source} (is weft-node running on this host? set --socket or WEFT_NODE_SOCKET)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: permission denied (the control socket is root's: run as root)")]
    Permission { path: String },
    #[error("{path}: {what}")]
    Exchange { path: String, what: String },
}

impl ControlError {
    /// Trying again may help (the daemon was not running or did not
    /// answer in time).
    pub fn retryable(&self) -> bool {
        !matches!(self, ControlError::Permission { .. })
    }
}

/// Sends one request (`rekey`) to the daemon at `path` and reads its
/// answer, waiting at most `timeout` in all.
pub async fn request(
    path: &Path,
    command: &str,
    timeout: Duration,
) -> Result<ControlReply, ControlError> {
    let shown = path.display().to_string();
    let exchange = |what: String| ControlError::Exchange {
        path: shown.clone(),
        what,
    };
    let talk = async {
        let mut s = UnixStream::connect(path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                ControlError::Permission {
                    path: shown.clone(),
                }
            } else {
                ControlError::Connect {
                    path: shown.clone(),
                    source: e,
                }
            }
        })?;
        s.write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| exchange(format!("sending the request: {e}")))?;
        let mut line = String::new();
        BufReader::new(s)
            .take(MAX_REPLY as u64)
            .read_line(&mut line)
            .await
            .map_err(|e| exchange(format!("reading the answer: {e}")))?;
        if !line.ends_with('\n') {
            return Err(exchange(if line.is_empty() {
                "the daemon closed the connection without an answer".into()
            } else {
                format!("the answer is cut off or longer than {MAX_REPLY} bytes")
            }));
        }
        serde_json::from_str(line.trim_end())
            .map_err(|e| exchange(format!("an answer this weftctl cannot read ({e})")))
    };
    match tokio::time::timeout(timeout, talk).await {
        Ok(r) => r,
        Err(_) => Err(exchange(format!("no answer within {timeout:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_back_as_written() {
        for r in [
            ControlReply::Rotated { epoch: 7 },
            ControlReply::refused("rate_limited", "wait 12 s", true),
        ] {
            let line = serde_json::to_string(&r).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<ControlReply>(&line).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_value(ControlReply::Rotated { epoch: 3 }).unwrap(),
            serde_json::json!({"result": "rotated", "epoch": 3})
        );
    }
}
