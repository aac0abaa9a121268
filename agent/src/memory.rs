//! The process's memory: what the allocator keeps after a phase that allocates much and keeps
//! little.

/// Gives the memory the allocator holds freed (on this thread's heap and in abandoned segments)
/// back to the system. mimalloc returns freed pages only when it is next called on that thread,
/// so a part that loads eBPF objects at start and then idles would keep tens of MiB resident.
pub fn release_freed() {
    // SAFETY: `mi_collect` takes no pointers; it is safe to call at any time on any thread, with
    // or without mimalloc as the global allocator (a heap it never used has nothing to collect).
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Keeps the process (and the processes it starts, across `execve`) on 4 KiB pages. The
/// allocator asks for transparent huge pages for its segments, so each thread's first few
/// allocations would make 2 MiB resident: measured, 14 MiB of the agent's idle size went to that,
/// with no CPU per request or per byte to show for it.
pub fn no_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "transparent huge pages stay allowed");
    }
}
