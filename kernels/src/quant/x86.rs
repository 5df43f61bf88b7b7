//! x86-64 kernels over the 16-row interleaved layout: AVX-512 VNNI and AVX2 tiles, and the AVX2
//! activation quantizer. Every function here requires the CPU features named in its
//! `target_feature` attribute; `MatmulPath::is_available` is the gate.

// Tiles index several per-row register arrays (accumulators, partial sums) by the same row `r`.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::Acts;
use super::{group_block_offsets, OutPtr, QuantFormat, QuantMatrix, BLOCK_ELEMS, GROUP_ROWS};

/// Activation rows per AVX-512 tile: each unpacked weight block is reused for this many rows.
/// The per-row work (8 vpdpbusd + 4 f32 ops per block) dominates from 4 rows on: 6 or 8 measured
/// the same (~320 GFLOP/s per Zen 4 core).
const R512: usize = 4;
/// Groups per pass of a single-row AVX-512 tile (decode): the activation broadcasts of a block
/// are loaded once for all of them.
const G1: usize = 2;
/// Activation rows per AVX2 tile (16 ymm registers bound it lower).
const R256: usize = 4;

/// Software prefetch distance (bytes) ahead of the weight stream, in every tile that reads a
/// group's weights first. Decode reads every weight once from DRAM, and the kernels'
/// activation loads fill the load queue, so hardware prefetch alone reaches only ~60 % of the
/// bandwidth a plain read loop gets; prefetching 16 KB ahead into L2 (T1: L1 miss buffers stay
/// free for the demand loads) closes most of that gap. Tuned on a Zen 4 VM.
const PF: usize = 16 << 10;

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T1>(p.cast());
}

/// Prefetches `lines` cache lines starting `PF` bytes past `p` (addresses may run past the
/// matrix: prefetches never fault).
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8, lines: usize) {
    if PF > 0 {
        for k in 0..lines {
            prefetch(p.wrapping_add(PF + 64 * k));
        }
    }
}

/// x[r] block b as a pointer to its 8 little-endian dwords of int8 values.
#[inline(always)]
unsafe fn xdw(a: &Acts, r: usize, b: usize) -> *const i32 {
    a.q.as_ptr().add((r * a.nb + b) * BLOCK_ELEMS).cast::<i32>()
}

/// Where group g's outputs for activation row 0 go, and the lane mask of its valid rows (the
/// last group may be partial: masked stores keep its padding rows out of y).
#[inline(always)]
unsafe fn group_out(m: &QuantMatrix, y: OutPtr, g: usize) -> (*mut f32, u16) {
    let valid = (m.out_features - g * GROUP_ROWS).min(GROUP_ROWS);
    (y.0.add(g * GROUP_ROWS), ((1u32 << valid) - 1) as u16)
}

// ------------------------------------------------------------------------------------------------
// AVX-512 VNNI
// ------------------------------------------------------------------------------------------------

/// y[r, 16g..16g+16] for g in `groups`, r in `rows` (see `QuantMatrix::run_range`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn run_avx512(
    m: &QuantMatrix,
    a: &Acts,
    groups: Range<usize>,
    rows: Range<usize>,
    y: OutPtr,
) {
    let base = m.bytes().as_ptr();
    let single = rows.len() % R512 == 1;
    let mut g = groups.start;
    while g < groups.end {
        // A leftover single row (decode) goes G1 groups at a time.
        let n = if single && g + G1 <= groups.end { G1 } else { 1 };
        for gg in g..g + n {
            let grp = base.add(gg * m.group_stride);
            let (yg, mask) = group_out(m, y, gg);
            // Only the first tile of a group streams its weights from memory; the later ones
            // find them in L1, so only it prefetches.
            let mut r = rows.start;
            while rows.end - r >= R512 {
                tile512::<R512>(m, grp, a, r, yg, mask, r == rows.start);
                r += R512;
            }
            let pf = r == rows.start;
            match rows.end - r {
                3 => tile512::<3>(m, grp, a, r, yg, mask, pf),
                2 => tile512::<2>(m, grp, a, r, yg, mask, pf),
                1 if n == 1 => tile512::<1>(m, grp, a, r, yg, mask, pf),
                _ => {}
            }
        }
        if n == G1 {
            row512::<G1>(m, base.add(g * m.group_stride), a, rows.end - 1, y, g);
        }
        g += n;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile512<const R: usize>(
    m: &QuantMatrix,
    grp: *const u8,
    a: &Acts,
    r0: usize,
    yg: *mut f32,
    mask: u16,
    pf: bool,
) {
    let acc = match m.format {
        QuantFormat::Q4_1 => q4_1_512::<R>(grp, a, r0, pf),
        QuantFormat::Q8_0 => q8_0_512::<R>(grp, a, r0, pf),
    };
    for (r, v) in acc.into_iter().enumerate() {
        _mm512_mask_storeu_ps(yg.add((r0 + r) * m.out_features), mask, v);
    }
}

/// One activation row `r` against the G consecutive groups starting at `g0` (stored at `grp`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn row512<const G: usize>(m: &QuantMatrix, grp: *const u8, a: &Acts, r: usize, y: OutPtr, g0: usize) {
    let acc = match m.format {
        QuantFormat::Q4_1 => q4_1_row512::<G>(grp, m.group_stride, a, r),
        QuantFormat::Q8_0 => q8_0_row512::<G>(grp, m.group_stride, a, r),
    };
    for (g, v) in acc.into_iter().enumerate() {
        let (yg, mask) = group_out(m, y, g0 + g);
        _mm512_mask_storeu_ps(yg.add(r * m.out_features), mask, v);
    }
}

/// Broadcast dword `k` (int8 values 4k..4k+4) of an activation block to all 16 lanes.
#[inline(always)]
unsafe fn bc512(xb: *const i32, k: usize) -> __m512i {
    _mm512_set1_epi32(xb.add(k).read_unaligned())
}

/// Unpacks a Q4_1 block of a group: `[lo0..lo3, hi0..hi3]`, where vector k lane j holds the
/// nibbles of elements 4k..4k+4 (low) and 16+4k..16+4k+4 (high) of row j.
#[inline(always)]
unsafe fn q4_1_unpack512(qp: *const u8) -> [__m512i; 8] {
    let low = _mm512_set1_epi8(0x0f);
    let v = [0, 1, 2, 3].map(|k| _mm512_load_si512(qp.add(64 * k).cast()));
    let h = |v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
    let l = |v| _mm512_and_si512(v, low);
    [l(v[0]), l(v[1]), l(v[2]), l(v[3]), h(v[0]), h(v[1]), h(v[2]), h(v[3])]
}

/// Σ over a block of w · x for 16 rows: 8 dpbusd (weights unsigned, activations broadcast),
/// as two independent chains (halving the latency-bound critical path), starting from `init`.
#[inline(always)]
unsafe fn dot512(w: &[__m512i; 8], x: &[__m512i; 8], init: __m512i) -> __m512i {
    let mut i0 = _mm512_dpbusd_epi32(init, w[0], x[0]);
    let mut i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], x[4]);
    i0 = _mm512_dpbusd_epi32(i0, w[1], x[1]);
    i1 = _mm512_dpbusd_epi32(i1, w[5], x[5]);
    i0 = _mm512_dpbusd_epi32(i0, w[2], x[2]);
    i1 = _mm512_dpbusd_epi32(i1, w[6], x[6]);
    i0 = _mm512_dpbusd_epi32(i0, w[3], x[3]);
    i1 = _mm512_dpbusd_epi32(i1, w[7], x[7]);
    _mm512_add_epi32(i0, i1)
}

/// The 8 dword broadcasts of activation row r, block b.
#[inline(always)]
unsafe fn xbc512(a: &Acts, r: usize, b: usize) -> [__m512i; 8] {
    let xb = xdw(a, r, b);
    [0, 1, 2, 3, 4, 5, 6, 7].map(|k| bc512(xb, k))
}

/// Q4_1 tile: 16 outputs × R activation rows.
/// out[r][j] = Σ_b d[j,b] · dx[r,b] · Σ_i q[j,b,i] · qx[r,b,i] + m[j,b] · sx[r,b].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_512<const R: usize>(grp: *const u8, a: &Acts, r0: usize, pf: bool) -> [__m512; R] {
    let nb = a.nb;
    // Separate accumulators for the d and m terms: two short FMA chains instead of one long one.
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (so, po) = group_block_offsets(QuantFormat::Q4_1, b);
        if pf {
            prefetch_ahead(grp.add(so), 5);
        }
        let dw = _mm512_cvtph_ps(_mm256_load_si256(grp.add(so).cast()));
        let mw = _mm512_cvtph_ps(_mm256_load_si256(grp.add(so + 32).cast()));
        let w = q4_1_unpack512(grp.add(po));
        for r in 0..R {
            let xi = (r0 + r) * nb + b;
            let isum = _mm512_cvtepi32_ps(dot512(&w, &xbc512(a, r0 + r, b), _mm512_setzero_si512()));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(xi)));
            acc[r] = _mm512_fmadd_ps(isum, scale, acc[r]);
            accm[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*a.s.get_unchecked(xi)), accm[r]);
        }
    }
    for r in 0..R {
        acc[r] = _mm512_add_ps(acc[r], accm[r]);
    }
    acc
}

/// Q4_1, one activation row × G groups: `q4_1_512::<1>` for each group, but the activation
/// broadcasts of a block stay in registers for all G groups.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_row512<const G: usize>(grp: *const u8, stride: usize, a: &Acts, r: usize) -> [__m512; G] {
    let nb = a.nb;
    let mut acc = [_mm512_setzero_ps(); G];
    let mut accm = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let x = xbc512(a, r, b);
        let xi = r * nb + b;
        let dx = _mm512_set1_ps(*a.d.get_unchecked(xi));
        let sx = _mm512_set1_ps(*a.s.get_unchecked(xi));
        let (so, po) = group_block_offsets(QuantFormat::Q4_1, b);
        for g in 0..G {
            let gp = grp.add(g * stride);
            prefetch_ahead(gp.add(so), 5);
            let dw = _mm512_cvtph_ps(_mm256_load_si256(gp.add(so).cast()));
            let mw = _mm512_cvtph_ps(_mm256_load_si256(gp.add(so + 32).cast()));
            let isum = _mm512_cvtepi32_ps(dot512(&q4_1_unpack512(gp.add(po)), &x, _mm512_setzero_si512()));
            acc[g] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, dx), acc[g]);
            accm[g] = _mm512_fmadd_ps(mw, sx, accm[g]);
        }
    }
    for g in 0..G {
        acc[g] = _mm512_add_ps(acc[g], accm[g]);
    }
    acc
}

/// The 8 payload vectors of a Q8_0 block of a group (bytes q + 128, the unsigned operand).
#[inline(always)]
unsafe fn q8_0_load512(qp: *const u8) -> [__m512i; 8] {
    [0, 1, 2, 3, 4, 5, 6, 7].map(|k| _mm512_load_si512(qp.add(64 * k).cast()))
}

/// Q8_0 tile: 16 outputs × R activation rows. Weights are stored as u = q + 128 (unsigned
/// operand of vpdpbusd); starting the integer sum at cx = −128 · Σqx removes the offset exactly.
/// out[r][j] = Σ_b d[j,b] · dx[r,b] · Σ_i q[j,b,i] · qx[r,b,i].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_512<const R: usize>(grp: *const u8, a: &Acts, r0: usize, pf: bool) -> [__m512; R] {
    let nb = a.nb;
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (so, po) = group_block_offsets(QuantFormat::Q8_0, b);
        if pf {
            prefetch_ahead(grp.add(po), 8);
            if b % 2 == 0 {
                prefetch_ahead(grp.add(so), 1);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_load_si256(grp.add(so).cast()));
        let w = q8_0_load512(grp.add(po));
        for r in 0..R {
            let xi = (r0 + r) * nb + b;
            let cx = _mm512_set1_epi32(*a.c.get_unchecked(xi));
            let isum = _mm512_cvtepi32_ps(dot512(&w, &xbc512(a, r0 + r, b), cx));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(xi)));
            acc[r] = _mm512_fmadd_ps(isum, scale, acc[r]);
        }
    }
    acc
}

/// Q8_0, one activation row × G groups (see `q4_1_row512`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_row512<const G: usize>(grp: *const u8, stride: usize, a: &Acts, r: usize) -> [__m512; G] {
    let nb = a.nb;
    let mut acc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let x = xbc512(a, r, b);
        let xi = r * nb + b;
        let dx = _mm512_set1_ps(*a.d.get_unchecked(xi));
        let cx = _mm512_set1_epi32(*a.c.get_unchecked(xi));
        let (so, po) = group_block_offsets(QuantFormat::Q8_0, b);
        for g in 0..G {
            let gp = grp.add(g * stride);
            prefetch_ahead(gp.add(po), 8);
            if b % 2 == 0 {
                prefetch_ahead(gp.add(so), 1);
            }
            let dw = _mm512_cvtph_ps(_mm256_load_si256(gp.add(so).cast()));
            let isum = _mm512_cvtepi32_ps(dot512(&q8_0_load512(gp.add(po)), &x, cx));
            acc[g] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, dx), acc[g]);
        }
    }
    acc
}

// ------------------------------------------------------------------------------------------------
// AVX2: the same layout, one half-group (8 rows = 32 bytes of each 64-byte vector) at a time.
// ------------------------------------------------------------------------------------------------

/// y[r, 16g..16g+16] for g in `groups`, r in `rows` (see `QuantMatrix::run_range`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run_avx2(
    m: &QuantMatrix,
    a: &Acts,
    groups: Range<usize>,
    rows: Range<usize>,
    y: OutPtr,
) {
    let base = m.bytes().as_ptr();
    for g in groups {
        let grp = base.add(g * m.group_stride);
        let (yg, mask) = group_out(m, y, g);
        for h in 0..2 {
            let valid = (mask >> (8 * h)) as u8;
            if valid == 0 {
                continue;
            }
            let yh = yg.add(8 * h);
            let mut r = rows.start;
            while rows.end - r >= R256 {
                tile256::<R256>(m, grp, h, a, r, yh, valid);
                r += R256;
            }
            match rows.end - r {
                1 => tile256::<1>(m, grp, h, a, r, yh, valid),
                2 => tile256::<2>(m, grp, h, a, r, yh, valid),
                3 => tile256::<3>(m, grp, h, a, r, yh, valid),
                _ => {}
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<const R: usize>(
    m: &QuantMatrix,
    grp: *const u8,
    h: usize,
    a: &Acts,
    r0: usize,
    yh: *mut f32,
    valid: u8,
) {
    let acc = match m.format {
        QuantFormat::Q4_1 => q4_1_256::<R>(grp, h, a, r0),
        QuantFormat::Q8_0 => q8_0_256::<R>(grp, h, a, r0),
    };
    for (r, v) in acc.into_iter().enumerate() {
        let dst = yh.add((r0 + r) * m.out_features);
        if valid == 0xff {
            _mm256_storeu_ps(dst, v);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid.count_ones() as usize);
        }
    }
}

#[inline(always)]
unsafe fn bc256(xb: *const i32, k: usize) -> __m256i {
    _mm256_set1_epi32(xb.add(k).read_unaligned())
}

/// Q4_1 half-group tile (rows 8h..8h+8 of the group), same formula as `q4_1_512`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_256<const R: usize>(grp: *const u8, h: usize, a: &Acts, r0: usize) -> [__m256; R] {
    let nb = a.nb;
    let low = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let (so, po) = group_block_offsets(QuantFormat::Q4_1, b);
        let sp = grp.add(so + 16 * h);
        let dw = _mm256_cvtph_ps(_mm_load_si128(sp.cast()));
        let mw = _mm256_cvtph_ps(_mm_load_si128(sp.add(32).cast()));
        let qp = grp.add(po + 32 * h);
        // i16 partial sums are safe: 8 maddubs pairs of ≤ 2·15·127 each total ≤ 30480.
        let mut p = [_mm256_setzero_si256(); R];
        for k in 0..4 {
            let v = _mm256_load_si256(qp.add(64 * k).cast());
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            for r in 0..R {
                let xb = xdw(a, r0 + r, b);
                p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(lo, bc256(xb, k)));
                p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(hi, bc256(xb, 4 + k)));
            }
        }
        for r in 0..R {
            let xi = (r0 + r) * nb + b;
            let isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(p[r], ones));
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d.get_unchecked(xi)));
            acc[r] = _mm256_fmadd_ps(isum, scale, acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*a.s.get_unchecked(xi)), acc[r]);
        }
    }
    acc
}

/// Q8_0 half-group tile. maddubs needs one unsigned operand, so this uses the sign trick:
/// |w| · (x · sign(w)), pair sums ≤ 2·128·127 fit i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_256<const R: usize>(grp: *const u8, h: usize, a: &Acts, r0: usize) -> [__m256; R] {
    let nb = a.nb;
    let ones = _mm256_set1_epi16(1);
    let offset = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let (so, po) = group_block_offsets(QuantFormat::Q8_0, b);
        let dw = _mm256_cvtph_ps(_mm_load_si128(grp.add(so + 16 * h).cast()));
        let qp = grp.add(po + 32 * h);
        let mut isum = [_mm256_setzero_si256(); R];
        for k in 0..8 {
            // Stored bytes are q ^ 0x80; flip back to signed q.
            let w = _mm256_xor_si256(_mm256_load_si256(qp.add(64 * k).cast()), offset);
            let aw = _mm256_abs_epi8(w);
            for r in 0..R {
                let sx = _mm256_sign_epi8(bc256(xdw(a, r0 + r, b), k), w);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                isum[r] = _mm256_add_epi32(isum[r], p);
            }
        }
        for r in 0..R {
            let xi = (r0 + r) * nb + b;
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d.get_unchecked(xi)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), scale, acc[r]);
        }
    }
    acc
}

// ------------------------------------------------------------------------------------------------
// Activation quantization
// ------------------------------------------------------------------------------------------------

/// AVX2 twin of `act::quantize_block` over a whole row, bit for bit (max is exact and
/// `vcvtps2dq` rounds half to even like `round_ties_even`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], c: &mut [i32]) {
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let nb = d.len().min(s.len()).min(c.len()).min(x.len() / 32).min(q.len() / 32);
    for b in 0..nb {
        let xp = x.as_ptr().add(b * 32);
        let v0 = _mm256_loadu_ps(xp);
        let v1 = _mm256_loadu_ps(xp.add(8));
        let v2 = _mm256_loadu_ps(xp.add(16));
        let v3 = _mm256_loadu_ps(xp.add(24));
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3));
        let amax = hmax256(_mm256_max_ps(m01, m23));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let vid = _mm256_set1_ps(id);
        let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
        let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
        let i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
        let i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        let isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        // packs work per 128-bit lane; the dword permute restores element order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let p = _mm256_permutevar8x32_epi32(p, perm);
        _mm256_storeu_si256(q.as_mut_ptr().add(b * 32).cast(), p);
        // Finite x gives |q| ≤ 127 and |Σq| ≤ 4064; non-finite x gives garbage (never UB or a
        // panic), hence the wrapping multiply.
        let qsum = hsum256i(isum);
        let db = amax / 127.0;
        *d.get_unchecked_mut(b) = db;
        *s.get_unchecked_mut(b) = db * qsum as f32;
        *c.get_unchecked_mut(b) = qsum.wrapping_mul(-128);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax256(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum256i(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}
