//! PEFT LoRA adapters for lorahost: what an adapter is (its `adapter_config.json`, validated
//! into an `AdapterSpec`) and its identity (`AdapterId`, the content hash of its files).
//!
//! Loading the weights, validation against a resident base, the on-disk store and the cache
//! tiers build on these types.

pub mod cache;
mod config;
pub mod durable;
mod id;
mod peft;
mod plan;
pub mod store;

pub use config::{AdapterSpec, ModulePatterns, PeftConfig, TargetModules};
pub use id::AdapterId;
pub use peft::{
    check_replaceable, weights_file_len, write_adapter_dir, write_adapter_dir_with, BaseShape, LoraAdapter,
    LoraSite, ModuleShape, SiteMatrices, CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE,
};

/// Why an adapter was rejected. Every message names the offending field or key.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter_config.json is not valid JSON: {0}")]
    Json(String),
    #[error("adapter_config.json: field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("adapter_model.safetensors: `{key}`: {reason}")]
    Key { key: String, reason: String },
    #[error("{0}")]
    Format(String),
    #[error("cannot read adapter: {0}")]
    Io(String),
}
