//! Paged-attention benchmark: the fast kernel against the plain-loop reference on decode and
//! prefill workloads at SmolLM2-135M, Llama-2-7B and Llama-3-8B (GQA) shapes: median time per
//! call, GFLOP/s, K/V read bandwidth, speed-up over the reference and their max abs difference.
//!
//! `cargo run --release -p lorahost-bench --bin attention [-- --no-ref] [--isa avx2|portable]
//! [--filter SUBSTRING]` (the filter matches "<model> <workload> bs <block size>").

use std::time::{Duration, Instant};

use kernels::attention::{
    paged_attention_reference, paged_attention_with, write_kv, Isa, KvGeometry, LayerKv, SeqRows,
};

/// Deterministic xorshift data in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f32) as usize % n
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

struct Model {
    name: &'static str,
    n_heads: usize,
    n_kv: usize,
    d: usize,
}

const SMOL: Model = Model { name: "smollm2-135m", n_heads: 9, n_kv: 3, d: 64 };
const LLAMA2_7B: Model = Model { name: "7b (32/32/128)", n_heads: 32, n_kv: 32, d: 128 };
const LLAMA3_8B: Model = Model { name: "8b gqa (32/8/128)", n_heads: 32, n_kv: 8, d: 128 };

/// A batch: for each sequence (rows this step, position of the first row).
struct Work {
    label: String,
    seqs: Vec<(usize, usize)>,
}

fn run(m: &Model, w: &Work, block_size: usize, isa: Isa, with_ref: bool) -> anyhow::Result<()> {
    let filter = std::env::args().skip_while(|a| a != "--filter").nth(1).unwrap_or_default();
    if !format!("{} {} bs {block_size}", m.name, w.label).contains(&filter) {
        return Ok(());
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let geom = KvGeometry { block_size, n_kv_heads: m.n_kv, head_dim: m.d };
    let blocks: Vec<usize> = w.seqs.iter().map(|&(n, p)| (p + n).div_ceil(block_size)).collect();
    let num_blocks: usize = blocks.iter().sum();
    let mut cache = LayerKv::new(geom, num_blocks);
    // Interleave the sequences' blocks, as a long-running allocator would.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut tables = Vec::new();
    let mut at = 0;
    for &b in &blocks {
        tables.push(ids[at..at + b].to_vec());
        at += b;
    }
    // Fill every position the batch will read (history and this step's rows).
    let width = m.n_kv * m.d;
    for (t, &(n, p)) in tables.iter().zip(&w.seqs) {
        let total = p + n;
        let k = rng.vec(total * width);
        let v = rng.vec(total * width);
        write_kv(&mut cache, &k, &v, &[SeqRows { rows: 0..total, start_pos: 0, block_table: t }])?;
    }
    let mut seqs = Vec::new();
    let mut row = 0;
    for (t, &(n, p)) in tables.iter().zip(&w.seqs) {
        seqs.push(SeqRows { rows: row..row + n, start_pos: p, block_table: t });
        row += n;
    }
    let q = rng.vec(row * m.n_heads * m.d);
    // This step's own K/V rows, rewritten in place (same cost as the real write).
    let step_k = rng.vec(row * width);
    let step_v = rng.vec(row * width);
    let write = time(|| write_kv(&mut cache, &step_k, &step_v, &seqs).expect("write_kv"));
    let mut out = vec![0.0; q.len()];
    let scale = 1.0 / (m.d as f32).sqrt();

    // Multiply-adds: every (head, row, visible key) does d for q.k and d for p.v.
    let pairs: usize =
        w.seqs.iter().map(|&(n, p)| (0..n).map(|r| p + r + 1).sum::<usize>()).sum::<usize>() * m.n_heads;
    let flops = (4 * m.d * pairs) as f64;

    let (fast, cores) = time_cpu(|| {
        paged_attention_with(isa, &cache, &q, m.n_heads, scale, &seqs, &mut out).expect("attention");
    });
    let cores = cores.map_or(String::new(), |c| format!(" on {c:.1} cores"));
    let fast_out = out.clone();
    let gf = |t: Duration| flops / t.as_secs_f64() / 1e9;
    // K and V bytes a call must read at least once.
    let bytes: usize = w.seqs.iter().map(|&(n, p)| (p + n) * width * 8).sum();
    let gb = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
    if with_ref {
        let reference = time(|| {
            paged_attention_reference(&cache, &q, m.n_heads, scale, &seqs, &mut out).expect("reference");
        });
        let diff = fast_out.iter().zip(&out).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!(
            "{:<18} {:<34} bs {:>2} | fast {:>10} {:>5.1} GF/s {:>5.1} GB/s{} | ref {:>10} {:>5.2} GF/s | x{:>6.1} | diff {:.0e} | write_kv {}",
            m.name,
            w.label,
            block_size,
            fmt(fast),
            gf(fast),
            gb(fast),
            cores,
            fmt(reference),
            gf(reference),
            reference.as_secs_f64() / fast.as_secs_f64(),
            diff,
            fmt(write)
        );
    } else {
        println!(
            "{:<18} {:<34} bs {:>2} | fast {:>10} {:>5.1} GF/s {:>5.1} GB/s{} | write_kv {}",
            m.name,
            w.label,
            block_size,
            fmt(fast),
            gf(fast),
            gb(fast),
            cores,
            fmt(write)
        );
    }
    Ok(())
}

/// Median time per call: one warm-up, then calls until ~0.5 s (at least 3, at most 200).
fn time(f: impl FnMut()) -> Duration {
    time_cpu(f).0
}

/// [`time`] and the average number of cores the process kept busy meanwhile (CPU time / wall
/// time; on a shared machine this shows how much of it the kernel actually got).
fn time_cpu(mut f: impl FnMut()) -> (Duration, Option<f64>) {
    f();
    let mut times = Vec::new();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < Duration::from_millis(500) && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    let wall = start.elapsed().as_secs_f64();
    // Ticks are 10 ms: too coarse for short loops.
    let cores = cpu0.zip(cpu_seconds()).filter(|_| wall >= 0.2).map(|(a, b)| (b - a) / wall);
    times.sort();
    (times[times.len() / 2], cores)
}

/// User + system CPU time of this process (Linux `/proc/self/stat`, clock ticks of 10 ms).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn fmt(t: Duration) -> String {
    let us = t.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} us")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let with_ref = !args.iter().any(|a| a == "--no-ref");
    let isa = match args.iter().position(|a| a == "--isa").and_then(|i| args.get(i + 1)).map(String::as_str) {
        Some("avx512") => Isa::Avx512,
        Some("avx2") => Isa::Avx2,
        Some("portable") => Isa::Portable,
        _ => Isa::detect(),
    };
    println!(
        "isa {isa:?}, {} threads; times are medians per call (one layer); GB/s = K/V bytes read / time",
        cpu_threads()
    );
    println!("memory read baseline (sum of 256 MiB on all threads): {:.1} GB/s", read_bandwidth());

    let decode = |ctx: usize| Work { label: format!("1 decode row, ctx {ctx}"), seqs: vec![(1, ctx - 1)] };
    let mut rng = Rng(42);
    let batch64 = |lo: usize, hi: usize, rng: &mut Rng| Work {
        label: format!("64 decode rows, ctx {lo}..{hi}"),
        seqs: (0..64).map(|_| (1, lo + rng.below(hi - lo))).collect(),
    };
    let prefill = |n: usize, from: usize| Work {
        label: format!("prefill {n} rows from pos {from}"),
        seqs: vec![(n, from)],
    };

    for &bs in &[16, 32] {
        for ctx in [100, 1000, 4000] {
            run(&SMOL, &decode(ctx), bs, isa, with_ref)?;
        }
        run(&SMOL, &batch64(100, 4000, &mut rng), bs, isa, with_ref)?;
        run(&SMOL, &prefill(512, 0), bs, isa, with_ref)?;
        run(&SMOL, &prefill(512, 1536), bs, isa, with_ref)?;
    }
    for m in [&LLAMA2_7B, &LLAMA3_8B] {
        for ctx in [100, 1000, 4000] {
            run(m, &decode(ctx), 16, isa, with_ref)?;
        }
        run(m, &batch64(256, 768, &mut rng), 16, isa, with_ref)?;
        run(m, &prefill(512, 0), 16, isa, with_ref)?;
    }
    Ok(())
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Plain streaming-read bandwidth of this machine right now, as a roofline for the decodes.
fn read_bandwidth() -> f64 {
    let data = vec![1.0f32; 64 << 20];
    let threads = cpu_threads();
    let chunk = data.len().div_ceil(threads);
    let t = time(|| {
        let total: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = data.chunks(chunk).map(|c| s.spawn(move || sum_fast(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
    });
    (data.len() * 4) as f64 / t.as_secs_f64() / 1e9
}

/// Sum with 16 independent lanes, so the read is not bound by the latency of one add chain.
fn sum_fast(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for x in c.chunks_exact(16) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += b;
        }
    }
    acc.iter().sum()
}
