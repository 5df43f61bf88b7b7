//! The Llama-family decoder (Llama 2/3, SmolLM, TinyLlama, Mistral, Qwen2) over a ragged batch:
//! every matmul runs once over all rows of the step; attention runs per sequence over its own
//! KV blocks. Parameter names follow the Hugging Face checkpoint (`model.layers.N.self_attn...`).

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{Embedding, Linear};
use super::lora::{forward_shared_input, LoraBatch, LoraLinear, LoraStorage, ModuleId};
use super::ModelError;
use adapters::LoraAdapter;
use candle_core::{Device, Tensor};
use kernels::attention::{paged_attention, write_kv, LayerKv, Rope, SeqRows};

/// Positions whose rope angles are tabulated at load (16 MiB for a 128-wide head)...
const ROPE_TABLE_POSITIONS: usize = 32_768;
/// ...and at most this many floats of cos and sin together, however wide the head.
const ROPE_TABLE_FLOATS: usize = 1 << 22;

/// Where layer weights come from; implemented by the GGUF and Hugging Face loaders so the layer
/// code below has one naming scheme (Hugging Face names).
pub trait WeightSource {
    /// `{name}.weight` `[out, in]` and, when `bias`, `{name}.bias` `[out]`.
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear, ModelError>;
    /// A 1-D f32 parameter by its full name (`...input_layernorm.weight`).
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor, ModelError>;
    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Embedding, ModelError>;
    fn lm_head(&mut self, vocab: usize, hidden: usize, tied: bool) -> Result<Linear, ModelError>;
}

/// One decoder layer's weights as dense f32 tensors, for code that differentiates through the
/// base (training); serving never makes them.
pub struct DenseLayer {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    /// `[out, in]` weight and optional bias of each projection, in `MODULES` order.
    pub projections: Vec<(Tensor, Option<Tensor>)>,
}

/// The whole base as dense f32 tensors (see [`Llama::dense_weights`]).
pub struct DenseWeights {
    /// `[vocab, hidden]`.
    pub embed: Tensor,
    pub layers: Vec<DenseLayer>,
    pub norm: Tensor,
    /// `[vocab, hidden]`; the same tensor as `embed` when the embeddings are tied.
    pub lm_head: Tensor,
}

/// The rows of one forward step.
pub struct ForwardBatch<'a> {
    /// Token id of each row.
    pub tokens: &'a [u32],
    /// Position of each row in its sequence.
    pub positions: &'a [usize],
    /// Which rows belong to which sequence, and that sequence's block table.
    pub seqs: &'a [SeqRows<'a>],
    /// Rows whose logits are wanted (usually the last row of each sequence that samples).
    pub logit_rows: &'a [u32],
    /// Which rows use which adapter.
    pub lora: &'a LoraBatch<'a>,
}

impl ForwardBatch<'_> {
    /// What every executor checks before running a step: one position per token, and every
    /// token inside the vocabulary.
    pub(super) fn check(&self, vocab_size: usize) -> Result<(), ModelError> {
        if self.tokens.len() != self.positions.len() {
            return Err(ModelError::Config("tokens and positions differ in length".into()));
        }
        if let Some(&bad) = self.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(ModelError::Config(format!("token id {bad} is outside the vocabulary")));
        }
        Ok(())
    }
}

/// What every layer needs besides its input: the step's rows and the shared rope table.
struct StepCtx<'a> {
    batch: &'a ForwardBatch<'a>,
    rope: &'a Rope,
    cfg: &'a ModelConfig,
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(src: &mut dyn WeightSource, name: &str, cfg: &ModelConfig) -> Result<Self, ModelError> {
        Ok(Self { weight: src.vector(&format!("{name}.weight"), cfg.hidden_size)?, eps: cfg.rms_norm_eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
}

struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The whole decoder.
pub struct Llama {
    config: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    lora_storage: LoraStorage,
}

impl Attention {
    fn load(src: &mut dyn WeightSource, layer: usize, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let p = format!("model.layers.{layer}.self_attn");
        let (h, bias) = (cfg.hidden_size, cfg.architecture.qkv_bias());
        let mut proj = |name: &str, out, inp, bias, module| -> Result<LoraLinear, ModelError> {
            Ok(LoraLinear::new(src.linear(&format!("{p}.{name}"), out, inp, bias)?, layer, module))
        };
        Ok(Self {
            q_proj: proj("q_proj", cfg.q_size(), h, bias, ModuleId::Q)?,
            k_proj: proj("k_proj", cfg.kv_size(), h, bias, ModuleId::K)?,
            v_proj: proj("v_proj", cfg.kv_size(), h, bias, ModuleId::V)?,
            o_proj: proj("o_proj", h, cfg.q_size(), false, ModuleId::O)?,
        })
    }

    /// `x: (rows, hidden)` → `(rows, hidden)`; writes this step's K/V into the layer's blocks.
    fn forward(&self, x: &Tensor, kv: &mut LayerKv, ctx: &StepCtx) -> Result<Tensor, ModelError> {
        let (batch, rope, cfg) = (ctx.batch, ctx.rope, ctx.cfg);
        let (rows, _) = x.dims2()?;
        // (rows, n_heads * head_dim) and (rows, n_kv_heads * head_dim)
        let lora = batch.lora;
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            forward_shared_input(&[&self.q_proj, &self.k_proj, &self.v_proj], x, lora)?
                .try_into()
                .map_err(|_| ModelError::Config("q/k/v projection count".into()))?;
        rope.apply(&mut q, cfg.num_heads, batch.positions)?;
        rope.apply(&mut k, cfg.num_kv_heads, batch.positions)?;
        write_kv(kv, &k, &v, batch.seqs)?;
        let mut out = vec![0f32; rows * cfg.q_size()];
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        paged_attention(kv, &q, cfg.num_heads, scale, batch.seqs, &mut out)?;
        let out = Tensor::from_vec(out, (rows, cfg.q_size()), &Device::Cpu)?;
        self.o_proj.forward(&out, lora)
    }
}

impl Mlp {
    fn load(src: &mut dyn WeightSource, layer: usize, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let p = format!("model.layers.{layer}.mlp");
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut proj = |name: &str, out, inp, module| -> Result<LoraLinear, ModelError> {
            Ok(LoraLinear::new(src.linear(&format!("{p}.{name}"), out, inp, false)?, layer, module))
        };
        Ok(Self {
            gate_proj: proj("gate_proj", i, h, ModuleId::GATE)?,
            up_proj: proj("up_proj", i, h, ModuleId::UP)?,
            down_proj: proj("down_proj", h, i, ModuleId::DOWN)?,
        })
    }

    fn forward(&self, x: &Tensor, lora: &LoraBatch) -> Result<Tensor, ModelError> {
        let [gate, up]: [Vec<f32>; 2] = forward_shared_input(&[&self.gate_proj, &self.up_proj], x, lora)?
            .try_into()
            .map_err(|_| ModelError::Config("gate/up projection count".into()))?;
        let rows = x.dims2()?.0;
        let act = silu_mul(gate, &up);
        self.down_proj
            .forward(&Tensor::from_vec(act, (rows, self.up_proj.base().out_features()), &Device::Cpu)?, lora)
    }
}

/// `silu(gate) · up`, element-wise, in place of `gate` (transformers' order: `x · sigmoid(x)`,
/// then the product). Large batches (prefill) split across the rayon pool; a decode step's few
/// rows stay on the calling thread, where waking helpers would cost more than the work.
fn silu_mul(mut gate: Vec<f32>, up: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    const PARALLEL_MIN: usize = 1 << 16;
    let op = |(g, u): (&mut f32, &f32)| *g = *g / (1.0 + (-*g).exp()) * u;
    if gate.len() < PARALLEL_MIN {
        gate.iter_mut().zip(up).for_each(op);
    } else {
        gate.par_chunks_mut(PARALLEL_MIN / 4)
            .zip(up.par_chunks(PARALLEL_MIN / 4))
            .for_each(|(g, u)| g.iter_mut().zip(u).for_each(op));
    }
    gate
}

impl DecoderLayer {
    fn load(src: &mut dyn WeightSource, layer: usize, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let p = format!("model.layers.{layer}");
        Ok(Self {
            input_layernorm: RmsNorm::load(src, &format!("{p}.input_layernorm"), cfg)?,
            self_attn: Attention::load(src, layer, cfg)?,
            post_attention_layernorm: RmsNorm::load(src, &format!("{p}.post_attention_layernorm"), cfg)?,
            mlp: Mlp::load(src, layer, cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, kv: &mut LayerKv, ctx: &StepCtx) -> Result<Tensor, ModelError> {
        let residual = x;
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, kv, ctx)?;
        let x = (h + residual)?;
        let residual = &x;
        Ok((self.mlp.forward(&self.post_attention_layernorm.forward(&x)?, ctx.batch.lora)? + residual)?)
    }
}

impl Llama {
    pub fn load(config: ModelConfig, src: &mut dyn WeightSource) -> Result<Self, ModelError> {
        let embed_tokens = src.embedding(config.vocab_size, config.hidden_size)?;
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::load(src, i, &config))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(src, "model.norm", &config)?;
        let lm_head = src.lm_head(config.vocab_size, config.hidden_size, config.tie_word_embeddings)?;
        // Positions past the table are computed on the fly with the same rounding, so a model
        // declaring a million-token context does not cost its whole table up front.
        let table =
            config.max_position_embeddings.min(ROPE_TABLE_POSITIONS).min(ROPE_TABLE_FLOATS / config.head_dim);
        let rope = Rope::new(config.head_dim, config.rope_theta, table);
        let quantized = layers.first().is_some_and(|l| l.self_attn.q_proj.base().is_quantized());
        let lora_storage = if quantized { LoraStorage::Int8 } else { LoraStorage::F32 };
        Ok(Self { config, embed_tokens, layers, norm, lm_head, rope, lora_storage })
    }

    /// Every weight as f32 (exact for every storage form): what a trainer differentiates
    /// through while the base stays frozen. Weights already held as dense f32 (`--dtype f32`)
    /// are shared, not copied.
    pub fn dense_weights(&self) -> Result<DenseWeights, ModelError> {
        let cfg = &self.config;
        let embed = self.embed_tokens.dense(cfg.vocab_size, cfg.hidden_size)?;
        let dense = |l: &Linear| -> Result<(Tensor, Option<Tensor>), ModelError> {
            let w =
                Tensor::from_vec(l.dequantized_weight()?, (l.out_features(), l.in_features()), &Device::Cpu)?;
            Ok((w, l.bias().map(|b| b.to_dtype(candle_core::DType::F32)).transpose()?))
        };
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = &self.layers[i];
                let projections = (0..super::MODULES.len())
                    .map(|m| {
                        self.projection(i, ModuleId(m)).map_or_else(
                            || Err(ModelError::Config(format!("layer {i} has no projection {m}"))),
                            |p| dense(p.base()),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(DenseLayer {
                    input_norm: l.input_layernorm.weight.clone(),
                    post_attention_norm: l.post_attention_layernorm.weight.clone(),
                    projections,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { dense(&self.lm_head)?.0 };
        Ok(DenseWeights { embed, layers, norm: self.norm.weight.clone(), lm_head })
    }

    /// The token embedding table (for copying the base to another device).
    pub(super) fn embedding(&self) -> &Embedding {
        &self.embed_tokens
    }

    /// The final RMSNorm's weight.
    pub(super) fn final_norm(&self) -> &Tensor {
        &self.norm.weight
    }

    /// The output projection (the embedding table's layer when they are tied).
    pub(super) fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// Layer `layer`'s input and post-attention RMSNorm weights.
    pub(super) fn layer_norms(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer).map(|l| (&l.input_layernorm.weight, &l.post_attention_layernorm.weight))
    }

    /// The base projection of an adapter site.
    pub(super) fn base_projection(&self, layer: usize, module: ModuleId) -> Option<&Linear> {
        self.projection(layer, module).map(LoraLinear::base)
    }

    /// The rotary embedding this model uses.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// How adapters are held by `prepare_adapter`: int8 on a quantized base, f32 otherwise.
    pub fn lora_storage(&self) -> LoraStorage {
        self.lora_storage
    }

    /// Overrides the adapter storage (benchmarks compare both on one base).
    pub fn with_lora_storage(mut self, storage: LoraStorage) -> Self {
        self.lora_storage = storage;
        self
    }

    /// Overrides the adapter storage in place: a GPU executor needs the adapters' f32 weights.
    pub fn set_lora_storage(&mut self, storage: LoraStorage) {
        self.lora_storage = storage;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The projection an adapter site refers to.
    fn projection(&self, layer: usize, module: ModuleId) -> Option<&LoraLinear> {
        let l = self.layers.get(layer)?;
        let (a, m) = (&l.self_attn, &l.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
            .get(module.0)
            .copied()
    }

    /// Makes a validated adapter ready for this base: computes DoRA's per-row factor
    /// `m / ‖W + scale · B A‖` (PEFT's weight norm, in f32) once, at load, so serving it in a
    /// mixed batch costs one multiply per output; then stores `A` and `B` as `lora_storage` says.
    pub fn prepare_adapter(&self, adapter: &mut LoraAdapter) -> Result<(), ModelError> {
        self.set_dora_factors(adapter)?;
        if self.lora_storage == LoraStorage::Int8 {
            adapter.quantize_int8(&self.base_shape()).map_err(|e| ModelError::Config(e.to_string()))?;
        }
        Ok(())
    }

    fn set_dora_factors(&self, adapter: &mut LoraAdapter) -> Result<(), ModelError> {
        if !adapter.needs_dora_factors() {
            return Ok(());
        }
        adapter.set_dora_factors(|site| {
            let proj = self.projection(site.layer, ModuleId(site.module)).ok_or_else(|| {
                ModelError::Config(format!("adapter site in layer {} is out of range", site.layer))
            })?;
            if proj.base().has_bias() {
                return Err(ModelError::Config("DoRA on a projection with a bias is not supported".into()));
            }
            let (out, inp) = (proj.base().out_features(), proj.base().in_features());
            let (a, b) = site.f32_matrices().ok_or_else(|| {
                ModelError::Config("DoRA factors need the adapter's f32 weights, not a quantized copy".into())
            })?;
            let w = proj.base().dequantized_weight()?;
            let magnitude = site.magnitude.as_deref().unwrap_or_default();
            let mut factor = Vec::with_capacity(out);
            let mut row = vec![0f32; inp];
            for o in 0..out {
                row.copy_from_slice(&w[o * inp..(o + 1) * inp]);
                for r in 0..site.rank {
                    let b = site.scale * b[o * site.rank + r];
                    for (x, a) in row.iter_mut().zip(&a[r * inp..(r + 1) * inp]) {
                        *x += b * a;
                    }
                }
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                factor.push(magnitude.get(o).copied().unwrap_or(0.0) / norm.max(f32::MIN_POSITIVE));
            }
            Ok(factor)
        })
    }

    /// The shapes adapters must fit to run on this model.
    pub fn base_shape(&self) -> adapters::BaseShape {
        super::lora::base_shape(&self.config)
    }

    /// Bytes held by the weights of the linear layers (the bulk of the model).
    pub fn weight_bytes(&self) -> usize {
        let per_layer = |l: &DecoderLayer| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                .iter()
                .map(|l| l.base().weight_bytes())
                .sum::<usize>()
        };
        self.layers.iter().map(per_layer).sum::<usize>() + self.lm_head.weight_bytes()
    }

    /// Runs all rows of one step and returns the logits of `batch.logit_rows`:
    /// `(logit_rows, vocab)` f32.
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Tensor, ModelError> {
        let cfg = &self.config;
        batch.check(cfg.vocab_size)?;
        // (rows, hidden)
        let mut x = self.embed_tokens.forward(batch.tokens, cfg.hidden_size)?;
        let ctx = StepCtx { batch, rope: &self.rope, cfg };
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_kv =
                kv.layer_mut(i).ok_or_else(|| ModelError::Config(format!("KV cache has no layer {i}")))?;
            x = layer.forward(&x, layer_kv, &ctx)?;
        }
        let ids = Tensor::new(batch.logit_rows, &Device::Cpu)?;
        // (logit_rows, hidden)
        let x = x.index_select(&ids, 0)?;
        self.lm_head.forward(&self.norm.forward(&x)?)
    }

    /// Logits at the last position of one prompt, computed in a scratch KV cache sized for it
    /// (reference checks and accuracy measurements).
    pub fn last_logits(&self, tokens: &[u32], lora: Option<&LoraAdapter>) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Config("empty prompt".into()));
        }
        let block_size = super::kv_cache::DEFAULT_BLOCK_SIZE;
        let blocks_needed = tokens.len().div_ceil(block_size);
        let budget = blocks_needed * KvCache::block_bytes(&self.config, block_size);
        let mut kv = KvCache::new(&self.config, super::KvCacheConfig { budget_bytes: budget, block_size });
        let blocks: Vec<u32> = (0..blocks_needed as u32).collect();
        let positions: Vec<usize> = (0..tokens.len()).collect();
        let seqs = [SeqRows { rows: 0..tokens.len(), start_pos: 0, block_table: &blocks }];
        let last = [(tokens.len() - 1) as u32];
        let lora = match lora {
            Some(adapter) => LoraBatch::new(vec![(0..tokens.len(), adapter)]),
            None => LoraBatch::none(),
        };
        let batch =
            ForwardBatch { tokens, positions: &positions, seqs: &seqs, logit_rows: &last, lora: &lora };
        super::with_logits(&self.forward(&batch, &mut kv)?)
    }
}
