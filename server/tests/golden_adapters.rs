//! PEFT adapters on the real default model in `--dtype f32` against the transformers + peft
//! reference (tests/fixtures/golden): every prompt under adapters a (r8, q/v) and b (r16, all
//! seven projections) — logits within 1e-3, greedy tokens exact — and the heterogeneous batch
//! (adapter a, adapter b and the base in one run) row by row; and in `--dtype auto`, the int8
//! copies of the same adapters against their f32 form.

mod common;

use adapters::LoraAdapter;
use common::*;
use lorahost::adapter_host::load_dir_validated;
use lorahost::engine::{EngineCore, StopCriteria, ValidRequest};
use lorahost::model::{Dtype, LoraStorage};
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

/// `--dtype auto` holds adapters in int8 (a quarter of the bytes). On the quantized base, the
/// logits of an adapter in int8 are as close to the f32 reference as those of the same adapter
/// in f32: the base's own quantization (up to ~1 logit with these strong random adapters)
/// dominates, and int8 adapters stay inside that band. The greedy next token is the same.
#[test]
fn auto_dtype_serves_adapters_in_int8_as_close_as_f32() {
    let path = lorahost::fetch::default_model().expect("default model");
    let base = lorahost::base::Base::load(&path, Dtype::Auto).expect("auto base");
    assert_eq!(base.model.lora_storage(), LoraStorage::Int8);
    let shape = base.model.base_shape();
    let prompts = golden_json("prompts.json");
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    for variant in VARIANTS {
        let dir = fixtures().join("adapters").join(variant);
        let int8 = load_dir_validated(&base.model, &dir).expect("int8 adapter");
        let f32 = LoraAdapter::load_dir(&dir, &shape).expect("f32 adapter");
        assert!(int8.sites().iter().all(|s| s.f32_matrices().is_none()), "{variant}: not quantized");
        assert!(int8.bytes() * 3 < f32.bytes(), "{variant}: {} vs {} bytes", int8.bytes(), f32.bytes());
        let (mut worst_int8, mut worst_f32) = (0f32, 0f32);
        for (p, want) in prompts["prompts"].as_array().expect("prompts").iter().zip(expected_logits(variant))
        {
            let prompt = ids(&p["prompt_ids"]);
            let a = base.model.last_logits(&prompt, Some(&int8)).expect("int8 forward");
            let b = base.model.last_logits(&prompt, Some(&f32)).expect("f32 forward");
            worst_int8 = worst_int8.max(max_diff(&a, &want));
            worst_f32 = worst_f32.max(max_diff(&b, &want));
            assert_eq!(argmax(&a), argmax(&b), "{variant} / {}: greedy token differs", p["id"]);
        }
        assert!(
            worst_int8 <= 1.25 * worst_f32 + 0.25,
            "{variant}: max |Δlogit| against the reference: int8 adapter {worst_int8}, f32 adapter {worst_f32}"
        );
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
