//! The model's internal configuration (no `Option`s) and the wire formats it is read from:
//! GGUF metadata and Hugging Face `config.json`. Each source has one validating conversion.

use super::ModelError;
use serde::Deserialize;

/// Architectures the forward pass implements. They differ only in details the layer code reads
/// from this config (q/k/v biases), so no model file branches on the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, TinyLlama, Mistral.
    Llama,
    /// Qwen2: Llama plus biases on the q/k/v projections.
    Qwen2,
}

impl Architecture {
    /// Maps a GGUF `general.architecture` or HF `model_type` to a supported architecture.
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// Whether the q/k/v projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// Everything the forward pass needs to know about the network's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// Widest attention head accepted (models use 64 to 256): per-head tables are sized by it.
pub const MAX_HEAD_DIM: usize = 1024;

impl ModelConfig {
    /// Checks the relations the forward pass relies on.
    pub fn validate(self) -> Result<Self, ModelError> {
        let bad = |what: String| Err(ModelError::Config(what));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return bad("head counts and layer count must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {} must be even, positive and at most {MAX_HEAD_DIM}",
                self.head_dim
            ));
        }
        if self.num_heads.checked_mul(self.head_dim).is_none() {
            return bad(format!("{} heads of {} dimensions overflow", self.num_heads, self.head_dim));
        }
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.vocab_size == 0 {
            return bad("hidden, intermediate and vocab sizes must be positive".into());
        }
        Ok(self)
    }

    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// `config.json` of a Hugging Face model directory, as the file has it.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<HfRopeParameters>,
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub eos_token_id: Option<serde_json::Value>,
    pub bos_token_id: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct HfRopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

impl HfConfig {
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ModelError> {
        serde_json::from_value(value.clone()).map_err(|e| ModelError::Config(e.to_string()))
    }

    pub fn into_config(self) -> Result<ModelConfig, ModelError> {
        let name = match (&self.model_type, &self.architectures) {
            (Some(t), _) => t.clone(),
            (None, Some(a)) if !a.is_empty() => a[0].clone(),
            _ => return Err(ModelError::Config("config.json has no model_type".into())),
        };
        let architecture = Architecture::from_name(&name)?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ModelError::Config(format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        if self.mlp_bias == Some(true) {
            return Err(ModelError::Config("mlp_bias = true is not supported".into()));
        }
        if architecture == Architecture::Llama && self.attention_bias == Some(true) {
            return Err(ModelError::Config("attention_bias = true is not supported for llama".into()));
        }
        let rope_type = self.rope_parameters.as_ref().and_then(|p| p.rope_type.clone());
        let scaled = self.rope_scaling.as_ref().is_some_and(|v| !v.is_null());
        if scaled || rope_type.as_deref().is_some_and(|t| t != "default") {
            return Err(ModelError::Config(
                "rope scaling (rope_scaling / rope_type other than default) is not supported".into(),
            ));
        }
        let rope_theta =
            self.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10_000.0);
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: rope_theta as f32,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
        }
        .validate()
    }

    /// The first eos id the config names (configs give a number or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        json_ids(self.eos_token_id.as_ref())
    }
}

/// Reads a token id or list of ids from a JSON value.
pub fn json_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    /// (eos ids, bos id) named by a directory's `config.json`.
    pub fn eos_and_bos(dir: &std::path::Path) -> Result<(Vec<u32>, Option<u32>), ModelError> {
        let config = super::hf::read_config(dir)?;
        let bos = json_ids(config.bos_token_id.as_ref()).first().copied();
        Ok((config.eos_token_ids(), bos))
    }
}
