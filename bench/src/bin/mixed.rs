//! The LoRA overhead end to end: 32 concurrent requests, each with its own rank-16 adapter on all
//! seven projections, against the same 32 requests on the base alone, in one process.
//!
//! `cargo run --release -p lorahost-bench --bin mixed -- [--reps 3] [--dtype auto]`

use clap::Parser;
use lorahost::base::Base;
use lorahost::engine::EngineConfig;
use lorahost::model::Dtype;
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = lorahost::fetch::default_model()?;
    let base = Base::load(&path, args.dtype)?;
    let adapters = random_adapters(&base, args.requests, args.rank)?;
    let config = EngineConfig { max_running: args.requests, ..Default::default() };
    let (mut base_wall, mut mixed_wall) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let b = run_batch_with_adapters(&base, config, args.requests, args.prompt, args.generate, &[]);
        let m = run_batch_with_adapters(&base, config, args.requests, args.prompt, args.generate, &adapters);
        base_wall.push(b.wall.as_secs_f64());
        mixed_wall.push(m.wall.as_secs_f64());
    }
    let ratios: Vec<f64> = mixed_wall.iter().zip(&base_wall).map(|(m, b)| m / b).collect();
    println!(
        "{} requests x ({} prompt + {} generated), {} distinct rank-{} all-linear adapters, dtype {:?}",
        args.requests, args.prompt, args.generate, args.requests, args.rank, args.dtype
    );
    println!("base wall s:  {}", summarize(base_wall));
    println!("mixed wall s: {}", summarize(mixed_wall));
    let r = summarize(ratios);
    println!("mixed / base: {:.3} [{:.3}-{:.3}]", r.median, r.min, r.max);
    Ok(())
}
