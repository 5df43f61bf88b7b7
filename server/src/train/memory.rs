//! How much memory a training micro-batch holds at its peak, and the check that a run's largest
//! one fits in what the machine has before the run starts.
//!
//! Why: the trainer runs inside the server process, and an allocation that fails aborts the
//! process rather than unwinding, so a job whose batch is too large for the machine would take
//! serving down with it. Attention scores grow with the square of the sequence length (a single
//! 64k-token example needs terabytes), so `max_seq_len` and `batch_size` within their ranges are
//! not enough on their own.

use super::TrainError;
use crate::model::ModelConfig;

/// The share of the memory available at the start of a run that its largest micro-batch may
/// take: the rest stays for serving (KV cache pages touched later, new adapters).
const AVAILABLE_SHARE: f64 = 0.8;

/// Bytes one forward and backward pass over `seqs` sequences padded to `len` tokens holds at its
/// peak, beyond the model's weights. Per token and layer, ~`12 · hidden + 4 · intermediate`
/// floats kept for the backward pass, and `4 · vocab` for the logits; per query-key pair, two
/// floats per head and layer (scores and probabilities). Fitted to measured peaks of the default
/// model (2-4 sequences of 256-512 tokens; the estimate is 5-10 % above them).
pub fn micro_batch_bytes(cfg: &ModelConfig, seqs: usize, len: usize) -> u64 {
    let (seqs, len) = (seqs as u64, len as u64);
    let layers = cfg.num_layers as u64;
    let per_token = 4
        * (layers * (12 * cfg.hidden_size as u64 + 4 * cfg.intermediate_size as u64)
            + 4 * cfg.vocab_size as u64);
    let per_pair = 8 * layers * cfg.num_heads as u64;
    let tokens = seqs.saturating_mul(len);
    per_token.saturating_mul(tokens).saturating_add(per_pair.saturating_mul(tokens).saturating_mul(len))
}

/// Memory that can be allocated without swapping (Linux `MemAvailable`); `None` where unknown.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 =
        meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses a run whose largest micro-batch (`seqs` sequences of up to `len` tokens) would need
/// more than its share of `available` bytes; with `available` unknown, anything goes.
pub fn check_fits(
    cfg: &ModelConfig,
    seqs: usize,
    len: usize,
    available: Option<u64>,
) -> Result<(), TrainError> {
    let Some(available) = available else { return Ok(()) };
    let needed = micro_batch_bytes(cfg, seqs, len);
    let budget = (available as f64 * AVAILABLE_SHARE) as u64;
    if needed <= budget {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    Err(TrainError::Config(format!(
        "a micro-batch of {seqs} sequence(s) of {len} tokens needs ~{:.1} GiB for training, more than \
         the {:.1} GiB this run may use ({:.0} % of the {:.1} GiB available); lower the batch size \
         (gradient accumulation keeps the effective batch) or the maximum sequence length",
        gib(needed),
        gib(budget),
        AVAILABLE_SHARE * 100.0,
        gib(available)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;

    fn smollm2() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
        }
    }

    #[test]
    fn the_estimate_brackets_measured_peaks_and_grows_with_the_square_of_the_length() {
        let cfg = smollm2();
        // Peak RSS of `lorahost train --steps 1` on the default model, less its ~0.7 GB of
        // weights and runtime: 4 × 512 tokens 6.5 GB, 2 × 512 3.3 GB, 4 × 256 2.7 GB.
        for (seqs, len, measured) in [(4, 512, 6.5e9), (2, 512, 3.3e9), (4, 256, 2.7e9)] {
            let estimate = micro_batch_bytes(&cfg, seqs, len) as f64;
            assert!((measured..measured * 1.2).contains(&estimate), "{seqs} x {len}: {estimate:e}");
        }
        let (short, long) = (micro_batch_bytes(&cfg, 1, 8192), micro_batch_bytes(&cfg, 1, 65536));
        assert!(long > 50 * short, "{short} -> {long}");
        assert_eq!(micro_batch_bytes(&cfg, usize::MAX, usize::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn a_batch_beyond_the_available_memory_is_refused_with_what_to_change() {
        let cfg = smollm2();
        let gib = 1u64 << 30;
        assert!(check_fits(&cfg, 4, 512, Some(16 * gib)).is_ok());
        assert!(check_fits(&cfg, 1, 65536, None).is_ok(), "unknown memory: no check");
        let err = check_fits(&cfg, 1, 65536, Some(16 * gib)).expect_err("a 64k-token sequence").to_string();
        assert!(err.contains("1 sequence(s) of 65536 tokens") && err.contains("batch size"), "{err}");
        assert!(check_fits(&cfg, 4, 512, Some(4 * gib)).is_err(), "7 GB into 4 GiB");
    }
}
