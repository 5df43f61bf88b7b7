use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::*;

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// Random GGML bytes with realistic scales: d in [1e-3, 2e-2], Q4_1 m ≈ −(4..12)·d.
fn random_ggml(format: QuantFormat, out: usize, inp: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(out * inp / 32 * format.ggml_block_bytes());
    for _ in 0..out * inp / 32 {
        let d: f32 = rng.random_range(1e-3..2e-2);
        bytes.extend_from_slice(&h(d));
        match format {
            QuantFormat::Q4_1 => {
                let m = -d * rng.random_range(4.0..12.0f32);
                bytes.extend_from_slice(&h(m));
                bytes.extend((0..16).map(|_| rng.random::<u8>()));
            }
            QuantFormat::Q8_0 => bytes.extend((0..32).map(|_| rng.random::<u8>())),
        }
    }
    bytes
}

/// Uniform activations in [-1, 1]; every 97th channel is a 10x outlier, like the fixed
/// "massive activation" channels of real hidden states.
fn random_x(n: usize, rng: &mut StdRng) -> Vec<f32> {
    random_x_with(n, rng, true)
}

fn random_x_with(n: usize, rng: &mut StdRng, outliers: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if outliers && i % 97 == 13 {
                v * 10.0
            } else {
                v
            }
        })
        .collect()
}

fn paths() -> Vec<MatmulPath> {
    MatmulPath::ALL.into_iter().filter(|p| p.is_available()).collect()
}

#[test]
fn dequantize_q4_1_handmade() {
    // Row 0: d = 0.5, m = −1; byte j has low nibble j and high nibble 15 − j.
    // Row 1: d = 0.25, m = 2, all bytes 0xA3 (low nibble 3, high nibble 10).
    let mut bytes = Vec::new();
    for row in 0..2 {
        for _block in 0..2 {
            if row == 0 {
                bytes.extend_from_slice(&h(0.5));
                bytes.extend_from_slice(&h(-1.0));
                bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
            } else {
                bytes.extend_from_slice(&h(0.25));
                bytes.extend_from_slice(&h(2.0));
                bytes.extend([0xA3u8; 16]);
            }
        }
    }
    let m = QuantMatrix::from_ggml_bytes(QuantFormat::Q4_1, 2, 64, &bytes).expect("valid");
    let w = m.dequantize();
    for block in 0..2 {
        for j in 0..16 {
            assert_eq!(w[block * 32 + j], 0.5 * j as f32 - 1.0);
            assert_eq!(w[block * 32 + 16 + j], 0.5 * (15 - j) as f32 - 1.0);
            assert_eq!(w[64 + block * 32 + j], 0.25 * 3.0 + 2.0);
            assert_eq!(w[64 + block * 32 + 16 + j], 0.25 * 10.0 + 2.0);
        }
    }
    let mut row = vec![0f32; 64];
    m.dequantize_row(1, &mut row).expect("valid row");
    assert_eq!(row[..], w[64..]);
}

#[test]
fn dequantize_q4_1_is_mul_then_add() {
    // d · q + m rounded twice (no FMA): pick values where fusing would change the result.
    let (d, mm) = (f16::from_f32(0.1).to_f32(), f16::from_f32(-0.7).to_f32());
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&h(0.1));
    bytes.extend_from_slice(&h(-0.7));
    bytes.extend((0..16u8).map(|j| j | (j << 4)));
    let m = QuantMatrix::from_ggml_bytes(QuantFormat::Q4_1, 1, 32, &bytes).expect("valid");
    let w = m.dequantize();
    for j in 0..16 {
        let want = d * j as f32 + mm;
        assert_eq!(w[j].to_bits(), want.to_bits());
        assert_eq!(w[j + 16].to_bits(), want.to_bits());
    }
}

#[test]
fn dequantize_q8_0_handmade() {
    // 17 rows so the second storage group is a padded one; row r has d = 2^-(r % 4), q_j = j − 16 + r.
    let (out, inp) = (17, 64);
    let mut bytes = Vec::new();
    for r in 0..out {
        for _ in 0..inp / 32 {
            bytes.extend_from_slice(&h(0.5f32.powi((r % 4) as i32)));
            bytes.extend((0..32i32).map(|j| (j - 16 + r as i32) as i8 as u8));
        }
    }
    let m = QuantMatrix::from_ggml_bytes(QuantFormat::Q8_0, out, inp, &bytes).expect("valid");
    let w = m.dequantize();
    for r in 0..out {
        for i in 0..inp {
            let want = 0.5f32.powi((r % 4) as i32) * ((i % 32) as i32 - 16 + r as i32) as f32;
            assert_eq!(w[r * inp + i], want, "row {r} col {i}");
        }
    }
    assert!(m.storage_bytes() >= bytes.len());
}

#[test]
fn packing_round_trips_ggml_bytes() {
    let mut rng = StdRng::seed_from_u64(1);
    for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
        let (out, inp) = (37, 96);
        let bytes = random_ggml(format, out, inp, &mut rng);
        let m = QuantMatrix::from_ggml_bytes(format, out, inp, &bytes).expect("valid");
        let bs = format.ggml_block_bytes();
        let mut block = vec![0u8; bs];
        for o in 0..out {
            for b in 0..inp / 32 {
                m.get_block(o, b, &mut block);
                assert_eq!(block[..], bytes[(o * inp / 32 + b) * bs..][..bs]);
            }
        }
    }
}

/// max |y − y_ref| ≤ tol · max |y_ref|
fn assert_close(y: &[f32], y_ref: &[f32], tol: f32, what: &str) {
    let scale = y_ref.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = y.iter().zip(y_ref).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
    assert!(err <= tol * scale, "{what}: max err {err} vs max |y| {scale}");
}

/// Per-output bound on the error that int8 activation quantization may introduce: the kernels
/// compute W·x̃ exactly up to f32 rounding, so |Σ_i w_i (x̃_i − x_i)| ≤ Σ_b (max|x_b| / 254) ·
/// Σ_{i∈b} |w_i|, plus slack for f32 summation.
fn error_bounds(w: &[f32], out: usize, inp: usize, x: &[f32]) -> Vec<f32> {
    let rows = x.len() / inp;
    let mut bounds = vec![0f32; rows * out];
    for r in 0..rows {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            let (mut quant, mut mag) = (0f64, 0f64);
            for b in 0..inp / 32 {
                let amax = xr[b * 32..(b + 1) * 32].iter().fold(0f32, |a, v| a.max(v.abs()));
                let ws: f64 = w[o * inp + b * 32..][..32].iter().map(|t| t.abs() as f64).sum();
                quant += amax as f64 / 254.0 * ws * 1.0001;
            }
            for i in 0..inp {
                mag += (xr[i] * w[o * inp + i]).abs() as f64;
            }
            bounds[r * out + o] = (quant + 1e-5 * mag + 1e-30) as f32;
        }
    }
    bounds
}

fn assert_within_bounds(y: &[f32], y_ref: &[f32], bounds: &[f32], what: &str) {
    for (i, ((p, q), b)) in y.iter().zip(y_ref).zip(bounds).enumerate() {
        assert!((p - q).abs() <= *b, "{what}: y[{i}] = {p}, reference {q}, bound {b}");
    }
}

#[test]
fn matmul_all_paths_match_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows_set, in_set, out_set): (&[usize], &[usize], &[usize]) = if cfg!(debug_assertions) {
        (&[1, 3, 9, 33], &[32, 96, 576], &[1, 5, 192])
    } else {
        (&[1, 2, 3, 7, 8, 9, 33, 130], &[32, 64, 96, 576, 1536], &[1, 5, 192, 577])
    };
    // Worst max|err| / max|y| without and with outlier channels.
    let mut worst = [0f32; 2];
    for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
        for &inp in in_set {
            for &out in out_set {
                let bytes = random_ggml(format, out, inp, &mut rng);
                let m = QuantMatrix::from_ggml_bytes(format, out, inp, &bytes).expect("valid");
                let w = m.dequantize();
                for (i, &rows) in rows_set.iter().enumerate() {
                    let outliers = i % 2 == 1;
                    let x = random_x_with(rows * inp, &mut rng, outliers);
                    let mut y_ref = vec![0f32; rows * out];
                    m.matmul_f32_reference(&x, rows, &mut y_ref).expect("shapes");
                    let bounds = error_bounds(&w, out, inp, &x);
                    let mut y_scalar = vec![f32::NAN; rows * out];
                    m.matmul_with_path(MatmulPath::Scalar, &x, rows, &mut y_scalar).expect("ok");
                    let what = format!("{format:?} rows {rows} in {inp} out {out}");
                    assert_within_bounds(&y_scalar, &y_ref, &bounds, &format!("scalar {what}"));
                    if rows * out >= 64 && inp >= 576 {
                        // Enough outputs and terms for max |y| to be a meaningful scale. A 32-block
                        // holding a 10x outlier channel quantizes its neighbours 10x coarser, so
                        // outlier data gets twice the tolerance.
                        let tol = if outliers { 2e-2 } else { 1e-2 };
                        assert_close(&y_scalar, &y_ref, tol, &format!("scalar {what}"));
                        let scale = y_ref.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let err = y_scalar.iter().zip(&y_ref).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                        worst[outliers as usize] = worst[outliers as usize].max(err / scale);
                    }
                    for path in paths() {
                        // y pre-filled with NaN: every element must be overwritten.
                        let mut y = vec![f32::NAN; rows * out];
                        m.matmul_with_path(path, &x, rows, &mut y).expect("ok");
                        assert_within_bounds(&y, &y_ref, &bounds, &format!("{path:?} {what}"));
                        // Same quantized activations as the scalar twin: only f32 summation
                        // order differs.
                        assert_close(&y, &y_scalar, 1e-5, &format!("{path:?} vs scalar {what}"));
                    }
                    let mut y = vec![f32::NAN; rows * out];
                    m.matmul(&x, rows, &mut y).expect("ok");
                    assert_within_bounds(&y, &y_ref, &bounds, &format!("best {what}"));
                }
            }
        }
    }
    eprintln!(
        "worst max|err| / max|y| of int8-activation matmul: {:e} (uniform x), {:e} (outliers)",
        worst[0], worst[1]
    );
}

#[test]
fn simd_quantizer_matches_scalar() {
    let mut rng = StdRng::seed_from_u64(3);
    let inp = 1536;
    let mut x = random_x(4 * inp, &mut rng);
    x[32..64].fill(0.0); // an all-zero block
    x[100] = 0.5 / 127.0 * 3.0; // a tie-ish value
    let mut a = Acts::default();
    let mut b = Acts::default();
    a.quantize(MatmulPath::Scalar, &x, 4, inp);
    for path in paths() {
        b.quantize(path, &x, 4, inp);
        assert_eq!(a.q, b.q, "{path:?}");
        assert_eq!(a.d, b.d, "{path:?}");
        assert_eq!(a.c, b.c, "{path:?}");
        assert_eq!(a.s, b.s, "{path:?}");
    }
}

#[test]
fn permute_rows_gathers_rows() {
    let mut rng = StdRng::seed_from_u64(11);
    for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
        let (out, inp) = (40, 64);
        let bytes = random_ggml(format, out, inp, &mut rng);
        let m = QuantMatrix::from_ggml_bytes(format, out, inp, &bytes).expect("valid");
        let perm: Vec<usize> = (0..out).map(|i| (i * 7 + 3) % out).collect();
        let p = m.permute_rows(&perm).expect("valid perm");
        let (w, wp) = (m.dequantize(), p.dequantize());
        for (i, &src) in perm.iter().enumerate() {
            assert_eq!(wp[i * inp..(i + 1) * inp], w[src * inp..(src + 1) * inp]);
        }
        let x = random_x(3 * inp, &mut rng);
        let (mut y, mut yp) = (vec![0f32; 3 * out], vec![0f32; 3 * out]);
        m.matmul(&x, 3, &mut y).expect("ok");
        p.matmul(&x, 3, &mut yp).expect("ok");
        for r in 0..3 {
            for (i, &src) in perm.iter().enumerate() {
                assert_eq!(yp[r * out + i].to_bits(), y[r * out + src].to_bits());
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let q = QuantFormat::Q4_1;
    assert!(QuantMatrix::from_ggml_bytes(q, 2, 32, &[0; 39]).is_err());
    assert!(QuantMatrix::from_ggml_bytes(q, 2, 32, &[0; 41]).is_err());
    assert!(QuantMatrix::from_ggml_bytes(q, 2, 48, &[0; 60]).is_err());
    assert!(QuantMatrix::from_ggml_bytes(q, 0, 32, &[]).is_err());
    assert!(QuantMatrix::from_ggml_bytes(q, 2, 0, &[]).is_err());
    assert!(QuantMatrix::from_ggml_bytes(q, usize::MAX / 2, 64, &[0; 40]).is_err());
    assert!(QuantMatrix::from_ggml_bytes(QuantFormat::Q8_0, 1, 32, &[0; 20]).is_err());
    let m = QuantMatrix::from_ggml_bytes(q, 2, 32, &[0; 40]).expect("valid");
    let mut y = vec![0f32; 4];
    assert!(m.matmul(&[0.0; 63], 2, &mut y).is_err());
    assert!(m.matmul(&[0.0; 64], 2, &mut y[..3]).is_err());
    assert!(m.matmul(&[0.0; 64], usize::MAX, &mut y).is_err());
    assert!(m.matmul_f32_reference(&[0.0; 64], 3, &mut y).is_err());
    assert!(m.matmul(&[], 0, &mut []).is_ok());
    assert!(m.permute_rows(&[0]).is_err());
    assert!(m.permute_rows(&[0, 2]).is_err());
    let mut row = vec![0f32; 32];
    assert!(m.dequantize_row(2, &mut row).is_err());
    assert!(m.dequantize_row(0, &mut row[..31]).is_err());
}

#[test]
fn non_finite_activations_do_not_panic() {
    let mut rng = StdRng::seed_from_u64(5);
    for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
        let bytes = random_ggml(format, 20, 64, &mut rng);
        let m = QuantMatrix::from_ggml_bytes(format, 20, 64, &bytes).expect("valid");
        let mut x = random_x(128, &mut rng);
        x[3] = f32::NAN;
        x[40] = f32::INFINITY;
        x[100] = f32::NEG_INFINITY;
        for path in paths() {
            let mut y = vec![0f32; 40];
            m.matmul_with_path(path, &x, 2, &mut y).expect("shapes are fine");
        }
    }
}

#[test]
fn matmul_inside_rayon_tasks() {
    // Nested use from pool threads (the server may call from its own parallel loops).
    let mut rng = StdRng::seed_from_u64(9);
    let bytes = random_ggml(QuantFormat::Q4_1, 192, 576, &mut rng);
    let m = QuantMatrix::from_ggml_bytes(QuantFormat::Q4_1, 192, 576, &bytes).expect("valid");
    let x = random_x(8 * 576, &mut rng);
    let mut want = vec![0f32; 8 * 192];
    m.matmul(&x, 8, &mut want).expect("ok");
    let results: Vec<Vec<f32>> = (0..8)
        .into_par_iter()
        .map(|_| {
            let mut y = vec![0f32; 8 * 192];
            m.matmul(&x, 8, &mut y).expect("ok");
            y
        })
        .collect();
    for y in results {
        assert_close(&y, &want, 1e-6, "nested");
    }
}

#[test]
fn shared_input_matmuls_equal_separate_matmuls_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(21);
    // q/k/v and gate/up of the default model, with odd row counts around the 64-row panels.
    for (inp, outs) in [(576, vec![576, 192, 192]), (576, vec![1536, 1536]), (64, vec![20, 48])] {
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let mats: Vec<QuantMatrix> = outs
                .iter()
                .map(|&o| {
                    let bytes = random_ggml(format, o, inp, &mut rng);
                    QuantMatrix::from_ggml_bytes(format, o, inp, &bytes).expect("valid")
                })
                .collect();
            for rows in [1, 3, 32, 65, 130] {
                let x = random_x(rows * inp, &mut rng);
                let want: Vec<Vec<f32>> = mats
                    .iter()
                    .map(|m| {
                        let mut y = vec![0f32; rows * m.out_features()];
                        m.matmul(&x, rows, &mut y).expect("ok");
                        y
                    })
                    .collect();
                let mut ys: Vec<Vec<f32>> =
                    mats.iter().map(|m| vec![f32::NAN; rows * m.out_features()]).collect();
                let mut outputs: Vec<(&QuantMatrix, &mut [f32])> =
                    mats.iter().zip(ys.iter_mut()).map(|(m, y)| (m, y.as_mut_slice())).collect();
                QuantMatrix::matmul_shared_input(&x, rows, &mut outputs).expect("ok");
                for (k, (y, w)) in ys.iter().zip(&want).enumerate() {
                    let same = y.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{format:?} in {inp} rows {rows}: output {k} differs");
                }
            }
        }
    }
}

#[test]
fn shared_input_matmuls_reject_bad_shapes_and_write_nothing() {
    let mut rng = StdRng::seed_from_u64(22);
    let mut matrix = |inp: usize| {
        let bytes = random_ggml(QuantFormat::Q8_0, 16, inp, &mut rng);
        QuantMatrix::from_ggml_bytes(QuantFormat::Q8_0, 16, inp, &bytes).expect("valid")
    };
    let (a, b) = (matrix(64), matrix(32));
    let x = random_x(2 * 64, &mut rng);
    let (mut ya, mut yb) = (vec![7f32; 32], vec![7f32; 32]);
    assert!(QuantMatrix::matmul_shared_input(&x, 2, &mut [(&a, &mut ya), (&b, &mut yb)]).is_err());
    assert!(QuantMatrix::matmul_shared_input(&x, 2, &mut [(&a, &mut ya), (&a, &mut yb[..31])]).is_err());
    assert!(ya.iter().chain(&yb).all(|&v| v == 7.0), "nothing written on error");
    assert!(QuantMatrix::matmul_shared_input(&x, 2, &mut []).is_ok());
}
