//! Shared helpers for lorahost's benchmarks: timing statistics and the engine-driving loops the
//! end-to-end benchmarks use. Benchmarks report ratios against a baseline run in the same
//! process or script, never absolute pass/fail thresholds.

pub mod quant;
pub mod scaled;

use adapters::LoraAdapter;
use lorahost::base::Base;
use lorahost::engine::{EngineConfig, EngineCore, SamplingParams, StopCriteria, TokenEvent, ValidRequest};
use lorahost::model::LoraStorage;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Median, min and max of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(mut xs: Vec<f64>) -> Summary {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return Summary { median: f64::NAN, min: f64::NAN, max: f64::NAN };
    }
    let median = if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 };
    Summary { median, min: xs[0], max: xs[n - 1] }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} [{:.1}-{:.1}]", self.median, self.min, self.max)
    }
}

/// Timings of one batch of identical-shape requests run to completion.
#[derive(Debug, Clone, Copy)]
pub struct BatchTiming {
    /// Prompt tokens / time until every sequence had its first token.
    pub prefill_tokens_per_s: f64,
    /// Tokens generated after the last sequence's first token / time from then to the end
    /// (llama-batched-bench's S_TG).
    pub decode_tokens_per_s: f64,
    pub wall: Duration,
}

/// Runs `batch` sequences of `prompt_len` prompt tokens and `gen_len` generated tokens (EOS
/// ignored, greedy) through a fresh engine core.
pub fn run_batch(
    base: &Base,
    config: EngineConfig,
    batch: usize,
    prompt_len: usize,
    gen_len: usize,
) -> BatchTiming {
    run_batch_with_adapters(base, config, batch, prompt_len, gen_len, &[])
}

/// `run_batch` where sequence `i` uses `adapters[i % adapters.len()]` (none when empty).
pub fn run_batch_with_adapters(
    base: &Base,
    config: EngineConfig,
    batch: usize,
    prompt_len: usize,
    gen_len: usize,
    adapters: &[Arc<LoraAdapter>],
) -> BatchTiming {
    let mut core = EngineCore::new(base.model.clone(), base.tokenizer.clone(), config);
    let vocab = base.model.config().vocab_size as u32;
    let mut streams: Vec<UnboundedReceiver<TokenEvent>> = Vec::new();
    for b in 0..batch {
        // Distinct prompts so no two sequences are the same.
        let prompt =
            (0..prompt_len as u32).map(|i| (i * 31 + b as u32 * 977 + 100) % (vocab - 100) + 50).collect();
        let req = ValidRequest {
            prompt_ids: prompt,
            sampling: SamplingParams { temperature: 0.0, ..Default::default() },
            stop: StopCriteria { max_tokens: gen_len, stop: vec![], ignore_eos: true },
            adapter: (!adapters.is_empty()).then(|| adapters[b % adapters.len()].clone().into()),
        };
        let (tx, rx) = unbounded_channel();
        if let Err(e) = core.add(req, tx) {
            panic!("benchmark request rejected: {e}");
        }
        streams.push(rx);
    }
    let start = Instant::now();
    let mut first_token = vec![false; batch];
    let mut all_started: Option<Instant> = None;
    let mut tokens_after_start = 0usize;
    while core.has_work() {
        if let Err(e) = core.step() {
            panic!("benchmark step failed: {e}");
        }
        let mut new_tokens = 0;
        for (i, rx) in streams.iter_mut().enumerate() {
            while let Ok(ev) = rx.try_recv() {
                if let TokenEvent::Token(_) = ev {
                    if first_token[i] {
                        new_tokens += 1;
                    }
                    first_token[i] = true;
                }
            }
        }
        if all_started.is_some() {
            tokens_after_start += new_tokens;
        } else if first_token.iter().all(|&f| f) {
            all_started = Some(Instant::now());
        }
    }
    let end = Instant::now();
    let started = all_started.unwrap_or(end);
    let prefill = started.duration_since(start).as_secs_f64();
    let decode = end.duration_since(started).as_secs_f64();
    BatchTiming {
        prefill_tokens_per_s: (batch * prompt_len) as f64 / prefill.max(1e-9),
        decode_tokens_per_s: tokens_after_start as f64 / decode.max(1e-9),
        wall: end.duration_since(start),
    }
}

/// `n` random PEFT adapters of `rank` on every projection of `base`, built the way a loaded
/// adapter is (written to a temp directory and read back, so they pass validation), held as
/// `storage` says.
pub fn random_adapters(
    base: &Base,
    n: usize,
    rank: usize,
    storage: LoraStorage,
) -> anyhow::Result<Vec<Arc<LoraAdapter>>> {
    let shape = base.model.base_shape();
    let dir = tempfile::tempdir()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut rng = kernels::lora::workload::SplitMix64::new(1000 + i as u64);
        let mut sites = Vec::new();
        for layer in 0..shape.num_layers {
            for (module, m) in shape.modules.iter().enumerate() {
                let a = (0..rank * m.in_features).map(|_| rng.uniform(-1.0, 1.0) * 0.02).collect();
                let b = (0..m.out_features * rank).map(|_| rng.uniform(-1.0, 1.0) * 0.02).collect();
                sites.push(adapters::LoraSite {
                    layer,
                    module,
                    rank,
                    scale: 1.0,
                    matrices: adapters::SiteMatrices::F32 { a, b },
                    magnitude: None,
                    dora_factor: None,
                });
            }
        }
        let config = serde_json::json!({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": "all-linear"});
        let path = dir.path().join(format!("adapter-{i}"));
        adapters::write_adapter_dir(&path, &config, &sites, &shape)?;
        let mut adapter = LoraAdapter::load_dir(&path, &shape)?;
        if storage == LoraStorage::Int8 {
            adapter.quantize_int8(&shape)?;
        }
        out.push(Arc::new(adapter));
    }
    Ok(out)
}
