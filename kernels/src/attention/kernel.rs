//! The fast attention pass: one KV head group, a run of query rows of one sequence, a range of
//! key positions; flash-attention style (online softmax over tiles of [`TILE`] keys) so scores
//! never exist for more than one tile and every K/V tile is reused by all queries of the group.
//!
//! A pass leaves unnormalised state (`o`, running max `m`, running sum `l`) per query vector;
//! the caller either normalises it into the output or merges it with passes over other key
//! ranges of the same queries (split-K for long single-row decodes).

use std::ops::Range;

use super::simd::Portable;
use super::simd::Simd;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::{Isa, KvGeometry};

/// Keys per tile. 64 keys x head_dim 128 x 4 bytes = 32 KiB of K per tile, which together with
/// the scores of a row chunk stays close to L1 and well inside L2.
pub(super) const TILE: usize = 64;

/// Everything a pass reads. All indices were validated by the caller: every block id of
/// `table` needed for positions `< keys.end` is `< num_blocks`, rows are inside `q`.
pub(super) struct PassInput<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub geom: KvGeometry,
    pub q: &'a [f32],
    pub n_heads: usize,
    pub n_rep: usize,
    pub scale: f32,
    pub table: &'a [u32],
    pub group: usize,
    /// Absolute query rows (indices into `q`'s rows).
    pub rows: Range<usize>,
    /// Sequence position of `rows.start`.
    pub pos0: usize,
    /// Key positions this pass covers; `keys.start` is a multiple of [`TILE`]. Keys beyond a
    /// row's own position are masked, so `keys.end` may exceed it.
    pub keys: Range<usize>,
}

/// Per-pass buffers, reused across passes of one job. After a pass, query vector `i` (row
/// `i / n_rep`, head `i % n_rep` of the group) has `o[i*d..][..d]`, `m[i]`, `l[i]`.
#[derive(Default)]
pub(super) struct PassState {
    pub o: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    qs: Vec<f32>,
    s: Vec<f32>,
    kpack: Vec<f32>,
}

impl PassState {
    fn reset(&mut self, nq: usize, d: usize) {
        self.o.clear();
        self.o.resize(nq * d, 0.0);
        self.m.clear();
        self.m.resize(nq, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(nq, 0.0);
        self.qs.resize(nq * d, 0.0);
        self.s.resize(nq * TILE, 0.0);
        // Zero-initialised once; later tiles overwrite what they use and stale entries are
        // masked to -inf before the softmax.
        if self.kpack.len() < d * TILE {
            self.kpack.resize(d * TILE, 0.0);
        }
    }
}

/// Runs one pass with the given backend. `isa` must be available (checked by the caller).
pub(super) fn run_pass(isa: Isa, inp: &PassInput, st: &mut PassState) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            if let Some(t) = Avx512::detect() {
                // SAFETY: the feature was detected; the input was validated.
                unsafe { pass_avx512(t, inp, st) }
                return;
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            if let Some(t) = Avx2::detect() {
                // SAFETY: the features were detected; the input was validated.
                unsafe { pass_avx2(t, inp, st) }
                return;
            }
        }
        _ => {}
    }
    // SAFETY: the input was validated.
    unsafe { pass_impl(Portable, inp, st) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pass_avx512(t: Avx512, inp: &PassInput, st: &mut PassState) {
    // SAFETY: forwarded contract.
    unsafe { pass_impl(t, inp, st) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass_avx2(t: Avx2, inp: &PassInput, st: &mut PassState) {
    // SAFETY: forwarded contract.
    unsafe { pass_impl(t, inp, st) }
}

/// # Safety
/// `inp` must satisfy the [`PassInput`] invariants (validated block ids and row ranges).
#[inline(always)]
unsafe fn pass_impl<S: Simd>(s: S, inp: &PassInput, st: &mut PassState) {
    let KvGeometry { block_size: bs, n_kv_heads: nkv, head_dim: d } = inp.geom;
    let n_rep = inp.n_rep;
    let g = inp.group;
    let nrows = inp.rows.len();
    let nq = nrows * n_rep;
    st.reset(nq, d);

    // Gather this group's query heads, pre-scaled so the scores come out of QK directly.
    let row_stride = inp.n_heads * d;
    for (r, i) in inp.rows.clone().enumerate() {
        let src = &inp.q[i * row_stride + g * n_rep * d..][..n_rep * d];
        let dst = &mut st.qs[r * n_rep * d..][..n_rep * d];
        for (x, &y) in dst.iter_mut().zip(src) {
            *x = y * inp.scale;
        }
    }

    // Keys past the last row's position are masked for every row: stop there.
    let kend = inp.keys.end.min(inp.pos0 + nrows);
    let nvec = TILE / S::LANES;
    // Direct mode reads K vectors straight from the cache: a vector of LANES keys starting at
    // a multiple of LANES never crosses a block when the block size is a multiple of LANES.
    // Otherwise the tile's keys are first packed into `kpack` ([d][TILE]).
    let direct = bs % S::LANES == 0;
    let kbase = inp.k.as_ptr();
    let vbase = inp.v.as_ptr();
    let k_head = |blk: u32| (blk as usize * nkv + g) * d * bs;
    let v_head = |blk: u32| (blk as usize * nkv + g) * bs * d;
    let mut kptrs = [std::ptr::null::<f32>(); TILE];
    let mut vptrs = [std::ptr::null::<f32>(); TILE];

    let qs = st.qs.as_ptr();
    let sbuf = st.s.as_mut_ptr();
    let obuf = st.o.as_mut_ptr();
    let kpack = st.kpack.as_mut_ptr();

    let mut t0 = inp.keys.start;
    while t0 < kend {
        let tlen = TILE.min(kend - t0);
        // Rows whose position is below t0 see none of this tile; since positions increase with
        // the row, the active queries are a suffix.
        let q_first = t0.saturating_sub(inp.pos0) * n_rep;
        let nqa = nq - q_first;

        // Start fetching the next tile while this one computes: the K/V of one tile come from
        // several blocks scattered over the pool, which the hardware prefetcher picks up late.
        prefetch_keys(s, inp, t0 + TILE, (t0 + 2 * TILE).min(kend));

        let kstride;
        if direct {
            for (j, p) in kptrs[..nvec].iter_mut().enumerate() {
                let t = t0 + j * S::LANES;
                // Vectors wholly past the tile alias vector 0: computed, then masked.
                let t = if t < t0 + tlen { t } else { t0 };
                // SAFETY: block id validated, offset inside the block.
                *p = unsafe { kbase.add(k_head(inp.table[t / bs]) + t % bs) };
            }
            kstride = bs;
        } else {
            let mut t = t0;
            while t < t0 + tlen {
                let off = t % bs;
                let seg = (bs - off).min(t0 + tlen - t);
                let src = k_head(inp.table[t / bs]) + off;
                for k in 0..d {
                    // SAFETY: the source row segment lies inside one validated block; the
                    // destination inside kpack row k. Raw copies keep `kpack` (a pointer
                    // into st.kpack) valid.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            kbase.add(src + k * bs),
                            kpack.add(k * TILE + (t - t0)),
                            seg,
                        )
                    };
                }
                t += seg;
            }
            for (j, p) in kptrs[..nvec].iter_mut().enumerate() {
                // SAFETY: inside kpack ([d][TILE]).
                *p = unsafe { kpack.add(j * S::LANES) };
            }
            kstride = TILE;
        }
        // V rows, one block segment at a time (one division per block, not per key).
        let mut t = t0;
        while t < t0 + tlen {
            let off = t % bs;
            let seg = (bs - off).min(t0 + tlen - t);
            // SAFETY: block id validated, slots off..off + seg inside the block.
            let row0 = unsafe { vbase.add(v_head(inp.table[t / bs]) + off * d) };
            for (i, p) in vptrs[t - t0..t - t0 + seg].iter_mut().enumerate() {
                *p = unsafe { row0.add(i * d) };
            }
            t += seg;
        }

        // SAFETY: q_first < nq rows of qs/s/o; K/V pointers valid per the above.
        unsafe {
            s.qk_tile(qs.add(q_first * d), nqa, d, &kptrs[..nvec], kstride, sbuf.add(q_first * TILE));
        }
        for qi in q_first..nq {
            let limit = (inp.pos0 + qi / n_rep + 1).min(kend);
            let valid = (limit - t0).min(TILE);
            // SAFETY: row qi of s has TILE entries; row qi of o has d entries.
            unsafe {
                let row = sbuf.add(qi * TILE);
                for t in valid..TILE {
                    *row.add(t) = f32::NEG_INFINITY;
                }
                softmax_update(s, row, &mut st.m[qi], &mut st.l[qi], obuf.add(qi * d), d);
            }
        }
        // SAFETY: as for qk_tile; vptrs[..tlen] are valid V rows.
        unsafe {
            s.pv_tile(sbuf.add(q_first * TILE), nqa, &vptrs[..tlen], d, obuf.add(q_first * d));
        }
        t0 += TILE;
    }
}

/// Prefetches the K and V cache lines of key positions `a..b` of the pass's group.
#[inline(always)]
fn prefetch_keys<S: Simd>(s: S, inp: &PassInput, a: usize, b: usize) {
    let KvGeometry { block_size: bs, n_kv_heads: nkv, head_dim: d } = inp.geom;
    let g = inp.group;
    // Floats per cache line.
    const LINE: usize = 16;
    let mut t = a;
    while t < b {
        let off = t % bs;
        let seg = (bs - off).min(b - t);
        let blk = inp.table[t / bs] as usize;
        let kh = (blk * nkv + g) * d * bs;
        let k0 = inp.k[kh..kh + d * bs].as_ptr();
        for k in 0..d {
            let mut c = off - off % LINE;
            while c < off + seg {
                s.prefetch(k0.wrapping_add(k * bs + c));
                c += LINE;
            }
        }
        let vh = (blk * nkv + g) * bs * d;
        let v0 = inp.v[vh..vh + bs * d].as_ptr();
        let mut c = off * d;
        while c < (off + seg) * d {
            s.prefetch(v0.wrapping_add(c));
            c += LINE;
        }
        t += seg;
    }
}

/// Online-softmax step for one query over one tile of scores: updates the running max `m` and
/// sum `l`, rescales the accumulator `o` when the max grew, and replaces the scores by
/// `exp(score - m)` (0 for masked keys).
///
/// # Safety
/// `row` valid for `TILE` floats, `o` for `d`.
#[inline(always)]
unsafe fn softmax_update<S: Simd>(s: S, row: *mut f32, m: &mut f32, l: &mut f32, o: *mut f32, d: usize) {
    let nvec = TILE / S::LANES;
    // SAFETY (all blocks): within `row[..TILE]` / `o[..d]`.
    let mut vmax = s.splat(f32::NEG_INFINITY);
    for j in 0..nvec {
        vmax = s.max(vmax, unsafe { s.load(row.add(j * S::LANES)) });
    }
    let m_new = m.max(s.hmax(vmax));
    if m_new == f32::NEG_INFINITY {
        // Nothing visible yet (cannot happen for an active query, kept for robustness).
        for j in 0..nvec {
            unsafe { s.store(row.add(j * S::LANES), s.zero()) };
        }
        return;
    }
    let mv = s.splat(m_new);
    let mut vsum = s.zero();
    for j in 0..nvec {
        let p = unsafe { row.add(j * S::LANES) };
        let e = s.exp(s.sub(unsafe { s.load(p) }, mv));
        unsafe { s.store(p, e) };
        vsum = s.add(vsum, e);
    }
    if *m == f32::NEG_INFINITY {
        // First visible tile: o and l are still zero.
        *l = s.hsum(vsum);
    } else {
        let alpha = (*m - m_new).exp();
        *l = *l * alpha + s.hsum(vsum);
        if alpha != 1.0 {
            let av = s.splat(alpha);
            let mut k = 0;
            while k + S::LANES <= d {
                unsafe {
                    let p = o.add(k);
                    s.store(p, s.mul(s.load(p), av));
                }
                k += S::LANES;
            }
            while k < d {
                unsafe { *o.add(k) *= alpha };
                k += 1;
            }
        }
    }
    *m = m_new;
}

/// Calls `$f::<S, N, $c>$args` for a runtime remainder `N`: one of the listed values, else
/// `$last`. Direct calls in each arm (not a function pointer) so every instantiation is inlined
/// into the `#[target_feature]` entry point and its intrinsics become instructions.
macro_rules! dispatch_rem {
    ($n:expr, $f:ident, $c:ident, $args:tt, [$($k:literal),*], $last:literal) => {
        match $n {
            $($k => $f::<S, $k, $c> $args,)*
            _ => $f::<S, $last, $c> $args,
        }
    };
}

/// [`Simd::qk_tile`] with register blocks of `QB` queries x `KB` key vectors.
///
/// # Safety
/// See [`Simd::qk_tile`]; additionally `KB` divides `kp.len()` and `QB <= 6`.
#[inline(always)]
pub(super) unsafe fn qk_tile_impl<S: Simd, const QB: usize, const KB: usize>(
    s: S,
    q: *const f32,
    nq: usize,
    d: usize,
    kp: &[*const f32],
    kstride: usize,
    out: *mut f32,
) {
    let mut kc = 0;
    while kc < kp.len() {
        let ptrs: [*const f32; KB] = std::array::from_fn(|j| kp[kc + j]);
        let mut qi = 0;
        // SAFETY (all blocks): query rows qi.. < nq and key vectors kc.. < kp.len().
        while qi + QB <= nq {
            unsafe {
                qk_block::<S, QB, KB>(s, q.add(qi * d), d, &ptrs, kstride, out.add(qi * TILE + kc * S::LANES))
            };
            qi += QB;
        }
        if qi < nq {
            let (qp, op) = unsafe { (q.add(qi * d), out.add(qi * TILE + kc * S::LANES)) };
            unsafe { dispatch_rem!(nq - qi, qk_block, KB, (s, qp, d, &ptrs, kstride, op), [1, 2, 3, 4], 5) };
        }
        kc += KB;
    }
}

/// One register block of scores: `QB` queries x `KB * LANES` keys, accumulated over `d`.
///
/// # Safety
/// `q` valid for `QB` rows of `d`; each `kp[j] + k*kstride` valid for `LANES` floats, `k < d`;
/// `out` valid for `QB` rows (stride `TILE`) of `KB * LANES` floats.
#[inline(always)]
unsafe fn qk_block<S: Simd, const QB: usize, const KB: usize>(
    s: S,
    q: *const f32,
    d: usize,
    kp: &[*const f32; KB],
    kstride: usize,
    out: *mut f32,
) {
    let mut acc = [[s.zero(); KB]; QB];
    // SAFETY (all blocks): within the extents stated above.
    for k in 0..d {
        let kv: [S::V; KB] = std::array::from_fn(|j| unsafe { s.load(kp[j].add(k * kstride)) });
        for (i, a) in acc.iter_mut().enumerate() {
            let b = s.splat(unsafe { *q.add(i * d + k) });
            for (aj, &kj) in a.iter_mut().zip(&kv) {
                *aj = s.fma(b, kj, *aj);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for (j, &aj) in a.iter().enumerate() {
            unsafe { s.store(out.add(i * TILE + j * S::LANES), aj) };
        }
    }
}

/// [`Simd::pv_tile`] with register blocks of `QV` queries x `DV` value vectors.
///
/// # Safety
/// See [`Simd::pv_tile`]; `QV <= 4`.
#[inline(always)]
pub(super) unsafe fn pv_tile_impl<S: Simd, const QV: usize, const DV: usize>(
    s: S,
    p: *const f32,
    nq: usize,
    vp: &[*const f32],
    d: usize,
    o: *mut f32,
) {
    // Full chunks of DV vectors, then single vectors, then a scalar tail for odd head dims.
    let mut d0 = 0;
    // SAFETY (all blocks): query rows < nq, columns d0.. < d, keys < vp.len().
    while d0 + DV * S::LANES <= d {
        unsafe { pv_rows::<S, QV, DV>(s, p, nq, vp, d, d0, o) };
        d0 += DV * S::LANES;
    }
    while d0 + S::LANES <= d {
        unsafe { pv_rows::<S, QV, 1>(s, p, nq, vp, d, d0, o) };
        d0 += S::LANES;
    }
    if d0 < d {
        for i in 0..nq {
            for (t, &v) in vp.iter().enumerate() {
                let w = unsafe { *p.add(i * TILE + t) };
                for c in d0..d {
                    unsafe { *o.add(i * d + c) += w * *v.add(c) };
                }
            }
        }
    }
}

/// All query rows for one column chunk `d0..d0 + DV*LANES`.
#[inline(always)]
unsafe fn pv_rows<S: Simd, const QV: usize, const DV: usize>(
    s: S,
    p: *const f32,
    nq: usize,
    vp: &[*const f32],
    d: usize,
    d0: usize,
    o: *mut f32,
) {
    let mut qi = 0;
    // SAFETY (all blocks): forwarded extents.
    while qi + QV <= nq {
        unsafe { pv_block::<S, QV, DV>(s, p.add(qi * TILE), vp, d0, o.add(qi * d + d0), d) };
        qi += QV;
    }
    if qi < nq {
        let (pp, op) = unsafe { (p.add(qi * TILE), o.add(qi * d + d0)) };
        unsafe { dispatch_rem!(nq - qi, pv_block, DV, (s, pp, vp, d0, op, d), [1, 2], 3) };
    }
}

/// One register block of outputs: `QV` queries x `DV * LANES` columns, accumulated over keys.
///
/// # Safety
/// `p` valid for `QV` rows (stride `TILE`) of `vp.len()` floats; `vp[t] + d0` valid for
/// `DV * LANES` floats; `o` valid for `QV` rows (stride `d`) of `DV * LANES` floats.
#[inline(always)]
unsafe fn pv_block<S: Simd, const QV: usize, const DV: usize>(
    s: S,
    p: *const f32,
    vp: &[*const f32],
    d0: usize,
    o: *mut f32,
    d: usize,
) {
    // SAFETY (all blocks): within the extents stated above.
    let mut acc: [[S::V; DV]; QV] =
        std::array::from_fn(|i| std::array::from_fn(|j| unsafe { s.load(o.add(i * d + j * S::LANES)) }));
    for (t, &v) in vp.iter().enumerate() {
        let vv: [S::V; DV] = std::array::from_fn(|j| unsafe { s.load(v.add(d0 + j * S::LANES)) });
        for (i, a) in acc.iter_mut().enumerate() {
            let w = s.splat(unsafe { *p.add(i * TILE + t) });
            for (aj, &vj) in a.iter_mut().zip(&vv) {
                *aj = s.fma(w, vj, *aj);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for (j, &aj) in a.iter().enumerate() {
            unsafe { s.store(o.add(i * d + j * S::LANES), aj) };
        }
    }
}
