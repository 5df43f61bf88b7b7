//! Paged attention for a ragged batch: this module owns one layer's paged K/V storage
//! ([`LayerKv`]), writing a step's keys and values into it ([`write_kv`]), rotary position
//! embeddings ([`Rope`]) and causal grouped-query attention over it ([`paged_attention`]).
//!
//! A step's batch is a set of rows (tokens) drawn from many sequences: a prefill chunk of one
//! sequence is a run of consecutive rows, a decode is a single row. [`SeqRows`] says which rows
//! belong to which sequence, the position of its first row and where the sequence's blocks live.
//! Scheduling, block allocation and the model around it belong to the caller.
//!
//! # Cache layout
//! Both pools are `[num_blocks][n_kv_heads][..]` f32, one block = `block_size` token slots:
//! - K is **transposed** inside a block: `k[block][kv_head][dim][slot]`, so the keys of
//!   consecutive positions lie side by side and a query is scored against 8 or 16 keys with one
//!   vector FMA per dimension (no horizontal sums);
//! - V is row-major: `v[block][kv_head][slot][dim]`, so the weighted sum of values is a run of
//!   vector FMAs over contiguous rows.
//!
//! The fast path reads K straight from the cache when `block_size` is a multiple of the vector
//! width (16 with AVX-512, 8 otherwise) and otherwise packs each tile of 64 keys first; any block
//! size is correct, multiples of 16 are fastest.
//!
//! # How the fast kernel works
//! Flash-attention style: keys are visited in tiles of 64 with an online softmax, so scores only
//! ever exist for one tile, and each tile of K/V is used by every query that shares its KV head
//! (GQA heads and, in a prefill chunk, up to ~48 query vectors of consecutive rows). Work items
//! are row chunks of one sequence: a prefill chunk is compute-bound and goes one KV head at a
//! time; decode rows are memory-bound and walk all KV heads tile by tile, streaming each block's
//! pool region contiguously, with the next tile prefetched during the current one. Long decodes
//! that would leave threads idle are split over key ranges and merged (split-K). Vector code is
//! chosen at run time (AVX-512F, AVX2+FMA, portable; see [`Isa`]); small calls stay on the
//! calling thread, larger ones use the rayon pool.
//!
//! [`paged_attention_reference`] is the plain-loop specification and test oracle.

mod kernel;
mod rope;
mod simd;
#[cfg(test)]
mod tests;

use std::ops::Range;

use rayon::prelude::*;

pub use rope::Rope;

use crate::KernelError;
use kernel::{run_pass, PassInput, PassState, TILE};

/// Geometry of one layer's paged KV storage: blocks of `block_size` token slots; each slot holds
/// `n_kv_heads * head_dim` keys and as many values. All three must be non-zero for the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    /// Floats in one block of one pool (K or V).
    pub(crate) fn block_floats(&self) -> Option<usize> {
        self.block_size.checked_mul(self.n_kv_heads)?.checked_mul(self.head_dim)
    }

    pub(crate) fn check(&self) -> Result<(), KernelError> {
        if self.block_size == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return Err(KernelError::Shape(format!("KV geometry must be non-zero, got {self:?}")));
        }
        Ok(())
    }

    /// Index of key `dim` of `kv_head` at `slot` of `block` (K is transposed within a block).
    #[inline]
    fn k_index(&self, block: usize, kv_head: usize, dim: usize, slot: usize) -> usize {
        ((block * self.n_kv_heads + kv_head) * self.head_dim + dim) * self.block_size + slot
    }

    /// Index of the first value of `kv_head` at `slot` of `block` (`head_dim` values follow).
    #[inline]
    fn v_index(&self, block: usize, kv_head: usize, slot: usize) -> usize {
        ((block * self.n_kv_heads + kv_head) * self.block_size + slot) * self.head_dim
    }
}

/// One layer's K and V block pools (layout in the module docs: K `[block][kv_head][dim][slot]`,
/// V `[block][kv_head][slot][dim]`), zero-initialised.
pub struct LayerKv {
    geom: KvGeometry,
    num_blocks: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl LayerKv {
    /// Allocates `num_blocks` zeroed blocks of K and of V.
    ///
    /// # Panics
    /// If the pool size overflows `usize` (use [`LayerKv::try_new`] for untrusted sizes). A
    /// geometry with a zero field gives an empty cache that every kernel rejects.
    pub fn new(geom: KvGeometry, num_blocks: usize) -> Self {
        let floats = geom
            .block_floats()
            .and_then(|b| b.checked_mul(num_blocks))
            .expect("KV pool size overflows usize");
        Self { geom, num_blocks, k: vec![0.0; floats], v: vec![0.0; floats] }
    }

    /// [`LayerKv::new`] that returns an error for a zero geometry field or an overflowing size.
    pub fn try_new(geom: KvGeometry, num_blocks: usize) -> Result<Self, KernelError> {
        geom.check()?;
        let floats = geom
            .block_floats()
            .and_then(|b| b.checked_mul(num_blocks))
            .filter(|&f| f.checked_mul(8).is_some())
            .ok_or_else(|| {
                KernelError::Shape(format!("KV pool of {num_blocks} blocks of {geom:?} overflows"))
            })?;
        Ok(Self { geom, num_blocks, k: vec![0.0; floats], v: vec![0.0; floats] })
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geom
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes held by the two pools.
    pub fn memory_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// Copies every slot of block `src` into block `dst` (K and V), e.g. for copy-on-write of a
    /// partially filled block shared between sequences.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), KernelError> {
        let (src, dst) = (src as usize, dst as usize);
        if src >= self.num_blocks || dst >= self.num_blocks {
            return Err(KernelError::Shape(format!(
                "copy_block {src} -> {dst} with {} blocks",
                self.num_blocks
            )));
        }
        let n = self.k.len() / self.num_blocks.max(1);
        if src != dst {
            self.k.copy_within(src * n..(src + 1) * n, dst * n);
            self.v.copy_within(src * n..(src + 1) * n, dst * n);
        }
        Ok(())
    }
}

/// The rows of one sequence in this step's batch.
#[derive(Clone, Debug)]
pub struct SeqRows<'a> {
    /// Rows of the batch (indices into the row dimension of q / k / v / out), in position order.
    pub rows: Range<usize>,
    /// Position of `rows.start` in the sequence.
    pub start_pos: usize,
    /// Physical block ids; logical block `j` holds positions `j*block_size..(j+1)*block_size`.
    pub block_table: &'a [u32],
}

/// Instruction set used by the attention kernels; [`Isa::detect`] picks the best available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports (checked at run time).
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.is_available()).unwrap_or(Isa::Portable)
    }

    /// Whether this CPU can run kernels built for `self`.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => simd::Avx512::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => simd::Avx2::detect().is_some(),
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// Writes the `k`, `v` of each row into its slot: the row at position `p` goes to block
/// `block_table[p / block_size]`, slot `p % block_size`. `k`, `v`: `[rows, n_kv_heads*head_dim]`.
///
/// Rows not covered by any sequence are ignored. Everything is validated before anything is
/// written, so on `Err` the cache is unchanged.
pub fn write_kv(cache: &mut LayerKv, k: &[f32], v: &[f32], seqs: &[SeqRows]) -> Result<(), KernelError> {
    let geom = cache.geom;
    geom.check()?;
    let width = geom.n_kv_heads * geom.head_dim;
    if k.len() != v.len() || !k.len().is_multiple_of(width) {
        return Err(KernelError::Shape(format!(
            "write_kv: k has {} and v {} floats, expected equal multiples of n_kv_heads*head_dim = {width}",
            k.len(),
            v.len()
        )));
    }
    check_seqs(geom, cache.num_blocks, k.len() / width, seqs, true)?;
    let (d, bs) = (geom.head_dim, geom.block_size);
    for s in seqs {
        // One block segment at a time: the rows of a segment fill consecutive slots, so K (which
        // is transposed in the block) is written as runs of `seg` contiguous floats per (head,
        // dim), reading a small L1-resident window of rows, instead of one scattered float per
        // cache line.
        let mut r = 0;
        while r < s.rows.len() {
            let p = s.start_pos + r;
            let (blk, off) = (s.block_table[p / bs] as usize, p % bs);
            let seg = (bs - off).min(s.rows.len() - r);
            let row0 = s.rows.start + r;
            for g in 0..geom.n_kv_heads {
                for dim in 0..d {
                    let dst = &mut cache.k[geom.k_index(blk, g, dim, off)..][..seg];
                    for (j, x) in dst.iter_mut().enumerate() {
                        *x = k[(row0 + j) * width + g * d + dim];
                    }
                }
                for j in 0..seg {
                    let src = (row0 + j) * width + g * d;
                    let at = geom.v_index(blk, g, off + j);
                    cache.v[at..at + d].copy_from_slice(&v[src..src + d]);
                }
            }
            r += seg;
        }
    }
    Ok(())
}

/// Causal grouped-query attention over the paged cache. For each sequence `s`, each row `i` in
/// `s.rows` at position `p = s.start_pos + (i - s.rows.start)` and each head `h` (KV head
/// `g = h / (n_heads / n_kv_heads)`):
///
/// `out[i, h] = sum_{t <= p} softmax_t(scale * q[i,h] . K_s[t,g]) * V_s[t,g]`
///
/// over positions `0..=p` of that sequence in the cache, so [`write_kv`] must already have
/// stored this step's rows. `q`, `out`: `[rows, n_heads*head_dim]`; rows not covered by any
/// sequence are left untouched. Sequences must not share rows (they may share blocks).
///
/// Runs on the rayon pool with the best instruction set of this CPU.
pub fn paged_attention(
    cache: &LayerKv,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    seqs: &[SeqRows],
    out: &mut [f32],
) -> Result<(), KernelError> {
    paged_attention_with(Isa::detect(), cache, q, n_heads, scale, seqs, out)
}

/// [`paged_attention`] with a chosen instruction set (for benchmarks and tests); `Err` if this
/// CPU lacks it.
pub fn paged_attention_with(
    isa: Isa,
    cache: &LayerKv,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    seqs: &[SeqRows],
    out: &mut [f32],
) -> Result<(), KernelError> {
    if !isa.is_available() {
        return Err(KernelError::Shape(format!("instruction set {isa:?} is not available on this CPU")));
    }
    let shape = check_attention(cache, q.len(), out.len(), n_heads, seqs)?;
    let ctx = Ctx { isa, cache, q, n_heads, n_rep: shape.n_rep, scale };
    let mut jobs = plan_jobs(&ctx, seqs);
    jobs.sort_by_key(|j| j.rows.start);

    // Hand each job the disjoint slice of `out` holding its rows.
    let row_stride = n_heads * cache.geom.head_dim;
    let mut work: Vec<(Job, &mut [f32])> = Vec::with_capacity(jobs.len());
    let mut rest = out;
    let mut cursor = 0;
    for job in jobs {
        let (_, tail) = rest.split_at_mut((job.rows.start - cursor) * row_stride);
        let (mine, tail) = tail.split_at_mut(job.rows.len() * row_stride);
        cursor = job.rows.end;
        rest = tail;
        work.push((job, mine));
    }

    let total: usize = work.iter().map(|(j, _)| j.cost).sum();
    if rayon::current_num_threads() == 1 || total < SERIAL_COST {
        // Too little work to pay for waking the pool.
        let mut st = PassState::default();
        for (job, dst) in work {
            run_job_serial(&ctx, &job, dst, &mut st);
        }
    } else {
        work.into_par_iter().for_each(|(job, dst)| {
            if job.splits == 0 {
                run_job_serial(&ctx, &job, dst, &mut PassState::default());
            } else {
                run_job_parallel(&ctx, &job, dst);
            }
        });
    }
    Ok(())
}

/// Plain-loop implementation of [`paged_attention`]: its specification and test oracle.
pub fn paged_attention_reference(
    cache: &LayerKv,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    seqs: &[SeqRows],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let shape = check_attention(cache, q.len(), out.len(), n_heads, seqs)?;
    let geom = cache.geom;
    let d = geom.head_dim;
    let bs = geom.block_size;
    for s in seqs {
        for (r, i) in s.rows.clone().enumerate() {
            let p = s.start_pos + r;
            for h in 0..n_heads {
                let g = h / shape.n_rep;
                let qh = &q[(i * n_heads + h) * d..][..d];
                let scores: Vec<f32> = (0..=p)
                    .map(|t| {
                        let blk = s.block_table[t / bs] as usize;
                        let dot: f32 = (0..d).map(|k| qh[k] * cache.k[geom.k_index(blk, g, k, t % bs)]).sum();
                        scale * dot
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f32> = scores.iter().map(|&x| (x - max).exp()).collect();
                let sum: f32 = weights.iter().sum();
                let o = &mut out[(i * n_heads + h) * d..][..d];
                o.fill(0.0);
                for (t, &w) in weights.iter().enumerate() {
                    let blk = s.block_table[t / bs] as usize;
                    let vrow = &cache.v[geom.v_index(blk, g, t % bs)..][..d];
                    for (x, &y) in o.iter_mut().zip(vrow) {
                        *x += w * y;
                    }
                }
                for x in o.iter_mut() {
                    *x /= sum;
                }
            }
        }
    }
    Ok(())
}

/// Below this cost (query heads x visible keys x head_dim, i.e. multiply-adds of q.k) a call
/// runs on the calling thread: waking the pool costs some tens of microseconds, about what the
/// whole call takes.
const SERIAL_COST: usize = 1 << 21;
/// A job is split (across its KV heads and then key ranges) only above this cost.
const MIN_SPLIT_COST: usize = 1 << 20;
/// Minimum keys per key-range split, so a split's fixed costs stay small against its work.
const MIN_SPLIT_KEYS: usize = 256;
/// Jobs with at most this many query vectors per group run all groups in one pass.
const ALL_GROUPS_MAX_QUERIES: usize = 8;
/// Target number of query vectors (rows x heads of a group) per pass: enough to reuse each
/// K/V tile many times, few enough that scores, accumulators and queries stay in L1/L2.
const QUERIES_PER_PASS: usize = 48;

struct AttnShape {
    n_rep: usize,
}

/// Validates an attention call; returns the GQA ratio.
fn check_attention(
    cache: &LayerKv,
    q_len: usize,
    out_len: usize,
    n_heads: usize,
    seqs: &[SeqRows],
) -> Result<AttnShape, KernelError> {
    let geom = cache.geom;
    geom.check()?;
    if n_heads == 0 || !n_heads.is_multiple_of(geom.n_kv_heads) {
        return Err(KernelError::Shape(format!(
            "n_heads {n_heads} is not a non-zero multiple of n_kv_heads {}",
            geom.n_kv_heads
        )));
    }
    let width = n_heads * geom.head_dim;
    if !q_len.is_multiple_of(width) || out_len != q_len {
        return Err(KernelError::Shape(format!(
            "q has {q_len} and out {out_len} floats, expected equal multiples of n_heads*head_dim = {width}"
        )));
    }
    check_seqs(geom, cache.num_blocks, q_len / width, seqs, false)?;
    Ok(AttnShape { n_rep: n_heads / geom.n_kv_heads })
}

/// Checks that every sequence's rows lie in `0..n_rows` without overlapping another's, and that
/// its block table maps every position the kernel touches to a block `< num_blocks`: positions
/// `start_pos..` of its rows for a write, `0..` up to its last row for attention.
pub(crate) fn check_seqs(
    geom: KvGeometry,
    num_blocks: usize,
    n_rows: usize,
    seqs: &[SeqRows],
    write: bool,
) -> Result<(), KernelError> {
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(seqs.len());
    for (n, s) in seqs.iter().enumerate() {
        if s.rows.start > s.rows.end || s.rows.end > n_rows {
            return Err(KernelError::Shape(format!(
                "sequence {n}: rows {:?} outside the batch of {n_rows} rows",
                s.rows
            )));
        }
        if s.rows.is_empty() {
            continue;
        }
        spans.push(s.rows.clone());
        let last = s
            .start_pos
            .checked_add(s.rows.len() - 1)
            .filter(|l| l.checked_add(TILE).is_some())
            .ok_or_else(|| KernelError::Shape(format!("sequence {n}: position overflows usize")))?;
        let first_block = if write { s.start_pos / geom.block_size } else { 0 };
        let needed = last / geom.block_size + 1;
        let Some(used) = s.block_table.get(first_block..needed) else {
            return Err(KernelError::Shape(format!(
                "sequence {n}: position {last} needs {needed} blocks, block table has {}",
                s.block_table.len()
            )));
        };
        if let Some(b) = used.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(KernelError::Shape(format!(
                "sequence {n}: block id {b} out of range ({num_blocks} blocks)"
            )));
        }
    }
    spans.sort_by_key(|r| r.start);
    if let Some(w) = spans.windows(2).find(|w| w[0].end > w[1].start) {
        return Err(KernelError::Shape(format!("sequences share rows: {:?} and {:?}", w[0], w[1])));
    }
    Ok(())
}

/// What every job of one call shares.
struct Ctx<'a> {
    isa: Isa,
    cache: &'a LayerKv,
    q: &'a [f32],
    n_heads: usize,
    n_rep: usize,
    scale: f32,
}

/// A run of rows of one sequence, all KV head groups. `splits == 0`: run serially on one thread;
/// otherwise the work runs as rayon tasks, the keys split into `splits` ranges.
struct Job<'a> {
    table: &'a [u32],
    rows: Range<usize>,
    pos0: usize,
    cost: usize,
    splits: usize,
    /// Few queries per group (decode rows): one pass walks all groups tile by tile, streaming
    /// each block's K/V of all heads contiguously, and tasks split keys only. Otherwise each
    /// group is its own pass (its queries reuse every tile; state stays in cache), and tasks
    /// split groups first.
    all_groups: bool,
}

impl Job<'_> {
    /// One past the last key position any row of the job sees.
    fn kend(&self) -> usize {
        self.pos0 + self.rows.len()
    }
}

/// Cuts sequences into row chunks of about [`QUERIES_PER_PASS`] query vectors per group, then
/// decides which jobs are big enough against the whole call to be split for the thread pool.
fn plan_jobs<'a>(ctx: &Ctx, seqs: &[SeqRows<'a>]) -> Vec<Job<'a>> {
    let rows_per_job = (QUERIES_PER_PASS / ctx.n_rep).max(1);
    let mut jobs = Vec::new();
    for s in seqs {
        let mut a = s.rows.start;
        while a < s.rows.end {
            let b = (a + rows_per_job).min(s.rows.end);
            let pos0 = s.start_pos + (a - s.rows.start);
            let n = b - a;
            // (query head, key) pairs, sum over rows of (position + 1) times heads, times the
            // work per pair.
            let cost = n
                .saturating_mul(pos0.saturating_add(n.div_ceil(2)))
                .saturating_mul(ctx.n_heads)
                .saturating_mul(ctx.cache.geom.head_dim);
            let all_groups = n * ctx.n_rep <= ALL_GROUPS_MAX_QUERIES;
            jobs.push(Job { table: s.block_table, rows: a..b, pos0, cost, splits: 0, all_groups });
            a = b;
        }
    }
    let threads = rayon::current_num_threads();
    let total: usize = jobs.iter().map(|j| j.cost).sum();
    // Aim for ~4 work items per thread so work stealing can even out unequal rows.
    let target = (total / (4 * threads)).max(1);
    let n_kv = ctx.cache.geom.n_kv_heads;
    for j in &mut jobs {
        if threads > 1 && j.cost > target && j.cost >= MIN_SPLIT_COST {
            let parts = j.cost.div_ceil(target);
            let max_splits = (j.kend() / MIN_SPLIT_KEYS).max(1);
            let per_range = if j.all_groups { 1 } else { n_kv };
            j.splits = parts.div_ceil(per_range).clamp(1, max_splits);
        }
    }
    jobs
}

fn pass_input<'a>(ctx: &Ctx<'a>, job: &Job<'a>, groups: Range<usize>, keys: Range<usize>) -> PassInput<'a> {
    PassInput {
        k: &ctx.cache.k,
        v: &ctx.cache.v,
        geom: ctx.cache.geom,
        q: ctx.q,
        n_heads: ctx.n_heads,
        n_rep: ctx.n_rep,
        scale: ctx.scale,
        table: job.table,
        groups,
        rows: job.rows.clone(),
        pos0: job.pos0,
        keys,
    }
}

/// The passes of a job: all groups at once, or one group each.
fn job_groups(ctx: &Ctx, job: &Job) -> Vec<Range<usize>> {
    let n_kv = ctx.cache.geom.n_kv_heads;
    if job.all_groups {
        std::iter::once(0..n_kv).collect()
    } else {
        (0..n_kv).map(|g| g..g + 1).collect()
    }
}

/// Offset in the job's rows of out of query vector `qi` (of `nq` per group) of group `g`.
fn out_at(ctx: &Ctx, g: usize, qi: usize) -> usize {
    let d = ctx.cache.geom.head_dim;
    (qi / ctx.n_rep) * ctx.n_heads * d + (g * ctx.n_rep + qi % ctx.n_rep) * d
}

/// A whole job on this thread, normalised straight into `dst` (the job's rows of out).
fn run_job_serial(ctx: &Ctx, job: &Job, dst: &mut [f32], st: &mut PassState) {
    let d = ctx.cache.geom.head_dim;
    for groups in job_groups(ctx, job) {
        let inp = pass_input(ctx, job, groups.clone(), 0..job.kend());
        let nq = inp.nq();
        run_pass(ctx.isa, &inp, st);
        for (x, (o, &l)) in st.o.chunks_exact(d).zip(&st.l).enumerate() {
            let inv = 1.0 / l;
            let at = out_at(ctx, groups.start + x / nq, x % nq);
            for (y, &z) in dst[at..at + d].iter_mut().zip(o) {
                *y = z * inv;
            }
        }
    }
}

/// Unnormalised result of one pass over a key range.
struct Partial {
    groups: Range<usize>,
    nq: usize,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

/// The job's passes and key ranges as rayon tasks, then a merge of the key-range partials.
fn run_job_parallel(ctx: &Ctx, job: &Job, dst: &mut [f32]) {
    let d = ctx.cache.geom.head_dim;
    let kend = job.kend();
    let chunk = kend.div_ceil(job.splits).next_multiple_of(TILE);
    let ranges: Vec<Range<usize>> = (0..kend).step_by(chunk).map(|a| a..(a + chunk).min(kend)).collect();
    let tasks: Vec<(Range<usize>, Range<usize>)> = job_groups(ctx, job)
        .into_iter()
        .flat_map(|g| ranges.iter().map(move |r| (g.clone(), r.clone())))
        .collect();
    let partials: Vec<Partial> = tasks
        .into_par_iter()
        .map(|(groups, keys)| {
            let mut st = PassState::default();
            let inp = pass_input(ctx, job, groups.clone(), keys);
            run_pass(ctx.isa, &inp, &mut st);
            Partial {
                groups,
                nq: inp.nq(),
                o: std::mem::take(&mut st.o),
                m: std::mem::take(&mut st.m),
                l: std::mem::take(&mut st.l),
            }
        })
        .collect();
    // Tasks of the same groups are adjacent, key ranges in order.
    for parts in partials.chunk_by(|a, b| a.groups == b.groups) {
        let (groups, nq) = (parts[0].groups.clone(), parts[0].nq);
        for x in 0..groups.len() * nq {
            // Ranges past a row's position saw nothing (m = -inf) and carry no weight.
            let mx = parts.iter().map(|p| p.m[x]).fold(f32::NEG_INFINITY, f32::max);
            let at = out_at(ctx, groups.start + x / nq, x % nq);
            let o = &mut dst[at..at + d];
            o.fill(0.0);
            let mut l = 0.0;
            for p in parts.iter().filter(|p| p.m[x] != f32::NEG_INFINITY) {
                let w = (p.m[x] - mx).exp();
                l += p.l[x] * w;
                for (y, &z) in o.iter_mut().zip(&p.o[x * d..(x + 1) * d]) {
                    *y += w * z;
                }
            }
            let inv = 1.0 / l;
            for y in o.iter_mut() {
                *y *= inv;
            }
        }
    }
}
