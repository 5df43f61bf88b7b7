//! Rotary position embedding in the "rotate_half" convention (GPT-NeoX, Hugging Face Llama),
//! with angles rounded exactly as transformers computes them in f32.

use rayon::prelude::*;

use crate::KernelError;

/// Rotary embedding, "rotate_half" convention: in each head, the pair `(j, j + head_dim/2)` for
/// `j < head_dim/2` is rotated by the angle `pos * inv_freq[j]`, `inv_freq[j] = theta^(-2j/head_dim)`.
///
/// Rounding follows Hugging Face transformers in f32: `inv_freq = 1 / theta^((2j as f32) / d)`
/// (the power rounded to f32, then an f32 division), `angle = (pos as f32) * inv_freq` in f32,
/// then `cos`/`sin` of that f32 angle (here evaluated in f64 and rounded, i.e. correctly rounded).
/// Values are tabulated for positions `< max_positions`; later positions are computed on the fly
/// with the same rounding, so results do not depend on `max_positions`.
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    inv_freq: Vec<f32>,
    max_positions: usize,
    /// `[max_positions][head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for `head_dim` (must be even and non-zero for [`Rope::apply`] to accept it) and
    /// base `theta`, precomputed for positions `0..max_positions` (`max_positions * head_dim`
    /// floats).
    ///
    /// # Panics
    /// If the table size overflows `usize`.
    pub fn new(head_dim: usize, theta: f32, max_positions: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|j| {
                let e = (2 * j) as f32 / head_dim as f32;
                let p = (theta as f64).powf(e as f64) as f32;
                1.0 / p
            })
            .collect();
        Self::from_inv_freq_with_dim(head_dim, inv_freq, max_positions)
    }

    /// A rope with explicit inverse frequencies (e.g. the Llama-3 scaled ones a checkpoint's
    /// `rope_scaling` yields); `head_dim = 2 * inv_freq.len()`.
    ///
    /// # Panics
    /// If the table size overflows `usize`.
    pub fn from_inv_freq(inv_freq: Vec<f32>, max_positions: usize) -> Self {
        Self::from_inv_freq_with_dim(2 * inv_freq.len(), inv_freq, max_positions)
    }

    fn from_inv_freq_with_dim(head_dim: usize, inv_freq: Vec<f32>, max_positions: usize) -> Self {
        let half = inv_freq.len();
        let n = max_positions.checked_mul(half).expect("rope table size overflows usize");
        let mut cos = vec![0.0; n];
        let mut sin = vec![0.0; n];
        if half > 0 {
            for (pos, (c, s)) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).enumerate() {
                fill_angles(&inv_freq, pos, c, s);
            }
        }
        Self { head_dim, inv_freq, max_positions, cos, sin }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions served from the precomputed table.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `cos` and `sin` for positions `0..len`, each `[len][head_dim/2]` row-major, rounded as
    /// [`Rope::apply`] rounds them (for code that rotates with tensor ops, e.g. training).
    pub fn cos_sin(&self, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (vec![0.0; len * half], vec![0.0; len * half]);
        if half > 0 {
            for (pos, (c, s)) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).enumerate() {
                fill_angles(&self.inv_freq, pos, c, s);
            }
        }
        (cos, sin)
    }

    /// Rotates every head of every row in place: `x` is `[rows, n_heads*head_dim]`, row `r` at
    /// position `positions[r]`. For `j < head_dim/2`, with `a = x[j]`, `b = x[j + head_dim/2]`:
    /// `x[j] = a*cos - b*sin`, `x[j + head_dim/2] = b*cos + a*sin`.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, positions: &[usize]) -> Result<(), KernelError> {
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(2) {
            return Err(KernelError::Shape(format!("rope head_dim must be even and non-zero, got {d}")));
        }
        let width = n_heads * d;
        if n_heads == 0 || x.len() != positions.len() * width {
            return Err(KernelError::Shape(format!(
                "rope: x has {} floats, expected {} rows x {n_heads} heads x {d}",
                x.len(),
                positions.len()
            )));
        }
        let rotate_row = |(row, &pos): (&mut [f32], &usize)| self.rotate_row(row, pos);
        // Only large batches (prefill) are worth the pool's wake-up cost.
        if x.len() >= 1 << 16 {
            x.par_chunks_mut(width).zip(positions.par_iter()).for_each(rotate_row);
        } else {
            x.chunks_mut(width).zip(positions).for_each(rotate_row);
        }
        Ok(())
    }

    fn rotate_row(&self, row: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let mut buf_c;
        let mut buf_s;
        let (c, s): (&[f32], &[f32]) = if pos < self.max_positions {
            (&self.cos[pos * half..][..half], &self.sin[pos * half..][..half])
        } else {
            buf_c = vec![0.0; half];
            buf_s = vec![0.0; half];
            fill_angles(&self.inv_freq, pos, &mut buf_c, &mut buf_s);
            (&buf_c, &buf_s)
        };
        for head in row.chunks_exact_mut(2 * half) {
            let (x1, x2) = head.split_at_mut(half);
            for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(c).zip(s) {
                let (x, y) = (*a, *b);
                *a = x * c - y * s;
                *b = y * c + x * s;
            }
        }
    }
}

/// cos/sin of `(pos as f32) * inv_freq[j]` (f32 product, as transformers does).
fn fill_angles(inv_freq: &[f32], pos: usize, c: &mut [f32], s: &mut [f32]) {
    let p = pos as f32;
    for ((&f, c), s) in inv_freq.iter().zip(c).zip(s) {
        let angle = (p * f) as f64;
        *c = angle.cos() as f32;
        *s = angle.sin() as f32;
    }
}
