//! Adapters for the resident base: the durable store (`--adapters-dir`) and the host cache whose
//! loader reads an adapter by id from the store and validates it against this base (shapes,
//! DoRA factors) on a loader thread, never on the engine thread.

use crate::model::{Llama, ModelError};
use adapters::cache::{CacheConfig, CacheError, HostCache, Loader};
use adapters::store::{FsStore, StoreError};
use adapters::{AdapterError, LoraAdapter};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AdapterHostError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("adapter does not fit the base: {0}")]
    Model(#[from] ModelError),
}

/// Validates an adapter's files against `model` and prepares it for serving.
pub fn load_validated(model: &Llama, config: &[u8], weights: &[u8]) -> Result<LoraAdapter, AdapterHostError> {
    let mut adapter = LoraAdapter::from_bytes(config, weights, &model.base_shape())?;
    model.prepare_adapter(&mut adapter)?;
    Ok(adapter)
}

/// Reads a PEFT adapter directory, validates it against `model` and prepares it for serving.
pub fn load_dir_validated(model: &Llama, dir: &Path) -> Result<LoraAdapter, AdapterHostError> {
    let mut adapter = LoraAdapter::load_dir(dir, &model.base_shape())?;
    model.prepare_adapter(&mut adapter)?;
    Ok(adapter)
}

/// The store and the host-tier cache in front of it.
#[derive(Clone)]
pub struct AdapterHost {
    pub store: FsStore,
    pub cache: HostCache<LoraAdapter>,
}

impl AdapterHost {
    pub fn open(dir: &Path, model: Arc<Llama>, cache: CacheConfig) -> Result<Self, AdapterHostError> {
        let store = FsStore::open(dir)?;
        let reader = store.clone();
        let loader: Loader<LoraAdapter> = Arc::new(move |id| {
            let files = reader.read(id).map_err(|e| e.to_string())?;
            load_validated(&model, &files.config, &files.weights).map_err(|e| e.to_string())
        });
        Ok(Self { store, cache: HostCache::new(cache, loader)? })
    }
}
