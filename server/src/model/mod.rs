//! The base model: loading (GGUF or a Hugging Face directory), weights in the chosen dtype,
//! the paged KV storage, and the forward pass over one ragged batch of rows.
//!
//! This module knows nothing of requests, sampling or scheduling: the engine hands it rows and
//! block tables and gets logits back.

mod config;
mod device;
mod gguf;
mod gpu;
mod hf;
mod kv_cache;
mod linear;
mod llama;
mod lora;

pub use config::{json_ids, Architecture, HfConfig, ModelConfig};
pub use device::{
    ComputeDevice, DeviceConfig, Executor, DEFAULT_GPU_ADAPTER_BYTES, DEFAULT_GPU_ADAPTER_SLOTS,
};
pub use gguf::{load_bytes as load_gguf_bytes, Metadata as GgufMetadata};
pub use gpu::{AdapterReadiness, GpuModel, SlotLimits};
pub use kv_cache::{KvCache, KvCacheConfig, DEFAULT_BLOCK_SIZE, DEFAULT_KV_CACHE_BYTES};
pub use linear::{with_f32_slice, with_logits, Embedding, Linear};
pub use llama::{DenseLayer, DenseWeights, ForwardBatch, Llama};
pub use lora::{base_shape, LoraBatch, LoraLinear, LoraStorage, ModuleId, MODULES};

use std::path::{Path, PathBuf};

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("missing tensor `{0}` in the model file")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("cannot read model {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("unsupported dtype: {0}")]
    Dtype(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}

impl ModelError {
    pub(crate) fn read(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Read { path: path.to_path_buf(), reason: reason.to_string() }
    }
}

/// How weights are held in memory (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Dtype {
    /// GGUF weights stay quantized (Q4_1 and Q8_0 in lorahost's own SIMD kernels, other GGML
    /// types in candle's); Hugging Face weights are used as f32.
    #[default]
    Auto,
    /// Everything dequantized to f32: the mode that matches the transformers reference.
    F32,
    /// Dense weights stored as f16 (activations stay f32).
    F16,
    /// Dense weights stored as bf16 (activations stay f32).
    Bf16,
}

impl Dtype {
    /// The candle dtype dense weights are stored in.
    pub fn dense_dtype(self) -> candle_core::DType {
        match self {
            Dtype::Auto | Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Where a model comes from and what else the directory or file carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    /// Decides from the path: a file is GGUF, a directory must hold `config.json`.
    pub fn detect(path: &Path) -> Result<Self, ModelError> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::read(path, e))?;
        if meta.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(ModelError::read(path, "directory has no config.json"));
            }
            Ok(Self::HfDir(path.to_path_buf()))
        } else {
            Ok(Self::Gguf(path.to_path_buf()))
        }
    }
}

/// A loaded model plus the metadata the tokenizer and chat template are built from.
pub struct LoadedModel {
    pub model: Llama,
    /// Raw GGUF metadata, when the model came from a GGUF file.
    pub gguf_metadata: Option<GgufMetadata>,
    pub source: ModelSource,
}

/// Loads the model at `path` with weights held as `dtype`.
pub fn load(path: &Path, dtype: Dtype) -> Result<LoadedModel, ModelError> {
    let source = ModelSource::detect(path)?;
    match &source {
        ModelSource::Gguf(file) => {
            let (model, metadata) = gguf::load(file, dtype)?;
            Ok(LoadedModel { model, gguf_metadata: Some(metadata), source })
        }
        ModelSource::HfDir(dir) => {
            let model = hf::load(dir, dtype)?;
            Ok(LoadedModel { model, gguf_metadata: None, source })
        }
    }
}
