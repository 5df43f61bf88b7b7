//! `/v1/completions` and `/v1/chat/completions` bodies: parsing and validation into engine
//! requests must accept or refuse any bytes with an API error, never panic. The first byte picks
//! the route; the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorahost::http::openai::{ChatRequest, CompletionRequest};
use lorahost_fuzz::FuzzBackend;

fuzz_target!(|data: &[u8]| {
    let backend = FuzzBackend::default();
    let Some((&route, body)) = data.split_first() else { return };
    if route % 2 == 0 {
        if let Ok(req) = serde_json::from_slice::<CompletionRequest>(body) {
            let _ = req.prepare(&backend);
        }
    } else if let Ok(req) = serde_json::from_slice::<ChatRequest>(body) {
        let _ = req.prepare(&backend);
    }
});
