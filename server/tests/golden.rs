//! The real default model in `--dtype f32` against the transformers reference
//! (tests/fixtures/golden, made as its README says): prompt ids, tokenizer cases, last-position
//! logits within 1e-3 and greedy tokens exactly. The model is fetched once into the cache.

mod common;

use common::*;
use lorahost::base::Base;
use lorahost::chat::ChatMessage;
use lorahost::engine::{EngineCore, StopCriteria, ValidRequest};
use lorahost::tokenizer::TextTokenizer;
use serde_json::Value;

fn prompt_ids(base: &Base, prompt: &Value) -> Vec<u32> {
    match prompt["kind"].as_str() {
        Some("chat") => {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(prompt["messages"].clone()).expect("messages");
            let template = base.chat_template.as_ref().expect("template");
            assert_eq!(
                template.render(&messages).expect("render"),
                prompt["rendered_text"].as_str().expect("text")
            );
            base.chat_prompt(&messages).expect("chat prompt")
        }
        _ => base.tokenizer.encode(prompt["rendered_text"].as_str().expect("text")).expect("encode"),
    }
}

#[test]
fn prompt_ids_and_chat_template_match() {
    let base = base_f32();
    for p in golden_json("prompts.json")["prompts"].as_array().expect("prompts") {
        assert_eq!(prompt_ids(base, p), ids(&p["prompt_ids"]), "prompt {}", p["id"]);
    }
}

fn check_tokenizer_cases(tok: &TextTokenizer, key: &str) {
    for case in golden_json("tokenizer_cases.json")["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(tok.encode(text).expect("encode"), ids(&case[key]), "case {}: {text:?}", case["index"]);
        let expected = case["decode"].as_str().expect("decode");
        assert_eq!(
            tok.decode(&ids(&case["ids"])).expect("decode"),
            expected,
            "decode case {}",
            case["index"]
        );
    }
}

#[test]
fn gguf_tokenizer_follows_the_smollm_pre_tokenizer() {
    check_tokenizer_cases(&base_f32().tokenizer, "ids_smollm2_pretokenizer");
}

#[test]
fn tokenizer_json_matches_transformers() {
    let dir = fixtures().join("base");
    let tok =
        TextTokenizer::from_file(&dir.join("tokenizer.json"), vec![2], Some(1)).expect("tokenizer.json");
    check_tokenizer_cases(&tok, "ids");
}

/// Generated text leaves special tokens out (they still count as tokens), as transformers'
/// `skip_special_tokens=True` does; `decode` keeps them.
#[test]
fn generated_text_leaves_special_tokens_out() {
    let tok = TextTokenizer::from_file(&fixtures().join("base").join("tokenizer.json"), vec![2], Some(1))
        .expect("tokenizer.json");
    let text = "Hi there.<|im_end|>\n<|im_start|>user\nAnd you?";
    let ids = tok.encode(text).expect("encode");
    assert_eq!(tok.decode(&ids).expect("decode"), text);
    let mut decoder = lorahost::tokenizer::IncrementalDecoder::new();
    let mut pieces: String = ids.iter().map(|&id| decoder.push(&tok, id).expect("push")).collect();
    pieces.push_str(&decoder.flush(&tok).expect("flush"));
    assert_eq!(pieces, "Hi there.\nuser\nAnd you?");
    assert_eq!(pieces, tok.decode_text(&ids).expect("decode_text"));
}

#[test]
fn last_position_logits_within_tolerance() {
    let base = base_f32();
    let expected =
        candle_core::safetensors::load(fixtures().join("logits_base.safetensors"), &candle_core::Device::Cpu)
            .expect("logits fixture");
    let expected = expected["last_logits"].to_vec2::<f32>().expect("2-D logits");
    let prompts = golden_json("prompts.json");
    for (p, want) in prompts["prompts"].as_array().expect("prompts").iter().zip(&expected) {
        let got = base.model.last_logits(&ids(&p["prompt_ids"]), None).expect("forward");
        let max_abs = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_abs < 1e-3, "prompt {}: max |Δlogit| = {max_abs}", p["id"]);
        assert_eq!(lorahost::engine::argmax(&got), lorahost::engine::argmax(want));
    }
}

#[test]
fn greedy_generations_match_exactly_in_one_batch() {
    let base = base_f32();
    let prompts = golden_json("prompts.json");
    let generations = golden_json("generations.json");
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512));
    let mut streams = Vec::new();
    for (p, g) in prompts["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .zip(generations["results"]["base"].as_array().expect("base"))
    {
        assert_eq!(p["id"], g["prompt"]);
        let prompt = prompt_ids(base, p);
        let full = ids(&g["generated_ids"]);
        // Exactly 32 tokens with EOS ignored, and the same request stopping at EOS.
        let ignore = ValidRequest {
            prompt_ids: prompt.clone(),
            sampling: greedy(),
            stop: StopCriteria { max_tokens: full.len(), stop: vec![], ignore_eos: true },
            adapter: None,
        };
        let at_eos = ValidRequest {
            stop: StopCriteria { ignore_eos: false, ..ignore.stop.clone() },
            ..ignore.clone()
        };
        let until_eos = match g["eos_index"].as_u64() {
            Some(i) => full[..=i as usize].to_vec(),
            None => full.clone(),
        };
        streams.push((submit(&mut core, ignore), full, p["id"].clone()));
        streams.push((submit(&mut core, at_eos), until_eos, p["id"].clone()));
    }
    run_to_end(&mut core);
    for (mut rx, want, id) in streams {
        assert_eq!(drain_tokens(&mut rx), want, "prompt {id}");
    }
}
