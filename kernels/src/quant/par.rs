//! Chunk scheduler for the matmul: the calling thread starts on the chunks at once and helpers on
//! the global rayon pool join in as soon as they wake.
//!
//! Why not `par_iter`: called from a thread outside the pool, rayon injects the whole job and
//! parks the caller on a condvar, which costs ~10 µs of wake-ups per call, more than a 576×576
//! decode matmul takes. Here the caller never waits for a helper to *start*: chunks are claimed
//! atomically, so a late helper simply finds less (or no) work, and the caller only waits for
//! chunks a helper has already claimed.
//!
//! Each participant owns a contiguous segment of chunks and claims it front to back, so every
//! thread streams through contiguous weights (interleaved claiming defeats the hardware
//! prefetchers). A participant that runs out steals from the *back* of the other segments.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// State shared between the caller and its helpers for one `for_each_chunk` call.
struct Shared {
    /// Per participant: unclaimed chunk range `[front, back)` packed as `front << 32 | back`.
    segs: Vec<AtomicU64>,
    /// Chunks completed (by anyone).
    done: AtomicUsize,
    /// The caller's borrowed job, lifetime-erased. Only dereferenced for claimed chunks, and the
    /// caller does not return before every claimed chunk has completed.
    job: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `job` points at a `Sync` closure and is only used under the protocol above.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

const fn pack(front: u64, back: u64) -> u64 {
    front << 32 | back
}

const fn unpack(v: u64) -> (u64, u64) {
    (v >> 32, v & 0xffff_ffff)
}

/// Claims the first (`from_back == false`) or last unclaimed chunk of a segment.
fn claim(seg: &AtomicU64, from_back: bool) -> Option<usize> {
    let mut v = seg.load(Ordering::Relaxed);
    loop {
        let (f, b) = unpack(v);
        if f >= b {
            return None;
        }
        let (next, chunk) = if from_back { (pack(f, b - 1), b - 1) } else { (pack(f + 1, b), f) };
        match seg.compare_exchange_weak(v, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(chunk as usize),
            Err(now) => v = now,
        }
    }
}

impl Shared {
    /// Runs participant `me`'s segment, then steals until no chunk is left unclaimed.
    ///
    /// # Safety
    /// `job` must be alive (guaranteed while the caller is inside `for_each_chunk`, and claims
    /// fail once it has left).
    unsafe fn work(&self, me: usize) {
        let n = self.segs.len();
        for k in 0..n {
            let seg = &self.segs[(me + k) % n];
            while let Some(c) = claim(seg, k != 0) {
                (*self.job)(c);
                self.done.fetch_add(1, Ordering::Release);
            }
        }
    }
}

/// Runs `job(c)` for every c in 0..total, on the calling thread plus up to `helpers` rayon
/// workers; returns when all chunks are done (their writes visible to the caller).
pub(crate) fn for_each_chunk(total: usize, helpers: usize, job: &(dyn Fn(usize) + Sync)) {
    let helpers = helpers.min(total.saturating_sub(1));
    if helpers == 0 || total >= u32::MAX as usize {
        (0..total).for_each(job);
        return;
    }
    let job: *const (dyn Fn(usize) + Sync + '_) = job;
    // SAFETY: lifetime erasure only; the protocol in `Shared` keeps every dereference inside
    // this call (helpers that start later find every segment empty and never touch `job`).
    let job: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(job) };
    let n = helpers + 1;
    let segs =
        (0..n).map(|i| AtomicU64::new(pack((total * i / n) as u64, (total * (i + 1) / n) as u64))).collect();
    let shared = Arc::new(Shared { segs, done: AtomicUsize::new(0), job });
    for me in 1..n {
        let s = Arc::clone(&shared);
        // SAFETY: as above.
        rayon::spawn(move || unsafe { s.work(me) });
    }
    // SAFETY: `job` is alive for the whole call.
    let mine = catch_unwind(AssertUnwindSafe(|| unsafe { shared.work(0) }));
    // Empty every segment so no new claim starts, then wait for the claims already running
    // elsewhere (if the caller's own chunk panicked, that one never completes).
    let unclaimed: usize = shared
        .segs
        .iter()
        .map(|s| {
            let (f, b) = unpack(s.swap(0, Ordering::Relaxed));
            b.saturating_sub(f) as usize
        })
        .sum();
    let expected = total - unclaimed - usize::from(mine.is_err());
    let mut spins = 0u32;
    while shared.done.load(Ordering::Acquire) < expected {
        // A helper's in-flight chunk takes ~1 µs; yield in case its thread was preempted.
        if spins < 1 << 14 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
    if let Err(panic) = mine {
        resume_unwind(panic);
    }
}
