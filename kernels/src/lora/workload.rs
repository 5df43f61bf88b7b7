//! Synthetic multi-adapter batches, shared by the LoRA tests and benchmarks so both exercise the
//! same row layouts: which rows use which adapter (a popularity law), base-model rows in the
//! gaps, random A/B (and DoRA factors) per adapter and site, and random x and base outputs.
//!
//! Deterministic for a given spec (splitmix64), so it needs no `rand` outside tests.

use std::ops::Range;

use super::{Int8LoraMatrices, LoraMatrices, LoraSiteWeights, Segment};
use crate::KernelError;

/// How the adapter-using rows of a batch pick their adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Popularity {
    /// Every row uses adapter 0.
    Identical,
    /// Rows take adapters round-robin: row k (counting adapter rows only) uses `k % n_adapters`,
    /// so `rows == n_adapters` is one row per adapter (decode with distinct adapters).
    Distinct,
    /// Each row picks uniformly at random.
    Uniform,
    /// Each row picks adapter `a` with probability ∝ `(a + 1)^-alpha`.
    Zipf(f64),
    /// 90 % of the rows use adapter 0, the rest pick uniformly among the others.
    Skewed,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub rows: usize,
    pub in_features: usize,
    /// Output width of each site sharing `x` (one entry for an unfused call).
    pub out_features: Vec<usize>,
    pub n_adapters: usize,
    /// Adapter `a` has rank `ranks[a % ranks.len()]` (at every site).
    pub ranks: Vec<usize>,
    pub popularity: Popularity,
    /// Probability that a row uses no adapter (a base-model row), in `[0, 1]`.
    pub base_fraction: f64,
    /// Whether every adapter gets a DoRA factor.
    pub dora: bool,
    pub seed: u64,
}

impl WorkloadSpec {
    /// One site, uniform popularity, no base rows, no DoRA, seed 0.
    pub fn new(rows: usize, in_features: usize, out_features: usize, n_adapters: usize, rank: usize) -> Self {
        WorkloadSpec {
            rows,
            in_features,
            out_features: vec![out_features],
            n_adapters,
            ranks: vec![rank],
            popularity: Popularity::Uniform,
            base_fraction: 0.0,
            dora: false,
            seed: 0,
        }
    }
}

/// One adapter's weights for one site, owned.
#[derive(Clone, Debug)]
pub struct AdapterSite {
    /// `[rank, in_features]`.
    pub a: Vec<f32>,
    /// `[out_features, rank]`.
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
    pub dora_factor: Option<Vec<f32>>,
    /// The int8 form of `a` and `b`, when the workload was quantized ([`Workload::quantize_int8`]);
    /// the kernels then read it instead of `a` and `b`.
    pub int8: Option<Int8LoraMatrices>,
}

impl AdapterSite {
    /// The borrowed form the kernels take.
    pub fn weights(&self) -> LoraSiteWeights<'_> {
        LoraSiteWeights {
            matrices: match &self.int8 {
                Some(q) => q.view(),
                None => LoraMatrices::F32 { a: &self.a, b: &self.b },
            },
            rank: self.rank,
            scale: self.scale,
            dora_factor: self.dora_factor.as_deref(),
        }
    }
}

/// A generated batch.
#[derive(Clone, Debug)]
pub struct Workload {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: Vec<usize>,
    /// `[rows, in_features]`.
    pub x: Vec<f32>,
    /// Per site, the base output `[rows, out_features[site]]`.
    pub y: Vec<Vec<f32>>,
    /// Maximal runs of rows with the same adapter (`None`: base rows), in row order, covering
    /// `0..rows`. Adapters appear in a random order, each in at most one run.
    pub runs: Vec<(Range<usize>, Option<usize>)>,
    /// `adapters[site][adapter]`.
    pub adapters: Vec<Vec<AdapterSite>>,
}

impl Workload {
    /// Generates the batch `spec` describes; `Err` on an unusable spec (zero sizes, no ranks,
    /// fractions outside `[0, 1]`, a negative or non-finite Zipf exponent).
    pub fn generate(spec: &WorkloadSpec) -> Result<Workload, KernelError> {
        let bad = |m: &str| Err(KernelError::Shape(format!("workload spec: {m}")));
        if spec.in_features == 0 || spec.out_features.is_empty() || spec.out_features.contains(&0) {
            return bad("in_features and every out_features must be positive");
        }
        if spec.n_adapters == 0 || spec.ranks.is_empty() {
            return bad("need at least one adapter and one rank");
        }
        if !(0.0..=1.0).contains(&spec.base_fraction) {
            return bad("base_fraction must be in [0, 1]");
        }
        if let Popularity::Zipf(alpha) = spec.popularity {
            if !(alpha.is_finite() && alpha >= 0.0) {
                return bad("the Zipf exponent must be finite and non-negative");
            }
        }
        let n = spec.n_adapters;
        let mut rng = SplitMix64::new(spec.seed);

        // Rows per adapter, and base rows per gap (gap k sits before the k-th placed adapter).
        let zipf_cdf: Vec<f64> = match spec.popularity {
            Popularity::Zipf(alpha) => {
                let mut acc = 0.0;
                (0..n)
                    .map(|a| {
                        acc += ((a + 1) as f64).powf(-alpha);
                        acc
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let mut counts = vec![0usize; n];
        let mut gaps = vec![0usize; n + 1];
        let mut next = 0;
        for _ in 0..spec.rows {
            if rng.next_f64() < spec.base_fraction {
                gaps[rng.below(n + 1)] += 1;
                continue;
            }
            let a = match spec.popularity {
                Popularity::Identical => 0,
                Popularity::Distinct => {
                    next += 1;
                    (next - 1) % n
                }
                Popularity::Uniform => rng.below(n),
                Popularity::Zipf(_) => {
                    let total = zipf_cdf.last().copied().unwrap_or(1.0);
                    let u = rng.next_f64() * total;
                    zipf_cdf.partition_point(|&c| c <= u).min(n - 1)
                }
                Popularity::Skewed => {
                    if n == 1 || rng.next_f64() < 0.9 {
                        0
                    } else {
                        1 + rng.below(n - 1)
                    }
                }
            };
            counts[a] += 1;
        }
        // Adapters in a random order, so segments do not come sorted by adapter id.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut runs: Vec<(Range<usize>, Option<usize>)> = Vec::new();
        let push = |len: usize, who: Option<usize>, runs: &mut Vec<(Range<usize>, Option<usize>)>| {
            if len == 0 {
                return;
            }
            match runs.last_mut() {
                Some((r, w)) if *w == who => r.end += len,
                last => {
                    let start = last.map_or(0, |(r, _)| r.end);
                    runs.push((start..start + len, who));
                }
            }
        };
        for (k, &a) in order.iter().enumerate() {
            push(gaps[k], None, &mut runs);
            push(counts[a], Some(a), &mut runs);
        }
        push(gaps[n], None, &mut runs);

        let x = rng.uniform_vec(spec.rows * spec.in_features, -1.0, 1.0);
        let y = spec.out_features.iter().map(|&o| rng.uniform_vec(spec.rows * o, -1.0, 1.0)).collect();
        let adapters = spec
            .out_features
            .iter()
            .map(|&out| {
                (0..n)
                    .map(|a| {
                        let rank = spec.ranks[a % spec.ranks.len()];
                        let sa = 1.0 / (spec.in_features as f32).sqrt();
                        let sb = 1.0 / (rank.max(1) as f32).sqrt();
                        AdapterSite {
                            a: rng.uniform_vec(rank * spec.in_features, -sa, sa),
                            b: rng.uniform_vec(out * rank, -sb, sb),
                            rank,
                            scale: rng.uniform(0.5, 2.0),
                            dora_factor: spec.dora.then(|| rng.uniform_vec(out, 0.5, 1.5)),
                            int8: None,
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(Workload {
            rows: spec.rows,
            in_features: spec.in_features,
            out_features: spec.out_features.clone(),
            x,
            y,
            runs,
            adapters,
        })
    }

    /// Stores every adapter's A and B in int8 as well; the kernels use that form from now on.
    pub fn quantize_int8(&mut self) {
        for (site, adapters) in self.adapters.iter_mut().enumerate() {
            let out = self.out_features[site];
            for a in adapters {
                a.int8 = Some(Int8LoraMatrices::quantize(&a.a, &a.b, a.rank, self.in_features, out));
            }
        }
    }

    /// The segments of one site (one per adapter run, in row order); empty for an unknown site.
    pub fn segments(&self, site: usize) -> Vec<Segment<'_>> {
        let Some(adapters) = self.adapters.get(site) else {
            return Vec::new();
        };
        self.runs
            .iter()
            .filter_map(|(rows, a)| a.map(|a| Segment { rows: rows.clone(), weights: adapters[a].weights() }))
            .collect()
    }

    /// The adapter of each row (`None`: base row).
    pub fn adapter_of_row(&self) -> Vec<Option<usize>> {
        let mut out = vec![None; self.rows];
        for (rows, a) in &self.runs {
            out[rows.clone()].fill(*a);
        }
        out
    }
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, good enough for test data.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`; 0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
        lo + (hi - lo) * u
    }

    pub fn uniform_vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(lo, hi)).collect()
    }
}
