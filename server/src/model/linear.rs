//! Linear layers and the token embedding, in whichever form the weights are held:
//! dense candle tensors, lorahost's quantized matrices, or candle's quantized matmul.
//!
//! Activations are always f32 `[rows, features]` tensors on the CPU; the weight form is an
//! internal detail of each layer.

use super::ModelError;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Storage, Tensor};
use kernels::quant::QuantMatrix;
use std::sync::Arc;

/// The weight of a linear layer `y = x W^T (+ b)`, `W: [out, in]`.
pub enum Weight {
    /// Dense `[out, in]`, stored in the `--dtype`'s float type.
    Dense(Tensor),
    /// GGML Q4_1 / Q8_0 blocks in lorahost's SIMD kernels.
    Quant(Arc<QuantMatrix>),
    /// Other GGML block types, through candle's quantized matmul.
    Candle(QMatMul),
}

/// A linear layer with an optional bias.
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>, out_features: usize, in_features: usize) -> Self {
        Self { weight, bias, out_features, in_features }
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// `x: (rows, in)` f32 → `(rows, out)` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let (rows, _) = x.dims2()?;
        let y = match &self.weight {
            Weight::Dense(w) => {
                let dtype = w.dtype();
                x.to_dtype(dtype)?.matmul(&w.t()?)?.to_dtype(DType::F32)?
            }
            Weight::Quant(w) => {
                let mut y = vec![0f32; rows * self.out_features];
                with_f32_slice(x, |xs| w.matmul(xs, rows, &mut y))??;
                Tensor::from_vec(y, (rows, self.out_features), &Device::Cpu)?
            }
            Weight::Candle(w) => w.forward(x)?,
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// `forward` into a plain row-major vector, without a tensor round trip for quantized
    /// weights (the LoRA path adds into it in place).
    pub fn forward_vec(&self, x: &Tensor) -> Result<Vec<f32>, ModelError> {
        match (&self.weight, &self.bias) {
            (Weight::Quant(w), None) => {
                let (rows, _) = x.dims2()?;
                let mut y = vec![0f32; rows * self.out_features];
                with_f32_slice(x, |xs| w.matmul(xs, rows, &mut y))??;
                Ok(y)
            }
            _ => with_f32_slice(&self.forward(x)?, <[f32]>::to_vec),
        }
    }

    /// The weight, when it is one of lorahost's quantized matrices and there is no bias: such
    /// layers that read the same input can share one activation pass
    /// (`QuantMatrix::matmul_shared_input`).
    pub fn quant_weight(&self) -> Option<&QuantMatrix> {
        match (&self.weight, &self.bias) {
            (Weight::Quant(w), None) => Some(w),
            _ => None,
        }
    }

    /// Whether the weight is held in a quantized block format.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quant(_) | Weight::Candle(QMatMul::QTensor(_)))
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// The weight as f32 `[out, in]`, row-major (exact for every form).
    pub fn dequantized_weight(&self) -> Result<Vec<f32>, ModelError> {
        match &self.weight {
            Weight::Dense(w) => with_f32_slice(&w.to_dtype(DType::F32)?, <[f32]>::to_vec),
            Weight::Quant(w) => Ok(w.dequantize()),
            Weight::Candle(QMatMul::QTensor(q)) => {
                with_f32_slice(&q.dequantize(&Device::Cpu)?, <[f32]>::to_vec)
            }
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                with_f32_slice(&t.to_dtype(DType::F32)?, <[f32]>::to_vec)
            }
        }
    }

    /// The weight as an f32 `[out, in]` tensor: the resident tensor itself when it is dense
    /// f32 (no copy), a dequantized copy otherwise.
    pub fn f32_weight(&self) -> Result<Tensor, ModelError> {
        match &self.weight {
            Weight::Dense(w) if w.dtype() == DType::F32 => Ok(w.clone()),
            _ => Ok(Tensor::from_vec(
                self.dequantized_weight()?,
                (self.out_features, self.in_features),
                &Device::Cpu,
            )?),
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Quant(w) => w.storage_bytes(),
            Weight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// Token embedding table `[vocab, hidden]`; looked up row by row so a quantized table is never
/// dequantized as a whole.
pub enum Embedding {
    Dense(Tensor),
    Quant(Arc<QuantMatrix>),
}

impl Embedding {
    /// The whole table as f32 `[vocab, hidden]`.
    pub fn dense(&self, vocab: usize, hidden: usize) -> Result<Tensor, ModelError> {
        match self {
            Embedding::Dense(table) => Ok(table.to_dtype(DType::F32)?),
            Embedding::Quant(table) => {
                Ok(Tensor::from_vec(table.dequantize(), (vocab, hidden), &Device::Cpu)?)
            }
        }
    }

    /// `tokens: [rows]` → `(rows, hidden)` f32. Token ids must already be `< vocab`.
    pub fn forward(&self, tokens: &[u32], hidden: usize) -> Result<Tensor, ModelError> {
        match self {
            Embedding::Dense(table) => {
                let ids = Tensor::new(tokens, &Device::Cpu)?;
                Ok(table.index_select(&ids, 0)?.to_dtype(DType::F32)?)
            }
            Embedding::Quant(table) => {
                let mut out = vec![0f32; tokens.len() * hidden];
                for (row, &token) in out.chunks_exact_mut(hidden).zip(tokens) {
                    table.dequantize_row(token as usize, row)?;
                }
                Ok(Tensor::from_vec(out, (tokens.len(), hidden), &Device::Cpu)?)
            }
        }
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor without copying it.
pub fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    let x = x.contiguous()?;
    let n = x.elem_count();
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&data[start..start + n]))
        }
        _ => Err(ModelError::Dtype("expected an f32 CPU tensor".into())),
    }
}

/// Copies a `(rows, vocab)` logits tensor out as a flat f32 vector.
pub fn with_logits(logits: &Tensor) -> Result<Vec<f32>, ModelError> {
    with_f32_slice(logits, <[f32]>::to_vec)
}
