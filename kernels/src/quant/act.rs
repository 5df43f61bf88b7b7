//! Per-call activation quantization: f32 rows → int8 per 32-element block, with the per-block
//! scale and the two block sums the weight formats need.

use super::{par, MatmulPath, BLOCK_ELEMS};

/// Below this many activation elements quantization stays on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;
/// Activation elements per quantization chunk (~2 µs of work).
const CHUNK_ELEMS: usize = 1 << 13;

/// Quantized activations of one matmul call, `[rows, nb]` blocks.
///
/// x[r, 32b + i] ≈ d[r·nb + b] · q[(r·nb + b)·32 + i].
#[derive(Default)]
pub(super) struct Acts {
    /// int8 values in [-127, 127], 32 per block.
    pub q: Vec<i8>,
    /// Block scales, max|x| / 127.
    pub d: Vec<f32>,
    /// Block sums of the int8 image, d · Σq: Q4_1's `m` term is m · Σx̃. Using x̃ (not the exact
    /// Σx) makes the result the exact dot product of W with x̃, whose error Σ w·(x̃ − x) involves
    /// |d·q + m|, typically much smaller than |d·q| because m re-centres the weights.
    pub s: Vec<f32>,
    /// −128 · Σq: cancels the +128 offset of stored Q8_0 weights inside the integer dot.
    pub c: Vec<i32>,
    /// Blocks per row.
    pub nb: usize,
}

/// Base pointers of the `Acts` buffers, shared by the quantization chunks (disjoint rows).
#[derive(Clone, Copy)]
struct RowPtrs {
    q: *mut i8,
    d: *mut f32,
    s: *mut f32,
    c: *mut i32,
}

// SAFETY: every chunk writes only its own rows (see `Acts::quantize`).
unsafe impl Send for RowPtrs {}
unsafe impl Sync for RowPtrs {}

impl RowPtrs {
    /// The buffers of activation row `r`.
    ///
    /// # Safety
    /// Row `r` must lie inside the buffers, and nothing else may access it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row<'a>(
        &self,
        r: usize,
        n: usize,
    ) -> (&'a mut [i8], &'a mut [f32], &'a mut [f32], &'a mut [i32]) {
        let nb = n / BLOCK_ELEMS;
        (
            std::slice::from_raw_parts_mut(self.q.add(r * n), n),
            std::slice::from_raw_parts_mut(self.d.add(r * nb), nb),
            std::slice::from_raw_parts_mut(self.s.add(r * nb), nb),
            std::slice::from_raw_parts_mut(self.c.add(r * nb), nb),
        )
    }
}

impl Acts {
    /// Fills the buffers from `x` (`rows × in_features`, already shape-checked). Big batches are
    /// split over rows with the matmul's own scheduler, so the caller never blocks on a worker.
    pub fn quantize(&mut self, path: MatmulPath, x: &[f32], rows: usize, in_features: usize) {
        let nb = in_features / BLOCK_ELEMS;
        self.nb = nb;
        self.q.resize(rows * in_features, 0);
        self.d.resize(rows * nb, 0.0);
        self.s.resize(rows * nb, 0.0);
        self.c.resize(rows * nb, 0);
        let p = RowPtrs {
            q: self.q.as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            c: self.c.as_mut_ptr(),
        };
        let chunk_rows = (CHUNK_ELEMS / in_features).max(1);
        let helpers = if rows * in_features >= PARALLEL_MIN_ELEMS {
            rayon::current_num_threads().saturating_sub(1)
        } else {
            0
        };
        par::for_each_chunk(rows.div_ceil(chunk_rows), helpers, &|t| {
            for r in t * chunk_rows..((t + 1) * chunk_rows).min(rows) {
                // SAFETY: row r lies inside the buffers resized above, and no other chunk
                // touches it; `for_each_chunk` returns only when every chunk is done.
                let (q, d, s, c) = unsafe { p.row(r, in_features) };
                quantize_row(path, &x[r * in_features..(r + 1) * in_features], q, d, s, c);
            }
        });
    }
}

fn quantize_row(path: MatmulPath, x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], c: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if path != MatmulPath::Scalar {
        // SAFETY: every non-scalar path implies AVX2 + FMA + F16C (checked by the caller).
        unsafe { super::x86::quantize_row_avx2(x, q, d, s, c) };
        return;
    }
    let _ = path;
    for (b, (xb, qb)) in x.chunks_exact(BLOCK_ELEMS).zip(q.chunks_exact_mut(BLOCK_ELEMS)).enumerate() {
        let (db, sb, cb) = quantize_block(xb, qb);
        d[b] = db;
        s[b] = sb;
        c[b] = cb;
    }
}

/// q[i] = round_half_even(x[i] · 127 / max|x|); returns (d = max|x| / 127, d · Σq, −128 · Σq).
/// The SIMD quantizer computes the same values bit for bit.
pub(super) fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut qsum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        // |v · id| ≤ 127 up to one ulp, so rounding lands in [-127, 127]; `as` saturates anyway.
        let t = (v * id).round_ties_even() as i8;
        *o = t;
        qsum += t as i32;
    }
    let d = amax / 127.0;
    (d, d * qsum as f32, -128 * qsum)
}
