//! Test harnesses for weft.
//!
//! - [`process`]: child processes that die with the test process, even when
//!   it is killed.
//! - [`etcd`]: a real etcd server on loopback with a temporary data dir.
//!
//! Tests that need something this machine lacks (etcd, root) fail with a
//! message saying what to install; they are never skipped silently.

pub mod etcd;
pub mod process;
