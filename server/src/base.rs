//! The resident base: model weights, tokenizer and chat template loaded together from one GGUF
//! file or Hugging Face directory.

use crate::chat::{read_tokenizer_config, special_token, ChatError, ChatMessage, ChatTemplate};
use crate::model::{self, Dtype, Llama, ModelError, ModelSource};
use crate::tokenizer::{TextTokenizer, TokenizerError};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
}

pub struct Base {
    pub model: Arc<Llama>,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// The id clients use for the base (file or directory name).
    pub name: String,
}

impl Base {
    pub fn load(path: &Path, dtype: Dtype) -> Result<Self, BaseError> {
        let loaded = model::load(path, dtype)?;
        let name =
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "base".to_string());
        let (tokenizer, chat_template) = match (&loaded.source, &loaded.gguf_metadata) {
            (ModelSource::Gguf(_), Some(md)) => gguf_tokenizer(md)?,
            (ModelSource::HfDir(dir), _) => load_hf_tokenizer(dir)?,
            (ModelSource::Gguf(p), None) => {
                return Err(ModelError::read(p, "GGUF metadata missing").into());
            }
        };
        Ok(Self { model: Arc::new(loaded.model), tokenizer: Arc::new(tokenizer), chat_template, name })
    }

    /// A base from the bytes of a GGUF file, read as [`Base::load`] reads the file; `name` is
    /// its id and names it in errors.
    pub fn from_gguf_bytes(name: &str, bytes: &[u8], dtype: Dtype) -> Result<Self, BaseError> {
        let (model, md) = model::load_gguf_bytes(Path::new(name), bytes, dtype)?;
        let (tokenizer, chat_template) = gguf_tokenizer(&md)?;
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            chat_template,
            name: name.to_string(),
        })
    }

    /// Renders chat messages with the model's template into prompt ids.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, BaseError> {
        let template = self.chat_template.as_ref().ok_or(ChatError::NoTemplate)?;
        Ok(self.tokenizer.encode(&template.render(messages)?)?)
    }
}

/// The tokenizer and chat template a GGUF file's metadata describes.
fn gguf_tokenizer(md: &model::GgufMetadata) -> Result<(TextTokenizer, Option<ChatTemplate>), BaseError> {
    let tok = TextTokenizer::from_gguf(md)?;
    let template = match md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
        Some(src) => {
            let name_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
            let eos = name_of(tok.eos_token_ids.first().copied());
            Some(ChatTemplate::new(src, &name_of(tok.bos_token_id), &eos)?)
        }
        None => None,
    };
    Ok((tok, template))
}

fn load_hf_tokenizer(dir: &Path) -> Result<(TextTokenizer, Option<ChatTemplate>), BaseError> {
    let config = crate::model::HfConfig::eos_and_bos(dir)?;
    let tok_config = read_tokenizer_config(dir)?;
    let mut tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), config.0, config.1)?;
    let token = |key: &str| tok_config.as_ref().and_then(|c| special_token(c, key));
    // tokenizer_config.json names eos by text; it wins over config.json, as in transformers.
    if let Some(id) = token("eos_token").and_then(|t| tokenizer.token_id(&t)) {
        if !tokenizer.eos_token_ids.contains(&id) {
            tokenizer.eos_token_ids.insert(0, id);
        }
    }
    if let Some(add_bos) = tok_config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool())
    {
        tokenizer.add_bos = add_bos;
    }
    let template = match ChatTemplate::source_from_dir(dir)? {
        Some(src) => Some(ChatTemplate::new(
            &src,
            &token("bos_token").unwrap_or_default(),
            &token("eos_token").unwrap_or_default(),
        )?),
        None => None,
    };
    Ok((tokenizer, template))
}
