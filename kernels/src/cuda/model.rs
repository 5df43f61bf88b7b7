//! What a decoder resident on the GPU runs besides LoRA and attention: the projection matmul
//! (cuBLAS), and `kernels/cuda/model.cu`'s row gather, RMSNorm with the residual add folded in,
//! rotary embedding, `silu(gate)·up` and a hash fill for random-weight benchmark models.
//!
//! Every function checks its shapes before anything is queued (on `Err` nothing ran), then queues
//! its work on the device's stream and returns: [`Gpu::download`] and [`Gpu::synchronize`] wait.
//! Storage is `T` (f32, f16, bf16), arithmetic f32, each stored value rounded to `T` once.

use super::{DeviceBuf, DeviceFloat, Gpu};
use crate::attention::Rope;
use crate::KernelError;

fn shape<R>(why: String) -> Result<R, KernelError> {
    Err(KernelError::Shape(why))
}

/// `out[r] = src[idx[r]]` for rows of `width` (token embeddings, the rows that want logits).
/// Every index must name a row of `src`.
pub fn gather_rows<T: DeviceFloat>(
    gpu: &Gpu,
    src: &DeviceBuf<T>,
    width: usize,
    idx: &[u32],
    out: &mut DeviceBuf<T>,
) -> Result<(), KernelError> {
    if width == 0 || !src.len().is_multiple_of(width) || out.len() != idx.len() * width {
        return shape(format!(
            "gather: src holds {}, out {} values; rows of {width} for {} indices",
            src.len(),
            out.len(),
            idx.len()
        ));
    }
    let src_rows = src.len() / width;
    if let Some(bad) = idx.iter().find(|&&i| i as usize >= src_rows) {
        return shape(format!("gather: row {bad} of a {src_rows}-row table"));
    }
    if idx.is_empty() {
        return Ok(());
    }
    let idx = gpu.upload(idx)?;
    gpu.launch_gather(src, &idx, width, out)
}

/// With `delta`: `x += delta` (stored in `T`: the residual stream). Then
/// `out = x / sqrt(mean(x²) + eps) · weight` per row, as transformers' RMSNorm. `x`, `delta` and
/// `out` are `[rows, width]` with `width = weight.len()`.
pub fn rms_norm<T: DeviceFloat>(
    gpu: &Gpu,
    x: &mut DeviceBuf<T>,
    delta: Option<&DeviceBuf<T>>,
    weight: &DeviceBuf<f32>,
    eps: f32,
    out: &mut DeviceBuf<T>,
) -> Result<(), KernelError> {
    let width = weight.len();
    if width == 0
        || !x.len().is_multiple_of(width)
        || out.len() != x.len()
        || delta.is_some_and(|d| d.len() != x.len())
    {
        return shape(format!(
            "rms_norm: x holds {}, out {}, delta {:?} values for a weight of {width}",
            x.len(),
            out.len(),
            delta.map(DeviceBuf::len)
        ));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return shape(format!("rms_norm: eps {eps} must be finite and non-negative"));
    }
    if x.is_empty() {
        return Ok(());
    }
    gpu.launch_rms_norm(x, delta, weight, width, eps, out)
}

/// A [`Rope`]'s cos and sin tables on the device, for positions `0..positions`.
// Without `cuda` the device handle that reads these fields does not exist.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct GpuRope {
    pub(super) cos: DeviceBuf<f32>,
    pub(super) sin: DeviceBuf<f32>,
    head_dim: usize,
    positions: usize,
}

impl GpuRope {
    /// Uploads `rope`'s angles (rounded exactly as on the CPU) for positions `0..positions`.
    pub fn new(gpu: &Gpu, rope: &Rope, positions: usize) -> Result<Self, KernelError> {
        let head_dim = rope.head_dim();
        if head_dim == 0 || !head_dim.is_multiple_of(2) || positions == 0 {
            return shape(format!(
                "rope: head_dim {head_dim} must be even and non-zero, positions {positions} non-zero"
            ));
        }
        let (cos, sin) = rope.cos_sin(positions);
        Ok(GpuRope { cos: gpu.upload(&cos)?, sin: gpu.upload(&sin)?, head_dim, positions })
    }

    /// The positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.positions
    }

    /// A step's row positions, checked against the tables and uploaded once for every layer.
    pub fn positions(&self, gpu: &Gpu, positions: &[usize]) -> Result<GpuPositions, KernelError> {
        if let Some(&bad) = positions.iter().find(|&&p| p >= self.positions) {
            return shape(format!(
                "rope: position {bad} is past the {} tabulated on the GPU",
                self.positions
            ));
        }
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        Ok(GpuPositions { pos: gpu.upload(&pos)?, rows: positions.len(), limit: self.positions })
    }
}

/// Row positions validated by [`GpuRope::positions`].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct GpuPositions {
    pub(super) pos: DeviceBuf<u32>,
    rows: usize,
    limit: usize,
}

/// Rotates every head of every row of `x` (`[rows, n_heads·head_dim]`) in place, "rotate_half"
/// convention, as [`Rope::apply`] on the CPU.
pub fn rope<T: DeviceFloat>(
    gpu: &Gpu,
    x: &mut DeviceBuf<T>,
    n_heads: usize,
    rope: &GpuRope,
    positions: &GpuPositions,
) -> Result<(), KernelError> {
    if positions.limit != rope.positions
        || n_heads == 0
        || x.len() != positions.rows * n_heads * rope.head_dim
    {
        return shape(format!(
            "rope: x holds {} values, {} rows of {n_heads} heads of {} need {} (positions checked against {}, tables of {})",
            x.len(),
            positions.rows,
            rope.head_dim,
            positions.rows * n_heads * rope.head_dim,
            positions.limit,
            rope.positions
        ));
    }
    if positions.rows == 0 {
        return Ok(());
    }
    gpu.launch_rope(x, positions, rope, n_heads, rope.head_dim / 2)
}

/// `gate = silu(gate) · up`, element-wise.
pub fn silu_mul<T: DeviceFloat>(
    gpu: &Gpu,
    gate: &mut DeviceBuf<T>,
    up: &DeviceBuf<T>,
) -> Result<(), KernelError> {
    if gate.len() != up.len() {
        return shape(format!("silu_mul: gate holds {}, up {} values", gate.len(), up.len()));
    }
    if gate.is_empty() {
        return Ok(());
    }
    gpu.launch_silu_mul(gate, up)
}

/// `y = x · Wᵀ (+ bias)`: `x` `[rows, in]`, `weight` `[out, in]`, `bias` `[out]`, `y` `[rows, out]`,
/// row-major; one cuBLAS gemm (f32 accumulation) and, with a bias, one add.
pub fn linear<T: DeviceFloat>(
    gpu: &Gpu,
    x: &DeviceBuf<T>,
    weight: &DeviceBuf<T>,
    (out_features, in_features): (usize, usize),
    bias: Option<&DeviceBuf<T>>,
    y: &mut DeviceBuf<T>,
) -> Result<(), KernelError> {
    if in_features == 0 || weight.len() != out_features * in_features || !x.len().is_multiple_of(in_features)
    {
        return shape(format!(
            "linear: weight holds {}, x {} values for [{out_features}, {in_features}]",
            weight.len(),
            x.len()
        ));
    }
    let rows = x.len() / in_features;
    if y.len() != rows * out_features || bias.is_some_and(|b| b.len() != out_features) {
        return shape(format!(
            "linear: y holds {} values (need {}), bias {:?} (need {out_features})",
            y.len(),
            rows * out_features,
            bias.map(DeviceBuf::len)
        ));
    }
    if rows == 0 || out_features == 0 {
        return Ok(());
    }
    gpu.gemm_abt(x, 0, weight, y, 0, (rows, out_features, in_features), (1.0, 0.0))?;
    match bias {
        Some(b) => gpu.launch_add_bias(y, b, rows, out_features),
        None => Ok(()),
    }
}

/// Fills `buf` with `scale · u`, `u` uniform in `[-1, 1)` from a hash of `(seed, index)`: random
/// weights made on the device, so a 7B-shaped benchmark model costs no host memory or transfer.
pub fn fill_uniform<T: DeviceFloat>(
    gpu: &Gpu,
    buf: &mut DeviceBuf<T>,
    seed: u32,
    scale: f32,
) -> Result<(), KernelError> {
    if !scale.is_finite() {
        return shape(format!("fill_uniform: scale {scale} is not finite"));
    }
    if buf.is_empty() {
        return Ok(());
    }
    gpu.launch_fill_uniform(buf, seed, scale)
}
