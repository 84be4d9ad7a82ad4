//! Where desired state is applied: the [`Dataplane`] trait, its netlink
//! implementation (`crate::netlink`), and a fake for tests.

use crate::state::{Change, NetState};
use async_trait::async_trait;
pub use nix::errno::Errno;
use std::sync::Mutex;
use thiserror::Error;

/// Why a change failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The errno the failure comes down to: the kernel's answer, or the
    /// one it would give (`ENODEV` for a device weft found missing before
    /// asking). `None` when no errno fits (a malformed object, a socket
    /// that could not be opened).
    pub errno: Option<Errno>,
    /// What went wrong, for people.
    pub message: String,
}

impl Failure {
    /// `errno`, in the C library's words (as `ip` prints it).
    pub fn of(errno: Errno) -> Self {
        Failure::from_raw(errno as i32)
    }

    /// The kernel's answer `n` (positive). An errno nix does not know
    /// keeps its number in the message.
    pub fn from_raw(n: i32) -> Self {
        let text = std::io::Error::from_raw_os_error(n).to_string();
        let message = match text.strip_suffix(&format!(" (os error {n})")) {
            Some(t) => t.to_string(),
            None => text,
        };
        let errno = Some(Errno::from_raw(n)).filter(|e| *e != Errno::UnknownErrno);
        match errno {
            Some(_) => Failure { errno, message },
            None => Failure::other(format!("{message} (errno {n})")),
        }
    }

    /// A netlink error answer: `code` is the negative errno netlink
    /// carries; `other` describes a failure that carried none.
    pub(crate) fn from_netlink(
        code: Option<std::num::NonZeroI32>,
        other: impl FnOnce() -> String,
    ) -> Self {
        match code {
            Some(c) => Failure::from_raw(-c.get()),
            None => Failure::other(other()),
        }
    }

    /// weft's own answer, with the errno the kernel would give.
    pub fn with(errno: Errno, message: impl Into<String>) -> Self {
        Failure {
            errno: Some(errno),
            message: message.into(),
        }
    }

    /// A failure no errno describes.
    pub fn other(message: impl Into<String>) -> Self {
        Failure {
            errno: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errno {
            Some(e) => write!(f, "{} ({e:?})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A change that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError {
    pub change: Change,
    pub failure: Failure,
}

impl ApplyError {
    /// The errno the failure comes down to, to match on (`EEXIST`,
    /// `ENODEV`, ...).
    pub fn errno(&self) -> Option<Errno> {
        self.failure.errno
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.change, self.failure)
    }
}

/// Why the state could not be read.
#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("reading {what} from the kernel: {reason}")]
    Observe { what: &'static str, reason: String },
    #[error("netlink: {0}")]
    Setup(String),
}

/// Reads and changes what weft owns in the kernel.
#[async_trait]
pub trait Dataplane: Send + Sync {
    /// Everything weft owns now: its VXLAN devices and what is on them, and
    /// routes with weft's protocol. Nothing else is ever reported.
    async fn observe(&self) -> Result<NetState, DataplaneError>;

    /// Applies `changes` in order. A failed change does not stop the
    /// others; every failure is returned.
    async fn apply(&self, changes: &[Change]) -> Vec<ApplyError>;

    /// What the host has besides weft: its networks and the routes others
    /// installed, which no peer may take ([`crate::peer::HostView`]).
    async fn host_view(&self) -> Result<crate::peer::HostView, DataplaneError> {
        Ok(crate::peer::HostView::default())
    }
}

/// An in-memory kernel for tests: applies changes to a [`NetState`] with
/// the kernel's rules that matter (objects need their device; deleting a
/// device takes its objects along), and fails changes on request.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    state: Mutex<NetState>,
    fail: Mutex<Vec<String>>,
    applied: Mutex<Vec<Change>>,
    observed: std::sync::atomic::AtomicUsize,
    /// Devices that exist besides weft's own (e.g. the external interface).
    pub other_devices: Vec<String>,
}

impl FakeDataplane {
    /// A fake host with these non-weft devices.
    pub fn with_devices(devices: &[&str]) -> Self {
        FakeDataplane {
            other_devices: devices.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The current state.
    pub fn state(&self) -> NetState {
        self.state.lock().expect("fake lock").clone()
    }

    /// Changes the state behind weft's back (an operator with `ip`).
    pub fn tamper(&self, f: impl FnOnce(&mut NetState)) {
        f(&mut self.state.lock().expect("fake lock"));
    }

    /// Makes every change whose description contains `needle` fail.
    pub fn fail_changes_containing(&self, needle: &str) {
        self.fail
            .lock()
            .expect("fake lock")
            .push(needle.to_string());
    }

    /// Stops failing changes.
    pub fn heal(&self) {
        self.fail.lock().expect("fake lock").clear();
    }

    /// How many times the state was observed.
    pub fn observations(&self) -> usize {
        self.observed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every change applied successfully so far.
    pub fn applied(&self) -> Vec<Change> {
        self.applied.lock().expect("fake lock").clone()
    }

    fn apply_one(&self, st: &mut NetState, c: &Change) -> Result<(), Failure> {
        let text = c.to_string();
        if self
            .fail
            .lock()
            .expect("fake lock")
            .iter()
            .any(|n| text.contains(n.as_str()))
        {
            return Err(Failure::other("injected failure"));
        }
        let dev_exists = |st: &NetState, dev: &str| {
            // As the kernel's Applying::index: nothing goes onto a device
            // with a weft name that weft did not make.
            st.links.get(dev).is_some_and(|l| l.foreign().is_none())
                || self.other_devices.iter().any(|d| d == dev)
        };
        match c {
            Change::Link(c) => c.fake(st),
            Change::Address(c) => c.fake(st, &dev_exists),
            Change::Neighbour(c) => c.fake(st, &dev_exists),
            Change::Fdb(c) => c.fake(st, &dev_exists),
            Change::Route(c) => c.fake(st, &dev_exists),
            Change::Fallback(c) => c.fake(st),
            Change::XfrmState(c) => c.fake(st),
            Change::XfrmPolicy(c) => c.fake(st),
            Change::Wireguard(c) => c.fake(st),
        }
    }
}

#[async_trait]
impl Dataplane for FakeDataplane {
    async fn observe(&self) -> Result<NetState, DataplaneError> {
        self.observed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.state())
    }

    async fn apply(&self, changes: &[Change]) -> Vec<ApplyError> {
        let mut errors = Vec::new();
        let mut st = self.state.lock().expect("fake lock");
        for c in changes {
            match self.apply_one(&mut st, c) {
                Ok(()) => self.applied.lock().expect("fake lock").push(c.clone()),
                Err(failure) => errors.push(ApplyError {
                    change: c.clone(),
                    failure,
                }),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::link::LinkChange;
    use crate::state::{dev, VxlanLink};

    fn create(name: &str) -> Change {
        Change::Link(LinkChange::Create {
            name: dev(name),
            link: VxlanLink {
                vni: 1,
                port: 4789,
                local: "198.18.0.1".parse().unwrap(),
                mac: crate::vtep_mac("a"),
                underlay: None,
                learning: false,
                mtu: 1450,
                up: true,
            }
            .into(),
        })
    }

    #[tokio::test]
    async fn the_fake_fails_with_the_errno_the_kernel_would_give() {
        let fake = FakeDataplane::default();
        let update = Change::Link(LinkChange::Update {
            name: dev("weft.2"),
            mtu: 1400,
            up: true,
        });
        let errors = fake
            .apply(&[create("weft.1"), create("weft.1"), update])
            .await;
        let errnos: Vec<_> = errors.iter().map(ApplyError::errno).collect();
        assert_eq!(errnos, [Some(Errno::EEXIST), Some(Errno::ENODEV)]);
        assert!(
            errors[0].to_string().ends_with(": File exists (EEXIST)"),
            "{}",
            errors[0]
        );
        fake.fail_changes_containing("weft.3");
        let errors = fake.apply(&[create("weft.3")]).await;
        assert_eq!(errors[0].errno(), None);
        assert!(
            errors[0].to_string().ends_with(": injected failure"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_failure_reads_as_ip_prints_it_and_keeps_unknown_numbers() {
        assert_eq!(
            Failure::of(Errno::EEXIST).to_string(),
            "File exists (EEXIST)"
        );
        // The kernel's ENOTSUPP, which nix has no name for.
        let odd = Failure::from_raw(524);
        assert_eq!(odd.errno, None);
        assert!(odd.message.contains("524"), "{odd}");
    }
}
