//! A stand-in for the engine in router tests: bytes are tokens, and every request is answered at
//! once with `max_tokens` tokens `w`; adapters need only a positive `r`.

use lorahost::chat::ChatMessage;
use lorahost::engine::{
    ClientId, Completion, EngineError, EngineStats, FinishReason, GeneratedToken, TokenEvent, ValidRequest,
};
use lorahost::http::Backend;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// The base model's id.
pub const BASE: &str = "fake-base";

/// The last event of a request that generated all its `max_tokens`.
pub fn finished_at_length(req: &ValidRequest) -> TokenEvent {
    TokenEvent::Finished(Completion {
        reason: FinishReason::Length,
        trailing_text: String::new(),
        prompt_tokens: req.prompt_ids.len(),
        completion_tokens: req.stop.max_tokens,
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
        preemptions: 0,
    })
}

pub struct InstantBackend;

impl Backend for InstantBackend {
    fn model_id(&self) -> &str {
        BASE
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        self.encode(&messages.iter().map(|m| m.content.clone()).collect::<String>())
    }

    fn token_text(&self, _: u32) -> String {
        "w".into()
    }

    fn max_sequence_tokens(&self) -> usize {
        4096
    }

    fn submit(&self, req: ValidRequest, _: ClientId) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        let (tx, rx) = unbounded_channel();
        for _ in 0..req.stop.max_tokens {
            let token = GeneratedToken { id: 100, text: "w ".into(), logprob: None, top_logprobs: vec![] };
            let _ = tx.send(TokenEvent::Token(token));
        }
        let _ = tx.send(finished_at_length(&req));
        Ok(rx)
    }

    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    fn validate_adapter(&self, config: &[u8], _: &[u8]) -> Result<(), String> {
        let config: serde_json::Value = serde_json::from_slice(config).map_err(|e| e.to_string())?;
        if config["r"].as_u64().unwrap_or(0) == 0 {
            return Err("adapter_config.json: `r` must be at least 1".into());
        }
        Ok(())
    }
}
