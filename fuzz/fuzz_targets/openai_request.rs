//! `/v1/completions` and `/v1/chat/completions` bodies: parsing and validation into engine
//! requests must accept or refuse any bytes with an API error, never panic. The first byte picks
//! the route; the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorahost::chat::{ChatMessage, ChatTemplate};
use lorahost::engine::{ClientId, EngineError, EngineStats, TokenEvent, ValidRequest};
use lorahost::http::openai::{ChatRequest, CompletionRequest};
use lorahost::http::Backend;
use std::sync::OnceLock;
use tokio::sync::mpsc::UnboundedReceiver;

/// A model of one token per byte with a real (SmolLM2-style) chat template.
struct Bytes;

fn template() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        ChatTemplate::new(
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
             {{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}\
             {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}\
             {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
            "",
            "<|im_end|>",
        )
        .expect("the template compiles")
    })
}

impl Backend for Bytes {
    fn model_id(&self) -> &str {
        "base"
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        let text = template().render(messages).map_err(|e| e.to_string())?;
        self.encode(&text)
    }

    fn token_text(&self, id: u32) -> String {
        id.to_string()
    }

    fn max_sequence_tokens(&self) -> usize {
        2048
    }

    fn submit(
        &self,
        _req: ValidRequest,
        _client: ClientId,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        Err(EngineError::Stopped)
    }

    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    fn validate_adapter(&self, _config: &[u8], _weights: &[u8]) -> Result<(), String> {
        Err("not in this target".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else { return };
    if route % 2 == 0 {
        if let Ok(req) = serde_json::from_slice::<CompletionRequest>(body) {
            let _ = req.prepare(&Bytes);
        }
    } else if let Ok(req) = serde_json::from_slice::<ChatRequest>(body) {
        let _ = req.prepare(&Bytes);
    }
});
