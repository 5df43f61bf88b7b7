//! Shared test helpers: fixture paths, tiny models, running requests through the engine core.

#![allow(dead_code)]

use lorahost::base::Base;
use lorahost::engine::{EngineConfig, EngineCore, SamplingParams, StopCriteria, TokenEvent, ValidRequest};
use lorahost::model::{Dtype, KvCacheConfig};
use lorahost::testing::TinyModel;
use std::path::PathBuf;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// The default model in `--dtype f32`, loaded once per test binary (fetched once per machine).
pub fn base_f32() -> &'static Base {
    static BASE: std::sync::OnceLock<Base> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let path = lorahost::fetch::default_model().expect("default model");
        Base::load(&path, Dtype::F32).expect("load default model")
    })
}

/// A JSON list of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// A JSON file under the golden fixtures.
pub fn golden_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture");
    serde_json::from_str(&text).expect("fixture json")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

/// A tiny random model in a temp directory, loaded.
pub fn tiny_base(shape: TinyModel) -> (tempfile::TempDir, Base) {
    let dir = tempfile::tempdir().expect("tempdir");
    shape.write_hf_dir(dir.path(), &fixtures().join("base")).expect("write tiny model");
    let base = Base::load(dir.path(), Dtype::F32).expect("load tiny model");
    (dir, base)
}

pub fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> ValidRequest {
    ValidRequest {
        prompt_ids: prompt,
        sampling,
        stop: StopCriteria { max_tokens, stop: vec![], ignore_eos: true },
        adapter: None,
    }
}

pub fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..Default::default() }
}

pub fn seeded(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 50, seed: Some(seed), ..Default::default() }
}

pub fn engine_config(kv_bytes: usize, block_size: usize, step_tokens: usize) -> EngineConfig {
    EngineConfig {
        max_step_tokens: step_tokens,
        max_running: 64,
        kv_cache: KvCacheConfig { budget_bytes: kv_bytes, block_size },
    }
}

pub fn submit(core: &mut EngineCore, req: ValidRequest) -> UnboundedReceiver<TokenEvent> {
    let (tx, rx) = unbounded_channel();
    core.add(req, tx).expect("request accepted");
    rx
}

/// Token ids of a finished request's stream; panics if it failed or did not finish.
pub fn drain_tokens(rx: &mut UnboundedReceiver<TokenEvent>) -> Vec<u32> {
    let mut ids = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            TokenEvent::Token(t) => ids.push(t.id),
            TokenEvent::Finished(_) => return ids,
            TokenEvent::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("request did not finish");
}

pub fn run_to_end(core: &mut EngineCore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while core.has_work() {
        if !core.step().expect("step") {
            // Waiting for an adapter load.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(std::time::Instant::now() < deadline, "engine does not terminate");
    }
}
