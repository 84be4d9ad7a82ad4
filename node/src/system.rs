//! Small pieces of host setup: IP forwarding and systemd notification.

use std::os::unix::net::UnixDatagram;

/// Turns on forwarding for IPv4 (and IPv6 when asked); pods are routed
/// through this host.
pub fn enable_forwarding(ipv6: bool) -> Result<(), String> {
    let mut knobs = vec!["/proc/sys/net/ipv4/ip_forward"];
    if ipv6 {
        knobs.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for k in knobs {
        let cur = std::fs::read_to_string(k).map_err(|e| format!("{k}: {e}"))?;
        if cur.trim() != "1" {
            std::fs::write(k, "1").map_err(|e| format!("enabling forwarding ({k}): {e}"))?;
            tracing::info!(sysctl = k, "enabled forwarding");
        }
    }
    Ok(())
}

/// Sends a notification to systemd (`READY=1`, `WATCHDOG=1`, `STATUS=...`)
/// when run with `Type=notify`; does nothing otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), halved as
/// sd_watchdog_enabled(3) advises, if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        // Only this test touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        sd_notify("READY=1\nSTATUS=programmed 3 peers");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 128];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=programmed 3 peers");
    }
}
