//! Quantized weight matrices in GGML block formats (Q4_1, Q8_0) and their fast multi-row matmul.
//!
//! This module owns the in-memory layout of quantized linear-layer weights, the conversion from
//! (and back to) the GGUF byte layout, exact dequantization, and `y = x · Wᵀ` for 1..N rows of
//! activations. It knows nothing about models: callers hand it GGML blocks and f32 activations.
//!
//! How the matmul works: each call quantizes `x` once to int8 per 32-element block x ≈ dx · qx
//! (llama.cpp's Q8_1 idea: a per-block scale plus the block sum dx · Σqx, so Q4_1's `m` term
//! becomes `m · Σx̃`), then runs integer dot products against the weight blocks (AVX-512 VNNI
//! `vpdpbusd`, AVX2 `vpmaddubsw`, or portable scalar code, chosen at runtime) and folds in the
//! per-block scales in f32. The result is W · x̃ up to f32 rounding.
//!
//! Layout (chosen so the kernels need no horizontal reductions): rows are interleaved in groups
//! of 16. For one group and one 32-element block, lane `j` of each 64-byte vector holds 4
//! consecutive payload bytes of row `16g + j`, and the 16 rows' f16 scales sit side by side, so
//! one `vpdpbusd` with a broadcast 4-byte chunk of `x` advances 16 output rows at once and the
//! accumulator lanes end up being exactly 16 consecutive outputs. Each unpacked weight block is
//! reused for 4 activation rows (batched decode, prefill); single rows (decode) stream two
//! groups at a time with software prefetch, since they are DRAM-bound.
//!
//! Threads: the calling thread always computes, and helpers from the global rayon pool join in as
//! they wake (`par`), so a call never waits for a sleeping worker to start.

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

use crate::KernelError;

mod act;
pub(crate) mod par;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use act::Acts;

/// Elements per GGML block (both supported formats).
pub const BLOCK_ELEMS: usize = 32;
/// Output rows interleaved per storage group; every kernel produces 16 outputs at a time.
const GROUP_ROWS: usize = 16;
/// Storage is allocated in 64-byte lines so every 512-bit load is one aligned cache line.
const LINE: usize = 64;

/// GGML block formats a [`QuantMatrix`] can hold.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// value = f32(d) · q + f32(m), q a 4-bit unsigned nibble; 20 bytes per 32 elements.
    Q4_1,
    /// value = f32(d) · q, q a signed byte; 34 bytes per 32 elements.
    Q8_0,
}

impl QuantFormat {
    /// Bytes of one 32-element block as GGUF stores it.
    pub const fn ggml_block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q8_0 => 34,
        }
    }

    /// Bytes of quantized values per row-block (nibbles or int8s), without scales.
    const fn payload_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_1 => 16,
            QuantFormat::Q8_0 => 32,
        }
    }

    /// Bytes of one 16-row group holding `nb` blocks (see `group_block_offsets`).
    fn group_bytes(self, nb: usize) -> Option<usize> {
        match self {
            QuantFormat::Q4_1 => nb.checked_mul(320),
            QuantFormat::Q8_0 => (nb / 2).checked_mul(1088)?.checked_add(nb % 2 * 576),
        }
    }
}

/// Which inner kernel a matmul runs; [`MatmulPath::best`] is what [`QuantMatrix::matmul`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulPath {
    /// Portable integer-dot code; the semantic twin of the SIMD paths and the non-x86 fallback.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (`vpmaddubsw`).
    Avx2,
    /// x86-64 AVX-512 F/BW + VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl MatmulPath {
    /// Every path, slowest first.
    pub const ALL: [MatmulPath; 3] = [MatmulPath::Scalar, MatmulPath::Avx2, MatmulPath::Avx512Vnni];

    /// available ⇔ this CPU has the instructions the path needs.
    pub fn is_available(self) -> bool {
        match self {
            MatmulPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            MatmulPath::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            MatmulPath::Avx512Vnni => {
                MatmulPath::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// best = the fastest available path (detected once per process).
    pub fn best() -> MatmulPath {
        static BEST: OnceLock<MatmulPath> = OnceLock::new();
        *BEST.get_or_init(|| {
            Self::ALL.into_iter().rev().find(|p| p.is_available()).unwrap_or(MatmulPath::Scalar)
        })
    }
}

/// Byte offsets, inside a 16-row group, of block `b`'s f16 scales (`d[16]`, then `m[16]` for
/// Q4_1) and of its payload (vector k, lane j = payload bytes 4k..4k+4 of row j).
///
/// Q4_1 blocks are 320 contiguous bytes `[d | m | nibbles]`; Q8_0 blocks go in pairs of 1088
/// bytes `[d(b) | d(b+1) | q(b) | q(b+1)]` (an odd last block pads to 576) so that every payload
/// vector stays 64-byte aligned. Either way a group is one contiguous forward stream, which is
/// what the hardware and software prefetchers want in the DRAM-bound decode case.
#[inline(always)]
const fn group_block_offsets(format: QuantFormat, b: usize) -> (usize, usize) {
    match format {
        QuantFormat::Q4_1 => (b * 320, b * 320 + 64),
        QuantFormat::Q8_0 => {
            let (base, odd) = ((b / 2) * 1088, b % 2);
            (base + odd * 32, base + 64 + odd * 512)
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; LINE]);

/// A `[out_features, in_features]` weight matrix of GGML blocks, repacked for the matmul kernels.
///
/// W[o, i] is the dequantized value of element `i % 32` of block `i / 32` of row `o`.
/// Storage is the GGML bytes reordered (16-row interleave, scales split from values), with at most
/// 15 zero rows of padding; no precision is lost, so [`QuantMatrix::dequantize`] is exact.
#[derive(Clone)]
pub struct QuantMatrix {
    format: QuantFormat,
    out_features: usize,
    in_features: usize,
    /// Blocks per row, `in_features / 32`.
    nb: usize,
    /// Row groups, `ceil(out_features / 16)`.
    groups: usize,
    /// Bytes per group (a multiple of 64, see `group_block_offsets`).
    group_stride: usize,
    data: Vec<Line>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("format", &self.format)
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("storage_bytes", &self.storage_bytes())
            .finish()
    }
}

/// Raw output pointer shared by the parallel tasks of one matmul; each task writes a disjoint
/// set of `y` elements (its row-group columns × its activation rows).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements and the owning `&mut [f32]` outlives the parallel section.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// How one matmul call is cut into chunks: (output row-group range × activation row panel).
#[derive(Clone, Copy)]
struct Chunks {
    rows: usize,
    n_panels: usize,
    panel: usize,
    chunk_groups: usize,
    total: usize,
    /// Whether the call is big enough to be worth a helper thread.
    parallel: bool,
}

impl Chunks {
    /// `rows` > 0.
    fn of(m: &QuantMatrix, rows: usize) -> Self {
        // Row panels bound the activation working set (≤ 64 rows ≈ 100 KB of int8 at in = 1536)
        // so it stays in L2 while the weights of a chunk are swept.
        let n_panels = rows.div_ceil(PANEL_ROWS);
        let panel = rows.div_ceil(n_panels);
        // One unit = one 16-row group × one 32-block × one activation row = 512 MACs (a few ns).
        let units_per_group = m.nb * panel;
        let chunk_groups = (CHUNK_UNITS / units_per_group).clamp(1, m.groups);
        let total = m.groups.div_ceil(chunk_groups) * n_panels;
        Self {
            rows,
            n_panels,
            panel,
            chunk_groups,
            total,
            parallel: m.groups * m.nb * rows >= PARALLEL_MIN_UNITS,
        }
    }

    /// Runs chunk `t` (< `total`) of `m`'s matmul of `rows` activation rows.
    ///
    /// # Safety
    /// As [`QuantMatrix::run_range`]: `y` is the call's `[rows, out_features]` output and no
    /// other thread touches this chunk's elements.
    unsafe fn run(&self, m: &QuantMatrix, path: MatmulPath, acts: &Acts, t: usize, y: OutPtr) {
        let (c, p) = (t / self.n_panels, t % self.n_panels);
        let g = c * self.chunk_groups..((c + 1) * self.chunk_groups).min(m.groups);
        let r = p * self.panel..((p + 1) * self.panel).min(self.rows);
        m.run_range(path, acts, g, r, y);
    }
}

thread_local! {
    /// Each thread's activation buffer, reused across calls; taken (not borrowed) so that a
    /// re-entrant call from a stolen rayon job stays safe: it just allocates its own buffer.
    static ACTS: Cell<Acts> = Cell::new(Acts::default());
}

impl QuantMatrix {
    /// W[o, i] = dequant(block `i/32` of row `o`)[i % 32], from GGML blocks laid out exactly as a
    /// GGUF file stores them: row-major, `out_features` rows of `in_features / 32` blocks.
    ///
    /// Q4_1 block (20 bytes): f16 d, f16 m, 16 nibble bytes; element j < 16 is the low nibble of
    /// byte j, element j ≥ 16 the high nibble of byte j − 16; value = f32(d) · q + f32(m).
    /// Q8_0 block (34 bytes): f16 d, 32 × i8; value = f32(d) · q.
    pub fn from_ggml_bytes(
        format: QuantFormat,
        out_features: usize,
        in_features: usize,
        bytes: &[u8],
    ) -> Result<Self, KernelError> {
        let bs = format.ggml_block_bytes();
        // Check the byte count before allocating anything sized by the (untrusted) dims.
        let expected = (in_features / BLOCK_ELEMS)
            .checked_mul(out_features)
            .and_then(|n| n.checked_mul(bs))
            .ok_or_else(|| KernelError::Shape("matrix size overflows usize".into()))?;
        if bytes.len() != expected {
            return Err(KernelError::Quant(format!(
                "{format:?} [{out_features}, {in_features}] needs {expected} bytes, got {}",
                bytes.len()
            )));
        }
        let mut m = Self::zeroed(format, out_features, in_features)?;
        for (o, row) in bytes.chunks_exact(m.nb * bs).enumerate() {
            for (b, block) in row.chunks_exact(bs).enumerate() {
                m.set_block(o, b, block);
            }
        }
        Ok(m)
    }

    /// An all-zero matrix (every scale 0) with validated dimensions.
    fn zeroed(format: QuantFormat, out_features: usize, in_features: usize) -> Result<Self, KernelError> {
        if out_features == 0 || in_features == 0 || !in_features.is_multiple_of(BLOCK_ELEMS) {
            return Err(KernelError::Shape(format!(
                "quantized matrix [{out_features}, {in_features}]: both dims must be positive \
                 and in_features a multiple of {BLOCK_ELEMS}"
            )));
        }
        let nb = in_features / BLOCK_ELEMS;
        let groups = out_features.div_ceil(GROUP_ROWS);
        let overflow = || KernelError::Shape("matrix size overflows usize".into());
        let group_stride = format.group_bytes(nb).ok_or_else(overflow)?;
        let lines = groups.checked_mul(group_stride / LINE).ok_or_else(overflow)?;
        Ok(QuantMatrix {
            format,
            out_features,
            in_features,
            nb,
            groups,
            group_stride,
            data: vec![Line([0; LINE]); lines],
        })
    }

    /// Rows of W (outputs per activation row).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Columns of W (inputs per activation row).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The GGML block format of the weights.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Bytes of packed weight storage (GGML size plus < 16 rows of group padding).
    pub fn storage_bytes(&self) -> usize {
        self.data.len() * LINE
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is a plain `[u8; 64]` with no padding, so the vector is contiguous bytes.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.data.len() * LINE) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and the exclusive borrow of `self.data` is held.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_mut_ptr().cast::<u8>(), self.data.len() * LINE) }
    }

    /// Byte offsets of (row, block): the f16 d, the f16 m (Q4_1 only) and the payload base; payload
    /// byte `p` lives at `payload + payload_pos(p)`.
    fn block_offsets(&self, row: usize, b: usize) -> (usize, usize, usize) {
        let (g, j) = (row / GROUP_ROWS, row % GROUP_ROWS);
        let (scales, payload) = group_block_offsets(self.format, b);
        let base = g * self.group_stride;
        let d = base + scales + 2 * j;
        (d, d + 2 * GROUP_ROWS, base + payload + 4 * j)
    }

    /// Payload byte `p` of a row-block sits in 64-byte vector `p / 4`, at byte `p % 4` of its lane.
    const fn payload_pos(p: usize) -> usize {
        (p / 4) * LINE + p % 4
    }

    /// Stores one GGML block as (row, block). Q8_0 values are stored offset by 128 (`q ^ 0x80`) so
    /// the VNNI kernel can use them as the unsigned operand of `vpdpbusd`.
    fn set_block(&mut self, row: usize, b: usize, src: &[u8]) {
        let format = self.format;
        let (d, m, payload) = self.block_offsets(row, b);
        let bytes = self.bytes_mut();
        bytes[d..d + 2].copy_from_slice(&src[0..2]);
        match format {
            QuantFormat::Q4_1 => {
                bytes[m..m + 2].copy_from_slice(&src[2..4]);
                for (p, &v) in src[4..20].iter().enumerate() {
                    bytes[payload + Self::payload_pos(p)] = v;
                }
            }
            QuantFormat::Q8_0 => {
                for (p, &v) in src[2..34].iter().enumerate() {
                    bytes[payload + Self::payload_pos(p)] = v ^ 0x80;
                }
            }
        }
    }

    /// Reconstructs the GGML bytes of (row, block) into `dst` (`ggml_block_bytes` long).
    fn get_block(&self, row: usize, b: usize, dst: &mut [u8]) {
        let (d, m, payload) = self.block_offsets(row, b);
        let bytes = self.bytes();
        dst[0..2].copy_from_slice(&bytes[d..d + 2]);
        match self.format {
            QuantFormat::Q4_1 => {
                dst[2..4].copy_from_slice(&bytes[m..m + 2]);
                for (p, v) in dst[4..20].iter_mut().enumerate() {
                    *v = bytes[payload + Self::payload_pos(p)];
                }
            }
            QuantFormat::Q8_0 => {
                for (p, v) in dst[2..34].iter_mut().enumerate() {
                    *v = bytes[payload + Self::payload_pos(p)] ^ 0x80;
                }
            }
        }
    }

    /// new.W[i, :] = self.W[perm[i], :] for every i (a row gather; `perm.len()` = out_features).
    /// Used to undo llama.cpp's q/k row order at load.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Self, KernelError> {
        if perm.len() != self.out_features {
            return Err(KernelError::Shape(format!(
                "row permutation has {} entries for {} rows",
                perm.len(),
                self.out_features
            )));
        }
        if let Some(&bad) = perm.iter().find(|&&p| p >= self.out_features) {
            return Err(KernelError::Shape(format!(
                "row permutation entry {bad} out of range for {} rows",
                self.out_features
            )));
        }
        let mut out = Self::zeroed(self.format, self.out_features, self.in_features)?;
        let mut block = [0u8; 34];
        let block = &mut block[..self.format.ggml_block_bytes()];
        for (i, &src) in perm.iter().enumerate() {
            for b in 0..self.nb {
                self.get_block(src, b, block);
                out.set_block(i, b, block);
            }
        }
        Ok(out)
    }

    /// out[i] = W[row, i] exactly (f32(d) · q + f32(m) for Q4_1, f32(d) · q for Q8_0).
    /// Used for embedding lookups; `out.len()` must be in_features.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if row >= self.out_features {
            return Err(KernelError::Shape(format!("row {row} out of range for {} rows", self.out_features)));
        }
        if out.len() != self.in_features {
            return Err(KernelError::Shape(format!(
                "row buffer has {} elements, matrix has {} columns",
                out.len(),
                self.in_features
            )));
        }
        let mut block = [0u8; 34];
        let block = &mut block[..self.format.ggml_block_bytes()];
        for (b, dst) in out.chunks_exact_mut(BLOCK_ELEMS).enumerate() {
            self.get_block(row, b, block);
            decode_ggml_block(self.format, block, dst);
        }
        Ok(())
    }

    /// W as row-major f32 `[out_features, in_features]`, exactly (see [`Self::dequantize_row`]).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_features * self.in_features];
        for (row, dst) in w.chunks_exact_mut(self.in_features).enumerate() {
            // Cannot fail: row < out_features and dst has in_features elements.
            let _ = self.dequantize_row(row, dst);
        }
        w
    }

    /// y[r, o] = Σ_i x[r, i] · W[o, i] for r in 0..rows, with x `[rows, in]` and y `[rows, out]`
    /// row-major (y is overwritten).
    ///
    /// Activations are quantized to int8 per 32-element block (as llama.cpp does), so results
    /// differ from exact f32 math by ~0.1–1 % of max |y|; see [`Self::matmul_f32_reference`].
    /// Work is split over output-feature groups (and 64-row panels for big batches): the calling
    /// thread computes, and up to `rayon::current_num_threads() − 1` helpers from the global
    /// rayon pool take chunks as they wake; tiny problems (< 256 × 512 MACs) stay on the caller.
    /// The int8 activation buffer is reused per calling thread; a parallel call allocates only
    /// ~100 bytes of scheduling state.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with_path(MatmulPath::best(), x, rows, y)
    }

    /// [`Self::matmul`] forced onto one kernel path (for tests and benchmarks); Err if the CPU
    /// lacks the path's instructions.
    pub fn matmul_with_path(
        &self,
        path: MatmulPath,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        self.check_matmul_shapes(x, rows, y)?;
        if !path.is_available() {
            return Err(KernelError::Shape(format!("kernel path {path:?} not available on this CPU")));
        }
        Self::run_shared_input(path, x, rows, &mut [(self, y)]);
        Ok(())
    }

    /// `y_k = x · W_kᵀ` for every `(W_k, y_k)` of `outputs`, all with the same input `x`
    /// (`[rows, in]`, every `W_k` with this `in`): exactly [`Self::matmul`] on each, with `x`
    /// quantized once for all of them and their chunks shared out in one parallel section
    /// (q/k/v, gate/up: one activation pass and one wait instead of three or two).
    pub fn matmul_shared_input(
        x: &[f32],
        rows: usize,
        outputs: &mut [(&QuantMatrix, &mut [f32])],
    ) -> Result<(), KernelError> {
        let Some(in_features) = outputs.first().map(|(m, _)| m.in_features) else { return Ok(()) };
        for (m, y) in outputs.iter() {
            if m.in_features != in_features {
                return Err(KernelError::Shape(format!(
                    "matmuls of one input need one in_features: {} and {in_features}",
                    m.in_features
                )));
            }
            m.check_matmul_shapes(x, rows, y)?;
        }
        Self::run_shared_input(MatmulPath::best(), x, rows, outputs);
        Ok(())
    }

    /// The matmuls of one input, validated (shapes, an available `path`): `x` quantized once,
    /// then every matrix's (row group × activation row) chunks in one section on the calling
    /// thread plus rayon helpers (see `par`).
    fn run_shared_input(
        path: MatmulPath,
        x: &[f32],
        rows: usize,
        outputs: &mut [(&QuantMatrix, &mut [f32])],
    ) {
        let Some(in_features) = outputs.first().map(|(m, _)| m.in_features) else { return };
        if rows == 0 {
            return;
        }
        let mut acts = ACTS.with(Cell::take);
        acts.quantize(path, x, rows, in_features);
        // (matrix, its output, its cut, its first chunk in the shared numbering)
        let mut parts = Vec::with_capacity(outputs.len());
        let (mut total, mut parallel) = (0, false);
        for (m, y) in outputs.iter_mut() {
            let chunks = Chunks::of(m, rows);
            parts.push((*m, OutPtr(y.as_mut_ptr()), chunks, total));
            total += chunks.total;
            parallel |= chunks.parallel;
        }
        let helpers = if parallel { rayon::current_num_threads().saturating_sub(1) } else { 0 };
        par::for_each_chunk(total, helpers, &|c| {
            let k = parts.partition_point(|&(_, _, _, first)| first <= c) - 1;
            let (m, y, chunks, first) = parts[k];
            // SAFETY: each chunk covers a disjoint (group, row) rectangle of its own matrix's
            // output, and `for_each_chunk` returns only after all of them are done.
            unsafe { chunks.run(m, path, &acts, c - first, y) };
        });
        ACTS.with(|c| c.set(acts));
    }

    fn check_matmul_shapes(&self, x: &[f32], rows: usize, y: &[f32]) -> Result<(), KernelError> {
        let want_x = rows.checked_mul(self.in_features);
        let want_y = rows.checked_mul(self.out_features);
        if want_x != Some(x.len()) || want_y != Some(y.len()) {
            return Err(KernelError::Shape(format!(
                "matmul of [{}, {}] weights with {rows} rows: x has {} elements (want {}), \
                 y has {} (want {})",
                self.out_features,
                self.in_features,
                x.len(),
                rows.saturating_mul(self.in_features),
                y.len(),
                rows.saturating_mul(self.out_features)
            )));
        }
        Ok(())
    }

    /// Computes y[r, 16g..16g+16] for g in `groups`, r in `rows`.
    ///
    /// # Safety
    /// `y` must point at a `[rows_total, out_features]` buffer covering `rows`, and no other
    /// thread may touch the elements this call writes.
    unsafe fn run_range(
        &self,
        path: MatmulPath,
        acts: &Acts,
        groups: Range<usize>,
        rows: Range<usize>,
        y: OutPtr,
    ) {
        match path {
            #[cfg(target_arch = "x86_64")]
            MatmulPath::Avx512Vnni => x86::run_avx512(self, acts, groups, rows, y),
            #[cfg(target_arch = "x86_64")]
            MatmulPath::Avx2 => x86::run_avx2(self, acts, groups, rows, y),
            _ => scalar::run(self, acts, groups, rows, y),
        }
    }

    /// y[r, o] = Σ_i x[r, i] · W[o, i] with W dequantized exactly and f64 accumulation: the
    /// plain-loop specification the quantized-activation kernels are tested against.
    pub fn matmul_f32_reference(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<(), KernelError> {
        self.check_matmul_shapes(x, rows, y)?;
        let w = self.dequantize();
        let (n, k) = (self.out_features, self.in_features);
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            for o in 0..n {
                let wr = &w[o * k..(o + 1) * k];
                let dot: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                y[r * n + o] = dot as f32;
            }
        }
        Ok(())
    }
}

/// Below this many work units (see `run`) a matmul stays on the calling thread: a helper could
/// not even wake up before the caller is done (192×576 decode, 216 units, from DRAM: 3.3 µs
/// alone, 3.9 µs with a helper; 576×576, 648 units: 11.5 µs alone, 8.3 µs with one).
const PARALLEL_MIN_UNITS: usize = 256;
/// Work units per chunk: small enough to balance two threads on a 576×576 decode matmul, big
/// enough (~0.5 µs) that claiming a chunk is noise.
const CHUNK_UNITS: usize = 128;
/// Activation rows per panel.
const PANEL_ROWS: usize = 64;

/// Dequantizes one GGML block (`src` in GGUF byte order) into 32 f32s, with the exact formulas.
fn decode_ggml_block(format: QuantFormat, src: &[u8], dst: &mut [f32]) {
    let d = f16::from_bits(u16::from_le_bytes([src[0], src[1]])).to_f32();
    match format {
        QuantFormat::Q4_1 => {
            let m = f16::from_bits(u16::from_le_bytes([src[2], src[3]])).to_f32();
            for (j, &byte) in src[4..20].iter().enumerate() {
                // Plain multiply then add (Rust never contracts to an FMA): bit-exact with GGML.
                dst[j] = d * (byte & 0x0f) as f32 + m;
                dst[j + 16] = d * (byte >> 4) as f32 + m;
            }
        }
        QuantFormat::Q8_0 => {
            for (v, &q) in dst.iter_mut().zip(&src[2..34]) {
                *v = d * (q as i8) as f32;
            }
        }
    }
}
