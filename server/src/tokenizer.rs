//! Text ⇄ token ids, from a `tokenizer.json` or from GGUF metadata (built the way llama.cpp reads
//! it, including the pre-tokenizer named by `tokenizer.ggml.pre`), plus incremental decoding for
//! streaming.

use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer: {0}")]
    Load(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

// The GPT-2 style split used by Llama 3 and friends (llama.cpp `llama3` pre-tokenizer).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A token's `(start, end)` byte offsets in the encoded text.
pub type ByteRange = (usize, usize);

/// A tokenizer with the special-token facts generation needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Ids that end generation (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Whether a BOS id is prepended to every encoded prompt.
    pub add_bos: bool,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; special tokens come from its added tokens.
    pub fn from_file(
        path: &Path,
        eos_token_ids: Vec<u32>,
        bos_token_id: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load(format!("{}: {e}", path.display())))?;
        Ok(Self { inner, eos_token_ids, bos_token_id, add_bos: false })
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let get =
            |k: &str| md.get(k).ok_or_else(|| TokenizerError::Load(format!("GGUF metadata has no `{k}`")));
        let strings = |k: &str| -> Result<Vec<String>, TokenizerError> {
            let arr = get(k)?.to_vec().map_err(|_| TokenizerError::Load(format!("`{k}` is not an array")))?;
            arr.iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|_| TokenizerError::Load(format!("`{k}` holds a non-string")))
                })
                .collect()
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|_| TokenizerError::Load("bad tokenizer.ggml.model".into()))?;
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            Some(arr) => arr.iter().map(value_i64).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> = match md.get("tokenizer.ggml.merges") {
            Some(_) => strings("tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| TokenizerError::Load(format!("malformed merge `{m}`")))
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let id = |k: &str| md.get(k).map(value_i64).filter(|&v| v >= 0).map(|v| v as u32);
        let bos_token_id = id("tokenizer.ggml.bos_token_id");
        let eos_token_id = id("tokenizer.ggml.eos_token_id");
        let mut inner = match model.as_str() {
            "gpt2" => {
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(|e| TokenizerError::Load(e.to_string()))?;
                let mut tok = Tokenizer::new(bpe);
                let pre = md
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.to_string().ok())
                    .map(String::as_str)
                    .unwrap_or("default");
                tok.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
                tok.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
                tok
            }
            // SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral).
            "llama" => {
                let mut builder =
                    BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
                if let Some(unk) = id("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize))
                {
                    builder = builder.unk_token(unk.clone());
                }
                let mut tok =
                    Tokenizer::new(builder.build().map_err(|e| TokenizerError::Load(e.to_string()))?);
                let replace = Replace::new(" ", "▁").map_err(|e| TokenizerError::Load(e.to_string()))?;
                tok.with_normalizer(Some(NormalizerWrapper::Sequence(
                    tokenizers::normalizers::Sequence::new(vec![
                        Prepend::new("▁".into()).into(),
                        replace.into(),
                    ]),
                )))
                .map_err(|e| TokenizerError::Load(e.to_string()))?;
                let replace_back = tokenizers::decoders::DecoderWrapper::Replace(
                    Replace::new("▁", " ").map_err(|e| TokenizerError::Load(e.to_string()))?,
                );
                tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
                    replace_back,
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                    Strip::new(' ', 1, 0).into(),
                ]))));
                tok
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "GGUF tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| TokenizerError::Load(e.to_string()))?;
        let add_bos =
            md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(model == "llama");
        Ok(Self { inner, eos_token_ids: eos_token_id.into_iter().collect(), bos_token_id, add_bos })
    }

    /// Text → ids. Special tokens written in the text (`<|im_start|>`) become their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos_token_id) {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// As [`TextTokenizer::encode`], with each token's byte range in `text` (an added BOS gets
    /// the empty range at 0).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>), TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let (mut ids, mut offsets) = (Vec::with_capacity(enc.len() + 1), Vec::with_capacity(enc.len() + 1));
        if let (true, Some(bos)) = (self.add_bos, self.bos_token_id) {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
                offsets.push((0, 0));
            }
        }
        ids.extend_from_slice(enc.get_ids());
        offsets.extend_from_slice(enc.get_offsets());
        Ok((ids, offsets))
    }

    /// Ids → text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Ids → the text a user reads: special tokens (`<|im_end|>`, `<|im_start|>`...) left out,
    /// as transformers' `skip_special_tokens=True` and other servers' outputs do. They still
    /// count as tokens and show in logprobs.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn value_i64(v: &Value) -> i64 {
    match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => *x as i64,
        Value::I64(x) => *x,
        _ => -1,
    }
}

/// The pre-tokenizer llama.cpp applies for a `tokenizer.ggml.pre` name.
fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    match pre {
        "default" | "gpt2" | "gpt-2" => Ok(ByteLevel::new(false, true, true).into()),
        // SmolLM: every digit its own piece, then the GPT-2 byte-level split.
        "smollm" | "starcoder" | "refact" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into())
        }
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => split(REGEX_LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(REGEX_QWEN2),
        other => Err(TokenizerError::Unsupported(format!(
            "GGUF pre-tokenizer `{other}` (supported: default, gpt2, smollm, starcoder, llama3, qwen2)"
        ))),
    }
}

/// Turns a growing list of generated ids into text pieces without splitting a multi-byte
/// character: text is emitted only once the decoded tail no longer ends in a partial character.
/// Special tokens give no text ([`TextTokenizer::decode_text`]).
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window re-decoded each step (a few tokens back, so merges at the boundary
    /// decode as they would in full).
    prefix_offset: usize,
    /// Ids before this are already emitted.
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tokenizer.decode_text(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode_text(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<String, TokenizerError> {
        let prefix = tokenizer.decode_text(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode_text(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
