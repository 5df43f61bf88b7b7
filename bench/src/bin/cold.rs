//! Cold adapter latency on the default model: a rank-16 adapter on all seven projections
//! (~20 MB f32), from the store on disk to servable (read, validate against the base, resident in
//! the host cache), and from upload (store write, fsynced) to servable. p50 / p99 over many runs.
//!
//! `cargo run --release -p lorahost-bench --bin cold -- [--runs 50]`

use adapters::cache::CacheConfig;
use adapters::store::AdapterKey;
use clap::Parser;
use lorahost::adapter_host::AdapterHost;
use lorahost::base::Base;
use lorahost::model::Dtype;
use lorahost::model::LoraStorage;
use lorahost_bench::random_adapters;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 50)]
    runs: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = Base::load(&lorahost::fetch::default_model()?, Dtype::Auto)?;
    let source = random_adapters(&base, 1, args.rank, LoraStorage::F32)?;
    let dir = tempfile::tempdir()?;
    let files = dir.path().join("files");
    adapters::write_adapter_dir(
        &files,
        &serde_json::json!({"peft_type": "LORA", "r": args.rank, "lora_alpha": args.rank, "target_modules": "all-linear"}),
        source[0].sites(),
        &base.model.base_shape(),
    )?;
    let config = std::fs::read(files.join(adapters::CONFIG_FILE))?;
    let weights = std::fs::read(files.join(adapters::WEIGHTS_FILE))?;
    let host = AdapterHost::open(&dir.path().join("store"), base.model.clone(), CacheConfig::default())?;
    let (mut disk, mut upload) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        // Upload to servable: a new generation each time (the bytes differ by a config field).
        let config_i =
            String::from_utf8(config.clone())?.replacen('{', &format!("{{\"revision\": \"{i}\", "), 1);
        let key = AdapterKey::in_default_tenant(format!("cold-{i}"))?;
        let t = Instant::now();
        let (stored, _) = host.store.put(&key, config_i.as_bytes(), &weights)?;
        let lease = host.cache.acquire_blocking(stored.id, Duration::from_secs(30))?;
        upload.push(t.elapsed().as_secs_f64() * 1e3);
        drop(lease);
        host.cache.invalidate(stored.id);
        // Disk to servable: the same adapter, evicted, loaded again from the store.
        let t = Instant::now();
        let lease = host.cache.acquire_blocking(stored.id, Duration::from_secs(30))?;
        disk.push(t.elapsed().as_secs_f64() * 1e3);
        drop(lease);
        host.cache.invalidate(stored.id);
    }
    let mb = weights.len() as f64 / 1e6;
    println!("rank-{} all-linear adapter, {mb:.1} MB safetensors, {} runs", args.rank, args.runs);
    println!("| path | p50 ms | p99 ms |\n| --- | --- | --- |");
    println!("| disk → servable | {:.1} | {:.1} |", percentile(disk.clone(), 0.5), percentile(disk, 0.99));
    println!(
        "| upload → servable | {:.1} | {:.1} |",
        percentile(upload.clone(), 0.5),
        percentile(upload, 0.99)
    );
    Ok(())
}
