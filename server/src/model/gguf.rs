//! Loading a GGUF file: metadata → `ModelConfig`, tensors → layers in the requested dtype.
//!
//! Weights are addressed by their Hugging Face names (the names PEFT adapters use) and mapped to
//! GGUF names here, so the layer code has one naming scheme. llama.cpp stores the q/k rows of
//! llama models permuted for its rope layout; they are un-permuted at load, so every model runs
//! with the Hugging Face (rotate-half) rope and adapters line up with the base rows.

use super::config::{Architecture, ModelConfig};
use super::linear::{Embedding, Linear, Weight};
use super::llama::{Llama, WeightSource};
use super::{Dtype, ModelError};
use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QMatMul};
use candle_core::{Device, Tensor};
use kernels::quant::{QuantFormat, QuantMatrix};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type Metadata = HashMap<String, gguf_file::Value>;

/// Reads a GGUF model file.
pub fn load(path: &Path, dtype: Dtype) -> Result<(Llama, Metadata), ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::read(path, e))?;
    // Safety: the map is read-only and dropped before this function returns; a concurrent
    // truncation of the file is the same hazard every mmap-based model loader accepts.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::read(path, e))?;
    load_bytes(path, &mmap, dtype)
}

/// Reads a GGUF model from its bytes; `path` only names it in errors. Any bytes give a model or
/// an error: every length, offset and shape the file declares is checked against the bytes
/// before it is used.
pub fn load_bytes(path: &Path, bytes: &[u8], dtype: Dtype) -> Result<(Llama, Metadata), ModelError> {
    let content =
        read_content(bytes).map_err(|e| ModelError::read(path, format!("not a valid GGUF file: {e}")))?;
    let config = config_from_metadata(&content)?;
    let mut source = GgufSource {
        path: path.to_path_buf(),
        content: &content,
        bytes,
        dtype,
        config: config.clone(),
        embedding_cache: None,
    };
    let model = Llama::load(config, &mut source)?;
    Ok((model, content.metadata))
}

/// candle's GGUF header reader. It bounds every count and length by the bytes left, but divides
/// by the file's `general.alignment` unchecked: a zero there panics, which is caught here and
/// answered as the error it is, so no model file can take the process down.
fn read_content(bytes: &[u8]) -> Result<gguf_file::Content, String> {
    let read = std::panic::catch_unwind(|| gguf_file::Content::read(&mut std::io::Cursor::new(bytes)));
    match read {
        Ok(content) => content.map_err(|e| e.to_string()),
        Err(_) => Err("the GGUF header is inconsistent (e.g. a zero `general.alignment`)".into()),
    }
}

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, ModelError> {
    content.metadata.get(key).ok_or_else(|| ModelError::Config(format!("GGUF metadata has no `{key}`")))
}

fn meta_usize(content: &gguf_file::Content, key: &str) -> Result<usize, ModelError> {
    use gguf_file::Value::*;
    match meta(content, key)? {
        U8(v) => Ok(*v as usize),
        U16(v) => Ok(*v as usize),
        U32(v) => Ok(*v as usize),
        U64(v) => Ok(*v as usize),
        I32(v) if *v >= 0 => Ok(*v as usize),
        I64(v) if *v >= 0 => Ok(*v as usize),
        other => Err(ModelError::Config(format!("GGUF `{key}` is not a count: {other:?}"))),
    }
}

fn meta_f32(content: &gguf_file::Content, key: &str) -> Result<f32, ModelError> {
    match meta(content, key)? {
        gguf_file::Value::F32(v) => Ok(*v),
        gguf_file::Value::F64(v) => Ok(*v as f32),
        other => Err(ModelError::Config(format!("GGUF `{key}` is not a float: {other:?}"))),
    }
}

fn config_from_metadata(content: &gguf_file::Content) -> Result<ModelConfig, ModelError> {
    let arch_name = meta(content, "general.architecture")?
        .to_string()
        .map_err(|_| ModelError::Config("general.architecture is not a string".into()))?
        .clone();
    let architecture = Architecture::from_name(&arch_name)?;
    let a = arch_name.as_str();
    let hidden_size = meta_usize(content, &format!("{a}.embedding_length"))?;
    let num_heads = meta_usize(content, &format!("{a}.attention.head_count"))?;
    let num_kv_heads = meta_usize(content, &format!("{a}.attention.head_count_kv")).unwrap_or(num_heads);
    let head_dim = meta_usize(content, &format!("{a}.attention.key_length"))
        .or_else(|_| meta_usize(content, &format!("{a}.rope.dimension_count")))
        .unwrap_or(hidden_size / num_heads.max(1));
    let vocab_size = match meta_usize(content, &format!("{a}.vocab_size")) {
        Ok(v) => v,
        Err(_) => content
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().copied())
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?,
    };
    ModelConfig {
        architecture,
        hidden_size,
        intermediate_size: meta_usize(content, &format!("{a}.feed_forward_length"))?,
        num_layers: meta_usize(content, &format!("{a}.block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: meta_f32(content, &format!("{a}.attention.layer_norm_rms_epsilon"))?,
        rope_theta: meta_f32(content, &format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: meta_usize(content, &format!("{a}.context_length")).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
    }
    .validate()
}

/// Maps a Hugging Face parameter name (without `.weight`/`.bias`) to its GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens" => return Some("token_embd".into()),
        "model.norm" => return Some("output_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

/// The row order that undoes llama.cpp's q/k permutation: HF row `h*hd + j*hd/2 + i` is GGUF
/// row `h*hd + 2*i + j`.
fn unpermute_rows(rows: usize, heads: usize) -> Vec<usize> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, rem) = (r / head_dim, r % head_dim);
            let (j, i) = (rem / half, rem % half);
            h * head_dim + 2 * i + j
        })
        .collect()
}

struct GgufSource<'a> {
    path: PathBuf,
    content: &'a gguf_file::Content,
    bytes: &'a [u8],
    dtype: Dtype,
    config: ModelConfig,
    /// The embedding weight, kept so a tied LM head shares it instead of loading it twice.
    embedding_cache: Option<Arc<QuantMatrix>>,
}

/// A tensor's raw GGML bytes, shape `[out, in]` (or `[n]`), and type.
struct Raw<'a> {
    name: String,
    dtype: GgmlDType,
    dims: Vec<usize>,
    bytes: std::borrow::Cow<'a, [u8]>,
}

impl<'a> GgufSource<'a> {
    fn raw(&self, name: &str) -> Result<Raw<'a>, ModelError> {
        let info =
            self.content.tensor_infos.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        // Every size and offset comes from the file: checked, so a hostile one is an error.
        let past_end =
            || ModelError::read(&self.path, format!("file is truncated: tensor `{name}` runs past its end"));
        let elems =
            info.shape.dims().iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(past_end)?;
        let block = info.ggml_dtype.block_size();
        if elems % block != 0 {
            return Err(ModelError::read(
                &self.path,
                format!("tensor `{name}` is not a whole number of blocks"),
            ));
        }
        let size = (elems / block).checked_mul(info.ggml_dtype.type_size()).ok_or_else(past_end)?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| usize::try_from(start).ok())
            .ok_or_else(past_end)?;
        let end = start.checked_add(size).ok_or_else(past_end)?;
        let bytes: &'a [u8] = self.bytes.get(start..end).ok_or_else(past_end)?;
        Ok(Raw {
            name: name.to_string(),
            dtype: info.ggml_dtype,
            dims: info.shape.dims().to_vec(),
            bytes: bytes.into(),
        })
    }

    fn raw_matrix(&self, hf: &str, out: usize, inp: usize) -> Result<Raw<'a>, ModelError> {
        let name = gguf_name(hf).ok_or_else(|| ModelError::MissingTensor(hf.to_string()))? + ".weight";
        let mut raw = self.raw(&name)?;
        if raw.dims != [out, inp] {
            return Err(ModelError::TensorShape { name, found: raw.dims, expected: vec![out, inp] });
        }
        let heads = match hf.rsplit('.').next() {
            Some("q_proj") => Some(self.config.num_heads),
            Some("k_proj") => Some(self.config.num_kv_heads),
            _ => None,
        };
        if let (Some(heads), Architecture::Llama) = (heads, self.config.architecture) {
            let row_bytes = raw.bytes.len() / out;
            let mut permuted = Vec::with_capacity(raw.bytes.len());
            for src in unpermute_rows(out, heads) {
                permuted.extend_from_slice(&raw.bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
            raw.bytes = permuted.into();
        }
        Ok(raw)
    }

    /// Dequantizes any tensor to an f32 tensor of its shape.
    fn dequantize(&self, raw: &Raw) -> Result<Tensor, ModelError> {
        if let Some(format) = quant_format(raw.dtype) {
            let (out, inp) = (raw.dims[0], raw.dims[1..].iter().product());
            let q = QuantMatrix::from_ggml_bytes(format, out, inp, &raw.bytes)?;
            return Ok(Tensor::from_vec(q.dequantize(), raw.dims.clone(), &Device::Cpu)?);
        }
        Ok(self.candle_qtensor(raw)?.dequantize(&Device::Cpu)?)
    }

    /// A tensor in candle's own form. candle reads the bytes in place as f32, f16 or block
    /// structs, so they must be 8-byte aligned: GGUF aligns tensor data (and the map starts on a
    /// page), but a damaged file or a re-ordered copy may not be, and is copied first.
    fn candle_qtensor(&self, raw: &Raw) -> Result<candle_core::quantized::QTensor, ModelError> {
        let mut aligned: Vec<u64> = Vec::new();
        let bytes: &[u8] = if raw.bytes.as_ptr().align_offset(8) == 0 {
            &raw.bytes
        } else {
            aligned.resize(raw.bytes.len().div_ceil(8), 0);
            // SAFETY: the u64 buffer holds at least `len` initialised bytes; u8 has no alignment.
            let view =
                unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), raw.bytes.len()) };
            view.copy_from_slice(&raw.bytes);
            view
        };
        ggml_file::qtensor_from_ggml(raw.dtype, bytes, raw.dims.clone(), &Device::Cpu)
            .map_err(|e| ModelError::read(&self.path, format!("tensor `{}`: {e}", raw.name)))
    }

    fn weight(&self, raw: Raw) -> Result<Weight, ModelError> {
        let dense = |t: Tensor| -> Result<Weight, ModelError> {
            Ok(Weight::Dense(t.to_dtype(self.dtype.dense_dtype())?))
        };
        match (self.dtype, raw.dtype) {
            (_, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => dense(self.dequantize(&raw)?),
            (Dtype::Auto, dt) => match quant_format(dt) {
                Some(format) => Ok(Weight::Quant(Arc::new(QuantMatrix::from_ggml_bytes(
                    format,
                    raw.dims[0],
                    raw.dims[1],
                    &raw.bytes,
                )?))),
                // candle's Q5_0 / Q5_1 dot products assert an even number of blocks per row (in
                // builds with debug assertions): such a row is used dense instead.
                None if matches!(dt, GgmlDType::Q5_0 | GgmlDType::Q5_1)
                    && !(raw.dims[1] / dt.block_size()).is_multiple_of(2) =>
                {
                    dense(self.dequantize(&raw)?)
                }
                None => Ok(Weight::Candle(QMatMul::from_qtensor(self.candle_qtensor(&raw)?)?)),
            },
            _ => dense(self.dequantize(&raw)?),
        }
    }
}

fn quant_format(dtype: GgmlDType) -> Option<QuantFormat> {
    match dtype {
        GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
        GgmlDType::Q8_0 => Some(QuantFormat::Q8_0),
        _ => None,
    }
}

impl WeightSource for GgufSource<'_> {
    fn linear(&mut self, hf: &str, out: usize, inp: usize, bias: bool) -> Result<Linear, ModelError> {
        let raw = self.raw_matrix(hf, out, inp)?;
        let weight = self.weight(raw)?;
        let bias = if bias { Some(self.vector(&format!("{hf}.bias"), out)?) } else { None };
        Ok(Linear::new(weight, bias, out, inp))
    }

    fn vector(&mut self, hf_full: &str, len: usize) -> Result<Tensor, ModelError> {
        let (base, suffix) = hf_full.rsplit_once('.').unwrap_or((hf_full, "weight"));
        let name =
            gguf_name(base).ok_or_else(|| ModelError::MissingTensor(hf_full.to_string()))? + "." + suffix;
        let raw = self.raw(&name)?;
        if raw.dims != [len] {
            return Err(ModelError::TensorShape { name, found: raw.dims, expected: vec![len] });
        }
        self.dequantize(&raw)
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Embedding, ModelError> {
        let raw = self.raw_matrix("model.embed_tokens", vocab, hidden)?;
        match (self.dtype, quant_format(raw.dtype)) {
            (Dtype::Auto, Some(format)) => {
                let table = Arc::new(QuantMatrix::from_ggml_bytes(format, vocab, hidden, &raw.bytes)?);
                self.embedding_cache = Some(table.clone());
                Ok(Embedding::Quant(table))
            }
            _ => Ok(Embedding::Dense(self.dequantize(&raw)?.to_dtype(self.dtype.dense_dtype())?)),
        }
    }

    fn lm_head(&mut self, vocab: usize, hidden: usize, tied: bool) -> Result<Linear, ModelError> {
        if !tied {
            return self.linear("lm_head", vocab, hidden, false);
        }
        if let Some(table) = &self.embedding_cache {
            return Ok(Linear::new(Weight::Quant(table.clone()), None, vocab, hidden));
        }
        let raw = self.raw_matrix("model.embed_tokens", vocab, hidden)?;
        Ok(Linear::new(self.weight(raw)?, None, vocab, hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_matches_transformers_reshape() {
        // transformers: w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2)
        let (heads, head_dim) = (3, 8);
        let rows = heads * head_dim;
        let perm = unpermute_rows(rows, heads);
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..head_dim / 2 {
                    let hf_row = h * head_dim + j * head_dim / 2 + i;
                    let gguf_row = ((h * head_dim / 2) + i) * 2 + j;
                    assert_eq!(perm[hf_row], gguf_row);
                }
            }
        }
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(gguf_name("model.layers.12.self_attn.o_proj").as_deref(), Some("blk.12.attn_output"));
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm").as_deref(), Some("blk.0.ffn_norm"));
        assert_eq!(gguf_name("model.embed_tokens").as_deref(), Some("token_embd"));
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary"), None);
    }
}
