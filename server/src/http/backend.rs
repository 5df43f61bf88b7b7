//! The one seam between the HTTP layer and the model: `Backend`. The server's implementation
//! (`EngineBackend`) holds the resident base and the engine; router tests use a fake.

use crate::adapter_host::load_validated;
use crate::base::Base;
use crate::chat::ChatMessage;
use crate::engine::{ClientId, Engine, EngineError, EngineStats, TokenEvent, ValidRequest};
use tokio::sync::mpsc::UnboundedReceiver;

/// What the HTTP layer needs from the model side: tokenising, submitting validated requests,
/// validating adapter uploads, and counters.
pub trait Backend: Send + Sync + 'static {
    /// The id clients use for the base model.
    fn model_id(&self) -> &str;
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    /// Renders messages with the model's chat template (generation prompt added) and tokenises.
    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String>;
    /// The text of one token, for logprobs.
    fn token_text(&self, id: u32) -> String;
    /// The most tokens (prompt + generated) one sequence may hold.
    fn max_sequence_tokens(&self) -> usize;
    /// Queues a request accounted to `client`; dropping the receiver cancels it.
    fn submit(
        &self,
        req: ValidRequest,
        client: ClientId,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError>;
    fn stats(&self) -> EngineStats;
    /// Checks an uploaded adapter against the resident base; the error is for the uploader.
    /// CPU-heavy: call it off the async threads.
    fn validate_adapter(&self, config: &[u8], weights: &[u8]) -> Result<(), String>;
}

/// The real thing: the base model and the engine running it.
pub struct EngineBackend {
    pub base: Base,
    pub engine: Engine,
}

/// The trainer of fine-tuning jobs trains on this same base.
impl AsRef<Base> for EngineBackend {
    fn as_ref(&self) -> &Base {
        &self.base
    }
}

impl Backend for EngineBackend {
    fn model_id(&self) -> &str {
        &self.base.name
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.base.tokenizer.encode(text).map_err(|e| e.to_string())
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        self.base.chat_prompt(messages).map_err(|e| e.to_string())
    }

    fn token_text(&self, id: u32) -> String {
        self.base.tokenizer.decode(&[id]).unwrap_or_default()
    }

    fn max_sequence_tokens(&self) -> usize {
        self.engine.max_sequence_tokens()
    }

    fn submit(
        &self,
        req: ValidRequest,
        client: ClientId,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        self.engine.submit_for(req, client)
    }

    fn stats(&self) -> EngineStats {
        self.engine.stats()
    }

    fn validate_adapter(&self, config: &[u8], weights: &[u8]) -> Result<(), String> {
        load_validated(&self.base.model, config, weights).map(|_| ()).map_err(|e| e.to_string())
    }
}
