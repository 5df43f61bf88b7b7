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
//!
//! Between calls a helper lingers for a moment (running any rayon work that comes, so it holds
//! no worker back) instead of going to sleep: the next call's helper job then starts within a
//! µs instead of the 40-90 µs a sleeping worker takes to wake, which on a decode step of ~200
//! calls was most of the time a helper spent.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// State shared between the caller and its helpers for one `for_each_chunk` call.
struct Shared {
    /// Per participant: unclaimed chunk range `[front, back)` packed as `front << 32 | back`,
    /// each on its own cache lines: every claim writes it, and two threads claiming chunks of
    /// ~1 µs from one line would pass it back and forth on every claim.
    segs: Vec<CacheLines<AtomicU64>>,
    /// Chunks completed by the helpers, each adding its count once, when it runs out of work:
    /// the caller waits for every claimed chunk anyway, and a shared counter written after
    /// every chunk would be passed between the threads as well.
    done: CacheLines<AtomicUsize>,
    /// The caller's borrowed job, lifetime-erased. Only dereferenced for claimed chunks, and the
    /// caller does not return before every claimed chunk has completed.
    job: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `job` points at a `Sync` closure and is only used under the protocol above.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Keeps a value away from its neighbours' cache lines (two, for the adjacent-line prefetcher).
#[repr(align(128))]
struct CacheLines<T>(T);

impl<T> std::ops::Deref for CacheLines<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

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
    unsafe fn work(&self, me: usize, done: &mut usize) {
        let n = self.segs.len();
        for k in 0..n {
            let seg = &self.segs[(me + k) % n];
            while let Some(c) = claim(seg, k != 0) {
                (*self.job)(c);
                *done += 1;
            }
        }
    }
}

/// How long a helper stays on, running whatever rayon work comes, once its own is done. The
/// calls of a decode step follow each other within tens of µs, while a rayon worker that has
/// gone to sleep takes 40-90 µs to wake on a VM: longer than many calls' whole work. A helper
/// that lingers picks up the next call's helper job at once.
const LINGER: std::time::Duration = std::time::Duration::from_micros(200);
/// Pause instructions between two looks for work while lingering (~1 µs).
const LINGER_PAUSES: usize = 32;

thread_local! {
    /// Whether this thread is already lingering further up its stack (a helper job it ran
    /// while lingering must not linger again, or the stack would grow with every call).
    static LINGERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A helper's job: participant `me` of `shared`, then a linger (see `LINGER`).
fn help(shared: Arc<Shared>, me: usize) {
    let mut done = 0;
    // SAFETY: the protocol in `Shared`: a claim succeeds only while the call's caller is inside
    // `for_each_chunk`, so `job` is alive whenever it is used.
    unsafe { shared.work(me, &mut done) };
    shared.done.fetch_add(done, Ordering::Release);
    drop(shared);
    if LINGERING.get() {
        return;
    }
    LINGERING.set(true);
    let mut since = std::time::Instant::now();
    while since.elapsed() < LINGER {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => since = std::time::Instant::now(),
            // Not on a rayon worker: nothing to linger for.
            None => break,
            // Looking for work touches the other workers' queues and the clock; between looks
            // (~1 µs apart) only pause, so the threads that do work keep their cache lines and
            // their core's execution units.
            Some(rayon::Yield::Idle) => (0..LINGER_PAUSES).for_each(|_| std::hint::spin_loop()),
        }
    }
    LINGERING.set(false);
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
    let segs = (0..n)
        .map(|i| CacheLines(AtomicU64::new(pack((total * i / n) as u64, (total * (i + 1) / n) as u64))))
        .collect();
    let shared = Arc::new(Shared { segs, done: CacheLines(AtomicUsize::new(0)), job });
    for me in 1..n {
        let s = Arc::clone(&shared);
        rayon::spawn(move || help(s, me));
    }
    // SAFETY: `job` is alive for the whole call. `mine_done` counts the caller's completed
    // chunks even if one of them panics.
    let mut mine_done = 0;
    let mine = catch_unwind(AssertUnwindSafe(|| unsafe { shared.work(0, &mut mine_done) }));
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
    let expected = total - unclaimed - usize::from(mine.is_err()) - mine_done;
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

#[cfg(test)]
mod tests {
    use super::for_each_chunk;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Runs `calls` calls back to back (so helpers linger between them and join the next) and
    /// checks that every chunk of every call ran exactly once, before its call returned.
    fn every_chunk_once(calls: usize, helpers: usize) {
        for call in 0..calls {
            let total = 1 + call % 97;
            let runs: Vec<AtomicU32> = (0..total).map(|_| AtomicU32::new(0)).collect();
            for_each_chunk(total, helpers, &|c| {
                // Uneven chunks, so stealing happens.
                if c % 7 == 0 {
                    std::hint::black_box((0..2000).sum::<u64>());
                }
                runs[c].fetch_add(1, Ordering::Relaxed);
            });
            for (c, r) in runs.iter().enumerate() {
                assert_eq!(r.load(Ordering::Relaxed), 1, "call {call}, chunk {c}");
            }
        }
    }

    #[test]
    fn every_chunk_runs_once_from_outside_the_pool() {
        every_chunk_once(2000, 3);
    }

    #[test]
    fn every_chunk_runs_once_from_a_pool_worker_and_nested() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("pool");
        pool.install(|| {
            every_chunk_once(500, 2);
            // A call inside a chunk: its helpers may be the outer call's lingering ones.
            for_each_chunk(8, 2, &|_| every_chunk_once(5, 2));
        });
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_later_calls_still_work() {
        let caught = std::panic::catch_unwind(|| {
            // Only on the calling thread: a panic on a rayon worker aborts the process. Helpers
            // are slow, so the caller surely runs chunks (a lingering helper could otherwise
            // take them all before the caller claims its first).
            let caller = std::thread::current().id();
            for_each_chunk(64, 1, &|_| {
                if std::thread::current().id() == caller {
                    panic!("a chunk on the caller");
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            })
        });
        assert!(caught.is_err());
        every_chunk_once(50, 1);
    }
}
