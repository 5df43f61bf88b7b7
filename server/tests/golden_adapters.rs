//! PEFT adapters on the real default model in `--dtype f32` against the transformers + peft
//! reference (tests/fixtures/golden): every prompt under adapters a (r8, q/v) and b (r16, all
//! seven projections) — logits within 1e-3, greedy tokens exact — and the heterogeneous batch
//! (adapter a, adapter b and the base in one run) row by row.

mod common;

use adapters::LoraAdapter;
use common::*;
use lorahost::engine::{EngineCore, StopCriteria, ValidRequest};
use serde_json::Value;
use std::sync::Arc;

const VARIANTS: [&str; 2] = ["a_r8_qv", "b_r16_all7"];

fn adapter(name: &str) -> Arc<LoraAdapter> {
    let dir = fixtures().join("adapters").join(name);
    Arc::new(LoraAdapter::load_dir(&dir, &base_f32().model.base_shape()).expect("adapter loads"))
}

fn expected_logits(variant: &str) -> Vec<Vec<f32>> {
    let t = candle_core::safetensors::load(
        fixtures().join(format!("logits_{variant}.safetensors")),
        &candle_core::Device::Cpu,
    )
    .expect("logits");
    t["last_logits"].to_vec2::<f32>().expect("2-D")
}

#[test]
fn adapter_logits_within_tolerance() {
    let base = base_f32();
    let prompts = golden_json("prompts.json");
    for variant in VARIANTS {
        let adapter = adapter(variant);
        for (p, want) in prompts["prompts"].as_array().expect("prompts").iter().zip(expected_logits(variant))
        {
            let got = base.model.last_logits(&ids(&p["prompt_ids"]), Some(&adapter)).expect("forward");
            let max_abs = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max_abs < 1e-3, "{variant} / {}: max |Δlogit| = {max_abs}", p["id"]);
        }
    }
}

fn request(prompt: Vec<u32>, tokens: usize, adapter: Option<Arc<LoraAdapter>>) -> ValidRequest {
    ValidRequest {
        prompt_ids: prompt,
        sampling: greedy(),
        stop: StopCriteria { max_tokens: tokens, stop: vec![], ignore_eos: true },
        adapter: adapter.map(Into::into),
    }
}

#[test]
fn every_variant_and_prompt_in_one_mixed_run() {
    let base = base_f32();
    let prompts = golden_json("prompts.json");
    let generations = golden_json("generations.json");
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(256 << 20, 16, 512));
    let mut streams = Vec::new();
    for variant in ["base", VARIANTS[0], VARIANTS[1]] {
        let adapter = (variant != "base").then(|| adapter(variant));
        let results = generations["results"][variant].as_array().expect("variant results");
        for (p, g) in prompts["prompts"].as_array().expect("prompts").iter().zip(results) {
            let want = ids(&g["generated_ids"]);
            let rx = submit(&mut core, request(ids(&p["prompt_ids"]), want.len(), adapter.clone()));
            streams.push((rx, want, format!("{variant} / {}", p["id"])));
        }
    }
    run_to_end(&mut core);
    for (mut rx, want, name) in streams {
        assert_eq!(drain_tokens(&mut rx), want, "{name}");
    }
}

#[test]
fn the_golden_mixed_batch_row_by_row() {
    let base = base_f32();
    let prompts = golden_json("prompts.json");
    let mixed = golden_json("mixed_batch.json");
    let prompt_ids = |id: &Value| {
        let p =
            prompts["prompts"].as_array().expect("prompts").iter().find(|p| &p["id"] == id).expect("prompt");
        ids(&p["prompt_ids"])
    };
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512));
    let mut streams = Vec::new();
    for row in mixed["rows"].as_array().expect("rows") {
        let name = row["adapter"].as_str().expect("adapter");
        let adapter = (name != "base").then(|| adapter(name));
        let want = ids(&row["expected_generated_ids"]);
        streams.push((submit(&mut core, request(prompt_ids(&row["prompt"]), want.len(), adapter)), want));
    }
    run_to_end(&mut core);
    for (i, (mut rx, want)) in streams.into_iter().enumerate() {
        assert_eq!(drain_tokens(&mut rx), want, "row {i}");
    }
}
