//! Throughput of the model on the GPU with many adapters against the base alone, in one process:
//! a 7B-shaped random-weight bf16 model (32 layers, hidden 4096, intermediate 11008, 32 heads,
//! 8 KV heads, vocab 32000; weights made on the device) and rank-16 adapters on q_proj and v_proj.
//!
//! `gpu_e2e [--out DIR] [--quick]` (build with `--features cuda`; exits with status 2 without a
//! device). Each configuration runs the same workload: rounds of 64 sequences, 128 random prompt
//! tokens each (prefilled 8 sequences per step), then 128 greedy decode steps of all 64; request
//! `i` of a round uses adapter `(i · 7919 + round) mod N`. Configurations: the base alone, then 1,
//! 100 and 1000 adapters, all resident in the device slot pool (loaded through the serving path
//! before the clock starts: the adapters are real PEFT adapters, eight distinct weight sets under
//! distinct ids). Reported: tokens per second (prompt + generated), and its ratio to the base
//! (goal ≥ 0.9 at 1000 adapters). The steps drive the executor directly: the engine's CPU-side
//! scheduling is not in the figures. Results go to stdout and, with `--out`, `DIR/gpu_e2e.md`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use adapters::{AdapterId, LoraAdapter, LoraSite, SiteMatrices};
use anyhow::{bail, Context, Result};
use kernels::attention::SeqRows;
use kernels::lora::workload::SplitMix64;
use lorahost::model::{
    base_shape, Architecture, Dtype, ForwardBatch, GpuModel, KvCache, KvCacheConfig, LoraBatch, ModelConfig,
    SlotLimits,
};

const SEQS: usize = 64;
const PROMPT: usize = 128;
const GENERATE: usize = 128;
const BLOCK_SIZE: usize = 16;
const PREFILL_SEQS_PER_STEP: usize = 8;
const RANK: usize = 16;
const DISTINCT_WEIGHT_SETS: usize = 8;

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu_e2e: could not finish: {e:#}");
        std::process::exit(2);
    }
}

fn seven_b() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 32000,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
    }
}

fn run() -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut quick = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(it.next().context("--out needs a directory")?.into()),
            "--quick" => quick = true,
            other => bail!("unknown argument {other:?} (expected --out DIR, --quick)"),
        }
    }
    let cfg = seven_b();
    let rounds = if quick { 1 } else { 2 };
    let counts: &[usize] = if quick { &[1, 100] } else { &[1, 100, 1000] };
    let most = counts.iter().copied().max().unwrap_or(1);
    // Blocks for one round's sequences, plus one per adapter for the warm-up rows.
    let blocks_per_seq = (PROMPT + GENERATE).div_ceil(BLOCK_SIZE);
    let blocks = SEQS * blocks_per_seq + SEQS;
    let block_bytes = KvCache::block_bytes_of(&cfg, BLOCK_SIZE, std::mem::size_of::<half::bf16>());
    let kv = KvCacheConfig { budget_bytes: blocks * block_bytes, block_size: BLOCK_SIZE };
    let slots = most.next_power_of_two().max(SEQS);
    let started = Instant::now();
    // Room for every adapter: the benchmark measures steps, not evictions.
    let limits = SlotLimits { slots, bytes: usize::MAX };
    let mut model = GpuModel::random(&cfg, 0, Dtype::Bf16, kv, limits, 1)?;
    eprintln!("gpu_e2e: {} ready in {:.1} s", model.device_name(), started.elapsed().as_secs_f64());
    let adapters = make_adapters(&cfg, most)?;

    let mut report = format!(
        "## End to end on the GPU: 7B-shaped bf16 model, rank-16 q/v adapters (`gpu_e2e`)\n\n\
         Device: {}. Rounds of {SEQS} sequences ({PROMPT} prompt + {GENERATE} generated tokens each), \
         {rounds} round(s) per configuration; adapters resident in {slots} device slots.\n\n\
         | adapters | distinct per round | tokens/s | / base |\n| ---: | ---: | ---: | ---: |\n",
        model.device_name()
    );
    let base = run_rounds(&mut model, &cfg, &[], rounds)?;
    writeln!(report, "| base | 0 | {base:.0} | 1.00 |")?;
    for &n in counts {
        let pool = &adapters[..n];
        warm_up(&mut model, pool)?;
        let tps = run_rounds(&mut model, &cfg, pool, rounds)?;
        let distinct = (0..SEQS).map(|i| (i * 7919) % n).collect::<std::collections::HashSet<_>>().len();
        writeln!(report, "| {n} | {distinct} | {tps:.0} | {:.2} |", tps / base)?;
    }
    print!("{report}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("gpu_e2e.md"), &report)?;
    }
    Ok(())
}

/// `n` adapters with distinct ids over `DISTINCT_WEIGHT_SETS` random weight sets, written and
/// read back as PEFT directories (the serving path's validation).
fn make_adapters(cfg: &ModelConfig, n: usize) -> Result<Vec<LoraAdapter>> {
    let shape = base_shape(cfg);
    let dir = tempfile::tempdir()?;
    let mut rng = SplitMix64::new(5);
    let mut sets = Vec::new();
    for k in 0..DISTINCT_WEIGHT_SETS.min(n) {
        let mut sites = Vec::new();
        for layer in 0..cfg.num_layers {
            for module in [0usize, 2] {
                let m = &shape.modules[module];
                sites.push(LoraSite {
                    layer,
                    module,
                    rank: RANK,
                    scale: 2.0,
                    matrices: SiteMatrices::F32 {
                        a: rng.uniform_vec(RANK * m.in_features, -0.02, 0.02),
                        b: rng.uniform_vec(m.out_features * RANK, -0.02, 0.02),
                    },
                    magnitude: None,
                    dora_factor: None,
                });
            }
        }
        let config = serde_json::json!({
            "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        });
        let path = dir.path().join(format!("set-{k}"));
        adapters::write_adapter_dir(&path, &config, &sites, &shape)?;
        sets.push(LoraAdapter::load_dir(&path, &shape)?);
    }
    Ok((0..n)
        .map(|i| {
            let mut a = sets[i % sets.len()].clone();
            a.id = AdapterId::of_files(format!("gpu_e2e adapter {i}").as_bytes(), b"");
            a
        })
        .collect())
}

/// Loads every adapter into the device pool (steps of one row per adapter) so the timed rounds
/// measure serving, not the first upload.
fn warm_up(model: &mut GpuModel, adapters: &[LoraAdapter]) -> Result<()> {
    let first_block = (SEQS * (PROMPT + GENERATE).div_ceil(BLOCK_SIZE)) as u32;
    for chunk in adapters.chunks(SEQS) {
        let tokens = vec![1u32; chunk.len()];
        let positions = vec![0usize; chunk.len()];
        let tables: Vec<[u32; 1]> = (0..chunk.len() as u32).map(|i| [first_block + i]).collect();
        let seqs: Vec<SeqRows> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| SeqRows { rows: i..i + 1, start_pos: 0, block_table: t })
            .collect();
        let lora = LoraBatch::new(chunk.iter().enumerate().map(|(i, a)| (i..i + 1, a)).collect());
        let logit_rows = [0u32];
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seqs,
            logit_rows: &logit_rows,
            lora: &lora,
        };
        model.forward(&batch)?;
    }
    Ok(())
}

/// Runs `rounds` rounds of the workload; returns tokens (prompt + generated) per second.
fn run_rounds(
    model: &mut GpuModel,
    cfg: &ModelConfig,
    adapters: &[LoraAdapter],
    rounds: usize,
) -> Result<f64> {
    let blocks_per_seq = (PROMPT + GENERATE).div_ceil(BLOCK_SIZE);
    let tables: Vec<Vec<u32>> = (0..SEQS)
        .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let mut rng = SplitMix64::new(11);
    let started = Instant::now();
    for round in 0..rounds {
        let adapter_of =
            |i: usize| (!adapters.is_empty()).then(|| &adapters[(i * 7919 + round) % adapters.len()]);
        // Sequences in adapter order, so each adapter's rows are contiguous.
        let mut order: Vec<usize> = (0..SEQS).collect();
        order.sort_by_key(|&i| adapter_of(i).map(|a| a.id));
        let mut tokens: Vec<Vec<u32>> = (0..SEQS)
            .map(|_| (0..PROMPT).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect())
            .collect();
        for chunk in order.chunks(PREFILL_SEQS_PER_STEP) {
            let rows: Vec<(usize, std::ops::Range<usize>)> =
                chunk.iter().enumerate().map(|(k, &s)| (s, k * PROMPT..(k + 1) * PROMPT)).collect();
            let next = step(model, &tables, &tokens, &rows, 0, &adapter_of)?;
            for (&s, t) in chunk.iter().zip(next) {
                tokens[s].push(t);
            }
        }
        for d in 0..GENERATE - 1 {
            let rows: Vec<(usize, std::ops::Range<usize>)> =
                order.iter().enumerate().map(|(k, &s)| (s, k..k + 1)).collect();
            let next = step(model, &tables, &tokens, &rows, PROMPT + d, &adapter_of)?;
            for (&s, t) in order.iter().zip(next) {
                tokens[s].push(t);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((rounds * SEQS * (PROMPT + GENERATE)) as f64 / seconds)
}

/// One forward step over `rows` = (sequence, its rows in the step) starting at position `start`
/// (the prompt at 0, or one decode token); returns each sequence's greedy next token.
fn step<'a>(
    model: &mut GpuModel,
    tables: &[Vec<u32>],
    tokens: &[Vec<u32>],
    rows: &[(usize, std::ops::Range<usize>)],
    start: usize,
    adapter_of: &dyn Fn(usize) -> Option<&'a LoraAdapter>,
) -> Result<Vec<u32>> {
    let mut step_tokens = Vec::new();
    let mut positions = Vec::new();
    for (s, r) in rows {
        step_tokens.extend_from_slice(&tokens[*s][start..start + r.len()]);
        positions.extend(start..start + r.len());
    }
    let seqs: Vec<SeqRows> = rows
        .iter()
        .map(|(s, r)| SeqRows { rows: r.clone(), start_pos: start, block_table: &tables[*s] })
        .collect();
    let mut segments: Vec<(std::ops::Range<usize>, &LoraAdapter)> = Vec::new();
    for (s, r) in rows {
        let Some(a) = adapter_of(*s) else { continue };
        match segments.last_mut() {
            Some((prev, last)) if last.id == a.id => prev.end = r.end,
            _ => segments.push((r.clone(), a)),
        }
    }
    let lora = LoraBatch::new(segments);
    let logit_rows: Vec<u32> = rows.iter().map(|(_, r)| (r.end - 1) as u32).collect();
    let batch = ForwardBatch {
        tokens: &step_tokens,
        positions: &positions,
        seqs: &seqs,
        logit_rows: &logit_rows,
        lora: &lora,
    };
    let logits = model.forward(&batch)?;
    let vocab = logits.len() / rows.len().max(1);
    Ok(logits.chunks_exact(vocab.max(1)).map(lorahost::engine::argmax).collect())
}
