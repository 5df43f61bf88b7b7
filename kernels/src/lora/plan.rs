//! The fast path's driver: cuts a validated call into shrink and expand work items and runs each
//! phase on the calling thread plus rayon helpers (`quant::par`).
//!
//! Phase 1 (shrink) fills `t`: for each group of segments covering the same rows (one segment,
//! or the same rows in several fused sites) `t_g = x[rows] · [A_1; A_2; ..]ᵀ`, cut into row
//! panels × rank chunks. Phase 2 (expand) updates `y` per (segment, row panel, output chunk),
//! or for int8 weights per (segment, a few whole output rows).
//! Items of a phase write disjoint parts of `t` or `y`, so they need no synchronisation beyond
//! the end of the phase; no item splits a reduction, so the cut never changes a result.
//! Items are ordered segment by segment, so each thread's contiguous share of the items streams
//! through contiguous weights. int8 groups also quantize their activation rows (once per group,
//! shared by its fused sites) before their shrink, and each part's `t` rows after it: inside the
//! work item of a group that runs whole, else in a short parallel phase before phase 1 and after.

use std::ops::Range;

use super::int8::{self, ExpandInt8};
use super::kernel::{self, ExpandArgs, ShrinkArgs};
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
struct SharedMut<T>(*mut T);
// SAFETY: items write disjoint elements, and the owning borrow outlives `par::for_each_chunk`,
// which returns only after every item is done.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}

impl<T> SharedMut<T> {
    fn new(v: &mut [T]) -> Self {
        Self(v.as_mut_ptr())
    }

    /// (A method, so closures capture the `Sync` wrapper rather than the bare pointer field.)
    fn ptr(self) -> *mut T {
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
    /// int8: this part's first row in the call's quantized-`u` buffers.
    u_row: usize,
}

/// Segments (of one or more sites) that cover the same rows with the same storage, and their
/// work: shrink items, parts (contiguous in `parts`), and for int8 their first row in the
/// call's quantized-activation buffer.
struct Group {
    rows: Range<usize>,
    shrinks: Range<usize>,
    parts: Range<usize>,
    x_row: Option<usize>,
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
    /// int8: the row of `rows.start` in the call's quantized-activation buffer.
    x_row: usize,
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
            parts.push(Part { site, rows, w, out_features, t_base: 0, t_stride: 0, t_col: 0, u_row: 0 });
        }
    }
    if parts.is_empty() {
        return;
    }
    parts.sort_by_key(|p| (p.rows.start, p.rows.end, is_int8(&p.w), p.site));

    // Phase 1 plan: group parts with equal rows and storage, concatenate their rank rows.
    // Sized up front: at decode these lists hold the rank rows of every adapter of the step.
    let rank_rows =
        |int8: bool| parts.iter().filter(|p| is_int8(&p.w) == int8).map(|p| p.w.rank).sum::<usize>();
    let mut f32_rows: Vec<&[f32]> = Vec::with_capacity(rank_rows(false));
    let mut int8_rows: Vec<&[i8]> = Vec::with_capacity(rank_rows(true));
    let mut int8_scales: Vec<f32> = Vec::with_capacity(rank_rows(true));
    let mut shrinks: Vec<ShrinkItem> = Vec::new();
    let (mut t_len, mut shrink_macs) = (0usize, 0usize);
    let (mut x_rows, mut u_rows, mut u_quads) = (0usize, 0usize, 0usize);
    let mut groups: Vec<Group> = Vec::new();
    let mut g = 0;
    while g < parts.len() {
        let (rows, int8) = (parts[g].rows.clone(), is_int8(&parts[g].w));
        let e = g + parts[g..].iter().take_while(|p| p.rows == rows && is_int8(&p.w) == int8).count();
        let total_rank: usize = parts[g..e].iter().map(|p| p.w.rank).sum();
        let first = if int8 { int8_rows.len() } else { f32_rows.len() };
        let mut col = 0;
        let x_row = int8.then_some(x_rows);
        for p in &mut parts[g..e] {
            (p.t_base, p.t_stride, p.t_col) = (t_len, total_rank, col);
            col += p.w.rank;
            if int8 {
                p.u_row = u_rows;
                u_rows += rows.len();
                u_quads = u_quads.max(int8::quad_count(p.w.rank));
            }
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
            let x_row = x_row.unwrap_or(0);
            let group = ShrinkGroup { rows: rows.clone(), int8, first, total_rank, t_base: t_len, x_row };
            plan_shrink(&group, in_features, &mut shrinks);
        }
        groups.push(Group { rows: rows.clone(), shrinks: first_shrink..shrinks.len(), parts: g..e, x_row });
        if int8 {
            x_rows += rows.len();
        }
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
        if is_int8(&p.w) {
            // int8 items span whole output rows, a few rows each: the row-major `y` (out of
            // L2 at prefill) is then read and written front to back, where column chunks made
            // every row a short access of its own; the part's int8 Bᵀ (≤ 4 · out bytes per
            // quad row) stays cached from one item to the next. f32 B, 4× larger, keeps the
            // panels × column chunks below.
            let rows_per_item = (ITEM_MACS / per_row).max(1);
            for start in p.rows.clone().step_by(rows_per_item) {
                let rows = start..(start + rows_per_item).min(p.rows.end);
                expands.push(ExpandItem { part: k, rows, outs: 0..out });
            }
        } else {
            for rows in panels(p.rows.clone()) {
                let chunk =
                    (ITEM_MACS / (rows.len() * p.w.rank.max(1))).next_multiple_of(OUT_ALIGN).max(OUT_ALIGN);
                for o in (0..out).step_by(chunk) {
                    expands.push(ExpandItem { part: k, rows: rows.clone(), outs: o..(o + chunk).min(out) });
                }
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
    // int8 groups and parts outside whole works: their rows are quantized in a phase of their
    // own, before (activations) and after (`u`) phase 1.
    let (mut quantize_x, mut quantize_u) = (Vec::new(), Vec::new());
    for (k, g) in groups.iter().enumerate() {
        let whole = g.shrinks.len() <= 1 && g.parts.clone().all(|p| part_expands[p].len() == 1);
        let group_expands = part_expands[g.parts.start].start..part_expands[g.parts.end - 1].end;
        if whole {
            phase1.push(Work::Whole { group: k, shrink: g.shrinks.clone().next(), expands: group_expands });
        } else {
            phase1.extend(g.shrinks.clone().map(Work::Shrink));
            phase2.extend(group_expands);
            if g.x_row.is_some() {
                quantize_x.extend(panels(g.rows.clone()).map(|rows| (k, rows)));
                quantize_u
                    .extend(g.parts.clone().flat_map(|p| panels(g.rows.clone()).map(move |rows| (p, rows))));
            }
        }
    }

    let threads = rayon::current_num_threads();
    let helpers = |macs: usize| if macs < PARALLEL_MIN_MACS { 0 } else { threads.saturating_sub(1) };
    let mut t = vec![0f32; t_len];
    let tp = SharedMut::new(&mut t);
    let ys: Vec<SharedMut<f32>> = sites.iter_mut().map(|s| SharedMut::new(s.y)).collect();
    // int8: each activation row quantized once (per 32-element block) for all the sites that
    // share it, and each part's `u = t ∘ sb` once per row for all its expand items.
    let (xq_len, nb) = (int8::padded(in_features), in_features.div_ceil(int8::XBLOCK));
    let mut xq = vec![0i8; x_rows * xq_len];
    let mut xd = vec![0f32; x_rows * nb];
    let mut uq = vec![0i32; u_rows * u_quads];
    let mut ud = vec![0f32; u_rows];
    let (xqp, xdp, uqp, udp) =
        (SharedMut::new(&mut xq), SharedMut::new(&mut xd), SharedMut::new(&mut uq), SharedMut::new(&mut ud));
    // Quantizes rows of a group's x (`rows` absolute batch rows).
    let quantize_group_x = |g: &Group, rows: Range<usize>| {
        let Some(x_row) = g.x_row else { return };
        for i in rows {
            let r = x_row + i - g.rows.start;
            // SAFETY: row r of the buffers belongs to this group row alone; no other item writes it.
            let (q, d) = unsafe {
                (
                    std::slice::from_raw_parts_mut(xqp.ptr().add(r * xq_len), xq_len),
                    std::slice::from_raw_parts_mut(xdp.ptr().add(r * nb), nb),
                )
            };
            int8::quantize_row(isa, &x[i * in_features..(i + 1) * in_features], q, d);
        }
    };
    // Quantizes rows of a part's `u` (its shrink is complete for these rows).
    let quantize_part_u = |p: &Part, rows: Range<usize>| {
        let LoraMatrices::Int8 { bt_scales, .. } = p.w.matrices else { return };
        for i in rows {
            let r = p.u_row + i - p.rows.start;
            // SAFETY: the part's t rows are complete and only read; u row r belongs to this
            // (part, row) alone.
            unsafe {
                let tr = std::slice::from_raw_parts(
                    tp.ptr().add(p.t_base + (i - p.rows.start) * p.t_stride + p.t_col),
                    p.w.rank,
                );
                let quads = std::slice::from_raw_parts_mut(uqp.ptr().add(r * u_quads), u_quads);
                *udp.ptr().add(r) = int8::quantize_t(tr, bt_scales, quads);
            }
        }
    };
    let run_shrink = |it: &ShrinkItem| {
        // SAFETY: the call was validated (rows inside x, rank rows `in_features` long); items
        // cover disjoint entries of `t`, which outlives the call; `isa` was checked; an int8
        // item's activation rows were quantized before it runs and are only read.
        unsafe {
            let (rows, t, ts) = (it.rows.clone(), tp.ptr().add(it.t), it.ts);
            if it.int8 {
                let (a, scales) = (&int8_rows[it.ranks.clone()], &int8_scales[it.ranks.clone()]);
                for k in 0..rows.len() {
                    let r = it.x_row + k;
                    let q = std::slice::from_raw_parts(xqp.ptr().add(r * xq_len), xq_len);
                    let d = std::slice::from_raw_parts(xdp.ptr().add(r * nb), nb);
                    int8::shrink_row(isa, q, d, a, scales, in_features, t.add(k * ts));
                }
            } else {
                let (x, rows) = (x.as_ptr().add(rows.start * in_features), rows.len());
                let a = &f32_rows[it.ranks.clone()];
                kernel::shrink(isa, &ShrinkArgs { x, in_features, rows, a, t, ts })
            }
        }
    };
    let run_expand = |it: &ExpandItem| {
        let p = &parts[it.part];
        let t = tp.ptr().wrapping_add(p.t_base + (it.rows.start - p.rows.start) * p.t_stride + p.t_col);
        let y = ys[p.site].ptr().wrapping_add(it.rows.start * p.out_features);
        let (ts, rows, rank, outs, out_features) =
            (p.t_stride, it.rows.len(), p.w.rank, it.outs.clone(), p.out_features);
        let (scale, g) = (p.w.scale, p.w.dora_factor);
        // SAFETY: validated shapes (B holds out x rank values, g is out long, rows inside y);
        // segments of a site do not overlap, so items write disjoint (row, column) blocks of
        // their site's `y`; the item's `t` rows (and for int8 their quantized `u`) were completed
        // before (in the same work item, or in an earlier phase) and are only read here.
        unsafe {
            match p.w.matrices {
                LoraMatrices::F32 { b, .. } => {
                    kernel::expand(isa, &ExpandArgs { t, ts, rows, rank, b, outs, out_features, y, scale, g })
                }
                LoraMatrices::Int8 { bt, .. } => {
                    let e = ExpandInt8 { bt, outs, out_features, scale, g };
                    let nquads = int8::quad_count(rank);
                    for k in 0..rows {
                        let r = p.u_row + it.rows.start - p.rows.start + k;
                        let quads = std::slice::from_raw_parts(uqp.ptr().add(r * u_quads), nquads);
                        int8::expand_row(isa, quads, *udp.ptr().add(r), &e, y.add(k * out_features));
                    }
                }
            }
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
                // Each four rank rows are one interleaved row of 4 · out bytes.
                let k = int8::BT_INTERLEAVE;
                for row in bt.chunks_exact(k * out) {
                    let cols = &row[k * outs.start..k * outs.end];
                    kernel::prefetch_range(cols.as_ptr(), cols.len());
                }
            }
        }
    };
    let prefetch_work = |w: &Work| match w {
        Work::Shrink(i) => prefetch_shrink(&shrinks[*i]),
        Work::Whole { shrink, expands: e, .. } => {
            shrink.iter().for_each(|&i| prefetch_shrink(&shrinks[i]));
            e.clone().for_each(|i| prefetch_expand(&expands[i]));
        }
    };

    // Quantizing an element costs about what a multiply-add does.
    let quantize_work = (x_rows + u_rows) * in_features;
    par::for_each_chunk(quantize_x.len(), helpers(quantize_work), &|c| {
        let (k, rows) = &quantize_x[c];
        quantize_group_x(&groups[*k], rows.clone());
    });
    par::for_each_chunk(phase1.len(), helpers(shrink_macs + expand_macs), &|c| {
        if let Some(next) = phase1.get(c + 1) {
            prefetch_work(next);
        }
        match &phase1[c] {
            Work::Shrink(i) => run_shrink(&shrinks[*i]),
            Work::Whole { group, shrink, expands: e } => {
                let g = &groups[*group];
                quantize_group_x(g, g.rows.clone());
                shrink.iter().for_each(|&i| run_shrink(&shrinks[i]));
                g.parts.clone().for_each(|k| quantize_part_u(&parts[k], g.rows.clone()));
                e.clone().for_each(|i| run_expand(&expands[i]));
            }
        }
    });
    par::for_each_chunk(quantize_u.len(), helpers(quantize_work), &|c| {
        let (k, rows) = &quantize_u[c];
        quantize_part_u(&parts[*k], rows.clone());
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
    /// A whole group: its int8 quantization, its shrink item (none at rank 0), then its expand
    /// items.
    Whole { group: usize, shrink: Option<usize>, expands: Range<usize> },
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
    /// int8: the group's first row in the call's quantized-activation buffer.
    x_row: usize,
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
                x_row: g.x_row + pr.start - g.rows.start,
            });
        }
    }
}
