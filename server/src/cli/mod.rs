//! Command-line interface: the `lorahost` subcommands and their flags. Each subcommand lives in
//! its own file and turns flags into configs, then calls into the library.

mod adapters;
mod generate;
mod serve;
mod train;

use crate::base::Base;
use crate::engine::{EngineConfig, DEFAULT_MAX_RUNNING, DEFAULT_MAX_STEP_TOKENS};
use crate::model::{
    ComputeDevice, DeviceConfig, Dtype, KvCacheConfig, LoraStorage, SlotLimits, DEFAULT_BLOCK_SIZE,
    DEFAULT_GPU_ADAPTER_BYTES, DEFAULT_GPU_ADAPTER_SLOTS, DEFAULT_KV_CACHE_BYTES,
};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "lorahost", version, about = "Multi-adapter LLM inference host")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text for one prompt or a JSONL file of requests (offline batch inference).
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API with runtime adapter upload.
    Serve(serve::ServeArgs),
    /// Manage the adapters of a running server.
    Adapters(adapters::AdaptersArgs),
    /// Fine-tune a LoRA adapter on the base from a JSONL file; writes a PEFT adapter directory.
    Train(train::TrainArgs),
}

/// Which base model to load and how.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    /// Default: SmolLM2-135M-Instruct Q4_1, fetched once into the cache directory.
    #[arg(long, env = "LORAHOST_MODEL")]
    pub model: Option<PathBuf>,
    /// How weights are held: auto keeps GGUF quantized; f32 dequantizes (matches transformers).
    #[arg(long, value_enum, default_value_t = Dtype::Auto, env = "LORAHOST_DTYPE")]
    pub dtype: Dtype,
    /// Compute threads (default: all cores).
    #[arg(long, env = "LORAHOST_THREADS")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// The model path, fetching the default model when none was given.
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => {
                crate::fetch::default_model().context("no --model given and the default model is unavailable")
            }
        }
    }

    /// Loads the base for an engine configured as `engine`: on a GPU, adapters are kept in f32 on
    /// the host, the form the device slots are filled from.
    pub fn load_base(&self, engine: &EngineConfig) -> anyhow::Result<Base> {
        let path = self.resolve()?;
        let mut base =
            Base::load(&path, self.dtype).with_context(|| format!("loading {}", path.display()))?;
        if engine.device.device != ComputeDevice::Cpu {
            std::sync::Arc::get_mut(&mut base.model)
                .context("the base model is shared before the engine starts")?
                .set_lora_storage(LoraStorage::F32);
        }
        Ok(base)
    }

    pub fn init_threads(&self) -> anyhow::Result<()> {
        if let Some(n) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .build_global()
                .context("setting --threads")?;
        }
        crate::runtime::pin_candle_matmul_threads();
        Ok(())
    }
}

/// Where named adapters live and how much host memory loaded adapters may take.
#[derive(Debug, Args)]
pub struct AdapterArgs {
    /// The adapter store: the durable source of truth for named adapters (`serve` defaults to
    /// ~/.local/share/lorahost/adapters).
    #[arg(long, env = "LORAHOST_ADAPTERS_DIR")]
    pub adapters_dir: Option<PathBuf>,
    /// Host memory for loaded adapters (LRU beyond it; adapters in use are never evicted).
    #[arg(long, default_value_t = ::adapters::cache::DEFAULT_BUDGET_BYTES, env = "LORAHOST_ADAPTER_CACHE_BYTES")]
    pub adapter_cache_bytes: usize,
}

impl AdapterArgs {
    /// Opens the store and its cache, if a store was given.
    pub fn open(
        &self,
        model: std::sync::Arc<crate::model::Llama>,
    ) -> anyhow::Result<Option<crate::adapter_host::AdapterHost>> {
        let Some(dir) = &self.adapters_dir else { return Ok(None) };
        let cache =
            ::adapters::cache::CacheConfig { budget_bytes: self.adapter_cache_bytes, ..Default::default() };
        let host = crate::adapter_host::AdapterHost::open(dir, model, cache)
            .with_context(|| format!("opening the adapter store {}", dir.display()))?;
        Ok(Some(host))
    }

    /// The adapters of a `generate` run: the store if one was given, and the cache that serves
    /// both its names and the adapter directories the run's requests name.
    pub fn open_for_run(
        &self,
        model: std::sync::Arc<crate::model::Llama>,
    ) -> anyhow::Result<crate::adapter_host::RunAdapters> {
        let cache =
            ::adapters::cache::CacheConfig { budget_bytes: self.adapter_cache_bytes, ..Default::default() };
        let dir = self.adapters_dir.as_deref();
        crate::adapter_host::RunAdapters::open(dir, model, cache).with_context(|| match dir {
            Some(dir) => format!("opening the adapter store {}", dir.display()),
            None => "starting the adapter cache".to_string(),
        })
    }
}

/// Engine and KV-cache limits.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Memory for the KV cache, in bytes.
    #[arg(long, default_value_t = DEFAULT_KV_CACHE_BYTES, env = "LORAHOST_KV_CACHE_BYTES")]
    pub kv_cache_bytes: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub kv_block_size: usize,
    /// Rows (tokens) per forward step; long prompts are prefilled in chunks of this size.
    #[arg(long, default_value_t = DEFAULT_MAX_STEP_TOKENS)]
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, default_value_t = DEFAULT_MAX_RUNNING)]
    pub max_running: usize,
    /// Where the model runs: cpu, or cuda / cuda:N (a build with `--features cuda`).
    #[arg(long, default_value_t = ComputeDevice::Cpu, env = "LORAHOST_DEVICE")]
    pub device: ComputeDevice,
    /// Adapter slots on the GPU: the most distinct adapters resident there at once; at least
    /// --max-running, so every step's adapters fit.
    #[arg(long, default_value_t = DEFAULT_GPU_ADAPTER_SLOTS)]
    pub max_gpu_adapters: usize,
    /// GPU memory for adapter slots, in bytes: least recently used adapters that no running
    /// sequence uses are given up beyond it.
    #[arg(long, default_value_t = DEFAULT_GPU_ADAPTER_BYTES)]
    pub gpu_adapter_bytes: usize,
}

impl EngineArgs {
    /// The engine's configuration; `dtype` is `--dtype`, which also says how weights are stored
    /// on a GPU.
    pub fn config(&self, dtype: Dtype) -> anyhow::Result<EngineConfig> {
        anyhow::ensure!(self.kv_block_size > 0, "--kv-block-size must be positive");
        anyhow::ensure!(self.max_batch_tokens > 0, "--max-batch-tokens must be positive");
        anyhow::ensure!(self.max_running > 0, "--max-running must be positive");
        anyhow::ensure!(
            self.device == ComputeDevice::Cpu || self.max_gpu_adapters >= self.max_running,
            "--max-gpu-adapters ({}) must be at least --max-running ({}): every running sequence may use its own adapter",
            self.max_gpu_adapters,
            self.max_running
        );
        Ok(EngineConfig {
            max_step_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            kv_cache: KvCacheConfig { budget_bytes: self.kv_cache_bytes, block_size: self.kv_block_size },
            device: DeviceConfig {
                device: self.device,
                dtype,
                adapters: SlotLimits { slots: self.max_gpu_adapters, bytes: self.gpu_adapter_bytes },
            },
        })
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Adapters(args) => adapters::run(args),
        Command::Train(args) => train::run(args),
    }
}
