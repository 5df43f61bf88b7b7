//! The base resident on a CUDA device (`--device cuda[:N]`): `llama.rs`'s decoder with its
//! weights in f32, f16 or bf16 device buffers, the paged KV cache in device memory, and adapters
//! in a pool of device slots filled from the host tier on first use. The engine hands it the same
//! `ForwardBatch` as the CPU model and gets the same logits back; everything device-specific is
//! behind `kernels::cuda`, which exists (and fails to open a device) in builds without CUDA.

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
use std::ops::Range;

/// The site groups of one layer, as the fused LoRA calls run them: q/k/v and gate/up share their
/// input, o and down have their own.
const GROUPS: [&[ModuleId]; 4] = [
    &[ModuleId::Q, ModuleId::K, ModuleId::V],
    &[ModuleId::O],
    &[ModuleId::GATE, ModuleId::UP],
    &[ModuleId::DOWN],
];

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
    /// and `adapter_slots` empty adapter slots.
    pub fn new(
        model: &Llama,
        ordinal: usize,
        dtype: Dtype,
        kv: KvCacheConfig,
        adapter_slots: usize,
    ) -> Result<Self, ModelError> {
        Self::open(ordinal, |gpu| Ok(build_typed!(dtype, new(gpu, model, kv, adapter_slots))))
    }

    /// A model of `cfg`'s shape with random weights made on the device (benchmarks: a 7B-shaped
    /// model costs no host memory). Its logits mean nothing.
    pub fn random(
        cfg: &ModelConfig,
        ordinal: usize,
        dtype: Dtype,
        kv: KvCacheConfig,
        adapter_slots: usize,
        seed: u32,
    ) -> Result<Self, ModelError> {
        Self::open(ordinal, |gpu| Ok(build_typed!(dtype, random(gpu, cfg, kv, adapter_slots, seed))))
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

/// Which adapter each device slot holds, and when each was last used.
struct SlotMap {
    slot_of: HashMap<AdapterId, usize>,
    occupant: Vec<Option<AdapterId>>,
    last_used: Vec<u64>,
    step: u64,
}

impl SlotMap {
    fn new(slots: usize) -> Self {
        Self { slot_of: HashMap::new(), occupant: vec![None; slots], last_used: vec![0; slots], step: 0 }
    }

    /// A slot for an adapter not resident: an empty one, else the least recently used one that
    /// no row of this step uses.
    fn victim(&self, in_step: &[AdapterId]) -> Option<usize> {
        (0..self.occupant.len())
            .filter(|&s| self.occupant[s].is_none_or(|id| !in_step.contains(&id)))
            .min_by_key(|&s| (self.occupant[s].is_some(), self.last_used[s]))
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
    lora_scratch: LoraScratch,
    attention_scratch: AttentionScratch,
}

impl<T: DeviceFloat> GpuLlama<T> {
    fn new(gpu: Gpu, model: &Llama, kv: KvCacheConfig, adapter_slots: usize) -> Result<Self, ModelError> {
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
        Self::assemble(gpu, cfg, weights, model.rope(), kv, adapter_slots)
    }

    /// A model of `cfg`'s shape with random weights made on the device (uniform, scaled by
    /// `1/√in` per projection; norms 1): a benchmark model of any size without host memory.
    fn random(
        gpu: Gpu,
        cfg: &ModelConfig,
        kv: KvCacheConfig,
        adapter_slots: usize,
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
        Self::assemble(gpu, cfg.clone(), weights, &rope, kv, adapter_slots)
    }

    /// The KV cache, rope tables and adapter slots around a model's weights.
    fn assemble(
        gpu: Gpu,
        cfg: ModelConfig,
        weights: Weights<T>,
        rope: &kernels::attention::Rope,
        kv: KvCacheConfig,
        adapter_slots: usize,
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
        let pool = SlotPool::new(&gpu, adapter_slots, &groups)?;
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
            slots: SlotMap::new(adapter_slots),
            lora_scratch: LoraScratch::new(),
            attention_scratch: AttentionScratch::default(),
        })
    }

    /// Makes every adapter of the step resident in a slot and returns the step's segments, or
    /// `None` when no row uses an adapter.
    fn segments(
        &mut self,
        rows: usize,
        segments: &[(Range<usize>, &LoraAdapter)],
    ) -> Result<Option<GpuSegments>, ModelError> {
        if segments.is_empty() {
            return Ok(None);
        }
        self.slots.step += 1;
        let in_step: Vec<AdapterId> = segments.iter().map(|(_, a)| a.id).collect();
        let mut packed: Vec<(Range<usize>, u32)> = Vec::with_capacity(segments.len());
        for (range, adapter) in segments {
            let slot = match self.slots.slot_of.get(&adapter.id) {
                Some(&slot) => slot,
                None => {
                    let slot = self.slots.victim(&in_step).ok_or_else(|| {
                        ModelError::Config(format!(
                            "a step uses more adapters than the {} GPU adapter slots (--max-gpu-adapters)",
                            self.pool.n_slots()
                        ))
                    })?;
                    self.load_adapter(slot, adapter)?;
                    if let Some(old) = self.slots.occupant[slot].replace(adapter.id) {
                        self.slots.slot_of.remove(&old);
                    }
                    self.slots.slot_of.insert(adapter.id, slot);
                    slot
                }
            };
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

    fn load_adapter(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<(), ModelError> {
        let mut sites = Vec::with_capacity(self.cfg.num_layers * GROUPS.len());
        for layer in 0..self.cfg.num_layers {
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
        // A failed load leaves the slot as it was, but the map must not keep pointing at it.
        if let Err(e) = self.pool.load(&self.gpu, slot, &sites) {
            if let Some(old) = self.slots.occupant[slot].take() {
                self.slots.slot_of.remove(&old);
            }
            self.pool.clear(slot);
            return Err(e.into());
        }
        Ok(())
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
        Ok(gpu.download(&logits)?.into_iter().map(T::to_f32).collect())
    }
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
