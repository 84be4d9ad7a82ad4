//! Where desired state is applied: the [`Dataplane`] trait, its netlink
//! implementation (`crate::netlink`), and a fake for tests.

use crate::state::{Change, NetState};
use async_trait::async_trait;
use std::sync::Mutex;
use thiserror::Error;

/// A change that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError {
    pub change: Change,
    pub error: String,
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.change, self.error)
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

    fn apply_one(&self, st: &mut NetState, c: &Change) -> Result<(), String> {
        let text = c.to_string();
        if self
            .fail
            .lock()
            .expect("fake lock")
            .iter()
            .any(|n| text.contains(n.as_str()))
        {
            return Err("injected failure".into());
        }
        let dev_exists = |st: &NetState, dev: &str| {
            st.links.contains_key(dev) || self.other_devices.iter().any(|d| d == dev)
        };
        match c {
            Change::CreateLink { name, link } => {
                if st.links.contains_key(name) {
                    return Err("File exists".into());
                }
                st.links.insert(name.clone(), link.clone());
            }
            Change::DeleteLink { name } => {
                st.links.remove(name).ok_or("No such device")?;
                st.addresses.retain(|(d, _), _| d != name);
                st.neighbours.retain(|(d, _), _| d != name);
                st.fdb.retain(|(d, _), _| d != name);
                st.routes.retain(|_, t| &t.dev != name);
            }
            Change::UpdateLink { name, mtu, up } => {
                let l = st.links.get_mut(name).ok_or("No such device")?;
                l.mtu = *mtu;
                l.up = *up;
            }
            Change::AddAddress { dev, addr } => {
                if !dev_exists(st, dev) {
                    return Err("No such device".into());
                }
                st.addresses.insert((dev.clone(), *addr), ());
            }
            Change::DelAddress { dev, addr } => {
                st.addresses.remove(&(dev.clone(), *addr));
            }
            Change::SetNeighbour { dev, ip, mac } => {
                if !dev_exists(st, dev) {
                    return Err("No such device".into());
                }
                st.neighbours.insert((dev.clone(), *ip), *mac);
            }
            Change::DelNeighbour { dev, ip } => {
                st.neighbours.remove(&(dev.clone(), *ip));
            }
            Change::SetFdb { dev, mac, dst } => {
                if !dev_exists(st, dev) {
                    return Err("No such device".into());
                }
                st.fdb.insert((dev.clone(), *mac), *dst);
            }
            Change::DelFdb { dev, mac, .. } => {
                st.fdb.remove(&(dev.clone(), *mac));
            }
            Change::SetRoute {
                dst,
                target,
                replace,
            } => {
                if !dev_exists(st, &target.dev) {
                    return Err("No such device".into());
                }
                if !replace && st.routes.contains_key(dst) {
                    return Err("File exists".into());
                }
                st.routes.insert(*dst, target.clone());
            }
            Change::DelRoute { dst, .. } => {
                st.routes.remove(dst);
            }
            Change::DelStrayRoute { dst, metric, .. } => {
                st.stray_routes.remove(&(*dst, *metric));
            }
            Change::AddXfrmState { id, sa } => {
                if st.xfrm_states.contains_key(id) {
                    return Err("File exists".into());
                }
                st.xfrm_states.insert(*id, sa.clone());
            }
            Change::DelXfrmState { id } => {
                st.xfrm_states.remove(id).ok_or("No such process")?;
            }
            Change::SetXfrmPolicy { id, tmpl } => {
                st.xfrm_policies.insert(*id, *tmpl);
            }
            Change::DelXfrmPolicy { id } => {
                st.xfrm_policies
                    .remove(id)
                    .ok_or("No such file or directory")?;
            }
            Change::AddXfrmBlock { id } => {
                if !st.xfrm_blocks.insert(*id) {
                    return Err("File exists".into());
                }
            }
            Change::DelXfrmBlock { id } => {
                if !st.xfrm_blocks.remove(id) {
                    return Err("No such file or directory".into());
                }
            }
        }
        Ok(())
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
                Err(error) => errors.push(ApplyError {
                    change: c.clone(),
                    error,
                }),
            }
        }
        errors
    }
}
