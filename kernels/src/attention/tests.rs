use super::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One sequence of a test batch: its whole K/V history (contiguous, for the dense oracle) and
/// where this step's rows sit.
struct Seq {
    table: Vec<u32>,
    rows: Range<usize>,
    start_pos: usize,
    /// `[positions][n_kv_heads*head_dim]` for positions `0..start_pos + rows.len()`.
    k: Vec<f32>,
    v: Vec<f32>,
}

struct Batch {
    geom: KvGeometry,
    n_heads: usize,
    cache: LayerKv,
    seqs: Vec<Seq>,
    n_rows: usize,
    q: Vec<f32>,
}

impl Batch {
    fn seq_rows(&self) -> Vec<SeqRows<'_>> {
        self.seqs
            .iter()
            .map(|s| SeqRows { rows: s.rows.clone(), start_pos: s.start_pos, block_table: &s.table })
            .collect()
    }

    fn scale(&self) -> f32 {
        1.0 / (self.geom.head_dim as f32).sqrt()
    }
}

fn rand_vec(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// Builds a batch: `specs` are (positions already cached, rows this step). The cache history is
/// written through `write_kv` in a few random chunks, block tables are drawn from a shuffled pool
/// (non-contiguous, out of order), sequences appear in the batch in random order with a few
/// uncovered rows between them.
fn build(rng: &mut StdRng, geom: KvGeometry, n_heads: usize, specs: &[(usize, usize)], amp: f32) -> Batch {
    let bs = geom.block_size;
    let width = geom.n_kv_heads * geom.head_dim;
    let needed: Vec<usize> = specs.iter().map(|&(h, n)| (h + n).div_ceil(bs)).collect();
    let num_blocks = needed.iter().sum::<usize>() + 7;
    let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
    pool.shuffle(rng);
    let mut cache = LayerKv::new(geom, num_blocks);

    // Batch order of the sequences, with gaps of uncovered rows.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.shuffle(rng);
    let mut row_of = vec![0; specs.len()];
    let mut n_rows = 0;
    for &s in &order {
        n_rows += rng.random_range(0..2);
        row_of[s] = n_rows;
        n_rows += specs[s].1;
    }

    let mut seqs = Vec::new();
    for (s, &(hist, n)) in specs.iter().enumerate() {
        let table: Vec<u32> = pool.drain(..needed[s]).collect();
        let total = hist + n;
        let k = rand_vec(rng, total * width, amp);
        let v = rand_vec(rng, total * width, 1.0);
        // History in random chunks, as earlier steps would have written it.
        let mut p = 0;
        while p < hist {
            let c = rng.random_range(1..=hist - p);
            let sr = [SeqRows { rows: 0..c, start_pos: p, block_table: &table }];
            write_kv(&mut cache, &k[p * width..(p + c) * width], &v[p * width..(p + c) * width], &sr)
                .expect("history write");
            p += c;
        }
        seqs.push(Seq { table, rows: row_of[s]..row_of[s] + n, start_pos: hist, k, v });
    }

    // This step's rows, written as one batch.
    let mut step_k = vec![0.0; n_rows * width];
    let mut step_v = vec![0.0; n_rows * width];
    for s in &seqs {
        for (r, i) in s.rows.clone().enumerate() {
            let p = s.start_pos + r;
            step_k[i * width..(i + 1) * width].copy_from_slice(&s.k[p * width..(p + 1) * width]);
            step_v[i * width..(i + 1) * width].copy_from_slice(&s.v[p * width..(p + 1) * width]);
        }
    }
    let sr: Vec<SeqRows> = seqs
        .iter()
        .map(|s| SeqRows { rows: s.rows.clone(), start_pos: s.start_pos, block_table: &s.table })
        .collect();
    write_kv(&mut cache, &step_k, &step_v, &sr).expect("step write");
    drop(sr);
    let q = rand_vec(rng, n_rows * n_heads * geom.head_dim, amp);
    Batch { geom, n_heads, cache, seqs, n_rows, q }
}

/// Causal attention from the contiguous per-sequence K/V, no paging involved.
fn dense(b: &Batch) -> Vec<f32> {
    let d = b.geom.head_dim;
    let width = b.geom.n_kv_heads * d;
    let n_rep = b.n_heads / b.geom.n_kv_heads;
    let mut out = vec![f32::NAN; b.q.len()];
    for s in &b.seqs {
        for (r, i) in s.rows.clone().enumerate() {
            let p = s.start_pos + r;
            for h in 0..b.n_heads {
                let g = h / n_rep;
                let qh = &b.q[(i * b.n_heads + h) * d..][..d];
                let scores: Vec<f32> = (0..=p)
                    .map(|t| {
                        let kt = &s.k[t * width + g * d..][..d];
                        b.scale() * qh.iter().zip(kt).map(|(x, y)| x * y).sum::<f32>()
                    })
                    .collect();
                let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let w: Vec<f32> = scores.iter().map(|x| (x - mx).exp()).collect();
                let sum: f32 = w.iter().sum();
                let o = &mut out[(i * b.n_heads + h) * d..][..d];
                o.fill(0.0);
                for (t, wt) in w.iter().enumerate() {
                    for (x, y) in o.iter_mut().zip(&s.v[t * width + g * d..][..d]) {
                        *x += wt / sum * y;
                    }
                }
            }
        }
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_nan() && y.is_nan() { 0.0 } else { (x - y).abs() })
        .fold(0.0, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
}

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.is_available()).collect()
}

/// Fast kernel (every available ISA) vs reference, untouched rows checked too.
fn check_fast(b: &Batch) {
    let sr = b.seq_rows();
    let mut want = vec![f32::NAN; b.q.len()];
    paged_attention_reference(&b.cache, &b.q, b.n_heads, b.scale(), &sr, &mut want).expect("reference");
    for isa in isas() {
        let mut got = vec![f32::NAN; b.q.len()];
        paged_attention_with(isa, &b.cache, &b.q, b.n_heads, b.scale(), &sr, &mut got).expect("fast");
        let diff = max_diff(&got, &want);
        assert!(
            diff <= 1e-5,
            "{isa:?} {:?} heads {} seqs {:?}: max diff {diff}",
            b.geom,
            b.n_heads,
            b.seqs.iter().map(|s| (s.start_pos, s.rows.len())).collect::<Vec<_>>()
        );
    }
}

/// Prefill chunks from 0 and mid-sequence, decodes, short and long histories.
const MIX: &[(usize, usize)] =
    &[(0, 37), (45, 20), (130, 1), (0, 1), (7, 1), (200, 40), (64, 40), (100, 2), (0, 2)];

#[test]
fn fast_matches_reference_on_mixed_batches() {
    let mut rng = StdRng::seed_from_u64(1);
    for &bs in &[1, 5, 8, 16, 32] {
        for &d in &[64, 128] {
            for &(n_heads, n_kv) in &[(4, 4), (9, 3), (6, 2)] {
                let geom = KvGeometry { block_size: bs, n_kv_heads: n_kv, head_dim: d };
                let b = build(&mut rng, geom, n_heads, MIX, 1.0);
                check_fast(&b);
            }
        }
    }
}

#[test]
fn fast_matches_reference_odd_head_dims_and_peaky_softmax() {
    let mut rng = StdRng::seed_from_u64(2);
    // head_dim not a multiple of the vector width exercises the tails; amplitude 4 gives scores
    // of tens, so later tiles raise the running max and rescale the accumulators.
    for &(d, amp) in &[(80, 1.0), (36, 4.0), (8, 1.0), (3, 2.0), (64, 4.0)] {
        let geom = KvGeometry { block_size: 16, n_kv_heads: 2, head_dim: d };
        let b = build(&mut rng, geom, 6, &[(0, 50), (200, 1), (90, 33)], amp);
        check_fast(&b);
    }
}

#[test]
fn fast_matches_reference_on_parallel_and_split_paths() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().expect("pool");
    pool.install(|| {
        let mut rng = StdRng::seed_from_u64(3);
        for &(bs, n_heads, n_kv, d) in &[(16, 9, 3, 64), (32, 8, 8, 128), (1, 12, 4, 64)] {
            let geom = KvGeometry { block_size: bs, n_kv_heads: n_kv, head_dim: d };
            // A lone long decode is split across key ranges; a long prefill across row chunks.
            let b = build(&mut rng, geom, n_heads, &[(4000, 1)], 1.0);
            check_fast(&b);
            let b = build(&mut rng, geom, n_heads, &[(0, 200), (1000, 1), (700, 1)], 1.0);
            check_fast(&b);
            let b = build(&mut rng, geom, n_heads, &[(300, 100)], 1.0);
            check_fast(&b);
        }
    });
}

#[test]
fn reference_matches_dense_attention() {
    let mut rng = StdRng::seed_from_u64(4);
    for &(bs, n_heads, n_kv, d) in &[(1, 4, 4, 64), (16, 9, 3, 64), (32, 8, 2, 128), (3, 6, 3, 16)] {
        let geom = KvGeometry { block_size: bs, n_kv_heads: n_kv, head_dim: d };
        let b = build(&mut rng, geom, n_heads, MIX, 1.0);
        let sr = b.seq_rows();
        let mut got = vec![f32::NAN; b.q.len()];
        paged_attention_reference(&b.cache, &b.q, n_heads, b.scale(), &sr, &mut got).expect("reference");
        let want = dense(&b);
        let diff = max_diff(&got, &want);
        assert!(diff <= 1e-5, "bs {bs} d {d}: max diff {diff}");
        // Rows between sequences stay untouched.
        let covered: usize = b.seqs.iter().map(|s| s.rows.len()).sum();
        let nan_rows = got.chunks(n_heads * d).filter(|r| r.iter().all(|x| x.is_nan())).count();
        assert_eq!(nan_rows, b.n_rows - covered);
    }
}

#[test]
fn shared_prefix_blocks_and_copy_block() {
    // Two sequences share their first block (prefix caching); copy-on-write of the second.
    let geom = KvGeometry { block_size: 4, n_kv_heads: 1, head_dim: 16 };
    let mut rng = StdRng::seed_from_u64(5);
    let mut cache = LayerKv::new(geom, 4);
    let k = rand_vec(&mut rng, 6 * 16, 1.0);
    let v = rand_vec(&mut rng, 6 * 16, 1.0);
    let ta = [2u32, 0];
    write_kv(&mut cache, &k, &v, &[SeqRows { rows: 0..6, start_pos: 0, block_table: &ta }]).expect("write");
    cache.copy_block(0, 3).expect("copy");
    let tb = [2u32, 3];
    let q = rand_vec(&mut rng, 2 * 2 * 16, 1.0);
    let seqs = [
        SeqRows { rows: 0..1, start_pos: 5, block_table: &ta },
        SeqRows { rows: 1..2, start_pos: 5, block_table: &tb },
    ];
    let mut out = vec![0.0; q.len()];
    // Same query for both rows -> same output, since block 3 is a copy of block 0.
    let q2: Vec<f32> = q[..32].iter().chain(&q[..32]).copied().collect();
    paged_attention(&cache, &q2, 2, 0.25, &seqs, &mut out).expect("attn");
    assert_eq!(out[..32], out[32..]);
    assert!(cache.copy_block(4, 0).is_err());
}

#[test]
fn attention_rejects_bad_input() {
    let geom = KvGeometry { block_size: 16, n_kv_heads: 2, head_dim: 8 };
    let cache = LayerKv::new(geom, 4);
    let table = [0u32, 1, 2];
    let q = vec![0.0; 3 * 4 * 8];
    let mut out = vec![0.0; q.len()];
    let seq =
        |rows: Range<usize>, start_pos: usize, t: &'static [u32]| SeqRows { rows, start_pos, block_table: t };
    let ok = [SeqRows { rows: 0..3, start_pos: 40, block_table: &table }];
    for f in [paged_attention_reference, paged_attention] {
        assert!(f(&cache, &q, 4, 1.0, &ok, &mut out).is_ok());
        // heads not a multiple of kv heads / zero heads
        assert!(f(&cache, &q, 3, 1.0, &ok, &mut out).is_err());
        assert!(f(&cache, &q, 0, 1.0, &ok, &mut out).is_err());
        // q / out lengths
        assert!(f(&cache, &q[1..], 4, 1.0, &ok, &mut out[1..]).is_err());
        assert!(f(&cache, &q, 4, 1.0, &ok, &mut out[..8]).is_err());
        // rows outside the batch, reversed, overlapping
        assert!(f(&cache, &q, 4, 1.0, &[seq(2..4, 0, &[0])], &mut out).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let rev = [seq(2..1, 0, &[0])];
        assert!(f(&cache, &q, 4, 1.0, &rev, &mut out).is_err());
        assert!(f(&cache, &q, 4, 1.0, &[seq(0..2, 0, &[0]), seq(1..3, 0, &[1])], &mut out).is_err());
        // block table too short for the positions; block id out of range
        assert!(f(&cache, &q, 4, 1.0, &[seq(0..3, 46, &[0, 1, 2])], &mut out).is_err());
        assert!(f(&cache, &q, 4, 1.0, &[seq(0..1, 0, &[4])], &mut out).is_err());
        // an unused bad entry past the needed blocks is fine
        assert!(f(&cache, &q, 4, 1.0, &[seq(0..1, 0, &[0, 99])], &mut out).is_ok());
        // position overflow
        assert!(f(&cache, &q, 4, 1.0, &[seq(0..2, usize::MAX, &[0])], &mut out).is_err());
        // empty sequences are fine and touch nothing
        assert!(f(&cache, &q, 4, 1.0, &[seq(1..1, 1 << 40, &[])], &mut out).is_ok());
    }
    let zero = LayerKv::new(KvGeometry { block_size: 0, n_kv_heads: 2, head_dim: 8 }, 4);
    assert!(paged_attention(&zero, &q, 4, 1.0, &ok, &mut out).is_err());
    assert!(LayerKv::try_new(zero.geometry(), 4).is_err());
    assert!(LayerKv::try_new(geom, usize::MAX / 4).is_err());
}

#[test]
fn write_kv_rejects_bad_input_and_leaves_cache_unchanged() {
    let geom = KvGeometry { block_size: 4, n_kv_heads: 2, head_dim: 8 };
    let mut cache = LayerKv::new(geom, 3);
    let k = vec![1.0; 5 * 16];
    let v = vec![2.0; 5 * 16];
    let table = [2u32, 0];
    let s =
        |rows: Range<usize>, start_pos: usize, t: &'static [u32]| SeqRows { rows, start_pos, block_table: t };
    assert!(write_kv(&mut cache, &k[1..], &v[1..], &[s(0..1, 0, &[0])]).is_err());
    assert!(write_kv(&mut cache, &k, &v[16..], &[s(0..1, 0, &[0])]).is_err());
    assert!(write_kv(&mut cache, &k, &v, &[s(0..6, 0, &[0, 1])]).is_err());
    // second block out of range: nothing written, not even the first block's rows
    assert!(write_kv(&mut cache, &k, &v, &[s(0..5, 0, &[0, 3])]).is_err());
    assert!(write_kv(&mut cache, &k, &v, &[s(0..5, 0, &[0])]).is_err());
    assert!(cache.k.iter().chain(&cache.v).all(|&x| x == 0.0));
    // a write starting in block 1 does not need block 0 to be valid
    assert!(write_kv(&mut cache, &k, &v, &[s(0..2, 4, &[99, 1])]).is_ok());
    let sr = [SeqRows { rows: 0..5, start_pos: 0, block_table: &table }];
    assert!(write_kv(&mut cache, &k, &v, &sr).is_ok());
}

#[test]
fn rope_matches_direct_formula() {
    for &(d, theta) in &[(64usize, 10000.0f32), (128, 500000.0), (8, 10000.0)] {
        let rope = Rope::new(d, theta, 64);
        let n_heads = 3;
        let mut rng = StdRng::seed_from_u64(6);
        let positions: Vec<usize> = vec![0, 1, 2, 17, 63, 64, 1000, 4095];
        let x = rand_vec(&mut rng, positions.len() * n_heads * d, 1.0);
        let mut y = x.clone();
        rope.apply(&mut y, n_heads, &positions).expect("rope");
        let half = d / 2;
        for (r, &pos) in positions.iter().enumerate() {
            for h in 0..n_heads {
                let base = (r * n_heads + h) * d;
                for j in 0..half {
                    let inv = 1.0 / (theta as f64).powf(2.0 * j as f64 / d as f64);
                    let ang = pos as f64 * inv;
                    let (a, b) = (x[base + j] as f64, x[base + j + half] as f64);
                    let e1 = a * ang.cos() - b * ang.sin();
                    let e2 = b * ang.cos() + a * ang.sin();
                    // f32 angles carry a relative rounding error of ~2^-23, i.e. an absolute
                    // one growing with the position, exactly as in transformers.
                    let tol = 1e-6 + 2.0 * ang.abs() * f32::EPSILON as f64;
                    assert!((y[base + j] as f64 - e1).abs() <= tol, "d {d} pos {pos} j {j}");
                    assert!((y[base + j + half] as f64 - e2).abs() <= tol, "d {d} pos {pos} j {j}");
                }
            }
        }
    }
}

#[test]
fn rope_identity_at_zero_norms_and_table_independence() {
    let d = 64;
    let small = Rope::new(d, 10000.0, 16);
    let big = Rope::new(d, 10000.0, 5000);
    assert_eq!(small.inv_freq(), big.inv_freq());
    let mut rng = StdRng::seed_from_u64(7);
    let x = rand_vec(&mut rng, 4 * 2 * d, 1.0);

    let mut y = x.clone();
    small.apply(&mut y, 2, &[0, 0, 0, 0]).expect("rope");
    assert_eq!(x, y);

    let positions = [3, 15, 16, 4999];
    let mut a = x.clone();
    let mut b = x.clone();
    small.apply(&mut a, 2, &positions).expect("rope");
    big.apply(&mut b, 2, &positions).expect("rope");
    assert_eq!(a, b, "on-the-fly angles must equal tabulated ones");

    for (xh, ah) in x.chunks(d).zip(a.chunks(d)) {
        for j in 0..d / 2 {
            let n0 = xh[j].hypot(xh[j + d / 2]);
            let n1 = ah[j].hypot(ah[j + d / 2]);
            assert!((n0 - n1).abs() <= 1e-6 * n0.max(1.0));
        }
    }

    let from = Rope::from_inv_freq(big.inv_freq().to_vec(), 100);
    let mut c = x.clone();
    from.apply(&mut c, 2, &positions).expect("rope");
    assert_eq!(a, c);
}

#[test]
fn rope_rejects_bad_input() {
    let rope = Rope::new(64, 10000.0, 8);
    let mut x = vec![0.0; 2 * 64 * 2];
    assert!(rope.apply(&mut x, 2, &[0, 1]).is_ok());
    assert!(rope.apply(&mut x, 2, &[0]).is_err());
    assert!(rope.apply(&mut x, 0, &[]).is_err());
    assert!(rope.apply(&mut x[1..], 2, &[0, 1]).is_err());
    let odd = Rope::new(7, 10000.0, 8);
    let mut y = vec![0.0; 7];
    assert!(odd.apply(&mut y, 1, &[0]).is_err());
    let empty = Rope::new(0, 10000.0, 8);
    assert!(empty.apply(&mut [], 1, &[]).is_err());
}
