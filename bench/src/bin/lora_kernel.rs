//! Segmented-LoRA kernel benchmark: `kernels::lora::lora_delta` against two candle baselines on
//! the shapes of the default model (SmolLM2-135M: 576 → 576 / 192 / 1536, 1536 → 576) and of a
//! 7B model (4096 → 4096, 4096 → 11008), for decode- and prefill-like batches.
//!
//! `cargo run --release -p lorahost-bench --bin lora_kernel [-- --quick] [--shapes default|7b|all]
//! [--max-gather-mb N] [--filter SUBSTRING]`
//!
//! Columns (median per call, same process, same threads):
//! - ours: `lora_delta` (segments straight from the workload generator);
//! - loop: a per-adapter loop of candle ops: for each segment `x.narrow(rows) · Aᵀ · Bᵀ · scale`
//!   added to the segment's rows of `y`, then `y` reassembled with one `cat`;
//! - pad: gather-and-pad (S-LoRA's "bmm" baseline): every adapter padded to the batch's max rank
//!   and stacked once outside the timing (scale folded into B), then per call `index_select` of
//!   A and B per row and two batched matmuls (`-` when the gathered weights exceed
//!   `--max-gather-mb`);
//! - base: the f32 base projection `x · Wᵀ` (candle matmul) at the same rows; "ours/base" is the
//!   LoRA overhead on an f32 model.
//!
//! Every operand is reused across repetitions, so shapes whose weights fit in L3 run hot
//! (all columns alike). Each row also checks ours against the candle loop.
//!
//! A second table (skip with `--no-cold`) is decode as a real model sees it: 32 rows with 32
//! distinct rank-16 adapters, each call on a different set of adapters (a different layer), the
//! sets together far larger than L3, so A and B stream from DRAM; it reports the A+B read
//! bandwidth of ours next to the candle loop under the same rotation.
//!
//! `--decode-step` prints the LoRA work of a whole decode step of the default model instead
//! (f32 and int8 adapters, from DRAM and cache-hot), and the same step with each site's Q4_1
//! base matmul before its LoRA call, against the base matmuls alone. `--prefill-step` does the
//! same for a prefill step: 512 rows (the engine's default step budget), 4 adapters of 128 rows.

use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use kernels::lora::workload::{Popularity, SplitMix64, Workload, WorkloadSpec};
use kernels::lora::{lora_delta, lora_delta_fused, Isa, SiteDelta};
use kernels::quant::{QuantFormat, QuantMatrix};
use lorahost_bench::quant::{random_matrix, Rng};

struct Shape {
    name: &'static str,
    inp: usize,
    out: usize,
    big: bool,
}

impl Shape {
    /// Whether `--shapes default|7b|all` includes this shape.
    fn selected(&self, which: &str) -> bool {
        match which {
            "default" => !self.big,
            "7b" => self.big,
            _ => true,
        }
    }
}

const SHAPES: [Shape; 6] = [
    Shape { name: "smol q/o 576→576", inp: 576, out: 576, big: false },
    Shape { name: "smol k/v 576→192", inp: 576, out: 192, big: false },
    Shape { name: "smol gate/up 576→1536", inp: 576, out: 1536, big: false },
    Shape { name: "smol down 1536→576", inp: 1536, out: 576, big: false },
    Shape { name: "7b q/k/v/o 4096→4096", inp: 4096, out: 4096, big: true },
    Shape { name: "7b gate/up 4096→11008", inp: 4096, out: 11008, big: true },
];

/// One batch: rows, distinct adapters, their ranks (adapter a has `ranks[a % len]`), popularity.
struct Batch {
    rows: usize,
    adapters: usize,
    ranks: &'static [usize],
    pop: Popularity,
}

const BATCHES: [Batch; 8] = [
    Batch { rows: 1, adapters: 1, ranks: &[16], pop: Popularity::Identical },
    Batch { rows: 8, adapters: 8, ranks: &[16], pop: Popularity::Distinct },
    Batch { rows: 32, adapters: 32, ranks: &[16], pop: Popularity::Distinct },
    Batch { rows: 32, adapters: 32, ranks: &[64], pop: Popularity::Distinct },
    Batch { rows: 32, adapters: 8, ranks: &[16], pop: Popularity::Zipf(1.0) },
    Batch { rows: 128, adapters: 32, ranks: &[16], pop: Popularity::Zipf(1.0) },
    Batch { rows: 256, adapters: 32, ranks: &[8, 16, 32, 64], pop: Popularity::Zipf(1.0) },
    Batch { rows: 256, adapters: 4, ranks: &[16], pop: Popularity::Distinct },
];

/// Median seconds of `f` over repetitions filling about `budget` (at least `min_reps`), after
/// one warm-up call.
fn time_median(budget: Duration, min_reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < min_reps || (start.elapsed() < budget && samples.len() < 10_000) {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn fmt_time(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

/// Per adapter: `Aᵀ` `[in, r]`, `Bᵀ` `[r, out]` (transposed views, no copies) and the scale.
struct LoopWeights {
    a_t: Tensor,
    b_t: Tensor,
    scale: f64,
}

fn loop_weights(w: &Workload, dev: &Device) -> Result<Vec<LoopWeights>> {
    let (inp, out) = (w.in_features, w.out_features[0]);
    w.adapters[0]
        .iter()
        .map(|ad| {
            let a = Tensor::from_slice(&ad.a, (ad.rank, inp), dev)?;
            let b = Tensor::from_slice(&ad.b, (out, ad.rank), dev)?;
            Ok(LoopWeights { a_t: a.t()?, b_t: b.t()?, scale: ad.scale as f64 })
        })
        .collect()
}

/// A workload as candle tensors: x, the base y, the per-adapter weights and the segments
/// (rows, adapter).
struct CandleBatch {
    x: Tensor,
    y: Tensor,
    weights: Vec<LoopWeights>,
    segs: Vec<(Range<usize>, usize)>,
}

impl CandleBatch {
    fn new(w: &Workload, dev: &Device) -> Result<Self> {
        Ok(CandleBatch {
            x: Tensor::from_slice(&w.x, (w.rows, w.in_features), dev)?,
            y: Tensor::from_slice(&w.y[0], (w.rows, w.out_features[0]), dev)?,
            weights: loop_weights(w, dev)?,
            segs: w.runs.iter().filter_map(|(r, a)| a.map(|a| (r.clone(), a))).collect(),
        })
    }
}

/// Baseline (a): one pair of candle matmuls per segment, results added into `y`'s rows.
fn per_adapter_loop(
    x: &Tensor,
    y: &Tensor,
    rows: usize,
    segs: &[(Range<usize>, usize)],
    ws: &[LoopWeights],
) -> Result<Tensor> {
    let mut pieces = Vec::with_capacity(2 * segs.len() + 1);
    let mut cursor = 0;
    for (r, a) in segs {
        if r.start > cursor {
            pieces.push(y.narrow(0, cursor, r.start - cursor)?);
        }
        let w = &ws[*a];
        let d = x.narrow(0, r.start, r.len())?.matmul(&w.a_t)?.matmul(&w.b_t)?.affine(w.scale, 0.0)?;
        pieces.push((y.narrow(0, r.start, r.len())? + d)?);
        cursor = r.end;
    }
    if cursor < rows {
        pieces.push(y.narrow(0, cursor, rows - cursor)?);
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

/// Stacked, padded weights for baseline (b): slot `n_adapters` is all zeros (base rows).
struct PadWeights {
    a: Tensor,
    b: Tensor,
    rmax: usize,
}

fn pad_weights(w: &Workload, dev: &Device) -> Result<PadWeights> {
    let (inp, out) = (w.in_features, w.out_features[0]);
    let ads = &w.adapters[0];
    let rmax = ads.iter().map(|a| a.rank).max().unwrap_or(0);
    let slots = ads.len() + 1;
    let mut a = vec![0f32; slots * rmax * inp];
    let mut b = vec![0f32; slots * out * rmax];
    for (s, ad) in ads.iter().enumerate() {
        a[s * rmax * inp..][..ad.rank * inp].copy_from_slice(&ad.a);
        for o in 0..out {
            for j in 0..ad.rank {
                b[(s * out + o) * rmax + j] = ad.scale * ad.b[o * ad.rank + j];
            }
        }
    }
    Ok(PadWeights {
        a: Tensor::from_vec(a, (slots, rmax, inp), dev)?,
        b: Tensor::from_vec(b, (slots, out, rmax), dev)?,
        rmax,
    })
}

/// Baseline (b): gather each row's padded A and B, then two batched matmuls.
fn gather_pad(x: &Tensor, y: &Tensor, owner: &[u32], p: &PadWeights, dev: &Device) -> Result<Tensor> {
    let rows = owner.len();
    let idx = Tensor::from_slice(owner, rows, dev)?;
    let a = p.a.index_select(&idx, 0)?; // (rows, rmax, in)
    let t = x.unsqueeze(1)?.matmul(&a.transpose(1, 2)?)?; // (rows, 1, rmax)
    let b = p.b.index_select(&idx, 0)?; // (rows, out, rmax)
    let d = t.matmul(&b.transpose(1, 2)?)?; // (rows, 1, out)
    Ok((y + d.squeeze(1)?)?)
}

/// Bytes of adapter weights the cold rotation cycles through (well past any L3).
const COLD_BYTES: usize = 256 << 20;

/// Decode with weights from DRAM: see the module docs.
fn cold_decode(which: &str, budget: Duration) -> Result<()> {
    let dev = Device::Cpu;
    let (rows, adapters, rank) = (32, 32, 16);
    println!(
        "\ndecode, weights from DRAM: {rows} rows x {adapters} distinct adapters, rank {rank}, each call on"
    );
    println!("another adapter set (rotation of >= {} MB); time per call\n", COLD_BYTES >> 20);
    println!(
        "| shape | sets | ours | ours A+B GB/s | ours, int8 A/B | f32/int8 | per-adapter loop | loop/ours |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for shape in &SHAPES {
        if !shape.selected(which) {
            continue;
        }
        let (inp, out) = (shape.inp, shape.out);
        let set_bytes = adapters * rank * (inp + out) * 4;
        let n_sets = COLD_BYTES.div_ceil(set_bytes).max(2);
        let mut sets = Vec::with_capacity(n_sets);
        for k in 0..n_sets {
            let spec = WorkloadSpec {
                popularity: Popularity::Distinct,
                seed: 1000 + k as u64,
                ..WorkloadSpec::new(rows, inp, out, adapters, rank)
            };
            sets.push(Workload::generate(&spec)?);
        }
        let segs: Vec<Vec<_>> = sets.iter().map(|w| w.segments(0)).collect();
        let mut ys: Vec<Vec<f32>> = sets.iter().map(|w| w.y[0].clone()).collect();
        let ours = time_median(budget, 3, || {
            for ((w, s), y) in sets.iter().zip(&segs).zip(ys.iter_mut()) {
                lora_delta(&w.x, inp, y, out, s)?;
            }
            Ok(())
        })? / n_sets as f64;
        // The same sets with A and B in int8 (how adapters serve next to a quantized base).
        let quantized: Vec<Workload> = sets
            .iter()
            .map(|w| {
                let mut q = w.clone();
                q.quantize_int8();
                q
            })
            .collect();
        let qsegs: Vec<Vec<_>> = quantized.iter().map(|w| w.segments(0)).collect();
        let int8 = time_median(budget, 3, || {
            for ((w, s), y) in quantized.iter().zip(&qsegs).zip(ys.iter_mut()) {
                lora_delta(&w.x, inp, y, out, s)?;
            }
            Ok(())
        })? / n_sets as f64;
        drop(qsegs);
        drop(quantized);
        // The candle loop under the same rotation (its own copy of the weights).
        let cand: Vec<CandleBatch> = sets.iter().map(|w| CandleBatch::new(w, &dev)).collect::<Result<_>>()?;
        drop(segs);
        drop(sets);
        let looped = time_median(budget, 3, || {
            for c in &cand {
                per_adapter_loop(&c.x, &c.y, rows, &c.segs, &c.weights)?;
            }
            Ok(())
        })? / n_sets as f64;
        println!(
            "| {} | {n_sets} | {} | {:.1} | {} | {:.2}x | {} | {:.1}x |",
            shape.name,
            fmt_time(ours),
            set_bytes as f64 / ours * 1e-9,
            fmt_time(int8),
            ours / int8,
            fmt_time(looped),
            looped / ours
        );
    }
    Ok(())
}

/// One fused LoRA call over the sites of `w` that share its input, adding into `ys` (one output
/// per site), as the model makes it for q/k/v and gate/up.
fn group_lora(w: &Workload, ys: &mut [Vec<f32>]) -> Result<()> {
    let segs: Vec<Vec<_>> = (0..w.out_features.len()).map(|k| w.segments(k)).collect();
    let mut sites: Vec<SiteDelta> = ys
        .iter_mut()
        .zip(&segs)
        .zip(&w.out_features)
        .map(|((y, segments), &out_features)| SiteDelta { y, out_features, segments })
        .collect();
    lora_delta_fused(&w.x, w.in_features, &mut sites)?;
    Ok(())
}

/// The LoRA work of one whole step of the default model: 30 layers × 7 projections, `rows` rows
/// in equal segments of `adapters` distinct rank-16 adapters (decode: one row each), every call on another adapter set (from DRAM), with
/// A/B in f32 and in int8, alternated round by round; best round of each (the least disturbed
/// by other load). Fused q/k/v and gate/up calls, as the model makes them.
fn lora_step(rounds: usize, rows: usize, adapters: usize) -> Result<()> {
    let (rank, layers) = (16, 30);
    // (in, outs of the sites sharing the input)
    let groups: [(usize, &[usize]); 4] =
        [(576, &[576, 192, 192]), (576, &[576]), (576, &[1536, 1536]), (1536, &[576])];
    let mut f32_sets = Vec::new();
    for l in 0..layers {
        for (g, &(inp, outs)) in groups.iter().enumerate() {
            let spec = WorkloadSpec {
                popularity: Popularity::Distinct,
                out_features: outs.to_vec(),
                seed: (l * 10 + g) as u64,
                ..WorkloadSpec::new(rows, inp, outs[0], adapters, rank)
            };
            f32_sets.push(Workload::generate(&spec)?);
        }
    }
    let int8_sets: Vec<Workload> = f32_sets
        .iter()
        .map(|w| {
            let mut q = w.clone();
            q.quantize_int8();
            q
        })
        .collect();
    let run = |sets: &[&Workload]| -> Result<f64> {
        let mut ys: Vec<Vec<Vec<f32>>> = sets.iter().map(|w| w.y.clone()).collect();
        let t = Instant::now();
        for (w, y) in sets.iter().zip(ys.iter_mut()) {
            group_lora(w, y)?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    // The same number of calls on the first layer's four sets only: their weights stay in cache,
    // so the gap to the int8 row is the cost of streaming the weights from DRAM.
    let hot_sets: Vec<&Workload> = (0..layers).flat_map(|_| &int8_sets[..groups.len()]).collect();
    let (f32_refs, int8_refs): (Vec<&Workload>, Vec<&Workload>) =
        (f32_sets.iter().collect(), int8_sets.iter().collect());
    // Each site's base projection as the default model holds it (Q4_1): the step as a whole,
    // every group's base matmuls then its LoRA call.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let base_sets: Vec<Vec<QuantMatrix>> = f32_sets
        .iter()
        .map(|w| {
            w.out_features
                .iter()
                .map(|&o| random_matrix(QuantFormat::Q4_1, o, w.in_features, &mut rng))
                .collect()
        })
        .collect();
    let with_base = |lora: bool| -> Result<f64> {
        let mut ys: Vec<Vec<Vec<f32>>> = int8_sets.iter().map(|w| w.y.clone()).collect();
        let t = Instant::now();
        for ((w, y), mats) in int8_sets.iter().zip(ys.iter_mut()).zip(&base_sets) {
            for (m, y) in mats.iter().zip(y.iter_mut()) {
                m.matmul(&w.x, rows, y)?;
            }
            if lora {
                group_lora(w, y)?;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let (mut best_f32, mut best_int8, mut best_hot) = (f64::MAX, f64::MAX, f64::MAX);
    let (mut best_base, mut best_with_lora) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        best_f32 = best_f32.min(run(&f32_refs)?);
        best_int8 = best_int8.min(run(&int8_refs)?);
        best_hot = best_hot.min(run(&hot_sets)?);
        best_base = best_base.min(with_base(false)?);
        best_with_lora = best_with_lora.min(with_base(true)?);
    }
    let bytes = |sets: &[Workload]| -> usize {
        sets.iter()
            .flat_map(|w| w.adapters.iter().flatten())
            .map(|a| a.int8.as_ref().map_or((a.a.len() + a.b.len()) * 4, |q| q.bytes()))
            .sum()
    };
    let step = if rows == adapters { "decode" } else { "prefill" };
    println!("
LoRA work of one {step} step (30 layers x 7 projections, {rows} rows, {adapters} distinct rank-16 adapters), best of {rounds}:");
    println!("| A/B storage | weights read | time per step |");
    println!("|---|---:|---:|");
    println!("| f32 | {} MB | {:.2} ms |", bytes(&f32_sets) >> 20, best_f32 * 1e3);
    println!("| int8 | {} MB | {:.2} ms |", bytes(&int8_sets) >> 20, best_int8 * 1e3);
    println!(
        "| int8, one layer's weights for every layer (cache-hot) | {} MB | {:.2} ms |",
        bytes(&int8_sets[..groups.len()]) >> 20,
        best_hot * 1e3
    );
    println!(
        "\nThe same step with each site's Q4_1 base matmul (random weights) before its LoRA call, int8 A/B:"
    );
    println!("| | time per step | / base |");
    println!("|---|---:|---:|");
    println!("| base matmuls alone | {:.2} ms | 1.00 |", best_base * 1e3);
    println!("| base, then LoRA | {:.2} ms | {:.3} |", best_with_lora * 1e3, best_with_lora / best_base);
    Ok(())
}

fn pop_name(p: Popularity) -> String {
    match p {
        Popularity::Identical => "identical".into(),
        Popularity::Distinct => "distinct".into(),
        Popularity::Uniform => "uniform".into(),
        Popularity::Zipf(a) => format!("zipf {a}"),
        Popularity::Skewed => "skewed".into(),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let which = arg("--shapes").unwrap_or_else(|| "all".into());
    let filter = arg("--filter").unwrap_or_default();
    let max_gather_mb: f64 = arg("--max-gather-mb").map(|s| s.parse()).transpose()?.unwrap_or(2048.0);
    let budget = Duration::from_millis(if quick { 100 } else { 400 });
    let dev = Device::Cpu;

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "lora_kernel: isa {:?}, {cpus} CPUs (rayon global pool for ours and candle), load average at start: {}",
        Isa::detect(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("medians per call; f32; ratios > 1 mean ours is faster\n");
    println!(
        "| shape | rows | adapters | ranks | popularity | ours | per-adapter loop | gather-pad | base x·Wᵀ \
         | ours/base | loop/ours | pad/ours |"
    );
    println!("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");

    let mut rng = SplitMix64::new(0x5eed);
    for shape in &SHAPES {
        if !shape.selected(&which) {
            continue;
        }
        let base_w = Tensor::from_vec(
            rng.uniform_vec(shape.out * shape.inp, -0.05, 0.05),
            (shape.out, shape.inp),
            &dev,
        )?;
        let base_wt = base_w.t()?;
        for (k, batch) in BATCHES.iter().enumerate() {
            let label = format!(
                "{} rows {} adapters {} ranks {:?}",
                shape.name, batch.rows, batch.adapters, batch.ranks
            );
            if !label.contains(&filter) {
                continue;
            }
            let spec = WorkloadSpec {
                ranks: batch.ranks.to_vec(),
                popularity: batch.pop,
                seed: k as u64,
                ..WorkloadSpec::new(batch.rows, shape.inp, shape.out, batch.adapters, 0)
            };
            let w = Workload::generate(&spec)?;
            let (rows, inp, out) = (w.rows, shape.inp, shape.out);
            let segs = w.segments(0);
            let n = w.adapters[0].len() as u32;
            let owner: Vec<u32> = w.adapter_of_row().iter().map(|a| a.map_or(n, |a| a as u32)).collect();
            let c = CandleBatch::new(&w, &dev)?;

            // Correctness: ours against the candle loop.
            let mut y = w.y[0].clone();
            lora_delta(&w.x, inp, &mut y, out, &segs)?;
            let expect =
                per_adapter_loop(&c.x, &c.y, rows, &c.segs, &c.weights)?.flatten_all()?.to_vec1::<f32>()?;
            let (mut err, mut mag) = (0f32, 0f32);
            for (a, b) in y.iter().zip(&expect) {
                err = err.max((a - b).abs());
                mag = mag.max(b.abs());
            }
            if err > 1e-4 * mag.max(1.0) {
                bail!("{label}: ours differs from the candle loop by {err} (max |y| {mag})");
            }

            let min_reps = if shape.big && rows >= 128 { 2 } else { 3 };
            let ours = time_median(budget, min_reps, || Ok(lora_delta(&w.x, inp, &mut y, out, &segs)?))?;
            let looped = time_median(budget, min_reps, || {
                per_adapter_loop(&c.x, &c.y, rows, &c.segs, &c.weights).map(drop)
            })?;
            let pad = pad_weights(&w, &dev)?;
            let gather_mb = (rows * pad.rmax * (inp + out) * 4) as f64 / 1e6;
            let padded = if gather_mb <= max_gather_mb {
                Some(time_median(budget, min_reps, || gather_pad(&c.x, &c.y, &owner, &pad, &dev).map(drop))?)
            } else {
                None
            };
            drop(pad);
            let base = time_median(budget, min_reps, || Ok(c.x.matmul(&base_wt).map(drop)?))
                .context("base matmul")?;
            println!(
                "| {} | {} | {} | {:?} | {} | {} | {} | {} | {} | {:.1} % | {:.1}x | {} |",
                shape.name,
                rows,
                batch.adapters,
                batch.ranks,
                pop_name(batch.pop),
                fmt_time(ours),
                fmt_time(looped),
                padded.map_or("-".into(), fmt_time),
                fmt_time(base),
                100.0 * ours / base,
                looped / ours,
                padded.map_or("-".into(), |p| format!("{:.1}x", p / ours)),
            );
        }
    }
    if !args.iter().any(|a| a == "--no-cold") {
        cold_decode(&which, budget)?;
    }
    if args.iter().any(|a| a == "--decode-step") {
        lora_step(if quick { 10 } else { 30 }, 32, 32)?;
    }
    if args.iter().any(|a| a == "--prefill-step") {
        lora_step(if quick { 5 } else { 15 }, 512, 4)?;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average at end: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    Ok(())
}
