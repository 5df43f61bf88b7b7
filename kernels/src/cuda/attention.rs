//! Paged causal GQA attention and the KV write on the GPU (`kernels/cuda/attention.cu`): the
//! semantics of [`crate::attention::paged_attention`] and [`crate::attention::write_kv`], over a
//! device cache laid out `[block][slot][kv_head][dim]` for both K and V.

use super::{grown, DeviceBuf, DeviceFloat, Gpu};
use crate::attention::{check_seqs, KvGeometry, SeqRows};
use crate::KernelError;

/// Keys per partition of the attention kernel (`PART` in `attention.cu`).
pub const ATTENTION_PARTITION: usize = 256;
/// Shared memory every CUDA device grants a block without opting in.
const SHARED_BYTES: usize = 48 << 10;
/// Marks a row in no sequence (`ROW_NONE` in `attention.cu`).
const ROW_NONE: u32 = u32::MAX;

/// One layer's K and V block pools on the device, zero-initialised.
// Without `cuda` the device handle that reads these fields does not exist.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct GpuKvCache<T> {
    pub(super) k: DeviceBuf<T>,
    pub(super) v: DeviceBuf<T>,
    geom: KvGeometry,
    num_blocks: usize,
}

impl<T: DeviceFloat> GpuKvCache<T> {
    pub fn new(gpu: &Gpu, geom: KvGeometry, num_blocks: usize) -> Result<Self, KernelError> {
        geom.check()?;
        let len = geom
            .block_floats()
            .and_then(|b| b.checked_mul(num_blocks))
            .ok_or_else(|| KernelError::Shape(format!("{num_blocks} blocks of {geom:?} overflow")))?;
        Ok(GpuKvCache { k: gpu.zeros(len)?, v: gpu.zeros(len)?, geom, num_blocks })
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geom
    }
}

/// A step's rows as the attention kernels see them (position and block table of each row),
/// uploaded once per step and shared by every layer.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct GpuAttentionRows {
    pub(super) pos: DeviceBuf<u32>,
    pub(super) table: DeviceBuf<u32>,
    pub(super) blocks: DeviceBuf<u32>,
    pub(super) rows: usize,
    purpose: RowsFor,
    /// Partitions of [`ATTENTION_PARTITION`] keys that cover the longest context of the step.
    partitions: usize,
    geom: KvGeometry,
    num_blocks: usize,
}

impl GpuAttentionRows {
    /// Validates `seqs` against a cache of `num_blocks` blocks of `geom` (the checks of
    /// [`crate::attention::write_kv`] or [`crate::attention::paged_attention`], by `purpose`) and
    /// uploads them. `min_partitions` lets a caller that captures CUDA graphs keep the grid fixed
    /// (from the longest context it serves).
    pub fn new(
        gpu: &Gpu,
        geom: KvGeometry,
        num_blocks: usize,
        rows: usize,
        seqs: &[SeqRows],
        purpose: RowsFor,
        min_partitions: usize,
    ) -> Result<Self, KernelError> {
        let packed = pack_rows(geom, num_blocks, rows, seqs, purpose)?;
        Ok(GpuAttentionRows {
            pos: gpu.upload(&packed.pos)?,
            table: gpu.upload(&packed.table)?,
            blocks: gpu.upload(&packed.blocks)?,
            rows,
            purpose,
            partitions: packed.longest.div_ceil(ATTENTION_PARTITION).max(min_partitions).max(1),
            geom,
            num_blocks,
        })
    }

    fn check_cache<T>(&self, cache: &GpuKvCache<T>, purpose: RowsFor) -> Result<(), KernelError> {
        if self.purpose != purpose {
            return Err(KernelError::Shape(format!(
                "rows checked for {:?} used for {purpose:?}",
                self.purpose
            )));
        }
        if cache.geom != self.geom || cache.num_blocks != self.num_blocks {
            return Err(KernelError::Shape(format!(
                "rows were checked against {} blocks of {:?}, the cache has {} of {:?}",
                self.num_blocks, self.geom, cache.num_blocks, cache.geom
            )));
        }
        Ok(())
    }
}

/// What a [`GpuAttentionRows`] is for, which decides how much of each block table is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowsFor {
    /// [`write_kv`]: only the blocks of the rows' own positions (earlier ones may be gone).
    Write,
    /// [`paged_attention`]: every block from position 0 to each row's own.
    Attention,
}

/// A step's rows in the layout `attention.cu` reads (see its header).
#[derive(Debug, PartialEq)]
pub(super) struct PackedRows {
    /// Position of each row, [`ROW_NONE`] for a row in no sequence.
    pub pos: Vec<u32>,
    /// Offset of each row's block table in `blocks`.
    pub table: Vec<u32>,
    /// Every sequence's block table, concatenated (one dummy entry when there are none: a
    /// zero-length device buffer cannot be a kernel argument).
    pub blocks: Vec<u32>,
    /// The longest context of any row (its position + 1).
    pub longest: usize,
}

/// Validates `seqs` as [`crate::attention::paged_attention`] does and packs them.
pub(super) fn pack_rows(
    geom: KvGeometry,
    num_blocks: usize,
    rows: usize,
    seqs: &[SeqRows],
    purpose: RowsFor,
) -> Result<PackedRows, KernelError> {
    check_seqs(geom, num_blocks, rows, seqs, purpose == RowsFor::Write)?;
    let mut pos = vec![ROW_NONE; rows];
    let mut table = vec![0u32; rows];
    let mut blocks = Vec::new();
    let mut longest = 0;
    for s in seqs {
        let offset = u32::try_from(blocks.len())
            .map_err(|_| KernelError::Shape("block tables exceed u32 indices".into()))?;
        blocks.extend_from_slice(s.block_table);
        for (r, i) in s.rows.clone().enumerate() {
            let p = s.start_pos + r;
            pos[i] = u32::try_from(p).ok().filter(|&p| p != ROW_NONE).ok_or_else(|| {
                KernelError::Shape(format!("position {p} does not fit the kernels' u32 positions"))
            })?;
            table[i] = offset;
            longest = longest.max(p + 1);
        }
    }
    if blocks.is_empty() {
        blocks.push(0);
    }
    Ok(PackedRows { pos, table, blocks, longest })
}

/// Semantics: [`crate::attention::write_kv`]'s: each row's `k` and `v`
/// (`[rows, n_kv_heads·head_dim]`) go to the slot of its position. Asynchronous.
pub fn write_kv<T: DeviceFloat>(
    gpu: &Gpu,
    cache: &mut GpuKvCache<T>,
    k: &DeviceBuf<T>,
    v: &DeviceBuf<T>,
    rows: &GpuAttentionRows,
) -> Result<(), KernelError> {
    rows.check_cache(cache, RowsFor::Write)?;
    let width = cache.geom.n_kv_heads * cache.geom.head_dim;
    if k.len() != rows.rows * width || v.len() != rows.rows * width {
        return Err(KernelError::Shape(format!(
            "k holds {} and v {} values; {} rows of {width} need {}",
            k.len(),
            v.len(),
            rows.rows,
            rows.rows * width
        )));
    }
    if rows.rows == 0 {
        return Ok(());
    }
    gpu.launch_kv_write(cache, k, v, rows, width)
}

/// Scratch for the attention partials; grown on demand and reused across calls.
#[derive(Default)]
pub struct AttentionScratch {
    m: Option<DeviceBuf<f32>>,
    l: Option<DeviceBuf<f32>>,
    acc: Option<DeviceBuf<f32>>,
}

/// Semantics: [`crate::attention::paged_attention`]'s (causal GQA over positions `0..=p` of each
/// row's sequence, `write_kv` first), `q` and `out` `[rows, n_heads·head_dim]` in `T`, sums and
/// softmax in f32. Rows in no sequence are untouched. Asynchronous.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: DeviceFloat>(
    gpu: &Gpu,
    cache: &GpuKvCache<T>,
    q: &DeviceBuf<T>,
    n_heads: usize,
    scale: f32,
    rows: &GpuAttentionRows,
    out: &mut DeviceBuf<T>,
    scratch: &mut AttentionScratch,
) -> Result<(), KernelError> {
    rows.check_cache(cache, RowsFor::Attention)?;
    let geom = cache.geom;
    if n_heads == 0 || !n_heads.is_multiple_of(geom.n_kv_heads) || geom.head_dim > 1024 {
        return Err(KernelError::Shape(format!(
            "n_heads {n_heads} must be a non-zero multiple of n_kv_heads {} and head_dim {} at most 1024",
            geom.n_kv_heads, geom.head_dim
        )));
    }
    let n_rep = n_heads / geom.n_kv_heads;
    if n_rep * (geom.head_dim + ATTENTION_PARTITION) * std::mem::size_of::<f32>() > SHARED_BYTES {
        return Err(KernelError::Shape(format!(
            "{n_rep} query heads per KV head of dim {} need more than the {SHARED_BYTES} bytes of shared memory the kernel may use",
            geom.head_dim
        )));
    }
    let width = n_heads * geom.head_dim;
    if q.len() != rows.rows * width || out.len() != q.len() {
        return Err(KernelError::Shape(format!(
            "q holds {} and out {} values; {} rows of {width} need {}",
            q.len(),
            out.len(),
            rows.rows,
            rows.rows * width
        )));
    }
    if rows.rows == 0 {
        return Ok(());
    }
    let partials = rows.rows * n_heads * rows.partitions;
    let m = grown(gpu, &mut scratch.m, partials)?;
    let l = grown(gpu, &mut scratch.l, partials)?;
    let acc = grown(gpu, &mut scratch.acc, partials * geom.head_dim)?;
    gpu.launch_attention(cache, q, n_heads, scale, rows, rows.partitions, out, (m, l, acc))
}
