//! lorahost's CUDA kernels (`kernels/cuda/*.cu`) and a small device handle to run them: segmented
//! LoRA (this file) and paged GQA attention with its KV write (`attention.rs`), with the per-step
//! metadata they read.
//!
//! The op is [`crate::lora::lora_delta`]'s (same semantics, same DoRA rule), for activations and
//! weights stored in f32, f16 or bf16 with f32 accumulation. A step's rows are described once
//! ([`GpuSegments`]: which contiguous rows use which slot of the device adapter pool) and that
//! description is shared by every layer; each (layer, site group) has a [`SlotTable`] that says
//! where each slot's `A`, `B` and DoRA factor live. Launch grids depend only on the slot count and
//! the shapes ([`LaunchPlan`]), so a captured CUDA graph stays valid across steps.
//!
//! This module is the only place that knows whether the build has CUDA: with the `cuda` feature
//! [`Gpu::open`] opens a device; without it the same API exists and `open` returns an error, so
//! callers (benchmarks, the engine) compile the same either way.

mod attention;
#[cfg(feature = "cuda")]
mod device;
#[cfg(not(feature = "cuda"))]
#[path = "stub.rs"]
mod device;
mod model;
mod slots;
#[cfg(test)]
mod tests;

use std::ops::Range;

use crate::KernelError;

pub use attention::{
    paged_attention, write_kv, AttentionScratch, GpuAttentionRows, GpuKvCache, RowsFor, ATTENTION_PARTITION,
};
pub use device::{DeviceBuf, Gpu, PinnedBuf, UploadMark};
pub use model::{fill_uniform, gather_rows, linear, rms_norm, rope, silu_mul, GpuPositions, GpuRope};
pub use slots::{HostSite, SlotPool};

/// Threads per block of both kernels (`THREADS` in `lora.cu`).
pub const BLOCK_THREADS: u32 = 256;
/// Rows of a segment that one expand pass keeps in shared memory (`EXPAND_ROWS` in `lora.cu`).
pub const EXPAND_ROWS: usize = 8;
/// The largest rank a slot may have: expand keeps `EXPAND_ROWS · r_max` f32 in shared memory,
/// which must stay within the 48 KiB every device grants without opting in.
pub const MAX_RANK: usize = 1024;

/// The most slots a pool may have: the launch grid has one block row per slot, and CUDA allows
/// 65535 in that dimension.
pub const MAX_SLOTS: usize = 65535;

/// One slot's weights for one site, as the kernels read them (`SlotSite` in `lora.cu`; the
/// layout is part of the kernel ABI).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SlotSite {
    /// Device address of `A` (`[rank, in_features]`), 0 for an empty slot.
    pub a: u64,
    /// Device address of `B` (`[out_features, rank]`).
    pub b: u64,
    /// Device address of the DoRA factor (`[out_features]` f32), or 0.
    pub dora: u64,
    /// 0 for an empty slot: no delta.
    pub rank: u32,
    pub scale: f32,
}

/// Element types the kernels store activations and weights in.
pub trait DeviceFloat: device::DeviceElem + device::BlasFloat + Send + Sync + 'static {
    /// Kernel name suffix in `lora.cu`.
    const SUFFIX: &'static str;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl DeviceFloat for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl DeviceFloat for half::f16 {
    const SUFFIX: &'static str = "f16";
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl DeviceFloat for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// The per-step segment table `lora.cu` reads: `[n, (start, end, slot) × n]`.
///
/// Semantics: `segments` are the step's runs of rows that use an adapter, `(rows, slot)`; they
/// must lie within `0..rows`, not overlap, and number at most `n_slots` (the launch grid has one
/// block column per slot); every slot must be `< n_slots`. Rows in no segment get no delta. `Err`
/// names the first offending segment.
pub fn pack_segments(
    rows: usize,
    n_slots: usize,
    segments: &[(Range<usize>, u32)],
) -> Result<Vec<u32>, KernelError> {
    let bad = |k: usize, why: String| Err(KernelError::Shape(format!("segment {k}: {why}")));
    if n_slots > MAX_SLOTS {
        return Err(KernelError::Shape(format!(
            "a pool of {n_slots} slots is above the kernels' {MAX_SLOTS}"
        )));
    }
    if segments.len() > n_slots {
        return Err(KernelError::Shape(format!("{} segments for a pool of {n_slots} slots", segments.len())));
    }
    if rows > u32::MAX as usize {
        return Err(KernelError::Shape(format!("{rows} rows do not fit the kernels' u32 indices")));
    }
    let mut sorted: Vec<(usize, usize)> = Vec::with_capacity(segments.len());
    let mut meta = Vec::with_capacity(1 + 3 * segments.len());
    meta.push(segments.len() as u32);
    for (k, (range, slot)) in segments.iter().enumerate() {
        if range.start > range.end || range.end > rows {
            return bad(k, format!("rows {range:?} are not within 0..{rows}"));
        }
        if *slot as usize >= n_slots {
            return bad(k, format!("slot {slot} is not below the pool's {n_slots} slots"));
        }
        // Empty segments cover no rows, so they can overlap nothing; leaving them out of the
        // sort keeps every pair of non-empty neighbours adjacent.
        if !range.is_empty() {
            sorted.push((range.start, k));
        }
        meta.extend([range.start as u32, range.end as u32, *slot]);
    }
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        let (prev, next) = (&segments[pair[0].1].0, &segments[pair[1].1].0);
        if next.start < prev.end {
            return bad(pair[1].1, format!("rows {next:?} overlap segment {}'s {prev:?}", pair[0].1));
        }
    }
    Ok(meta)
}

/// How one shrink/expand pair is launched; a function of the pool and the shapes only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Slices of `in_features` the shrink splits its reduction into (grid x).
    pub splits: u32,
    /// Elements per slice, a multiple of 8 (one vector load per lane).
    pub split_len: u32,
}

impl LaunchPlan {
    /// Enough shrink blocks to cover the device about twice (`sm_count` multiprocessors) when the
    /// pool's slots are all in use, without slices shorter than one pass of a warp (256 elements):
    /// with few rows per adapter the reduction over `in_features` is the only parallelism there is.
    pub fn new(n_slots: usize, sites: usize, in_features: usize, sm_count: usize) -> Self {
        let blocks_per_split = (n_slots * sites).max(1);
        let wanted = (2 * sm_count.max(1)).div_ceil(blocks_per_split);
        let most = in_features.div_ceil(256).max(1);
        let splits = wanted.clamp(1, most);
        let split_len = in_features.div_ceil(splits).next_multiple_of(8).max(8);
        // Rounding the slice up can leave trailing slices empty; drop them.
        let splits = in_features.div_ceil(split_len).max(1);
        LaunchPlan { splits: splits as u32, split_len: split_len as u32 }
    }

    /// f32 scratch the shrink writes and the expand reads: `[sites][splits][rows][r_max]`.
    pub fn scratch_len(&self, sites: usize, rows: usize, r_max: usize) -> usize {
        sites * self.splits as usize * rows * r_max
    }
}

/// A step's segments on the device ([`pack_segments`]'s table), shared by every layer's calls.
pub struct GpuSegments {
    meta: DeviceBuf<u32>,
    rows: usize,
    n_slots: usize,
}

impl GpuSegments {
    /// Validates (as [`pack_segments`]) and uploads a step's segments.
    pub fn new(
        gpu: &Gpu,
        rows: usize,
        n_slots: usize,
        segments: &[(Range<usize>, u32)],
    ) -> Result<Self, KernelError> {
        let meta = pack_segments(rows, n_slots, segments)?;
        Ok(GpuSegments { meta: gpu.upload(&meta)?, rows, n_slots })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// One slot's weights for one site, in device buffers.
#[derive(Clone, Copy)]
pub struct SlotWeights<'w, T> {
    /// `[rank, in_features]`.
    pub a: &'w DeviceBuf<T>,
    /// `[out_features, rank]`.
    pub b: &'w DeviceBuf<T>,
    /// DoRA's per-output factor, `[out_features]`.
    pub dora: Option<&'w DeviceBuf<f32>>,
    pub rank: usize,
    pub scale: f32,
}

/// Where each slot's weights live, for the sites of one fused call (one layer's q/k/v, say):
/// `[sites][n_slots]` [`SlotSite`] records on the device. It borrows the weight buffers, so none
/// can be freed while a kernel may read it.
pub struct SlotTable<'w, T> {
    table: DeviceBuf<SlotSite>,
    in_features: usize,
    out_features: Vec<usize>,
    n_slots: usize,
    r_max: usize,
    _weights: std::marker::PhantomData<&'w DeviceBuf<T>>,
}

impl<'w, T: DeviceFloat> SlotTable<'w, T> {
    /// `slots[site][slot]`: every site has the same number of slots; `None` is an empty slot.
    /// Checks every present slot's buffer lengths against its rank and the site's shapes, the
    /// rank against [`MAX_RANK`] and the scale for finiteness; `Err` names the site and slot.
    pub fn new(
        gpu: &Gpu,
        in_features: usize,
        out_features: &[usize],
        slots: &[Vec<Option<SlotWeights<'w, T>>>],
    ) -> Result<Self, KernelError> {
        let n_slots = slots.first().map_or(0, Vec::len);
        if slots.is_empty() || out_features.len() != slots.len() {
            return Err(KernelError::Shape(format!(
                "{} sites of slots for {} output widths (need one each, at least one)",
                slots.len(),
                out_features.len()
            )));
        }
        if n_slots > MAX_SLOTS {
            return Err(KernelError::Shape(format!(
                "a pool of {n_slots} slots is above the kernels' {MAX_SLOTS}"
            )));
        }
        let mut records = Vec::with_capacity(slots.len() * n_slots);
        let mut r_max = 1;
        for (site, (site_slots, &out)) in slots.iter().zip(out_features).enumerate() {
            if site_slots.len() != n_slots {
                return Err(KernelError::Shape(format!(
                    "site {site} has {} slots, site 0 {n_slots}",
                    site_slots.len()
                )));
            }
            for (slot, w) in site_slots.iter().enumerate() {
                let Some(w) = w else {
                    records.push(SlotSite::default());
                    continue;
                };
                let bad = |why: String| Err(KernelError::Shape(format!("site {site} slot {slot}: {why}")));
                if w.rank > MAX_RANK {
                    return bad(format!("rank {} is above the GPU kernels' {MAX_RANK}", w.rank));
                }
                if w.a.len() != w.rank * in_features || w.b.len() != out * w.rank {
                    return bad(format!(
                        "A holds {} and B {} elements; rank {} needs {} and {}",
                        w.a.len(),
                        w.b.len(),
                        w.rank,
                        w.rank * in_features,
                        out * w.rank
                    ));
                }
                if w.dora.is_some_and(|g| g.len() != out) {
                    return bad(format!("the DoRA factor must hold {out} values"));
                }
                if !w.scale.is_finite() {
                    return bad(format!("scale {} is not finite", w.scale));
                }
                r_max = r_max.max(w.rank);
                records.push(SlotSite {
                    a: gpu.address(w.a),
                    b: gpu.address(w.b),
                    dora: w.dora.map_or(0, |g| gpu.address(g)),
                    rank: w.rank as u32,
                    scale: w.scale,
                });
            }
        }
        Ok(SlotTable {
            table: gpu.upload(&records)?,
            in_features,
            out_features: out_features.to_vec(),
            n_slots,
            r_max,
            _weights: std::marker::PhantomData,
        })
    }

    /// The largest rank of any slot (at least 1): the row stride of the scratch.
    pub fn r_max(&self) -> usize {
        self.r_max
    }

    pub fn sites(&self) -> usize {
        self.out_features.len()
    }
}

/// The scratch buffer in `slot`, replaced by a zeroed one of `len` when it is missing or shorter.
fn grown<'s>(
    gpu: &Gpu,
    slot: &'s mut Option<DeviceBuf<f32>>,
    len: usize,
) -> Result<&'s mut DeviceBuf<f32>, KernelError> {
    let buf = match slot.take() {
        Some(buf) if buf.len() >= len => buf,
        _ => gpu.zeros(len)?,
    };
    Ok(slot.insert(buf))
}

/// Scratch for a call's partial shrink sums; grown on demand and reused across calls.
pub struct LoraScratch {
    buf: Option<DeviceBuf<f32>>,
}

impl LoraScratch {
    pub fn new() -> Self {
        LoraScratch { buf: None }
    }
}

impl Default for LoraScratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Semantics: for every site `s` of `table` and every segment (rows, slot) of `segments`:
/// `ys[s][rows] += scale · (x[rows] · Aᵀ) · Bᵀ`, with the slot's DoRA factor as in
/// [`crate::lora::lora_delta`]; empty slots and rows in no segment are untouched. `x` is
/// `[rows, in_features]`, each `ys[s]` `[rows, out_features[s]]`, row-major, in `T`; all sums in
/// f32, each output rounded to `T` once.
///
/// Shapes are checked before anything runs (on `Err` nothing was launched). Asynchronous: the
/// work is queued on the device's stream ([`Gpu::download`] and [`Gpu::synchronize`] wait).
pub fn lora_delta<T: DeviceFloat>(
    gpu: &Gpu,
    x: &DeviceBuf<T>,
    ys: &mut [&mut DeviceBuf<T>],
    segments: &GpuSegments,
    table: &SlotTable<'_, T>,
    scratch: &mut LoraScratch,
) -> Result<(), KernelError> {
    let view = TableView {
        records: &table.table,
        in_features: table.in_features,
        out_features: &table.out_features,
        n_slots: table.n_slots,
        r_max: table.r_max,
    };
    delta_with_table(gpu, x, ys, segments, view, scratch)
}

/// A slot table as the launch needs it: from a [`SlotTable`] or a [`SlotPool`] group.
struct TableView<'t> {
    records: &'t DeviceBuf<SlotSite>,
    in_features: usize,
    out_features: &'t [usize],
    n_slots: usize,
    r_max: usize,
}

/// [`lora_delta`] over any table whose records were checked against its buffers.
fn delta_with_table<T: DeviceFloat>(
    gpu: &Gpu,
    x: &DeviceBuf<T>,
    ys: &mut [&mut DeviceBuf<T>],
    segments: &GpuSegments,
    table: TableView<'_>,
    scratch: &mut LoraScratch,
) -> Result<(), KernelError> {
    let rows = segments.rows;
    let sites = table.out_features.len();
    let shape = |m: String| Err(KernelError::Shape(m));
    if x.len() != rows * table.in_features {
        return shape(format!(
            "x holds {} values, {rows} rows of {} need {}",
            x.len(),
            table.in_features,
            rows * table.in_features
        ));
    }
    if ys.len() != sites {
        return shape(format!("{} outputs for a table of {sites} sites", ys.len()));
    }
    for (site, (y, &out)) in ys.iter().zip(table.out_features).enumerate() {
        if y.len() != rows * out {
            return shape(format!(
                "site {site}: y holds {} values, {rows} rows of {out} need {}",
                y.len(),
                rows * out
            ));
        }
    }
    if segments.n_slots != table.n_slots {
        return shape(format!(
            "segments are for {} slots, the table has {}",
            segments.n_slots, table.n_slots
        ));
    }
    if rows == 0 || table.n_slots == 0 {
        return Ok(());
    }
    let plan = LaunchPlan::new(table.n_slots, sites, table.in_features, gpu.sm_count());
    let buf = grown(gpu, &mut scratch.buf, plan.scratch_len(sites, rows, table.r_max))?;
    let mut outs: Vec<(&mut DeviceBuf<T>, usize)> =
        ys.iter_mut().map(|y| &mut **y).zip(table.out_features.iter().copied()).collect();
    gpu.launch_lora(
        x,
        rows,
        table.in_features,
        &mut outs,
        &segments.meta,
        table.records,
        table.n_slots,
        table.r_max,
        plan,
        buf,
    )
}

/// The baseline our kernels are measured against: for each segment, two cuBLAS gemms
/// (`v = x[rows]·Aᵀ`, then `y[rows] += scale·v·Bᵀ`), one site, no DoRA. `v` is scratch of at
/// least `rows · rank` elements of the largest segment.
pub fn lora_delta_cublas<T: DeviceFloat>(
    gpu: &Gpu,
    x: &DeviceBuf<T>,
    in_features: usize,
    y: &mut DeviceBuf<T>,
    out_features: usize,
    segments: &[(Range<usize>, SlotWeights<'_, T>)],
    v: &mut DeviceBuf<T>,
) -> Result<(), KernelError> {
    for (k, (rows, w)) in segments.iter().enumerate() {
        let n = rows.len();
        if rows.end * in_features > x.len() || rows.end * out_features > y.len() || n * w.rank > v.len() {
            return Err(KernelError::Shape(format!("segment {k}: rows {rows:?} exceed x, y or v")));
        }
        if w.a.len() != w.rank * in_features || w.b.len() != out_features * w.rank {
            return Err(KernelError::Shape(format!("segment {k}: A or B does not match rank {}", w.rank)));
        }
        if n == 0 || w.rank == 0 {
            continue;
        }
        gpu.gemm_abt(x, rows.start * in_features, w.a, v, 0, (n, w.rank, in_features), (1.0, 0.0))?;
        gpu.gemm_abt(v, 0, w.b, y, rows.start * out_features, (n, out_features, w.rank), (w.scale, 1.0))?;
    }
    Ok(())
}
