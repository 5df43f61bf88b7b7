//! The two inner loops of the segmented LoRA op, written once against [`Simd`] and instantiated
//! per instruction set: shrink (`t = x · Aᵀ` for a block of rows and rank rows) and expand
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
/// How far ahead along each rank row the int8 expand prefetches.
const INT8_PREFETCH_BYTES: usize = 256;
/// Up to this many rows per item, the int8 expand converts Bᵀ straight into registers; beyond,
/// once per tile into the scratch.
const INT8_DIRECT_ROWS: usize = 4;

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

/// A weight element the kernels read: f32 as stored, or int8 converted exactly to f32 (its row
/// scale is applied once per dot product or per tile, outside the inner loops).
pub(super) trait Weight: Copy {
    /// # Safety
    /// As [`Simd::load`] (`LANES` elements readable at `p`).
    unsafe fn load<S: Simd>(s: S, p: *const Self) -> S::V;
    /// # Safety
    /// As [`Simd::load_partial`] (`n <= LANES` elements readable at `p`).
    unsafe fn load_partial<S: Simd>(s: S, p: *const Self, n: usize) -> S::V;
}

impl Weight for f32 {
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const f32) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { s.load(p) }
    }
    #[inline(always)]
    unsafe fn load_partial<S: Simd>(s: S, p: *const f32, n: usize) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { s.load_partial(p, n) }
    }
}

impl Weight for i8 {
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const i8) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { s.load_i8(p) }
    }
    #[inline(always)]
    unsafe fn load_partial<S: Simd>(s: S, p: *const i8, n: usize) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { s.load_i8_partial(p, n) }
    }
}

/// One shrink work item: `t[i * ts + c] = scales[c] · Σ_k x[i * in_features + k] · a[c][k]`
/// for `i < rows`, `c < a.len()` (no scale factor when `scales` is `None`).
pub(super) struct ShrinkArgs<'a, W> {
    /// First row of the item; rows are `in_features` apart.
    pub x: *const f32,
    pub in_features: usize,
    pub rows: usize,
    /// The rank rows (rows of the A matrices, possibly of several sites), each `in_features` long.
    pub a: &'a [&'a [W]],
    /// One factor per rank row (int8 rows), applied to the finished dot product.
    pub scales: Option<&'a [f32]>,
    /// Where `t[0, 0]` of the item goes; rows are `ts` apart.
    pub t: *mut f32,
    pub ts: usize,
}

/// B of an expand item.
#[derive(Clone, Copy)]
pub(super) enum ExpandB<'a> {
    /// `[out_features, rank]` row-major: `B[o, j] = b[o * rank + j]`.
    F32(&'a [f32]),
    /// `[rank, out_features]` row-major: `B[o, j] = scales[j] · bt[j * out_features + o]`.
    Int8 { bt: &'a [i8], scales: &'a [f32] },
}

/// One expand work item: for `i < rows` and `o` in `outs`:
/// `y[i * out_features + o] = g[o] · (y[..] + scale · Σ_j t[i * ts + j] · B[o, j])`
/// (no `g` factor when `g` is `None`).
pub(super) struct ExpandArgs<'a> {
    pub t: *const f32,
    pub ts: usize,
    pub rows: usize,
    pub rank: usize,
    pub b: ExpandB<'a>,
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
pub(super) unsafe fn shrink<W: Weight>(isa: Isa, p: &ShrinkArgs<W>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: availability and pointers are the caller's contract.
        Isa::Avx512 => unsafe { shrink_avx512(p) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { shrink_avx2(p) },
        // SAFETY: as above.
        _ => unsafe { shrink_impl::<_, _, 2>(Portable, p) },
    }
}

/// Runs one expand item with the given instruction set.
///
/// # Safety
/// `isa` must be available; `t` valid for `rows` rows (stride `ts`) of `rank` floats; `b` holds
/// `out_features × rank` values (and `rank` scales); `outs` within `0..out_features`; `g`, when set, `out_features` long;
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
unsafe fn shrink_avx512<W: Weight>(p: &ShrinkArgs<W>) {
    // SAFETY: this function only runs where AVX-512F is available; the rest is forwarded.
    unsafe { shrink_impl::<_, _, 4>(Avx512::new(), p) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn shrink_avx2<W: Weight>(p: &ShrinkArgs<W>) {
    // SAFETY: this function only runs where AVX2 and FMA are available; the rest is forwarded.
    unsafe { shrink_impl::<_, _, 2>(Avx2::new(), p) }
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
unsafe fn shrink_impl<S: Simd, W: Weight, const R: usize>(s: S, p: &ShrinkArgs<W>) {
    let nr = p.a.len();
    let mut i = 0;
    while i + R <= p.rows {
        let mut j = 0;
        while j + 4 <= nr {
            // SAFETY: rows i..i+R and rank rows j..j+4 are inside the item.
            unsafe { shrink_tile::<S, W, R, 4>(s, p, i, j) };
            j += 4;
        }
        while j < nr {
            // SAFETY: as above.
            unsafe { shrink_tile::<S, W, R, 1>(s, p, i, j) };
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
            unsafe { shrink_tile::<S, W, 1, 8>(s, p, i, j) };
            j += 8;
        }
        while j < nr {
            // SAFETY: as above.
            unsafe { shrink_tile::<S, W, 1, 1>(s, p, i, j) };
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
unsafe fn shrink_tile<S: Simd, W: Weight, const R: usize, const J: usize>(
    s: S,
    p: &ShrinkArgs<W>,
    i0: usize,
    j0: usize,
) {
    let n = p.in_features;
    let l = S::LANES;
    let mut x = [p.x; R];
    for (r, xr) in x.iter_mut().enumerate() {
        // SAFETY: row i0 + r is inside x.
        *xr = unsafe { p.x.add((i0 + r) * n) };
    }
    let mut a = [std::ptr::null::<W>(); J];
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
            let av = unsafe { W::load(s, a[q].add(k)) };
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
            let av = unsafe { W::load_partial(s, a[q].add(k), m) };
            for r in 0..R {
                acc[r][q] = s.fma(xv[r], av, acc[r][q]);
            }
        }
    }
    for r in 0..R {
        for q in 0..J {
            let dot = s.hsum(acc[r][q]);
            let v = p.scales.map_or(dot, |sc| sc[j0 + q] * dot);
            // SAFETY: entry (i0 + r, j0 + q) is inside the item's part of t.
            unsafe { *p.t.add((i0 + r) * p.ts + j0 + q) = v };
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
        match p.b {
            ExpandB::F32(b) => {
                // SAFETY: the tile's columns are inside `outs`, hence inside B; bt holds r * tw
                // floats.
                unsafe { fill_tile_f32(s, b, r, o0, valid, pf, btp) };
                // SAFETY: bt was just filled for this tile.
                unsafe { expand_rows::<S, R, _>(s, p, &Scratch { bt: btp, tw }, None, o0, valid) };
            }
            // Few rows: convert straight from Bᵀ into the registers (a scratch copy would cost
            // more than it saves); the values are the same, so are the results.
            ExpandB::Int8 { bt: q, scales } if p.rows <= INT8_DIRECT_ROWS => {
                for j in 0..r {
                    s.prefetch(q.as_ptr().wrapping_add(j * p.out_features + o0 + INT8_PREFETCH_BYTES).cast());
                }
                let tile = q.as_ptr().wrapping_add(o0);
                if valid == tw {
                    // A whole tile: straight-line loads, no lane checks in the inner loop.
                    let full = Int8FullTile { q: tile, out_features: p.out_features };
                    // SAFETY: all `tw` columns from o0 are inside `outs`, hence inside Bᵀ's rows.
                    unsafe { expand_rows::<S, R, _>(s, p, &full, Some(scales), o0, valid) };
                } else {
                    let direct = Int8Direct { q: q.as_ptr(), out_features: p.out_features, o0, valid };
                    // SAFETY: the tile's columns are inside `outs`, hence inside Bᵀ's rows.
                    unsafe { expand_rows::<S, R, _>(s, p, &direct, Some(scales), o0, valid) };
                }
            }
            ExpandB::Int8 { bt: q, scales } => {
                // SAFETY: as in the f32 arm.
                unsafe { fill_tile_i8(s, q, r, p.out_features, o0, valid, btp) };
                // SAFETY: bt was just filled for this tile.
                unsafe { expand_rows::<S, R, _>(s, p, &Scratch { bt: btp, tw }, Some(scales), o0, valid) };
            }
        }
        o0 += tw;
    }
}

/// All rows of an item for one tile: `R`-row register tiles, then single rows.
///
/// # Safety
/// As [`expand_tile`].
#[inline(always)]
unsafe fn expand_rows<S: Simd, const R: usize, B: TileB<S>>(
    s: S,
    p: &ExpandArgs,
    b: &B,
    scales: Option<&[f32]>,
    o0: usize,
    valid: usize,
) {
    let mut i = 0;
    while i + R <= p.rows {
        // SAFETY: rows i..i+R inside the item; `b` serves this tile.
        unsafe { expand_tile::<S, R, B>(s, p, b, scales, i, o0, valid) };
        i += R;
    }
    while i < p.rows {
        // SAFETY: as above.
        unsafe { expand_tile::<S, 1, B>(s, p, b, scales, i, o0, valid) };
        i += 1;
    }
}

/// Where an expand tile reads `B[o0 + v·L .. + L, j]` as f32 (unscaled for int8).
trait TileB<S: Simd> {
    /// # Safety
    /// `j < rank`, `v < TILE_VECS`, and the tile was set up for the current `o0`.
    unsafe fn load(&self, s: S, j: usize, v: usize) -> S::V;
}

/// The tile scratch: `rank` rows of `tw` floats.
struct Scratch {
    bt: *const f32,
    tw: usize,
}

impl<S: Simd> TileB<S> for Scratch {
    #[inline(always)]
    unsafe fn load(&self, s: S, j: usize, v: usize) -> S::V {
        // SAFETY: scratch row j has tw floats.
        unsafe { s.load(self.bt.add(j * self.tw + v * S::LANES)) }
    }
}

/// Bᵀ in int8 itself for a whole tile: rank row `j`, columns `v·L ..` from the tile start `q`.
struct Int8FullTile {
    q: *const i8,
    out_features: usize,
}

impl<S: Simd> TileB<S> for Int8FullTile {
    #[inline(always)]
    unsafe fn load(&self, s: S, j: usize, v: usize) -> S::V {
        // SAFETY: the whole tile lies inside rank row j (caller contract).
        unsafe { s.load_i8(self.q.add(j * self.out_features + v * S::LANES)) }
    }
}

/// Bᵀ in int8 itself: rank row `j`, columns `o0 + v·L ..`, zeros past `valid`.
struct Int8Direct {
    q: *const i8,
    out_features: usize,
    o0: usize,
    valid: usize,
}

impl<S: Simd> TileB<S> for Int8Direct {
    #[inline(always)]
    unsafe fn load(&self, s: S, j: usize, v: usize) -> S::V {
        let l = S::LANES;
        let lanes = self.valid.saturating_sub(v * l).min(l);
        // SAFETY: `lanes` values from column o0 + v*l are inside rank row j (caller contract).
        unsafe {
            let p = self.q.add(j * self.out_features + self.o0 + v * l);
            match lanes {
                n if n == l => s.load_i8(p),
                0 => s.zero(),
                n => s.load_i8_partial(p, n),
            }
        }
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

/// Converts Bᵀ's columns `o0..o0 + valid` (int8, `[rank, out_features]`) into the tile scratch
/// `bt` as f32 (exact; the row scales are applied with `t`), zeros past `valid`. Each rank row
/// of the tile is one contiguous run of `valid` bytes.
///
/// # Safety
/// `o0 + valid <= out_features`; `btq` holds `rank × out_features` values; `btp` is valid for
/// `rank · TILE_VECS · LANES` floats.
#[inline(always)]
unsafe fn fill_tile_i8<S: Simd>(
    s: S,
    btq: &[i8],
    rank: usize,
    out_features: usize,
    o0: usize,
    valid: usize,
    btp: *mut f32,
) {
    let l = S::LANES;
    let tw = TILE_VECS * l;
    let direct = Int8Direct { q: btq.as_ptr(), out_features, o0, valid };
    for j in 0..rank {
        // The same columns a few tiles ahead: rank rows are separate streams that the hardware
        // prefetchers pick up late on short rows.
        s.prefetch(btq.as_ptr().wrapping_add(j * out_features + o0 + INT8_PREFETCH_BYTES).cast());
        for v in 0..TILE_VECS {
            // SAFETY: the tile's columns are inside row j; bt holds the tile.
            unsafe { s.store(btp.add(j * tw + v * l), TileB::<S>::load(&direct, s, j, v)) };
        }
    }
}

/// Rows `i0..i0 + R`, output columns `o0..o0 + valid` (`valid <= TILE_VECS · LANES`).
///
/// # Safety
/// See [`expand`]; `bt` holds the transposed tile (`rank` rows of `TILE_VECS · LANES`).
#[inline(always)]
unsafe fn expand_tile<S: Simd, const R: usize, B: TileB<S>>(
    s: S,
    p: &ExpandArgs,
    b_src: &B,
    scales: Option<&[f32]>,
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
            // int8: B's row scale goes on t, once per (row, j), whichever B source runs.
            let tv = s.splat(scales.map_or(tj, |sc| tj * sc[j]));
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
