//! Model loading beyond the default GGUF: Qwen2's q/k/v biases and configs that must be refused.

mod common;

use common::{fixtures, tiny_base};
use lorahost::base::Base;
use lorahost::model::Dtype;
use lorahost::testing::TinyModel;

#[test]
fn qwen2_biases_are_loaded_and_used() {
    let shape = TinyModel { qwen2: true, ..Default::default() };
    let (dir, base) = tiny_base(shape);
    let prompt = [10, 20, 30, 40];
    let with_bias = base.model.last_logits(&prompt, None).expect("forward");
    // Zero the biases: the logits must change, so the biases were really applied.
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).expect("load");
    for (name, t) in tensors.iter_mut() {
        if name.ends_with(".bias") {
            *t = t.zeros_like().expect("zeros");
        }
    }
    candle_core::safetensors::save(&tensors, &path).expect("save");
    let zeroed = Base::load(dir.path(), Dtype::F32).expect("reload");
    let without = zeroed.model.last_logits(&prompt, None).expect("forward");
    let diff = with_bias.iter().zip(&without).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-3, "biases had no effect ({diff})");
}

#[test]
fn an_untied_lm_head_is_loaded_and_used() {
    let shape = TinyModel { untied_lm_head: true, ..Default::default() };
    let (_untied_dir, untied) = tiny_base(shape);
    assert!(!untied.model.config().tie_word_embeddings);
    // Same seed, so every other weight is the same: only the head differs.
    let (_tied_dir, tied) = tiny_base(TinyModel::default());
    let prompt = [10, 20, 30, 40];
    let own_head = untied.model.last_logits(&prompt, None).expect("forward");
    let embedding_head = tied.model.last_logits(&prompt, None).expect("forward");
    let diff = own_head.iter().zip(&embedding_head).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-3, "the untied lm_head had no effect ({diff})");
}

#[test]
fn unsupported_configs_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    TinyModel::default().write_hf_dir(dir.path(), &fixtures().join("base")).expect("write");
    let config = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config).expect("config");
    let cases = [
        ("\"silu\"", "\"gelu\"", "hidden_act"),
        ("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", "num_key_value_heads"),
        ("\"llama\"", "\"falcon\"", "falcon"),
    ];
    for (from, to, named) in cases {
        assert!(original.contains(from), "fixture lacks {from}");
        std::fs::write(&config, original.replace(from, to)).expect("write");
        let err = match Base::load(dir.path(), Dtype::F32) {
            Ok(_) => panic!("{to} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(named), "{to}: {err}");
    }
    std::fs::write(&config, original).expect("restore");
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    let err = Base::load(dir.path(), Dtype::F32).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("safetensors"), "{err}");
}

/// The tiny GGUF files the fuzzer starts from (`fuzz/make_seeds.py`).
fn gguf_seed(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/gguf_model").join(name);
    std::fs::read(path).expect("seed file")
}

#[test]
fn gguf_files_the_fuzzer_found_load_or_are_refused() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/gguf_model");
    let mut found = 0;
    for entry in std::fs::read_dir(dir).expect("seeds") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("seed");
        for dtype in [Dtype::Auto, Dtype::F32] {
            if let Ok(base) = Base::from_gguf_bytes("seed", &bytes, dtype) {
                let _ = base.model.last_logits(&[1, 2, 3], None);
            }
        }
        found += path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("regress_")) as usize;
    }
    assert!(found >= 4, "the regression inputs are missing");
}

#[test]
fn damaged_gguf_files_are_errors_not_crashes() {
    for name in ["llama_f32", "llama_quantized"] {
        let bytes = gguf_seed(name);
        for dtype in [Dtype::Auto, Dtype::F32] {
            let base = Base::from_gguf_bytes(name, &bytes, dtype).expect("the seed loads");
            let logits = base.model.last_logits(&[1, 2, 3], None).expect("forward");
            assert!(logits.iter().all(|v| v.is_finite()));
        }
        // Cut anywhere: an error naming the problem.
        for len in (0..bytes.len()).step_by(61) {
            let err =
                Base::from_gguf_bytes(name, &bytes[..len], Dtype::Auto).err().expect("a cut file loads");
            assert!(!err.to_string().is_empty());
        }
        // Every header byte (counts, lengths, types, shapes, offsets) set to 0xff or 0: loads or
        // is refused, never panics; what loads must still run.
        let header = bytes.len().min(4096);
        for at in 0..header {
            for value in [0xff, 0x00] {
                let mut damaged = bytes.clone();
                damaged[at] = value;
                if let Ok(base) = Base::from_gguf_bytes(name, &damaged, Dtype::Auto) {
                    let _ = base.model.last_logits(&[1, 2, 3], None);
                }
            }
        }
    }
}
