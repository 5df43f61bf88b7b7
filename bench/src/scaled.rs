//! Random-weight copies of the default model at the sizes of its larger siblings (SmolLM2-360M
//! and SmolLM2-1.7B): the default model's metadata and tokenizer, each tensor in the default
//! model's GGML type, at the other shape. They run the same kernels as the default model, so
//! a benchmark can show how a cost scales with the model's size without weights that would have
//! to be downloaded; their outputs are meaningless.

use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use kernels::lora::workload::SplitMix64;
use lorahost::base::Base;
use lorahost::model::Dtype;

/// The shape of a SmolLM2 model (every size has 64-wide heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelSize {
    /// The default model itself, real weights (135M).
    Default,
    /// SmolLM2-360M's shape: hidden 960, intermediate 2560, 32 layers, 15 heads, 5 KV heads.
    #[value(name = "360m")]
    M360,
    /// SmolLM2-1.7B's shape: hidden 2048, intermediate 8192, 24 layers, 32 heads, 32 KV heads.
    #[value(name = "1.7b")]
    B1_7,
}

struct Shape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
}

const HEAD_DIM: usize = 64;

impl ModelSize {
    fn label(self) -> &'static str {
        match self {
            ModelSize::Default => "default",
            ModelSize::M360 => "360m",
            ModelSize::B1_7 => "1.7b",
        }
    }

    fn shape(self) -> Option<Shape> {
        match self {
            ModelSize::Default => None,
            ModelSize::M360 => {
                Some(Shape { hidden: 960, intermediate: 2560, layers: 32, heads: 15, kv_heads: 5 })
            }
            ModelSize::B1_7 => {
                Some(Shape { hidden: 2048, intermediate: 8192, layers: 24, heads: 32, kv_heads: 32 })
            }
        }
    }
}

/// The base of `size`: the default model read from `default_path`, or a random-weight copy of it
/// at the other shape.
pub fn load_base(size: ModelSize, default_path: &Path, dtype: Dtype) -> Result<Base> {
    let Some(shape) = size.shape() else {
        return Ok(Base::load(default_path, dtype)?);
    };
    let bytes = std::fs::read(default_path).with_context(|| format!("reading {}", default_path.display()))?;
    let scaled = scaled_gguf(&bytes, &shape).context("building the random-weight model")?;
    Ok(Base::from_gguf_bytes(&format!("smollm2-{}-random-weights", size.label()), &scaled, dtype)?)
}

/// `default` (a llama-architecture GGUF) with its shape keys set to `shape` and random weights
/// of that shape, each tensor in the GGML type of its counterpart in `default`.
fn scaled_gguf(default: &[u8], shape: &Shape) -> Result<Vec<u8>> {
    let mut reader = Cursor::new(default);
    let content = gguf_file::Content::read(&mut reader)?;
    let overrides = [
        ("llama.embedding_length", shape.hidden),
        ("llama.feed_forward_length", shape.intermediate),
        ("llama.block_count", shape.layers),
        ("llama.attention.head_count", shape.heads),
        ("llama.attention.head_count_kv", shape.kv_heads),
        ("llama.rope.dimension_count", HEAD_DIM),
    ];
    let overridden: Vec<(String, Value)> =
        overrides.iter().map(|&(k, v)| (k.to_string(), Value::U32(v as u32))).collect();
    let mut metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.extend(overridden.iter().map(|(k, v)| (k.as_str(), v)));

    let (h, i) = (shape.hidden, shape.intermediate);
    let (q, kv) = (shape.heads * HEAD_DIM, shape.kv_heads * HEAD_DIM);
    let Some(&vocab) = content.tensor_infos.get("token_embd.weight").and_then(|t| t.shape.dims().first())
    else {
        bail!("the default model has no token_embd.weight");
    };
    // (name in the default model, [out, in] or [len])
    let mut specs: Vec<(String, String, Vec<usize>)> =
        vec![("token_embd.weight".into(), "token_embd.weight".into(), vec![vocab, h])];
    let per_layer: [(&str, Vec<usize>); 9] = [
        ("attn_norm.weight", vec![h]),
        ("attn_q.weight", vec![q, h]),
        ("attn_k.weight", vec![kv, h]),
        ("attn_v.weight", vec![kv, h]),
        ("attn_output.weight", vec![h, q]),
        ("ffn_norm.weight", vec![h]),
        ("ffn_gate.weight", vec![i, h]),
        ("ffn_up.weight", vec![i, h]),
        ("ffn_down.weight", vec![h, i]),
    ];
    for l in 0..shape.layers {
        for (suffix, dims) in &per_layer {
            specs.push((format!("blk.{l}.{suffix}"), format!("blk.0.{suffix}"), dims.clone()));
        }
    }
    specs.push(("output_norm.weight".into(), "output_norm.weight".into(), vec![h]));

    let mut rng = SplitMix64::new(0x5EED);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(specs.len());
    for (name, like, dims) in specs {
        let Some(info) = content.tensor_infos.get(&like) else {
            bail!("the default model has no {like}");
        };
        let n: usize = dims.iter().product();
        let data: Vec<f32> = if dims.len() == 1 {
            // Norm weights near one, as trained models have them.
            (0..n).map(|_| 1.0 + 0.1 * rng.uniform(-1.0, 1.0)).collect()
        } else {
            let scale = 1.0 / (dims[1] as f32).sqrt();
            (0..n).map(|_| scale * rng.uniform(-1.0, 1.0)).collect()
        };
        let t = Tensor::from_vec(data, dims.as_slice(), &Device::Cpu)?;
        tensors.push((name, QTensor::quantize(&t, info.ggml_dtype)?));
    }
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &refs)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_360m_copy_has_that_shape_and_the_default_tokenizer() {
        let path = lorahost::fetch::default_model().expect("default model");
        let base = load_base(ModelSize::M360, &path, Dtype::Auto).expect("random-weight 360M");
        let c = base.model.config();
        let got = (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim);
        assert_eq!(got, (960, 2560, 32, 15, 5, 64));
        let default = Base::load(&path, Dtype::Auto).expect("default model loads");
        assert_eq!(c.vocab_size, default.model.config().vocab_size);
        let ids = default.tokenizer.encode("Hello there").expect("encode");
        assert_eq!(base.tokenizer.encode("Hello there").expect("encode"), ids);
        let logits = base.model.last_logits(&ids, None).expect("a forward pass");
        assert!(logits.len() == c.vocab_size && logits.iter().all(|l| l.is_finite()));
    }
}
