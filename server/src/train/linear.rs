//! The trainer's projections as single autograd ops: a frozen base matmul `x Wᵀ`, and a frozen
//! base with a trained LoRA, `x Wᵀ + s · (x Aᵀ) Bᵀ`, each straight into the `gemm` crate.
//!
//! Why one op for base plus LoRA: composed from tensor ops, the delta is its own tensor added to
//! the base output (a pass over `rows × out`), and the backward adds the two paths' input
//! gradients (another), each allocating; here the delta and the LoRA half of the input gradient
//! are accumulated into the base gemm's output by the next gemm. The backward gives the input's
//! and `A`'s and `B`'s gradients, never the frozen `W`'s (autograd would otherwise build one for
//! every base weight, doubling the backward's cost and memory).

use super::ops::{input, with_data};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

/// A matrix view over f32 data: element `(i, j)` at `i · rs + j · cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows × cols`.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(candle_core::Error::Msg(format!(
                "{} elements for a {rows} × {cols} matrix",
                data.len()
            )));
        }
        Ok(Self { data, rows, cols, rs: cols, cs: 1 })
    }

    fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }
}

/// Below this many multiply-adds a product runs on the calling thread: waking a helper that
/// sleeps between calls costs more than it saves. gemm's own cut-off is a quarter of this;
/// training on 2 cores ran ~3 % faster here (the LoRA shrinks and expands fall below it).
const PARALLEL_MIN_MACS: usize = 4 * 48 * 48 * 256;

/// `dst = beta · lhs · rhs`, or `dst += beta · lhs · rhs` when `accumulate`; `dst` row-major.
fn matmul_into(dst: &mut [f32], lhs: Mat, rhs: Mat, beta: f32, accumulate: bool) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n {
        return Err(candle_core::Error::Msg(format!(
            "matmul of {m} × {k} by {} × {n} into {} elements",
            rhs.rows,
            dst.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |a: Mat| (a.rows.max(1) - 1) * a.rs + (a.cols.max(1) - 1) * a.cs;
    if k > 0 && (last(lhs) >= lhs.data.len() || last(rhs) >= rhs.data.len()) {
        return Err(candle_core::Error::Msg("matmul operand out of bounds".into()));
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every element the product reads lies within `lhs.data` / `rhs.data` (checked just
    // above) and `dst` holds exactly `m × n` row-major elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    };
    Ok(())
}

/// Runs `f` on the f32 elements of a contiguous CPU `[rows, cols]` weight.
fn with_weight<R>(w: &Tensor, f: impl FnOnce(Mat) -> Result<R>) -> Result<R> {
    let (rows, cols) = w.dims2()?;
    with_data(w, |data| f(Mat::new(data, rows, cols)?))
}

/// `(rows, features)` of an input whose last dimension holds the features.
fn rows_and_features(shape: &Shape) -> (usize, usize) {
    let k = shape.dims().last().copied().unwrap_or(1);
    (shape.elem_count() / k.max(1), k)
}

fn with_last_dim(shape: &Shape, n: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// `x Wᵀ` for a frozen `W: [out, in]`.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}

struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let (m, k) = rows_and_features(layout.shape());
        with_weight(&self.w, |w| {
            let mut y = vec![0f32; m * w.rows];
            matmul_into(&mut y, Mat::new(x, m, k)?, w.t(), 1.0, false)?;
            Ok((CpuStorage::F32(y), with_last_dim(layout.shape(), w.rows)))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (m, n) = rows_and_features(grad.shape());
        let dx = with_weight(&self.w, |w| {
            with_data(grad, |g| {
                let mut dx = vec![0f32; m * w.cols];
                matmul_into(&mut dx, Mat::new(g, m, n)?, w, 1.0, false)?;
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

/// `x Wᵀ + scale · (x Aᵀ) Bᵀ` for a frozen `W: [out, in]` and trained `A: [rank, in]`,
/// `B: [out, rank]` (PEFT's layouts).
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(a, b, LoraLinear { w: w.clone(), scale: scale as f32 })
}

struct LoraLinear {
    w: Tensor,
    scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "frozen-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = rows_and_features(lx.shape());
        let (rank, a_in) = la.shape().dims2()?;
        let x = Mat::new(input(sx, lx, self.name())?, m, k)?;
        let a = Mat::new(input(sa, la, self.name())?, rank, a_in)?;
        let (out, b_rank) = lb.shape().dims2()?;
        let b = Mat::new(input(sb, lb, self.name())?, out, b_rank)?;
        with_weight(&self.w, |w| {
            let mut u = vec![0f32; m * rank];
            matmul_into(&mut u, x, a.t(), 1.0, false)?;
            let mut y = vec![0f32; m * w.rows];
            matmul_into(&mut y, x, w.t(), 1.0, false)?;
            matmul_into(&mut y, Mat::new(&u, m, rank)?, b.t(), self.scale, true)?;
            Ok((CpuStorage::F32(y), with_last_dim(lx.shape(), w.rows)))
        })
    }

    /// With `u = x Aᵀ` and `v = g B`: `dx = g W + s · v A`, `dA = s · vᵀ x`, `dB = s · gᵀ u`.
    fn bwd(
        &self,
        x_t: &Tensor,
        a_t: &Tensor,
        b_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_and_features(x_t.shape());
        let ((rank, _), (out, _)) = (a_t.dims2()?, b_t.dims2()?);
        let s = self.scale;
        // A and B are small (rank × features): copies keep the borrows of the large operands
        // (x, the gradient, W) to one nesting.
        let (a, b) = (a_t.flatten_all()?.to_vec1::<f32>()?, b_t.flatten_all()?.to_vec1::<f32>()?);
        let (a, b) = (Mat::new(&a, rank, k)?, Mat::new(&b, out, rank)?);
        let (dx, da, db) = with_data(x_t, |x| {
            with_data(grad, |g| {
                with_weight(&self.w, |w| {
                    let (x, g) = (Mat::new(x, m, k)?, Mat::new(g, m, out)?);
                    let mut u = vec![0f32; m * rank];
                    matmul_into(&mut u, x, a.t(), 1.0, false)?;
                    let mut v = vec![0f32; m * rank];
                    matmul_into(&mut v, g, b, 1.0, false)?;
                    let (u, v) = (Mat::new(&u, m, rank)?, Mat::new(&v, m, rank)?);
                    let mut dx = vec![0f32; m * k];
                    matmul_into(&mut dx, g, w, 1.0, false)?;
                    matmul_into(&mut dx, v, a, s, true)?;
                    let mut da = vec![0f32; rank * k];
                    matmul_into(&mut da, v.t(), x, s, false)?;
                    let mut db = vec![0f32; out * rank];
                    matmul_into(&mut db, g.t(), u, s, false)?;
                    Ok((dx, da, db))
                })
            })
        })?;
        let dev = &Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dx, x_t.shape(), dev)?),
            Some(Tensor::from_vec(da, a_t.shape(), dev)?),
            Some(Tensor::from_vec(db, b_t.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops::tests::close;
    use super::*;
    use candle_core::Var;

    /// Value and the gradients of x, A and B against the same math in candle tensor ops.
    #[test]
    fn lora_linear_matches_its_composition() {
        let dev = &Device::Cpu;
        let (rows, inp, out, rank, scale) = (2 * 7, 13, 11, 3, 0.7);
        let var =
            |shape: (usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, dev).unwrap()).unwrap();
        let (x, a, b) = (var((rows, inp)), var((rank, inp)), var((out, rank)));
        let w = Tensor::randn(0f32, 1.0, (out, inp), dev).unwrap();
        let x3 = x.as_tensor().reshape((2, 7, inp)).unwrap();
        let ours = lora_linear(&x3, &w, a.as_tensor(), b.as_tensor(), scale).unwrap();
        assert_eq!(ours.dims(), &[2, 7, out]);
        let ours = ours.reshape((rows, out)).unwrap();
        let theirs = (x.as_tensor().matmul(&w.t().unwrap()).unwrap()
            + (x.as_tensor()
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                * scale)
                .unwrap())
        .unwrap();
        close(&ours, &theirs, 1e-5);
        let probe = Tensor::randn(0f32, 1.0, (rows, out), dev).unwrap();
        let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &a, &b] {
            close(g_ours.get(v.as_tensor()).unwrap(), g_theirs.get(v.as_tensor()).unwrap(), 1e-5);
        }
        // No gradient for the frozen weight.
        assert!(g_ours.get(&w).is_none());
    }

    #[test]
    fn frozen_matmul_gives_the_input_gradient_only() {
        let dev = &Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 9), dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 9), dev).unwrap();
        let ours = frozen_matmul(x.as_tensor(), &w).unwrap();
        let theirs = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        close(&ours, &theirs, 1e-6);
        let probe = Tensor::randn(0f32, 1.0, (5, 4), dev).unwrap();
        let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        close(g_ours.get(x.as_tensor()).unwrap(), g_theirs.get(x.as_tensor()).unwrap(), 1e-6);
        assert!(matmul_into(
            &mut [0f32; 3],
            Mat::new(&[0f32; 4], 2, 2).unwrap(),
            Mat::new(&[0f32; 4], 2, 2).unwrap(),
            1.0,
            false
        )
        .is_err());
    }
}
