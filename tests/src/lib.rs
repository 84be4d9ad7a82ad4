//! Test harnesses for weft.
//!
//! - [`process`]: child processes that die with the test process, even when
//!   it is killed.
//! - [`etcd`]: a real etcd server on loopback with a temporary data dir;
//!   [`etcdctl`]: the operator's tool as an independent oracle.
//! - [`controller`]: a controller serving HTTP in-process.
//! - [`bins`]: paths of workspace binaries and system tools.
//! - [`netns`]: throwaway network namespaces, `ip -j` as the oracle.
//!
//! Tests that need something this machine lacks (etcd, root) fail with a
//! message saying what to install; they are never skipped silently.

pub mod bins;
pub mod cni;
pub mod controller;
pub mod etcd;
pub mod etcdctl;
pub mod lab;
pub mod netns;
pub mod process;
