//! The chat-template renderer with hostile templates (they come with model files): any template
//! and messages must render or fail with an error within the render budget, never panic.
//! Input: a template, a NUL byte, then messages separated by NUL bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorahost::chat::{ChatMessage, ChatTemplate};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let Some(source) = parts.next() else { return };
    let roles = ["system", "user", "assistant", "tool"];
    let messages: Vec<ChatMessage> = parts
        .enumerate()
        .map(|(i, content)| ChatMessage { role: roles[i % roles.len()].into(), content: content.into() })
        .collect();
    if let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") {
        let _ = template.render(&messages);
        let _ = template.render_with(&messages, false);
    }
});
