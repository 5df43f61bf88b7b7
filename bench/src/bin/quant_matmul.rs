//! Quantized matmul benchmark: `kernels::quant::QuantMatrix::matmul` on SmolLM2-135M shapes.
//!
//! `cargo run --release -p lorahost-bench --bin quant_matmul [-- --quick --no-scalar --path avx2]`
//!
//! Prints, per shape and activation row count, the median time per call of the fast path and of
//! the scalar path (same algorithm, no SIMD), with weight GB/s and GFLOP/s. "hot" numbers reuse
//! one matrix (cache-resident for small shapes); the "model" section runs every linear layer of
//! the 30-layer model on distinct matrices (~97 MB, larger than L3) like one decode/prefill step.

use std::time::{Duration, Instant};

use kernels::quant::{MatmulPath, QuantFormat, QuantMatrix};
use lorahost_bench::quant::{random_matrix, random_x, Rng};

/// Median seconds of `f` over repetitions filling about `budget` (at least `min_reps`).
fn time_median(budget: Duration, min_reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page-in, thread wake-up, buffer growth
    f();
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < min_reps || (start.elapsed() < budget && samples.len() < 100_000) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn fmt_time(s: f64) -> String {
    if s < 1e-3 {
        format!("{:8.2} us", s * 1e6)
    } else {
        format!("{:8.3} ms", s * 1e3)
    }
}

struct Shape {
    name: &'static str,
    format: QuantFormat,
    out: usize,
    inp: usize,
}

const SHAPES: [Shape; 5] = [
    Shape { name: "q/o 576x576", format: QuantFormat::Q4_1, out: 576, inp: 576 },
    Shape { name: "k/v 192x576", format: QuantFormat::Q4_1, out: 192, inp: 576 },
    Shape { name: "gate/up 1536x576", format: QuantFormat::Q4_1, out: 1536, inp: 576 },
    Shape { name: "down 576x1536", format: QuantFormat::Q4_1, out: 576, inp: 1536 },
    Shape { name: "lm_head 49152x576", format: QuantFormat::Q8_0, out: 49152, inp: 576 },
];

fn run(m: &QuantMatrix, path: MatmulPath, x: &[f32], rows: usize, y: &mut [f32]) {
    if let Err(e) = m.matmul_with_path(path, x, rows, y) {
        panic!("matmul: {e}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let no_scalar = args.iter().any(|a| a == "--no-scalar");
    let budget = Duration::from_millis(if quick { 100 } else { 400 });
    // `--path avx2|scalar` benchmarks another kernel path as the "fast" column.
    let fast = match args.iter().position(|a| a == "--path").and_then(|i| args.get(i + 1)) {
        Some(p) if p == "avx2" => MatmulPath::Avx2,
        Some(p) if p == "scalar" => MatmulPath::Scalar,
        _ => MatmulPath::best(),
    };
    if !fast.is_available() {
        eprintln!("{fast:?} is not available on this CPU");
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("quant_matmul: fast path {fast:?}, {cpus} CPUs (rayon global pool); medians per call");

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    println!(
        "\n{:<18} {:>4} | {:>11} {:>8} {:>8} | {:>11} {:>8} | {:>6}",
        "hot (one matrix)", "rows", "fast", "GB/s", "GFLOP/s", "scalar", "GFLOP/s", "ratio"
    );
    for s in &SHAPES {
        let m = random_matrix(s.format, s.out, s.inp, &mut rng);
        for rows in [1usize, 8, 32, 128] {
            let x = random_x(rows * s.inp, &mut rng);
            let mut y = vec![0f32; rows * s.out];
            let flop = 2.0 * (rows * s.out * s.inp) as f64;
            let t = time_median(budget, 5, || run(&m, fast, &x, rows, &mut y));
            let scalar = if no_scalar {
                None
            } else {
                Some(time_median(budget / 2, 2, || run(&m, MatmulPath::Scalar, &x, rows, &mut y)))
            };
            let (ts, gs, ratio) = match scalar {
                Some(ts) => (fmt_time(ts), format!("{:8.1}", flop / ts * 1e-9), ts / t),
                None => ("-".into(), "-".into(), f64::NAN),
            };
            println!(
                "{:<18} {:>4} | {} {:8.1} {:8.1} | {} {:>8} | {:6.1}",
                s.name,
                rows,
                fmt_time(t),
                m.storage_bytes() as f64 / t * 1e-9,
                flop / t * 1e-9,
                ts,
                gs,
                ratio
            );
        }
    }

    // Whole model, distinct matrices: what one decode step (rows = 1), a batched decode step
    // (rows = 32/64) or a prefill chunk (rows = 128/512) costs in linear layers.
    let layers = 30;
    let mut model = Vec::new();
    for _ in 0..layers {
        for (out, inp) in [(576, 576), (192, 576), (192, 576), (576, 576)] {
            model.push(random_matrix(QuantFormat::Q4_1, out, inp, &mut rng));
        }
        for (out, inp) in [(1536, 576), (1536, 576), (576, 1536)] {
            model.push(random_matrix(QuantFormat::Q4_1, out, inp, &mut rng));
        }
    }
    model.push(random_matrix(QuantFormat::Q8_0, 49152, 576, &mut rng));
    let bytes: usize = model.iter().map(|m| m.storage_bytes()).sum();
    println!(
        "\nmodel: {} matrices, {:.1} MB of weights; linear layers only (no attention/norms)",
        model.len(),
        bytes as f64 * 1e-6
    );
    println!("{:>4} | {:>11} {:>8} {:>10} {:>8}", "rows", "step", "GB/s", "tokens/s", "GFLOP/s");
    let flop_per_row: f64 = model.iter().map(|m| 2.0 * (m.out_features() * m.in_features()) as f64).sum();
    for rows in [1usize, 8, 32, 64, 128, 512] {
        let xs: Vec<Vec<f32>> = [576, 1536].iter().map(|&inp| random_x(rows * inp, &mut rng)).collect();
        let mut ys: Vec<Vec<f32>> = model.iter().map(|m| vec![0f32; rows * m.out_features()]).collect();
        let step = |ys: &mut Vec<Vec<f32>>| {
            for (m, y) in model.iter().zip(ys.iter_mut()) {
                let x = if m.in_features() == 576 { &xs[0] } else { &xs[1] };
                run(m, fast, x, rows, y);
            }
        };
        let budget = if rows >= 128 { budget * 3 } else { budget * 2 };
        let t = time_median(budget, 3, || step(&mut ys));
        println!(
            "{:>4} | {} {:8.1} {:10.1} {:8.1}",
            rows,
            fmt_time(t),
            bytes as f64 / t * 1e-9,
            rows as f64 / t,
            flop_per_row * rows as f64 / t * 1e-9
        );
    }
}
