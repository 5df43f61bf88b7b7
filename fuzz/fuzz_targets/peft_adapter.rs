//! The PEFT adapter reader (`adapter_config.json` + `adapter_model.safetensors`), as an upload
//! reaches it: any bytes must give an adapter or an error, never a panic or a runaway allocation.
//! Input: two little-endian bytes of config length, the config, then the weights.
#![no_main]

use adapters::{BaseShape, LoraAdapter, ModuleShape};
use libfuzzer_sys::fuzz_target;

fn base() -> BaseShape {
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

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (usize::from(data[0]) | usize::from(data[1]) << 8).min(data.len() - 2);
    let (config, weights) = data[2..].split_at(split);
    let base = base();
    if let Ok(mut adapter) = LoraAdapter::from_bytes(config, weights, &base) {
        // What the server does next with an accepted adapter.
        let _ = adapter.bytes();
        let _ = adapter.quantize_int8(&base);
    }
});
