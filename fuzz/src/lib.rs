//! What the fuzz targets share: a small Llama base shape and a stand-in backend that tokenizes
//! one token per byte, renders a real (SmolLM2-style ChatML) template and validates adapters for
//! real against the small base, but never generates.

use adapters::{BaseShape, LoraAdapter, ModuleShape};
use lorahost::chat::{ChatMessage, ChatTemplate};
use lorahost::engine::{ClientId, EngineError, EngineStats, TokenEvent, ValidRequest};
use lorahost::http::Backend;
use std::sync::OnceLock;
use tokio::sync::mpsc::UnboundedReceiver;

/// All seven Llama projections, two layers, hidden 8.
pub fn small_base() -> BaseShape {
    let m = |path: &str, out, inp| ModuleShape { path: path.into(), out_features: out, in_features: inp };
    BaseShape {
        num_layers: 2,
        modules: vec![
            m("self_attn.q_proj", 8, 8),
            m("self_attn.k_proj", 4, 8),
            m("self_attn.v_proj", 4, 8),
            m("self_attn.o_proj", 8, 8),
            m("mlp.gate_proj", 16, 8),
            m("mlp.up_proj", 16, 8),
            m("mlp.down_proj", 8, 16),
        ],
    }
}

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

/// The backend of the fuzz targets (see the module docs); its model id is `base`.
pub struct FuzzBackend {
    base: BaseShape,
}

impl Default for FuzzBackend {
    fn default() -> Self {
        Self { base: small_base() }
    }
}

impl Backend for FuzzBackend {
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

    fn validate_adapter(&self, config: &[u8], weights: &[u8]) -> Result<(), String> {
        LoraAdapter::from_bytes(config, weights, &self.base).map(|_| ()).map_err(|e| e.to_string())
    }
}
