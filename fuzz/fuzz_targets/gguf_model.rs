//! The GGUF model reader (candle's header parser plus lorahost's loader, tokenizer and chat
//! template), as `lorahost serve --model FILE` reaches it: any bytes must give a base or an
//! error, never a panic or a runaway allocation; a base that loads must then run a prompt.
//! Input: the file's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorahost::base::Base;
use lorahost::chat::ChatMessage;
use lorahost::model::Dtype;
use std::sync::Once;

fuzz_target!(|data: &[u8]| {
    static HOOK: Once = Once::new();
    // The loader catches the one panic candle's header parser is known to raise (a zero
    // alignment); libFuzzer's hook would abort on it before the catch, and printing a backtrace
    // for each would grow the process by the symbol tables it caches. So: that panic silently,
    // any other with its message; the harness still aborts on every panic that reaches it.
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            if !info.location().is_some_and(|l| l.file().ends_with("quantized/gguf_file.rs")) {
                eprintln!("{info}");
            }
        }));
    });
    for dtype in [Dtype::Auto, Dtype::F32] {
        let Ok(base) = Base::from_gguf_bytes("fuzz", data, dtype) else { continue };
        let message = ChatMessage { role: "user".into(), content: "ab ba".into() };
        let prompt = base.chat_prompt(&[message]).or_else(|_| base.tokenizer.encode("ab ba"));
        if let Ok(tokens) = prompt {
            let tokens: Vec<u32> = tokens.into_iter().take(16).collect();
            let _ = base.model.last_logits(&tokens, None);
        }
    }
});
