//! `lorahost train`: fine-tunes a LoRA adapter on the base from a JSONL file and writes it as a
//! PEFT adapter directory (with `training_log.json` beside the weights).

use super::adapters::PushTarget;
use super::ModelArgs;
use crate::base::Base;
use crate::train::optim::AdamWConfig;
use crate::train::{Progress, Targets, TrainConfig};
use anyhow::Context;
use clap::Args;
use std::ops::Range;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data, JSONL: {"messages": [...]} (loss on assistant turns), {"prompt",
    /// "completion"} (loss on the completion) or {"text"} (loss on everything).
    #[arg(long)]
    pub data: PathBuf,
    /// Where the PEFT adapter directory is written: a new or empty directory, or an adapter
    /// directory, which is replaced atomically (anything else is refused).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Scale by alpha/sqrt(rank) (rsLoRA) instead of alpha/rank.
    #[arg(long)]
    pub rslora: bool,
    /// Projections to adapt: all-linear, or a comma-separated list (q_proj,k_proj,v_proj,o_proj,
    /// gate_proj,up_proj,down_proj).
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Train only decoder layers A to B inclusive (the early layers stay as they are).
    #[arg(long, value_name = "A-B")]
    pub layers: Option<String>,
    /// Optimizer steps (default: --epochs passes over the data).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 3.0)]
    pub epochs: f64,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longer examples keep their first tokens.
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Batch examples of similar length together, so batches carry little padding.
    #[arg(long)]
    pub group_by_length: bool,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Evaluation data (same formats); without it, --eval-split holds out part of --data.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0.0)]
    pub eval_split: f64,
    /// Evaluate every N steps (and always at the end, when there is evaluation data).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Save the run's state every N steps (beside --out, as <out>.checkpoint); 0: never.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue an interrupted run from its checkpoint (same data and flags).
    #[arg(long)]
    pub resume: bool,
    /// Same seed, same data, same flags: the same adapter.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// After training, upload the adapter to this running server (e.g. http://127.0.0.1:8080);
    /// it is servable when `train` exits.
    #[arg(long, value_name = "URL", requires = "name")]
    pub push: Option<String>,
    /// The adapter name to push under (in the API key's tenant).
    #[arg(long, requires = "push")]
    pub name: Option<String>,
    /// API key for --push (sent as `Authorization: Bearer KEY`).
    #[arg(long, env = "LORAHOST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Parses `A-B` (inclusive) into `A..B+1`.
fn parse_layers(s: &str) -> anyhow::Result<Range<usize>> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: usize = a.trim().parse().with_context(|| format!("--layers {s}: expected A-B"))?;
    let b: usize = b.trim().parse().with_context(|| format!("--layers {s}: expected A-B"))?;
    anyhow::ensure!(a <= b, "--layers {s}: the first layer comes after the last");
    Ok(a..b + 1)
}

/// A progress bar with the loss, learning rate and throughput.
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn start(&mut self, total_steps: usize) {
        self.0.set_length(total_steps as u64);
    }
    fn step(&mut self, step: usize, loss: f64, lr: f64, tokens_per_second: f64) {
        self.0.set_position(step as u64);
        self.0.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {tokens_per_second:.0} tok/s"));
    }
    fn eval(&mut self, step: usize, loss: f64) {
        self.0.println(format!("step {step}: eval loss {loss:.4}"));
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let push = match (&args.push, &args.name) {
        (Some(server), Some(name)) => {
            Some(PushTarget { server: server.clone(), api_key: args.api_key.clone(), name: name.clone() })
        }
        _ => None,
    };
    if let Some(target) = &push {
        target.check()?;
    }
    args.model.init_threads()?;
    let path = args.model.resolve()?;
    let base = Base::load(&path, args.model.dtype).with_context(|| format!("loading {}", path.display()))?;
    let config = TrainConfig {
        data: args.data,
        eval_data: args.eval_data,
        eval_split: args.eval_split,
        out: args.out,
        rank: args.rank,
        alpha: args.alpha,
        rslora: args.rslora,
        targets: Targets::parse(&args.targets)?,
        layers: args.layers.as_deref().map(parse_layers).transpose()?,
        steps: args.steps,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_seq_len: args.max_seq_len,
        group_by_length: args.group_by_length,
        optimizer: AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() },
        warmup_steps: args.warmup_steps,
        max_grad_norm: args.max_grad_norm,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
        seed: args.seed,
        base_name: base.name.clone(),
    };
    if let Some(target) = &push {
        target.check_room(config.adapter_upload_bytes(&base.model.base_shape())?)?;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} step {pos}/{len} {msg} [{elapsed_precise}, eta {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // On a worker of the global pool, so the parallel ops inside join in their own work instead
    // of handing it to the pool and sleeping until it is done (two context switches each).
    let report = rayon::scope(|_| crate::train::train(&base, &config, &mut Bar(bar.clone())))?;
    bar.finish();
    eprintln!(
        "trained {} steps on {} examples ({} cut to --max-seq-len) in {:.1} s, {:.0} tokens/s; final loss {:.4}{}; peak memory {}",
        report.steps,
        report.examples,
        report.truncated,
        report.seconds,
        report.tokens_per_second,
        report.losses.last().copied().unwrap_or(f64::NAN),
        report.eval_losses.last().map(|(_, l)| format!(", eval loss {l:.4}")).unwrap_or_default(),
        report.peak_rss_bytes.map(|b| format!("{} MiB", b >> 20)).unwrap_or_else(|| "unknown".into()),
    );
    if let Some(target) = &push {
        let reply = target.push(&config.out)?;
        eprintln!(
            "pushed to {} as {} (generation {})",
            target.server,
            reply["id"].as_str().unwrap_or(&target.name),
            reply["generation"]
        );
    }
    println!("{}", config.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_layers;

    #[test]
    fn layer_ranges() {
        assert_eq!(parse_layers("20-29").unwrap(), 20..30);
        assert_eq!(parse_layers("3").unwrap(), 3..4);
        assert!(parse_layers("5-2").is_err());
        assert!(parse_layers("a-b").is_err());
    }
}
