//! End-to-end CPU throughput on the default model: prompt processing (128 and 1024 tokens),
//! single-stream decode, and aggregate decode at 1/8/32/64 concurrent sequences, for each
//! `--dtype`. Prints JSON lines (one per measurement) and a table; `bench/run.sh` runs it next to
//! llama.cpp and the machine-limit probes.
//!
//! `cargo run --release -p lorahost-bench --bin e2e -- --reps 3`

use anyhow::Context;
use clap::Parser;
use lorahost::base::Base;
use lorahost::engine::EngineConfig;
use lorahost::model::{Dtype, KvCache, KvCacheConfig, DEFAULT_BLOCK_SIZE};
use lorahost_bench::{run_batch, summarize};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Repetitions of each measurement (median and range are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Dtypes to measure.
    #[arg(long, value_enum, default_values_t = [Dtype::Auto, Dtype::F32])]
    dtype: Vec<Dtype>,
    /// Concurrent sequences for the aggregate decode measurement.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32, 64])]
    batch: Vec<usize>,
    /// Model (default: the default model).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = match &args.model {
        Some(p) => p.clone(),
        None => lorahost::fetch::default_model()?,
    };
    let mut table = Vec::new();
    for &dtype in &args.dtype {
        let base = Base::load(&path, dtype).with_context(|| format!("loading {}", path.display()))?;
        let config = EngineConfig { max_step_tokens: 1024, ..Default::default() };
        // Warm up caches and thread pools.
        run_batch(&base, config, 1, 16, 8);
        let mut record = |name: String, values: Vec<f64>| {
            let s = summarize(values.clone());
            println!(
                "{}",
                json!({"dtype": format!("{dtype:?}"), "measure": name, "tokens_per_s": values, "median": s.median})
            );
            table.push(format!("| {dtype:?} | {name} | {s} |"));
        };
        for prompt in [128, 1024] {
            let v =
                (0..args.reps).map(|_| run_batch(&base, config, 1, prompt, 1).prefill_tokens_per_s).collect();
            record(format!("prompt processing, {prompt}-token prompt"), v);
        }
        let v = (0..args.reps).map(|_| run_batch(&base, config, 1, 1, 129).decode_tokens_per_s).collect();
        record("single-stream decode, 128 tokens".into(), v);
        for &b in &args.batch {
            // KV room for every sequence at once (as llama-batched-bench gets `-c B*256`), so the
            // measurement is not of preemption.
            let kv_cache = KvCacheConfig {
                budget_bytes: (b * 256).div_ceil(DEFAULT_BLOCK_SIZE)
                    * KvCache::block_bytes(base.model.config(), DEFAULT_BLOCK_SIZE),
                block_size: DEFAULT_BLOCK_SIZE,
            };
            let config =
                EngineConfig { max_step_tokens: 512, max_running: b.max(1), kv_cache, ..Default::default() };
            let v =
                (0..args.reps).map(|_| run_batch(&base, config, b, 128, 128).decode_tokens_per_s).collect();
            record(format!("aggregate decode, {b} sequences (128 prompt + 128 generated each)"), v);
        }
    }
    println!("\n| dtype | measure | tokens/s median [min-max] |\n| --- | --- | --- |");
    for row in table {
        println!("{row}");
    }
    Ok(())
}
