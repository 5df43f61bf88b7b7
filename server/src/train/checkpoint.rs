//! Checkpoints of a training run: the LoRA parameters, AdamW's moments and step count, and the
//! losses so far, in one safetensors file (`<out>.checkpoint`) written atomically, so `--resume`
//! continues an interrupted run exactly (same data order, same updates) or refuses to mix runs.

use super::model::TrainModel;
use super::optim::AdamW;
use super::{TrainConfig, TrainError};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// Optimizer steps done.
    pub step: usize,
    pub losses: Vec<f64>,
    pub eval_losses: Vec<(usize, f64)>,
    /// The report's token counts and training time so far, so a resumed run's log covers the
    /// whole run (absent, as zero, in checkpoints written before they were kept).
    #[serde(default)]
    pub trained_tokens: usize,
    #[serde(default)]
    pub processed_tokens: usize,
    #[serde(default)]
    pub seconds: f64,
}

/// `<out>.checkpoint`, beside the adapter directory.
pub fn path_for(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    out.with_file_name(format!("{name}.checkpoint"))
}

/// What must not change between a run and its resumption: the adapter's shape, the
/// optimisation, the step count and the data file (path and size).
pub fn fingerprint(config: &TrainConfig, total_steps: usize, data: &Path) -> Result<String, TrainError> {
    let size = std::fs::metadata(data).map(|m| m.len()).unwrap_or(0);
    let o = &config.optimizer;
    let mut value = serde_json::json!({
        "adapter": config.peft_config(),
        "data": [data.display().to_string(), size],
        "steps": total_steps,
        "batch": [config.batch_size, config.grad_accum, config.max_seq_len],
        "optimizer": [o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, config.warmup_steps as f64, config.max_grad_norm],
        "seed": config.seed,
    });
    // Only when on, so checkpoints of runs without it stay resumable.
    if config.group_by_length {
        value["group_by_length"] = serde_json::Value::Bool(true);
    }
    Ok(value.to_string())
}

/// Writes the checkpoint (temp file, fsync, rename).
pub fn save(
    path: &Path,
    fingerprint: &str,
    state: &State,
    model: &TrainModel,
    opt: &AdamW,
) -> Result<(), TrainError> {
    let (steps, moments) = opt.state();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, (var, (m, v))) in model.vars().iter().zip(moments).enumerate() {
        tensors.push((format!("param.{i}"), var.as_tensor().clone()));
        tensors.push((format!("m.{i}"), m.clone()));
        tensors.push((format!("v.{i}"), v.clone()));
    }
    let metadata = HashMap::from([
        ("fingerprint".to_string(), fingerprint.to_string()),
        ("optimizer_steps".to_string(), steps.to_string()),
        (
            "state".to_string(),
            serde_json::to_string(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?,
        ),
    ]);
    let tmp = path.with_extension("checkpoint.tmp");
    candle_core::safetensors::save(&tensors.into_iter().collect::<HashMap<_, _>>(), &tmp)?;
    // Metadata is not part of candle's writer: rewrite with it through the safetensors crate.
    let bytes = std::fs::read(&tmp).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", tmp.display())))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    let data = safetensors::serialize(st.tensors(), Some(metadata))
        .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    super::write_atomically(path, &data)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// Restores a checkpoint into `model` and `opt`; refuses one from another configuration.
pub fn load(
    path: &Path,
    fingerprint: &str,
    model: &TrainModel,
    opt: &mut AdamW,
) -> Result<State, TrainError> {
    let bad = |m: String| TrainError::Checkpoint(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot resume: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("fingerprint").map(String::as_str) != Some(fingerprint) {
        return Err(bad("was made by a run with other data, adapter shape or optimisation flags".into()));
    }
    let state: State = serde_json::from_str(meta.get("state").map(String::as_str).unwrap_or(""))
        .map_err(|e| bad(e.to_string()))?;
    let steps: u64 = meta
        .get("optimizer_steps")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no step count".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let get = |k: String| tensors.get(&k).cloned().ok_or_else(|| bad(format!("missing {k}")));
    let mut moments = Vec::new();
    for (i, var) in model.vars().iter().enumerate() {
        let p = get(format!("param.{i}"))?;
        if p.shape() != var.as_tensor().shape() {
            return Err(bad(format!("param.{i} has shape {:?}", p.dims())));
        }
        var.set(&p)?;
        moments.push((get(format!("m.{i}"))?, get(format!("v.{i}"))?));
    }
    opt.restore(steps, moments)?;
    Ok(state)
}

/// Drops the checkpoint once the adapter is written (a missing file is fine).
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}
