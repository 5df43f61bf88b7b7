//! The host-tier cache through its public API: LRU order, byte accounting, pins under eviction
//! pressure, counters, failed loads, loader threads, invalidation, and a concurrent stress run.

use adapters::cache::{
    Acquire, CacheConfig, CacheError, CacheValue, HostCache, Invalidated, Lease, Loader, Residency,
};
use adapters::AdapterId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn id(n: usize) -> AdapterId {
    AdapterId::of_files(b"{}", &n.to_le_bytes())
}

/// A cached value: its size, and a drop counter.
struct Blob {
    bytes: usize,
    probe: Arc<Probe>,
}

impl CacheValue for Blob {
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        self.probe.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the loader saw and did.
#[derive(Default)]
struct Probe {
    sizes: Mutex<HashMap<AdapterId, usize>>,
    /// Ids whose loads fail; the count is how many more times.
    failing: Mutex<HashMap<AdapterId, usize>>,
    panicking: Mutex<Vec<AdapterId>>,
    loads: Mutex<HashMap<AdapterId, usize>>,
    threads: Mutex<Vec<(ThreadId, Option<String>)>>,
    drops: AtomicUsize,
    /// Loads wait while the gate is closed.
    gate_closed: Mutex<bool>,
    gate: Condvar,
    /// Loads that reached the loader (before the gate).
    entered: AtomicUsize,
    /// Extra load time for the stress test.
    slow: AtomicBool,
}

impl Probe {
    fn set_size(&self, id: AdapterId, bytes: usize) {
        self.sizes.lock().unwrap().insert(id, bytes);
    }

    fn loads_of(&self, id: AdapterId) -> usize {
        self.loads.lock().unwrap().get(&id).copied().unwrap_or(0)
    }

    fn close_gate(&self) {
        *self.gate_closed.lock().unwrap() = true;
    }

    fn open_gate(&self) {
        *self.gate_closed.lock().unwrap() = false;
        self.gate.notify_all();
    }

    fn load(self: &Arc<Self>, id: AdapterId) -> Result<Blob, String> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut closed = self.gate_closed.lock().unwrap();
        while *closed {
            closed = self.gate.wait(closed).unwrap();
        }
        drop(closed);
        let current = std::thread::current();
        self.threads.lock().unwrap().push((current.id(), current.name().map(str::to_string)));
        *self.loads.lock().unwrap().entry(id).or_default() += 1;
        if self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(200 + (id.to_hex().as_bytes()[0] as u64 % 7) * 100));
        }
        if self.panicking.lock().unwrap().contains(&id) {
            panic!("loader panic for {id}");
        }
        if let Some(left) = self.failing.lock().unwrap().get_mut(&id).filter(|n| **n > 0) {
            *left -= 1;
            return Err(format!("{id}: bad safetensors header"));
        }
        let bytes = self.sizes.lock().unwrap().get(&id).copied().unwrap_or(100);
        Ok(Blob { bytes, probe: self.clone() })
    }
}

fn cache_with(config: CacheConfig) -> (HostCache<Blob>, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    let loader_probe = probe.clone();
    let loader: Loader<Blob> = Arc::new(move |id| loader_probe.load(id));
    (HostCache::new(config, loader).unwrap(), probe)
}

/// A cache without the claim grace, so an unleased value is an eviction candidate at once (the
/// tests of the grace set it).
fn cache(budget_bytes: usize) -> (HostCache<Blob>, Arc<Probe>) {
    cache_with(CacheConfig {
        budget_bytes,
        loader_threads: 2,
        retry_failed_after: Duration::from_secs(60),
        claim_grace: Duration::ZERO,
    })
}

fn is_resident(cache: &HostCache<Blob>, id: AdapterId) -> bool {
    matches!(cache.residency(id), Residency::Resident { .. })
}

/// `resident_bytes` equals the sum of the resident values' sizes (over the ids `0..n`).
fn assert_bytes_add_up(cache: &HostCache<Blob>, n: usize) {
    let sum: usize = (0..n)
        .filter_map(|i| match cache.residency(id(i)) {
            Residency::Resident { bytes, .. } => Some(bytes),
            _ => None,
        })
        .sum();
    let stats = cache.stats();
    assert_eq!(stats.resident_bytes, sum);
    assert_eq!(stats.resident, (0..n).filter(|&i| is_resident(cache, id(i))).count());
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn hits_misses_and_joined_loads_are_counted() {
    let (cache, probe) = cache(1000);
    probe.close_gate();
    assert!(matches!(cache.try_acquire(id(1)), Acquire::Loading));
    assert!(matches!(cache.try_acquire(id(1)), Acquire::Loading));
    assert_eq!(cache.residency(id(1)), Residency::Loading);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.coalesced, stats.hits, stats.loading), (1, 1, 0, 1));
    probe.open_gate();
    let lease = cache.acquire_blocking(id(1), WAIT).unwrap();
    assert_eq!(lease.id(), id(1));
    assert_eq!(lease.bytes(), 100);
    assert!(matches!(cache.try_acquire(id(1)), Acquire::Ready(_)));
    let stats = cache.stats();
    assert_eq!((stats.loads, stats.load_failures, stats.loading), (1, 0, 0));
    assert_eq!(stats.hits, 2, "the blocking acquire and the last one");
    assert!((stats.hit_rate() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(stats.load_latency.count, 1);
    assert_eq!(stats.load_latency.counts.iter().sum::<u64>(), 1);
    assert_eq!(probe.loads_of(id(1)), 1, "concurrent misses share one load");
}

#[test]
fn loads_never_run_on_the_callers_thread() {
    let (cache, probe) = cache(10_000);
    for i in 0..6 {
        let _lease = cache.acquire_blocking(id(i), WAIT).unwrap();
    }
    let me = std::thread::current().id();
    let threads = probe.threads.lock().unwrap();
    assert_eq!(threads.len(), 6);
    for (thread, name) in threads.iter() {
        assert_ne!(*thread, me);
        assert!(name.as_deref().is_some_and(|n| n.starts_with("adapter-loader")), "{name:?}");
    }
}

#[test]
fn evicts_least_recently_used_first_with_exact_byte_accounting() {
    let (cache, probe) = cache(300);
    for i in 0..3 {
        drop(cache.acquire_blocking(id(i), WAIT).unwrap());
    }
    assert_eq!(cache.stats().resident_bytes, 300);
    // Touch 0: now 1 is the least recently used.
    drop(cache.acquire_blocking(id(0), WAIT).unwrap());
    drop(cache.acquire_blocking(id(3), WAIT).unwrap());
    assert!(!is_resident(&cache, id(1)), "1 was least recently used");
    assert!([0, 2, 3].iter().all(|&i| is_resident(&cache, id(i))));
    assert_eq!(cache.stats().evictions, 1);
    assert_bytes_add_up(&cache, 6);

    // Recency is now 3, 0, 2: a 150-byte value evicts 2 then 0.
    probe.set_size(id(4), 150);
    drop(cache.acquire_blocking(id(4), WAIT).unwrap());
    assert!(is_resident(&cache, id(3)) && is_resident(&cache, id(4)));
    assert!(!is_resident(&cache, id(2)) && !is_resident(&cache, id(0)));
    let stats = cache.stats();
    assert_eq!((stats.evictions, stats.resident_bytes, stats.resident), (3, 250, 2));
    assert_bytes_add_up(&cache, 6);
    assert_eq!(probe.drops.load(Ordering::SeqCst), 3, "evicted values are dropped");
}

#[test]
fn pinned_values_are_never_evicted_and_go_after_release() {
    let (cache, probe) = cache(200);
    let a = cache.acquire_blocking(id(0), WAIT).unwrap();
    let b = cache.acquire_blocking(id(1), WAIT).unwrap();
    let b2 = b.clone();
    let c = cache.acquire_blocking(id(2), WAIT).unwrap();
    let stats = cache.stats();
    assert_eq!((stats.resident_bytes, stats.pinned, stats.pinned_bytes, stats.evictions), (300, 3, 300, 0));
    assert!(stats.over_budget(), "everything is pinned: the cache says it is over budget");
    assert_eq!(cache.residency(id(1)), Residency::Resident { pins: 2, bytes: 100 });

    drop(b);
    assert!(is_resident(&cache, id(1)), "the clone still pins it");
    drop(a);
    assert!(!is_resident(&cache, id(0)), "unpinned and least recently used: evicted on release");
    let stats = cache.stats();
    assert_eq!((stats.resident_bytes, stats.pinned, stats.evictions), (200, 2, 1));
    assert!(!stats.over_budget());
    drop(b2);
    drop(c);
    let stats = cache.stats();
    assert_eq!((stats.resident_bytes, stats.pinned, stats.evictions), (200, 0, 1));
    assert_eq!(probe.loads_of(id(1)), 1);
}

#[test]
fn a_value_larger_than_the_budget_is_served_then_evicted_on_release() {
    let (cache, probe) = cache(100);
    probe.set_size(id(9), 500);
    let lease = cache.acquire_blocking(id(9), WAIT).unwrap();
    assert_eq!(lease.bytes(), 500);
    assert!(cache.stats().over_budget());
    drop(lease);
    assert_eq!(cache.residency(id(9)), Residency::Absent);
    assert_eq!(cache.stats().resident_bytes, 0);
}

/// The state a polling requester meets under pressure: its value has loaded, but before it
/// asks again a lease drops and runs an eviction pass in which that value is the only candidate.
fn load_under_pressure(claim_grace: Duration) -> (HostCache<Blob>, Arc<Probe>, Lease<Blob>) {
    let (cache, probe) = cache_with(CacheConfig { budget_bytes: 100, claim_grace, ..CacheConfig::default() });
    probe.set_size(id(0), 100);
    probe.set_size(id(1), 10);
    probe.set_size(id(2), 60);
    let pinned = cache.acquire_blocking(id(0), WAIT).unwrap();
    let released = cache.acquire_blocking(id(1), WAIT).unwrap();
    assert!(matches!(cache.try_acquire(id(2)), Acquire::Loading));
    wait_until("the requested value loads", || is_resident(&cache, id(2)));
    drop(released);
    assert!(!is_resident(&cache, id(1)), "the released value goes first");
    (cache, probe, pinned)
}

#[test]
fn a_loaded_value_waits_for_its_requester_through_other_evictions() {
    let (cache, probe, _pinned) = load_under_pressure(Duration::from_secs(60));
    let Acquire::Ready(lease) = cache.try_acquire(id(2)) else {
        panic!("the value its requester asked for was evicted before it asked again");
    };
    assert_eq!((lease.id(), probe.loads_of(id(2))), (id(2), 1));
    assert_eq!(cache.pinned_bytes(), 160);
    drop(lease);
    assert!(!is_resident(&cache, id(2)), "claimed, then released over budget: an ordinary candidate");
    assert_eq!((cache.pinned_bytes(), cache.stats().resident_bytes), (100, 100));
}

#[test]
fn an_unclaimed_value_is_evicted_once_its_grace_is_over() {
    let (cache, _probe, _pinned) = load_under_pressure(Duration::ZERO);
    assert_eq!(cache.residency(id(2)), Residency::Absent, "no grace: evicted by the pass");
    assert!(matches!(cache.try_acquire(id(2)), Acquire::Loading), "so the requester must load again");
}

#[test]
fn a_prefetched_value_nobody_asked_for_gets_no_grace() {
    let (cache, probe) = cache_with(CacheConfig {
        budget_bytes: 100,
        claim_grace: Duration::from_secs(60),
        ..CacheConfig::default()
    });
    for i in 0..3 {
        probe.set_size(id(i), 100);
    }
    cache.prefetch(id(0));
    wait_until("the prefetch loads", || is_resident(&cache, id(0)));
    cache.prefetch(id(0));
    assert_eq!(probe.loads_of(id(0)), 1, "a resident value is not loaded again");
    cache.prefetch(id(1));
    wait_until("the second prefetch loads", || is_resident(&cache, id(1)));
    assert!(!is_resident(&cache, id(0)), "warmed, not wanted: evicted by the next load as any value");
    assert_eq!(cache.stats().resident_bytes, 100);
    // A requester that joins a prefetch waits for the value: it gets the grace.
    probe.close_gate();
    cache.prefetch(id(2));
    assert!(matches!(cache.try_acquire(id(2)), Acquire::Loading));
    probe.open_gate();
    wait_until("the joined load completes", || is_resident(&cache, id(2)));
    assert!(!is_resident(&cache, id(1)), "the warmed value made room");
    // Another load and a release: two eviction passes in which the joined value is over budget.
    drop(cache.acquire_blocking(id(0), WAIT).expect("loads"));
    assert!(is_resident(&cache, id(2)), "wanted and not yet claimed: kept through both passes");
    assert!(!is_resident(&cache, id(0)));
    assert_eq!(probe.loads_of(id(2)), 1);
}

#[test]
fn pinned_bytes_follow_the_first_and_last_lease() {
    let (cache, probe) = cache(1000);
    probe.set_size(id(1), 60);
    let a = cache.acquire_blocking(id(0), WAIT).unwrap();
    let a2 = a.clone();
    let Acquire::Ready(a3) = cache.try_acquire(id(0)) else { panic!("resident") };
    let b = cache.acquire_blocking(id(1), WAIT).unwrap();
    assert_eq!((cache.pinned_bytes(), cache.stats().pinned_bytes), (160, 160));
    drop(a);
    drop(a3);
    assert_eq!(cache.pinned_bytes(), 160, "a clone still pins it");
    drop(a2);
    assert_eq!(cache.pinned_bytes(), 60);
    drop(b);
    assert_eq!((cache.pinned_bytes(), cache.stats().pinned_bytes), (0, 0));
    assert_eq!(cache.stats().resident_bytes, 160, "unpinned, still resident");
}

#[test]
fn failed_loads_are_remembered_then_retried() {
    let (cache, probe) = cache_with(CacheConfig {
        budget_bytes: 1000,
        loader_threads: 1,
        retry_failed_after: Duration::from_millis(200),
        claim_grace: Duration::ZERO,
    });
    probe.failing.lock().unwrap().insert(id(1), 1);
    let err = cache.acquire_blocking(id(1), WAIT).unwrap_err();
    assert!(
        matches!(&err, CacheError::LoadFailed { message, .. } if message.contains("bad safetensors")),
        "{err}"
    );
    assert!(matches!(cache.try_acquire(id(1)), Acquire::Failed(m) if m.contains("bad safetensors")));
    assert_eq!(probe.loads_of(id(1)), 1, "remembered: no retry within the window");
    std::thread::sleep(Duration::from_millis(250));
    let lease = cache.acquire_blocking(id(1), WAIT).unwrap();
    assert_eq!(lease.id(), id(1));
    let stats = cache.stats();
    assert_eq!((stats.load_failures, stats.loads, stats.misses), (1, 1, 2));

    probe.panicking.lock().unwrap().push(id(2));
    let err = cache.acquire_blocking(id(2), WAIT).unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    // The loader thread survived the panic.
    drop(cache.acquire_blocking(id(3), WAIT).unwrap());
    // Invalidation forgets a failure at once.
    assert_eq!(cache.invalidate(id(2)), Invalidated::FailureCleared);
    probe.panicking.lock().unwrap().clear();
    drop(cache.acquire_blocking(id(2), WAIT).unwrap());
}

#[test]
fn a_blocking_acquire_times_out() {
    let (cache, probe) = cache(1000);
    probe.close_gate();
    let err = cache.acquire_blocking(id(1), Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err}");
    probe.open_gate();
    drop(cache.acquire_blocking(id(1), WAIT).unwrap());
}

#[test]
fn invalidation_drops_unpinned_at_once_and_pinned_on_release() {
    let (cache, probe) = cache(1000);
    drop(cache.acquire_blocking(id(0), WAIT).unwrap());
    assert_eq!(cache.invalidate(id(0)), Invalidated::Evicted);
    assert_eq!(cache.residency(id(0)), Residency::Absent);
    assert_eq!(cache.invalidate(id(0)), Invalidated::Absent);

    let lease = cache.acquire_blocking(id(1), WAIT).unwrap();
    assert_eq!(cache.invalidate(id(1)), Invalidated::OnRelease);
    assert!(is_resident(&cache, id(1)), "still pinned");
    assert_eq!(lease.bytes(), 100);
    drop(lease);
    assert_eq!(cache.residency(id(1)), Residency::Absent);

    // A load cancelled while running: its result is dropped, not inserted.
    probe.close_gate();
    let entered = probe.entered.load(Ordering::SeqCst);
    assert!(matches!(cache.try_acquire(id(2)), Acquire::Loading));
    wait_until("the load is running", || probe.entered.load(Ordering::SeqCst) > entered);
    assert_eq!(cache.invalidate(id(2)), Invalidated::LoadCancelled);
    // Both loader threads busy: a load cancelled while queued never runs.
    assert!(matches!(cache.try_acquire(id(3)), Acquire::Loading));
    wait_until("both loaders are busy", || probe.entered.load(Ordering::SeqCst) > entered + 1);
    assert!(matches!(cache.try_acquire(id(4)), Acquire::Loading));
    assert_eq!(cache.invalidate(id(4)), Invalidated::LoadCancelled);
    let drops_before = probe.drops.load(Ordering::SeqCst);
    probe.open_gate();
    wait_until("the cancelled load's value is dropped", || probe.drops.load(Ordering::SeqCst) > drops_before);
    // The queue is first in, first out: once 5 is loaded, the job for 4 was taken and skipped.
    drop(cache.acquire_blocking(id(5), WAIT).unwrap());
    assert_eq!(probe.loads_of(id(4)), 0);
    assert_eq!(cache.stats().skipped_loads, 1);
    assert_eq!(cache.residency(id(2)), Residency::Absent);
    assert_eq!(cache.residency(id(4)), Residency::Absent);
    // 3 loads on the other loader thread, which may finish after 5.
    wait_until("3 is loaded", || is_resident(&cache, id(3)));
    let stats = cache.stats();
    assert_eq!((stats.invalidations, stats.resident), (2, 2), "3 and 5 resident");
}

/// While a lease lives, its value is resident: acquiring the id again hits the same instance
/// (an eviction and reload would give another one).
fn assert_still_resident(cache: &HostCache<Blob>, lease: &Lease<Blob>) {
    match cache.try_acquire(lease.id()) {
        Acquire::Ready(again) => assert!(Arc::ptr_eq(again.value(), lease.value()), "evicted while leased"),
        Acquire::Loading | Acquire::Failed(_) => panic!("{}: evicted while leased", lease.id()),
    }
}

/// xorshift64*: enough randomness for picking ids and hold times.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[test]
fn concurrent_acquire_and_release_keep_the_invariants() {
    const IDS: usize = 24;
    const THREADS: u64 = 6;
    const RUN: Duration = Duration::from_millis(1500);
    let budget = 1200;
    let (cache, probe) = cache_with(CacheConfig {
        budget_bytes: budget,
        loader_threads: 3,
        retry_failed_after: Duration::ZERO,
        claim_grace: Duration::ZERO,
    });
    for i in 0..IDS {
        probe.set_size(id(i), 50 + (i * 37) % 200);
    }
    // One adapter that always fails, one that fails now and then.
    probe.failing.lock().unwrap().insert(id(IDS - 1), usize::MAX);
    probe.failing.lock().unwrap().insert(id(IDS - 2), 5);
    probe.slow.store(true, Ordering::Relaxed);
    let seed = Instant::now().elapsed().subsec_nanos() as u64 | 1;
    let acquires = AtomicUsize::new(0);

    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (cache, acquires) = (cache.clone(), &acquires);
            s.spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(t + 1) ^ 0x9e37_79b9_7f4a_7c15);
                let end = Instant::now() + RUN;
                let mut held: Vec<Lease<Blob>> = Vec::new();
                while Instant::now() < end {
                    let i = rng.below(IDS as u64) as usize;
                    acquires.fetch_add(1, Ordering::Relaxed);
                    let lease = match cache.try_acquire(id(i)) {
                        Acquire::Ready(lease) => Some(lease),
                        Acquire::Loading if rng.below(2) == 0 => {
                            cache.acquire_blocking(id(i), WAIT).ok().inspect(|_| {
                                acquires.fetch_add(1, Ordering::Relaxed);
                            })
                        }
                        Acquire::Loading | Acquire::Failed(_) => None,
                    };
                    if let Some(lease) = lease {
                        if rng.below(4) == 0 {
                            held.push(lease.clone());
                        }
                        held.push(lease);
                    }
                    if rng.below(50) == 0 {
                        cache.invalidate(id(rng.below(IDS as u64) as usize));
                    }
                    // Release a random number of held leases after a random hold time.
                    std::thread::sleep(Duration::from_micros(rng.below(400)));
                    let keep = rng.below(held.len() as u64 + 1) as usize;
                    for lease in held.drain(keep..) {
                        assert_still_resident(&cache, &lease);
                    }
                }
                for lease in held.drain(..) {
                    assert_still_resident(&cache, &lease);
                }
            });
        }
    });

    wait_until("in-flight loads finish", || cache.stats().loading == 0);
    let stats = cache.stats();
    assert_eq!(stats.pinned, 0, "no leaked pins");
    assert_eq!((stats.pinned_bytes, cache.pinned_bytes()), (0, 0));
    assert!(stats.evictions > 0 && stats.hits > 0 && stats.load_failures > 0, "{stats:?}");
    assert!((stats.hits + stats.misses + stats.coalesced) as usize >= acquires.load(Ordering::Relaxed));
    let loads: usize = probe.loads.lock().unwrap().values().sum();
    assert_eq!(stats.loads + stats.load_failures, loads as u64, "every load is counted once");
    assert_eq!(stats.misses, loads as u64 + stats.skipped_loads, "every miss is one load or one skip");
    assert_bytes_add_up(&cache, IDS);
    // A release runs an eviction pass; with nothing pinned it gets the cache under budget.
    drop(cache.acquire_blocking(id(0), WAIT).unwrap());
    assert!(cache.stats().resident_bytes <= budget, "{:?}", cache.stats());
    assert_bytes_add_up(&cache, IDS);

    let loaded = cache.stats().loads as usize;
    drop(cache);
    wait_until("every loaded value is dropped", || probe.drops.load(Ordering::SeqCst) == loaded);
}

#[test]
fn handles_and_leases_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<HostCache<Blob>>();
    send_sync::<Lease<Blob>>();
    send_sync::<adapters::store::FsStore>();
    send_sync::<adapters::store::ObjectPin>();
}
