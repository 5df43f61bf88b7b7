//! The fast LoRA paths against the reference over the shared workloads, fused against unfused,
//! batch invariance, and input validation.

use super::workload::{Popularity, SplitMix64, Workload, WorkloadSpec};
use super::*;

const POPULARITIES: [Popularity; 5] = [
    Popularity::Identical,
    Popularity::Distinct,
    Popularity::Uniform,
    Popularity::Zipf(1.0),
    Popularity::Skewed,
];

fn isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.is_available()).collect()
}

fn must<T>(r: Result<T, KernelError>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn spec(
    rows: usize,
    in_features: usize,
    outs: &[usize],
    n_adapters: usize,
    ranks: &[usize],
    popularity: Popularity,
) -> WorkloadSpec {
    WorkloadSpec {
        rows,
        in_features,
        out_features: outs.to_vec(),
        n_adapters,
        ranks: ranks.to_vec(),
        popularity,
        base_fraction: 0.0,
        dora: false,
        seed: 1,
    }
}

/// The same workload with every number replaced by its absolute value.
fn abs_workload(w: &Workload) -> Workload {
    let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let mut a = w.clone();
    a.x = abs(&w.x);
    for y in &mut a.y {
        *y = abs(y);
    }
    for site in &mut a.adapters {
        for ad in site {
            ad.a = abs(&ad.a);
            ad.b = abs(&ad.b);
            ad.scale = ad.scale.abs();
            ad.dora_factor = ad.dora_factor.as_deref().map(abs);
            if let Some(q) = &mut ad.int8 {
                for v in q.a.values.iter_mut().chain(q.bt.values.iter_mut()) {
                    *v = v.abs();
                }
            }
        }
    }
    a
}

/// Per-element bound on |fast − reference| for one site: both are within γ_n · M of the exact
/// result, where M is the same computation on absolute values and n the longest chain
/// (in + rank + the add, the scale and the DoRA multiply).
fn bounds(w: &Workload, site: usize) -> Vec<f32> {
    let a = abs_workload(w);
    let mut m = a.y[site].clone();
    must(
        lora_delta_reference(&a.x, a.in_features, &mut m, a.out_features[site], &a.segments(site)),
        "abs reference",
    );
    let max_rank = w.adapters[site].iter().map(|ad| ad.rank).max().unwrap_or(0);
    // +2 for int8: the row scales of A and B are each one more rounding.
    let n = (w.in_features + max_rank + 6) as f32;
    m.iter().map(|&v| 2.0 * n * f32::EPSILON * v + f32::MIN_POSITIVE).collect()
}

fn assert_close(fast: &[f32], reference: &[f32], bound: &[f32], ctx: &str) {
    assert_eq!(fast.len(), reference.len(), "{ctx}");
    for (i, ((&f, &r), &b)) in fast.iter().zip(reference).zip(bound).enumerate() {
        assert!((f - r).abs() <= b, "{ctx}: element {i}: fast {f}, reference {r}, bound {b}");
    }
}

fn assert_bits_eq(a: &[f32], b: &[f32], ctx: &str) {
    assert_eq!(a.len(), b.len(), "{ctx}");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{ctx}: element {i}: {x} vs {y}");
    }
}

/// The workload as given (f32 weights) and with every adapter stored in int8.
fn both_storages(w: &Workload) -> [(Workload, &'static str); 2] {
    let mut q = w.clone();
    q.quantize_int8();
    [(w.clone(), "f32"), (q, "int8")]
}

/// Runs every available path on site 0 of `w`, in both storages, and compares with the
/// reference; base rows must come back bit-identical.
fn check_workload(w: &Workload, ctx: &str) {
    for (w, storage) in both_storages(w) {
        check_storage(&w, &format!("{ctx} {storage}"));
    }
}

fn check_storage(w: &Workload, ctx: &str) {
    let (inf, out) = (w.in_features, w.out_features[0]);
    let segs = w.segments(0);
    let mut reference = w.y[0].clone();
    must(lora_delta_reference(&w.x, inf, &mut reference, out, &segs), ctx);
    let bound = bounds(w, 0);
    for isa in isas() {
        let ctx = format!("{ctx} {isa:?}");
        let mut y = w.y[0].clone();
        must(lora_delta_with(isa, &w.x, inf, &mut y, out, &segs), &ctx);
        assert_close(&y, &reference, &bound, &ctx);
        for (row, a) in w.adapter_of_row().iter().enumerate() {
            if a.is_none() {
                let r = row * out..(row + 1) * out;
                assert_bits_eq(&y[r.clone()], &w.y[0][r], &format!("{ctx}: base row {row}"));
            }
        }
    }
}

#[test]
fn matches_reference_on_workloads() {
    // (rows, in, out, adapters, ranks, base fraction, dora)
    #[allow(clippy::type_complexity)]
    let cases: &[(usize, usize, usize, usize, &[usize], f64, bool)] = &[
        (1, 576, 576, 1, &[16], 0.0, false),
        (32, 576, 192, 32, &[16], 0.1, true),
        (7, 33, 577, 3, &[1, 3, 8], 0.3, false),
        (300, 64, 1536, 12, &[1, 3, 8, 16, 64, 128], 0.12, true),
        (57, 1536, 576, 5, &[128, 64], 0.0, false),
        (13, 1, 7, 4, &[1, 3], 0.2, true),
        (100, 7, 1, 6, &[2, 16], 0.5, false),
        (2, 577, 33, 2, &[17, 31], 0.0, true),
        (65, 48, 80, 3, &[8], 0.05, false),
        (129, 17, 65, 9, &[5, 9, 33], 0.2, true),
    ];
    for (c, &(rows, inf, out, n, ranks, base, dora)) in cases.iter().enumerate() {
        for (p, &pop) in POPULARITIES.iter().enumerate() {
            let mut s = spec(rows, inf, &[out], n, ranks, pop);
            (s.base_fraction, s.dora, s.seed) = (base, dora, (c * 16 + p) as u64);
            let w = must(Workload::generate(&s), "workload");
            check_workload(&w, &format!("case {c} ({rows}x{inf}->{out}, ranks {ranks:?}) {pop:?}"));
        }
    }
}

#[test]
fn random_shapes_match_reference() {
    let mut rng = SplitMix64::new(99);
    let dims = [1usize, 2, 7, 15, 16, 17, 31, 33, 64, 65, 100, 576, 577];
    for case in 0..40 {
        let inf = dims[rng.below(dims.len())];
        let out = dims[rng.below(dims.len())];
        let rows = 1 + rng.below(300);
        let n = 1 + rng.below(12);
        let ranks: Vec<usize> = (0..1 + rng.below(3)).map(|_| 1 + rng.below(128)).collect();
        let pop = POPULARITIES[rng.below(POPULARITIES.len())];
        let mut s = spec(rows, inf, &[out], n, &ranks, pop);
        (s.base_fraction, s.dora, s.seed) = (rng.next_f64() * 0.4, rng.below(2) == 1, case);
        let w = must(Workload::generate(&s), "workload");
        check_workload(&w, &format!("random case {case} ({rows}x{inf}->{out}, ranks {ranks:?}) {pop:?}"));
    }
}

/// q/k/v-like and gate/up-like sites: fused is bit-identical to one call per site, and both
/// match the reference.
#[test]
fn fused_equals_unfused_and_reference() {
    let cases: [(&[usize], usize, &[usize]); 3] = [
        (&[576, 192, 192], 576, &[16, 8, 64]),
        (&[1536, 1536], 576, &[1, 3, 16]),
        (&[7, 33, 1], 33, &[128, 2]),
    ];
    for (c, (outs, inf, ranks)) in cases.into_iter().enumerate() {
        for pop in POPULARITIES {
            let mut s = spec(97, inf, outs, 7, ranks, pop);
            (s.base_fraction, s.dora, s.seed) = (0.15, c == 1, 1000 + c as u64);
            let generated = must(Workload::generate(&s), "workload");
            for ((w, storage), isa) in
                both_storages(&generated).iter().flat_map(|f| isas().into_iter().map(move |i| (f, i)))
            {
                let ctx = format!("fused case {c} {pop:?} {storage} {isa:?}");
                let segs: Vec<Vec<Segment>> = (0..outs.len()).map(|k| w.segments(k)).collect();
                let mut fused_y = w.y.clone();
                let mut sites: Vec<SiteDelta> = fused_y
                    .iter_mut()
                    .zip(&segs)
                    .zip(outs.iter())
                    .map(|((y, segments), &out_features)| SiteDelta { y, out_features, segments })
                    .collect();
                must(lora_delta_fused_with(isa, &w.x, inf, &mut sites), &ctx);
                for (k, &out) in outs.iter().enumerate() {
                    let mut y = w.y[k].clone();
                    must(lora_delta_with(isa, &w.x, inf, &mut y, out, &segs[k]), &ctx);
                    assert_bits_eq(&fused_y[k], &y, &format!("{ctx} site {k}"));
                    let mut reference = w.y[k].clone();
                    must(lora_delta_reference(&w.x, inf, &mut reference, out, &segs[k]), &ctx);
                    assert_close(&y, &reference, &bounds(w, k), &format!("{ctx} site {k}"));
                }
            }
        }
    }
}

/// Sites whose segments cover different row ranges (one cut finer than the other) still fuse
/// correctly.
#[test]
fn fused_with_different_segmentations() {
    let mut s = spec(150, 96, &[80, 40], 6, &[4, 16, 32], Popularity::Zipf(0.8));
    (s.base_fraction, s.dora) = (0.1, true);
    let w = must(Workload::generate(&s), "workload");
    let coarse = w.segments(0);
    let fine: Vec<Segment> = w
        .segments(1)
        .into_iter()
        .flat_map(|seg| {
            let mid = seg.rows.start + seg.rows.len() / 3;
            [
                Segment { rows: seg.rows.start..mid, weights: seg.weights },
                Segment { rows: mid..seg.rows.end, weights: seg.weights },
            ]
        })
        .collect();
    for isa in isas() {
        let (mut y0, mut y1) = (w.y[0].clone(), w.y[1].clone());
        let mut sites = [
            SiteDelta { y: &mut y0, out_features: 80, segments: &coarse },
            SiteDelta { y: &mut y1, out_features: 40, segments: &fine },
        ];
        must(lora_delta_fused_with(isa, &w.x, 96, &mut sites), "fused");
        let (mut e0, mut e1) = (w.y[0].clone(), w.y[1].clone());
        must(lora_delta_with(isa, &w.x, 96, &mut e0, 80, &coarse), "site 0");
        must(lora_delta_with(isa, &w.x, 96, &mut e1, 40, &w.segments(1)), "site 1 unsplit");
        assert_bits_eq(&y0, &e0, &format!("{isa:?} site 0"));
        assert_bits_eq(&y1, &e1, &format!("{isa:?} site 1 (split segments vs whole)"));
    }
}

/// A row's output is the same bits whether it is computed alone, in a big mixed batch, with its
/// segment cut differently, or on a different number of threads.
#[test]
fn batch_invariance() {
    let mut s = spec(240, 576, &[1536], 20, &[8, 16, 64, 3], Popularity::Zipf(1.0));
    (s.base_fraction, s.dora, s.seed) = (0.1, false, 7);
    let mut w = must(Workload::generate(&s), "workload");
    // Half the adapters with DoRA, half without.
    for (a, ad) in w.adapters[0].iter_mut().enumerate() {
        if a % 2 == 0 {
            ad.dora_factor = Some((0..1536).map(|o| 0.5 + (o % 7) as f32 * 0.1).collect());
        }
    }
    for (w, storage) in both_storages(&w) {
        check_batch_invariance(&w, storage);
    }
}

/// Odd shapes (no multiple of a vector width or a block; ranks 1 to past 128, past both sides of
/// the projection) take every tail path; they too give each row the same bits in any batch.
#[test]
fn batch_invariance_odd_shapes() {
    let mut s = spec(150, 100, &[37], 12, &[1, 5, 9, 130], Popularity::Zipf(1.0));
    (s.base_fraction, s.seed) = (0.2, 11);
    let w = must(Workload::generate(&s), "workload");
    for (w, storage) in both_storages(&w) {
        check_batch_invariance(&w, storage);
    }
}

fn check_batch_invariance(w: &Workload, storage: &str) {
    let (inf, out) = (w.in_features, w.out_features[0]);
    let segs = w.segments(0);
    let owner = w.adapter_of_row();
    for isa in isas() {
        let mut big = w.y[0].clone();
        must(lora_delta_with(isa, &w.x, inf, &mut big, out, &segs), "big batch");

        // Each adapter row alone.
        for (row, a) in owner.iter().enumerate() {
            let Some(a) = *a else { continue };
            let x = &w.x[row * inf..(row + 1) * inf];
            let mut y = w.y[0][row * out..(row + 1) * out].to_vec();
            let seg = [Segment { rows: 0..1, weights: w.adapters[0][a].weights() }];
            must(lora_delta_with(isa, x, inf, &mut y, out, &seg), "single row");
            assert_bits_eq(
                &y,
                &big[row * out..(row + 1) * out],
                &format!("{storage} {isa:?} row {row} alone"),
            );
        }

        // Every segment cut into single rows and handed over in reverse order.
        let singles: Vec<Segment> = segs
            .iter()
            .rev()
            .flat_map(|seg| seg.rows.clone().map(|r| Segment { rows: r..r + 1, weights: seg.weights }))
            .collect();
        let mut y = w.y[0].clone();
        must(lora_delta_with(isa, &w.x, inf, &mut y, out, &singles), "single-row segments");
        assert_bits_eq(&y, &big, &format!("{storage} {isa:?} single-row segments"));

        // A sub-batch: the first 37 rows only.
        let sub_rows = 37;
        let sub: Vec<Segment> = segs
            .iter()
            .filter(|s| s.rows.start < sub_rows)
            .map(|s| Segment { rows: s.rows.start..s.rows.end.min(sub_rows), weights: s.weights })
            .collect();
        let mut y = w.y[0][..sub_rows * out].to_vec();
        must(lora_delta_with(isa, &w.x[..sub_rows * inf], inf, &mut y, out, &sub), "sub-batch");
        assert_bits_eq(&y, &big[..sub_rows * out], &format!("{storage} {isa:?} sub-batch"));

        // Other thread counts.
        for threads in [1, 3] {
            let pool = must(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map_err(|e| KernelError::Shape(e.to_string())),
                "pool",
            );
            let mut y = w.y[0].clone();
            must(pool.install(|| lora_delta_with(isa, &w.x, inf, &mut y, out, &segs)), "pool");
            assert_bits_eq(&y, &big, &format!("{storage} {isa:?} on {threads} threads"));
        }
    }
}

/// Decode at 4096 wide (the items split across threads and rank chunks) is still batch invariant.
#[test]
fn batch_invariance_wide_decode() {
    let mut s = spec(32, 4096, &[4096], 32, &[16, 64], Popularity::Distinct);
    s.seed = 3;
    let w = must(Workload::generate(&s), "workload");
    let segs = w.segments(0);
    for isa in isas() {
        let mut big = w.y[0].clone();
        must(lora_delta_with(isa, &w.x, 4096, &mut big, 4096, &segs), "batch");
        for seg in &segs {
            let row = seg.rows.start;
            let mut y = w.y[0][row * 4096..(row + 1) * 4096].to_vec();
            let one = [Segment { rows: 0..1, weights: seg.weights }];
            must(lora_delta_with(isa, &w.x[row * 4096..(row + 1) * 4096], 4096, &mut y, 4096, &one), "row");
            assert_bits_eq(&y, &big[row * 4096..(row + 1) * 4096], &format!("{isa:?} row {row}"));
        }
        let mut reference = w.y[0].clone();
        must(lora_delta_reference(&w.x, 4096, &mut reference, 4096, &segs), "reference");
        assert_close(&big, &reference, &bounds(&w, 0), &format!("{isa:?} wide decode"));
    }
}

/// Adapters in both storages in one batch, and fused sites whose segments on the same rows use
/// different storages (shrunk in separate groups): the same bits as each storage alone.
#[test]
fn mixed_storages_in_one_batch() {
    let mut s = spec(120, 576, &[576, 192], 10, &[8, 16], Popularity::Uniform);
    (s.base_fraction, s.seed) = (0.1, 11);
    let f = must(Workload::generate(&s), "workload");
    let mut q = f.clone();
    q.quantize_int8();
    // Site 0: even adapters int8; site 1: odd adapters int8.
    let mut mixed = f.clone();
    for (site, adapters) in mixed.adapters.iter_mut().enumerate() {
        for (a, ad) in adapters.iter_mut().enumerate() {
            if a % 2 == site {
                ad.int8 = q.adapters[site][a].int8.clone();
            }
        }
    }
    for isa in isas() {
        let segs: Vec<Vec<Segment>> = (0..2).map(|k| mixed.segments(k)).collect();
        let mut ys = mixed.y.clone();
        let (y0, y1) = ys.split_at_mut(1);
        let mut sites = [
            SiteDelta { y: &mut y0[0], out_features: 576, segments: &segs[0] },
            SiteDelta { y: &mut y1[0], out_features: 192, segments: &segs[1] },
        ];
        must(lora_delta_fused_with(isa, &mixed.x, 576, &mut sites), "fused mixed");
        for (k, &out) in [576usize, 192].iter().enumerate() {
            let (mut yf, mut yq) = (f.y[k].clone(), q.y[k].clone());
            must(lora_delta_with(isa, &f.x, 576, &mut yf, out, &f.segments(k)), "f32");
            must(lora_delta_with(isa, &q.x, 576, &mut yq, out, &q.segments(k)), "int8");
            for (row, a) in mixed.adapter_of_row().iter().enumerate() {
                let r = row * out..(row + 1) * out;
                let expect = match a {
                    Some(a) if a % 2 == k => &yq[r.clone()],
                    _ => &yf[r.clone()],
                };
                assert_bits_eq(&ys[k][r], expect, &format!("{isa:?} site {k} row {row}"));
            }
        }
    }
}

/// int8 storage: each weight within half a step of its row's scale, and the delta close to the
/// f32 delta (relative to the delta's size).
#[test]
fn int8_storage_is_close_to_f32() {
    let s = spec(16, 576, &[1536], 4, &[16, 64], Popularity::Uniform);
    let f = must(Workload::generate(&s), "workload");
    let mut q = f.clone();
    q.quantize_int8();
    for ad in &q.adapters[0] {
        let m = ad.int8.as_ref().expect("quantized");
        for (j, row) in ad.a.chunks_exact(576).enumerate() {
            let sc = m.a.scales[j];
            for (k, v) in row.iter().enumerate() {
                let back = sc * f32::from(m.a.values[j * 576 + k]);
                assert!((back - v).abs() <= 0.5 * sc * (1.0 + 1e-5), "A[{j},{k}]: {v} vs {back}");
            }
        }
        for o in 0..1536 {
            for j in 0..ad.rank {
                let (v, sc) = (ad.b[o * ad.rank + j], m.bt.scales[j]);
                let back = sc * f32::from(m.bt_value(j, o));
                assert!((back - v).abs() <= 0.5 * sc * (1.0 + 1e-5), "B[{o},{j}]: {v} vs {back}");
            }
        }
        assert_eq!(m.bytes(), ad.rank * (576 + 1536) + 2 * ad.rank * 4);
    }
    let (mut yf, mut yq) = (vec![0f32; 16 * 1536], vec![0f32; 16 * 1536]);
    must(lora_delta(&f.x, 576, &mut yf, 1536, &f.segments(0)), "f32");
    must(lora_delta(&q.x, 576, &mut yq, 1536, &q.segments(0)), "int8");
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = yf.iter().zip(&yq).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&yf);
    assert!(rel < 0.01, "int8 delta differs from f32 by {rel} (relative L2)");
    assert!(rel > 0.0, "int8 storage was not used");
}

#[test]
fn rank_zero_and_empty_segments() {
    let (x, mut y) = (vec![1.0f32; 3 * 4], vec![2.0f32; 3 * 5]);
    let g = [0.5f32, 1.0, 2.0, 3.0, -1.0];
    let dora = LoraSiteWeights { dora_factor: Some(&g), ..LoraSiteWeights::f32(&[], &[], 0, 1.0) };
    let plain = LoraSiteWeights { dora_factor: None, ..dora };
    let segs = [
        Segment { rows: 0..1, weights: dora },
        Segment { rows: 1..2, weights: plain },
        Segment { rows: 2..2, weights: plain },
    ];
    let mut expect = y.clone();
    must(lora_delta_reference(&x, 4, &mut expect, 5, &segs), "reference");
    assert_eq!(&expect[..5], &[1.0, 2.0, 4.0, 6.0, -2.0]);
    assert!(expect[5..].iter().all(|&v| v == 2.0));
    for isa in isas() {
        let mut yy = y.clone();
        must(lora_delta_with(isa, &x, 4, &mut yy, 5, &segs), "fast");
        assert_bits_eq(&yy, &expect, &format!("{isa:?}"));
    }
    // No rows at all.
    must(lora_delta(&[], 4, &mut [], 5, &[]), "empty batch");
    must(lora_delta(&x, 4, &mut y, 5, &[]), "no segments");
}

#[test]
fn rejects_bad_inputs_without_writing() {
    let (inf, out, rows, rank) = (6usize, 5usize, 4usize, 2usize);
    let x = vec![0.5f32; rows * inf];
    let a = vec![0.25f32; rank * inf];
    let b = vec![0.25f32; out * rank];
    let g = vec![1.5f32; out];
    let ok = LoraSiteWeights { dora_factor: Some(&g), ..LoraSiteWeights::f32(&a, &b, rank, 2.0) };
    let q = Int8LoraMatrices::quantize(&a, &b, rank, inf, out);
    let ok8 = LoraSiteWeights { matrices: q.view(), ..ok };
    let seg = |rows: Range<usize>, weights| Segment { rows, weights };
    let short_g = [1.0f32; 4];
    #[allow(clippy::reversed_empty_ranges)]
    let bad: Vec<(&str, usize, usize, usize, Vec<Segment>)> = vec![
        ("in_features 0", 0, rows * out, out, vec![]),
        ("x not whole rows", inf, rows * out, out, vec![]),
        ("y too short", inf, rows * out - 1, out, vec![]),
        ("out 0", inf, 0, 0, vec![]),
        ("rows past the end", inf, rows * out, out, vec![seg(2..5, ok)]),
        ("start > end", inf, rows * out, out, vec![seg(3..1, ok)]),
        ("overlap sorted", inf, rows * out, out, vec![seg(0..2, ok), seg(1..3, ok)]),
        ("overlap unsorted", inf, rows * out, out, vec![seg(2..4, ok), seg(0..1, ok), seg(1..3, ok)]),
        ("A length", inf, rows * out, out, vec![seg(0..1, LoraSiteWeights::f32(&a[1..], &b, rank, 1.0))]),
        ("B length", inf, rows * out, out, vec![seg(0..1, LoraSiteWeights::f32(&a, &b[1..], rank, 1.0))]),
        ("int8 rank vs A", inf, rows * out, out, vec![seg(0..1, LoraSiteWeights { rank: 1, ..ok8 })]),
        (
            "int8 scales",
            inf,
            rows * out,
            out,
            vec![seg(
                0..1,
                LoraSiteWeights {
                    matrices: LoraMatrices::Int8 {
                        a: &q.a.values,
                        a_scales: &q.a.scales[1..],
                        bt: &q.bt.values,
                        bt_scales: &q.bt.scales,
                    },
                    ..ok8
                },
            )],
        ),
        ("rank vs A", inf, rows * out, out, vec![seg(0..1, LoraSiteWeights { rank: 3, ..ok })]),
        (
            "DoRA length",
            inf,
            rows * out,
            out,
            vec![seg(0..1, LoraSiteWeights { dora_factor: Some(&short_g), ..ok })],
        ),
        ("NaN scale", inf, rows * out, out, vec![seg(0..1, LoraSiteWeights { scale: f32::NAN, ..ok })]),
        ("inf scale", inf, rows * out, out, vec![seg(0..1, LoraSiteWeights { scale: f32::INFINITY, ..ok })]),
        (
            "rank overflow",
            inf,
            rows * out,
            out,
            vec![seg(0..1, LoraSiteWeights { rank: usize::MAX / 2, ..ok })],
        ),
        (
            "int8 rank overflow",
            inf,
            rows * out,
            out,
            vec![seg(0..1, LoraSiteWeights { rank: usize::MAX - 1, ..ok8 })],
        ),
        // A later bad segment must stop the call before the good first one is applied.
        (
            "second segment bad",
            inf,
            rows * out,
            out,
            vec![seg(0..1, ok), seg(1..2, LoraSiteWeights { scale: f32::NAN, ..ok })],
        ),
    ];
    for (what, inf, y_len, out, segs) in bad {
        let xs = if what == "x not whole rows" { &x[..x.len() - 1] } else { &x[..] };
        let mut y = vec![3.0f32; y_len];
        assert!(lora_delta(xs, inf, &mut y, out, &segs).is_err(), "fast accepted: {what}");
        assert!(y.iter().all(|&v| v == 3.0), "fast wrote before rejecting: {what}");
        assert!(lora_delta_reference(xs, inf, &mut y, out, &segs).is_err(), "reference accepted: {what}");
        assert!(y.iter().all(|&v| v == 3.0), "reference wrote before rejecting: {what}");
    }

    // Fused: a bad second site leaves the first site untouched too.
    let good = [seg(0..2, ok)];
    let (mut y0, mut y1) = (vec![3.0f32; rows * out], vec![3.0f32; rows * out - 1]);
    let mut sites = [
        SiteDelta { y: &mut y0, out_features: out, segments: &good },
        SiteDelta { y: &mut y1, out_features: out, segments: &good },
    ];
    assert!(lora_delta_fused(&x, inf, &mut sites).is_err());
    assert!(y0.iter().all(|&v| v == 3.0));

    // The same inputs, valid, are accepted.
    let mut y = vec![3.0f32; rows * out];
    must(lora_delta(&x, inf, &mut y, out, &good), "valid");
    assert!(y[..2 * out].iter().all(|&v| v != 3.0) && y[2 * out..].iter().all(|&v| v == 3.0));
}

#[test]
fn workload_generator_layouts() {
    // Distinct with one row per adapter: every adapter exactly once.
    let w = must(Workload::generate(&spec(32, 8, &[8], 32, &[16], Popularity::Distinct)), "distinct");
    let mut seen: Vec<usize> =
        w.runs.iter().filter_map(|(r, a)| a.inspect(|_| assert_eq!(r.len(), 1))).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..32).collect::<Vec<_>>());
    // Identical: one segment.
    let w = must(Workload::generate(&spec(50, 8, &[8], 5, &[4], Popularity::Identical)), "identical");
    assert_eq!(w.runs, vec![(0..50, Some(0))]);
    // Runs tile 0..rows, each adapter at most once, base rows present; deterministic by seed.
    for pop in POPULARITIES {
        let mut s = spec(300, 8, &[8, 4], 10, &[1, 8], pop);
        s.base_fraction = 0.2;
        let w = must(Workload::generate(&s), "workload");
        let mut end = 0;
        let mut adapters = Vec::new();
        for (r, a) in &w.runs {
            assert_eq!(r.start, end, "{pop:?}: runs must tile the rows");
            assert!(!r.is_empty());
            end = r.end;
            adapters.extend(*a);
        }
        assert_eq!(end, 300);
        let n = adapters.len();
        adapters.sort_unstable();
        adapters.dedup();
        assert_eq!(adapters.len(), n, "{pop:?}: an adapter in two runs");
        assert!(w.runs.iter().any(|(_, a)| a.is_none()), "{pop:?}: no base rows");
        assert_eq!(w.segments(1).len(), n);
        let again = must(Workload::generate(&s), "again");
        assert_eq!(again.runs, w.runs);
        assert_bits_eq(&again.x, &w.x, "x deterministic");
    }
    // Zipf and skewed favour adapter 0.
    for pop in [Popularity::Zipf(1.2), Popularity::Skewed] {
        let w = must(Workload::generate(&spec(1000, 4, &[4], 20, &[2], pop)), "zipf");
        let rows_of =
            |a: usize| w.runs.iter().filter(|(_, b)| *b == Some(a)).map(|(r, _)| r.len()).sum::<usize>();
        assert!(rows_of(0) > 2 * rows_of(10), "{pop:?}");
    }
    assert!(Workload::generate(&spec(4, 0, &[8], 1, &[1], Popularity::Uniform)).is_err());
    assert!(Workload::generate(&spec(4, 8, &[8], 0, &[1], Popularity::Uniform)).is_err());
    assert!(Workload::generate(&spec(4, 8, &[8], 1, &[1], Popularity::Zipf(f64::NAN))).is_err());
}

/// Every ISA quantizes activations to the same int8 values and scales as the scalar code, so the
/// int8 path gives the same bits on every CPU: rows of any length (whole and partial blocks),
/// all-zero blocks, one large value among small ones, ties at half a step.
#[test]
fn activation_quantization_is_the_same_on_every_isa() {
    let mut rng = SplitMix64::new(5);
    for n in [1usize, 7, 31, 32, 33, 64, 100, 576, 1537] {
        let mut x = rng.uniform_vec(n, -1.0, 1.0);
        if n > 40 {
            x[..32].fill(0.0);
            x[33] = 1.0e4;
            x[34] = 0.5 * 1.0e4 / 127.0;
        }
        let (len, blocks) = (int8::padded(n), n.div_ceil(int8::XBLOCK));
        let quantize = |isa| {
            let (mut q, mut d) = (vec![0i8; len], vec![0f32; blocks]);
            int8::quantize_row(isa, &x, &mut q, &mut d);
            (q, d.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        let scalar = quantize(Isa::Portable);
        for isa in isas() {
            assert_eq!(quantize(isa), scalar, "{isa:?}, {n} values");
        }
    }
}
