//! What goes into the engine (`ValidRequest`: already tokenised and bounded) and what comes out
//! (`TokenEvent`s).

use std::time::Duration;

/// How the next token is chosen. Defaults are the neutral values (no penalty, no truncation).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps everything.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` × the top probability; 0 disables.
    pub min_p: f32,
    /// > 1 discourages any token already in the prompt or output (CTRL-style division).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated.
    pub frequency_penalty: f32,
    /// Same seed, same request → same tokens, whatever else shares the batch.
    pub seed: Option<u64>,
    /// Return this many alternatives per token with their log-probabilities.
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            top_logprobs: None,
        }
    }
}

/// When generation ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCriteria {
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these; the text returned ends before it.
    pub stop: Vec<String>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// A request the engine can run as is: tokenised, bounded, validated.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    /// The adapter the request runs with; `None` is the base.
    pub adapter: Option<AdapterChoice>,
}

/// How a request names its adapter.
#[derive(Debug, Clone)]
pub enum AdapterChoice {
    /// Already loaded and validated against the base (e.g. a directory given on the CLI).
    Loaded(std::sync::Arc<adapters::LoraAdapter>),
    /// By id, through the engine's adapter cache: the request waits in the queue (not in the
    /// batch) until the adapter is resident, then pins it with a lease until it finishes.
    Cached(adapters::AdapterId),
}

impl From<std::sync::Arc<adapters::LoraAdapter>> for AdapterChoice {
    fn from(a: std::sync::Arc<adapters::LoraAdapter>) -> Self {
        AdapterChoice::Loaded(a)
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_tokens`.
    Length,
    /// Produced an end-of-sequence token.
    Eos,
    /// The text reached one of the stop strings.
    StopString,
    /// The caller cancelled (or went away).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI name: `stop` for EOS and stop strings, `length` for the token limit.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos | FinishReason::StopString => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A candidate token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// The text this token completes (may be empty while a character or a possible stop
    /// string is pending).
    pub text: String,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<TokenLogprob>,
}

/// Timing and counts of a finished sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub reason: FinishReason,
    /// Text still held back when the sequence ended (flushed here).
    pub trailing_text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From admission to the first generated token.
    pub prefill_time: Duration,
    /// From the first generated token to the end.
    pub decode_time: Duration,
    /// How often the sequence was preempted and recomputed.
    pub preemptions: usize,
}

/// What the engine sends back for a request, in order: tokens, then exactly one `Finished` or
/// `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    Token(GeneratedToken),
    Finished(Completion),
    Failed(String),
}

impl SamplingParams {
    /// Rejects values the sampler cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|(_, message)| message)
    }

    /// [`Self::validate`], naming the parameter at fault (as the API's errors do).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                // Values beyond f32's range (1e308) arrive here as infinities.
                Err((name, format!("{name} must be a finite number within ±3.4e38")))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err(("temperature", format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(("top_p", format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(("min_p", format!("min_p must be in [0, 1], got {}", self.min_p)));
        }
        if self.repetition_penalty <= 0.0 {
            return Err((
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {}", self.repetition_penalty),
            ));
        }
        for (name, v) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(-2.0..=2.0).contains(&v) {
                return Err((name, format!("{name} must be in [-2, 2], got {v}")));
            }
        }
        if self.top_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(("logprobs", format!("logprobs must be at most {MAX_TOP_LOGPROBS}")));
        }
        Ok(())
    }
}

/// Most alternatives per token a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;
