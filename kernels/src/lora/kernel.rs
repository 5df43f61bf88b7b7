//! The two inner loops of the segmented LoRA op on f32 adapters, written once against [`Simd`]
//! and instantiated per instruction set (int8 adapters take `int8.rs`): shrink (`t = x · Aᵀ` for a block of rows and rank rows) and expand
//! (`y = g ∘ (y + scale · t · Bᵀ)` for a block of rows and output columns).
//!
//! Batch invariance lives here. Every output element has exactly one accumulation chain whose
//! operation sequence depends only on the shapes of its own adapter (in_features, rank), never
//! on how many rows or ranks share a register tile, where the element sits in a tile, or which
//! thread runs it:
//! - shrink: `t[i, j]` = one vector accumulator of `fma(x[i, k..k+L], A[j, k..k+L])` over k in
//!   order (the tail masked to zeros), then one fixed-tree horizontal sum;
//! - expand: each lane of `y[i, o..o+L]` = `fma(t[i, j], Bᵀ[j, o], acc)` over j in order from
//!   zero, then `fma(acc, scale, y)`, then `· g[o]`. The lanes never mix.
//!
//! Register tiles: shrink does R rows × 4 rank rows (then single rows × 8 rank rows, the decode
//! case), reusing each loaded x vector for 4 rank rows and each A vector for R rows. Expand works
//! on tiles of 4 vectors of output columns: B's `[4·L, rank]` block is transposed once into a
//! `[rank][4·L]` scratch (in-register L×L transposes), then R rows at a time accumulate with a
//! broadcast of `t[i, j]` against 4 contiguous scratch vectors, so a tile's B is read from memory
//! once however many rows the segment has.

// Tiles index several register arrays (accumulators, loaded vectors) by the same row/rank index.
#![allow(clippy::needless_range_loop)]

use std::cell::Cell;
use std::ops::Range;

use super::simd::Portable;
use super::simd::Simd;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::Isa;

/// Vectors of output columns per expand tile.
const TILE_VECS: usize = 4;
/// How far ahead (in floats of B) expand prefetches into L2, at least: 16 KB. At rank 64 a
/// transposed block reads B with a 256-byte stride, which the hardware prefetchers follow poorly;
/// with this, decode from DRAM went from ~10 to ~30 GB/s (2 threads, Zen 4 VM: the machine's
/// plain streaming read rate). Narrower or wider distances and an L1 hint measured the same or
/// worse.
const PREFETCH_FLOATS: usize = 4096;
/// How far ahead (in elements) along each rank row the decode shrink prefetches.
const SHRINK_PREFETCH: usize = 1024;
/// Asks for the cache lines of `bytes` bytes from `p` to be brought into L2 (x86; a no-op
/// elsewhere). Never faults. The driver calls it on the next work item's weights before running
/// the current one: at decode every item streams a different adapter's weights from DRAM, and
/// a few KB per stream is too short for the hardware prefetchers to ramp up.
#[inline]
pub(super) fn prefetch_range<T>(p: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = len * std::mem::size_of::<T>();
        let start = p.cast::<u8>();
        for off in (0..bytes).step_by(64) {
            // SAFETY: prefetch never faults, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    start.wrapping_add(off).cast(),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// One shrink work item: `t[i * ts + c] = Σ_k x[i * in_features + k] · a[c][k]` for
/// `i < rows`, `c < a.len()`.
pub(super) struct ShrinkArgs<'a> {
    /// First row of the item; rows are `in_features` apart.
    pub x: *const f32,
    pub in_features: usize,
    pub rows: usize,
    /// The rank rows (rows of the A matrices, possibly of several sites), each `in_features` long.
    pub a: &'a [&'a [f32]],
    /// Where `t[0, 0]` of the item goes; rows are `ts` apart.
    pub t: *mut f32,
    pub ts: usize,
}

/// One expand work item: for `i < rows` and `o` in `outs`:
/// `y[i * out_features + o] = g[o] · (y[..] + scale · Σ_j t[i * ts + j] · B[o, j])`
/// (no `g` factor when `g` is `None`).
pub(super) struct ExpandArgs<'a> {
    pub t: *const f32,
    pub ts: usize,
    pub rows: usize,
    pub rank: usize,
    /// `[out_features, rank]` row-major: `B[o, j] = b[o * rank + j]`.
    pub b: &'a [f32],
    pub outs: Range<usize>,
    pub out_features: usize,
    /// Row 0, column 0 of the item's rows of `y`.
    pub y: *mut f32,
    pub scale: f32,
    pub g: Option<&'a [f32]>,
}

/// Runs one shrink item with the given instruction set.
///
/// # Safety
/// `isa` must be available on this CPU; `x` valid for `rows` rows of `in_features` floats; every
/// `a[c]` at least `in_features` long; `t` valid for writing the item's `rows × a.len()` entries
/// and no other thread touching them.
pub(super) unsafe fn shrink(isa: Isa, p: &ShrinkArgs) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: availability and pointers are the caller's contract.
        Isa::Avx512 => unsafe { shrink_avx512(p) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { shrink_avx2(p) },
        // SAFETY: as above.
        _ => unsafe { shrink_impl::<_, 2>(Portable, p) },
    }
}

/// Runs one expand item with the given instruction set.
///
/// # Safety
/// `isa` must be available; `t` valid for `rows` rows (stride `ts`) of `rank` floats; `b` holds
/// `out_features × rank` values; `outs` within `0..out_features`; `g`, when set, `out_features` long;
/// `y` valid for the item's `rows × outs` elements (row stride `out_features`) and no other
/// thread touching them.
pub(super) unsafe fn expand(isa: Isa, p: &ExpandArgs) {
    // The transposed-B scratch is reused per thread; `take` (not a borrow) keeps a re-entrant
    // call safe, it just allocates its own.
    thread_local! {
        static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }
    let mut bt = SCRATCH.with(Cell::take);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: availability and pointers are the caller's contract.
        Isa::Avx512 => unsafe { expand_avx512(p, &mut bt) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { expand_avx2(p, &mut bt) },
        // SAFETY: as above.
        _ => unsafe { expand_impl::<_, 2>(Portable, p, &mut bt) },
    }
    SCRATCH.with(|c| c.set(bt));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn shrink_avx512(p: &ShrinkArgs) {
    // SAFETY: this function only runs where AVX-512F is available; the rest is forwarded.
    unsafe { shrink_impl::<_, 4>(Avx512::new(), p) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn shrink_avx2(p: &ShrinkArgs) {
    // SAFETY: this function only runs where AVX2 and FMA are available; the rest is forwarded.
    unsafe { shrink_impl::<_, 2>(Avx2::new(), p) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn expand_avx512(p: &ExpandArgs, bt: &mut Vec<f32>) {
    // SAFETY: as in `shrink_avx512`.
    unsafe { expand_impl::<_, 4>(Avx512::new(), p, bt) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn expand_avx2(p: &ExpandArgs, bt: &mut Vec<f32>) {
    // SAFETY: as in `shrink_avx2`.
    unsafe { expand_impl::<_, 2>(Avx2::new(), p, bt) }
}

/// Shrink with `R`-row register tiles (then single rows, the decode case).
///
/// # Safety
/// See [`shrink`].
#[inline(always)]
unsafe fn shrink_impl<S: Simd, const R: usize>(s: S, p: &ShrinkArgs) {
    let nr = p.a.len();
    let mut i = 0;
    while i + R <= p.rows {
        let mut j = 0;
        while j + 4 <= nr {
            // SAFETY: rows i..i+R and rank rows j..j+4 are inside the item.
            unsafe { shrink_tile::<S, R, 4>(s, p, i, j) };
            j += 4;
        }
        while j < nr {
            // SAFETY: as above.
            unsafe { shrink_tile::<S, R, 1>(s, p, i, j) };
            j += 1;
        }
        i += R;
    }
    while i < p.rows {
        // A lone row streams its rank rows (from DRAM at decode): 8 independent chains keep
        // the FMA latency hidden while the loads are in flight.
        let mut j = 0;
        while j + 8 <= nr {
            // SAFETY: row i and rank rows j..j+8 are inside the item.
            unsafe { shrink_tile::<S, 1, 8>(s, p, i, j) };
            j += 8;
        }
        while j < nr {
            // SAFETY: as above.
            unsafe { shrink_tile::<S, 1, 1>(s, p, i, j) };
            j += 1;
        }
        i += 1;
    }
}

/// `t[i0 + r, j0 + q]` for `r < R`, `q < J`: one accumulator per entry (see the module docs).
///
/// # Safety
/// Rows `i0..i0 + R` and rank rows `j0..j0 + J` are inside the item (see [`shrink`]).
#[inline(always)]
unsafe fn shrink_tile<S: Simd, const R: usize, const J: usize>(s: S, p: &ShrinkArgs, i0: usize, j0: usize) {
    let n = p.in_features;
    let l = S::LANES;
    let mut x = [p.x; R];
    for (r, xr) in x.iter_mut().enumerate() {
        // SAFETY: row i0 + r is inside x.
        *xr = unsafe { p.x.add((i0 + r) * n) };
    }
    let mut a = [std::ptr::null::<f32>(); J];
    for (q, aq) in a.iter_mut().enumerate() {
        *aq = p.a[j0 + q].as_ptr();
    }
    let mut acc = [[s.zero(); J]; R];
    let full = n - n % l;
    let mut k = 0;
    // SAFETY (loads): k + LANES <= full <= n, and every row read is n floats long.
    while k < full {
        // A lone row (decode) reads its rank rows straight from DRAM; they are short streams,
        // so ask for the lines ahead (the next rank rows, which follow contiguously).
        if R == 1 {
            for q in 0..J {
                s.prefetch(a[q].wrapping_add(k + SHRINK_PREFETCH).cast());
            }
        }
        let mut xv = [s.zero(); R];
        for r in 0..R {
            xv[r] = unsafe { s.load(x[r].add(k)) };
        }
        for q in 0..J {
            let av = unsafe { s.load(a[q].add(k)) };
            for r in 0..R {
                acc[r][q] = s.fma(xv[r], av, acc[r][q]);
            }
        }
        k += l;
    }
    if k < n {
        let m = n - k;
        let mut xv = [s.zero(); R];
        for r in 0..R {
            // SAFETY: m floats remain in the row.
            xv[r] = unsafe { s.load_partial(x[r].add(k), m) };
        }
        for q in 0..J {
            // SAFETY: as above.
            let av = unsafe { s.load_partial(a[q].add(k), m) };
            for r in 0..R {
                acc[r][q] = s.fma(xv[r], av, acc[r][q]);
            }
        }
    }
    for r in 0..R {
        for q in 0..J {
            // SAFETY: entry (i0 + r, j0 + q) is inside the item's part of t.
            unsafe { *p.t.add((i0 + r) * p.ts + j0 + q) = s.hsum(acc[r][q]) };
        }
    }
}

/// Expand with `R`-row register tiles over tiles of `TILE_VECS` vectors of output columns.
///
/// # Safety
/// See [`expand`].
#[inline(always)]
unsafe fn expand_impl<S: Simd, const R: usize>(s: S, p: &ExpandArgs, bt: &mut Vec<f32>) {
    let l = S::LANES;
    let tw = TILE_VECS * l;
    let r = p.rank;
    if bt.len() < r * tw {
        bt.resize(r * tw, 0.0);
    }
    let btp = bt.as_mut_ptr();
    // Prefetch distance: whole tiles (so a block's lines map onto the same block ahead), at least
    // PREFETCH_FLOATS.
    let tile_floats = (tw * r).max(1);
    let pf = PREFETCH_FLOATS.next_multiple_of(tile_floats);
    let mut o0 = p.outs.start;
    while o0 < p.outs.end {
        let valid = (p.outs.end - o0).min(tw);
        // SAFETY: the tile's columns are inside `outs`, hence inside B; bt holds r * tw floats.
        unsafe { fill_tile_f32(s, p.b, r, o0, valid, pf, btp) };
        // SAFETY: bt was just filled for this tile.
        unsafe { expand_rows::<S, R>(s, p, &Scratch { bt: btp, tw }, o0, valid) };
        o0 += tw;
    }
}

/// All rows of an item for one tile: `R`-row register tiles, then single rows.
///
/// # Safety
/// As [`expand_tile`].
#[inline(always)]
unsafe fn expand_rows<S: Simd, const R: usize>(s: S, p: &ExpandArgs, b: &Scratch, o0: usize, valid: usize) {
    let mut i = 0;
    while i + R <= p.rows {
        // SAFETY: rows i..i+R inside the item; `b` serves this tile.
        unsafe { expand_tile::<S, R>(s, p, b, i, o0, valid) };
        i += R;
    }
    while i < p.rows {
        // SAFETY: as above.
        unsafe { expand_tile::<S, 1>(s, p, b, i, o0, valid) };
        i += 1;
    }
}

/// The tile scratch: `rank` rows of `tw` floats.
struct Scratch {
    bt: *const f32,
    tw: usize,
}

impl Scratch {
    /// `B[o0 + v·L .. + L, j]` of the current tile.
    ///
    /// # Safety
    /// `j < rank`, `v < TILE_VECS`, and the scratch holds the current tile.
    #[inline(always)]
    unsafe fn load<S: Simd>(&self, s: S, j: usize, v: usize) -> S::V {
        // SAFETY: scratch row j has tw floats.
        unsafe { s.load(self.bt.add(j * self.tw + v * S::LANES)) }
    }
}

/// Transposes B's rows `o0..o0 + valid` (f32, `[out, rank]`) into the tile scratch `bt`
/// (`rank` rows of `TILE_VECS · LANES`), zeros past `valid`; prefetches the block `pf` floats
/// ahead.
///
/// # Safety
/// Rows `o0..o0 + valid` exist in `b`; `bt` is valid for `rank · TILE_VECS · LANES` floats.
#[inline(always)]
unsafe fn fill_tile_f32<S: Simd>(
    s: S,
    b: &[f32],
    r: usize,
    o0: usize,
    valid: usize,
    pf: usize,
    btp: *mut f32,
) {
    let l = S::LANES;
    let tw = TILE_VECS * l;
    for v in 0..TILE_VECS {
        let rows = valid.saturating_sub(v * l).min(l);
        // SAFETY: bt holds r * tw floats.
        let dst = unsafe { btp.add(v * l) };
        if rows == 0 {
            for j in 0..r {
                // SAFETY: as above.
                unsafe { s.store(dst.add(j * tw), s.zero()) };
            }
            continue;
        }
        // SAFETY: output o0 + v*l < out_features, so its B row exists.
        let src = unsafe { b.as_ptr().add((o0 + v * l) * r) };
        let mut jb = 0;
        while jb < r {
            // The lines this block reads, in the tile `pf` floats ahead (see PREFETCH_FLOATS).
            for i in 0..rows {
                s.prefetch(src.wrapping_add(pf + i * r + jb));
            }
            // SAFETY: `rows` B rows of `r` floats from `src`, block columns jb..jb+cols; the
            // destination rows jb..jb+cols of bt.
            unsafe { s.transpose(src.add(jb), r, rows, (r - jb).min(l), dst.add(jb * tw), tw) };
            jb += l;
        }
    }
}

/// Rows `i0..i0 + R`, output columns `o0..o0 + valid` (`valid <= TILE_VECS · LANES`).
///
/// # Safety
/// See [`expand`]; `bt` holds the transposed tile (`rank` rows of `TILE_VECS · LANES`).
#[inline(always)]
unsafe fn expand_tile<S: Simd, const R: usize>(
    s: S,
    p: &ExpandArgs,
    b_src: &Scratch,
    i0: usize,
    o0: usize,
    valid: usize,
) {
    let l = S::LANES;
    let mut t = [p.t; R];
    for (r, tr) in t.iter_mut().enumerate() {
        // SAFETY: row i0 + r is inside the item.
        *tr = unsafe { p.t.add((i0 + r) * p.ts) };
    }
    let mut acc = [[s.zero(); TILE_VECS]; R];
    for j in 0..p.rank {
        let mut b = [s.zero(); TILE_VECS];
        for (v, bv) in b.iter_mut().enumerate() {
            // SAFETY: j < rank, v < TILE_VECS, `b_src` set up for this tile.
            *bv = unsafe { b_src.load(s, j, v) };
        }
        for r in 0..R {
            // SAFETY: j < rank and t rows hold rank floats.
            let tj = unsafe { *t[r].add(j) };
            let tv = s.splat(tj);
            for v in 0..TILE_VECS {
                acc[r][v] = s.fma(tv, b[v], acc[r][v]);
            }
        }
    }
    let sc = s.splat(p.scale);
    for r in 0..R {
        // SAFETY: row i0 + r of the item's y.
        let yr = unsafe { p.y.add((i0 + r) * p.out_features + o0) };
        for v in 0..TILE_VECS {
            let lanes = valid.saturating_sub(v * l).min(l);
            if lanes == 0 {
                break;
            }
            // SAFETY: columns o0 + v*l .. + lanes are inside `outs`, so inside y's row and g.
            unsafe {
                let yp = yr.add(v * l);
                let mut yv = if lanes == l { s.load(yp) } else { s.load_partial(yp, lanes) };
                yv = s.fma(acc[r][v], sc, yv);
                if let Some(g) = p.g {
                    let gp = g.as_ptr().add(o0 + v * l);
                    let gv = if lanes == l { s.load(gp) } else { s.load_partial(gp, lanes) };
                    yv = s.mul(gv, yv);
                }
                if lanes == l {
                    s.store(yp, yv);
                } else {
                    s.store_partial(yp, yv, lanes);
                }
            }
        }
    }
}
