//! The optimisation step as PyTorch and Hugging Face define it: AdamW with decoupled weight
//! decay (`torch.optim.AdamW`), global-norm gradient clipping (`clip_grad_norm_`), and a linear
//! warmup then cosine decay of the learning rate (`get_cosine_schedule_with_warmup`).

use super::TrainError;
use candle_core::{Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    config: AdamWConfig,
    steps: u64,
    /// First and second moments, one per variable.
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, vars: &[&Var]) -> Result<Self, TrainError> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(Self { config, steps: 0, moments })
    }

    /// One update of every variable with its gradient at learning rate `lr`:
    /// `p ← p(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        let c = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for ((var, g), (m, v)) in vars.iter().zip(grads).zip(&mut self.moments) {
            let mut p = var.as_tensor().clone();
            if c.weight_decay != 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// The state to checkpoint: the step count and both moments of every variable.
    pub fn state(&self) -> (u64, &[(Tensor, Tensor)]) {
        (self.steps, &self.moments)
    }

    /// Restores a checkpointed state (same variables, same order).
    pub fn restore(&mut self, steps: u64, moments: Vec<(Tensor, Tensor)>) -> Result<(), TrainError> {
        if moments.len() != self.moments.len() {
            return Err(TrainError::Checkpoint("optimizer state does not match the adapter".into()));
        }
        self.steps = steps;
        self.moments = moments;
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (as torch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1); returns the norm before
/// clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainError> {
    let mut sum = 0f64;
    for g in grads.iter() {
        sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sum.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// Learning-rate factor at optimizer step `step` (0-based) of `total`: `step / warmup` during
/// warmup, then `0.5 · (1 + cos(π · progress))`.
pub fn cosine_with_warmup(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(cosine_with_warmup(0, 10, 100), 0.0);
        assert!((cosine_with_warmup(5, 10, 100) - 0.5).abs() < 1e-12);
        assert!((cosine_with_warmup(10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_with_warmup(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(cosine_with_warmup(100, 10, 100).abs() < 1e-12);
        assert_eq!(cosine_with_warmup(0, 0, 10), 1.0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = &Device::Cpu;
        let mut g = vec![Tensor::new(&[3f32, 0.0], dev).unwrap(), Tensor::new(&[4f32], dev).unwrap()];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let after: f32 =
            g.iter().map(|t| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sum();
        assert!((after.sqrt() - 1.0).abs() < 1e-5);
    }

    /// Two steps on a scalar against the formula worked by hand.
    #[test]
    fn adamw_matches_the_torch_update() {
        let dev = &Device::Cpu;
        let var = Var::new(&[1.0f32], dev).unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.01, ..Default::default() };
        let mut opt = AdamW::new(cfg, &[&var]).unwrap();
        let (mut p, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for (t, g) in [(1, 0.5f64), (2, -0.25)] {
            opt.step(&[&var], &[Tensor::new(&[g as f32], dev).unwrap()], 0.1).unwrap();
            p *= 1.0 - 0.1 * 0.01;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let denom = v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            p -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - p).abs() < 1e-6, "{got} vs {p}");
    }
}
