//! The global allocator: mimalloc (a command allocates and frees dozens of small buffers across
//! threads, which glibc's malloc handled at a third of the hot thread's time), with a switch that
//! makes it count live bytes, so the memory benchmark can measure what each entity costs.
//!
//! Counting is off unless a benchmark turns it on: then every call pays one relaxed load of a
//! flag that never changes. (An always-on counter, one shared atomic per allocation, cost more
//! than the figures were worth; resident-set deltas could not see freed actors, whose pages stay
//! shared with live data.)
//!
//! This is the one module with `unsafe` code: `GlobalAlloc` cannot be implemented without it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

use mimalloc::MiMalloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);

pub struct CountingMiMalloc;

#[global_allocator]
static ALLOCATOR: CountingMiMalloc = CountingMiMalloc;

fn count(bytes: isize) {
    if COUNTING.load(Relaxed) {
        LIVE.fetch_add(bytes, Relaxed);
    }
}

fn signed(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every method forwards to mimalloc with the caller's arguments unchanged and returns
// its result, so this allocator keeps exactly mimalloc's contract; the counting reads no memory
// of the allocation.
unsafe impl GlobalAlloc for CountingMiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        let ptr = unsafe { MiMalloc.alloc(layout) };
        if !ptr.is_null() {
            count(signed(layout.size()));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let ptr = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(signed(layout.size()));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from this allocator with `layout`.
        unsafe { MiMalloc.dealloc(ptr, layout) };
        count(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let new = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(signed(new_size) - signed(layout.size()));
        }
        new
    }
}

/// Starts counting; [`counted_bytes`] then reports the change in live heap bytes since.
pub fn start_counting() {
    LIVE.store(0, Relaxed);
    COUNTING.store(true, Relaxed);
}

pub fn stop_counting() {
    COUNTING.store(false, Relaxed);
}

/// Live heap bytes allocated minus freed since [`start_counting`].
pub fn counted_bytes() -> isize {
    LIVE.load(Relaxed)
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
