//! x86-64 kernels over the 16-row interleaved layout: AVX-512 VNNI and AVX2 tiles, and the AVX2
//! activation quantizer. Every function here requires the CPU features named in its
//! `target_feature` attribute; `MatmulPath::is_available` is the gate.

// Tiles index several per-row register arrays (accumulators, partial sums) by the same row `r`.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::Acts;
use super::{OutPtr, QuantFormat, QuantMatrix, BLOCK_ELEMS, GROUP_ROWS};

/// Activation rows per AVX-512 tile: each unpacked weight block is reused for this many rows.
const R512: usize = 4;
/// Groups per pass of a single-row AVX-512 tile.
const G1: usize = 2;
/// Activation rows per AVX2 tile (16 ymm registers bound it lower).
const R256: usize = 4;

/// Software prefetch distance in bytes ahead of the weight stream.
const PF: usize = {
    let v = match option_env!("QPF") {
        Some(v) => v.as_bytes(),
        None => b"0",
    };
    let mut n = 0;
    let mut i = 0;
    while i < v.len() {
        n = n * 10 + (v[i] - b'0') as usize;
        i += 1;
    }
    n
};

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p.cast());
}

/// x[r] block b as a pointer to its 8 little-endian dwords of int8 values.
#[inline(always)]
unsafe fn xdw(a: &Acts, r: usize, b: usize) -> *const i32 {
    a.q.as_ptr().add((r * a.nb + b) * BLOCK_ELEMS).cast::<i32>()
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
    let mut g = groups.start;
    while g < groups.end {
        // Leftover single rows (decode) go G1 groups at a time, sharing the activation loads.
        let pair = g + G1 <= groups.end;
        for gg in g..g + if pair { G1 } else { 1 } {
            let grp = base.add(gg * m.group_stride);
            let (yg, mask) = group_out(m, y, gg);
            let mut r = rows.start;
            while rows.end - r >= R512 {
                tile512::<R512>(m, grp, a, r, yg, mask);
                r += R512;
            }
            match rows.end - r {
                2 => tile512::<2>(m, grp, a, r, yg, mask),
                3 => tile512::<3>(m, grp, a, r, yg, mask),
                1 if !pair => tile512::<1>(m, grp, a, r, yg, mask),
                _ => {}
            }
        }
        if pair && (rows.end - rows.start) % R512 == 1 {
            row512::<G1>(m, base.add(g * m.group_stride), a, rows.end - 1, y, g);
        }
        g += if pair { G1 } else { 1 };
    }
}

/// Where group g's 16 outputs go in activation row 0, and the store mask for a partial group.
#[inline(always)]
unsafe fn group_out(m: &QuantMatrix, y: OutPtr, g: usize) -> (*mut f32, __mmask16) {
    let valid = (m.out_features - g * GROUP_ROWS).min(GROUP_ROWS);
    // Partial last group: masked stores keep the padding rows out of y.
    ((y.0.add(g * GROUP_ROWS)), (((1u32 << valid) - 1) & 0xffff) as __mmask16)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile512<const R: usize>(
    m: &QuantMatrix,
    grp: *const u8,
    a: &Acts,
    r0: usize,
    yg: *mut f32,
    mask: __mmask16,
) {
    let acc = match m.format {
        QuantFormat::Q4_1 => q4_1_512::<R>(grp, m.scale_region, a, r0),
        QuantFormat::Q8_0 => q8_0_512::<R>(grp, m.scale_region, a, r0),
    };
    for (r, v) in acc.into_iter().enumerate() {
        _mm512_mask_storeu_ps(yg.add((r0 + r) * m.out_features), mask, v);
    }
}

/// One activation row `r` against G consecutive groups starting at `g0` (`grp` = its storage).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn row512<const G: usize>(
    m: &QuantMatrix,
    grp: *const u8,
    a: &Acts,
    r: usize,
    y: OutPtr,
    g0: usize,
) {
    let acc = match m.format {
        QuantFormat::Q4_1 => q4_1_row512::<G>(grp, m.group_stride, m.scale_region, a, r),
        QuantFormat::Q8_0 => q8_0_row512::<G>(grp, m.group_stride, m.scale_region, a, r),
    };
    for (g, v) in acc.into_iter().enumerate() {
        let (yg, mask) = group_out(m, y, g0 + g);
        _mm512_mask_storeu_ps(yg.add(r * m.out_features), mask, v);
    }
}

/// The 8 dword broadcasts of activation row r, block b, held in registers for reuse.
#[inline(always)]
unsafe fn xbc512(a: &Acts, r: usize, b: usize) -> [__m512i; 8] {
    let xb = xdw(a, r, b);
    [0, 1, 2, 3, 4, 5, 6, 7].map(|k| bc512(xb, k))
}

/// Q4_1, one activation row × G groups: `q4_1_512::<1>` for each group, but the activation
/// broadcasts of a block are loaded once for all G groups.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_row512<const G: usize>(
    grp: *const u8,
    stride: usize,
    scale_region: usize,
    a: &Acts,
    r: usize,
) -> [__m512; G] {
    let nb = a.nb;
    let low = _mm512_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); G];
    let mut accm = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let x = xbc512(a, r, b);
        let xi = r * nb + b;
        let dx = _mm512_set1_ps(*a.d.get_unchecked(xi));
        let sx = _mm512_set1_ps(*a.s.get_unchecked(xi));
        for g in 0..G {
            let gp = grp.add(g * stride);
            let sp = gp.add(b * 64);
            let qp = gp.add(scale_region + b * 256);
            if PF > 0 {
                prefetch(qp.wrapping_add(PF));
                prefetch(qp.wrapping_add(PF + 64));
                prefetch(qp.wrapping_add(PF + 128));
                prefetch(qp.wrapping_add(PF + 192));
                prefetch(sp.wrapping_add(PF / 4));
            }
            let dw = _mm512_cvtph_ps(_mm256_load_si256(sp.cast()));
            let mw = _mm512_cvtph_ps(_mm256_load_si256(sp.add(32).cast()));
            let v0 = _mm512_load_si512(qp.cast());
            let v1 = _mm512_load_si512(qp.add(64).cast());
            let v2 = _mm512_load_si512(qp.add(128).cast());
            let v3 = _mm512_load_si512(qp.add(192).cast());
            let mut il = _mm512_dpbusd_epi32(zero, _mm512_and_si512(v0, low), x[0]);
            let mut ih =
                _mm512_dpbusd_epi32(zero, _mm512_and_si512(_mm512_srli_epi16::<4>(v0), low), x[4]);
            il = _mm512_dpbusd_epi32(il, _mm512_and_si512(v1, low), x[1]);
            ih = _mm512_dpbusd_epi32(ih, _mm512_and_si512(_mm512_srli_epi16::<4>(v1), low), x[5]);
            il = _mm512_dpbusd_epi32(il, _mm512_and_si512(v2, low), x[2]);
            ih = _mm512_dpbusd_epi32(ih, _mm512_and_si512(_mm512_srli_epi16::<4>(v2), low), x[6]);
            il = _mm512_dpbusd_epi32(il, _mm512_and_si512(v3, low), x[3]);
            ih = _mm512_dpbusd_epi32(ih, _mm512_and_si512(_mm512_srli_epi16::<4>(v3), low), x[7]);
            let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(il, ih));
            acc[g] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, dx), acc[g]);
            accm[g] = _mm512_fmadd_ps(mw, sx, accm[g]);
        }
    }
    for g in 0..G {
        acc[g] = _mm512_add_ps(acc[g], accm[g]);
    }
    acc
}

/// Q8_0, one activation row × G groups (see `q4_1_row512`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_row512<const G: usize>(
    grp: *const u8,
    stride: usize,
    scale_region: usize,
    a: &Acts,
    r: usize,
) -> [__m512; G] {
    let nb = a.nb;
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let x = xbc512(a, r, b);
        let xi = r * nb + b;
        let dx = _mm512_set1_ps(*a.d.get_unchecked(xi));
        let cx = _mm512_set1_epi32(*a.c.get_unchecked(xi));
        for g in 0..G {
            let gp = grp.add(g * stride);
            let qp = gp.add(scale_region + b * 512);
            if PF > 0 {
                for k in 0..8 {
                    prefetch(qp.wrapping_add(PF + 64 * k));
                }
                if b % 2 == 0 {
                    prefetch(gp.add(b * 32).wrapping_add(PF / 16));
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_load_si256(gp.add(b * 32).cast()));
            let w = |k: usize| _mm512_load_si512(qp.add(64 * k).cast());
            let mut i0 = _mm512_dpbusd_epi32(cx, w(0), x[0]);
            let mut i1 = _mm512_dpbusd_epi32(zero, w(4), x[4]);
            i0 = _mm512_dpbusd_epi32(i0, w(1), x[1]);
            i1 = _mm512_dpbusd_epi32(i1, w(5), x[5]);
            i0 = _mm512_dpbusd_epi32(i0, w(2), x[2]);
            i1 = _mm512_dpbusd_epi32(i1, w(6), x[6]);
            i0 = _mm512_dpbusd_epi32(i0, w(3), x[3]);
            i1 = _mm512_dpbusd_epi32(i1, w(7), x[7]);
            let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
            acc[g] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, dx), acc[g]);
        }
    }
    acc
}

/// Broadcast dword `k` (int8 values 4k..4k+4) of an activation block to all 16 lanes.
#[inline(always)]
unsafe fn bc512(xb: *const i32, k: usize) -> __m512i {
    _mm512_set1_epi32(xb.add(k).read_unaligned())
}

/// Q4_1 tile: 16 outputs × R activation rows.
/// out[r][j] = Σ_b (d[j,b] · dx[r,b] · Σ_i q[j,b,i] · qx[r,b,i]) + m[j,b] · Σx[r,b].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_512<const R: usize>(grp: *const u8, scale_region: usize, a: &Acts, r0: usize) -> [__m512; R] {
    let nb = a.nb;
    let low = _mm512_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    // Separate accumulators for the d and m terms: two short FMA chains instead of one long one.
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let sp = grp.add(b * 64);
        let dw = _mm512_cvtph_ps(_mm256_load_si256(sp.cast()));
        let mw = _mm512_cvtph_ps(_mm256_load_si256(sp.add(32).cast()));
        let qp = grp.add(scale_region + b * 256);
        if PF > 0 {
            prefetch(qp.wrapping_add(PF));
            prefetch(qp.wrapping_add(PF + 64));
            prefetch(qp.wrapping_add(PF + 128));
            prefetch(qp.wrapping_add(PF + 192));
            prefetch(sp.wrapping_add(PF / 4));
        }
        let v0 = _mm512_load_si512(qp.cast());
        let v1 = _mm512_load_si512(qp.add(64).cast());
        let v2 = _mm512_load_si512(qp.add(128).cast());
        let v3 = _mm512_load_si512(qp.add(192).cast());
        // Low nibbles are elements 4k..4k+4 of lane j's row, high nibbles elements 16+4k..
        let l0 = _mm512_and_si512(v0, low);
        let l1 = _mm512_and_si512(v1, low);
        let l2 = _mm512_and_si512(v2, low);
        let l3 = _mm512_and_si512(v3, low);
        let h0 = _mm512_and_si512(_mm512_srli_epi16::<4>(v0), low);
        let h1 = _mm512_and_si512(_mm512_srli_epi16::<4>(v1), low);
        let h2 = _mm512_and_si512(_mm512_srli_epi16::<4>(v2), low);
        let h3 = _mm512_and_si512(_mm512_srli_epi16::<4>(v3), low);
        for r in 0..R {
            let xb = xdw(a, r0 + r, b);
            // Two independent dpbusd chains halve the latency-bound critical path.
            let mut il = _mm512_dpbusd_epi32(zero, l0, bc512(xb, 0));
            let mut ih = _mm512_dpbusd_epi32(zero, h0, bc512(xb, 4));
            il = _mm512_dpbusd_epi32(il, l1, bc512(xb, 1));
            ih = _mm512_dpbusd_epi32(ih, h1, bc512(xb, 5));
            il = _mm512_dpbusd_epi32(il, l2, bc512(xb, 2));
            ih = _mm512_dpbusd_epi32(ih, h2, bc512(xb, 6));
            il = _mm512_dpbusd_epi32(il, l3, bc512(xb, 3));
            ih = _mm512_dpbusd_epi32(ih, h3, bc512(xb, 7));
            let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(il, ih));
            let xi = (r0 + r) * nb + b;
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

/// Q8_0 tile: 16 outputs × R activation rows. Weights are stored as u = q + 128 (unsigned
/// operand of vpdpbusd); starting the integer sum at −128 · Σqx removes the offset exactly.
/// out[r][j] = Σ_b d[j,b] · dx[r,b] · Σ_i q[j,b,i] · qx[r,b,i].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_512<const R: usize>(grp: *const u8, scale_region: usize, a: &Acts, r0: usize) -> [__m512; R] {
    let nb = a.nb;
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let dw = _mm512_cvtph_ps(_mm256_load_si256(grp.add(b * 32).cast()));
        let qp = grp.add(scale_region + b * 512);
        if PF > 0 {
            for k in 0..8 {
                prefetch(qp.wrapping_add(PF + 64 * k));
            }
            if b % 2 == 0 {
                prefetch(grp.add(b * 32).wrapping_add(PF / 16));
            }
        }
        let w0 = _mm512_load_si512(qp.cast());
        let w1 = _mm512_load_si512(qp.add(64).cast());
        let w2 = _mm512_load_si512(qp.add(128).cast());
        let w3 = _mm512_load_si512(qp.add(192).cast());
        let w4 = _mm512_load_si512(qp.add(256).cast());
        let w5 = _mm512_load_si512(qp.add(320).cast());
        let w6 = _mm512_load_si512(qp.add(384).cast());
        let w7 = _mm512_load_si512(qp.add(448).cast());
        for r in 0..R {
            let xb = xdw(a, r0 + r, b);
            let xi = (r0 + r) * nb + b;
            let mut i0 = _mm512_set1_epi32(*a.c.get_unchecked(xi));
            let mut i1 = _mm512_dpbusd_epi32(zero, w4, bc512(xb, 4));
            i0 = _mm512_dpbusd_epi32(i0, w0, bc512(xb, 0));
            i1 = _mm512_dpbusd_epi32(i1, w5, bc512(xb, 5));
            i0 = _mm512_dpbusd_epi32(i0, w1, bc512(xb, 1));
            i1 = _mm512_dpbusd_epi32(i1, w6, bc512(xb, 6));
            i0 = _mm512_dpbusd_epi32(i0, w2, bc512(xb, 2));
            i1 = _mm512_dpbusd_epi32(i1, w7, bc512(xb, 7));
            i0 = _mm512_dpbusd_epi32(i0, w3, bc512(xb, 3));
            let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(xi)));
            acc[r] = _mm512_fmadd_ps(isum, scale, acc[r]);
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
        let valid = (m.out_features - g * GROUP_ROWS).min(GROUP_ROWS);
        for h in 0..2 {
            let vh = valid.saturating_sub(8 * h).min(8);
            if vh == 0 {
                continue;
            }
            let yh = y.0.add(g * GROUP_ROWS + 8 * h);
            let mut r = rows.start;
            while rows.end - r >= R256 {
                tile256::<R256>(m, grp, h, a, r, yh, vh);
                r += R256;
            }
            match rows.end - r {
                1 => tile256::<1>(m, grp, h, a, r, yh, vh),
                2 => tile256::<2>(m, grp, h, a, r, yh, vh),
                3 => tile256::<3>(m, grp, h, a, r, yh, vh),
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
    valid: usize,
) {
    let acc = match m.format {
        QuantFormat::Q4_1 => q4_1_256::<R>(grp, h, m.scale_region, a, r0),
        QuantFormat::Q8_0 => q8_0_256::<R>(grp, h, m.scale_region, a, r0),
    };
    for (r, v) in acc.into_iter().enumerate() {
        let dst = yh.add((r0 + r) * m.out_features);
        if valid == 8 {
            _mm256_storeu_ps(dst, v);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
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
unsafe fn q4_1_256<const R: usize>(
    grp: *const u8,
    h: usize,
    scale_region: usize,
    a: &Acts,
    r0: usize,
) -> [__m256; R] {
    let nb = a.nb;
    let low = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let sp = grp.add(b * 64 + 16 * h);
        let dw = _mm256_cvtph_ps(_mm_load_si128(sp.cast()));
        let mw = _mm256_cvtph_ps(_mm_load_si128(sp.add(32).cast()));
        let qp = grp.add(scale_region + b * 256 + 32 * h);
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
unsafe fn q8_0_256<const R: usize>(
    grp: *const u8,
    h: usize,
    scale_region: usize,
    a: &Acts,
    r0: usize,
) -> [__m256; R] {
    let nb = a.nb;
    let ones = _mm256_set1_epi16(1);
    let offset = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let dw = _mm256_cvtph_ps(_mm_load_si128(grp.add(b * 32 + 16 * h).cast()));
        let qp = grp.add(scale_region + b * 512 + 32 * h);
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
        let qsum = hsum256i(isum);
        let db = amax / 127.0;
        *d.get_unchecked_mut(b) = db;
        *s.get_unchecked_mut(b) = db * qsum as f32;
        *c.get_unchecked_mut(b) = -128 * qsum;
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
