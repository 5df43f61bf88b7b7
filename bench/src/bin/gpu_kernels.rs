//! lorahost's GPU kernels (`kernels::cuda`): segmented LoRA and paged attention, each checked
//! against its CPU reference at many shapes, then benchmarked in decode shapes against the
//! memory-bandwidth bound (LoRA also against a per-segment cuBLAS loop), in the same process.
//!
//! `gpu_kernels [check|bench|all] [--out DIR] [--quick]` (build with `--features cuda`; without it,
//! or without a device, it says so and exits with status 2). `check` exits with status 1 when any
//! case is off; results go to stdout and, with `--out`, to `DIR/gpu_kernels_check.md`,
//! `DIR/gpu_kernels_bench.md` and `DIR/gpu_kernels_bench.json`.
//!
//! LoRA parity: each case is a generated multi-adapter batch (`kernels::lora::workload`), its x, y
//! and weights rounded to the storage type first, so the reference (`lora_delta_reference`, f32
//! loops) and the GPU see the same numbers; the GPU output must match within one rounding of the
//! storage type plus 1e-4 of the largest output (accumulation order differs). Attention parity:
//! random K/V written through the GPU's `write_kv` and the CPU's, GQA shapes of SmolLM2 and 7B
//! models, contexts from 1 to past several partitions, decode rows and prefill chunks together,
//! against `paged_attention_reference`.
//!
//! Benchmark: bf16, 4096 → 4096, ranks 8-64, 1-256 rows over 1-64 distinct adapters. "bound" is
//! the time to move the bytes the op must touch (distinct adapters' A and B, x, y read and
//! written) at the measured device-to-device copy bandwidth; "of bound" = bound / ours (goal ≥
//! 80 %); "cuBLAS" runs two gemms per segment on the same buffers (and is itself checked against
//! the reference first). Each call is timed alone on the device (events) after 512 MiB were
//! overwritten, so its weights come from DRAM as inside a model's step, not from L2; the
//! smallest shapes then measure launch gaps as much as the kernels. Pools larger than the active
//! adapter set show what an engine with many resident adapters gets. Attention: bf16 decode rows
//! of a 7B model (32 heads, 8 KV heads, dim 128) over their contexts, bound = K and V bytes read.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kernels::attention::{paged_attention_reference, write_kv as cpu_write_kv, KvGeometry, LayerKv, SeqRows};
use kernels::cuda::{
    self, DeviceBuf, DeviceFloat, Gpu, GpuSegments, LoraScratch, RowsFor, SlotTable, SlotWeights,
};
use kernels::lora::lora_delta_reference;
use kernels::lora::workload::{Popularity, SplitMix64, Workload, WorkloadSpec};

struct Args {
    check: bool,
    bench: bool,
    out: Option<PathBuf>,
    quick: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { check: true, bench: true, out: None, quick: false };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "check" => args.bench = false,
            "bench" => args.check = false,
            "all" => {}
            "--quick" => args.quick = true,
            "--out" => args.out = Some(it.next().context("--out needs a directory")?.into()),
            other => bail!("unknown argument {other:?} (expected check, bench, all, --out DIR, --quick)"),
        }
    }
    Ok(args)
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("gpu_kernels: parity FAILED");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("gpu_kernels: could not finish: {e:#}");
            std::process::exit(2);
        }
    }
}

/// `Ok(false)` when a parity check failed.
fn run() -> Result<bool> {
    let args = parse_args()?;
    let gpu = match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("gpu_kernels: no GPU to run on: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {} ({} SMs)", gpu.name(), gpu.sm_count());
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut failed = false;
    if args.check {
        let (mut report, mut ok) = check(&gpu, args.quick);
        let (attention, attention_ok) = check_attention(&gpu);
        report.push_str(&attention);
        ok &= attention_ok;
        print!("{report}");
        write_out(&args.out, "gpu_kernels_check.md", &report)?;
        failed |= !ok;
    }
    if args.bench {
        let (mut report, json) = bench(&gpu, args.quick)?;
        report.push_str(&bench_attention(&gpu)?);
        print!("{report}");
        write_out(&args.out, "gpu_kernels_bench.md", &report)?;
        write_out(&args.out, "gpu_kernels_bench.json", &json)?;
    }
    Ok(!failed)
}

fn write_out(dir: &Option<PathBuf>, name: &str, text: &str) -> Result<()> {
    if let Some(dir) = dir {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

/// A workload's adapters on the device: `[site][adapter]` A, B and DoRA factor in `T`.
struct DeviceAdapters<T> {
    a: Vec<Vec<DeviceBuf<T>>>,
    b: Vec<Vec<DeviceBuf<T>>>,
    dora: Vec<Vec<Option<DeviceBuf<f32>>>>,
}

fn to_device<T: DeviceFloat>(gpu: &Gpu, v: &[f32]) -> Result<DeviceBuf<T>> {
    Ok(gpu.upload(&v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>())?)
}

fn from_device<T: DeviceFloat>(gpu: &Gpu, buf: &DeviceBuf<T>) -> Result<Vec<f32>> {
    Ok(gpu.download(buf)?.into_iter().map(T::to_f32).collect())
}

fn round_to<T: DeviceFloat>(v: &mut [f32]) {
    for x in v {
        *x = T::from_f32(*x).to_f32();
    }
}

/// Rounds every value the kernels read to `T`, so both sides start from the same numbers.
fn round_workload<T: DeviceFloat>(w: &mut Workload) {
    round_to::<T>(&mut w.x);
    w.y.iter_mut().for_each(|y| round_to::<T>(y));
    for site in &mut w.adapters {
        for a in site {
            round_to::<T>(&mut a.a);
            round_to::<T>(&mut a.b);
        }
    }
}

fn upload_adapters<T: DeviceFloat>(gpu: &Gpu, w: &Workload) -> Result<DeviceAdapters<T>> {
    let mut d = DeviceAdapters { a: Vec::new(), b: Vec::new(), dora: Vec::new() };
    for site in &w.adapters {
        d.a.push(site.iter().map(|a| to_device(gpu, &a.a)).collect::<Result<_>>()?);
        d.b.push(site.iter().map(|a| to_device(gpu, &a.b)).collect::<Result<_>>()?);
        d.dora.push(
            site.iter()
                .map(|a| a.dora_factor.as_ref().map(|g| gpu.upload(g)).transpose())
                .collect::<Result<_, _>>()?,
        );
    }
    Ok(d)
}

/// The slot table of a workload: adapter `k` in slot `k`, then `extra_slots` empty slots.
fn slot_table<'w, T: DeviceFloat>(
    gpu: &Gpu,
    w: &Workload,
    d: &'w DeviceAdapters<T>,
    extra_slots: usize,
) -> Result<SlotTable<'w, T>> {
    let slots: Vec<Vec<Option<SlotWeights<'w, T>>>> = (0..w.out_features.len())
        .map(|site| {
            let mut v: Vec<_> = w.adapters[site]
                .iter()
                .enumerate()
                .map(|(k, a)| {
                    Some(SlotWeights {
                        a: &d.a[site][k],
                        b: &d.b[site][k],
                        dora: d.dora[site][k].as_ref(),
                        rank: a.rank,
                        scale: a.scale,
                    })
                })
                .collect();
            v.extend((0..extra_slots).map(|_| None));
            v
        })
        .collect();
    Ok(SlotTable::new(gpu, w.in_features, &w.out_features, &slots)?)
}

/// The workload's segments, adapter `k` in slot `k`; with `split`, the longest is cut in two
/// segments of the same slot (the engine never does, but the kernels must not care).
fn segment_list(w: &Workload, split: bool) -> Vec<(std::ops::Range<usize>, u32)> {
    let mut segs: Vec<_> =
        w.runs.iter().filter_map(|(rows, a)| a.map(|a| (rows.clone(), a as u32))).collect();
    let longest = (0..segs.len()).max_by_key(|&k| segs[k].0.len());
    if let Some(k) = longest.filter(|&k| split && segs[k].0.len() >= 2) {
        let (rows, slot) = segs[k].clone();
        let mid = rows.start + rows.len() / 2;
        segs[k].0 = rows.start..mid;
        segs.push((mid..rows.end, slot));
    }
    segs
}

/// Largest error beyond the allowance, as a multiple of it (≤ 1 passes).
fn worst_error(got: &[f32], want: &[f32], rel: f32) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (rel * w.abs() + 1e-4 * scale + f32::MIN_POSITIVE))
        .fold(0f32, |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) })
}

/// One parity case in `T`; the worst error as a multiple of the allowance.
fn check_case<T: DeviceFloat>(
    gpu: &Gpu,
    spec: &WorkloadSpec,
    extra_slots: usize,
    rel: f32,
    scratch: &mut LoraScratch,
) -> Result<f32> {
    let mut w = Workload::generate(spec)?;
    round_workload::<T>(&mut w);
    let mut want = w.y.clone();
    for (site, y) in want.iter_mut().enumerate() {
        lora_delta_reference(&w.x, w.in_features, y, w.out_features[site], &w.segments(site))?;
    }
    let d = upload_adapters::<T>(gpu, &w)?;
    let table = slot_table(gpu, &w, &d, extra_slots)?;
    let segments = GpuSegments::new(gpu, w.rows, n_slots(&w, extra_slots), &segment_list(&w, true))?;
    let x = to_device::<T>(gpu, &w.x)?;
    let mut ys: Vec<DeviceBuf<T>> = w.y.iter().map(|y| to_device(gpu, y)).collect::<Result<_>>()?;
    let mut refs: Vec<&mut DeviceBuf<T>> = ys.iter_mut().collect();
    cuda::lora_delta(gpu, &x, &mut refs, &segments, &table, scratch)?;
    let mut worst = 0f32;
    for (y, want) in ys.iter().zip(&want) {
        worst = worst.max(worst_error(&from_device(gpu, y)?, want, rel));
    }
    Ok(worst)
}

/// The cuBLAS baseline against the reference, in f32 (one site, no DoRA): its ratio in the
/// benchmark means something only if it computes the same op.
fn check_cublas(gpu: &Gpu, spec: &WorkloadSpec) -> Result<f32> {
    let w = Workload::generate(spec)?;
    let mut want = w.y[0].clone();
    lora_delta_reference(&w.x, w.in_features, &mut want, w.out_features[0], &w.segments(0))?;
    let d = upload_adapters::<f32>(gpu, &w)?;
    let segs = segment_list(&w, false);
    let weights: Vec<_> = segs
        .iter()
        .map(|(r, k)| {
            let (k, a) = (*k as usize, &w.adapters[0][*k as usize]);
            (
                r.clone(),
                SlotWeights { a: &d.a[0][k], b: &d.b[0][k], dora: None, rank: a.rank, scale: a.scale },
            )
        })
        .collect();
    let most = segs.iter().map(|(r, k)| r.len() * w.adapters[0][*k as usize].rank).max().unwrap_or(0);
    let x = gpu.upload(&w.x)?;
    let mut y = gpu.upload(&w.y[0])?;
    let mut v = gpu.zeros::<f32>(most)?;
    cuda::lora_delta_cublas(gpu, &x, w.in_features, &mut y, w.out_features[0], &weights, &mut v)?;
    Ok(worst_error(&gpu.download(&y)?, &want, 1e-5))
}

/// A table cell: the worst error as a fraction of the allowance, or what went wrong.
fn cell(result: &Result<f32>) -> String {
    match result {
        Ok(e) if *e <= 1.0 => format!("ok ({e:.2})"),
        Ok(e) => format!("**FAIL** ({e:.1})"),
        Err(e) => format!("**ERROR** {e:#}"),
    }
}

fn passed(result: &Result<f32>) -> bool {
    matches!(result, Ok(e) if *e <= 1.0)
}

/// Slots of the pool [`slot_table`] builds: one per adapter, then `extra` empty ones.
fn n_slots(w: &Workload, extra: usize) -> usize {
    w.adapters.first().map_or(0, Vec::len) + extra
}

fn check(gpu: &Gpu, quick: bool) -> (String, bool) {
    let spec = |rows, inp, outs: &[usize], n, ranks: &[usize], pop, base: f64, dora, seed| WorkloadSpec {
        rows,
        in_features: inp,
        out_features: outs.to_vec(),
        n_adapters: n,
        ranks: ranks.to_vec(),
        popularity: pop,
        base_fraction: base,
        dora,
        seed,
    };
    let mut cases: Vec<(String, WorkloadSpec, usize)> = vec![
        (
            "decode, 7B, distinct r16".into(),
            spec(32, 4096, &[4096], 32, &[16], Popularity::Distinct, 0.0, false, 1),
            0,
        ),
        (
            "one row, one adapter".into(),
            spec(1, 4096, &[4096], 1, &[8], Popularity::Identical, 0.0, false, 2),
            0,
        ),
        (
            "fused q/k/v, SmolLM2".into(),
            spec(48, 576, &[576, 192, 192], 6, &[8, 16], Popularity::Uniform, 0.2, false, 3),
            2,
        ),
        (
            "fused gate/up, 7B".into(),
            spec(24, 4096, &[11008, 11008], 4, &[16, 64], Popularity::Zipf(1.0), 0.1, false, 4),
            0,
        ),
        (
            "down 11008→4096, skewed".into(),
            spec(64, 11008, &[4096], 8, &[32], Popularity::Skewed, 0.0, false, 5),
            0,
        ),
        (
            "odd shapes 77→45, ranks 1-7".into(),
            spec(37, 77, &[45, 13], 7, &[1, 3, 5, 7], Popularity::Uniform, 0.3, false, 6),
            3,
        ),
        (
            "DoRA, with rank 0".into(),
            spec(20, 576, &[576], 4, &[0, 8], Popularity::Uniform, 0.25, true, 7),
            0,
        ),
        (
            "prefill, 300 rows, r128".into(),
            spec(300, 1024, &[1024], 3, &[128, 4], Popularity::Uniform, 0.0, false, 8),
            1,
        ),
        (
            "identical, 256 rows".into(),
            spec(256, 4096, &[4096], 1, &[16], Popularity::Identical, 0.0, false, 9),
            0,
        ),
        (
            "64 adapters, uniform".into(),
            spec(256, 2048, &[2048], 64, &[8, 16, 32, 64], Popularity::Uniform, 0.1, true, 10),
            0,
        ),
    ];
    if quick {
        cases.truncate(4);
    }
    let mut report = String::from("## GPU segmented LoRA: parity with the CPU reference\n\n");
    report.push_str("| case | f32 | f16 | bf16 |\n|---|---:|---:|---:|\n");
    let mut ok = true;
    // One scratch for every case, as an engine keeps one across layers and steps.
    let (mut s32, mut s16, mut sb16) = (LoraScratch::new(), LoraScratch::new(), LoraScratch::new());
    for (name, spec, extra) in &cases {
        let errs = [
            check_case::<f32>(gpu, spec, *extra, 1e-5, &mut s32),
            check_case::<half::f16>(gpu, spec, *extra, 2f32.powi(-10), &mut s16),
            check_case::<half::bf16>(gpu, spec, *extra, 2f32.powi(-7), &mut sb16),
        ];
        ok &= errs.iter().all(passed);
        report.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            cell(&errs[0]),
            cell(&errs[1]),
            cell(&errs[2])
        ));
    }
    let cublas = check_cublas(gpu, &cases[0].1);
    ok &= passed(&cublas);
    report.push_str(&format!("\ncuBLAS baseline, f32, \"{}\": {}\n", cases[0].0, cell(&cublas)));
    report.push_str("\nIn brackets: the worst error as a fraction of the allowance (≤ 1 passes).\n\n");
    (report, ok)
}

/// Bytes overwritten before each timed call: more than any GPU's L2 cache, so each call starts
/// from DRAM as it would inside a model's step (where other layers' weights ran in between).
const FLUSH_BYTES: usize = 512 << 20;

/// Median device seconds of one call of `f`, each timed between two events after overwriting
/// `flush`, over `reps` calls after a warm-up. For the smallest shapes this includes the gaps
/// between the call's launches.
fn time_cold(
    gpu: &Gpu,
    flush: &mut DeviceBuf<u8>,
    reps: usize,
    mut f: impl FnMut() -> Result<(), kernels::KernelError>,
) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        samples.push(f64::from(gpu.time_ms(Some(&mut *flush), &mut f)?) / 1e3);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn bench(gpu: &Gpu, quick: bool) -> Result<(String, String)> {
    type T = half::bf16;
    let bandwidth = gpu.copy_bandwidth(512 << 20, 20)?;
    let hidden = 4096;
    // (rank, rows, active adapters, pool slots): a full pool, then pools larger than the active
    // set, as an engine with many resident adapters has.
    let mut shapes: Vec<(usize, usize, usize, usize)> = Vec::new();
    for rank in [8, 16, 32, 64] {
        for (rows, adapters) in [(1, 1), (8, 8), (32, 32), (64, 64), (256, 64), (256, 1)] {
            shapes.push((rank, rows, adapters, adapters));
        }
    }
    shapes.extend([(16, 32, 8, 128), (16, 64, 32, 512)]);
    if quick {
        shapes.retain(|&(rank, ..)| rank == 16);
    }
    let mut flush = gpu.zeros::<u8>(FLUSH_BYTES)?;
    let mut report = format!(
        "## GPU segmented LoRA: decode shapes, bf16, {hidden} → {hidden}\n\n\
         copy bandwidth {:.0} GB/s; each call timed from a cold L2\n\n\
         | rank | rows | adapters | pool | ours µs | bound µs | of bound | cuBLAS loop µs | cuBLAS / ours |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        bandwidth / 1e9
    );
    let mut json = Vec::new();
    for (rank, rows, adapters, pool) in shapes {
        let spec = WorkloadSpec {
            popularity: Popularity::Distinct,
            ..WorkloadSpec::new(rows, hidden, hidden, adapters, rank)
        };
        let w = Workload::generate(&spec)?;
        let d = upload_adapters::<T>(gpu, &w)?;
        let table = slot_table(gpu, &w, &d, pool - adapters)?;
        let segs = segment_list(&w, false);
        let segments = GpuSegments::new(gpu, rows, pool, &segs)?;
        let x = to_device::<T>(gpu, &w.x)?;
        let mut y = to_device::<T>(gpu, &w.y[0])?;
        let mut scratch = LoraScratch::new();
        let ours = time_cold(gpu, &mut flush, 100, || {
            cuda::lora_delta(gpu, &x, &mut [&mut y], &segments, &table, &mut scratch)
        })?;
        let weights: Vec<_> = segs
            .iter()
            .map(|(r, a)| {
                let k = *a as usize;
                (
                    r.clone(),
                    SlotWeights {
                        a: &d.a[0][k],
                        b: &d.b[0][k],
                        dora: None,
                        rank,
                        scale: w.adapters[0][k].scale,
                    },
                )
            })
            .collect();
        let most_rows = segs.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
        let mut v = gpu.zeros::<T>(most_rows * rank)?;
        let cublas = time_cold(gpu, &mut flush, 30, || {
            cuda::lora_delta_cublas(gpu, &x, hidden, &mut y, hidden, &weights, &mut v)
        })?;
        let elem = std::mem::size_of::<T>();
        let bytes = adapters * 2 * rank * hidden * elem + rows * hidden * elem * 3;
        let bound = bytes as f64 / bandwidth;
        writeln!(
            report,
            "| {rank} | {rows} | {adapters} | {pool} | {:.1} | {:.1} | {:.0} % | {:.1} | {:.1}× |",
            ours * 1e6,
            bound * 1e6,
            100.0 * bound / ours,
            cublas * 1e6,
            cublas / ours
        )?;
        json.push(serde_json::json!({
            "rank": rank, "rows": rows, "adapters": adapters, "pool": pool, "ours_us": ours * 1e6,
            "bound_us": bound * 1e6, "cublas_us": cublas * 1e6, "bytes": bytes,
        }));
    }
    let json =
        serde_json::json!({ "device": gpu.name(), "copy_bandwidth_gbs": bandwidth / 1e9, "rows": json });
    Ok((report, serde_json::to_string_pretty(&json)?))
}

/// An attention case: sequences given as (context length, rows in this step), GQA geometry.
struct AttentionCase {
    name: &'static str,
    gaps: bool,
    n_heads: usize,
    geom: KvGeometry,
    seqs: Vec<(usize, usize)>,
}

/// A batch of sequences with random K/V history and queries, on both sides.
struct AttentionBatch {
    /// Every position of every sequence, in one write batch.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Block table of each sequence, and the write batch's and the step's row ranges.
    tables: Vec<Vec<u32>>,
    write_rows: Vec<std::ops::Range<usize>>,
    step_rows: Vec<(std::ops::Range<usize>, usize)>,
    q: Vec<f32>,
    /// Rows of the step, gap rows included.
    step_len: usize,
    num_blocks: usize,
}

impl AttentionBatch {
    /// The write batch: every position of every sequence.
    fn writes(&self) -> Vec<SeqRows<'_>> {
        let rows = self.write_rows.iter().zip(&self.tables);
        rows.map(|(r, t)| SeqRows { rows: r.clone(), start_pos: 0, block_table: t }).collect()
    }

    /// The step: the last rows of each sequence.
    fn step(&self) -> Vec<SeqRows<'_>> {
        let rows = self.step_rows.iter().zip(&self.tables);
        rows.map(|((r, start), t)| SeqRows { rows: r.clone(), start_pos: *start, block_table: t }).collect()
    }

    /// The history written through the GPU's `write_kv`, the step's rows and its queries, on the
    /// device.
    /// `min_partitions` above what the contexts need adds partitions past every context.
    fn to_gpu<T: DeviceFloat>(
        &self,
        gpu: &Gpu,
        geom: KvGeometry,
        min_partitions: usize,
    ) -> Result<(cuda::GpuKvCache<T>, cuda::GpuAttentionRows, DeviceBuf<T>)> {
        let (writes, step) = (self.writes(), self.step());
        let write_len = writes.iter().map(|s| s.rows.len()).sum::<usize>();
        let mut cache = cuda::GpuKvCache::<T>::new(gpu, geom, self.num_blocks)?;
        let write_rows =
            cuda::GpuAttentionRows::new(gpu, geom, self.num_blocks, write_len, &writes, RowsFor::Write, 0)?;
        cuda::write_kv(gpu, &mut cache, &to_device(gpu, &self.k)?, &to_device(gpu, &self.v)?, &write_rows)?;
        let step_rows = cuda::GpuAttentionRows::new(
            gpu,
            geom,
            self.num_blocks,
            self.step_len,
            &step,
            RowsFor::Attention,
            min_partitions,
        )?;
        Ok((cache, step_rows, to_device(gpu, &self.q)?))
    }
}

fn attention_batch<T: DeviceFloat>(case: &AttentionCase, seed: u64) -> AttentionBatch {
    let mut rng = SplitMix64::new(seed);
    let g = case.geom;
    let width = g.n_kv_heads * g.head_dim;
    let blocks_per: Vec<usize> = case.seqs.iter().map(|&(ctx, _)| ctx.div_ceil(g.block_size)).collect();
    let num_blocks = blocks_per.iter().sum::<usize>() + 3;
    // Sequences get scattered, shuffled blocks.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut tables = Vec::new();
    let mut next = 0;
    for &n in &blocks_per {
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    let total: usize = case.seqs.iter().map(|&(ctx, _)| ctx).sum();
    let mut rounded = |n: usize| {
        let mut v = rng.uniform_vec(n, -1.0, 1.0);
        round_to::<T>(&mut v);
        v
    };
    let (k, v) = (rounded(total * width), rounded(total * width));
    let mut write_rows = Vec::new();
    let mut step_rows = Vec::new();
    let (mut at, mut step_at) = (0, 0);
    for &(ctx, n) in &case.seqs {
        write_rows.push(at..at + ctx);
        // With `gaps`, a row in no sequence before each one: the kernels must leave it alone.
        step_at += usize::from(case.gaps);
        step_rows.push((step_at..step_at + n, ctx - n));
        at += ctx;
        step_at += n;
    }
    let q = rounded(step_at * case.n_heads * g.head_dim);
    AttentionBatch { k, v, tables, write_rows, step_rows, q, step_len: step_at, num_blocks }
}

fn attention_case<T: DeviceFloat>(
    gpu: &Gpu,
    case: &AttentionCase,
    rel: f32,
    min_partitions: usize,
) -> Result<f32> {
    let b = attention_batch::<T>(case, 11);
    let g = case.geom;
    let scale = 1.0 / (g.head_dim as f32).sqrt();
    let mut cpu = LayerKv::try_new(g, b.num_blocks)?;
    cpu_write_kv(&mut cpu, &b.k, &b.v, &b.writes())?;
    let mut want = vec![0f32; b.q.len()];
    paged_attention_reference(&cpu, &b.q, case.n_heads, scale, &b.step(), &mut want)?;

    let (cache, step_rows, q) = b.to_gpu::<T>(gpu, g, min_partitions)?;
    let mut out = gpu.zeros::<T>(b.q.len())?;
    let mut scratch = cuda::AttentionScratch::default();
    cuda::paged_attention(gpu, &cache, &q, case.n_heads, scale, &step_rows, &mut out, &mut scratch)?;
    Ok(worst_error(&from_device(gpu, &out)?, &want, rel))
}

fn attention_cases() -> Vec<AttentionCase> {
    let smol = KvGeometry { block_size: 16, n_kv_heads: 3, head_dim: 64 };
    let big = KvGeometry { block_size: 16, n_kv_heads: 8, head_dim: 128 };
    vec![
        AttentionCase {
            name: "SmolLM2 decode, contexts 1-700",
            gaps: true,
            n_heads: 9,
            geom: smol,
            seqs: vec![(1, 1), (17, 1), (256, 1), (257, 1), (700, 1)],
        },
        AttentionCase {
            name: "SmolLM2 prefill chunk + decodes",
            gaps: false,
            n_heads: 9,
            geom: smol,
            seqs: vec![(300, 40), (5, 5), (90, 1)],
        },
        AttentionCase {
            name: "7B GQA 32/8, context 2000",
            gaps: true,
            n_heads: 32,
            geom: big,
            seqs: vec![(2000, 1), (33, 2), (512, 1)],
        },
        AttentionCase {
            name: "block size 7, MHA 4/4 dim 40",
            gaps: false,
            n_heads: 4,
            geom: KvGeometry { block_size: 7, n_kv_heads: 4, head_dim: 40 },
            seqs: vec![(50, 3), (8, 8)],
        },
    ]
}

fn check_attention(gpu: &Gpu) -> (String, bool) {
    let mut report = String::from("## GPU paged attention: parity with the CPU reference\n\n| case | f32 | f16 | bf16 |\n|---|---:|---:|---:|\n");
    let mut ok = true;
    for case in attention_cases() {
        // f16 and bf16 run with partitions past every context (a graph-stable grid).
        let errs = [
            attention_case::<f32>(gpu, &case, 1e-5, 0),
            attention_case::<half::f16>(gpu, &case, 2f32.powi(-10), 12),
            attention_case::<half::bf16>(gpu, &case, 2f32.powi(-7), 12),
        ];
        ok &= errs.iter().all(passed);
        report.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            case.name,
            cell(&errs[0]),
            cell(&errs[1]),
            cell(&errs[2])
        ));
    }
    report.push('\n');
    (report, ok)
}

fn bench_attention(gpu: &Gpu) -> Result<String> {
    type T = half::bf16;
    let bandwidth = gpu.copy_bandwidth(512 << 20, 20)?;
    let geom = KvGeometry { block_size: 16, n_kv_heads: 8, head_dim: 128 };
    let n_heads = 32;
    let mut flush = gpu.zeros::<u8>(FLUSH_BYTES)?;
    let mut report = String::from(
        "## GPU paged attention: decode, bf16, 32 heads / 8 KV heads / dim 128, cold L2\n\n\
         | rows | context | ours µs | bound µs | of bound |\n|---:|---:|---:|---:|---:|\n",
    );
    for (rows, ctx) in [(1, 1024), (32, 1024), (16, 4096), (64, 1024)] {
        let case = AttentionCase { gaps: false, name: "", n_heads, geom, seqs: vec![(ctx, 1); rows] };
        let b = attention_batch::<T>(&case, 5);
        let (cache, step_rows, q) = b.to_gpu::<T>(gpu, geom, 0)?;
        let mut out = gpu.zeros::<T>(b.q.len())?;
        let mut scratch = cuda::AttentionScratch::default();
        let scale = 1.0 / (geom.head_dim as f32).sqrt();
        let ours = time_cold(gpu, &mut flush, 50, || {
            cuda::paged_attention(gpu, &cache, &q, n_heads, scale, &step_rows, &mut out, &mut scratch)
        })?;
        let bytes = rows * ctx * 2 * geom.n_kv_heads * geom.head_dim * std::mem::size_of::<T>();
        let bound = bytes as f64 / bandwidth;
        writeln!(
            report,
            "| {rows} | {ctx} | {:.1} | {:.1} | {:.0} % |",
            ours * 1e6,
            bound * 1e6,
            100.0 * bound / ours
        )?;
    }
    report.push('\n');
    Ok(report)
}
