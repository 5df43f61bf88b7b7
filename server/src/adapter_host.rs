//! Adapters for the resident base: the durable store (`--adapters-dir`), the adapter directories
//! a `generate` run names, and the host cache whose loader reads an adapter by id from either and
//! validates it against this base (shapes, DoRA factors) on a loader thread, never on the engine
//! thread.

use crate::model::{Llama, ModelError};
use adapters::cache::{CacheConfig, CacheError, HostCache, Loader};
use adapters::store::{FsStore, StoreError};
use adapters::{AdapterError, AdapterId, LoraAdapter};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

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
        let loader = loader(Some(store.clone()), AdapterDirs::default(), model);
        Ok(Self { store, cache: HostCache::new(cache, loader)? })
    }
}

/// Adapter directories a run names, by the content id of their files, for the cache's loader to
/// read them from again: a run naming many directories holds only what the cache holds.
#[derive(Clone, Default)]
pub struct AdapterDirs(Arc<Mutex<HashMap<AdapterId, PathBuf>>>);

impl AdapterDirs {
    /// Validates the adapter in `dir` against `model`, so a bad one is refused before the run, and
    /// registers the directory under its id. The validated weights are dropped: the cache loads
    /// them again when a request needs them.
    pub fn register(&self, model: &Llama, dir: &Path) -> Result<AdapterId, AdapterHostError> {
        let id = load_dir_validated(model, dir)?.id;
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(id, dir.to_path_buf());
        Ok(id)
    }

    fn get(&self, id: AdapterId) -> Option<PathBuf> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned()
    }
}

/// The adapters of a `generate` run: the store, if one was given, the directories its requests
/// name, and one cache in front of both.
pub struct RunAdapters {
    pub store: Option<FsStore>,
    pub dirs: AdapterDirs,
    pub cache: HostCache<LoraAdapter>,
}

impl RunAdapters {
    pub fn open(
        store_dir: Option<&Path>,
        model: Arc<Llama>,
        cache: CacheConfig,
    ) -> Result<Self, AdapterHostError> {
        let store = store_dir.map(FsStore::open).transpose()?;
        let dirs = AdapterDirs::default();
        let loader = loader(store.clone(), dirs.clone(), model);
        Ok(Self { store, dirs, cache: HostCache::new(cache, loader)? })
    }
}

/// Loads an id from the registered directories, else from the store, validated against `model`.
fn loader(store: Option<FsStore>, dirs: AdapterDirs, model: Arc<Llama>) -> Loader<LoraAdapter> {
    Arc::new(move |id| {
        if let Some(dir) = dirs.get(id) {
            let adapter = load_dir_validated(&model, &dir).map_err(|e| e.to_string())?;
            if adapter.id != id {
                return Err(format!("{}: its files changed after the run started", dir.display()));
            }
            return Ok(adapter);
        }
        let Some(store) = &store else { return Err(format!("adapter {id} is not known to this run")) };
        let files = store.read(id).map_err(|e| e.to_string())?;
        load_validated(&model, &files.config, &files.weights).map_err(|e| e.to_string())
    })
}
