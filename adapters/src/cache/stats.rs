//! Counters a cache tier reports: what `HostCache::stats` returns, shaped so a device tier can
//! report the same and `/metrics` can print both.

use std::time::Duration;

/// Upper bounds (seconds) of the load-latency histogram buckets; one more bucket, `+Inf`,
/// follows. Cold loads range from a few milliseconds (a small adapter in the page cache) to
/// seconds (a large one from a cold disk).
pub const LOAD_LATENCY_BOUNDS_SECONDS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A histogram of load durations, with the Prometheus bucket bounds
/// [`LOAD_LATENCY_BOUNDS_SECONDS`]; `counts` are per bucket (not cumulative), the last one `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    pub counts: [u64; LOAD_LATENCY_BOUNDS_SECONDS.len() + 1],
    pub count: u64,
    pub sum_seconds: f64,
    pub max_seconds: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; LOAD_LATENCY_BOUNDS_SECONDS.len() + 1],
            count: 0,
            sum_seconds: 0.0,
            max_seconds: 0.0,
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = LOAD_LATENCY_BOUNDS_SECONDS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LOAD_LATENCY_BOUNDS_SECONDS.len());
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum_seconds += seconds;
        self.max_seconds = self.max_seconds.max(seconds);
    }

    /// Mean load time in seconds (0 before the first load).
    pub fn mean_seconds(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_seconds / self.count as f64
        }
    }
}

/// A snapshot of a cache tier. Counters are totals since the cache was created; the rest is the
/// state at the time of the snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheStats {
    /// Acquires that found the value resident.
    pub hits: u64,
    /// Acquires that started a load (including retries of a failed one).
    pub misses: u64,
    /// Acquires that found a load already in flight and joined it.
    pub coalesced: u64,
    /// Loads that succeeded.
    pub loads: u64,
    /// Loads that failed (the loader returned an error or panicked).
    pub load_failures: u64,
    /// Loads cancelled by `invalidate` before a loader thread took them up. Every miss ends as
    /// one of `loads`, `load_failures` or `skipped_loads`.
    pub skipped_loads: u64,
    /// Values removed to get back under budget.
    pub evictions: u64,
    /// Values removed by `invalidate` (at once, or when their last lease dropped).
    pub invalidations: u64,
    /// Values resident now.
    pub resident: usize,
    /// Sum of `bytes()` of the resident values.
    pub resident_bytes: usize,
    pub budget_bytes: usize,
    /// Resident values with at least one live lease.
    pub pinned: usize,
    pub pinned_bytes: usize,
    /// Loads in flight.
    pub loading: usize,
    /// Durations of the successful loads.
    pub load_latency: LatencyHistogram,
}

impl CacheStats {
    /// `resident_bytes > budget_bytes`: leases pin more than the budget (or a value just
    /// loaded has not been claimed yet), so nothing could be evicted.
    pub fn over_budget(&self) -> bool {
        self.resident_bytes > self.budget_bytes
    }

    /// `hits / (hits + misses)`; joined loads count as neither.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}
