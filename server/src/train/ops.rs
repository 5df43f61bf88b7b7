//! The trainer's fused element-wise ops, each one pass forward and one backward over rows split
//! across the current rayon pool: RMSNorm with a frozen weight, rotary embedding, causal
//! softmax, `silu(gate) · up` and the cross-entropy loss.
//!
//! Why: composed from candle's primitives, each of these is three to six passes over memory
//! forward and as many again backward, every one single-threaded (candle's element-wise pool is
//! kept to one thread, see `runtime`) and each allocating a fresh tensor: together they cost
//! more than a fifth of a training step. Each op computes what its composition computes (the
//! tests check values and gradients against it).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Elements per rayon task: below this a task costs more to hand out than to run.
const TASK_ELEMS: usize = 16 << 10;

/// Fills `out` (rows of `row` elements) with `f(row_index, row_slice)`, rows spread over the
/// current rayon pool.
fn par_rows(out: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let row = row.max(1);
    let per_task = (TASK_ELEMS / row).max(1);
    out.par_chunks_mut(row * per_task).enumerate().for_each(|(t, chunk)| {
        for (i, r) in chunk.chunks_mut(row).enumerate() {
            f(t * per_task + i, r);
        }
    });
}

/// The f32 elements of a contiguous CPU input.
pub(super) fn input<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::Msg(format!("{op}: the input must be contiguous"))),
    }
}

/// Runs `f` on the f32 elements of `t` (made contiguous first).
pub(super) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let n = t.elem_count();
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let start = layout.start_offset();
            f(&cpu.as_slice::<f32>()?[start..start + n])
        }
        _ => Err(candle_core::Error::Msg("training runs on the CPU".into())),
    }
}

fn last_dim(shape: &Shape) -> usize {
    shape.dims().last().copied().unwrap_or(1)
}

/// transformers' `LlamaRMSNorm` over the last dimension, `w · x / sqrt(mean(x²) + eps)`, with
/// `w` frozen: the backward gives `x`'s gradient only.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let w: Arc<[f32]> = w.flatten_all()?.to_vec1::<f32>()?.into();
    x.contiguous()?.apply_op1(RmsNorm { w, eps })
}

struct RmsNorm {
    w: Arc<[f32]>,
    eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, x: &[f32]) -> f32 {
        let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
        1.0 / (mean + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let d = last_dim(layout.shape());
        if d != self.w.len() {
            return Err(candle_core::Error::Msg(format!(
                "rms-norm: {d} features, weight of {}",
                self.w.len()
            )));
        }
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |r, y| {
            let x = &x[r * d..(r + 1) * d];
            let inv = self.inv_rms(x);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(self.w.iter()) {
                *y = w * (x * inv);
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// With `ρ = 1/rms(x)` and `s = Σ w·g·x`: `dx = ρ·w·g − x·ρ³·s / d`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = self.w.len();
        let dx = with_data(arg, |x| {
            with_data(grad, |g| {
                let mut dx = vec![0f32; x.len()];
                par_rows(&mut dx, d, |r, dx| {
                    let (x, g) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                    let inv = self.inv_rms(x);
                    let s: f32 = x.iter().zip(g).zip(self.w.iter()).map(|((x, g), w)| w * g * x).sum();
                    let k = inv * inv * inv * s / d as f32;
                    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(self.w.iter()) {
                        *dx = inv * w * g - x * k;
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

/// Rotary embedding as transformers applies it, `x · cos + rotate_half(x) · sin`, on
/// `(seqs, heads, len, head_dim)`; `cos`/`sin` are `[positions, head_dim]` tables (each half
/// repeated) of which the first `len` rows are used.
pub fn rope(x: &Tensor, cos: &Arc<[f32]>, sin: &Arc<[f32]>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope { cos: cos.clone(), sin: sin.clone() })
}

struct Rope {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
}

impl Rope {
    fn check(&self, shape: &Shape) -> Result<(usize, usize)> {
        let dims = shape.dims();
        let (len, d) = match dims {
            [.., len, d] => (*len, *d),
            _ => return Err(candle_core::Error::Msg("rope: (.., len, head_dim) expected".into())),
        };
        if d % 2 != 0 || len * d > self.cos.len() {
            return Err(candle_core::Error::Msg(format!("rope: {len} positions of {d} beyond the table")));
        }
        Ok((len, d))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "train-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let (len, d) = self.check(layout.shape())?;
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |r, y| {
            let x = &x[r * d..(r + 1) * d];
            let p = (r % len) * d;
            let (c, s) = (&self.cos[p..p + d], &self.sin[p..p + d]);
            for i in 0..half {
                y[i] = x[i] * c[i] - x[i + half] * s[i];
                y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// `dx[i] = g[i]·cos[i] + g[i+h]·sin[i+h]` for the first half, `g[i]·cos[i] − g[i−h]·sin[i−h]`
    /// for the second.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (len, d) = self.check(arg.shape())?;
        let half = d / 2;
        let dx = with_data(grad, |g| {
            let mut dx = vec![0f32; g.len()];
            par_rows(&mut dx, d, |r, dx| {
                let g = &g[r * d..(r + 1) * d];
                let p = (r % len) * d;
                let (c, s) = (&self.cos[p..p + d], &self.sin[p..p + d]);
                for i in 0..half {
                    dx[i] = g[i] * c[i] + g[i + half] * s[i + half];
                    dx[i + half] = g[i + half] * c[i + half] - g[i] * s[i];
                }
            });
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

/// `softmax(scores · scale + causal mask)` over the last dimension of `(.., len, len)` scores:
/// row `i` of each `len × len` block sees columns `0..=i`; the others get probability 0.
pub fn causal_softmax(scores: &Tensor, scale: f32) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "train-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = input(storage, layout, self.name())?;
        let len = last_dim(layout.shape());
        if !matches!(layout.dims(), [.., rows, cols] if rows == cols) {
            return Err(candle_core::Error::Msg(format!(
                "causal-softmax: (.., len, len) expected, got {:?}",
                layout.dims()
            )));
        }
        let mut p = vec![0f32; s.len()];
        par_rows(&mut p, len, |r, p| {
            let seen = r % len + 1;
            let s = &s[r * len..r * len + seen];
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * self.scale));
            let mut sum = 0f32;
            for (p, &v) in p.iter_mut().zip(s) {
                *p = (v * self.scale - max).exp();
                sum += *p;
            }
            p[..seen].iter_mut().for_each(|p| *p /= sum);
        });
        Ok((CpuStorage::F32(p), layout.shape().clone()))
    }

    /// `ds = scale · p · (g − Σ g·p)` (masked entries have `p = 0`).
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let len = last_dim(arg.shape());
        let ds = with_data(res, |p| {
            with_data(grad, |g| {
                let mut ds = vec![0f32; p.len()];
                par_rows(&mut ds, len, |r, ds| {
                    let (p, g) = (&p[r * len..(r + 1) * len], &g[r * len..(r + 1) * len]);
                    let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                    for ((ds, &p), &g) in ds.iter_mut().zip(p).zip(g) {
                        *ds = self.scale * p * (g - dot);
                    }
                });
                Ok(ds)
            })
        })?;
        Ok(Some(Tensor::from_vec(ds, arg.shape(), &Device::Cpu)?))
    }
}

/// Llama's MLP activation `silu(gate) · up` (`silu(x) = x · sigmoid(x)`).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "train-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (input(s1, l1, self.name())?, input(s2, l2, self.name())?);
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::Msg("silu-mul: gate and up differ in shape".into()));
        }
        let d = last_dim(l1.shape());
        let mut y = vec![0f32; gate.len()];
        par_rows(&mut y, d, |r, y| {
            let (g, u) = (&gate[r * d..(r + 1) * d], &up[r * d..(r + 1) * d]);
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g / (1.0 + (-g).exp()) * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `d_up = G · silu(gate)`, `d_gate = G · up · σ(gate) · (1 + gate · (1 − σ(gate)))`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = last_dim(gate.shape());
        let (d_gate, d_up) = with_data(gate, |x| {
            with_data(up, |u| {
                with_data(grad, |g| {
                    let (mut dg, mut du) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                    let per_task = (TASK_ELEMS / d.max(1)).max(1) * d.max(1);
                    dg.par_chunks_mut(per_task).zip(du.par_chunks_mut(per_task)).enumerate().for_each(
                        |(t, (dg, du))| {
                            let span = t * per_task..t * per_task + dg.len();
                            let (x, u, g) = (&x[span.clone()], &u[span.clone()], &g[span]);
                            for i in 0..dg.len() {
                                let sig = sigmoid(x[i]);
                                du[i] = g[i] * x[i] * sig;
                                dg[i] = g[i] * u[i] * sig * (1.0 + x[i] * (1.0 - sig));
                            }
                        },
                    );
                    Ok((dg, du))
                })
            })
        })?;
        let dev = &Device::Cpu;
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), dev)?),
            Some(Tensor::from_vec(d_up, up.shape(), dev)?),
        ))
    }
}

/// Mean cross entropy of `(rows, vocab)` logits against one target class per row (candle_nn's
/// `cross_entropy`: `mean(logsumexp(logits) − logits[target])`), a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy { targets: targets.into() })
}

struct CrossEntropy {
    targets: Arc<[u32]>,
}

impl CrossEntropy {
    fn check(&self, shape: &Shape) -> Result<(usize, usize)> {
        let (rows, vocab) = shape.dims2()?;
        if rows != self.targets.len() || self.targets.iter().any(|&t| t as usize >= vocab) {
            return Err(candle_core::Error::Msg(format!(
                "cross-entropy: {rows} rows of {vocab} classes, {} targets",
                self.targets.len()
            )));
        }
        Ok((rows, vocab))
    }
}

/// `(max, Σ exp(x − max))` of a row, the sum in f64: a vocabulary's worth of f32 terms added
/// one by one would drift by ~1e-5.
fn max_and_exp_sum(x: &[f32]) -> (f32, f32) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    (max, x.iter().map(|&v| (v - max).exp() as f64).sum::<f64>() as f32)
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "train-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let (rows, vocab) = self.check(layout.shape())?;
        let mut losses = vec![0f32; rows];
        par_rows(&mut losses, 1, |r, loss| {
            let row = &x[r * vocab..(r + 1) * vocab];
            let (max, sum) = max_and_exp_sum(row);
            loss[0] = max + sum.ln() - row[self.targets[r] as usize];
        });
        let mean = losses.iter().sum::<f32>() / rows.max(1) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    /// `d logits = g · (softmax(logits) − onehot(target)) / rows`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = self.check(arg.shape())?;
        let g = grad.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let k = g.first().copied().unwrap_or(0.0) / rows.max(1) as f32;
        let dx = with_data(arg, |x| {
            let mut dx = vec![0f32; x.len()];
            par_rows(&mut dx, vocab, |r, dx| {
                let row = &x[r * vocab..(r + 1) * vocab];
                let (max, sum) = max_and_exp_sum(row);
                let norm = k / sum;
                for (d, &v) in dx.iter_mut().zip(row) {
                    *d = (v - max).exp() * norm;
                }
                dx[self.targets[r] as usize] -= k;
            });
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Var, D};

    /// Element-wise within `tol` of `b`'s largest magnitude.
    pub(in crate::train) fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "element {i}: {x} vs {y} (scale {scale})");
        }
    }

    /// Value and input gradient of `fused` against `reference` under the same random upstream
    /// gradient (a random linear functional of the output).
    fn check(shape: &[usize], fused: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor) {
        let dev = &Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, shape, dev).unwrap();
        let (yf, yr) = (fused(x.as_tensor()), reference(x.as_tensor()));
        close(&yf, &yr, 1e-5);
        let gf = (yf * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap(), 1e-4);
    }

    #[test]
    fn rms_norm_matches_its_composition() {
        let w = Tensor::randn(0f32, 1.0, 40, &Device::Cpu).unwrap();
        check(
            &[70, 40],
            |x| rms_norm(x, &w, 1e-5).unwrap(),
            |x| {
                let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                x.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap()
            },
        );
    }

    #[test]
    fn rope_matches_its_composition() {
        let (positions, d) = (12, 8);
        let dev = &Device::Cpu;
        let cos_t = Tensor::randn(0f32, 1.0, (positions, d), dev).unwrap();
        let sin_t = Tensor::randn(0f32, 1.0, (positions, d), dev).unwrap();
        let table = |t: &Tensor| -> Arc<[f32]> { t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into() };
        let (cos, sin) = (table(&cos_t), table(&sin_t));
        let len = 9;
        let (c, s) = (cos_t.narrow(0, 0, len).unwrap(), sin_t.narrow(0, 0, len).unwrap());
        check(
            &[2, 3, len, d],
            |x| rope(x, &cos, &sin).unwrap(),
            |x| {
                let half = d / 2;
                let (x1, x2) =
                    (x.narrow(D::Minus1, 0, half).unwrap(), x.narrow(D::Minus1, half, half).unwrap());
                let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                (x.broadcast_mul(&c).unwrap() + rotated.broadcast_mul(&s).unwrap()).unwrap()
            },
        );
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        let len = 7;
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (len, len), &Device::Cpu).unwrap();
        check(
            &[2, 3, len, len],
            |s| causal_softmax(s, 0.3).unwrap(),
            |s| {
                candle_nn::ops::softmax(&(s * 0.3).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
            },
        );
    }

    #[test]
    fn silu_mul_matches_its_composition_for_both_inputs() {
        let dev = &Device::Cpu;
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 33), dev).unwrap()).unwrap();
        let gate = Tensor::randn(0f32, 2.0, (5, 33), dev).unwrap();
        check(
            &[5, 33],
            |g| silu_mul(g, up.as_tensor()).unwrap(),
            |g| (g.silu().unwrap() * up.as_tensor()).unwrap(),
        );
        // And the gradient of `up`, with the gate fixed.
        let probe = Tensor::randn(0f32, 1.0, (5, 33), dev).unwrap();
        let fused = (silu_mul(&gate, up.as_tensor()).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let reference = ((gate.silu().unwrap() * up.as_tensor()).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(fused.get(up.as_tensor()).unwrap(), reference.get(up.as_tensor()).unwrap(), 1e-5);
    }

    #[test]
    fn cross_entropy_matches_candle_nn() {
        let targets = [3u32, 0, 9, 9, 4];
        let t = Tensor::new(&targets, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (5, 10), &Device::Cpu).unwrap()).unwrap();
        let (ours, theirs) = (
            cross_entropy(x.as_tensor(), &targets).unwrap(),
            candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap(),
        );
        close(&ours, &theirs, 1e-6);
        let g_ours = (ours * 1.7).unwrap().backward().unwrap();
        let g_theirs = (theirs * 1.7).unwrap().backward().unwrap();
        close(g_ours.get(x.as_tensor()).unwrap(), g_theirs.get(x.as_tensor()).unwrap(), 1e-5);
        assert!(cross_entropy(
            &Tensor::zeros((5, 10), candle_core::DType::F32, &Device::Cpu).unwrap(),
            &[10]
        )
        .is_err());
    }
}
