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

use super::kernel::{self, ExpandArgs, ExpandB, ShrinkArgs};
use super::{Isa, LoraMatrices, LoraSiteWeights, SiteDelta};
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
    /// Whether the rank rows are int8 (then `ranks` index the int8 list).
    int8: bool,
    /// Indices into the call's rank-row list of that format.
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
    parts.sort_by_key(|p| (p.rows.start, p.rows.end, is_int8(&p.w), p.site));

    // Phase 1 plan: group parts with equal rows and storage, concatenate their rank rows.
    let mut f32_rows: Vec<&[f32]> = Vec::new();
    let mut int8_rows: Vec<&[i8]> = Vec::new();
    let mut int8_scales: Vec<f32> = Vec::new();
    let mut shrinks: Vec<ShrinkItem> = Vec::new();
    let (mut t_len, mut shrink_macs) = (0usize, 0usize);
    // Per group: its shrink items and its parts.
    let mut groups: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    let mut g = 0;
    while g < parts.len() {
        let (rows, int8) = (parts[g].rows.clone(), is_int8(&parts[g].w));
        let e = g + parts[g..].iter().take_while(|p| p.rows == rows && is_int8(&p.w) == int8).count();
        let total_rank: usize = parts[g..e].iter().map(|p| p.w.rank).sum();
        let first = if int8 { int8_rows.len() } else { f32_rows.len() };
        let mut col = 0;
        for p in &mut parts[g..e] {
            (p.t_base, p.t_stride, p.t_col) = (t_len, total_rank, col);
            col += p.w.rank;
            match p.w.matrices {
                LoraMatrices::F32 { a, .. } => f32_rows.extend(a.chunks_exact(in_features)),
                LoraMatrices::Int8 { a, a_scales, .. } => {
                    int8_rows.extend(a.chunks_exact(in_features));
                    int8_scales.extend_from_slice(a_scales);
                }
            }
        }
        let first_shrink = shrinks.len();
        if total_rank > 0 {
            let group = ShrinkGroup { rows: rows.clone(), int8, first, total_rank, t_base: t_len };
            plan_shrink(&group, in_features, &mut shrinks);
        }
        groups.push((first_shrink..shrinks.len(), g..e));
        t_len += rows.len() * total_rank;
        shrink_macs += rows.len() * total_rank * in_features;
        g = e;
    }

    // Phase 2 plan: expand items, each part's contiguous (so each group's are too).
    let mut expands: Vec<ExpandItem> = Vec::new();
    let mut part_expands: Vec<Range<usize>> = Vec::with_capacity(parts.len());
    let mut expand_macs = 0;
    for (k, p) in parts.iter().enumerate() {
        let out = p.out_features;
        let per_row = out * p.w.rank.max(1);
        expand_macs += p.rows.len() * per_row;
        let first = expands.len();
        for rows in panels(p.rows.clone()) {
            let chunk =
                (ITEM_MACS / (rows.len() * p.w.rank.max(1))).next_multiple_of(OUT_ALIGN).max(OUT_ALIGN);
            for o in (0..out).step_by(chunk) {
                expands.push(ExpandItem { part: k, rows: rows.clone(), outs: o..(o + chunk).min(out) });
            }
        }
        part_expands.push(first..expands.len());
    }

    // A group whose shrink is one item and whose parts expand in one item each (decode rows,
    // small prefill chunks) runs whole in phase 1: its expand needs only its own shrink, so it
    // need not wait for the phase boundary. When every group is like that, as at decode, the
    // call is a single parallel phase.
    let mut phase1: Vec<Work> = Vec::with_capacity(groups.len());
    let mut phase2: Vec<usize> = Vec::new();
    for (group_shrinks, group_parts) in &groups {
        let whole = group_shrinks.len() <= 1 && group_parts.clone().all(|k| part_expands[k].len() == 1);
        let group_expands = part_expands[group_parts.start].start..part_expands[group_parts.end - 1].end;
        if whole {
            phase1.push(Work::Whole { shrink: group_shrinks.clone().next(), expands: group_expands });
        } else {
            phase1.extend(group_shrinks.clone().map(Work::Shrink));
            phase2.extend(group_expands);
        }
    }

    let threads = rayon::current_num_threads();
    let helpers = |macs: usize| if macs < PARALLEL_MIN_MACS { 0 } else { threads.saturating_sub(1) };
    let mut t = vec![0f32; t_len];
    let tp = SharedMut(t.as_mut_ptr());
    let ys: Vec<SharedMut> = sites.iter_mut().map(|s| SharedMut(s.y.as_mut_ptr())).collect();
    let run_shrink = |it: &ShrinkItem| {
        // SAFETY: the call was validated (rows inside x, rank rows `in_features` long); items
        // cover disjoint entries of `t`, which outlives the call; `isa` was checked.
        unsafe {
            let (x, rows, t, ts) =
                (x.as_ptr().add(it.rows.start * in_features), it.rows.len(), tp.ptr().add(it.t), it.ts);
            if it.int8 {
                let (a, scales) = (&int8_rows[it.ranks.clone()], Some(&int8_scales[it.ranks.clone()]));
                kernel::shrink(isa, &ShrinkArgs { x, in_features, rows, a, scales, t, ts })
            } else {
                let a = &f32_rows[it.ranks.clone()];
                kernel::shrink(isa, &ShrinkArgs { x, in_features, rows, a, scales: None, t, ts })
            }
        }
    };
    let run_expand = |it: &ExpandItem| {
        let p = &parts[it.part];
        // SAFETY: validated shapes (B holds out x rank values, g is out long, rows inside y);
        // segments of a site do not overlap, so items write disjoint (row, column) blocks of
        // their site's `y`; the item's `t` rows were completed before (by its group's shrink in
        // the same work item, or in phase 1) and are only read here.
        unsafe {
            kernel::expand(
                isa,
                &ExpandArgs {
                    t: tp.ptr().add(p.t_base + (it.rows.start - p.rows.start) * p.t_stride + p.t_col),
                    ts: p.t_stride,
                    rows: it.rows.len(),
                    rank: p.w.rank,
                    b: match p.w.matrices {
                        LoraMatrices::F32 { b, .. } => ExpandB::F32(b),
                        LoraMatrices::Int8 { bt, bt_scales, .. } => ExpandB::Int8 { bt, scales: bt_scales },
                    },
                    outs: it.outs.clone(),
                    out_features: p.out_features,
                    y: ys[p.site].ptr().add(it.rows.start * p.out_features),
                    scale: p.w.scale,
                    g: p.w.dora_factor,
                },
            )
        }
    };
    // The weights an item will read, asked into L2 one item ahead: the same thread usually takes
    // the next item (see `par`), and each item streams another adapter's weights from DRAM.
    let prefetch_shrink = |it: &ShrinkItem| {
        if it.int8 {
            int8_rows[it.ranks.clone()].iter().for_each(|r| kernel::prefetch_range(r.as_ptr(), r.len()));
        } else {
            f32_rows[it.ranks.clone()].iter().for_each(|r| kernel::prefetch_range(r.as_ptr(), r.len()));
        }
    };
    let prefetch_expand = |it: &ExpandItem| {
        let p = &parts[it.part];
        let (outs, out) = (it.outs.clone(), p.out_features);
        match p.w.matrices {
            LoraMatrices::F32 { b, .. } => {
                let rows = &b[outs.start * p.w.rank..outs.end * p.w.rank];
                kernel::prefetch_range(rows.as_ptr(), rows.len());
            }
            LoraMatrices::Int8 { bt, .. } => {
                for row in bt.chunks_exact(out) {
                    kernel::prefetch_range(row[outs.clone()].as_ptr(), outs.len());
                }
            }
        }
    };
    let prefetch_work = |w: &Work| match w {
        Work::Shrink(i) => prefetch_shrink(&shrinks[*i]),
        Work::Whole { shrink, expands: e } => {
            shrink.iter().for_each(|&i| prefetch_shrink(&shrinks[i]));
            e.clone().for_each(|i| prefetch_expand(&expands[i]));
        }
    };

    par::for_each_chunk(phase1.len(), helpers(shrink_macs + expand_macs), &|c| {
        if let Some(next) = phase1.get(c + 1) {
            prefetch_work(next);
        }
        match &phase1[c] {
            Work::Shrink(i) => run_shrink(&shrinks[*i]),
            Work::Whole { shrink, expands: e } => {
                shrink.iter().for_each(|&i| run_shrink(&shrinks[i]));
                e.clone().for_each(|i| run_expand(&expands[i]));
            }
        }
    });
    par::for_each_chunk(phase2.len(), helpers(expand_macs), &|c| {
        if let Some(&next) = phase2.get(c + 1) {
            prefetch_expand(&expands[next]);
        }
        run_expand(&expands[phase2[c]]);
    });
}

/// A unit of phase 1.
enum Work {
    /// One shrink item of a group whose expands run in phase 2.
    Shrink(usize),
    /// A whole group: its shrink item (none at rank 0), then its expand items.
    Whole { shrink: Option<usize>, expands: Range<usize> },
}

/// `rows` cut into near-equal panels of at most `PANEL_ROWS`.
fn panels(rows: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let n = rows.len();
    let k = n.div_ceil(PANEL_ROWS);
    (0..k).map(move |p| rows.start + n * p / k..rows.start + n * (p + 1) / k)
}

fn is_int8(w: &LoraSiteWeights) -> bool {
    matches!(w.matrices, LoraMatrices::Int8 { .. })
}

/// Segments (of one or more sites) that cover the same rows with the same storage: their shrinks
/// share each pass over `x[rows]`.
struct ShrinkGroup {
    rows: Range<usize>,
    int8: bool,
    /// Where the group's rank rows start in the list of its format.
    first: usize,
    total_rank: usize,
    /// Offset of the group's `t` block.
    t_base: usize,
}

/// Shrink items of one group: row panels × chunks of its rank rows.
fn plan_shrink(g: &ShrinkGroup, in_features: usize, items: &mut Vec<ShrinkItem>) {
    for pr in panels(g.rows.clone()) {
        let chunk = (ITEM_MACS / (pr.len() * in_features)).next_multiple_of(RANK_ALIGN).max(RANK_ALIGN);
        for j in (0..g.total_rank).step_by(chunk) {
            items.push(ShrinkItem {
                rows: pr.clone(),
                int8: g.int8,
                ranks: g.first + j..g.first + (j + chunk).min(g.total_rank),
                t: g.t_base + (pr.start - g.rows.start) * g.total_rank + j,
                ts: g.total_rank,
            });
        }
    }
}
