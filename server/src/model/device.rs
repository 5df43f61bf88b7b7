//! Where the forward pass runs (`--device`): the CPU, with the model's own weights and a KV cache
//! in RAM, or a CUDA device, with a copy of the weights, the KV cache and the adapter slots in
//! device memory. The engine holds one [`Executor`] and never asks which.

use super::gpu::{AdapterReadiness, GpuModel, SlotLimits};
use super::kv_cache::{KvCache, KvCacheConfig};
use super::llama::{ForwardBatch, Llama};
use super::{Dtype, ModelError};
use adapters::{AdapterId, LoraAdapter};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Default `--max-gpu-adapters`: device adapter slots (each as large as one adapter).
pub const DEFAULT_GPU_ADAPTER_SLOTS: usize = 128;

/// Default `--gpu-adapter-bytes`: 8 GiB, 250 rank-16 q/v adapters of a 7B model in bf16.
pub const DEFAULT_GPU_ADAPTER_BYTES: usize = 8 << 30;

/// A device the forward pass can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for ComputeDevice {
    type Err = String;

    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where and how the engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    pub device: ComputeDevice,
    /// Storage type of the weights on a GPU (`auto`: bf16).
    pub dtype: Dtype,
    /// Adapter slots on a GPU: how many, and how many bytes.
    pub adapters: SlotLimits,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            device: ComputeDevice::Cpu,
            dtype: Dtype::Auto,
            adapters: SlotLimits { slots: DEFAULT_GPU_ADAPTER_SLOTS, bytes: DEFAULT_GPU_ADAPTER_BYTES },
        }
    }
}

/// The forward pass and the KV storage it writes, on one device.
pub enum Executor {
    Cpu(KvCache),
    Gpu(Box<GpuModel>),
}

impl Executor {
    /// The model's own weights on the CPU, with a KV cache in RAM.
    pub fn cpu(model: &Llama, kv: KvCacheConfig) -> Self {
        Self::Cpu(KvCache::new(model.config(), kv))
    }

    /// An executor on `device.device`; for a GPU this copies the weights there.
    pub fn open(model: &Llama, device: DeviceConfig, kv: KvCacheConfig) -> Result<Self, ModelError> {
        match device.device {
            ComputeDevice::Cpu => Ok(Self::cpu(model, kv)),
            ComputeDevice::Cuda(ordinal) => {
                let gpu = GpuModel::new(model, ordinal, device.dtype, kv, device.adapters)?;
                tracing::info!(
                    device = gpu.device_name(),
                    blocks = gpu.num_blocks(),
                    "model resident on the GPU"
                );
                Ok(Self::Gpu(Box::new(gpu)))
            }
        }
    }

    /// KV blocks the storage holds (the engine's block allocator hands them out).
    pub fn num_blocks(&self) -> usize {
        match self {
            Self::Cpu(kv) => kv.num_blocks(),
            Self::Gpu(gpu) => gpu.num_blocks(),
        }
    }

    pub fn block_size(&self) -> usize {
        match self {
            Self::Cpu(kv) => kv.block_size(),
            Self::Gpu(gpu) => gpu.block_size(),
        }
    }

    /// Runs one step; returns the logits of `batch.logit_rows`, `[logit_rows, vocab]` row-major.
    pub fn forward(&mut self, model: &Llama, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        match self {
            Self::Cpu(kv) => super::with_logits(&model.forward(batch, kv)?),
            Self::Gpu(gpu) => gpu.forward(batch),
        }
    }

    /// Brings the adapters of waiting sequences (`wanted`, in queue order) onto the device
    /// without waiting, and says for each whether it is there; adapters of `running` sequences
    /// keep their place. On the CPU every adapter is where it needs to be.
    pub fn prepare_adapters(
        &mut self,
        wanted: &[Arc<LoraAdapter>],
        running: &[AdapterId],
    ) -> Vec<AdapterReadiness> {
        match self {
            Self::Cpu(_) => vec![AdapterReadiness::Ready; wanted.len()],
            Self::Gpu(gpu) => gpu.prepare_adapters(wanted, running),
        }
    }

    /// Starts the adapter copies `prepare_adapters` queued, for an engine with no step to run
    /// (a step starts them itself).
    pub fn start_queued_loads(&mut self) {
        if let Self::Gpu(gpu) = self {
            gpu.start_queued_loads();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ComputeDevice;

    #[test]
    fn devices_parse_and_print_back() {
        for (text, device) in [
            ("cpu", ComputeDevice::Cpu),
            ("cuda", ComputeDevice::Cuda(0)),
            ("cuda:3", ComputeDevice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<ComputeDevice>(), Ok(device));
        }
        assert_eq!(ComputeDevice::Cuda(0).to_string(), "cuda:0");
        assert_eq!("cuda:0".parse::<ComputeDevice>().map(|d| d.to_string()), Ok("cuda:0".into()));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<ComputeDevice>().is_err(), "{bad}");
        }
    }
}
