//! OpenAI wire types for `/v1/completions` and `/v1/chat/completions`, and their validation
//! into engine requests: one `ValidRequest` per choice (prompts × `n`), tokenised and bounded.
//!
//! Fields OpenAI documents and lorahost cannot honour (`echo`, `suffix`, `logit_bias`,
//! `best_of` > `n`, tools) are refused by name rather than ignored; unknown fields are ignored,
//! as clients send extras.

use super::backend::Backend;
use super::error::ApiError;
use crate::chat::{check_roles, ChatMessage};
use crate::engine::{SamplingParams, StopCriteria, ValidRequest, MAX_TOP_LOGPROBS};
use serde::Deserialize;
use serde_json::Value;

/// Most choices one request may ask for (`n` × prompts).
pub const MAX_CHOICES: usize = 16;
/// Most stop strings per request.
pub const MAX_STOP: usize = 16;
/// Longest stop string: each is searched for in the pending text after every token, on the
/// engine thread, so its length is a cost every tenant's step pays.
pub const MAX_STOP_BYTES: usize = 1024;
/// `max_tokens` of a completion that does not say (OpenAI's default for completions).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping fields shared by both endpoints (OpenAI's plus vLLM-style extensions
/// `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`).
#[derive(Debug, Default, Deserialize)]
pub struct CommonFields {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub best_of: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub prompt: PromptField,
    /// Top alternatives per token (0 gives only the chosen token's logprob).
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Option<ContentField>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub tools: Option<Vec<Value>>,
}

/// What `logprobs` the response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    /// `/v1/completions`: `{tokens, token_logprobs, top_logprobs, text_offset}`.
    Completion,
    /// `/v1/chat/completions`: `{content: [{token, logprob, bytes, top_logprobs}]}`.
    Chat,
}

/// A request ready for the engine: one `ValidRequest` per choice, in choice-index order.
#[derive(Debug)]
pub struct Prepared {
    pub choices: Vec<ValidRequest>,
    /// Distinct prompts; each has `choices.len() / prompts` choices in a row.
    pub prompts: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: LogprobsFormat,
}

impl CompletionRequest {
    pub fn prepare(self, backend: &dyn Backend) -> Result<Prepared, ApiError> {
        if self.echo {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        let prompts: Vec<Vec<u32>> = match self.prompt {
            PromptField::Text(t) => vec![encode(backend, &t)?],
            PromptField::Texts(ts) => ts.iter().map(|t| encode(backend, t)).collect::<Result<_, _>>()?,
            PromptField::Tokens(ids) => vec![ids],
            PromptField::TokenLists(lists) => lists,
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        let logprobs = self.logprobs.map_or(LogprobsFormat::None, |_| LogprobsFormat::Completion);
        self.common.prepare(prompts, Some(DEFAULT_COMPLETION_TOKENS), self.logprobs, logprobs, backend)
    }
}

impl ChatRequest {
    pub fn prepare(self, backend: &dyn Backend) -> Result<Prepared, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools", "tools are not supported"));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let messages: Vec<ChatMessage> = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match m.content {
                    None => {
                        return Err(ApiError::invalid("messages", format!("messages[{i}] has no content")))
                    }
                    Some(ContentField::Text(t)) => t,
                    Some(ContentField::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), p.text) {
                                ("text", Some(t)) => text.push_str(&t),
                                (kind, _) => {
                                    return Err(ApiError::invalid(
                                        "messages",
                                        format!(
                                            "content parts of type `{kind}` are not supported (only text)"
                                        ),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                // OpenAI's newer name for the system role.
                let role = if m.role == "developer" { "system".to_string() } else { m.role };
                Ok(ChatMessage { role, content })
            })
            .collect::<Result<_, ApiError>>()?;
        check_roles(&messages).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let prompt = backend.chat_prompt(&messages).map_err(|e| ApiError::invalid("messages", e))?;
        let (top, format) = match (self.logprobs, self.top_logprobs) {
            (false, Some(n)) if n > 0 => {
                return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs: true"))
            }
            (false, _) => (None, LogprobsFormat::None),
            (true, n) => (Some(n.unwrap_or(0)), LogprobsFormat::Chat),
        };
        // Chat completions run to the end of the context unless told otherwise, as OpenAI's do.
        self.common.prepare(vec![prompt], None, top, format, backend)
    }
}

fn encode(backend: &dyn Backend, text: &str) -> Result<Vec<u32>, ApiError> {
    backend.encode(text).map_err(|e| ApiError::invalid("prompt", e))
}

impl CommonFields {
    fn prepare(
        self,
        prompts: Vec<Vec<u32>>,
        default_max_tokens: Option<usize>,
        top_logprobs: Option<usize>,
        logprobs: LogprobsFormat,
        backend: &dyn Backend,
    ) -> Result<Prepared, ApiError> {
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid("logit_bias", "logit_bias is not supported"));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 {
            return Err(ApiError::invalid("n", "n must be at least 1"));
        }
        if self.best_of.is_some_and(|b| b != n) {
            return Err(ApiError::invalid("best_of", "best_of other than n is not supported"));
        }
        if n.checked_mul(prompts.len()).is_none_or(|choices| choices > MAX_CHOICES) {
            return Err(ApiError::invalid(
                "n",
                format!("at most {MAX_CHOICES} choices (n × prompts) per request"),
            ));
        }
        if top_logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be at most {MAX_TOP_LOGPROBS}"),
            ));
        }
        let stop = match self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid("stop", format!("at most {MAX_STOP} stop strings")));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!("stop strings must be at most {MAX_STOP_BYTES} bytes"),
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
            top_logprobs,
        };
        sampling.check().map_err(|(param, message)| ApiError::invalid(param, message))?;
        let requested = self.max_completion_tokens.or(self.max_tokens).or(default_max_tokens);
        if requested == Some(0) {
            let param =
                if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
            return Err(ApiError::invalid(param, format!("{param} must be at least 1")));
        }
        let limit = backend.max_sequence_tokens();
        let n_prompts = prompts.len();
        let mut choices = Vec::with_capacity(n * prompts.len());
        for prompt in prompts {
            if prompt.is_empty() {
                return Err(ApiError::invalid("prompt", "the prompt is empty"));
            }
            let max_tokens = requested.unwrap_or_else(|| limit.saturating_sub(prompt.len()).max(1));
            for i in 0..n {
                // Choices of one seeded request differ from each other but repeat across calls.
                let seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                choices.push(ValidRequest {
                    prompt_ids: prompt.clone(),
                    sampling: SamplingParams { seed, ..sampling.clone() },
                    stop: StopCriteria { max_tokens, stop: stop.clone(), ignore_eos: self.ignore_eos },
                    adapter: None,
                });
            }
        }
        Ok(Prepared {
            choices,
            prompts: n_prompts,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            logprobs,
        })
    }
}
