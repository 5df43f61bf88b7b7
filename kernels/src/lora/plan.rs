//! The fast path's driver: cuts a validated call into shrink and expand work items and runs each
//! phase on the calling thread plus rayon helpers (`quant::par`).
//!
//! Phase 1 (shrink) fills `t`: for each group of segments covering the same rows (one segment,
//! or the same rows in several fused sites) `t_g = x[rows] · [A_1; A_2; ..]ᵀ`, cut into row
//! panels × rank chunks. Phase 2 (expand) updates `y` per (segment, row panel, output chunk).
//! Items of a phase write disjoint parts of `t` or `y`, so they need no synchronisation beyond
//! the end of the phase; no item splits a reduction, so the cut never changes a result.
//! Items are ordered segment by segment, so each thread's contiguous share of the items streams
//! through contiguous weights.

use std::ops::Range;

use super::kernel::{self, ExpandArgs, ShrinkArgs};
use super::{Isa, LoraSiteWeights, SiteDelta};
use crate::quant::par;

/// Rows per panel: bounds the x (shrink) and t/y (expand) working set of an item so it stays in
/// L2 while the item's weights are swept.
const PANEL_ROWS: usize = 64;
/// Target multiply-adds per work item: ~5-20 µs (a decode item reads its weights from DRAM),
/// so claiming an item is noise, yet a 4096-wide rank-16 decode still splits in two.
const ITEM_MACS: usize = 32 * 1024;
/// Rank rows per shrink chunk are a multiple of this (the single-row register tile).
const RANK_ALIGN: usize = 8;
/// Output columns per expand chunk are a multiple of this (4 AVX-512 vectors).
const OUT_ALIGN: usize = 64;
/// Below this many multiply-adds a phase stays on the calling thread: waking a helper costs a
/// few µs, as much as the whole phase.
const PARALLEL_MIN_MACS: usize = 48 * 1024;

/// Raw pointer into a buffer that the items of a phase write disjointly.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: items write disjoint elements, and the owning borrow outlives `par::for_each_chunk`,
// which returns only after every item is done.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// (A method, so closures capture the `Sync` wrapper rather than the bare pointer field.)
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One non-trivial (site, segment) of the call and where its `t` lives.
struct Part<'a> {
    site: usize,
    rows: Range<usize>,
    w: LoraSiteWeights<'a>,
    out_features: usize,
    /// Offset of the group's `t` block (`[rows, t_stride]`) in `t`.
    t_base: usize,
    /// Total rank of the group.
    t_stride: usize,
    /// This part's first column in its group's block.
    t_col: usize,
}

struct ShrinkItem {
    rows: Range<usize>,
    /// Indices into the call's rank-row list.
    ranks: Range<usize>,
    /// Offset of `t[rows.start, first rank]`.
    t: usize,
    ts: usize,
}

struct ExpandItem {
    part: usize,
    rows: Range<usize>,
    outs: Range<usize>,
}

/// Runs a validated call (see `lora_delta_fused_with`).
pub(super) fn run(isa: Isa, x: &[f32], in_features: usize, sites: &mut [SiteDelta]) {
    let mut parts: Vec<Part> = Vec::new();
    for (site, s) in sites.iter().enumerate() {
        for seg in s.segments {
            let w = seg.weights;
            // A rank-0 segment without a DoRA factor changes nothing.
            if seg.rows.is_empty() || (w.rank == 0 && w.dora_factor.is_none()) {
                continue;
            }
            let (rows, out_features) = (seg.rows.clone(), s.out_features);
            parts.push(Part { site, rows, w, out_features, t_base: 0, t_stride: 0, t_col: 0 });
        }
    }
    if parts.is_empty() {
        return;
    }
    parts.sort_by_key(|p| (p.rows.start, p.rows.end, p.site));

    // Phase 1 plan: group parts with equal rows, concatenate their rank rows.
    let mut rank_rows: Vec<&[f32]> = Vec::new();
    let mut shrinks: Vec<ShrinkItem> = Vec::new();
    let (mut t_len, mut shrink_macs) = (0usize, 0usize);
    let mut g = 0;
    while g < parts.len() {
        let rows = parts[g].rows.clone();
        let e = g + parts[g..].iter().take_while(|p| p.rows == rows).count();
        let total_rank: usize = parts[g..e].iter().map(|p| p.w.rank).sum();
        let first = rank_rows.len();
        let mut col = 0;
        for p in &mut parts[g..e] {
            (p.t_base, p.t_stride, p.t_col) = (t_len, total_rank, col);
            col += p.w.rank;
            rank_rows.extend(p.w.a.chunks_exact(in_features));
        }
        if total_rank > 0 {
            plan_shrink(rows.clone(), first, total_rank, t_len, in_features, &mut shrinks);
        }
        t_len += rows.len() * total_rank;
        shrink_macs += rows.len() * total_rank * in_features;
        g = e;
    }

    // Phase 2 plan.
    let mut expands: Vec<ExpandItem> = Vec::new();
    let mut expand_macs = 0;
    for (k, p) in parts.iter().enumerate() {
        let out = p.out_features;
        let per_row = out * p.w.rank.max(1);
        expand_macs += p.rows.len() * per_row;
        for rows in panels(p.rows.clone()) {
            let chunk =
                (ITEM_MACS / (rows.len() * p.w.rank.max(1))).next_multiple_of(OUT_ALIGN).max(OUT_ALIGN);
            for o in (0..out).step_by(chunk) {
                expands.push(ExpandItem { part: k, rows: rows.clone(), outs: o..(o + chunk).min(out) });
            }
        }
    }

    let threads = rayon::current_num_threads();
    let helpers = |macs: usize| if macs < PARALLEL_MIN_MACS { 0 } else { threads.saturating_sub(1) };
    let mut t = vec![0f32; t_len];
    let tp = SharedMut(t.as_mut_ptr());
    par::for_each_chunk(shrinks.len(), helpers(shrink_macs), &|c| {
        let it = &shrinks[c];
        // SAFETY: the call was validated (rows inside x, rank rows `in_features` long); items
        // cover disjoint entries of `t`, which outlives this phase; `isa` was checked.
        unsafe {
            kernel::shrink(
                isa,
                &ShrinkArgs {
                    x: x.as_ptr().add(it.rows.start * in_features),
                    in_features,
                    rows: it.rows.len(),
                    a: &rank_rows[it.ranks.clone()],
                    t: tp.ptr().add(it.t),
                    ts: it.ts,
                },
            )
        }
    });

    let ys: Vec<SharedMut> = sites.iter_mut().map(|s| SharedMut(s.y.as_mut_ptr())).collect();
    par::for_each_chunk(expands.len(), helpers(expand_macs), &|c| {
        let it = &expands[c];
        let p = &parts[it.part];
        // SAFETY: validated shapes (B is [out, rank], g is out long, rows inside y); segments of
        // a site do not overlap, so items write disjoint (row, column) blocks of their site's
        // `y`; `t` was completed by phase 1 and is only read here.
        unsafe {
            kernel::expand(
                isa,
                &ExpandArgs {
                    t: tp.ptr().add(p.t_base + (it.rows.start - p.rows.start) * p.t_stride + p.t_col),
                    ts: p.t_stride,
                    rows: it.rows.len(),
                    rank: p.w.rank,
                    b: p.w.b,
                    outs: it.outs.clone(),
                    out_features: p.out_features,
                    y: ys[p.site].ptr().add(it.rows.start * p.out_features),
                    scale: p.w.scale,
                    g: p.w.dora_factor,
                },
            )
        }
    });
}

/// `rows` cut into near-equal panels of at most `PANEL_ROWS`.
fn panels(rows: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let n = rows.len();
    let k = n.div_ceil(PANEL_ROWS);
    (0..k).map(move |p| rows.start + n * p / k..rows.start + n * (p + 1) / k)
}

/// Shrink items of one group: row panels × chunks of its `total_rank` rank rows (which start at
/// `first` in the rank-row list); the group's `t` block starts at `t_base`.
fn plan_shrink(
    rows: Range<usize>,
    first: usize,
    total_rank: usize,
    t_base: usize,
    in_features: usize,
    items: &mut Vec<ShrinkItem>,
) {
    for pr in panels(rows.clone()) {
        let chunk = (ITEM_MACS / (pr.len() * in_features)).next_multiple_of(RANK_ALIGN).max(RANK_ALIGN);
        for j in (0..total_rank).step_by(chunk) {
            items.push(ShrinkItem {
                rows: pr.clone(),
                ranks: first + j..first + (j + chunk).min(total_rank),
                t: t_base + (pr.start - rows.start) * total_rank + j,
                ts: total_rank,
            });
        }
    }
}
