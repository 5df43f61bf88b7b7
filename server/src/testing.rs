//! Test support: tiny random-weight Llama models written as Hugging Face directories, so
//! engine and loader tests run in milliseconds without real weights. Not used by the binary.

use candle_core::{DType, Device, Tensor};
use kernels::lora::workload::SplitMix64;
use std::collections::HashMap;
use std::path::Path;

/// Shape of a tiny test model.
#[derive(Debug, Clone, Copy)]
pub struct TinyModel {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub seed: u64,
    /// Write a Qwen2 model (q/k/v biases) instead of a Llama one.
    pub qwen2: bool,
    /// Give the model its own `lm_head` instead of tying it to the embeddings.
    pub untied_lm_head: bool,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 49152,
            max_positions: 2048,
            seed: 1,
            qwen2: false,
            untied_lm_head: false,
        }
    }
}

impl TinyModel {
    /// Random weights with HF names, `[out, in]` layout.
    pub fn tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let hd = self.hidden / self.heads;
        let mut rng = SplitMix64::new(self.seed);
        let mut t = HashMap::new();
        let mut rand = |shape: &[usize], scale: f32| -> candle_core::Result<Tensor> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) * scale).collect();
            Tensor::from_vec(data, shape, &dev)
        };
        let (h, i) = (self.hidden, self.intermediate);
        let s_h = 1.0 / (h as f32).sqrt();
        let s_i = 1.0 / (i as f32).sqrt();
        // Small embeddings, so the layers (and adapters) shape the output rather than the input token.
        t.insert("model.embed_tokens.weight".into(), rand(&[self.vocab, h], 0.1)?);
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.insert(format!("{p}.self_attn.q_proj.weight"), rand(&[self.heads * hd, h], s_h)?);
            t.insert(format!("{p}.self_attn.k_proj.weight"), rand(&[self.kv_heads * hd, h], s_h)?);
            t.insert(format!("{p}.self_attn.v_proj.weight"), rand(&[self.kv_heads * hd, h], s_h)?);
            t.insert(format!("{p}.self_attn.o_proj.weight"), rand(&[h, self.heads * hd], s_h)?);
            if self.qwen2 {
                t.insert(format!("{p}.self_attn.q_proj.bias"), rand(&[self.heads * hd], 0.5)?);
                t.insert(format!("{p}.self_attn.k_proj.bias"), rand(&[self.kv_heads * hd], 0.5)?);
                t.insert(format!("{p}.self_attn.v_proj.bias"), rand(&[self.kv_heads * hd], 0.5)?);
            }
            t.insert(format!("{p}.mlp.gate_proj.weight"), rand(&[i, h], s_h)?);
            t.insert(format!("{p}.mlp.up_proj.weight"), rand(&[i, h], s_h)?);
            t.insert(format!("{p}.mlp.down_proj.weight"), rand(&[h, i], s_i)?);
            t.insert(format!("{p}.input_layernorm.weight"), (rand(&[h], 0.1)? + 1.0)?);
            t.insert(format!("{p}.post_attention_layernorm.weight"), (rand(&[h], 0.1)? + 1.0)?);
        }
        t.insert("model.norm.weight".into(), (rand(&[h], 0.1)? + 1.0)?);
        if self.untied_lm_head {
            t.insert("lm_head.weight".into(), rand(&[self.vocab, h], s_h)?);
        }
        Ok(t)
    }

    pub fn config_json(&self) -> serde_json::Value {
        let (arch, model_type) =
            if self.qwen2 { ("Qwen2ForCausalLM", "qwen2") } else { ("LlamaForCausalLM", "llama") };
        serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": !self.untied_lm_head,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
        })
    }

    /// Writes `config.json`, `model.safetensors`, and copies the tokenizer files from
    /// `tokenizer_dir` (a directory with `tokenizer.json`, optionally `tokenizer_config.json`
    /// and `chat_template.jinja`).
    pub fn write_hf_dir(&self, dir: &Path, tokenizer_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&self.config_json())?)?;
        let tensors: HashMap<String, Tensor> = self
            .tensors()?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
            let src = tokenizer_dir.join(name);
            if src.is_file() {
                std::fs::copy(&src, dir.join(name))?;
            }
        }
        Ok(())
    }
}

impl TinyModel {
    /// Writes a random PEFT LoRA adapter for this model: `rank`, `alpha`, the given module names
    /// (`q_proj`, ...), every layer. B is non-zero so the adapter changes the output.
    pub fn write_adapter(
        &self,
        dir: &Path,
        rank: usize,
        alpha: f64,
        targets: &[&str],
        seed: u64,
    ) -> anyhow::Result<()> {
        let cfg = crate::model::HfConfig::from_json(&self.config_json())?.into_config()?;
        let shape = crate::model::base_shape(&cfg);
        let mut rng = SplitMix64::new(seed);
        let mut sites = Vec::new();
        for layer in 0..self.layers {
            for (module, m) in shape.modules.iter().enumerate() {
                if !targets.iter().any(|t| m.path.ends_with(t)) {
                    continue;
                }
                let a = (0..rank * m.in_features).map(|_| rng.uniform(-1.0, 1.0) * 0.3).collect();
                let b = (0..m.out_features * rank).map(|_| rng.uniform(-1.0, 1.0) * 0.3).collect();
                let scale = (alpha / rank as f64) as f32;
                sites.push(adapters::LoraSite {
                    layer,
                    module,
                    rank,
                    scale,
                    matrices: adapters::SiteMatrices::F32 { a, b },
                    magnitude: None,
                    dora_factor: None,
                });
            }
        }
        let config = serde_json::json!({
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
        });
        adapters::write_adapter_dir(dir, &config, &sites, &shape)?;
        Ok(())
    }
}
