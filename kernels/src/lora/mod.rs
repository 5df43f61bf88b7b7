//! Segmented LoRA (Punica SGMV semantics) on the CPU: the per-step delta that every adapted
//! linear layer adds to its base output, for a batch whose rows use many different adapters.
//!
//! This module owns the op's semantics ([`lora_delta_reference`], the specification), its fast
//! path ([`lora_delta`], [`lora_delta_fused`]), input validation and the shared test/benchmark
//! [`workload`] generator. It does not own adapters (loading, slots, leases), the row order of a
//! step (the engine sorts rows so each adapter's rows are contiguous) or DoRA's column norms
//! (the caller precomputes the per-output factor).
//!
//! How the fast path works (`plan.rs`, `kernel.rs`): rows are grouped by segment, never by row
//! (gathering weights per row is 10-30x slower, see research/kernels.md). Per segment, shrink
//! `t = x[rows] · Aᵀ` (`[n, r]`), then expand `y[rows] += scale · t · Bᵀ` in place. Both phases
//! are cut into (segment, row panel, rank chunk) and (segment, row panel, output chunk) work
//! items run on the calling thread plus rayon helpers (`quant::par`); the inner loops use
//! AVX-512F or AVX2+FMA when the CPU has them (detected at run time) and portable code otherwise.
//! Adapters held in int8 ([`Int8LoraMatrices`]) take integer dot products instead (`int8.rs`):
//! each activation row is quantized once per call, per 32-element block, and each row's `t` once
//! per site, so their arithmetic is defined with those roundings ([`lora_delta_reference`] spells
//! it out).
//! When several sites share `x` ([`lora_delta_fused`]), the A rows of every site whose segment
//! covers the same rows are shrunk in one pass over `x[rows]`.
//!
//! Batch invariance: a row's result depends only on its own x, its adapter's weights and the
//! instruction set, never on which other rows, segments or sites share the call or on the number
//! of threads (each output element has one fixed accumulation chain; see `kernel.rs`). The
//! fused and unfused calls give identical bits. The reference accumulates in a different order,
//! so it agrees to float rounding, not bit for bit.

mod int8;
mod kernel;
mod plan;
mod simd;
#[cfg(test)]
mod tests;
pub mod workload;

use std::ops::Range;

use crate::KernelError;

/// Instruction sets of the LoRA kernels (the same detection as the attention kernels).
pub use crate::attention::Isa;

/// One adapter's weights for one linear site.
///
/// Semantics: `delta[i, o] = scale · Σ_j (Σ_k x[i, k] · A[j, k]) · B[o, j]`, with `A` and `B` as
/// [`LoraMatrices`] stores them.
#[derive(Clone, Copy, Debug)]
pub struct LoraSiteWeights<'a> {
    pub matrices: LoraMatrices<'a>,
    /// May be 0 (then the delta is 0; a DoRA factor still applies).
    pub rank: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA); must be finite.
    pub scale: f32,
    /// DoRA: per-output factor `g[o]` (= `magnitude[o]` / column norm of `W + scale·B·A`,
    /// precomputed by the caller), `out_features` long. When `Some`, the segment's rows become
    /// `y[i, o] = g[o] · (y[i, o] + delta[i, o])` instead of `y[i, o] + delta[i, o]`.
    pub dora_factor: Option<&'a [f32]>,
}

/// How a site's `A` and `B` are stored.
#[derive(Clone, Copy, Debug)]
pub enum LoraMatrices<'a> {
    /// PEFT's layout: `a` is `[rank, in_features]` (`lora_A.weight`), `b` is
    /// `[out_features, rank]` (`lora_B.weight`), both row-major.
    F32 { a: &'a [f32], b: &'a [f32] },
    /// A quarter of the bytes (see [`Int8LoraMatrices`]): `A[j, k] = a_scales[j] · a[j, k]`
    /// with `a` `[rank, in_features]`, and `B[o, j] = bt_scales[j] · bt[i]` with `bt` holding
    /// `Bᵀ` (`[rank, out_features]`) with rank rows interleaved in fours:
    /// `i = ((j / 4) · out_features + o) · 4 + j % 4`, the rank padded with zero rows to a
    /// multiple of 4. Values lie in `-127..=127`, as [`Int8LoraMatrices::quantize`] writes
    /// them (the AVX2 kernels move the activations' signs onto the weights, and `-(-128)` does
    /// not fit an i8; the calls do not scan the weights to check). The kernels quantize the
    /// activations too (the module docs of `int8.rs` give the arithmetic;
    /// [`lora_delta_reference`] does the same in plain loops).
    Int8 { a: &'a [i8], a_scales: &'a [f32], bt: &'a [i8], bt_scales: &'a [f32] },
}

impl<'a> LoraSiteWeights<'a> {
    /// f32 weights in PEFT's layout.
    pub fn f32(a: &'a [f32], b: &'a [f32], rank: usize, scale: f32) -> Self {
        Self { matrices: LoraMatrices::F32 { a, b }, rank, scale, dora_factor: None }
    }
}

/// One row-quantized matrix: `values` row-major `[rows, cols]`, element `(r, c)` standing for
/// `scales[r] · values[r · cols + c]` (except in [`Int8LoraMatrices::bt`], whose rows are
/// interleaved in fours).
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Rows {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Int8Rows {
    /// Symmetric absmax quantization of each row of `m` (`[rows, cols]` row-major): the row's
    /// largest magnitude maps to ±127, the rest round to nearest. An all-zero row gets scale 0.
    pub fn quantize(m: &[f32], cols: usize) -> Self {
        let rows = m.len().checked_div(cols).unwrap_or(0);
        let mut values = vec![0i8; rows * cols];
        let mut scales = Vec::with_capacity(rows);
        for (row, q) in m.chunks_exact(cols.max(1)).zip(values.chunks_exact_mut(cols.max(1))).take(rows) {
            scales.push(int8::quantize_into(row, q));
        }
        Self { values, scales }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.values.len() + self.scales.len() * std::mem::size_of::<f32>()
    }
}

/// A site's `A` and `B` in int8 with one f32 scale per rank row: a quarter of f32's bytes. At
/// decode, a batch of distinct adapters is bound by reading their weights from memory, so this
/// is what keeps a mixed batch close to the base's speed. Per-row absmax quantization keeps the
/// relative error of each weight within 1/254 of its row's largest one.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8LoraMatrices {
    /// `A`: `[rank, in_features]`.
    pub a: Int8Rows,
    /// `Bᵀ`: `rank` rows of `out_features`, scales per rank row, values interleaved in fours (see
    /// [`LoraMatrices::Int8`]; [`Self::bt_value`] reads one).
    pub bt: Int8Rows,
    out_features: usize,
}

impl Int8LoraMatrices {
    /// Quantizes PEFT-layout `a` (`[rank, in_features]`) and `b` (`[out_features, rank]`).
    pub fn quantize(a: &[f32], b: &[f32], rank: usize, in_features: usize, out_features: usize) -> Self {
        let mut bt = vec![0f32; rank * out_features];
        for (o, row) in b.chunks_exact(rank.max(1)).take(out_features).enumerate() {
            for (j, v) in row.iter().enumerate() {
                bt[j * out_features + o] = *v;
            }
        }
        let rows = Int8Rows::quantize(&bt, out_features);
        let mut interleaved = vec![0i8; rank.next_multiple_of(int8::BT_INTERLEAVE) * out_features];
        for (j, row) in rows.values.chunks_exact(out_features.max(1)).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                interleaved[int8::bt_index(j, o, out_features)] = v;
            }
        }
        Self {
            a: Int8Rows::quantize(a, in_features),
            bt: Int8Rows { values: interleaved, scales: rows.scales },
            out_features,
        }
    }

    /// The int8 value standing for `Bᵀ[j, o]` (before its rank row's scale).
    pub fn bt_value(&self, j: usize, o: usize) -> i8 {
        self.bt.values[int8::bt_index(j, o, self.out_features)]
    }

    pub fn view(&self) -> LoraMatrices<'_> {
        LoraMatrices::Int8 {
            a: &self.a.values,
            a_scales: &self.a.scales,
            bt: &self.bt.values,
            bt_scales: &self.bt.scales,
        }
    }

    pub fn bytes(&self) -> usize {
        self.a.bytes() + self.bt.bytes()
    }
}

/// Rows of the batch that use one adapter; the engine orders rows so each adapter's rows are
/// contiguous.
///
/// Semantics: every row `i` in `rows` gets `weights`' delta; an empty range is allowed and does
/// nothing.
#[derive(Clone, Debug)]
pub struct Segment<'a> {
    pub rows: Range<usize>,
    pub weights: LoraSiteWeights<'a>,
}

/// One linear site of a fused call: its output buffer and its segments.
///
/// Semantics: as [`lora_delta`] with `y`, `out_features`, `segments` and the call's shared `x`.
#[derive(Debug)]
pub struct SiteDelta<'a> {
    /// `[rows, out_features]` row-major, holding the base output; updated in place.
    pub y: &'a mut [f32],
    pub out_features: usize,
    pub segments: &'a [Segment<'a>],
}

/// Semantics: for each segment `s` and each row `i` in `s.rows`:
/// `y[i, :] += s.scale · (x[i, :] · A_sᵀ) · B_sᵀ`, or with a DoRA factor `g`:
/// `y[i, :] = g ∘ (y[i, :] + s.scale · (x[i, :] · A_sᵀ) · B_sᵀ)`.
/// Rows in no segment are untouched (base-model rows). Ranks differ per segment, no padding.
///
/// `x`: `[rows, in_features]`, `y`: `[rows, out_features]`, both row-major f32; `rows` is
/// `x.len() / in_features`. Segments may come in any order but must not overlap.
///
/// Everything is validated before anything is written (on `Err`, `y` is unchanged). Runs on the
/// calling thread plus helpers from the current rayon pool (small calls stay on the caller), with
/// the best instruction set of this CPU. The result of a row does not depend on the rest of the
/// batch, nor on the thread count (batch invariance, bit for bit).
pub fn lora_delta(
    x: &[f32],
    in_features: usize,
    y: &mut [f32],
    out_features: usize,
    segments: &[Segment],
) -> Result<(), KernelError> {
    lora_delta_with(Isa::detect(), x, in_features, y, out_features, segments)
}

/// Semantics: exactly [`lora_delta`], on a chosen instruction set (tests, benchmarks); `Err` if
/// this CPU lacks it.
pub fn lora_delta_with(
    isa: Isa,
    x: &[f32],
    in_features: usize,
    y: &mut [f32],
    out_features: usize,
    segments: &[Segment],
) -> Result<(), KernelError> {
    lora_delta_fused_with(isa, x, in_features, &mut [SiteDelta { y, out_features, segments }])
}

/// Semantics: for every site, exactly [`lora_delta`]`(x, in_features, site.y, site.out_features,
/// site.segments)`, with identical bits.
///
/// For several sites that share the same input `x` (q/k/v projections, or gate/up): the shrinks
/// `x · Aᵀ` of segments (of any sites) that cover the same rows are fused into one pass over
/// those rows of `x`, and the whole call is one pair of parallel phases instead of one per site
/// (~5-12 % faster than separate calls for SmolLM2 q/k/v or gate/up on 2 threads).
pub fn lora_delta_fused(x: &[f32], in_features: usize, sites: &mut [SiteDelta]) -> Result<(), KernelError> {
    lora_delta_fused_with(Isa::detect(), x, in_features, sites)
}

/// Semantics: exactly [`lora_delta_fused`], on a chosen instruction set; `Err` if this CPU
/// lacks it.
pub fn lora_delta_fused_with(
    isa: Isa,
    x: &[f32],
    in_features: usize,
    sites: &mut [SiteDelta],
) -> Result<(), KernelError> {
    if !isa.is_available() {
        return Err(KernelError::Shape(format!("instruction set {isa:?} is not available on this CPU")));
    }
    let rows = check_x(x.len(), in_features)?;
    for (k, site) in sites.iter().enumerate() {
        check_site(k, rows, in_features, site.y.len(), site.out_features, site.segments)?;
    }
    plan::run(isa, x, in_features, sites);
    Ok(())
}

/// Semantics: [`lora_delta`]'s, computed by plain loops with f32 accumulation in index order
/// (`t[j] = Σ_k x[i,k]·A[j,k]`, then `d[o] = Σ_j t[j]·B[o,j]`, then `y = (y + scale·d)·g`; for
/// int8 weights with the activation and `t` roundings of `int8.rs`, integer sums exact): the
/// specification and test oracle of the fast paths. Same validation and errors as
/// [`lora_delta`].
pub fn lora_delta_reference(
    x: &[f32],
    in_features: usize,
    y: &mut [f32],
    out_features: usize,
    segments: &[Segment],
) -> Result<(), KernelError> {
    let rows = check_x(x.len(), in_features)?;
    check_site(0, rows, in_features, y.len(), out_features, segments)?;
    for seg in segments {
        let w = seg.weights;
        let (a, b) = match w.matrices {
            LoraMatrices::F32 { a, b } => (a, b),
            LoraMatrices::Int8 { a, a_scales, bt, bt_scales } => {
                reference_int8(
                    x,
                    in_features,
                    y,
                    out_features,
                    seg.rows.clone(),
                    &w,
                    (a, a_scales, bt, bt_scales),
                );
                continue;
            }
        };
        let mut t = vec![0f32; w.rank];
        for i in seg.rows.clone() {
            let xr = &x[i * in_features..(i + 1) * in_features];
            for (j, tj) in t.iter_mut().enumerate() {
                let mut acc = 0f32;
                for (k, xk) in xr.iter().enumerate() {
                    acc += xk * a[j * in_features + k];
                }
                *tj = acc;
            }
            let yr = &mut y[i * out_features..(i + 1) * out_features];
            for (o, yo) in yr.iter_mut().enumerate() {
                let mut d = 0f32;
                for (j, tj) in t.iter().enumerate() {
                    d += tj * b[o * w.rank + j];
                }
                let v = *yo + w.scale * d;
                *yo = match w.dora_factor {
                    Some(g) => g[o] * v,
                    None => v,
                };
            }
        }
    }
    Ok(())
}

/// The reference for one int8 segment: the plain-loop row functions of `int8.rs`.
fn reference_int8(
    x: &[f32],
    in_features: usize,
    y: &mut [f32],
    out_features: usize,
    rows: Range<usize>,
    w: &LoraSiteWeights,
    (a, a_scales, bt, bt_scales): (&[i8], &[f32], &[i8], &[f32]),
) {
    let a_rows: Vec<&[i8]> = a.chunks_exact(in_features).collect();
    let mut q = vec![0i8; int8::padded(in_features)];
    let mut d = vec![0f32; in_features.div_ceil(int8::XBLOCK)];
    let mut t = vec![0f32; w.rank];
    let mut quads = vec![0i32; int8::quad_count(w.rank)];
    let p = int8::ExpandInt8 { bt, outs: 0..out_features, out_features, scale: w.scale, g: w.dora_factor };
    for i in rows {
        int8::quantize_row(Isa::Portable, &x[i * in_features..(i + 1) * in_features], &mut q, &mut d);
        // SAFETY: t holds one float per rank row of A (validated shapes); Portable is always
        // available.
        unsafe { int8::shrink_row(Isa::Portable, &q, &d, &a_rows, a_scales, in_features, t.as_mut_ptr()) };
        let du = int8::quantize_t(&t, bt_scales, &mut quads);
        // SAFETY: row i of y holds out_features floats (validated shapes).
        unsafe { int8::expand_row(Isa::Portable, &quads, du, &p, y[i * out_features..].as_mut_ptr()) };
    }
}

/// rows = `x_len / in_features`, if `x_len` is a whole number of rows.
fn check_x(x_len: usize, in_features: usize) -> Result<usize, KernelError> {
    if in_features == 0 {
        return Err(KernelError::Shape("lora: in_features must be positive".into()));
    }
    if !x_len.is_multiple_of(in_features) {
        return Err(KernelError::Shape(format!(
            "lora: x has {x_len} floats, not a whole number of rows of {in_features}"
        )));
    }
    Ok(x_len / in_features)
}

/// Validates one site: y's size, every segment's range and weights, and that segments do not
/// overlap.
fn check_site(
    site: usize,
    rows: usize,
    in_features: usize,
    y_len: usize,
    out_features: usize,
    segments: &[Segment],
) -> Result<(), KernelError> {
    let err = |msg: String| Err(KernelError::Shape(format!("lora site {site}: {msg}")));
    if out_features == 0 {
        return err("out_features must be positive".into());
    }
    if rows.checked_mul(out_features) != Some(y_len) {
        return err(format!("y has {y_len} floats, expected {rows} rows x {out_features}"));
    }
    let mut sorted = true;
    let mut last_end = 0;
    for (k, seg) in segments.iter().enumerate() {
        let r = &seg.rows;
        if r.start > r.end || r.end > rows {
            return err(format!("segment {k}: rows {r:?} not a range within 0..{rows}"));
        }
        if let Err(msg) = check_weights(&seg.weights, in_features, out_features) {
            return err(format!("segment {k}: {msg}"));
        }
        if !r.is_empty() {
            sorted &= r.start >= last_end;
            last_end = r.end;
        }
    }
    if !sorted {
        // Out-of-order segments are legal; only then pay for sorting a copy of the ranges.
        let mut ranges: Vec<(usize, usize)> =
            segments.iter().filter(|s| !s.rows.is_empty()).map(|s| (s.rows.start, s.rows.end)).collect();
        ranges.sort_unstable();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            return err(format!("segments overlap: rows {:?} and {:?}", w[0].0..w[0].1, w[1].0..w[1].1));
        }
    }
    Ok(())
}

fn check_weights(w: &LoraSiteWeights, in_features: usize, out_features: usize) -> Result<(), String> {
    if !w.scale.is_finite() {
        return Err(format!("scale {} is not finite", w.scale));
    }
    let a_len = w.rank.checked_mul(in_features);
    let (a, b, b_len, a_scales, bt_scales) = match w.matrices {
        LoraMatrices::F32 { a, b } => (a.len(), b.len(), w.rank.checked_mul(out_features), w.rank, w.rank),
        LoraMatrices::Int8 { a, a_scales, bt, bt_scales } => {
            let interleaved = w
                .rank
                .checked_next_multiple_of(int8::BT_INTERLEAVE)
                .and_then(|r| r.checked_mul(out_features));
            (a.len(), bt.len(), interleaved, a_scales.len(), bt_scales.len())
        }
    };
    if a_len != Some(a) {
        return Err(format!("A has {a} values, expected rank {} x in {in_features}", w.rank));
    }
    if b_len != Some(b) {
        return Err(format!(
            "B has {b} values, expected {} for out {out_features} x rank {}",
            b_len.unwrap_or(usize::MAX),
            w.rank
        ));
    }
    if a_scales != w.rank || bt_scales != w.rank {
        return Err(format!("int8 A and B need {} row scales each, got {a_scales} and {bt_scales}", w.rank));
    }
    if let Some(g) = w.dora_factor {
        if g.len() != out_features {
            return Err(format!("DoRA factor has {} floats, expected out_features {out_features}", g.len()));
        }
    }
    Ok(())
}
