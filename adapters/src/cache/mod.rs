//! The host tier: a byte-budgeted LRU of loaded adapters, keyed by `AdapterId`, with leases that
//! pin what running sequences use.
//!
//! It owns residency (which values are loaded), the byte budget, eviction, load coalescing and
//! the loader threads. It does not know what a value is (it is generic over [`CacheValue`]; the
//! server stores its parsed, validated adapters), where values come from (the `loader` closure,
//! typically reading `crate::store` and validating against the base), or names and tenants (ids
//! are content hashes, so two names with the same bytes share one entry and an entry never goes
//! stale).
//!
//! # Policies
//! - **Loads** run on `CacheConfig::loader_threads` background threads, never on the caller's:
//!   [`HostCache::try_acquire`] never blocks on I/O. Concurrent misses on one id share one load.
//!   A loader that panics counts as a failed load.
//! - **Failures** are remembered: for `CacheConfig::retry_failed_after` after a failed load,
//!   acquires of that id return `Failed(message)` without retrying (so a broken adapter costs
//!   one load, not one per request); the first acquire after that starts a new load.
//!   [`HostCache::invalidate`] forgets a failure at once.
//! - **Eviction** is least-recently-acquired first, among values no lease pins, and runs when a
//!   load completes and when a last lease drops, until `resident_bytes <= budget_bytes`. A lease
//!   is a pin: a pinned value is never evicted.
//! - **Over budget**: if the pinned values alone exceed the budget, the cache holds them anyway
//!   and reports it (`CacheStats::over_budget`); it gets back under budget as leases drop.
//! - **Unclaimed values**: a value that a requester is waiting for, and that has finished loading
//!   but has not been acquired since, is not evicted for `CacheConfig::claim_grace`: its requester
//!   polls (`try_acquire`) rather than waits, and a lease dropping in between must not throw the
//!   load away (under pressure that would repeat on every poll, and the request would never get
//!   its adapter). After the grace it is an ordinary unpinned value, as is at once a value only
//!   [`HostCache::prefetch`] asked for. So a value larger than the whole budget is loaded, served
//!   while leased, and evicted once it is neither leased nor waited for.
//! - **Admission is the caller's**: leases pin without limit, so whoever leases on behalf of
//!   queued work keeps what it pins near the budget ([`HostCache::pinned_bytes`]); the engine
//!   does (it leases for waiting requests only while the pins are under budget).
//! - **Invalidation** ([`HostCache::invalidate`], for deleted adapters): an unpinned value goes at
//!   once, a pinned one when its last lease drops; an in-flight load's result is dropped.
//!
//! # Adding a device tier
//! The tier is generic over the value and has no host-specific logic, so a GPU slot tier can be a
//! second instance, `HostCache<DeviceAdapter>`, whose loader acquires the host lease
//! (`host.acquire_blocking`), uploads from it and releases it, and whose `bytes()` is the device
//! memory (or slot size) the value occupies; its budget is the device memory set aside for
//! adapters. The engine then leases from the device tier per step, `Lease`, `Acquire` and
//! `CacheStats` are the same types for both tiers, and `/metrics` reports each tier's stats.
//!
//! # Locking
//! Entries live in a `DashMap` (status and pin count per id); resident ids in an LRU list with
//! the byte total, behind one mutex. Whoever takes both takes the LRU mutex first; hits and lease
//! drops touch only the entry's shard until they need the LRU. Values are dropped after the locks
//! are released.

mod stats;

pub use stats::{CacheStats, LatencyHistogram, LOAD_LATENCY_BOUNDS_SECONDS};

use crate::AdapterId;
use dashmap::DashMap;
use lru::LruCache;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

/// The default host-tier budget.
pub const DEFAULT_BUDGET_BYTES: usize = 2 << 30;
/// The default number of loader threads: loads are I/O and parsing, and a few in parallel hide
/// a slow one.
pub const DEFAULT_LOADER_THREADS: usize = 2;
/// The default time a failed load is remembered before an acquire retries it.
pub const DEFAULT_RETRY_FAILED_AFTER: Duration = Duration::from_secs(5);
/// The default time a freshly loaded value waits for its requester before it may be evicted:
/// far longer than an engine step, so a polling requester always gets there first.
pub const DEFAULT_CLAIM_GRACE: Duration = Duration::from_secs(10);

/// What the cache holds.
pub trait CacheValue: Send + Sync + 'static {
    /// The memory the value occupies in this tier, counted against the budget. Read once, when
    /// the value is inserted, so it must not change afterwards.
    fn bytes(&self) -> usize;
}

/// Loads the value of an id; runs on a loader thread. The error is a message for the requester.
pub type Loader<V> = Arc<dyn Fn(AdapterId) -> Result<V, String> + Send + Sync>;

/// Sizes and threads of a cache tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Resident bytes the tier aims to stay under (see the module docs for when it cannot).
    pub budget_bytes: usize,
    /// Background threads running the loader; 0 is taken as 1.
    pub loader_threads: usize,
    /// How long a failed load is remembered before an acquire retries it.
    pub retry_failed_after: Duration,
    /// How long a freshly loaded value that nobody has acquired yet is kept from eviction.
    pub claim_grace: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            budget_bytes: DEFAULT_BUDGET_BYTES,
            loader_threads: DEFAULT_LOADER_THREADS,
            retry_failed_after: DEFAULT_RETRY_FAILED_AFTER,
            claim_grace: DEFAULT_CLAIM_GRACE,
        }
    }
}

/// Why a blocking acquire gave up.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("adapter {id}: loading failed: {message}")]
    LoadFailed { id: AdapterId, message: String },
    #[error("adapter {id}: still loading after {waited:?}")]
    Timeout { id: AdapterId, waited: Duration },
    #[error("cannot start an adapter loader thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The answer of a non-blocking acquire.
pub enum Acquire<V: CacheValue> {
    /// Resident; the lease pins it.
    Ready(Lease<V>),
    /// A load is in flight (this call may have started it); ask again later.
    Loading,
    /// The last load failed less than `retry_failed_after` ago.
    Failed(String),
}

impl<V: CacheValue> std::fmt::Debug for Acquire<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Acquire::Ready(lease) => f.debug_tuple("Ready").field(lease).finish(),
            Acquire::Loading => f.write_str("Loading"),
            Acquire::Failed(message) => f.debug_tuple("Failed").field(message).finish(),
        }
    }
}

/// Where an id stands in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Residency {
    Absent,
    Loading,
    Resident { pins: usize, bytes: usize },
    Failed { message: String },
}

/// What [`HostCache::invalidate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidated {
    /// Nothing was cached for the id.
    Absent,
    /// The value was resident and unpinned, and is gone.
    Evicted,
    /// The value is pinned; it goes when its last lease drops.
    OnRelease,
    /// A load was in flight; its result will be dropped.
    LoadCancelled,
    /// A remembered failure was forgotten.
    FailureCleared,
}

/// A cache tier; cloning gives another handle to the same cache. Loader threads stop once every
/// handle and every lease is gone.
pub struct HostCache<V: CacheValue> {
    inner: Arc<Inner<V>>,
}

impl<V: CacheValue> Clone for HostCache<V> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<V: CacheValue> std::fmt::Debug for HostCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCache").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// A pin on a resident value: while any lease on an id lives, its value is not evicted.
/// Cloning pins again; dropping unpins. Dereferences to the value.
pub struct Lease<V: CacheValue> {
    id: AdapterId,
    value: Arc<V>,
    inner: Arc<Inner<V>>,
}

impl<V: CacheValue> Lease<V> {
    pub fn id(&self) -> AdapterId {
        self.id
    }

    pub fn value(&self) -> &Arc<V> {
        &self.value
    }
}

impl<V: CacheValue> std::ops::Deref for Lease<V> {
    type Target = V;

    fn deref(&self) -> &V {
        &self.value
    }
}

impl<V: CacheValue> Clone for Lease<V> {
    fn clone(&self) -> Self {
        // A leased entry cannot be removed, so it is there to pin again.
        if let Some(mut entry) = self.inner.entries.get_mut(&self.id) {
            entry.pins += 1;
        }
        Self { id: self.id, value: self.value.clone(), inner: self.inner.clone() }
    }
}

impl<V: CacheValue> Drop for Lease<V> {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}

impl<V: CacheValue> std::fmt::Debug for Lease<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).field("bytes", &self.value.bytes()).finish()
    }
}

struct Inner<V: CacheValue> {
    config: CacheConfig,
    entries: DashMap<AdapterId, Entry<V>>,
    /// Resident ids in recency order with the byte total. Taken before any `entries` shard.
    resident: Mutex<Resident>,
    /// Load requests for the loader threads; dropped with `Inner`, which stops them.
    jobs: mpsc::Sender<Job>,
    /// Tells loads apart, so a load cancelled by `invalidate` cannot fill a later one's entry.
    next_ticket: AtomicU64,
    /// Bytes of the values at least one lease pins. Changed with a pin count's 0 ↔ 1 transition,
    /// under that entry's shard lock.
    pinned_bytes: AtomicUsize,
    /// Completed loads, for `acquire_blocking` to wait on.
    completions: Mutex<u64>,
    completed: Condvar,
    counters: Counters,
}

struct Entry<V> {
    state: State<V>,
    pins: usize,
    /// Set by `invalidate` on a pinned value: remove it when the last lease drops.
    evict_on_release: bool,
}

/// A load request: the id and the ticket of the `Loading` entry it is for.
type Job = (AdapterId, u64);

enum State<V> {
    /// `wanted`: a requester (`try_acquire`, `acquire_blocking`) waits for the value, so it gets
    /// the claim grace; a load only `prefetch` asked for does not.
    Loading {
        ticket: u64,
        wanted: bool,
    },
    /// `unclaimed_since`: when the load completed, until the first acquire after it.
    Ready {
        value: Arc<V>,
        bytes: usize,
        unclaimed_since: Option<Instant>,
    },
    Failed {
        message: String,
        at: Instant,
    },
}

struct Resident {
    /// Every `Ready` entry, most recently acquired first, with its bytes.
    lru: LruCache<AdapterId, usize>,
    bytes: usize,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    loads: AtomicU64,
    load_failures: AtomicU64,
    skipped_loads: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
    latency: Mutex<LatencyHistogram>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The state behind every mutex here stays consistent across a panic (no invariant spans an
/// unwind point), so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<V: CacheValue> HostCache<V> {
    /// Starts the loader threads. `loader` runs on them, never on a caller's thread.
    pub fn new(config: CacheConfig, loader: Loader<V>) -> Result<Self, CacheError> {
        let (jobs, queue) = mpsc::channel();
        let threads = config.loader_threads.max(1);
        let inner = Arc::new(Inner {
            config,
            entries: DashMap::new(),
            resident: Mutex::new(Resident { lru: LruCache::unbounded(), bytes: 0 }),
            jobs,
            next_ticket: AtomicU64::new(0),
            pinned_bytes: AtomicUsize::new(0),
            completions: Mutex::new(0),
            completed: Condvar::new(),
            counters: Counters::default(),
        });
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let (queue, loader, cache) = (queue.clone(), loader.clone(), Arc::downgrade(&inner));
            std::thread::Builder::new()
                .name(format!("adapter-loader-{i}"))
                .spawn(move || run_loader(&queue, &loader, &cache))
                .map_err(CacheError::Spawn)?;
        }
        Ok(Self { inner })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Non-blocking: `Ready` with a lease if the value is resident (a hit, which also makes it
    /// the most recently used); otherwise starts a load if none is in flight (a miss) and returns
    /// `Loading`; `Failed` while a failed load is remembered (see the module docs).
    pub fn try_acquire(&self, id: AdapterId) -> Acquire<V> {
        self.acquire(id, true)
    }

    /// `try_acquire`, where `retry_failed: false` reports a remembered failure even after the
    /// retry window (for a blocking acquire that has just waited for that very load).
    fn acquire(&self, id: AdapterId, retry_failed: bool) -> Acquire<V> {
        enum Found<V> {
            Hit(Arc<V>),
            /// A load is in flight; with its ticket if this call started it.
            Pending(Option<u64>),
            Failed(String),
        }
        let inner = &self.inner;
        let found = match inner.entries.entry(id) {
            dashmap::Entry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                let pins = entry.pins;
                match &mut entry.state {
                    State::Ready { value, bytes, unclaimed_since } => {
                        let value = value.clone();
                        *unclaimed_since = None;
                        if pins == 0 {
                            inner.pinned_bytes.fetch_add(*bytes, Ordering::Relaxed);
                        }
                        entry.pins += 1;
                        Found::Hit(value)
                    }
                    State::Loading { wanted, .. } => {
                        *wanted = true;
                        Found::Pending(None)
                    }
                    State::Failed { message, at }
                        if !retry_failed || at.elapsed() < inner.config.retry_failed_after =>
                    {
                        Found::Failed(message.clone())
                    }
                    State::Failed { .. } => {
                        let ticket = inner.next_ticket.fetch_add(1, Ordering::Relaxed);
                        entry.state = State::Loading { ticket, wanted: true };
                        Found::Pending(Some(ticket))
                    }
                }
            }
            dashmap::Entry::Vacant(vacant) => {
                let ticket = inner.next_ticket.fetch_add(1, Ordering::Relaxed);
                let state = State::Loading { ticket, wanted: true };
                vacant.insert(Entry { state, pins: 0, evict_on_release: false });
                Found::Pending(Some(ticket))
            }
        };
        match found {
            Found::Hit(value) => {
                bump(&inner.counters.hits);
                lock(&inner.resident).lru.promote(&id);
                Acquire::Ready(Lease { id, value, inner: inner.clone() })
            }
            Found::Pending(Some(ticket)) => {
                inner.start_load((id, ticket));
                Acquire::Loading
            }
            Found::Pending(None) => {
                bump(&inner.counters.coalesced);
                Acquire::Loading
            }
            Found::Failed(message) => Acquire::Failed(message),
        }
    }

    /// Starts loading `id` unless it is resident, loading or a remembered failure, without
    /// leasing it or touching its recency: for warming the cache ahead of requests (an upload).
    /// Nobody waits for such a value, so it gets no claim grace: it is an ordinary unpinned value
    /// from the moment it is loaded (unless a requester asks for it while it loads).
    pub fn prefetch(&self, id: AdapterId) {
        let inner = &self.inner;
        let ticket = inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        let loading = State::Loading { ticket, wanted: false };
        match inner.entries.entry(id) {
            dashmap::Entry::Occupied(mut occupied) => match &occupied.get().state {
                State::Failed { at, .. } if at.elapsed() >= inner.config.retry_failed_after => {
                    occupied.get_mut().state = loading;
                }
                _ => return,
            },
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(Entry { state: loading, pins: 0, evict_on_release: false });
            }
        }
        inner.start_load((id, ticket));
    }

    /// Blocking convenience for the CLI and tests: acquires, waiting up to `timeout` for a load.
    /// A failed load ends the wait with its error (only the first attempt may retry a
    /// remembered failure, as `try_acquire` does).
    pub fn acquire_blocking(&self, id: AdapterId, timeout: Duration) -> Result<Lease<V>, CacheError> {
        // `None`: a timeout too long to represent, which is no timeout.
        let deadline = Instant::now().checked_add(timeout);
        let mut first = true;
        loop {
            let seen = *lock(&self.inner.completions);
            match self.acquire(id, std::mem::take(&mut first)) {
                Acquire::Ready(lease) => return Ok(lease),
                Acquire::Failed(message) => return Err(CacheError::LoadFailed { id, message }),
                Acquire::Loading => {}
            }
            let mut completions = lock(&self.inner.completions);
            while *completions == seen {
                let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
                if left.is_zero() {
                    return Err(CacheError::Timeout { id, waited: timeout });
                }
                completions = self
                    .inner
                    .completed
                    .wait_timeout(completions, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
    }

    /// Where `id` stands, without touching recency or counters.
    pub fn residency(&self, id: AdapterId) -> Residency {
        match self.inner.entries.get(&id) {
            None => Residency::Absent,
            Some(entry) => match &entry.state {
                State::Loading { .. } => Residency::Loading,
                State::Ready { bytes, .. } => Residency::Resident { pins: entry.pins, bytes: *bytes },
                State::Failed { message, .. } => Residency::Failed { message: message.clone() },
            },
        }
    }

    /// Drops what is cached for `id` (its adapter was deleted): at once if unpinned, when the last
    /// lease drops if pinned. Ids are content hashes, so call it only once no name refers to the
    /// id any more (`FsStore::is_referenced`); otherwise it merely costs a reload.
    pub fn invalidate(&self, id: AdapterId) -> Invalidated {
        let inner = &self.inner;
        let mut resident = lock(&inner.resident);
        let outcome = match inner.entries.remove_if(&id, |_, e| e.pins == 0) {
            Some((_, entry)) => match entry.state {
                State::Ready { value, bytes, .. } => {
                    resident.lru.pop(&id);
                    resident.bytes -= bytes;
                    bump(&inner.counters.invalidations);
                    drop(resident);
                    drop(value);
                    return Invalidated::Evicted;
                }
                State::Loading { .. } => Invalidated::LoadCancelled,
                State::Failed { .. } => Invalidated::FailureCleared,
            },
            None => match inner.entries.get_mut(&id) {
                Some(mut entry) => {
                    entry.evict_on_release = true;
                    Invalidated::OnRelease
                }
                None => Invalidated::Absent,
            },
        };
        drop(resident);
        if outcome == Invalidated::LoadCancelled {
            // Waiters on the cancelled load retry (and start a fresh load if still wanted).
            inner.notify_completion();
        }
        outcome
    }

    /// Bytes of the resident values that at least one lease pins, without walking the entries
    /// (cheap enough to ask on every engine step).
    pub fn pinned_bytes(&self) -> usize {
        self.inner.pinned_bytes.load(Ordering::Relaxed)
    }

    /// A snapshot of the counters and the current residency.
    pub fn stats(&self) -> CacheStats {
        let inner = &self.inner;
        let c = &inner.counters;
        let resident = lock(&inner.resident);
        let (mut pinned, mut pinned_bytes, mut loading) = (0, 0, 0);
        for entry in inner.entries.iter() {
            match &entry.state {
                State::Ready { bytes, .. } if entry.pins > 0 => {
                    pinned += 1;
                    pinned_bytes += bytes;
                }
                State::Loading { .. } => loading += 1,
                _ => {}
            }
        }
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            loads: c.loads.load(Ordering::Relaxed),
            load_failures: c.load_failures.load(Ordering::Relaxed),
            skipped_loads: c.skipped_loads.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            resident: resident.lru.len(),
            resident_bytes: resident.bytes,
            budget_bytes: inner.config.budget_bytes,
            pinned,
            pinned_bytes,
            loading,
            load_latency: lock(&c.latency).clone(),
        }
    }
}

/// A loader thread: takes jobs off the queue, loads, publishes. Skips a job whose load was
/// cancelled before it started. Exits when the cache is gone.
fn run_loader<V: CacheValue>(queue: &Mutex<mpsc::Receiver<Job>>, loader: &Loader<V>, cache: &Weak<Inner<V>>) {
    loop {
        let Ok(job) = lock(queue).recv() else { return };
        match cache.upgrade() {
            Some(inner) if inner.is_current(job) => {}
            Some(inner) => {
                bump(&inner.counters.skipped_loads);
                continue;
            }
            None => return,
        }
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| loader(job.0)))
            .unwrap_or_else(|_| Err("the adapter loader panicked".to_string()));
        let Some(inner) = cache.upgrade() else { return };
        inner.complete(job, result, started.elapsed());
    }
}

impl<V: CacheValue> Inner<V> {
    /// Queues the load of a `Loading` entry just created with `job`'s ticket (a miss).
    fn start_load(&self, job: Job) {
        bump(&self.counters.misses);
        if self.jobs.send(job).is_err() {
            // Unreachable while `inner` lives (the loaders exit only once it is gone), but an
            // entry must never stay `Loading` with no load behind it.
            let failed = Err("no adapter loader thread is running".into());
            self.complete(job, failed, Duration::ZERO);
        }
    }

    /// Publishes a load's result, then evicts down to the budget. Every load is counted, also
    /// one whose result is dropped because its entry was invalidated meanwhile.
    fn complete(&self, (id, ticket): Job, result: Result<V, String>, took: Duration) {
        match &result {
            Ok(_) => {
                bump(&self.counters.loads);
                lock(&self.counters.latency).record(took);
            }
            Err(_) => bump(&self.counters.load_failures),
        }
        let mut dropped = Vec::new();
        let mut resident = lock(&self.resident);
        // Another ticket, or no entry: the load was cancelled by `invalidate`; drop the result.
        if let Some(mut entry) = self
            .entries
            .get_mut(&id)
            .filter(|e| matches!(e.state, State::Loading { ticket: t, .. } if t == ticket))
        {
            let wanted = matches!(entry.state, State::Loading { wanted: true, .. });
            match result {
                Ok(value) => {
                    let bytes = value.bytes();
                    let unclaimed_since = wanted.then(Instant::now);
                    entry.state = State::Ready { value: Arc::new(value), bytes, unclaimed_since };
                    drop(entry);
                    resident.lru.put(id, bytes);
                    resident.bytes += bytes;
                    self.evict_to_budget(&mut resident, Some(id), &mut dropped);
                }
                Err(message) => entry.state = State::Failed { message, at: Instant::now() },
            }
        }
        drop(resident);
        drop(dropped);
        self.notify_completion();
    }

    /// Whether the `Loading` entry `job` was queued for is still waiting for it.
    fn is_current(&self, (id, ticket): Job) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| matches!(e.state, State::Loading { ticket: t, .. } if t == ticket))
    }

    fn notify_completion(&self) {
        *lock(&self.completions) += 1;
        self.completed.notify_all();
    }

    /// Removes unpinned values that are not waiting for their requester, least recently used
    /// first (sparing `spare`, the value a load has just completed, whatever the grace), until the
    /// total is within budget or nothing more can go. Removed values are moved to `dropped`, for
    /// the caller to drop after unlocking.
    fn evict_to_budget(&self, resident: &mut Resident, spare: Option<AdapterId>, dropped: &mut Vec<Arc<V>>) {
        if resident.bytes <= self.config.budget_bytes {
            return;
        }
        let grace = self.config.claim_grace;
        let evictable = |e: &Entry<V>| {
            e.pins == 0
                && !matches!(e.state, State::Ready { unclaimed_since: Some(at), .. } if at.elapsed() < grace)
        };
        let oldest_first: Vec<AdapterId> = resident.lru.iter().rev().map(|(id, _)| *id).collect();
        for id in oldest_first {
            if resident.bytes <= self.config.budget_bytes {
                break;
            }
            if Some(id) == spare {
                continue;
            }
            // The pin check and the removal are one step under the entry's shard lock, which a
            // hit takes to pin: a value is never removed while leased.
            if let Some((_, Entry { state: State::Ready { value, bytes, .. }, .. })) =
                self.entries.remove_if(&id, |_, e| evictable(e))
            {
                resident.lru.pop(&id);
                resident.bytes -= bytes;
                bump(&self.counters.evictions);
                dropped.push(value);
            }
        }
    }

    /// Unpins once; on the last lease, removes an invalidated value and evicts down to budget.
    fn release(&self, id: AdapterId) {
        let last = match self.entries.get_mut(&id) {
            Some(mut entry) => {
                entry.pins -= 1;
                if let (0, State::Ready { bytes, .. }) = (entry.pins, &entry.state) {
                    self.pinned_bytes.fetch_sub(*bytes, Ordering::Relaxed);
                }
                entry.pins == 0
            }
            None => false,
        };
        if !last {
            return;
        }
        let mut dropped = Vec::new();
        let mut resident = lock(&self.resident);
        // Re-checked under the LRU lock: `invalidate` may have flagged it meanwhile, and a new
        // lease may have pinned it again.
        if let Some((_, Entry { state: State::Ready { value, bytes, .. }, .. })) =
            self.entries.remove_if(&id, |_, e| e.pins == 0 && e.evict_on_release)
        {
            resident.lru.pop(&id);
            resident.bytes -= bytes;
            bump(&self.counters.invalidations);
            dropped.push(value);
        }
        self.evict_to_budget(&mut resident, None, &mut dropped);
        drop(resident);
        drop(dropped);
    }
}
