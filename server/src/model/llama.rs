//! The Llama-family decoder (Llama 2/3, SmolLM, TinyLlama, Mistral, Qwen2) over a ragged batch:
//! every matmul runs once over all rows of the step; attention runs per sequence over its own
//! KV blocks. Parameter names follow the Hugging Face checkpoint (`model.layers.N.self_attn...`).

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{with_f32_slice, Embedding, Linear};
use super::ModelError;
use candle_core::{Device, Tensor};
use kernels::attention::{paged_attention, write_kv, LayerKv, Rope, SeqRows};

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
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
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
}

impl Attention {
    fn load(src: &mut dyn WeightSource, p: &str, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (h, bias) = (cfg.hidden_size, cfg.architecture.qkv_bias());
        Ok(Self {
            q_proj: src.linear(&format!("{p}.q_proj"), cfg.q_size(), h, bias)?,
            k_proj: src.linear(&format!("{p}.k_proj"), cfg.kv_size(), h, bias)?,
            v_proj: src.linear(&format!("{p}.v_proj"), cfg.kv_size(), h, bias)?,
            o_proj: src.linear(&format!("{p}.o_proj"), h, cfg.q_size(), false)?,
        })
    }

    /// `x: (rows, hidden)` → `(rows, hidden)`; writes this step's K/V into the layer's blocks.
    fn forward(&self, x: &Tensor, kv: &mut LayerKv, ctx: &StepCtx) -> Result<Tensor, ModelError> {
        let (batch, rope, cfg) = (ctx.batch, ctx.rope, ctx.cfg);
        let (rows, _) = x.dims2()?;
        // (rows, n_heads * head_dim) and (rows, n_kv_heads * head_dim)
        let mut q = with_f32_slice(&self.q_proj.forward(x)?, <[f32]>::to_vec)?;
        let mut k = with_f32_slice(&self.k_proj.forward(x)?, <[f32]>::to_vec)?;
        let v = with_f32_slice(&self.v_proj.forward(x)?, <[f32]>::to_vec)?;
        rope.apply(&mut q, cfg.num_heads, batch.positions)?;
        rope.apply(&mut k, cfg.num_kv_heads, batch.positions)?;
        write_kv(kv, &k, &v, batch.seqs)?;
        let mut out = vec![0f32; rows * cfg.q_size()];
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        paged_attention(kv, &q, cfg.num_heads, scale, batch.seqs, &mut out)?;
        let out = Tensor::from_vec(out, (rows, cfg.q_size()), &Device::Cpu)?;
        self.o_proj.forward(&out)
    }
}

impl Mlp {
    fn load(src: &mut dyn WeightSource, p: &str, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: src.linear(&format!("{p}.gate_proj"), i, h, false)?,
            up_proj: src.linear(&format!("{p}.up_proj"), i, h, false)?,
            down_proj: src.linear(&format!("{p}.down_proj"), h, i, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

impl DecoderLayer {
    fn load(src: &mut dyn WeightSource, p: &str, cfg: &ModelConfig) -> Result<Self, ModelError> {
        Ok(Self {
            input_layernorm: RmsNorm::load(src, &format!("{p}.input_layernorm"), cfg)?,
            self_attn: Attention::load(src, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(src, &format!("{p}.post_attention_layernorm"), cfg)?,
            mlp: Mlp::load(src, &format!("{p}.mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, kv: &mut LayerKv, ctx: &StepCtx) -> Result<Tensor, ModelError> {
        let residual = x;
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, kv, ctx)?;
        let x = (h + residual)?;
        let residual = &x;
        Ok((self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)? + residual)?)
    }
}

impl Llama {
    pub fn load(config: ModelConfig, src: &mut dyn WeightSource) -> Result<Self, ModelError> {
        let embed_tokens = src.embedding(config.vocab_size, config.hidden_size)?;
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::load(src, &format!("model.layers.{i}"), &config))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(src, "model.norm", &config)?;
        let lm_head = src.lm_head(config.vocab_size, config.hidden_size, config.tie_word_embeddings)?;
        let rope = Rope::new(config.head_dim, config.rope_theta, config.max_position_embeddings);
        Ok(Self { config, embed_tokens, layers, norm, lm_head, rope })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes held by the weights of the linear layers (the bulk of the model).
    pub fn weight_bytes(&self) -> usize {
        let per_layer = |l: &DecoderLayer| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                .iter()
                .map(|l| l.weight_bytes())
                .sum::<usize>()
        };
        self.layers.iter().map(per_layer).sum::<usize>() + self.lm_head.weight_bytes()
    }

    /// Runs all rows of one step and returns the logits of `batch.logit_rows`:
    /// `(logit_rows, vocab)` f32.
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Tensor, ModelError> {
        let cfg = &self.config;
        if batch.tokens.len() != batch.positions.len() {
            return Err(ModelError::Config("tokens and positions differ in length".into()));
        }
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Config(format!("token id {bad} is outside the vocabulary")));
        }
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
    pub fn last_logits(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
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
        let batch = ForwardBatch { tokens, positions: &positions, seqs: &seqs, logit_rows: &last };
        super::with_logits(&self.forward(&batch, &mut kv)?)
    }
}
