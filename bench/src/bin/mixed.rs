//! The LoRA overhead end to end: 32 concurrent requests, each with its own rank-16 adapter on all
//! seven projections, against the same 32 requests on the base alone, in one process. Adapters
//! are held as the server holds them on this base (int8 next to a quantized base); `--compare-f32`
//! also runs them in f32. `--size` runs the same on a random-weight model of a larger SmolLM2's
//! shape (`lorahost_bench::scaled`), to show how the overhead falls as the base grows.
//!
//! `cargo run --release -p lorahost-bench --bin mixed -- [--reps 3] [--dtype auto] [--compare-f32]
//! [--size default|360m|1.7b]`

use clap::Parser;
use lorahost::engine::EngineConfig;
use lorahost::model::{Dtype, KvCache, KvCacheConfig, LoraStorage};
use lorahost_bench::scaled::{load_base, ModelSize};
use lorahost_bench::{random_adapters, run_batch_with_adapters, summarize};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    dtype: Dtype,
    #[arg(long, default_value_t = 32)]
    requests: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    #[arg(long, default_value_t = 128)]
    generate: usize,
    /// Also run the adapters in f32 (the storage of an f32 base).
    #[arg(long)]
    compare_f32: bool,
    /// The base: the default model, or a random-weight model of a larger SmolLM2's shape.
    #[arg(long, value_enum, default_value_t = ModelSize::Default)]
    size: ModelSize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = lorahost::fetch::default_model()?;
    let base = load_base(args.size, &path, args.dtype)?;
    let storage = base.model.lora_storage();
    let adapters = random_adapters(&base, args.requests, args.rank, storage)?;
    let f32_adapters = if args.compare_f32 && storage != LoraStorage::F32 {
        Some(random_adapters(&base, args.requests, args.rank, LoraStorage::F32)?)
    } else {
        None
    };
    // Room for every sequence whole, so no run is slowed by preemption (larger bases need more
    // than the default budget).
    let kv = KvCacheConfig::default();
    let blocks = args.requests * (args.prompt + args.generate).div_ceil(kv.block_size);
    let needed = blocks * KvCache::block_bytes(base.model.config(), kv.block_size);
    let kv_cache = KvCacheConfig { budget_bytes: kv.budget_bytes.max(needed), ..kv };
    let config = EngineConfig { max_running: args.requests, kv_cache, ..Default::default() };
    let run = |adapters: &[_]| {
        run_batch_with_adapters(&base, config, args.requests, args.prompt, args.generate, adapters)
            .wall
            .as_secs_f64()
    };
    let (mut base_wall, mut mixed_wall, mut f32_wall) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.reps {
        base_wall.push(run(&[]));
        mixed_wall.push(run(&adapters));
        if let Some(f) = &f32_adapters {
            f32_wall.push(run(f));
        }
    }
    let ratio = |walls: &[f64]| summarize(walls.iter().zip(&base_wall).map(|(m, b)| m / b).collect());
    println!(
        "{} requests x ({} prompt + {} generated), {} distinct rank-{} all-linear adapters, dtype {:?}, adapters {:?}, base {}",
        args.requests, args.prompt, args.generate, args.requests, args.rank, args.dtype, storage, base.name
    );
    println!("base wall s:  {}", summarize(base_wall.clone()));
    println!("mixed wall s: {}", summarize(mixed_wall.clone()));
    let r = ratio(&mixed_wall);
    println!("mixed / base: {:.3} [{:.3}-{:.3}]", r.median, r.min, r.max);
    if !f32_wall.is_empty() {
        println!("mixed (f32 adapters) wall s: {}", summarize(f32_wall.clone()));
        let r = ratio(&f32_wall);
        println!("mixed (f32 adapters) / base: {:.3} [{:.3}-{:.3}]", r.median, r.min, r.max);
    }
    Ok(())
}
