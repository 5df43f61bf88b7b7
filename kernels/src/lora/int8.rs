//! The int8 path of the segmented LoRA op: integer dot products against adapters held in int8
//! ([`super::Int8LoraMatrices`]), one batch row at a time.
//!
//! Semantics, for one row `x` of a segment (the reference, [`shrink_row_scalar`] and
//! [`expand_row_scalar`], spells them out in plain loops):
//! - shrink: `x` is quantized per 32-element block, `x ≈ d_b · qx` (absmax, as the quantized base
//!   matmul does), and `t[j] = sa[j] · Σ_b d_b · Σ_{k∈b} qa[j, k] · qx[k]`, the inner sums exact
//!   in i32;
//! - expand: `u[j] = t[j] · sb[j]` is quantized as one block, `u ≈ du · qu`, and
//!   `y[o] = g[o] · (y[o] + (du · scale) · Σ_j qu[j] · qbᵀ[j, o])`, the sum exact in i32.
//!
//! Why: at decode every row of a mixed batch uses another adapter, so each weight is used once
//! per step; converting it to f32 cost three instructions per 8 multiply-adds, where `vpmaddwd`
//! does 16 in two, and the activations become integers once per row.
//!
//! The driver (`plan.rs`) quantizes each activation row once per call (shared by the fused
//! sites) and each `u` once per (row, site), then runs the row functions here. The work of a row
//! depends only on that row and its adapter, never on the other rows of the call, its tiling or
//! the thread that runs it, so the op stays batch invariant. The AVX2 code also serves AVX-512
//! CPUs.

// Blocks index the activations, their scales and the weight rows by the same block number.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

use super::Isa;

/// Activation elements per quantization block.
pub(super) const XBLOCK: usize = 32;

/// Symmetric absmax quantization of `src` into `dst` (same length): the largest magnitude maps
/// to ±127, the rest round half to even; returns the scale (0 for an all-zero `src`).
pub(super) fn quantize_into(src: &[f32], dst: &mut [i8]) -> f32 {
    let max = src.iter().fold(0f32, |acc, v| acc.max(v.abs()));
    let scale = max / 127.0;
    quantize_with(src, if scale > 0.0 { 1.0 / scale } else { 0.0 }, dst);
    scale
}

/// `dst = round_half_even(src · inv)`, clamped to ±127.
fn quantize_with(src: &[f32], inv: f32, dst: &mut [i8]) {
    // Round half to even by the 1.5·2²³ trick (|v · inv| ≤ 127): exact, branch-free, and it
    // vectorises, where `f32::round` is a libm call per element on baseline x86-64.
    const MAGIC: f32 = 12_582_912.0;
    for (q, v) in dst.iter_mut().zip(src) {
        *q = (((v * inv) + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
    }
}

/// Padded i16 elements of one quantized activation row of `n` floats.
pub(super) fn padded(n: usize) -> usize {
    n.div_ceil(XBLOCK) * XBLOCK
}

/// Quantizes one activation row per [`XBLOCK`] elements: `x[k] ≈ d[k / 32] · q[k]`, the values
/// widened to i16 (the operand `vpmaddwd` takes) and zero-padded to whole blocks.
/// `q` holds [`padded`]`(x.len())` values, `d` one scale per block.
pub(super) fn quantize_row(isa: Isa, x: &[f32], q: &mut [i16], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2(isa) {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { quantize_row_avx2(x, q, d) };
        return;
    }
    let _ = isa;
    for (b, block) in x.chunks(XBLOCK).enumerate() {
        d[b] = quantize_block(block, &mut q[b * XBLOCK..(b + 1) * XBLOCK]);
    }
}

/// One block of [`quantize_row`] in plain loops (the specification); pads `q` with zeros.
fn quantize_block(block: &[f32], q: &mut [i16]) -> f32 {
    let mut tmp = [0i8; XBLOCK];
    let scale = quantize_into(block, &mut tmp[..block.len()]);
    for (dst, &v) in q.iter_mut().zip(&tmp) {
        *dst = i16::from(v);
    }
    scale
}

/// [`quantize_row`] with AVX2 for the whole blocks: the same values (the scale and its inverse
/// are computed the same way, and `vcvtps2dq` rounds half to even like the scalar trick).
///
/// # Safety
/// AVX2 and FMA available; `q` and `d` sized as in [`quantize_row`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    let full = x.len() / XBLOCK;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for b in 0..full {
        // SAFETY: block b lies inside x and inside q (whole blocks).
        unsafe {
            let src = x.as_ptr().add(b * XBLOCK);
            let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(src.add(8 * k)));
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_and_ps(v, abs)));
            let scale = hmax256(m) / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)));
            // packs works per 128-bit lane: restore element order with a qword permute.
            let lo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(i[0], i[1]));
            let hi = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(i[2], i[3]));
            let dst = q.as_mut_ptr().add(b * XBLOCK);
            _mm256_storeu_si256(dst.cast(), lo);
            _mm256_storeu_si256(dst.add(16).cast(), hi);
            d[b] = scale;
        }
    }
    if full * XBLOCK < x.len() {
        d[full] = quantize_block(&x[full * XBLOCK..], &mut q[full * XBLOCK..(full + 1) * XBLOCK]);
    }
}

/// Pairs of a rank-`rank` row of `u` (an odd rank is padded with a zero).
pub(super) fn pair_count(rank: usize) -> usize {
    rank.div_ceil(2)
}

/// One row's expand input: `u = t ∘ sb` quantized as one block, written to `pairs` as i16 pairs
/// packed in i32 (the broadcast operand of `vpmaddwd`; [`pair_count`]`(t.len())` of them); returns
/// `du`.
pub(super) fn quantize_t(t: &[f32], sb: &[f32], pairs: &mut [i32]) -> f32 {
    const MAX_RANK: usize = 64;
    // Chunks of MAX_RANK keep the scratch on the stack; the scale covers the whole row.
    let mut u = [0f32; MAX_RANK];
    let mut q = [0i8; MAX_RANK];
    let max = t.iter().zip(sb).fold(0f32, |m, (t, s)| m.max((t * s).abs()));
    let scale = max / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (c, (tc, sc)) in t.chunks(MAX_RANK).zip(sb.chunks(MAX_RANK)).enumerate() {
        let n = tc.len();
        for k in 0..n {
            u[k] = tc[k] * sc[k];
        }
        quantize_with(&u[..n], inv, &mut q[..n]);
        q[n..n.next_multiple_of(2)].fill(0);
        let dst = &mut pairs[c * MAX_RANK / 2..];
        for (d, p) in dst.iter_mut().zip(q[..n.next_multiple_of(2)].chunks_exact(2)) {
            *d = pack(p);
        }
    }
    scale
}

/// Two i8 values as the i16 pair (low, high) of one i32.
fn pack(p: &[i8]) -> i32 {
    (i32::from(p[0]) & 0xffff) | (i32::from(p[1]) << 16)
}

/// The index of `Bᵀ[j, o]` in the pair-interleaved layout: rank rows `2p` and `2p + 1` are
/// interleaved byte by byte, so the two weights a `vpmaddwd` lane needs are adjacent.
#[inline(always)]
pub(super) fn paired_index(j: usize, o: usize, out_features: usize) -> usize {
    ((j / 2) * out_features + o) * 2 + j % 2
}

/// One row's shrink: `t[c] = scales[c] · Σ_b d[b] · Σ_{k∈b} a[c][k] · q[k]` for rank rows
/// `c < a.len()`, with `q`, `d` from [`quantize_row`] of an `n`-float row.
///
/// # Safety
/// `isa` available; each `a[c]` `n` long; `t` valid for writing `a.len()` floats.
pub(super) unsafe fn shrink_row(
    isa: Isa,
    q: &[i16],
    d: &[f32],
    a: &[&[i8]],
    scales: &[f32],
    n: usize,
    t: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2(isa) {
        // SAFETY: AVX2 and FMA were detected; the rest is the caller's contract.
        unsafe { shrink_row_avx2(q, d, a, scales, n, t) };
        return;
    }
    let _ = isa;
    // SAFETY: the caller's contract.
    unsafe { shrink_row_scalar(q, d, a, scales, n, t) }
}

/// One row's expand over the columns `p.outs` (see [`ExpandInt8`]): `pairs` and `du` from
/// [`quantize_t`].
///
/// # Safety
/// `isa` available; `p.bt` a pair-interleaved `Bᵀ` of at least `pairs.len()` pair rows of
/// `p.out_features`; `p.outs` within `0..out_features`; `p.g`, when set, `out_features` long; `y` the row's
/// `out_features` floats, its columns `outs` touched by no other thread.
pub(super) unsafe fn expand_row(isa: Isa, pairs: &[i32], du: f32, p: &ExpandInt8, y: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2(isa) {
        // SAFETY: AVX2 and FMA were detected; the rest is the caller's contract.
        unsafe { expand_row_avx2(pairs, du, p, y) };
        return;
    }
    let _ = isa;
    // SAFETY: the caller's contract.
    unsafe { expand_row_scalar(pairs, du, p, y) }
}

/// Whether `isa` runs the AVX2 code: the AVX2 and AVX-512 paths both do (an AVX-512 CPU has AVX2;
/// 256-bit `vpmaddwd` keeps one implementation to test), `Portable` the plain loops.
fn avx2(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Avx2) && Isa::Avx2.is_available()
}

/// The weights of an int8 expand and its columns: `y[o] = g[o] · (y[o] + (du · scale) ·
/// Σ_j qu[j] · qbᵀ[j, o])` for `o` in `outs`.
pub(super) struct ExpandInt8<'a> {
    pub bt: &'a [i8],
    pub outs: Range<usize>,
    pub out_features: usize,
    pub scale: f32,
    pub g: Option<&'a [f32]>,
}

/// [`shrink_row`] in plain loops: the specification.
///
/// # Safety
/// As [`shrink_row`].
unsafe fn shrink_row_scalar(q: &[i16], d: &[f32], a: &[&[i8]], scales: &[f32], n: usize, t: *mut f32) {
    for (c, row) in a.iter().enumerate() {
        let mut acc = 0f32;
        for (b, &db) in d.iter().enumerate() {
            let k0 = b * XBLOCK;
            let k1 = (k0 + XBLOCK).min(n);
            let isum: i32 = (k0..k1).map(|k| i32::from(row[k]) * i32::from(q[k])).sum();
            acc += db * isum as f32;
        }
        // SAFETY: c < a.len() (caller contract).
        unsafe { *t.add(c) = scales[c] * acc };
    }
}

/// The integer sum of output `o`: `Σ_j qu[j] · qbᵀ[j, o]`.
#[inline(always)]
fn expand_isum(pairs: &[i32], bt: &[i8], out_features: usize, o: usize) -> i32 {
    let mut isum = 0i32;
    for (pi, &pair) in pairs.iter().enumerate() {
        let (lo, hi) = (pair as i16, (pair >> 16) as i16);
        let k = ((pi * out_features) + o) * 2;
        isum += i32::from(bt[k]) * i32::from(lo) + i32::from(bt[k + 1]) * i32::from(hi);
    }
    isum
}

/// [`expand_row`] in plain loops: the specification.
///
/// # Safety
/// As [`expand_row`].
unsafe fn expand_row_scalar(pairs: &[i32], du: f32, p: &ExpandInt8, y: *mut f32) {
    let c = du * p.scale;
    for o in p.outs.clone() {
        let isum = expand_isum(pairs, p.bt, p.out_features, o);
        // SAFETY: o is inside `outs` (caller contract).
        unsafe {
            let v = (isum as f32).mul_add(c, *y.add(o));
            *y.add(o) = p.g.map_or(v, |g| g[o] * v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Simd};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Largest of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax256(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// `Σ w[k] · x[k]` over one block (32 int8 weights at `w`, the block's i16 activations `x`), as
/// 8 i32 lanes of 4 products each.
///
/// # Safety
/// AVX2 available; `w` valid for reading [`XBLOCK`] bytes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_isum(w: *const i8, x: [__m256i; 2]) -> __m256i {
    // SAFETY: the caller's contract.
    let (w0, w1) = unsafe {
        (
            _mm256_cvtepi8_epi16(_mm_loadu_si128(w.cast())),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(16).cast())),
        )
    };
    _mm256_add_epi32(_mm256_madd_epi16(w0, x[0]), _mm256_madd_epi16(w1, x[1]))
}

/// [`shrink_row_scalar`] with AVX2: four rank rows at a time share each loaded activation block.
///
/// # Safety
/// As [`shrink_row_scalar`]; AVX2 and FMA available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn shrink_row_avx2(q: &[i16], d: &[f32], a: &[&[i8]], scales: &[f32], n: usize, t: *mut f32) {
    let mut c = 0;
    while c + 4 <= a.len() {
        // SAFETY: rank rows c..c+4 exist; forwarded contract.
        unsafe { shrink_rows_avx2::<4>(q, d, &a[c..c + 4], &scales[c..c + 4], n, t.add(c)) };
        c += 4;
    }
    while c < a.len() {
        // SAFETY: as above.
        unsafe { shrink_rows_avx2::<1>(q, d, &a[c..c + 1], &scales[c..c + 1], n, t.add(c)) };
        c += 1;
    }
}

/// `J` rank rows of [`shrink_row_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn shrink_rows_avx2<const J: usize>(
    q: &[i16],
    d: &[f32],
    a: &[&[i8]],
    scales: &[f32],
    n: usize,
    t: *mut f32,
) {
    let ap: [*const i8; J] = std::array::from_fn(|c| a[c].as_ptr());
    let full = n / XBLOCK;
    let mut acc = [_mm256_setzero_ps(); J];
    // A partial last block is read through a zero-padded copy (only its head is ever written).
    let mut tail = [0i8; XBLOCK];
    for (b, &db) in d.iter().enumerate() {
        // SAFETY: q holds whole blocks, so block b is readable there.
        let x = unsafe {
            [
                _mm256_loadu_si256(q.as_ptr().add(b * XBLOCK).cast()),
                _mm256_loadu_si256(q.as_ptr().add(b * XBLOCK + 16).cast()),
            ]
        };
        let db = _mm256_set1_ps(db);
        for c in 0..J {
            let w = if b < full {
                ap[c].wrapping_add(b * XBLOCK)
            } else {
                tail[..n - b * XBLOCK].copy_from_slice(&a[c][b * XBLOCK..n]);
                tail.as_ptr()
            };
            // SAFETY: `w` points at XBLOCK readable bytes (inside the row, or the copy).
            let s = unsafe { block_isum(w, x) };
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), db, acc[c]);
        }
    }
    // SAFETY: AVX2 and FMA are available (this function's contract).
    let simd = unsafe { Avx2::new() };
    for c in 0..J {
        // SAFETY: entry c is inside the row's t (caller contract).
        unsafe { *t.add(c) = scales[c] * simd.hsum(acc[c]) };
    }
}

/// [`expand_row_scalar`] with AVX2: 8 outputs per vector, 4 vectors per pass over the pairs;
/// columns past the last whole vector use the same integer sum and a scalar fused multiply-add,
/// so every column gets the same bits whichever way it is computed.
///
/// # Safety
/// As [`expand_row_scalar`]; AVX2 and FMA available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn expand_row_avx2(pairs: &[i32], du: f32, p: &ExpandInt8, y: *mut f32) {
    let c = _mm256_set1_ps(du * p.scale);
    let (bt, out) = (p.bt.as_ptr(), p.out_features);
    let mut o = p.outs.start;
    // SAFETY (all loads and stores): columns o..o+8·V are inside `outs`, so inside every
    // interleaved pair row (2·out bytes), y's row and g.
    while o + 32 <= p.outs.end {
        let mut acc = [_mm256_setzero_si256(); 4];
        for (pi, &pair) in pairs.iter().enumerate() {
            let w = _mm256_set1_epi32(pair);
            let row = unsafe { bt.add((pi * out + o) * 2) };
            for (v, a) in acc.iter_mut().enumerate() {
                let b = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(16 * v).cast())) };
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(b, w));
            }
        }
        for (v, a) in acc.iter().enumerate() {
            unsafe { store_out(*a, c, y, p.g, o + 8 * v) };
        }
        o += 32;
    }
    while o + 8 <= p.outs.end {
        let mut acc = _mm256_setzero_si256();
        for (pi, &pair) in pairs.iter().enumerate() {
            let b = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(bt.add((pi * out + o) * 2).cast())) };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(b, _mm256_set1_epi32(pair)));
        }
        unsafe { store_out(acc, c, y, p.g, o) };
        o += 8;
    }
    let cs = _mm_set_ss(du * p.scale);
    for o in o..p.outs.end {
        let isum = expand_isum(pairs, p.bt, out, o);
        unsafe {
            let v = _mm_fmadd_ss(_mm_set_ss(isum as f32), cs, _mm_set_ss(*y.add(o)));
            let v = _mm_cvtss_f32(v);
            *y.add(o) = p.g.map_or(v, |g| g[o] * v);
        }
    }
}

/// `y[o..o+8] = g ∘ fma(isum, c, y)`.
///
/// # Safety
/// Columns `o..o+8` inside y's row and g.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_out(isum: __m256i, c: __m256, y: *mut f32, g: Option<&[f32]>, o: usize) {
    unsafe {
        let yp = y.add(o);
        let mut v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), c, _mm256_loadu_ps(yp));
        if let Some(g) = g {
            v = _mm256_mul_ps(_mm256_loadu_ps(g.as_ptr().add(o)), v);
        }
        _mm256_storeu_ps(yp, v);
    }
}
