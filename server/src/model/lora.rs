//! Where LoRA enters the model: `LoraBatch` says which rows of a step use which adapter (built
//! once per step, passed explicitly to every layer), and `LoraLinear` adds the adapters' deltas
//! to a base projection's output with the segmented kernel. No other model code knows adapters.

use super::linear::{with_f32_slice, Linear};
use super::ModelError;
use adapters::{BaseShape, LoraAdapter, ModuleShape};
use candle_core::{Device, Tensor};
use kernels::lora::{lora_delta, lora_delta_fused, Segment, SiteDelta};
use kernels::quant::QuantMatrix;
use std::ops::Range;

/// The targetable projections of a decoder layer, in `BaseShape::modules` order.
pub const MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// How adapters' `A` and `B` are held while they serve on this base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraStorage {
    /// As loaded: exact, the mode that matches the reference.
    F32,
    /// int8 with one scale per rank row: a quarter of the bytes, which is what bounds a decode
    /// step of many distinct adapters. The default next to a quantized base, whose own weight
    /// error is far larger than this rounding.
    Int8,
}

/// Index of a module in `MODULES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleId(pub usize);

impl ModuleId {
    pub const Q: Self = Self(0);
    pub const K: Self = Self(1);
    pub const V: Self = Self(2);
    pub const O: Self = Self(3);
    pub const GATE: Self = Self(4);
    pub const UP: Self = Self(5);
    pub const DOWN: Self = Self(6);
}

/// The shapes adapters are validated against.
pub fn base_shape(cfg: &super::ModelConfig) -> BaseShape {
    let (h, q, kv, i) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size(), cfg.intermediate_size);
    let dims = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
    BaseShape {
        num_layers: cfg.num_layers,
        modules: MODULES
            .iter()
            .zip(dims)
            .map(|(path, (out_features, in_features))| ModuleShape {
                path: path.to_string(),
                out_features,
                in_features,
            })
            .collect(),
    }
}

/// Which adapter each row of a step uses: contiguous row ranges, one per adapter segment; rows
/// outside every segment run on the base alone.
#[derive(Default)]
pub struct LoraBatch<'a> {
    segments: Vec<(Range<usize>, &'a LoraAdapter)>,
}

impl<'a> LoraBatch<'a> {
    /// A step with no adapter rows.
    pub fn none() -> Self {
        Self::default()
    }

    /// `segments` must not overlap; each range uses its adapter.
    pub fn new(segments: Vec<(Range<usize>, &'a LoraAdapter)>) -> Self {
        Self { segments }
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The step's adapter segments, in row order.
    pub fn segments(&self) -> &[(Range<usize>, &'a LoraAdapter)] {
        &self.segments
    }

    /// The kernel segments for one site: the adapters that adapt this layer and module.
    fn site(&self, layer: usize, module: ModuleId) -> Vec<Segment<'a>> {
        self.segments
            .iter()
            .filter_map(|(rows, adapter)| {
                adapter
                    .site(layer, module.0)
                    .map(|s| Segment { rows: rows.clone(), weights: s.kernel_weights() })
            })
            .collect()
    }
}

/// A base projection that adapters may target: `base(x) + Σ_segments scale · B A x`.
pub struct LoraLinear {
    base: Linear,
    layer: usize,
    module: ModuleId,
}

impl LoraLinear {
    pub fn new(base: Linear, layer: usize, module: ModuleId) -> Self {
        Self { base, layer, module }
    }

    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// `x: (rows, in)` → `(rows, out)`.
    pub fn forward(&self, x: &Tensor, lora: &LoraBatch) -> Result<Tensor, ModelError> {
        let segments = lora.site(self.layer, self.module);
        if segments.is_empty() {
            return self.base.forward(x);
        }
        let (rows, _) = x.dims2()?;
        let out = self.base.out_features();
        let mut y = self.base.forward_vec(x)?;
        with_f32_slice(x, |xs| lora_delta(xs, self.base.in_features(), &mut y, out, &segments))??;
        Ok(Tensor::from_vec(y, (rows, out), &Device::Cpu)?)
    }
}

/// Each projection's base output for the shared input `x`: one call that quantizes `x` once
/// when every weight is one of lorahost's quantized matrices without a bias (identical bits).
fn base_outputs(projs: &[&LoraLinear], x: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    let quant: Option<Vec<&QuantMatrix>> = projs.iter().map(|p| p.base.quant_weight()).collect();
    let Some(weights) = quant else {
        return projs.iter().map(|p| p.base.forward_vec(x)).collect();
    };
    let (rows, _) = x.dims2()?;
    let mut ys: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; rows * w.out_features()]).collect();
    let mut outputs: Vec<(&QuantMatrix, &mut [f32])> =
        weights.iter().copied().zip(ys.iter_mut().map(Vec::as_mut_slice)).collect();
    with_f32_slice(x, |xs| QuantMatrix::matmul_shared_input(xs, rows, &mut outputs))??;
    Ok(ys)
}

/// Projections that read the same input (q/k/v, gate/up) as row-major f32 outputs, in `projs`
/// order: each base matmul, then one fused LoRA call whose shrinks share each pass over `x`
/// (`kernels::lora::lora_delta_fused`; bit-identical to one call per projection).
pub fn forward_shared_input(
    projs: &[&LoraLinear],
    x: &Tensor,
    lora: &LoraBatch,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut ys = base_outputs(projs, x)?;
    let segments: Vec<Vec<Segment>> = projs.iter().map(|p| lora.site(p.layer, p.module)).collect();
    if segments.iter().all(Vec::is_empty) {
        return Ok(ys);
    }
    let in_features = projs.first().map_or(0, |p| p.base.in_features());
    let mut sites: Vec<SiteDelta> = ys
        .iter_mut()
        .zip(projs)
        .zip(&segments)
        .map(|((y, p), segments)| SiteDelta { y, out_features: p.base.out_features(), segments })
        .collect();
    with_f32_slice(x, |xs| lora_delta_fused(xs, in_features, &mut sites))??;
    Ok(ys)
}
