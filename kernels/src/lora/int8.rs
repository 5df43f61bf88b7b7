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
//! per step; converting it to f32 cost three instructions per 8 multiply-adds, where one byte
//! dot-product instruction does 32 or 64, and the activations become integers once per row.
//!
//! Three implementations of the same integer sums: plain loops; AVX2, whose `vpmaddubsw` takes
//! one unsigned operand, so the sign of one side moves onto the other (`|x| · (w · sign x)`, all
//! magnitudes ≤ 127, so its i16 pair sums cannot saturate); AVX-512 VNNI (`vpdpbusd`, 64
//! products per instruction), which reads the weights as unsigned by flipping their sign bit
//! (`w + 128`) and subtracts `128 · Σ x` for it, exactly. Bᵀ is stored with rank rows interleaved
//! in fours ([`bt_index`]), so the four weights one 32-bit lane needs are adjacent.
//!
//! The driver (`plan.rs`) quantizes each activation row once per call (shared by the fused
//! sites) and each `u` once per (row, site), then runs the row functions here. The work of a row
//! depends only on that row and its adapter, never on the other rows of the call, its tiling or
//! the thread that runs it, so the op stays batch invariant.

// Blocks index the activations, their scales and the weight rows by the same block number.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

use super::Isa;

/// Activation elements per quantization block.
pub(super) const XBLOCK: usize = 32;

/// Rank rows of Bᵀ interleaved together (see [`bt_index`]).
pub(super) const BT_INTERLEAVE: usize = 4;

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

/// Padded int8 elements of one quantized activation row of `n` floats.
pub(super) fn padded(n: usize) -> usize {
    n.div_ceil(XBLOCK) * XBLOCK
}

/// Which implementation runs for `isa`: AVX-512 CPUs with VNNI take the VNNI code, other AVX-512
/// and AVX2 CPUs the AVX2 code, `Portable` the plain loops.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

fn path(isa: Isa) -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = Isa::Avx2.is_available();
        if isa == Isa::Avx512
            && avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Path::Vnni;
        }
        if matches!(isa, Isa::Avx512 | Isa::Avx2) && avx2 {
            return Path::Avx2;
        }
    }
    let _ = isa;
    Path::Scalar
}

/// Quantizes one activation row per [`XBLOCK`] elements: `x[k] ≈ d[k / 32] · q[k]`, zero-padded
/// to whole blocks. `q` holds [`padded`]`(x.len())` values, `d` one scale per block.
pub(super) fn quantize_row(isa: Isa, x: &[f32], q: &mut [i8], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if path(isa) != Path::Scalar {
        // SAFETY: AVX2 and FMA were detected (both SIMD paths imply them).
        unsafe { quantize_row_avx2(x, q, d) };
        return;
    }
    let _ = isa;
    for (b, block) in x.chunks(XBLOCK).enumerate() {
        d[b] = quantize_block(block, &mut q[b * XBLOCK..(b + 1) * XBLOCK]);
    }
}

/// One block of [`quantize_row`] in plain loops (the specification); pads `q` with zeros.
fn quantize_block(block: &[f32], q: &mut [i8]) -> f32 {
    let scale = quantize_into(block, &mut q[..block.len()]);
    q[block.len()..].fill(0);
    scale
}

/// [`quantize_row`] with AVX2 for the whole blocks: the same values (the scale and its inverse
/// are computed the same way, and `vcvtps2dq` rounds half to even like the scalar trick).
///
/// # Safety
/// AVX2 and FMA available; `q` and `d` sized as in [`quantize_row`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    let full = x.len() / XBLOCK;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // The packs below interleave per 128-bit lane; this dword order undoes it.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..full {
        // SAFETY: block b lies inside x and inside q (whole blocks).
        unsafe {
            let src = x.as_ptr().add(b * XBLOCK);
            let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(src.add(8 * k)));
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_and_ps(v, abs)));
            let scale = hmax256(m) / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)));
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(q.as_mut_ptr().add(b * XBLOCK).cast(), bytes);
            d[b] = scale;
        }
    }
    if full * XBLOCK < x.len() {
        d[full] = quantize_block(&x[full * XBLOCK..], &mut q[full * XBLOCK..(full + 1) * XBLOCK]);
    }
}

/// Groups of four of a rank-`rank` row of `u` (padded with zeros).
pub(super) fn quad_count(rank: usize) -> usize {
    rank.div_ceil(BT_INTERLEAVE)
}

/// One row's expand input: `u = t ∘ sb` quantized as one block, written to `quads` four int8
/// values per i32 (little-endian; the broadcast operand of the byte dot products;
/// [`quad_count`]`(t.len())` of them); returns `du`.
pub(super) fn quantize_t(t: &[f32], sb: &[f32], quads: &mut [i32]) -> f32 {
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
        let padded = n.next_multiple_of(BT_INTERLEAVE);
        q[n..padded].fill(0);
        let dst = &mut quads[c * MAX_RANK / BT_INTERLEAVE..];
        for (d, p) in dst.iter_mut().zip(q[..padded].chunks_exact(BT_INTERLEAVE)) {
            *d = i32::from_le_bytes([p[0] as u8, p[1] as u8, p[2] as u8, p[3] as u8]);
        }
    }
    scale
}

/// The four int8 values of a quad from [`quantize_t`].
fn unpack(quad: i32) -> [i8; BT_INTERLEAVE] {
    quad.to_le_bytes().map(|b| b as i8)
}

/// The index of `Bᵀ[j, o]` in the interleaved layout: rank rows `4p..4p + 4` are interleaved
/// byte by byte, so the four weights a 32-bit lane needs for output `o` are adjacent.
#[inline(always)]
pub(super) fn bt_index(j: usize, o: usize, out_features: usize) -> usize {
    ((j / BT_INTERLEAVE) * out_features + o) * BT_INTERLEAVE + j % BT_INTERLEAVE
}

/// One row's shrink: `t[c] = scales[c] · Σ_b d[b] · Σ_{k∈b} a[c][k] · q[k]` for rank rows
/// `c < a.len()`, with `q`, `d` from [`quantize_row`] of an `n`-float row.
///
/// # Safety
/// `isa` available; each `a[c]` `n` long; `t` valid for writing `a.len()` floats.
pub(super) unsafe fn shrink_row(
    isa: Isa,
    q: &[i8],
    d: &[f32],
    a: &[&[i8]],
    scales: &[f32],
    n: usize,
    t: *mut f32,
) {
    // SAFETY (each arm): the path's features were detected; the rest is the caller's contract.
    match path(isa) {
        #[cfg(target_arch = "x86_64")]
        Path::Vnni => unsafe {
            shrink_row_tiled(q, d, a, scales, n, t, shrink_rows_vnni::<4>, shrink_rows_vnni::<1>)
        },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe {
            shrink_row_tiled(q, d, a, scales, n, t, shrink_rows_avx2::<4>, shrink_rows_avx2::<1>)
        },
        Path::Scalar => unsafe { shrink_row_scalar(q, d, a, scales, n, t) },
    }
}

/// One row's expand over the columns `p.outs` (see [`ExpandInt8`]): `quads` and `du` from
/// [`quantize_t`].
///
/// # Safety
/// `isa` available; `p.bt` an interleaved `Bᵀ` of at least `quads.len()` quad rows of
/// `p.out_features`; `p.outs` within `0..out_features`; `p.g`, when set, `out_features` long; `y` the row's
/// `out_features` floats, its columns `outs` touched by no other thread.
pub(super) unsafe fn expand_row(isa: Isa, quads: &[i32], du: f32, p: &ExpandInt8, y: *mut f32) {
    // SAFETY (each arm): the path's features were detected; the rest is the caller's contract.
    match path(isa) {
        #[cfg(target_arch = "x86_64")]
        Path::Vnni => unsafe { expand_row_vnni(quads, du, p, y) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { expand_row_avx2(quads, du, p, y) },
        Path::Scalar => unsafe { expand_row_scalar(quads, du, p, y) },
    }
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
unsafe fn shrink_row_scalar(q: &[i8], d: &[f32], a: &[&[i8]], scales: &[f32], n: usize, t: *mut f32) {
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
fn expand_isum(quads: &[i32], bt: &[i8], out_features: usize, o: usize) -> i32 {
    let mut isum = 0i32;
    for (qi, &quad) in quads.iter().enumerate() {
        let k = (qi * out_features + o) * BT_INTERLEAVE;
        for (b, u) in unpack(quad).into_iter().enumerate() {
            isum += i32::from(bt[k + b]) * i32::from(u);
        }
    }
    isum
}

/// [`expand_row`] in plain loops: the specification.
///
/// # Safety
/// As [`expand_row`].
unsafe fn expand_row_scalar(quads: &[i32], du: f32, p: &ExpandInt8, y: *mut f32) {
    let c = du * p.scale;
    for o in p.outs.clone() {
        let isum = expand_isum(quads, p.bt, p.out_features, o);
        // SAFETY: o is inside `outs` (caller contract).
        unsafe {
            let v = (isum as f32).mul_add(c, *y.add(o));
            *y.add(o) = p.g.map_or(v, |g| g[o] * v);
        }
    }
}

/// A shrink kernel for a tile of rank rows (see [`shrink_rows_avx2`]).
#[cfg(target_arch = "x86_64")]
type ShrinkTile = unsafe fn(&[i8], &[f32], &[&[i8]], &[f32], usize, *mut f32);

/// A row's shrink in tiles of four rank rows (which share each loaded activation block), the
/// leftover rows one at a time.
///
/// # Safety
/// As [`shrink_row`]; the tiles' CPU features available.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn shrink_row_tiled(
    q: &[i8],
    d: &[f32],
    a: &[&[i8]],
    scales: &[f32],
    n: usize,
    t: *mut f32,
    four: ShrinkTile,
    one: ShrinkTile,
) {
    let mut c = 0;
    while c + 4 <= a.len() {
        // SAFETY: rank rows c..c+4 exist; forwarded contract.
        unsafe { four(q, d, &a[c..c + 4], &scales[c..c + 4], n, t.add(c)) };
        c += 4;
    }
    while c < a.len() {
        // SAFETY: as above.
        unsafe { one(q, d, &a[c..c + 1], &scales[c..c + 1], n, t.add(c)) };
        c += 1;
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

/// `Σ w[k] · x[k]` over 32 bytes, as 8 i32 lanes of 4 products each: `ax = |x|` and the sign of
/// `x` moved onto `w`, so the unsigned-by-signed `vpmaddubsw` applies; its i16 pair sums are at
/// most 2 · 127 · 127 (no ±128 is ever quantized), so they cannot saturate.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot_bytes_avx2(w: __m256i, x: __m256i, ax: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x));
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// `J` rank rows of the AVX2 shrink: one block of activations at a time, shared by the rows.
///
/// # Safety
/// As [`shrink_row_scalar`] for `J` rank rows; AVX2 and FMA available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn shrink_rows_avx2<const J: usize>(
    q: &[i8],
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
        let x = unsafe { _mm256_loadu_si256(q.as_ptr().add(b * XBLOCK).cast()) };
        let ax = _mm256_sign_epi8(x, x);
        let db = _mm256_set1_ps(db);
        for c in 0..J {
            let w = if b < full {
                ap[c].wrapping_add(b * XBLOCK)
            } else {
                tail[..n - b * XBLOCK].copy_from_slice(&a[c][b * XBLOCK..n]);
                tail.as_ptr()
            };
            // SAFETY: `w` points at XBLOCK readable bytes (inside the row, or the copy).
            let s = dot_bytes_avx2(unsafe { _mm256_loadu_si256(w.cast()) }, x, ax);
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

/// [`expand_row_scalar`] with AVX2: 8 outputs per vector, 4 vectors per pass over the quads;
/// columns past the last whole vector use the same integer sum and a scalar fused multiply-add,
/// so every column gets the same bits whichever way it is computed.
///
/// # Safety
/// As [`expand_row_scalar`]; AVX2 and FMA available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn expand_row_avx2(quads: &[i32], du: f32, p: &ExpandInt8, y: *mut f32) {
    const V: usize = 8 * BT_INTERLEAVE;
    let c = _mm256_set1_ps(du * p.scale);
    let (bt, out) = (p.bt.as_ptr(), p.out_features);
    let mut o = p.outs.start;
    // SAFETY (all loads and stores): the columns touched (o..o+32, or o..o+8) are inside
    // `outs`, so inside every interleaved quad row (4·out bytes), y's row and g.
    while o + 32 <= p.outs.end {
        let mut acc = [_mm256_setzero_si256(); 4];
        for (qi, &quad) in quads.iter().enumerate() {
            let u = _mm256_set1_epi32(quad);
            let au = _mm256_sign_epi8(u, u);
            let row = unsafe { bt.add((qi * out + o) * BT_INTERLEAVE) };
            for (v, a) in acc.iter_mut().enumerate() {
                let b = unsafe { _mm256_loadu_si256(row.add(V * v).cast()) };
                *a = _mm256_add_epi32(*a, dot_bytes_avx2(b, u, au));
            }
        }
        for (v, a) in acc.iter().enumerate() {
            unsafe { store_out(*a, c, y, p.g, o + 8 * v) };
        }
        o += 32;
    }
    while o + 8 <= p.outs.end {
        let mut acc = _mm256_setzero_si256();
        for (qi, &quad) in quads.iter().enumerate() {
            let u = _mm256_set1_epi32(quad);
            let b = unsafe { _mm256_loadu_si256(bt.add((qi * out + o) * BT_INTERLEAVE).cast()) };
            acc = _mm256_add_epi32(acc, dot_bytes_avx2(b, u, _mm256_sign_epi8(u, u)));
        }
        unsafe { store_out(acc, c, y, p.g, o) };
        o += 8;
    }
    let cs = _mm_set_ss(du * p.scale);
    for o in o..p.outs.end {
        let isum = expand_isum(quads, p.bt, out, o);
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

/// The mask of the first `n` of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn byte_mask(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// `J` rank rows of the VNNI shrink: two activation blocks (64 bytes) per step, shared by the
/// rows; a partial last pair is read with masked loads, which never touch the masked bytes.
///
/// The weights are read as unsigned (`w ^ 0x80 = w + 128`), so each lane's dot product carries
/// `128 · Σ x` of its four activations too; starting the lane from minus that (one more
/// `vpdpbusd` per pair of blocks, shared by the rows) leaves exactly `Σ w · x`.
///
/// # Safety
/// As [`shrink_row_scalar`] for `J` rank rows; AVX-512F/BW/VL, VNNI, AVX2 and FMA available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn shrink_rows_vnni<const J: usize>(
    q: &[i8],
    d: &[f32],
    a: &[&[i8]],
    scales: &[f32],
    n: usize,
    t: *mut f32,
) {
    let ap: [*const i8; J] = std::array::from_fn(|c| a[c].as_ptr());
    let flip = _mm512_set1_epi8(i8::MIN);
    let mut acc = [_mm512_setzero_ps(); J];
    for pair in 0..n.div_ceil(2 * XBLOCK) {
        let k0 = pair * 2 * XBLOCK;
        let mask = byte_mask(n - k0);
        // SAFETY: the mask keeps the loads inside the row's n values (q holds at least n).
        let x = unsafe { _mm512_maskz_loadu_epi8(mask, q.as_ptr().add(k0)) };
        let bias =
            _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, x));
        // Lanes 0-7 hold block 2·pair, lanes 8-15 the next (scale 0 past the row's end).
        let (d0, d1) = (d[2 * pair], d.get(2 * pair + 1).copied().unwrap_or(0.0));
        let dv = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
        for c in 0..J {
            // SAFETY: as for x; each rank row is n long.
            let w = unsafe { _mm512_maskz_loadu_epi8(mask, ap[c].add(k0)) };
            let s = _mm512_dpbusd_epi32(bias, _mm512_xor_si512(w, flip), x);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dv, acc[c]);
        }
    }
    for c in 0..J {
        // SAFETY: entry c is inside the row's t (caller contract).
        unsafe { *t.add(c) = scales[c] * _mm512_reduce_add_ps(acc[c]) };
    }
}

/// [`expand_row_scalar`] with VNNI: 16 outputs per vector (64 bytes of a quad row), 4 vectors
/// per pass over the quads, the last columns with masked loads and stores, so every column takes
/// the same instructions. Weights are read as unsigned as in [`shrink_rows_vnni`]; the
/// correction, `128 · Σ_j qu[j]`, is the same for every output.
///
/// # Safety
/// As [`expand_row_scalar`]; AVX-512F/BW/VL, VNNI, AVX2 and FMA available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn expand_row_vnni(quads: &[i32], du: f32, p: &ExpandInt8, y: *mut f32) {
    const LANES: usize = 16;
    const V: usize = LANES * BT_INTERLEAVE;
    let flip = _mm512_set1_epi8(i8::MIN);
    let usum: i32 = quads.iter().flat_map(|&q| unpack(q)).map(i32::from).sum();
    let bias = _mm512_set1_epi32(-128 * usum);
    let c = _mm512_set1_ps(du * p.scale);
    let (bt, out) = (p.bt.as_ptr(), p.out_features);
    let mut o = p.outs.start;
    // SAFETY (all loads and stores): the columns touched are inside `outs` (full vectors, or
    // masked to the columns left), so inside every quad row (4·out bytes), y's row and g.
    while o + 4 * LANES <= p.outs.end {
        let mut acc = [bias; 4];
        for (qi, &quad) in quads.iter().enumerate() {
            let u = _mm512_set1_epi32(quad);
            let row = unsafe { bt.add((qi * out + o) * BT_INTERLEAVE) };
            for (v, a) in acc.iter_mut().enumerate() {
                let b = unsafe { _mm512_loadu_si512(row.add(V * v).cast()) };
                *a = _mm512_dpbusd_epi32(*a, _mm512_xor_si512(b, flip), u);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            unsafe { store_out_vnni(*a, c, y, p.g, o + LANES * v, LANES) };
        }
        o += 4 * LANES;
    }
    while o < p.outs.end {
        let cols = (p.outs.end - o).min(LANES);
        let mask = byte_mask(cols * BT_INTERLEAVE);
        let mut acc = bias;
        for (qi, &quad) in quads.iter().enumerate() {
            let b = unsafe { _mm512_maskz_loadu_epi8(mask, bt.add((qi * out + o) * BT_INTERLEAVE)) };
            acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(b, flip), _mm512_set1_epi32(quad));
        }
        unsafe { store_out_vnni(acc, c, y, p.g, o, cols) };
        o += cols;
    }
}

/// `y[o..o+cols] = g ∘ fma(isum, c, y)` for the first `cols` (≤ 16) lanes.
///
/// # Safety
/// Columns `o..o+cols` inside y's row and g; AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn store_out_vnni(isum: __m512i, c: __m512, y: *mut f32, g: Option<&[f32]>, o: usize, cols: usize) {
    let mask = ((1u32 << cols) - 1) as u16;
    unsafe {
        let yp = y.add(o);
        let mut v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), c, _mm512_maskz_loadu_ps(mask, yp));
        if let Some(g) = g {
            v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, g.as_ptr().add(o)), v);
        }
        _mm512_mask_storeu_ps(yp, mask, v);
    }
}
