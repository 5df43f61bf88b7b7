//! The KV storage of every layer, as pools of fixed-size blocks. Which blocks belong to which
//! sequence is the engine's business (its block allocator and block tables); this type only
//! holds the numbers.

use super::ModelConfig;
use kernels::attention::{KvGeometry, LayerKv};

/// Default `--kv-cache-bytes`: room for ~11k tokens of the default model, small next to RAM.
pub const DEFAULT_KV_CACHE_BYTES: usize = 512 << 20;
/// Tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct KvCacheConfig {
    pub budget_bytes: usize,
    pub block_size: usize,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self { budget_bytes: DEFAULT_KV_CACHE_BYTES, block_size: DEFAULT_BLOCK_SIZE }
    }
}

/// K and V blocks for all layers; block `b` of every layer belongs to the same sequence.
pub struct KvCache {
    layers: Vec<LayerKv>,
    geometry: KvGeometry,
    num_blocks: usize,
}

impl KvCache {
    /// Bytes one block costs across all layers (K and V, f32).
    pub fn block_bytes(model: &ModelConfig, block_size: usize) -> usize {
        Self::block_bytes_of(model, block_size, std::mem::size_of::<f32>())
    }

    /// The same for K and V stored in `elem_bytes`-byte values (a GPU cache in f16, say).
    pub fn block_bytes_of(model: &ModelConfig, block_size: usize, elem_bytes: usize) -> usize {
        2 * model.num_layers * block_size * model.kv_size() * elem_bytes
    }

    /// As many blocks as fit in the budget (at least one).
    pub fn new(model: &ModelConfig, config: KvCacheConfig) -> Self {
        let geometry = KvGeometry {
            block_size: config.block_size,
            n_kv_heads: model.num_kv_heads,
            head_dim: model.head_dim,
        };
        let num_blocks = (config.budget_bytes / Self::block_bytes(model, config.block_size)).max(1);
        let layers = (0..model.num_layers).map(|_| LayerKv::new(geometry, num_blocks)).collect();
        Self { layers, geometry, num_blocks }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.geometry.block_size
    }

    pub fn layer_mut(&mut self, layer: usize) -> Option<&mut LayerKv> {
        self.layers.get_mut(layer)
    }
}
