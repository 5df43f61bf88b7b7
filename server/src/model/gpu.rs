//! The base resident on a CUDA device (`--device cuda[:N]`): `llama.rs`'s decoder with its
//! weights in f32, f16 or bf16 device buffers, the paged KV cache in device memory, and adapters
//! in a pool of device slots between the host tier and the steps. The engine hands it the same
//! `ForwardBatch` as the CPU model and gets the same logits back; everything device-specific is
//! behind `kernels::cuda`, which exists (and fails to open a device) in builds without CUDA.
//!
//! Adapters come in ahead of their steps: the engine asks [`GpuModel::prepare_adapters`] for the
//! adapters of waiting sequences, which reserves slots (never one a running sequence uses, nor
//! more bytes than the budget) and queues the loads; a step converts queued adapters into pinned
//! memory after its own kernels are queued, so the host work overlaps the device's, and the
//! copies run on the upload stream under the next steps. A sequence is admitted once its adapter
//! is in the tables. A step that meets an adapter not in a slot (a caller that did not prepare)
//! loads it and waits.

use super::kv_cache::{KvCache, KvCacheConfig};
use super::linear::{with_f32_slice, Embedding, Linear};
use super::llama::{ForwardBatch, Llama};
use super::lora::{ModuleId, MODULES};
use super::{Dtype, ModelConfig, ModelError};
use adapters::{AdapterId, LoraAdapter};
use candle_core::Tensor;
use kernels::attention::KvGeometry;
use kernels::cuda::{
    gather_rows, linear, paged_attention, rms_norm, rope, silu_mul, write_kv, AttentionScratch, DeviceBuf,
    DeviceFloat, Gpu, GpuAttentionRows, GpuKvCache, GpuRope, GpuSegments, HostSite, LoraScratch, RowsFor,
    SlotPool,
};
use std::collections::HashMap;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

/// The site groups of one layer, as the fused LoRA calls run them: q/k/v and gate/up share their
/// input, o and down have their own.
const GROUPS: [&[ModuleId]; 4] = [
    &[ModuleId::Q, ModuleId::K, ModuleId::V],
    &[ModuleId::O],
    &[ModuleId::GATE, ModuleId::UP],
    &[ModuleId::DOWN],
];

/// Adapter loads queued or copying at once: each holds pinned host memory the size of its
/// adapter, and more in flight would only delay the first.
const MAX_LOADS_IN_FLIGHT: usize = 4;

/// Device memory for adapters (`--max-gpu-adapters`, `--gpu-adapter-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// The most distinct adapters resident at once.
    pub slots: usize,
    /// The most bytes their weights may take.
    pub bytes: usize,
}

/// Where a waiting sequence's adapter stands on the executor's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterReadiness {
    /// In a slot: the sequence may run.
    Ready,
    /// Queued or copying, or waiting for a slot to come free.
    NotYet,
    /// It can never be placed (larger than the byte budget, say): the reason.
    Failed(String),
}

/// A model on the GPU, in the storage type `--dtype` chose.
pub struct GpuModel {
    typed: Typed,
    device_name: String,
    num_blocks: usize,
    block_size: usize,
}

enum Typed {
    F32(GpuLlama<f32>),
    F16(GpuLlama<half::f16>),
    Bf16(GpuLlama<half::bf16>),
}

/// One `GpuLlama` constructor call in `dtype`'s storage type (`auto`: bf16).
macro_rules! build_typed {
    ($dtype:expr, $ctor:ident($($arg:expr),*)) => {
        match $dtype {
            Dtype::F32 => Typed::F32(GpuLlama::$ctor($($arg),*)?),
            Dtype::F16 => Typed::F16(GpuLlama::$ctor($($arg),*)?),
            Dtype::Auto | Dtype::Bf16 => Typed::Bf16(GpuLlama::$ctor($($arg),*)?),
        }
    };
}

impl GpuModel {
    /// Copies `model`'s weights to device `ordinal` as `dtype` says (`auto` is bf16: quantized
    /// GGUF weights are dequantized), allocates the KV cache (`kv.budget_bytes` of device memory)
    /// and empty adapter slots within `limits`.
    pub fn new(
        model: &Llama,
        ordinal: usize,
        dtype: Dtype,
        kv: KvCacheConfig,
        limits: SlotLimits,
    ) -> Result<Self, ModelError> {
        Self::open(ordinal, |gpu| Ok(build_typed!(dtype, new(gpu, model, kv, limits))))
    }

    /// A model of `cfg`'s shape with random weights made on the device (benchmarks: a 7B-shaped
    /// model costs no host memory). Its logits mean nothing.
    pub fn random(
        cfg: &ModelConfig,
        ordinal: usize,
        dtype: Dtype,
        kv: KvCacheConfig,
        limits: SlotLimits,
        seed: u32,
    ) -> Result<Self, ModelError> {
        Self::open(ordinal, |gpu| Ok(build_typed!(dtype, random(gpu, cfg, kv, limits, seed))))
    }

    /// Opens the device and builds the model on it.
    fn open(
        ordinal: usize,
        build: impl FnOnce(Gpu) -> Result<Typed, ModelError>,
    ) -> Result<Self, ModelError> {
        let gpu = Gpu::open(ordinal)?;
        let device_name = gpu.name().to_string();
        let typed = build(gpu)?;
        let (num_blocks, block_size) = match &typed {
            Typed::F32(m) => (m.num_blocks, m.geom.block_size),
            Typed::F16(m) => (m.num_blocks, m.geom.block_size),
            Typed::Bf16(m) => (m.num_blocks, m.geom.block_size),
        };
        Ok(Self { typed, device_name, num_blocks, block_size })
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Runs all rows of one step and returns the logits of `batch.logit_rows`, row-major
    /// `[logit_rows, vocab]` f32.
    pub fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        match &mut self.typed {
            Typed::F32(m) => m.forward(batch),
            Typed::F16(m) => m.forward(batch),
            Typed::Bf16(m) => m.forward(batch),
        }
    }

    /// Brings `wanted` (the adapters of waiting sequences, in queue order) onto the device
    /// without waiting for any copy, and says for each whether it is there. Slots holding
    /// `running` (adapters of running sequences) are never given up.
    pub fn prepare_adapters(
        &mut self,
        wanted: &[Arc<LoraAdapter>],
        running: &[AdapterId],
    ) -> Vec<AdapterReadiness> {
        match &mut self.typed {
            Typed::F32(m) => m.prepare_adapters(wanted, running),
            Typed::F16(m) => m.prepare_adapters(wanted, running),
            Typed::Bf16(m) => m.prepare_adapters(wanted, running),
        }
    }

    /// Starts the loads [`GpuModel::prepare_adapters`] queued; a step does this itself, so only
    /// an engine with no step to run needs to.
    pub fn start_queued_loads(&mut self) {
        match &mut self.typed {
            Typed::F32(m) => m.start_queued_loads(),
            Typed::F16(m) => m.start_queued_loads(),
            Typed::Bf16(m) => m.start_queued_loads(),
        }
    }

    /// Device bytes the adapter slots hold, loading ones included.
    pub fn adapter_bytes(&self) -> usize {
        match &self.typed {
            Typed::F32(m) => m.pool.weight_bytes(),
            Typed::F16(m) => m.pool.weight_bytes(),
            Typed::Bf16(m) => m.pool.weight_bytes(),
        }
    }
}

/// One projection on the device.
struct Projection<T> {
    weight: DeviceBuf<T>,
    bias: Option<DeviceBuf<T>>,
    out_features: usize,
    in_features: usize,
}

impl<T: DeviceFloat> Projection<T> {
    fn upload(gpu: &Gpu, linear: &Linear) -> Result<Self, ModelError> {
        let weight = upload_as(gpu, &linear.dequantized_weight()?)?;
        let bias = match linear.bias() {
            Some(b) => Some(upload_as(gpu, &tensor_f32(b)?)?),
            None => None,
        };
        Ok(Self { weight, bias, out_features: linear.out_features(), in_features: linear.in_features() })
    }

    /// `y = x Wᵀ (+ b)` into a new buffer.
    fn forward(&self, gpu: &Gpu, x: &DeviceBuf<T>, rows: usize) -> Result<DeviceBuf<T>, ModelError> {
        let mut y = gpu.zeros(rows * self.out_features)?;
        linear(gpu, x, &self.weight, (self.out_features, self.in_features), self.bias.as_ref(), &mut y)?;
        Ok(y)
    }
}

struct Layer<T> {
    input_norm: DeviceBuf<f32>,
    post_attention_norm: DeviceBuf<f32>,
    /// In `MODULES` order.
    projections: Vec<Projection<T>>,
}

/// Where a slot stands, as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotStatus {
    Empty,
    /// Reserved for an adapter whose load has not started.
    Queued,
    /// Its copy is running.
    Loading,
    /// In the tables.
    Ready,
}

/// Which adapter each device slot holds, how far its load is, its bytes and when it was last
/// used: the host-side bookkeeping of the device tier.
struct SlotMap {
    slot_of: HashMap<AdapterId, usize>,
    occupant: Vec<Option<AdapterId>>,
    status: Vec<SlotStatus>,
    bytes: Vec<usize>,
    last_used: Vec<u64>,
    budget: usize,
    step: u64,
}

/// Where a new adapter goes: `slot`, once every slot in `evict` (`slot` among them, if it was
/// occupied) is emptied.
#[derive(Debug, PartialEq, Eq)]
struct Placement {
    slot: usize,
    evict: Vec<usize>,
}

impl SlotMap {
    fn new(limits: SlotLimits) -> Self {
        let n = limits.slots;
        Self {
            slot_of: HashMap::new(),
            occupant: vec![None; n],
            status: vec![SlotStatus::Empty; n],
            bytes: vec![0; n],
            last_used: vec![0; n],
            budget: limits.bytes,
            step: 0,
        }
    }

    /// A place for an adapter of `need` bytes: an empty slot, else the least recently used one
    /// that holds a ready adapter not in `protected`; then as many more such slots, least
    /// recently used first, as the byte budget needs. `None` if the slots that may be given up
    /// do not make enough room.
    fn place(&self, need: usize, protected: &HashSet<AdapterId>) -> Option<Placement> {
        let may_give_up = |s: usize| match self.occupant[s] {
            None => true,
            Some(id) => self.status[s] == SlotStatus::Ready && !protected.contains(&id),
        };
        let mut candidates: Vec<usize> = (0..self.occupant.len()).filter(|&s| may_give_up(s)).collect();
        candidates.sort_by_key(|&s| (self.occupant[s].is_some(), self.last_used[s]));
        let (&slot, others) = candidates.split_first()?;
        let mut evict: Vec<usize> = self.occupant[slot].map(|_| slot).into_iter().collect();
        let mut held = self.bytes.iter().sum::<usize>() - self.bytes[slot];
        for &s in others {
            if held.saturating_add(need) <= self.budget {
                break;
            }
            if self.occupant[s].is_some() {
                evict.push(s);
                held -= self.bytes[s];
            }
        }
        (held.saturating_add(need) <= self.budget).then_some(Placement { slot, evict })
    }

    fn assign(&mut self, slot: usize, id: AdapterId, bytes: usize, status: SlotStatus) {
        self.remove(slot);
        self.occupant[slot] = Some(id);
        self.slot_of.insert(id, slot);
        self.status[slot] = status;
        self.bytes[slot] = bytes;
        self.last_used[slot] = self.step;
    }

    fn remove(&mut self, slot: usize) {
        if let Some(id) = self.occupant[slot].take() {
            self.slot_of.remove(&id);
        }
        self.status[slot] = SlotStatus::Empty;
        self.bytes[slot] = 0;
    }

    fn in_flight(&self) -> usize {
        self.status.iter().filter(|s| matches!(s, SlotStatus::Queued | SlotStatus::Loading)).count()
    }
}

/// A model's weights on the device.
struct Weights<T> {
    embed: DeviceBuf<T>,
    lm_head: Option<DeviceBuf<T>>,
    layers: Vec<Layer<T>>,
    final_norm: DeviceBuf<f32>,
}

struct GpuLlama<T> {
    gpu: Gpu,
    cfg: ModelConfig,
    embed: DeviceBuf<T>,
    /// `None` when tied to the embeddings.
    lm_head: Option<DeviceBuf<T>>,
    layers: Vec<Layer<T>>,
    final_norm: DeviceBuf<f32>,
    rope: GpuRope,
    kv: Vec<GpuKvCache<T>>,
    geom: KvGeometry,
    num_blocks: usize,
    pool: SlotPool<T>,
    slots: SlotMap,
    /// Slots reserved by `prepare_adapters` whose loads start after the next step's launches.
    queued: Vec<(usize, Arc<LoraAdapter>)>,
    /// Adapters whose load failed since the last `prepare_adapters`, with the reason.
    failed: HashMap<AdapterId, String>,
    lora_scratch: LoraScratch,
    attention_scratch: AttentionScratch,
}

impl<T: DeviceFloat> GpuLlama<T> {
    fn new(gpu: Gpu, model: &Llama, kv: KvCacheConfig, limits: SlotLimits) -> Result<Self, ModelError> {
        let cfg = model.config().clone();
        let missing = |what: String| ModelError::Config(format!("the model has no {what}"));
        let embed_table = match model.embedding() {
            Embedding::Dense(t) => tensor_f32(t)?,
            table => tensor_f32(&table.dense(cfg.vocab_size, cfg.hidden_size)?)?,
        };
        let embed = upload_as(&gpu, &embed_table)?;
        drop(embed_table);
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(upload_as(&gpu, &model.lm_head().dequantized_weight()?)?)
        };
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let (input_norm, post_attention_norm) =
                    model.layer_norms(i).ok_or_else(|| missing(format!("layer {i}")))?;
                let projections = (0..MODULES.len())
                    .map(|m| {
                        let base = model
                            .base_projection(i, ModuleId(m))
                            .ok_or_else(|| missing(format!("{} in layer {i}", MODULES[m])))?;
                        Projection::upload(&gpu, base)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Layer {
                    input_norm: gpu.upload(&tensor_f32(input_norm)?)?,
                    post_attention_norm: gpu.upload(&tensor_f32(post_attention_norm)?)?,
                    projections,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let final_norm = gpu.upload(&tensor_f32(model.final_norm())?)?;
        let weights = Weights { embed, lm_head, layers, final_norm };
        Self::assemble(gpu, cfg, weights, model.rope(), kv, limits)
    }

    /// A model of `cfg`'s shape with random weights made on the device (uniform, scaled by
    /// `1/√in` per projection; norms 1): a benchmark model of any size without host memory.
    fn random(
        gpu: Gpu,
        cfg: &ModelConfig,
        kv: KvCacheConfig,
        limits: SlotLimits,
        seed: u32,
    ) -> Result<Self, ModelError> {
        let mut next_seed = seed;
        let mut random = |len: usize, scale: f32| -> Result<DeviceBuf<T>, ModelError> {
            let mut buf = gpu.zeros::<T>(len)?;
            next_seed = next_seed.wrapping_add(1);
            kernels::cuda::fill_uniform(&gpu, &mut buf, next_seed, scale)?;
            Ok(buf)
        };
        let shape = super::lora::base_shape(cfg);
        let ones = |n: usize| gpu.upload(&vec![1f32; n]);
        let embed = random(cfg.vocab_size * cfg.hidden_size, 0.1)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(random(cfg.vocab_size * cfg.hidden_size, 1.0 / (cfg.hidden_size as f32).sqrt())?)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let mut projections = Vec::with_capacity(MODULES.len());
            for m in &shape.modules {
                let weight = random(m.out_features * m.in_features, 1.0 / (m.in_features as f32).sqrt())?;
                projections.push(Projection {
                    weight,
                    bias: None,
                    out_features: m.out_features,
                    in_features: m.in_features,
                });
            }
            layers.push(Layer {
                input_norm: ones(cfg.hidden_size)?,
                post_attention_norm: ones(cfg.hidden_size)?,
                projections,
            });
        }
        let weights = Weights { embed, lm_head, layers, final_norm: ones(cfg.hidden_size)? };
        let rope = kernels::attention::Rope::new(cfg.head_dim, cfg.rope_theta, 1);
        Self::assemble(gpu, cfg.clone(), weights, &rope, kv, limits)
    }

    /// The KV cache, rope tables and adapter slots around a model's weights.
    fn assemble(
        gpu: Gpu,
        cfg: ModelConfig,
        weights: Weights<T>,
        rope: &kernels::attention::Rope,
        kv: KvCacheConfig,
        limits: SlotLimits,
    ) -> Result<Self, ModelError> {
        let geom =
            KvGeometry { block_size: kv.block_size, n_kv_heads: cfg.num_kv_heads, head_dim: cfg.head_dim };
        let block_bytes = KvCache::block_bytes_of(&cfg, kv.block_size, std::mem::size_of::<T>());
        let num_blocks = (kv.budget_bytes / block_bytes.max(1)).max(1);
        let kv_layers = (0..cfg.num_layers)
            .map(|_| GpuKvCache::new(&gpu, geom, num_blocks))
            .collect::<Result<Vec<_>, _>>()?;
        // No sequence is longer than the KV cache or the model's context.
        let positions = (num_blocks * kv.block_size).min(cfg.max_position_embeddings).max(1);
        let rope = GpuRope::new(&gpu, rope, positions)?;

        let shape = super::lora::base_shape(&cfg);
        let groups: Vec<(usize, Vec<usize>)> = (0..cfg.num_layers)
            .flat_map(|_| GROUPS.iter())
            .map(|group| {
                let in_features = shape.modules[group[0].0].in_features;
                (in_features, group.iter().map(|m| shape.modules[m.0].out_features).collect())
            })
            .collect();
        let pool = SlotPool::new(&gpu, limits.slots, &groups)?;
        let Weights { embed, lm_head, layers, final_norm } = weights;
        Ok(Self {
            gpu,
            cfg,
            embed,
            lm_head,
            layers,
            final_norm,
            rope,
            kv: kv_layers,
            geom,
            num_blocks,
            pool,
            slots: SlotMap::new(limits),
            queued: Vec::new(),
            failed: HashMap::new(),
            lora_scratch: LoraScratch::new(),
            attention_scratch: AttentionScratch::default(),
        })
    }

    /// See [`GpuModel::prepare_adapters`].
    fn prepare_adapters(
        &mut self,
        wanted: &[Arc<LoraAdapter>],
        running: &[AdapterId],
    ) -> Vec<AdapterReadiness> {
        self.poll_loads();
        let mut protected: HashSet<AdapterId> = running.iter().copied().collect();
        let answers = wanted.iter().map(|adapter| self.readiness(adapter, &mut protected)).collect();
        // Every sequence waiting on a failed adapter has just been told; a later request for
        // it tries again.
        self.failed.clear();
        answers
    }

    fn readiness(
        &mut self,
        adapter: &Arc<LoraAdapter>,
        protected: &mut HashSet<AdapterId>,
    ) -> AdapterReadiness {
        if let Some(why) = self.failed.get(&adapter.id) {
            return AdapterReadiness::Failed(why.clone());
        }
        // Adapters earlier in the queue keep their slots against later ones.
        protected.insert(adapter.id);
        if let Some(&slot) = self.slots.slot_of.get(&adapter.id) {
            self.slots.last_used[slot] = self.slots.step;
            return match self.slots.status[slot] {
                SlotStatus::Ready => AdapterReadiness::Ready,
                _ => AdapterReadiness::NotYet,
            };
        }
        if self.slots.in_flight() >= MAX_LOADS_IN_FLIGHT {
            return AdapterReadiness::NotYet;
        }
        let need = match host_sites(self.cfg.num_layers, adapter) {
            Ok(sites) => SlotPool::<T>::bytes_for(&sites),
            Err(e) => return AdapterReadiness::Failed(e.to_string()),
        };
        if need > self.slots.budget {
            return AdapterReadiness::Failed(format!(
                "it needs {need} bytes of GPU memory and the adapter slots may hold {} (--gpu-adapter-bytes)",
                self.slots.budget
            ));
        }
        let Some(placement) = self.slots.place(need, protected) else {
            // Every slot that could make room is in use: wait for a sequence to finish.
            return AdapterReadiness::NotYet;
        };
        if let Err(e) = self.evict(&placement.evict) {
            return AdapterReadiness::Failed(e.to_string());
        }
        self.slots.assign(placement.slot, adapter.id, need, SlotStatus::Queued);
        self.queued.push((placement.slot, adapter.clone()));
        AdapterReadiness::NotYet
    }

    fn evict(&mut self, slots: &[usize]) -> Result<(), ModelError> {
        for &slot in slots {
            self.slots.remove(slot);
            self.pool.clear(&self.gpu, slot)?;
        }
        Ok(())
    }

    /// Lets finished copies join the tables.
    fn poll_loads(&mut self) {
        for slot in 0..self.slots.status.len() {
            if self.slots.status[slot] != SlotStatus::Loading {
                continue;
            }
            match self.pool.poll(slot) {
                Ok(true) => self.slots.status[slot] = SlotStatus::Ready,
                Ok(false) => {}
                Err(e) => self.load_failed(slot, e.into()),
            }
        }
    }

    /// Converts every queued adapter into pinned memory and queues its copy.
    fn start_queued_loads(&mut self) {
        for (slot, adapter) in std::mem::take(&mut self.queued) {
            let started = host_sites(self.cfg.num_layers, &adapter)
                .and_then(|sites| Ok(self.pool.begin_load(&self.gpu, slot, &sites)?));
            match started {
                Ok(()) => self.slots.status[slot] = SlotStatus::Loading,
                Err(e) => self.load_failed(slot, e),
            }
        }
    }

    /// Empties a slot whose load failed and remembers why, for the sequences waiting on it.
    fn load_failed(&mut self, slot: usize, error: ModelError) {
        if let Some(id) = self.slots.occupant[slot] {
            self.failed.insert(id, error.to_string());
        }
        self.slots.remove(slot);
        if let Err(e) = self.pool.clear(&self.gpu, slot) {
            tracing::warn!(slot, error = %e, "emptying a GPU adapter slot after a failed load");
        }
    }

    /// Makes every adapter of the step ready in a slot (waiting for copies still running, and
    /// loading any the engine did not prepare) and returns the step's segments, or `None` when no
    /// row uses an adapter.
    fn segments(
        &mut self,
        rows: usize,
        segments: &[(Range<usize>, &LoraAdapter)],
    ) -> Result<Option<GpuSegments>, ModelError> {
        if segments.is_empty() {
            return Ok(None);
        }
        self.slots.step += 1;
        if segments.iter().any(|(_, a)| {
            self.slots.slot_of.get(&a.id).is_some_and(|&s| self.slots.status[s] == SlotStatus::Queued)
        }) {
            self.start_queued_loads();
        }
        let in_step: HashSet<AdapterId> = segments.iter().map(|(_, a)| a.id).collect();
        let mut packed: Vec<(Range<usize>, u32)> = Vec::with_capacity(segments.len());
        for (range, adapter) in segments {
            let slot = match self.slots.slot_of.get(&adapter.id) {
                Some(&slot) => slot,
                None => self.load_now(adapter, &in_step)?,
            };
            if self.slots.status[slot] != SlotStatus::Ready {
                self.pool.finish_load(slot)?;
                self.slots.status[slot] = SlotStatus::Ready;
            }
            self.slots.last_used[slot] = self.slots.step;
            // Adjacent segments of one adapter become one: the kernels take at most one
            // segment per slot.
            match packed.last_mut() {
                Some((rows, last)) if *last == slot as u32 && rows.end == range.start => rows.end = range.end,
                _ => packed.push((range.clone(), slot as u32)),
            }
        }
        self.pool.sync(&self.gpu)?;
        Ok(Some(GpuSegments::new(&self.gpu, rows, self.pool.n_slots(), &packed)?))
    }

    /// Loads an adapter a step needs and no slot holds, waiting for its copy.
    fn load_now(&mut self, adapter: &LoraAdapter, in_step: &HashSet<AdapterId>) -> Result<usize, ModelError> {
        let sites = host_sites(self.cfg.num_layers, adapter)?;
        let need = SlotPool::<T>::bytes_for(&sites);
        let placement = self.slots.place(need, in_step).ok_or_else(|| {
            ModelError::Config(format!(
                "the step's adapters do not fit the {} GPU adapter slots and {} bytes \
                 (--max-gpu-adapters, --gpu-adapter-bytes)",
                self.pool.n_slots(),
                self.slots.budget
            ))
        })?;
        self.evict(&placement.evict)?;
        let slot = placement.slot;
        if let Err(e) = self.pool.load(&self.gpu, slot, &sites) {
            self.slots.remove(slot);
            self.pool.clear(&self.gpu, slot)?;
            return Err(e.into());
        }
        self.slots.assign(slot, adapter.id, need, SlotStatus::Ready);
        Ok(slot)
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        let rows = batch.tokens.len();
        batch.check(self.cfg.vocab_size)?;
        let segments = self.segments(rows, batch.lora.segments())?;
        let Self {
            gpu,
            cfg,
            embed,
            lm_head,
            layers,
            final_norm,
            rope: gpu_rope,
            kv,
            geom,
            num_blocks,
            pool,
            lora_scratch,
            attention_scratch,
            ..
        } = self;
        let gpu = &*gpu;
        let (h, q_size, kv_size) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size());
        let positions = gpu_rope.positions(gpu, batch.positions)?;
        let write_rows = GpuAttentionRows::new(gpu, *geom, *num_blocks, rows, batch.seqs, RowsFor::Write, 1)?;
        let attention_rows =
            GpuAttentionRows::new(gpu, *geom, *num_blocks, rows, batch.seqs, RowsFor::Attention, 1)?;
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let mut lora =
            |group: usize, x: &DeviceBuf<T>, ys: &mut [&mut DeviceBuf<T>]| -> Result<(), ModelError> {
                match &segments {
                    Some(segments) => Ok(pool.delta(gpu, group, x, ys, segments, lora_scratch)?),
                    None => Ok(()),
                }
            };

        let mut x = gpu.zeros::<T>(rows * h)?;
        gather_rows(gpu, embed, h, batch.tokens, &mut x)?;
        let mut normed = gpu.zeros::<T>(rows * h)?;
        // The last sublayer's output, added to the residual stream by the next norm.
        let mut pending: Option<DeviceBuf<T>> = None;
        for (i, (layer, layer_kv)) in layers.iter().zip(kv.iter_mut()).enumerate() {
            let p = &layer.projections;
            let group = |k: usize| i * GROUPS.len() + k;
            rms_norm(gpu, &mut x, pending.as_ref(), &layer.input_norm, cfg.rms_norm_eps, &mut normed)?;
            let mut q = p[ModuleId::Q.0].forward(gpu, &normed, rows)?;
            let mut k = p[ModuleId::K.0].forward(gpu, &normed, rows)?;
            let mut v = p[ModuleId::V.0].forward(gpu, &normed, rows)?;
            lora(group(0), &normed, &mut [&mut q, &mut k, &mut v])?;
            rope(gpu, &mut q, cfg.num_heads, gpu_rope, &positions)?;
            rope(gpu, &mut k, cfg.num_kv_heads, gpu_rope, &positions)?;
            debug_assert_eq!(k.len(), rows * kv_size);
            write_kv(gpu, layer_kv, &k, &v, &write_rows)?;
            let mut attention = gpu.zeros::<T>(rows * q_size)?;
            paged_attention(
                gpu,
                layer_kv,
                &q,
                cfg.num_heads,
                scale,
                &attention_rows,
                &mut attention,
                attention_scratch,
            )?;
            let mut o = p[ModuleId::O.0].forward(gpu, &attention, rows)?;
            lora(group(1), &attention, &mut [&mut o])?;
            rms_norm(gpu, &mut x, Some(&o), &layer.post_attention_norm, cfg.rms_norm_eps, &mut normed)?;
            let mut gate = p[ModuleId::GATE.0].forward(gpu, &normed, rows)?;
            let mut up = p[ModuleId::UP.0].forward(gpu, &normed, rows)?;
            lora(group(2), &normed, &mut [&mut gate, &mut up])?;
            silu_mul(gpu, &mut gate, &up)?;
            let mut down = p[ModuleId::DOWN.0].forward(gpu, &gate, rows)?;
            lora(group(3), &gate, &mut [&mut down])?;
            pending = Some(down);
        }
        rms_norm(gpu, &mut x, pending.as_ref(), final_norm, cfg.rms_norm_eps, &mut normed)?;
        let wanted = batch.logit_rows.len();
        let mut selected = gpu.zeros::<T>(wanted * h)?;
        gather_rows(gpu, &normed, h, batch.logit_rows, &mut selected)?;
        let mut logits = gpu.zeros::<T>(wanted * cfg.vocab_size)?;
        let head = lm_head.as_ref().unwrap_or(embed);
        linear(gpu, &selected, head, (cfg.vocab_size, h), None, &mut logits)?;
        // The step is queued: the host converts waiting adapters while the device runs it.
        self.start_queued_loads();
        Ok(self.gpu.download(&logits)?.into_iter().map(T::to_f32).collect())
    }
}

/// An adapter's sites in the pool's group order (layer by layer, `GROUPS` within each), borrowing
/// its f32 weights.
fn host_sites(
    num_layers: usize,
    adapter: &LoraAdapter,
) -> Result<Vec<Vec<Option<HostSite<'_>>>>, ModelError> {
    let mut sites = Vec::with_capacity(num_layers * GROUPS.len());
    for layer in 0..num_layers {
        for group in GROUPS {
            let group_sites = group
                .iter()
                .map(|m| {
                    let Some(site) = adapter.site(layer, m.0) else { return Ok(None) };
                    let (a, b) = site.f32_matrices().ok_or_else(|| {
                        ModelError::Config(
                            "an adapter on the GPU needs its f32 weights, not a quantized copy".into(),
                        )
                    })?;
                    Ok(Some(HostSite {
                        a,
                        b,
                        dora: site.dora_factor.as_deref(),
                        rank: site.rank,
                        scale: site.scale,
                    }))
                })
                .collect::<Result<Vec<_>, ModelError>>()?;
            sites.push(group_sites);
        }
    }
    Ok(sites)
}

/// A CPU tensor's values as f32.
fn tensor_f32(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    with_f32_slice(&t.to_dtype(candle_core::DType::F32)?, <[f32]>::to_vec)
}

/// Uploads f32 values stored as `T`.
fn upload_as<T: DeviceFloat>(gpu: &Gpu, values: &[f32]) -> Result<DeviceBuf<T>, ModelError> {
    let converted: Vec<T> = values.iter().map(|&v| T::from_f32(v)).collect();
    Ok(gpu.upload(&converted)?)
}

#[cfg(test)]
mod tests {
    use super::{Placement, SlotLimits, SlotMap, SlotStatus};
    use adapters::AdapterId;
    use std::collections::HashSet;

    fn id(n: u8) -> AdapterId {
        AdapterId::of_files(&[n], b"weights")
    }

    /// Slots holding `(adapter, bytes, status, last used)` (`None`: empty).
    fn map(budget: usize, slots: &[Option<(u8, usize, SlotStatus, u64)>]) -> SlotMap {
        let mut map = SlotMap::new(SlotLimits { slots: slots.len(), bytes: budget });
        for (slot, occupant) in slots.iter().enumerate() {
            if let Some((n, bytes, status, used)) = *occupant {
                map.assign(slot, id(n), bytes, status);
                map.last_used[slot] = used;
            }
        }
        map
    }

    fn place(map: &SlotMap, need: usize, protected: &[u8]) -> Option<Placement> {
        map.place(need, &protected.iter().map(|&n| id(n)).collect::<HashSet<_>>())
    }

    #[test]
    fn an_empty_slot_goes_first_then_the_least_recently_used_ready_one() {
        use SlotStatus::Ready;
        let with_room = map(1000, &[Some((1, 10, Ready, 1)), None, Some((2, 10, Ready, 0))]);
        assert_eq!(place(&with_room, 10, &[]), Some(Placement { slot: 1, evict: vec![] }));
        let full = map(1000, &[Some((1, 10, Ready, 5)), Some((2, 10, Ready, 2)), Some((3, 10, Ready, 9))]);
        assert_eq!(place(&full, 10, &[]), Some(Placement { slot: 1, evict: vec![1] }));
        // A protected adapter (a running sequence's, or one earlier in the queue) keeps its slot.
        assert_eq!(place(&full, 10, &[2]), Some(Placement { slot: 0, evict: vec![0] }));
        assert_eq!(place(&full, 10, &[1, 2, 3]), None);
    }

    #[test]
    fn a_slot_whose_copy_is_queued_or_running_is_never_given_up() {
        use SlotStatus::{Loading, Queued, Ready};
        let busy = map(1000, &[Some((1, 10, Loading, 0)), Some((2, 10, Queued, 1)), Some((3, 10, Ready, 7))]);
        assert_eq!(place(&busy, 10, &[]), Some(Placement { slot: 2, evict: vec![2] }));
        assert_eq!(place(&busy, 10, &[3]), None);
    }

    #[test]
    fn the_byte_budget_gives_up_more_slots_least_recently_used_first() {
        use SlotStatus::Ready;
        let slots = [Some((1, 40, Ready, 1)), Some((2, 40, Ready, 2)), None, Some((3, 10, Ready, 3))];
        let m = map(100, &slots);
        // 90 bytes held: 10 more fit in the empty slot.
        assert_eq!(place(&m, 10, &[]), Some(Placement { slot: 2, evict: vec![] }));
        // 50 need the oldest (40) gone as well.
        assert_eq!(place(&m, 50, &[]), Some(Placement { slot: 2, evict: vec![0] }));
        assert_eq!(place(&m, 90, &[]), Some(Placement { slot: 2, evict: vec![0, 1] }));
        // Protecting the oldest moves the eviction to the next.
        assert_eq!(place(&m, 50, &[1]), Some(Placement { slot: 2, evict: vec![1] }));
        assert_eq!(place(&m, 90, &[3]), Some(Placement { slot: 2, evict: vec![0, 1] }));
        assert_eq!(place(&m, 91, &[3]), None);
        assert_eq!(place(&m, 101, &[]), None);
    }

    #[test]
    fn assigning_and_removing_keep_the_index_and_the_counts() {
        let mut m = map(100, &[None, None]);
        m.assign(0, id(1), 30, SlotStatus::Queued);
        m.assign(1, id(2), 30, SlotStatus::Loading);
        assert_eq!(m.in_flight(), 2);
        assert_eq!(m.slot_of.get(&id(2)), Some(&1));
        // Reassigning a slot drops the adapter it held.
        m.assign(1, id(3), 20, SlotStatus::Ready);
        assert_eq!((m.slot_of.get(&id(2)), m.slot_of.get(&id(3))), (None, Some(&1)));
        assert_eq!((m.in_flight(), m.bytes.iter().sum::<usize>()), (1, 50));
        m.remove(0);
        assert_eq!((m.slot_of.get(&id(1)), m.status[0], m.bytes[0]), (None, SlotStatus::Empty, 0));
    }
}
