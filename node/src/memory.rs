//! Giving memory freed by a large pass back to the system.

/// Returns the allocator's free pages to the system. A pass that plans
/// every lease at 50,000 peers builds and drops tens of MiB (the kernel's
/// state read back, the desired state, the claims); glibc keeps freed
/// memory in its heaps, so without this the daemon's resident size would
/// stay at that peak between passes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn give_back() {
    // SAFETY: malloc_trim(3) takes a plain integer and only walks the
    // allocator's own free lists, under the allocator's locks; glibc allows
    // it at any time from any thread. It frees no memory that is in use,
    // so no Rust value is affected by it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back() {}
