//! Adapters of other shapes against references made with transformers + peft
//! (tests/fixtures/extra/make_references.py): rsLoRA at rank 64 on the last ten layers,
//! all-linear with rank/alpha patterns and an exclusion, a regex target, and DoRA. Each on every
//! golden prompt in `--dtype f32`: last-position logits within 1e-3 and 32 greedy tokens exact,
//! all four adapters and the base mixed in one engine run.

mod common;

use adapters::LoraAdapter;
use common::*;
use lorahost::engine::{EngineCore, StopCriteria, ValidRequest};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

fn extra() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(extra().join("expected.json")).expect("expected.json"))
        .expect("json")
}

fn prompts() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("prompts.json")).expect("prompts");
    serde_json::from_str::<Value>(&text).expect("json")["prompts"].as_array().expect("list").clone()
}

fn adapter(name: &str) -> Arc<LoraAdapter> {
    let base = base_f32();
    Arc::new(
        lorahost::adapter_host::load_dir_validated(&base.model, &extra().join(name)).expect("adapter loads"),
    )
}

fn names() -> Vec<String> {
    expected()["generated_ids"].as_object().expect("map").keys().cloned().collect()
}

#[test]
fn logits_match_peft_for_every_shape() {
    let base = base_f32();
    for name in names() {
        let adapter = adapter(&name);
        let t = candle_core::safetensors::load(
            extra().join(format!("logits_{name}.safetensors")),
            &candle_core::Device::Cpu,
        )
        .expect("logits");
        let want = t["last_logits"].to_vec2::<f32>().expect("2-D");
        for (p, want) in prompts().iter().zip(&want) {
            let got = base.model.last_logits(&ids(&p["prompt_ids"]), Some(&adapter)).expect("forward");
            let max_abs = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max_abs < 1e-3, "{name} / {}: max |Δlogit| = {max_abs}", p["id"]);
        }
    }
}

#[test]
fn greedy_tokens_match_peft_in_one_mixed_run() {
    let base = base_f32();
    let expected = expected();
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(256 << 20, 16, 512));
    let mut streams = Vec::new();
    for name in names() {
        let adapter = adapter(&name);
        for p in prompts() {
            let want = ids(&expected["generated_ids"][&name][p["id"].as_str().expect("id")]);
            let req = ValidRequest {
                prompt_ids: ids(&p["prompt_ids"]),
                sampling: greedy(),
                stop: StopCriteria { max_tokens: want.len(), stop: vec![], ignore_eos: true },
                adapter: Some(adapter.clone().into()),
            };
            streams.push((submit(&mut core, req), want, format!("{name} / {}", p["id"])));
        }
    }
    run_to_end(&mut core);
    for (mut rx, want, what) in streams {
        assert_eq!(drain_tokens(&mut rx), want, "{what}");
    }
}
