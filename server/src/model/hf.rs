//! Loading a Hugging Face model directory: `config.json` plus one or more `*.safetensors`.

use super::config::HfConfig;
use super::linear::{Embedding, Linear, Weight};
use super::llama::{Llama, WeightSource};
use super::{Dtype, ModelError};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Reads `config.json` of a model directory into the wire config.
pub fn read_config(dir: &Path) -> Result<HfConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::read(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::read(&path, e))
}

pub fn load(dir: &Path, dtype: Dtype) -> Result<Llama, ModelError> {
    let config = read_config(dir)?.into_config()?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::read(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::read(dir, "no *.safetensors files"));
    }
    // Safety: read-only maps of files this process does not modify.
    let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::read(dir, e))?;
    let mut source = HfSource { tensors, dtype };
    Llama::load(config, &mut source)
}

struct HfSource {
    tensors: MmapedSafetensors,
    dtype: Dtype,
}

impl HfSource {
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, ModelError> {
        let t =
            self.tensors.load(name, &Device::Cpu).map_err(|_| ModelError::MissingTensor(name.to_string()))?;
        if t.dims() != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                found: t.dims().to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }
}

impl WeightSource for HfSource {
    fn linear(&mut self, hf: &str, out: usize, inp: usize, bias: bool) -> Result<Linear, ModelError> {
        let w = self.tensor(&format!("{hf}.weight"), &[out, inp])?.to_dtype(self.dtype.dense_dtype())?;
        let b = if bias { Some(self.vector(&format!("{hf}.bias"), out)?) } else { None };
        Ok(Linear::new(Weight::Dense(w), b, out, inp))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor, ModelError> {
        Ok(self.tensor(name, &[len])?.to_dtype(DType::F32)?)
    }

    fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Embedding, ModelError> {
        let t = self.tensor("model.embed_tokens.weight", &[vocab, hidden])?;
        Ok(Embedding::Dense(t.to_dtype(self.dtype.dense_dtype())?))
    }

    fn lm_head(&mut self, vocab: usize, hidden: usize, tied: bool) -> Result<Linear, ModelError> {
        let name = if tied && self.tensors.get("lm_head.weight").is_err() {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        self.linear(name, vocab, hidden, false)
    }
}
