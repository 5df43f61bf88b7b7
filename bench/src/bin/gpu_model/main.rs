//! The model on the GPU (`--device cuda`) against the same model on the CPU, in one process.
//!
//! `gpu_model [--out DIR]` (build with `--features cuda`; without it, or without a device, it says
//! so and exits with status 2; status 1 when a parity check fails).
//!
//! Parity: random-weight Llama and Qwen2 models (`lorahost::testing::TinyModel`: GQA, three layers;
//! for Qwen2 q/k/v biases and an lm_head of its own) and random PEFT adapters of ranks 4, 8 and 16
//! on different projection sets, one with DoRA. Both executors run the same steps: six sequences,
//! two on the base and four on three adapters, prefilled in two chunks and then decoded greedily
//! for eight steps, every sequence feeding back the CPU's token. Two adapters are loaded ahead
//! through `prepare_adapters` (the upload stream, as the engine does), the third by the first step
//! that uses it. Each step compares every logit row: with f32 on the GPU the largest difference
//! must stay within 1e-3 of the largest logit and the greedy tokens must agree (or the CPU's top
//! two must be closer than that); f16 and bf16 rows are reported, not judged. Results go to stdout
//! and, with `--out`, `DIR/gpu_model.md`.
//!
//! Before that, each kernel the model adds (`kernels::cuda::{gather_rows, rms_norm, rope,
//! silu_mul, linear}` and the device adapter pool `SlotPool`) is checked against plain CPU loops
//! on inputs rounded to the storage type, at odd shapes: the largest difference must stay within a
//! few roundings of the storage type (f32: 1e-4) of the largest output.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::LoraAdapter;
use anyhow::{bail, Context, Result};
use kernels::attention::SeqRows;
use lorahost::model::{
    self, AdapterReadiness, ComputeDevice, DeviceConfig, Dtype, Executor, ForwardBatch, KvCache,
    KvCacheConfig, Llama, LoraBatch, LoraStorage, SlotLimits,
};
use lorahost::testing::TinyModel;

mod kernel_checks;
use kernel_checks::check_kernels;
use kernels::cuda::Gpu;

const BLOCK_SIZE: usize = 16;
/// KV blocks each sequence may use (its block table: a fixed range per sequence).
const BLOCKS_PER_SEQ: usize = 8;
const DECODE_STEPS: usize = 8;
/// Largest difference allowed in f32, relative to the largest logit magnitude.
const F32_TOLERANCE: f32 = 1e-3;

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("gpu_model: parity FAILED");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("gpu_model: could not finish: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run() -> Result<bool> {
    let mut out: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(it.next().context("--out needs a directory")?.into()),
            other => bail!("unknown argument {other:?} (expected --out DIR)"),
        }
    }
    // The kernel checks' device handle is closed before the executors open their own.
    let (mut report, mut all_passed) = match Gpu::open(0) {
        Ok(gpu) => check_kernels(&gpu)?,
        Err(e) => bail!("no GPU to run on: {e}"),
    };
    let tmp = tempfile::tempdir()?;
    report.push_str(
        "## Model on the GPU vs the CPU (`gpu_model`)\n\n\
         Six sequences (two base, four on three adapters) prefilled in two chunks, then 8 greedy \
         decode steps; \"max diff\" is the largest |GPU − CPU| logit over all steps, relative to \
         the largest |logit|; \"tokens\" counts GPU greedy tokens equal to the CPU's.\n\n\
         | model | GPU dtype | max diff | tokens | verdict |\n| --- | --- | ---: | ---: | --- |\n",
    );
    for (name, qwen2) in [("llama", false), ("qwen2", true)] {
        let tiny = TinyModel {
            hidden: 256,
            intermediate: 512,
            layers: 3,
            heads: 8,
            kv_heads: 2,
            vocab: 4096,
            max_positions: 1024,
            seed: 7,
            qwen2,
            // The Qwen2 model has its own lm_head, so both ways to the logits are checked.
            untied_lm_head: qwen2,
        };
        let dir = tmp.path().join(name);
        tiny.write_hf_dir(&dir, &tmp.path().join("no-tokenizer"))?;
        let model = model::load(&dir, Dtype::F32)?.model.with_lora_storage(LoraStorage::F32);
        let adapters = make_adapters(&tiny, &model, tmp.path(), name)?;
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let result = compare(&model, &adapters, dtype)?;
            let judged = dtype == Dtype::F32;
            let passed = !judged || result.passed();
            all_passed &= passed;
            let verdict = match (judged, passed) {
                (false, _) => "reported",
                (true, true) => "pass",
                (true, false) => "**FAIL**",
            };
            writeln!(
                report,
                "| {name} | {dtype:?} | {:.2e} | {}/{} | {verdict} |",
                result.max_diff, result.tokens_equal, result.tokens
            )?;
        }
    }
    print!("{report}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("gpu_model.md"), &report)?;
    }
    Ok(all_passed)
}

/// Three adapters: rank 8 on every projection, rank 4 on q/v, rank 16 with DoRA on the MLP and o.
fn make_adapters(tiny: &TinyModel, model: &Llama, dir: &Path, name: &str) -> Result<Vec<LoraAdapter>> {
    let all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let specs: [(usize, &[&str], bool); 3] = [
        (8, &all, false),
        (4, &["q_proj", "v_proj"], false),
        (16, &["o_proj", "gate_proj", "up_proj", "down_proj"], true),
    ];
    let mut adapters = Vec::new();
    for (k, (rank, targets, dora)) in specs.into_iter().enumerate() {
        let path = dir.join(format!("{name}-adapter-{k}"));
        tiny.write_adapter(&path, rank, 2.0 * rank as f64, targets, 100 + k as u64)?;
        if dora {
            add_dora_magnitudes(&path)?;
        }
        let mut adapter = LoraAdapter::load_dir(&path, &model.base_shape())?;
        model.prepare_adapter(&mut adapter)?;
        adapters.push(adapter);
    }
    Ok(adapters)
}

/// Turns a written adapter into a DoRA one: `use_dora` in its config and a magnitude vector per
/// site (random, around 1), as PEFT stores them.
fn add_dora_magnitudes(dir: &Path) -> Result<()> {
    use candle_core::{Device, Tensor};
    let config_path = dir.join("adapter_config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["use_dora"] = serde_json::Value::Bool(true);
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let weights_path = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)?;
    let mut rng = kernels::lora::workload::SplitMix64::new(9);
    let lora_b: Vec<(String, usize)> = tensors
        .iter()
        .filter(|(k, _)| k.ends_with(".lora_B.weight"))
        .map(|(k, t)| (k.clone(), t.dims()[0]))
        .collect();
    for (key, out) in lora_b {
        let magnitude: Vec<f32> = (0..out).map(|_| rng.uniform(0.5, 1.5)).collect();
        let name = key.replace(".lora_B.weight", ".lora_magnitude_vector");
        tensors.insert(name, Tensor::from_vec(magnitude, out, &Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, &weights_path)?;
    Ok(())
}

struct Comparison {
    max_diff: f32,
    tokens: usize,
    tokens_equal: usize,
    /// Rows whose greedy tokens differ although the CPU's top two are further apart than the
    /// tolerance.
    hard_mismatches: usize,
}

impl Comparison {
    fn passed(&self) -> bool {
        self.max_diff <= F32_TOLERANCE && self.hard_mismatches == 0
    }
}

/// One sequence of the workload: its tokens so far and the adapter it uses.
struct Seq {
    tokens: Vec<u32>,
    adapter: Option<usize>,
    blocks: Vec<u32>,
    /// Tokens already in the KV cache.
    computed: usize,
}

fn compare(model: &Llama, adapters: &[LoraAdapter], dtype: Dtype) -> Result<Comparison> {
    let cfg = model.config();
    // Same-adapter sequences next to each other: each adapter's rows are contiguous.
    let plan: [(usize, Option<usize>); 6] =
        [(5, None), (33, None), (17, Some(0)), (1, Some(0)), (40, Some(1)), (9, Some(2))];
    let mut rng = kernels::lora::workload::SplitMix64::new(3);
    let mut seqs: Vec<Seq> = plan
        .iter()
        .enumerate()
        .map(|(i, &(len, adapter))| Seq {
            tokens: (0..len).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect(),
            adapter,
            blocks: ((i * BLOCKS_PER_SEQ) as u32..((i + 1) * BLOCKS_PER_SEQ) as u32).collect(),
            computed: 0,
        })
        .collect();
    let blocks = plan.len() * BLOCKS_PER_SEQ;
    let kv = KvCacheConfig {
        budget_bytes: blocks * KvCache::block_bytes(cfg, BLOCK_SIZE),
        block_size: BLOCK_SIZE,
    };
    let mut cpu = Executor::cpu(model, kv);
    let adapter_limits = SlotLimits { slots: 4, bytes: model::DEFAULT_GPU_ADAPTER_BYTES };
    let device = DeviceConfig { device: ComputeDevice::Cuda(0), dtype, adapters: adapter_limits };
    let mut gpu = Executor::open(model, device, kv).context("opening the GPU executor")?;
    // The first two adapters come in the way the engine brings them (queued, copied on the
    // upload stream, polled until ready); the third is met by a step and loaded there.
    load_ahead(&mut gpu, &adapters[..2])?;
    let mut result = Comparison { max_diff: 0.0, tokens: 0, tokens_equal: 0, hard_mismatches: 0 };
    // Two prefill chunks, then decode steps.
    for step in 0..2 + DECODE_STEPS {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut ranges = Vec::new();
        // Sequences whose last token runs in this step: they get their next token.
        let mut completes = Vec::new();
        for s in &seqs {
            let end = if step == 0 { s.tokens.len().div_ceil(2) } else { s.tokens.len() };
            let start = tokens.len();
            tokens.extend_from_slice(&s.tokens[s.computed..end]);
            positions.extend(s.computed..end);
            ranges.push(start..tokens.len());
            completes.push(end > s.computed && end == s.tokens.len());
        }
        let logit_rows: Vec<u32> =
            ranges.iter().filter(|r| !r.is_empty()).map(|r| (r.end - 1) as u32).collect();
        let wanting: Vec<usize> = (0..seqs.len()).filter(|&i| !ranges[i].is_empty()).collect();
        let seq_rows: Vec<SeqRows> = seqs
            .iter()
            .zip(&ranges)
            .filter(|(_, r)| !r.is_empty())
            .map(|(s, r)| SeqRows { rows: r.clone(), start_pos: s.computed, block_table: &s.blocks })
            .collect();
        let segments = seqs
            .iter()
            .zip(&ranges)
            .filter_map(|(s, r)| s.adapter.filter(|_| !r.is_empty()).map(|a| (r.clone(), &adapters[a])))
            .collect();
        let lora = LoraBatch::new(segments);
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seq_rows,
            logit_rows: &logit_rows,
            lora: &lora,
        };
        let want = cpu.forward(model, &batch)?;
        let got = gpu.forward(model, &batch)?;
        if got.len() != want.len() {
            bail!("step {step}: the GPU returned {} logits, the CPU {}", got.len(), want.len());
        }
        let vocab = cfg.vocab_size;
        let mut next = Vec::new();
        for (row, (w, g)) in want.chunks_exact(vocab).zip(got.chunks_exact(vocab)).enumerate() {
            let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            // A NaN or infinite GPU logit is infinitely wrong (f32::max would skip a NaN).
            let diff = w.iter().zip(g).fold(0.0f32, |m, (a, b)| {
                let d = (a - b).abs();
                if b.is_finite() && !d.is_nan() {
                    m.max(d)
                } else {
                    f32::INFINITY
                }
            }) / scale;
            result.max_diff = result.max_diff.max(diff);
            let (cpu_top, gap) = top_two(w);
            let gpu_top = top_two(g).0;
            result.tokens += 1;
            if cpu_top == gpu_top {
                result.tokens_equal += 1;
            } else if gap > F32_TOLERANCE * scale {
                result.hard_mismatches += 1;
            }
            next.push((wanting[row], cpu_top as u32));
        }
        drop((seq_rows, lora));
        for (s, r) in seqs.iter_mut().zip(&ranges) {
            s.computed += r.len();
        }
        for (i, token) in next {
            if completes[i] {
                seqs[i].tokens.push(token);
            }
        }
    }
    Ok(result)
}

/// Brings `adapters` onto the device through `prepare_adapters` and waits until every one is
/// ready (10 s at most).
fn load_ahead(gpu: &mut Executor, adapters: &[LoraAdapter]) -> Result<()> {
    let wanted: Vec<Arc<LoraAdapter>> = adapters.iter().cloned().map(Arc::new).collect();
    let started = Instant::now();
    loop {
        let readiness = gpu.prepare_adapters(&wanted, &[]);
        if let Some(AdapterReadiness::Failed(why)) =
            readiness.iter().find(|r| matches!(r, AdapterReadiness::Failed(_)))
        {
            bail!("loading an adapter ahead failed: {why}");
        }
        if readiness.iter().all(|r| *r == AdapterReadiness::Ready) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("adapters loaded ahead were not ready after 10 s: {readiness:?}");
        }
        gpu.start_queued_loads();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The argmax and how far the best logit is above the second best.
fn top_two(logits: &[f32]) -> (usize, f32) {
    let (mut best, mut first, mut second) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > first {
            second = first;
            first = v;
            best = i;
        } else if v > second {
            second = v;
        }
    }
    (best, first - second)
}
