//! Giving memory freed after a burst of work back to the system.
//!
//! glibc keeps freed memory in its heaps and returns only the top of a heap
//! by itself: a heap whose freed pages sit below memory still in use keeps
//! them resident. After a large pass (a node planning 50,000 peers builds and
//! drops tens of MiB) or a storm of connections (a controller serving
//! thousands of joins at once frees hundreds of MiB between the leases it
//! keeps), the process would stay at its peak without this.

/// Returns the allocator's free pages to the system.
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
