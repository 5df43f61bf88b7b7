//! The fast attention pass: a range of KV head groups, a run of query rows of one sequence, a
//! range of key positions; flash-attention style (online softmax over tiles of [`TILE`] keys) so
//! scores never exist for more than one tile and every K/V tile is reused by all queries of its
//! group. Tiles are the outer loop and groups the inner one, so a pass over several groups
//! streams each block's K (and V) of all heads, which is contiguous in the pool.
//!
//! A pass leaves unnormalised state (`o`, running max `m`, running sum `l`) per query vector;
//! the caller either normalises it into the output or merges it with passes over other key
//! ranges of the same queries (split-K for long decodes).

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
    /// KV head groups of this pass.
    pub groups: Range<usize>,
    /// Absolute query rows (indices into `q`'s rows).
    pub rows: Range<usize>,
    /// Sequence position of `rows.start`.
    pub pos0: usize,
    /// Key positions this pass covers; `keys.start` is a multiple of [`TILE`]. Keys beyond a
    /// row's own position are masked, so `keys.end` may exceed it.
    pub keys: Range<usize>,
}

impl PassInput<'_> {
    /// Query vectors per group: rows x heads of a group.
    pub fn nq(&self) -> usize {
        self.rows.len() * self.n_rep
    }
}

/// Per-pass buffers, reused across passes of one job. After a pass, query vector `i` of the
/// `gi`-th group of the pass (row `i / n_rep`, head `i % n_rep` of the group) is at index
/// `x = gi * nq + i`: `o[x*d..][..d]`, `m[x]`, `l[x]`.
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
    let nrows = inp.rows.len();
    let nq = inp.nq();
    let ng = inp.groups.len();
    st.reset(ng * nq, d);

    // Gather the groups' query heads, pre-scaled so the scores come out of QK directly.
    let row_stride = inp.n_heads * d;
    for (gi, g) in inp.groups.clone().enumerate() {
        for (r, i) in inp.rows.clone().enumerate() {
            let src = &inp.q[i * row_stride + g * n_rep * d..][..n_rep * d];
            let dst = &mut st.qs[(gi * nq + r * n_rep) * d..][..n_rep * d];
            for (x, &y) in dst.iter_mut().zip(src) {
                *x = y * inp.scale;
            }
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
    let k_head = |blk: u32, g: usize| (blk as usize * nkv + g) * d * bs;
    let v_head = |blk: u32, g: usize| (blk as usize * nkv + g) * bs * d;

    // A step is (tile start, group), tiles outer. Pointers are kept for this step and the
    // next: the next step's lines are prefetched from inside this step's FMA loops (spread
    // out, so the prefetches neither stall the loads nor arrive too late), since the K/V of a
    // tile come from blocks scattered over the pool, where the hardware prefetcher alone ramps
    // up too late.
    let mut kptrs = [std::ptr::null::<f32>(); TILE];
    let mut vptrs = [std::ptr::null::<f32>(); TILE];
    let mut next_k = [std::ptr::null::<f32>(); TILE];
    let mut next_v = [std::ptr::null::<f32>(); TILE];
    // Key vector j of group g's tile at t0 with tlen keys. Vectors wholly past the tile alias
    // vector 0: computed, then masked.
    let fill_k = |t0: usize, tlen: usize, g: usize, out: &mut [*const f32]| {
        for (j, p) in out.iter_mut().enumerate() {
            let t = t0 + j * S::LANES;
            let t = if t < t0 + tlen { t } else { t0 };
            // SAFETY: block id validated, offset inside the block.
            *p = unsafe { kbase.add(k_head(inp.table[t / bs], g) + t % bs) };
        }
    };
    // V rows, one block segment at a time (one division per block, not per key).
    let fill_v = |t0: usize, tlen: usize, g: usize, out: &mut [*const f32]| {
        let mut t = t0;
        while t < t0 + tlen {
            let off = t % bs;
            let seg = (bs - off).min(t0 + tlen - t);
            // SAFETY: block id validated, slots off..off + seg inside the block.
            let row0 = unsafe { vbase.add(v_head(inp.table[t / bs], g) + off * d) };
            for (i, p) in out[t - t0..t - t0 + seg].iter_mut().enumerate() {
                *p = unsafe { row0.add(i * d) };
            }
            t += seg;
        }
    };
    let step_after = |t0: usize, gi: usize| if gi + 1 < ng { (t0, gi + 1) } else { (t0 + TILE, 0) };

    let qs = st.qs.as_ptr();
    let sbuf = st.s.as_mut_ptr();
    let obuf = st.o.as_mut_ptr();
    let kpack = st.kpack.as_mut_ptr();

    let (mut t0, mut gi) = (inp.keys.start, 0);
    if t0 < kend && ng > 0 {
        let tlen = TILE.min(kend - t0);
        if direct {
            fill_k(t0, tlen, inp.groups.start, &mut kptrs[..nvec]);
        }
        fill_v(t0, tlen, inp.groups.start, &mut vptrs[..tlen]);
    }
    while t0 < kend && ng > 0 {
        let g = inp.groups.start + gi;
        let tlen = TILE.min(kend - t0);
        let (nt0, ngi) = step_after(t0, gi);
        let next_len = kend.saturating_sub(nt0).min(TILE);
        let ng_abs = inp.groups.start + ngi;
        // Rows whose position is below t0 see none of this tile; since positions increase with
        // the row, the active queries are a suffix.
        let q_first = t0.saturating_sub(inp.pos0) * n_rep;
        let nqa = nq - q_first;
        let x0 = gi * nq + q_first;

        if next_len > 0 {
            fill_v(nt0, next_len, ng_abs, &mut next_v[..next_len]);
        }
        let kstride;
        let pf_k: &[*const f32];
        if direct {
            if next_len > 0 {
                fill_k(nt0, next_len, ng_abs, &mut next_k[..nvec]);
            }
            pf_k = &next_k[..if next_len > 0 { nvec } else { 0 }];
            kstride = bs;
        } else {
            let mut t = t0;
            while t < t0 + tlen {
                let off = t % bs;
                let seg = (bs - off).min(t0 + tlen - t);
                let src = k_head(inp.table[t / bs], g) + off;
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
            // Packing reads the next step's K rows in short segments: fetch them in one go.
            prefetch_k_rows(s, inp, ng_abs, nt0, nt0 + next_len);
            pf_k = &[];
            kstride = TILE;
        }

        // SAFETY: x0 + nqa <= ng * nq rows of qs/s/o; K/V pointers valid per the above;
        // prefetch pointers are only hints.
        unsafe {
            s.qk_tile(qs.add(x0 * d), nqa, d, &kptrs[..nvec], kstride, pf_k, sbuf.add(x0 * TILE));
        }
        for qi in q_first..nq {
            let limit = (inp.pos0 + qi / n_rep + 1).min(kend);
            let valid = (limit - t0).min(TILE);
            let x = gi * nq + qi;
            // SAFETY: row x of s has TILE entries; row x of o has d entries.
            unsafe {
                let row = sbuf.add(x * TILE);
                for t in valid..TILE {
                    *row.add(t) = f32::NEG_INFINITY;
                }
                softmax_update(s, row, &mut st.m[x], &mut st.l[x], obuf.add(x * d), d);
            }
        }
        // SAFETY: as for qk_tile; vptrs[..tlen] are valid V rows.
        unsafe {
            s.pv_tile(sbuf.add(x0 * TILE), nqa, &vptrs[..tlen], &next_v[..next_len], d, obuf.add(x0 * d));
        }
        std::mem::swap(&mut kptrs, &mut next_k);
        std::mem::swap(&mut vptrs, &mut next_v);
        (t0, gi) = (nt0, ngi);
    }
}

/// Prefetches the K cache lines of key positions `a..b` of group `g`.
#[inline(always)]
fn prefetch_k_rows<S: Simd>(s: S, inp: &PassInput, g: usize, a: usize, b: usize) {
    let KvGeometry { block_size: bs, n_kv_heads: nkv, head_dim: d } = inp.geom;
    let mut t = a;
    while t < b {
        let off = t % bs;
        let seg = (bs - off).min(b - t);
        let kh = (inp.table[t / bs] as usize * nkv + g) * d * bs;
        let k0 = inp.k[kh..kh + d * bs].as_ptr();
        for k in 0..d {
            let mut c = off - off % LINE;
            while c < off + seg {
                s.prefetch(k0.wrapping_add(k * bs + c));
                c += LINE;
            }
        }
        t += seg;
    }
}

/// Floats per cache line (64 bytes), the prefetch granularity.
const LINE: usize = 16;

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
// Raw pointers and extents of a register-blocked kernel; a struct would only obscure them.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn qk_tile_impl<S: Simd, const QB: usize, const KB: usize>(
    s: S,
    q: *const f32,
    nq: usize,
    d: usize,
    kp: &[*const f32],
    kstride: usize,
    pf: &[*const f32],
    out: *mut f32,
) {
    let mut kc = 0;
    while kc < kp.len() {
        let ptrs: [*const f32; KB] = std::array::from_fn(|j| kp[kc + j]);
        // Only the first query block prefetches: later blocks find the lines already coming.
        let mut pfp: Option<[*const f32; KB]> = (!pf.is_empty()).then(|| std::array::from_fn(|j| pf[kc + j]));
        let mut qi = 0;
        // SAFETY (all blocks): query rows qi.. < nq and key vectors kc.. < kp.len().
        while qi + QB <= nq {
            let op = unsafe { out.add(qi * TILE + kc * S::LANES) };
            unsafe { qk_block::<S, QB, KB>(s, q.add(qi * d), d, &ptrs, kstride, pfp.take(), op) };
            qi += QB;
        }
        if qi < nq {
            let (qp, op) = unsafe { (q.add(qi * d), out.add(qi * TILE + kc * S::LANES)) };
            let pfp = pfp.take();
            unsafe {
                dispatch_rem!(nq - qi, qk_block, KB, (s, qp, d, &ptrs, kstride, pfp, op), [1, 2, 3, 4], 5)
            };
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
    pf: Option<[*const f32; KB]>,
    out: *mut f32,
) {
    let mut acc = [[s.zero(); KB]; QB];
    // SAFETY (all blocks): within the extents stated above.
    for k in 0..d {
        if let Some(pf) = pf {
            for p in pf {
                s.prefetch(p.wrapping_add(k * kstride));
            }
        }
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
    pf: &[*const f32],
    d: usize,
    o: *mut f32,
) {
    // Full chunks of DV vectors, then single vectors, then a scalar tail for odd head dims.
    let mut d0 = 0;
    // SAFETY (all blocks): query rows < nq, columns d0.. < d, keys < vp.len().
    while d0 + DV * S::LANES <= d {
        unsafe { pv_rows::<S, QV, DV>(s, p, nq, vp, pf, d, d0, o) };
        d0 += DV * S::LANES;
    }
    while d0 + S::LANES <= d {
        unsafe { pv_rows::<S, QV, 1>(s, p, nq, vp, pf, d, d0, o) };
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
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv_rows<S: Simd, const QV: usize, const DV: usize>(
    s: S,
    p: *const f32,
    nq: usize,
    vp: &[*const f32],
    pf: &[*const f32],
    d: usize,
    d0: usize,
    o: *mut f32,
) {
    let mut qi = 0;
    // Only the first query block prefetches the next tile's rows.
    let mut pf = pf;
    // SAFETY (all blocks): forwarded extents.
    while qi + QV <= nq {
        unsafe { pv_block::<S, QV, DV>(s, p.add(qi * TILE), vp, pf, d0, o.add(qi * d + d0), d) };
        pf = &[];
        qi += QV;
    }
    if qi < nq {
        let (pp, op) = unsafe { (p.add(qi * TILE), o.add(qi * d + d0)) };
        unsafe { dispatch_rem!(nq - qi, pv_block, DV, (s, pp, vp, pf, d0, op, d), [1, 2], 3) };
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
    pf: &[*const f32],
    d0: usize,
    o: *mut f32,
    d: usize,
) {
    // SAFETY (all blocks): within the extents stated above.
    let mut acc: [[S::V; DV]; QV] =
        std::array::from_fn(|i| std::array::from_fn(|j| unsafe { s.load(o.add(i * d + j * S::LANES)) }));
    for (t, &v) in vp.iter().enumerate() {
        if let Some(&n) = pf.get(t) {
            for c in (0..DV * S::LANES).step_by(LINE) {
                s.prefetch(n.wrapping_add(d0 + c));
            }
        }
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
