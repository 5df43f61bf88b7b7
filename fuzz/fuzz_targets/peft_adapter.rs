//! The PEFT adapter reader (`adapter_config.json` + `adapter_model.safetensors`), as an upload
//! reaches it: any bytes must give an adapter or an error, never a panic or a runaway allocation.
//! Input: two little-endian bytes of config length, the config, then the weights.
#![no_main]

use adapters::LoraAdapter;
use libfuzzer_sys::fuzz_target;
use lorahost_fuzz::small_base;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (usize::from(data[0]) | usize::from(data[1]) << 8).min(data.len() - 2);
    let (config, weights) = data[2..].split_at(split);
    let base = small_base();
    if let Ok(mut adapter) = LoraAdapter::from_bytes(config, weights, &base) {
        // What the server does next with an accepted adapter.
        let _ = adapter.bytes();
        let _ = adapter.quantize_int8(&base);
    }
});
