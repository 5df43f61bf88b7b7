//! Training LoRA adapters on the resident base, as PEFT does it: the base frozen (dense f32),
//! only `A` and `B` of the targeted projections learned (`A` initialised as PEFT does, `B`
//! zero), AdamW with warmup and cosine decay, gradient clipping and accumulation, and the
//! result written as a PEFT adapter directory that lorahost and `peft` both load.

mod checkpoint;
pub mod data;
mod linear;
pub mod memory;
pub mod model;
mod ops;
pub mod optim;
mod plot;

use crate::base::Base;
use crate::model::{ModelError, MODULES};
use adapters::{BaseShape, LoraSite, SiteMatrices};
use candle_core::{Device, Tensor, Var};
use data::{DataError, Example};
use model::{Batch, LoraParam, TrainModel};
use optim::{AdamW, AdamWConfig};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Adapter(#[from] adapters::AdapterError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("cannot write {0}")]
    Write(String),
    #[error("training was cancelled")]
    Cancelled,
}

/// Which projections to adapt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Every linear projection of the decoder layers (PEFT's `all-linear`; the LM head is not
    /// adapted).
    AllLinear,
    /// Short module names (`q_proj`, `v_proj`...).
    Names(Vec<String>),
}

impl Targets {
    /// Parses `all-linear` or a comma-separated list of module names.
    pub fn parse(s: &str) -> Result<Self, TrainError> {
        if s == "all-linear" {
            return Ok(Self::AllLinear);
        }
        let names: Vec<String> =
            s.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
        if let Some(bad) = names.iter().find(|n| model::module_index(n).is_none()) {
            return Err(TrainError::Config(format!(
                "unknown target module `{bad}` (one of {} or all-linear)",
                MODULES.map(|m| m.rsplit('.').next().unwrap_or(m)).join(", ")
            )));
        }
        if names.is_empty() {
            return Err(TrainError::Config("no target modules".into()));
        }
        Ok(Self::Names(names))
    }

    /// Indices into `MODULES`, in `MODULES` order.
    pub(crate) fn modules(&self) -> Vec<usize> {
        match self {
            Self::AllLinear => (0..MODULES.len()).collect(),
            Self::Names(names) => (0..MODULES.len())
                .filter(|&m| names.iter().any(|n| model::module_index(n) == Some(m)))
                .collect(),
        }
    }
}

/// Everything a training run needs besides the base.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    /// Fraction of `data` held out for evaluation when `eval_data` is not given (0: none).
    pub eval_split: f64,
    pub out: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub targets: Targets,
    /// Train only these decoder layers (PEFT's `layers_to_transform`); `None`: all.
    pub layers: Option<Range<usize>>,
    /// Optimizer steps; when `None`, `epochs` passes over the data.
    pub steps: Option<usize>,
    pub epochs: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    /// Batch examples of similar length together (transformers' `group_by_length`): each epoch
    /// is shuffled, then every run of `LENGTH_GROUP_BATCHES` steps' examples is sorted by length,
    /// so a micro-batch pads little. The order stays random from one group to the next.
    pub group_by_length: bool,
    pub optimizer: AdamWConfig,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub eval_every: usize,
    /// Save the run's state every N steps (0: never) next to `out` (`<out>.checkpoint`).
    pub checkpoint_every: usize,
    /// Continue from the checkpoint of an interrupted run with the same configuration.
    pub resume: bool,
    pub seed: u64,
    /// Written into `adapter_config.json` as `base_model_name_or_path`.
    pub base_name: String,
}

impl TrainConfig {
    /// Refuses flags that cannot make a run on a base of this shape, before any work.
    fn validate(&self, shape: &BaseShape) -> Result<(), TrainError> {
        let num_layers = shape.num_layers;
        let bad = |m: String| Err(TrainError::Config(m));
        if self.rank == 0 {
            return bad("--rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("--alpha must be positive".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_seq_len < 2 {
            return bad("--batch-size and --grad-accum must be positive, --max-seq-len at least 2".into());
        }
        if !(self.optimizer.lr.is_finite() && self.optimizer.lr > 0.0) {
            return bad("--lr must be positive".into());
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return bad("--eval-split must be in [0, 1)".into());
        }
        if self.eval_split > 0.0 && self.eval_data.is_some() {
            return bad("give --eval-data or --eval-split, not both".into());
        }
        if !(self.optimizer.weight_decay.is_finite() && self.optimizer.weight_decay >= 0.0) {
            return bad("--weight-decay must be at least 0".into());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad("--max-grad-norm must be positive".into());
        }
        // Before any work: a run that cannot write its output should not train first.
        adapters::check_replaceable(&self.out)?;
        if self.steps == Some(0)
            || (self.steps.is_none() && self.epochs.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater))
        {
            return bad("train for at least one step (--steps or --epochs)".into());
        }
        if let Some(l) = &self.layers {
            if l.is_empty() || l.end > num_layers {
                return bad(format!(
                    "--layers {}-{} is not within the model's {num_layers} layers",
                    l.start,
                    l.end - 1
                ));
            }
        }
        // As the adapter loader would refuse it afterwards; an absurd rank would also not fit.
        let too_small = self
            .targets
            .modules()
            .into_iter()
            .map(|m| &shape.modules[m])
            .find(|m| self.rank > m.in_features.min(m.out_features));
        if let Some(m) = too_small {
            return bad(format!(
                "--rank {} exceeds the dimensions of {} ({} x {})",
                self.rank, m.path, m.out_features, m.in_features
            ));
        }
        Ok(())
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// The bytes of the adapter this run writes (`adapter_config.json` and
    /// `adapter_model.safetensors`, as the server counts an upload): what a push must find room
    /// for in the tenant's quota. Refuses bad flags first, as [`train`] would.
    pub fn adapter_upload_bytes(&self, shape: &BaseShape) -> Result<u64, TrainError> {
        self.validate(shape)?;
        let layers = self.layers.clone().unwrap_or(0..shape.num_layers);
        let modules = self.targets.modules();
        let sites = layers.flat_map(|l| modules.iter().map(move |&m| (l, m, self.rank)));
        let weights = adapters::weights_file_len(shape, sites)?;
        let config =
            serde_json::to_vec_pretty(&self.peft_config()).map_err(|e| TrainError::Write(e.to_string()))?;
        Ok(weights + config.len() as u64)
    }

    /// `adapter_config.json` as PEFT writes it for this run.
    pub fn peft_config(&self) -> serde_json::Value {
        let targets: Vec<&str> = self.targets.modules().into_iter().map(model::module_short_name).collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_name,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.rslora,
            "target_modules": targets,
            "layers_to_transform": self.layers.clone().map(|l| l.collect::<Vec<_>>()),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
        })
    }
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub examples: usize,
    pub truncated: usize,
    /// Mean training loss of each optimizer step.
    pub losses: Vec<f64>,
    /// `(step, mean eval loss)`.
    pub eval_losses: Vec<(usize, f64)>,
    /// Predictions in the loss (the tokens learned from).
    pub trained_tokens: usize,
    /// Tokens run through the model (every sequence's length, padding excluded).
    pub processed_tokens: usize,
    /// `processed_tokens` per second of training.
    pub tokens_per_second: f64,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Observes a run (a progress bar, a server job's events) and may stop it.
pub trait Progress {
    fn start(&mut self, total_steps: usize);
    fn step(&mut self, step: usize, loss: f64, lr: f64, tokens_per_second: f64);
    fn eval(&mut self, step: usize, loss: f64);
    /// Asked before every step: `true` ends the run with `TrainError::Cancelled`, writing nothing.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Ignores everything.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: usize) {}
    fn step(&mut self, _: usize, _: f64, _: f64, _: f64) {}
    fn eval(&mut self, _: usize, _: f64) {}
}

/// The LoRA parameters of a new adapter: `A ~ U(±1/√in)` (PEFT's Kaiming-uniform init with
/// `a = √5`), `B = 0`, from `seed`.
pub fn init_params(shape: &BaseShape, config: &TrainConfig) -> Result<Vec<LoraParam>, TrainError> {
    let layers = config.layers.clone().unwrap_or(0..shape.num_layers);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut params = Vec::new();
    for layer in layers {
        for module in config.targets.modules() {
            let m = &shape.modules[module];
            let bound = 1.0 / (m.in_features as f32).sqrt();
            let a: Vec<f32> =
                (0..config.rank * m.in_features).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, m.in_features), &Device::Cpu)?)?;
            let b = Var::zeros((m.out_features, config.rank), candle_core::DType::F32, &Device::Cpu)?;
            params.push(LoraParam { layer, module, a, b, scale: config.scale() });
        }
    }
    Ok(params)
}

/// Trains an adapter on `base` as `config` says and writes it to `config.out`.
pub fn train(
    base: &Base,
    config: &TrainConfig,
    progress: &mut dyn Progress,
) -> Result<TrainReport, TrainError> {
    let shape = base.model.base_shape();
    config.validate(&shape)?;
    let dataset = data::load(&config.data, base, config.max_seq_len)?;
    let (mut examples, truncated) = (dataset.examples, dataset.truncated);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let eval: Vec<Example> = match &config.eval_data {
        Some(path) => data::load(path, base, config.max_seq_len)?.examples,
        None if config.eval_split > 0.0 && examples.len() > 1 => {
            examples.shuffle(&mut rng);
            let n =
                ((examples.len() as f64 * config.eval_split).round() as usize).clamp(1, examples.len() - 1);
            examples.split_off(examples.len() - n)
        }
        None => Vec::new(),
    };
    let per_step = config.batch_size * config.grad_accum;
    let total_steps = config.steps.unwrap_or_else(|| {
        ((examples.len() as f64 * config.epochs) / per_step as f64).ceil().max(1.0) as usize
    });

    let max_len = examples.iter().chain(&eval).map(|e| e.ids.len()).max().unwrap_or(1);
    // The largest micro-batch could hold the longest sequences, padded to the longest of all.
    let seqs = config.batch_size.min(examples.len().max(eval.len())).max(1);
    memory::check_fits(base.model.config(), seqs, max_len, memory::available_bytes())?;
    let model = TrainModel::new(&base.model, init_params(&shape, config)?, max_len)?;
    let mut opt = AdamW::new(config.optimizer, &model.vars())?;

    let start = Instant::now();
    let grouping = config
        .group_by_length
        .then(|| (per_step * LENGTH_GROUP_BATCHES, examples.iter().map(|e| e.ids.len()).collect()));
    let mut order = EpochOrder::new(examples.len(), grouping);
    let mut report = TrainReport {
        steps: total_steps,
        examples: examples.len(),
        truncated,
        // Not sized by `total_steps`: that is the caller's number, and may be absurd.
        losses: Vec::new(),
        eval_losses: Vec::new(),
        trained_tokens: 0,
        processed_tokens: 0,
        tokens_per_second: 0.0,
        seconds: 0.0,
        peak_rss_bytes: None,
    };
    let ckpt = checkpoint::path_for(&config.out);
    let fingerprint = checkpoint::fingerprint(config, total_steps, &config.data)?;
    let mut first_step = 0;
    // Training time of the run before a resume.
    let mut earlier_seconds = 0.0;
    if config.resume {
        let state = checkpoint::load(&ckpt, &fingerprint, &model, &mut opt)?;
        first_step = state.step;
        report.losses = state.losses;
        report.eval_losses = state.eval_losses;
        (report.trained_tokens, report.processed_tokens) = (state.trained_tokens, state.processed_tokens);
        earlier_seconds = state.seconds;
        // Replay the data order of the steps already done, so the run continues as if unbroken.
        for _ in 0..first_step * per_step {
            order.next(&mut rng);
        }
    }
    progress.start(total_steps);
    for step in first_step..total_steps {
        if progress.cancelled() {
            return Err(TrainError::Cancelled);
        }
        let picks: Vec<usize> = (0..per_step).map(|_| order.next(&mut rng)).collect();
        let targets: usize = picks.iter().map(|&i| examples[i].targets()).sum();
        let batches = picks
            .chunks(config.batch_size)
            .map(|mb| batch_of(&examples, mb))
            .collect::<Result<Vec<_>, _>>()?;
        let lr = config.optimizer.lr * optim::cosine_with_warmup(step, config.warmup_steps, total_steps);
        let loss_sum = optimizer_step(&model, &mut opt, &batches, lr, config.max_grad_norm)?.loss;
        report.trained_tokens += targets;
        report.processed_tokens += picks.iter().map(|&i| examples[i].ids.len()).sum::<usize>();
        report.losses.push(loss_sum);
        let tps =
            report.processed_tokens as f64 / (earlier_seconds + start.elapsed().as_secs_f64()).max(1e-9);
        progress.step(step + 1, loss_sum, lr, tps);
        let last = step + 1 == total_steps;
        if !eval.is_empty() && ((config.eval_every > 0 && (step + 1) % config.eval_every == 0) || last) {
            let loss = eval_loss(&model, &eval, config.batch_size)?;
            report.eval_losses.push((step + 1, loss));
            progress.eval(step + 1, loss);
        }
        if config.checkpoint_every > 0 && (step + 1) % config.checkpoint_every == 0 && !last {
            let state = checkpoint::State {
                step: step + 1,
                losses: report.losses.clone(),
                eval_losses: report.eval_losses.clone(),
                trained_tokens: report.trained_tokens,
                processed_tokens: report.processed_tokens,
                seconds: earlier_seconds + start.elapsed().as_secs_f64(),
            };
            checkpoint::save(&ckpt, &fingerprint, &state, &model, &opt)?;
        }
    }
    report.seconds = earlier_seconds + start.elapsed().as_secs_f64();
    report.tokens_per_second = report.processed_tokens as f64 / report.seconds.max(1e-9);
    report.peak_rss_bytes = peak_rss_bytes();
    let log = serde_json::json!({"config": config.peft_config(), "report": report});
    let log = serde_json::to_vec_pretty(&log).map_err(|e| TrainError::Write(e.to_string()))?;
    // The log and the chart go into the adapter's directory before it is published, so after a
    // crash it is either the previous one or the whole new one.
    let extras = |staged: &std::path::Path| {
        std::fs::write(staged.join(LOG_FILE), &log)
            .map_err(|e| adapters::AdapterError::Io(format!("{LOG_FILE}: {e}")))?;
        // The chart is a convenience: failing to draw it does not fail a finished run.
        if let Err(e) = plot::write_loss_curve(&staged.join(CURVE_FILE), &report.losses, &report.eval_losses)
        {
            tracing::warn!(error = %e, "the loss curve was not drawn");
            let _ = std::fs::remove_file(staged.join(CURVE_FILE));
        }
        Ok(())
    };
    write_adapter_with(&shape, config, model.params(), extras)?;
    checkpoint::remove(&ckpt);
    Ok(report)
}

/// One optimizer step's outcome.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// Mean loss per trained token over the step's batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The mean loss per trained token over `batches` and its gradient for every variable of
/// `model` (in [`TrainModel::vars`] order): each batch's mean is weighted by its share of the
/// step's tokens, so splitting a step into micro-batches (accumulation) changes nothing.
pub fn gradients(model: &TrainModel, batches: &[Batch]) -> Result<(f64, Vec<Tensor>), TrainError> {
    let vars = model.vars();
    let targets: usize = batches.iter().map(|b| b.predictions).sum();
    if targets == 0 {
        return Err(TrainError::Config("a step without a trained token".into()));
    }
    let mut grads: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_, _>>()?;
    let mut loss_sum = 0f64;
    for batch in batches.iter().filter(|b| b.predictions > 0) {
        let weight = batch.predictions as f64 / targets as f64;
        let loss = model.loss(batch)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * weight;
        let store = (loss * weight)?.backward()?;
        for (acc, v) in grads.iter_mut().zip(&vars) {
            if let Some(g) = store.get(v.as_tensor()) {
                *acc = (&*acc + g)?;
            }
        }
    }
    Ok((loss_sum, grads))
}

/// Gradients over `batches`, clipped to `max_grad_norm`, then one AdamW update at `lr`.
pub fn optimizer_step(
    model: &TrainModel,
    opt: &mut AdamW,
    batches: &[Batch],
    lr: f64,
    max_grad_norm: f64,
) -> Result<StepOutcome, TrainError> {
    let (loss, mut grads) = gradients(model, batches)?;
    let grad_norm = optim::clip_grad_norm(&mut grads, max_grad_norm)?;
    opt.step(&model.vars(), &grads, lr)?;
    Ok(StepOutcome { loss, grad_norm })
}

/// Written next to the adapter's files.
pub const LOG_FILE: &str = "training_log.json";
pub const CURVE_FILE: &str = "loss_curve.png";

/// `path` appears whole or not at all (`adapters::durable::write_atomically`).
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), TrainError> {
    adapters::durable::write_atomically(path, bytes).map_err(|e| TrainError::Write(e.to_string()))
}

/// Writes the trained parameters as a PEFT adapter directory (atomically).
pub fn write_adapter(
    shape: &BaseShape,
    config: &TrainConfig,
    params: &[LoraParam],
) -> Result<(), TrainError> {
    write_adapter_with(shape, config, params, |_| Ok(()))
}

/// [`write_adapter`], with `extras` adding files to the directory before it is published.
fn write_adapter_with(
    shape: &BaseShape,
    config: &TrainConfig,
    params: &[LoraParam],
    extras: impl FnOnce(&std::path::Path) -> Result<(), adapters::AdapterError>,
) -> Result<(), TrainError> {
    let sites = params
        .iter()
        .map(|p| {
            let (a, b) = model::param_values(p)?;
            Ok(LoraSite {
                layer: p.layer,
                module: p.module,
                rank: config.rank,
                scale: p.scale as f32,
                matrices: SiteMatrices::F32 { a, b },
                magnitude: None,
                dora_factor: None,
            })
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    adapters::write_adapter_dir_with(&config.out, &config.peft_config(), &sites, shape, extras)?;
    Ok(())
}

/// Mean loss per trained token over `examples`.
fn eval_loss(model: &TrainModel, examples: &[Example], batch_size: usize) -> Result<f64, TrainError> {
    let idx: Vec<usize> = (0..examples.len()).collect();
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in idx.chunks(batch_size) {
        let batch = batch_of(examples, chunk)?;
        sum += model.loss(&batch)?.to_scalar::<f32>()? as f64 * batch.predictions as f64;
        n += batch.predictions;
    }
    Ok(sum / n.max(1) as f64)
}

fn batch_of(examples: &[Example], picks: &[usize]) -> Result<Batch, TrainError> {
    let items: Vec<(&[u32], &[bool])> =
        picks.iter().map(|&i| (examples[i].ids.as_slice(), examples[i].trained.as_slice())).collect();
    Batch::new(&items)
}

/// Steps whose examples `group_by_length` sorts together (`batch_size × grad_accum × 50`
/// examples; transformers sorts "megabatches" of 50 batches): large enough that neighbours
/// have similar lengths, small enough that the order stays well mixed.
pub const LENGTH_GROUP_BATCHES: usize = 50;

/// Visits the examples in a fresh random order every epoch; with length groups, every run of
/// `group` consecutive picks is sorted by length, longest first.
struct EpochOrder {
    order: Vec<usize>,
    at: usize,
    /// `(group size, each example's length)` when grouping by length.
    grouping: Option<(usize, Vec<usize>)>,
}

impl EpochOrder {
    fn new(n: usize, grouping: Option<(usize, Vec<usize>)>) -> Self {
        Self { order: (0..n).collect(), at: n, grouping }
    }

    fn next(&mut self, rng: &mut ChaCha8Rng) -> usize {
        if self.at >= self.order.len() {
            self.order.shuffle(rng);
            if let Some((group, lengths)) = &self.grouping {
                for chunk in self.order.chunks_mut((*group).max(1)) {
                    chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                }
            }
            self.at = 0;
        }
        self.at += 1;
        self.order[self.at - 1]
    }
}

/// The process's peak resident set (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(order: &mut EpochOrder, rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
        (0..n).map(|_| order.next(rng)).collect()
    }

    #[test]
    fn length_groups_cover_every_example_once_per_epoch_sorted_within_each_group() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 91 + 2).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut order = EpochOrder::new(lengths.len(), Some((20, lengths.clone())));
        let first = epoch(&mut order, &mut rng, lengths.len());
        let second = epoch(&mut order, &mut rng, lengths.len());
        for picks in [&first, &second] {
            let mut seen = picks.clone();
            seen.sort();
            assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>(), "each example once per epoch");
            for group in picks.chunks(20) {
                assert!(group.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]), "sorted, longest first");
            }
        }
        assert_ne!(first, second, "every epoch is a new order");
        // Batches of 4 taken in this order pad far less than in a plain shuffle.
        let padding = |picks: &[usize]| -> usize {
            picks
                .chunks(4)
                .map(|b| {
                    b.iter().map(|&i| lengths[i]).max().unwrap_or(0) * b.len()
                        - b.iter().map(|&i| lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let mut plain = EpochOrder::new(lengths.len(), None);
        let shuffled = epoch(&mut plain, &mut ChaCha8Rng::seed_from_u64(3), lengths.len());
        assert!(padding(&first) * 3 < padding(&shuffled), "{} vs {}", padding(&first), padding(&shuffled));
    }
}
