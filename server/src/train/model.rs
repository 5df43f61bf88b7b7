//! The base as a differentiable function for training: every weight dense f32 and frozen, LoRA
//! `A` and `B` as candle `Var`s on the targeted projections, and a batch's mean token loss.
//!
//! It computes what transformers + peft compute (Llama forward in f32, `base(x) + B(A(x)) ·
//! scale`, causal attention, right-padded sequences, cross entropy over the trained positions),
//! with candle's autograd. Projections are single ops (`linear`) whose backward never builds a
//! gradient for a frozen base weight. Norms, rotary embedding, the causal softmax
//! and the MLP activation are fused ops with their own backward (`ops`).

use super::linear::{frozen_matmul, lora_linear};
use super::{ops, TrainError};
use crate::model::{DenseWeights, Llama, ModelConfig, MODULES};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::Arc;

/// One adapted projection's trainable matrices.
pub struct LoraParam {
    pub layer: usize,
    /// Index into `MODULES`.
    pub module: usize,
    /// `[rank, in_features]`.
    pub a: Var,
    /// `[out_features, rank]`.
    pub b: Var,
    pub scale: f64,
}

/// One batch of right-padded sequences and the positions whose next token is trained.
pub struct Batch {
    /// `(sequences, length)` u32.
    pub ids: Tensor,
    /// Flat row (`sequence · length + position`) of every trained prediction.
    pub rows: Tensor,
    /// The token each of those rows must predict.
    pub targets: Vec<u32>,
    /// Number of trained predictions.
    pub predictions: usize,
}

impl Batch {
    /// Builds a batch from `(ids, trained)` pairs, where `trained[t]` says whether token `t` is
    /// a target (the prediction made at position `t - 1` is in the loss).
    pub fn new(examples: &[(&[u32], &[bool])]) -> Result<Self, TrainError> {
        let len = examples.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; examples.len() * len];
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (s, (seq, trained)) in examples.iter().enumerate() {
            ids[s * len..s * len + seq.len()].copy_from_slice(seq);
            for t in 1..seq.len() {
                if trained.get(t).copied().unwrap_or(false) {
                    rows.push((s * len + t - 1) as u32);
                    targets.push(seq[t]);
                }
            }
        }
        let predictions = rows.len();
        let dev = &Device::Cpu;
        Ok(Self {
            ids: Tensor::from_vec(ids, (examples.len(), len), dev)?,
            rows: Tensor::from_vec(rows, predictions, dev)?,
            targets,
            predictions,
        })
    }
}

/// The frozen base plus the LoRA parameters being trained.
pub struct TrainModel {
    cfg: ModelConfig,
    weights: DenseWeights,
    /// `[positions, head_dim]`: each half-table repeated, as transformers lays `cos`/`sin` out.
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    max_len: usize,
    params: Vec<LoraParam>,
    by_site: HashMap<(usize, usize), usize>,
}

impl TrainModel {
    /// `max_len`: the longest sequence a batch may hold.
    pub fn new(model: &Llama, params: Vec<LoraParam>, max_len: usize) -> Result<Self, TrainError> {
        let cfg = model.config().clone();
        let weights = model.dense_weights()?;
        let (cos, sin) = model.rope().cos_sin(max_len);
        let half = cfg.head_dim / 2;
        let table = |v: Vec<f32>| -> Arc<[f32]> {
            v.chunks_exact(half.max(1)).flat_map(|row| row.iter().chain(row).copied()).collect()
        };
        let by_site = params.iter().enumerate().map(|(i, p)| ((p.layer, p.module), i)).collect();
        Ok(Self { cfg, weights, cos: table(cos), sin: table(sin), max_len, params, by_site })
    }

    pub fn params(&self) -> &[LoraParam] {
        &self.params
    }

    /// Every trained variable: `A` then `B` of each parameter, in `params` order.
    pub fn vars(&self) -> Vec<&Var> {
        self.params.iter().flat_map(|p| [&p.a, &p.b]).collect()
    }

    /// Mean cross entropy over the batch's trained predictions (a scalar).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor, TrainError> {
        let cfg = &self.cfg;
        let (n_seq, len) = batch.ids.dims2()?;
        if len > self.max_len {
            return Err(TrainError::Config(format!("a batch of {len} tokens exceeds the model's table")));
        }
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let rows = n_seq * len;
        let mut x = self.weights.embed.index_select(&batch.ids.flatten_all()?, 0)?;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps)?;
            let heads = |t: Tensor, n: usize| -> Result<Tensor, TrainError> {
                Ok(t.reshape((n_seq, len, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = ops::rope(&heads(self.linear(i, 0, &h)?, nh)?, &self.cos, &self.sin)?;
            let k = ops::rope(&heads(self.linear(i, 1, &h)?, nkv)?, &self.cos, &self.sin)?;
            let k = repeat_kv(&k, nh / nkv)?;
            let v = repeat_kv(&heads(self.linear(i, 2, &h)?, nkv)?, nh / nkv)?;
            let probs = ops::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hd as f32).sqrt())?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((rows, nh * hd))?;
            x = (x + self.linear(i, 3, &attn)?)?;
            let h = ops::rms_norm(&x, &layer.post_attention_norm, cfg.rms_norm_eps)?;
            let act = ops::silu_mul(&self.linear(i, 4, &h)?, &self.linear(i, 5, &h)?)?;
            x = (x + self.linear(i, 6, &act)?)?;
        }
        // Only the trained rows need logits (the vocabulary projection is the largest matmul).
        let x = ops::rms_norm(&x.index_select(&batch.rows, 0)?, &self.weights.norm, cfg.rms_norm_eps)?;
        let logits = frozen_matmul(&x, &self.weights.lm_head)?;
        Ok(ops::cross_entropy(&logits, &batch.targets)?)
    }

    /// Projection `module` of layer `layer` on `x: (rows, in)`: the frozen base plus, when
    /// trained, `(x Aᵀ) Bᵀ · scale`.
    fn linear(&self, layer: usize, module: usize, x: &Tensor) -> Result<Tensor, TrainError> {
        let (w, bias) = &self.weights.layers[layer].projections[module];
        let y = match self.by_site.get(&(layer, module)) {
            Some(&p) => {
                let p = &self.params[p];
                lora_linear(x, w, p.a.as_tensor(), p.b.as_tensor(), p.scale)?
            }
            None => frozen_matmul(x, w)?,
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Each key/value head repeated for the `n_rep` query heads that share it (GQA).
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor, TrainError> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, l, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, n, n_rep, l, d))?.reshape((b, n * n_rep, l, d))?)
}

/// The LoRA matrices of `params` as f32 row-major vectors, for writing the adapter.
pub fn param_values(p: &LoraParam) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let flat = |v: &Var| -> Result<Vec<f32>, TrainError> {
        Ok(v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    Ok((flat(&p.a)?, flat(&p.b)?))
}

/// The module path of `MODULES[module]` as PEFT's `target_modules` names it (`q_proj`).
pub fn module_short_name(module: usize) -> &'static str {
    MODULES[module].rsplit('.').next().unwrap_or(MODULES[module])
}

/// The `MODULES` index of a short module name (`q_proj`).
pub fn module_index(short: &str) -> Option<usize> {
    MODULES.iter().position(|m| m.rsplit('.').next() == Some(short))
}
