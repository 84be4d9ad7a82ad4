//! Test harnesses for weft.
//!
//! - [`process`]: child processes that die with the test process, even when
//!   it is killed.
//! - [`etcd`]: a real etcd server on loopback with a temporary data dir;
//!   [`etcdctl`]: the operator's tool as an independent oracle.
//! - [`controller`]: a controller serving HTTPS in-process; [`pki`]:
//!   certificates for it (and the kinds it must refuse).
//! - [`bins`]: paths of workspace binaries and system tools.
//! - [`wait`]: errors that end a wait at once (retrying cannot fix them).
//! - [`netns`]: throwaway network namespaces, `ip -j` as the oracle.
//! - [`lab`]: a weft cluster in namespaces (also the `weft-lab` command);
//!   [`traffic`]: pods pinging each other while a test breaks things;
//!   [`history`]: every lease change recorded, and a checker of what weft
//!   promises about them.
//! - [`cni`]: calling CNI plugins as a runtime does.
//! - [`containerd`], [`oci`]: a private containerd and a locally built
//!   busybox image for `ctr run --cni`.
//! - [`dns`]: asking a name server from inside a namespace.
//!
//! Tests that need something this machine lacks (etcd, root) fail with a
//! message saying what to install; they are never skipped silently.

pub mod bins;
pub mod capture;
pub mod cni;
pub mod containerd;
pub mod controller;
pub mod dns;
pub mod etcd;
pub mod etcdctl;
pub mod history;
pub mod lab;
pub mod netns;
pub mod oci;
pub mod pki;
pub mod process;
pub mod traffic;
pub mod wait;
