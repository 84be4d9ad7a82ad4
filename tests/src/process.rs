//! Child processes tied to the life of the test (or benchmark) process.
//!
//! Children are spawned from one long-lived thread with `PR_SET_PDEATHSIG`,
//! so the kernel kills them when this process dies for any reason (the
//! signal is tied to the thread that forked, which is why it is one thread
//! that lives as long as the process). Normal teardown still stops them by
//! PID in `Drop`.

#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("weft-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread (the children's parent) alive until exit.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the process spawner thread");
        Mutex::new(tx)
    })
}

/// Spawns `cmd` so that it is killed (SIGKILL) when this process exits.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl(2) and getppid(2), which are async-signal-safe; it touches
    // no memory shared with the parent and allocates nothing.
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited before the child started"));
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .expect("spawner lock")
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Stops a child by PID: SIGTERM, then SIGKILL after `grace`, then reaps it.
/// Returns how it exited.
pub fn stop(child: &mut Child, grace: std::time::Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a PID we own and have not reaped yet (try_wait
    // above returned None), so the PID cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Whether a process has ended (gone, or a zombie not yet reaped). Unlike
/// [`alive_as`] it does not read the command line, which is briefly empty
/// while the process execs (`ip netns exec` execs the real program).
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Whether process `pid` is alive and its command line contains `needle`
/// (guards against signalling a process that reused a recorded PID).
pub fn alive_as(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3 of stat is the state; a zombie has exited.
    let zombie = state
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(needle)
}

/// Stops a process that is not our child (recorded by PID), after checking
/// it is still the process we started: SIGTERM, then SIGKILL after `grace`.
pub fn stop_pid(pid: u32, needle: &str, grace: std::time::Duration) {
    if !alive_as(pid, needle) {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; alive_as checked
    // that this PID is still the process we recorded.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !alive_as(pid, needle) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if alive_as(pid, needle) {
        // SAFETY: as above, checked just now.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Sends `signal` (e.g. `libc::SIGKILL`, `SIGSTOP`, `SIGCONT`) to process
/// `pid` if it is still the process we started (its command line contains
/// `needle`). Returns whether it was sent.
pub fn signal_pid(pid: u32, needle: &str, signal: libc::c_int) -> bool {
    if !alive_as(pid, needle) {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; alive_as checked
    // that this PID is still the process we recorded.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}
