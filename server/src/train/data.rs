//! Training data: JSONL in three shapes, turned into token ids and a per-token "trained" mask.
//!
//! - `{"messages": [...]}` (OpenAI's fine-tuning chat format): rendered with the model's chat
//!   template exactly as serving renders it; the loss covers the assistant turns only (each
//!   turn's text as the template renders it, end-of-turn marker included).
//! - `{"prompt": "...", "completion": "..."}`: the loss covers the completion and an EOS.
//! - `{"text": "..."}`: the loss covers every token and an EOS.
//!
//! The whole file is checked before training starts; every error names its line.

use crate::base::Base;
use crate::chat::{ChatMessage, ChatTemplate};
use std::path::Path;

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `trained[t]`: token `t` is a target of the loss.
    pub trained: Vec<bool>,
}

impl Example {
    /// Predictions this example contributes to the loss.
    pub fn targets(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// The examples of a file, and how many were cut to `max_seq_len`.
#[derive(Debug)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub truncated: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} line {line}: {reason}")]
    Line { path: String, line: usize, reason: String },
    #[error("{path} holds no training examples")]
    Empty { path: String },
}

enum Record {
    Chat { messages: Vec<ChatMessage> },
    Completion { prompt: String, completion: String },
    Text { text: String },
}

const FORMATS: &str = r#"{"messages": [...]}, {"prompt": "...", "completion": "..."} or {"text": "..."}"#;

/// One line's record, told apart by its keys: exactly one of the three formats and nothing
/// else (a line mixing them would be ambiguous), each field of its JSON type; every error
/// names the field.
fn parse_record(line: &str) -> Result<Record, String> {
    use serde_json::Value;
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(map) = value else {
        return Err(format!("not a JSON object; expected {FORMATS}"));
    };
    let (format, fields): (&str, &[&str]) = if map.contains_key("messages") {
        ("chat", &["messages"])
    } else if map.contains_key("prompt") || map.contains_key("completion") {
        ("prompt/completion", &["prompt", "completion"])
    } else if map.contains_key("text") {
        ("text", &["text"])
    } else {
        return Err(format!("not a training record; expected {FORMATS}"));
    };
    if let Some(extra) = map.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(format!(
            "unexpected field `{extra}` in a {format} record (one format per line: {FORMATS})"
        ));
    }
    let string = |key: &str| match map.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("`{key}` must be a string, not {other}")),
        None => Err(format!("`{key}` is missing")),
    };
    match format {
        "chat" => serde_json::from_value(map["messages"].clone())
            .map(|messages| Record::Chat { messages })
            .map_err(|e| format!("`messages`: {e}")),
        "text" => Ok(Record::Text { text: string("text")? }),
        _ => Ok(Record::Completion { prompt: string("prompt")?, completion: string("completion")? }),
    }
}

/// Reads and tokenizes `path`; sequences longer than `max_seq_len` keep their first
/// `max_seq_len` tokens. Fails on the first bad line, naming it.
pub fn load(path: &Path, base: &Base, max_seq_len: usize) -> Result<Dataset, DataError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::Read { path: shown.clone(), reason: e.to_string() })?;
    let mut examples = Vec::new();
    let mut truncated = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| DataError::Line { path: shown.clone(), line: i + 1, reason };
        let record = parse_record(line).map_err(bad)?;
        let mut ex = tokenize(&record, base).map_err(bad)?;
        if ex.ids.len() > max_seq_len {
            ex.ids.truncate(max_seq_len);
            ex.trained.truncate(max_seq_len);
            truncated += 1;
        }
        if ex.targets() == 0 {
            return Err(bad(format!(
                "no token to learn within the first {max_seq_len} tokens (raise --max-seq-len, or check the assistant turns)"
            )));
        }
        examples.push(ex);
    }
    if examples.is_empty() {
        return Err(DataError::Empty { path: shown });
    }
    Ok(Dataset { examples, truncated })
}

fn tokenize(record: &Record, base: &Base) -> Result<Example, String> {
    let tok = &base.tokenizer;
    let eos = tok.eos_token_ids.first().copied().ok_or("the tokenizer has no EOS token")?;
    let (text, spans, add_eos) = match record {
        Record::Chat { messages } => {
            let template = base.chat_template.as_ref().ok_or("the model has no chat template")?;
            let (text, spans) = assistant_spans(template, messages)?;
            (text, spans, false)
        }
        Record::Completion { prompt, completion } => {
            if completion.is_empty() {
                return Err("empty completion".into());
            }
            (
                format!("{prompt}{completion}"),
                std::iter::once(prompt.len()..prompt.len() + completion.len()).collect(),
                true,
            )
        }
        Record::Text { text } => {
            if text.is_empty() {
                return Err("empty text".into());
            }
            (text.clone(), std::iter::once(0..text.len()).collect(), true)
        }
    };
    let (mut ids, offsets) = tok.encode_with_offsets(&text).map_err(|e| e.to_string())?;
    let mut trained: Vec<bool> =
        offsets.iter().map(|&(start, end)| end > start && spans.iter().any(|s| s.contains(&start))).collect();
    if add_eos {
        ids.push(eos);
        trained.push(true);
    }
    Ok(Example { ids, trained })
}

/// The conversation rendered for training, and the byte ranges of its assistant turns: turn `i`
/// is what rendering `messages[..=i]` adds to rendering `messages[..i]` with the generation
/// prompt.
fn assistant_spans(
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<(String, Vec<std::ops::Range<usize>>), String> {
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("no assistant message to learn from".into());
    }
    let render = |msgs: &[ChatMessage], gen: bool| template.render_with(msgs, gen).map_err(|e| e.to_string());
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for i in (0..messages.len()).filter(|&i| messages[i].role == "assistant") {
        let prefix = render(&messages[..i], true)?;
        let upto = render(&messages[..=i], false)?;
        if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
            return Err("the chat template does not render this conversation turn by turn, so its assistant turns cannot be located".into());
        }
        spans.push(prefix.len()..upto.len());
    }
    Ok((full, spans))
}
