//! PEFT LoRA adapters for lorahost: what an adapter is (its `adapter_config.json`, validated
//! into an `AdapterSpec`) and its identity (`AdapterId`, the content hash of its files).
//!
//! Loading the weights, validation against a resident base, the on-disk store and the cache
//! tiers build on these types.

mod config;
mod id;

pub use config::{AdapterSpec, PeftConfig, TargetModules};
pub use id::AdapterId;

/// Why an adapter was rejected. Every message names the offending field or key.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter_config.json is not valid JSON: {0}")]
    Json(String),
    #[error("adapter_config.json: field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}
