//! The global allocator: mimalloc (a command allocates and frees dozens of small buffers across
//! threads, which glibc's malloc handled at a third of the hot thread's time), counting live bytes
//! so benchmarks can report what each entity costs. The count is one relaxed atomic add per call.

use cap::Cap;
use mimalloc::MiMalloc;

#[global_allocator]
pub static ALLOCATOR: Cap<MiMalloc> = Cap::new(MiMalloc, usize::MAX);

/// Heap bytes currently allocated by this process.
pub fn live_bytes() -> usize {
    ALLOCATOR.allocated()
}

/// Resident memory of this process, from `/proc/self/statm` (0 where unavailable).
pub fn resident_bytes() -> usize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<usize>().ok())
        })
        .unwrap_or(0);
    pages * 4096
}
