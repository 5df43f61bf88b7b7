//! `adapter_config.json` as PEFT writes it (`PeftConfig`, the wire type) and the validated
//! `AdapterSpec` lorahost works with. Only plain LoRA is accepted; every option that changes the
//! base model or needs weights lorahost does not serve is rejected by name.

use super::AdapterError;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The fields of `adapter_config.json` lorahost reads; unknown fields are ignored, as PEFT
/// itself adds new ones every release.
#[derive(Debug, Clone, Deserialize)]
pub struct PeftConfig {
    pub peft_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub r: Option<usize>,
    pub lora_alpha: Option<f64>,
    #[serde(default)]
    pub use_rslora: bool,
    pub target_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    pub bias: Option<String>,
    pub init_lora_weights: Option<serde_json::Value>,
    #[serde(default)]
    pub use_dora: bool,
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    pub layers_to_transform: Option<serde_json::Value>,
    pub layers_pattern: Option<serde_json::Value>,
    pub exclude_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub use_qalora: bool,
    pub layer_replication: Option<serde_json::Value>,
    pub target_parameters: Option<serde_json::Value>,
    pub trainable_token_indices: Option<serde_json::Value>,
    pub alora_invocation_tokens: Option<serde_json::Value>,
}

/// Which modules an adapter targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names matched against the last component(s) of a module path (`q_proj`).
    Names(Vec<String>),
    /// A regular expression matched against the whole module path.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

/// A validated LoRA configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// DoRA: each site also carries a magnitude vector.
    pub use_dora: bool,
    pub targets: TargetModules,
    /// Modules excluded from `targets` (PEFT `exclude_modules`).
    pub exclude: Option<TargetModules>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Layers the adapter applies to; `None` means all.
    pub layers: Option<Vec<usize>>,
}

impl AdapterSpec {
    /// Parses and validates `adapter_config.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AdapterError> {
        let wire: PeftConfig =
            serde_json::from_slice(bytes).map_err(|e| AdapterError::Json(e.to_string()))?;
        wire.into_spec()
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA: the factor on `B A x`.
    pub fn scaling(&self, rank: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

fn field(field: &'static str, reason: impl Into<String>) -> AdapterError {
    AdapterError::Field { field, reason: reason.into() }
}

impl PeftConfig {
    pub fn into_spec(self) -> Result<AdapterSpec, AdapterError> {
        match self.peft_type.as_deref() {
            Some("LORA") | None => {}
            Some(other) => return Err(field("peft_type", format!("`{other}` is not supported (only LORA)"))),
        }
        let rank = self.r.ok_or_else(|| field("r", "missing"))?;
        if rank == 0 {
            return Err(field("r", "must be at least 1"));
        }
        let alpha = self.lora_alpha.unwrap_or(8.0);
        if !alpha.is_finite() {
            return Err(field("lora_alpha", "must be a finite number"));
        }
        if self.fan_in_fan_out {
            return Err(field(
                "fan_in_fan_out",
                "true is only used for GPT-2 style Conv1D layers, which lorahost does not serve",
            ));
        }
        match self.bias.as_deref() {
            None | Some("none") => {}
            Some(other) => return Err(field("bias", format!("`{other}` is not supported (only \"none\")"))),
        }
        if let Some(serde_json::Value::String(init)) = &self.init_lora_weights {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "loftq", "corda", "eva"].iter().any(|m| lower.starts_with(m)) {
                return Err(field(
                    "init_lora_weights",
                    format!("`{init}` changes the base weights; lorahost serves one shared base"),
                ));
            }
        }
        if let Some(m) = self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(field(
                "modules_to_save",
                format!("{m:?}: per-adapter replacement modules are not supported"),
            ));
        }
        let targets = match self.target_modules {
            Some(v) => parse_targets("target_modules", v)?,
            None => return Err(field("target_modules", "missing")),
        };
        let exclude = match self.exclude_modules {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_targets("exclude_modules", v)?),
        };
        match &self.layers_pattern {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(p)) if p == "layers" => {}
            Some(serde_json::Value::Array(a)) if a.iter().all(|p| p.as_str() == Some("layers")) => {}
            Some(other) => {
                return Err(field(
                    "layers_pattern",
                    format!("{other}: the base's decoder layers are `layers`"),
                ))
            }
        }
        let unsupported: [(&'static str, bool); 6] = [
            ("lora_bias", self.lora_bias),
            ("use_qalora", self.use_qalora),
            ("layer_replication", is_set(&self.layer_replication)),
            ("target_parameters", is_set(&self.target_parameters)),
            ("trainable_token_indices", is_set(&self.trainable_token_indices)),
            ("alora_invocation_tokens", is_set(&self.alora_invocation_tokens)),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(field(name, "this PEFT option is not supported"));
        }
        if let Some(bad) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(field("rank_pattern", format!("rank of `{}` must be at least 1", bad.0)));
        }
        let layers = match self.layers_to_transform {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| field("layers_to_transform", "must be a layer index"))?
                as usize]),
            Some(serde_json::Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| field("layers_to_transform", "must list layer indices"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => return Err(field("layers_to_transform", format!("unexpected value {other}"))),
        };
        Ok(AdapterSpec {
            rank,
            alpha,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            targets,
            exclude,
            rank_pattern: self.rank_pattern,
            alpha_pattern: self.alpha_pattern,
            layers,
        })
    }
}

fn is_set(v: &Option<serde_json::Value>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_null())
}

fn parse_targets(name: &'static str, value: serde_json::Value) -> Result<TargetModules, AdapterError> {
    match value {
        serde_json::Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
        serde_json::Value::String(s) => Ok(TargetModules::Regex(s)),
        serde_json::Value::Array(items) => Ok(TargetModules::Names(
            items
                .into_iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| field(name, "list items must be strings"))
                })
                .collect::<Result<_, _>>()?,
        )),
        other => Err(field(name, format!("unexpected value {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<AdapterSpec, AdapterError> {
        AdapterSpec::from_json(json.as_bytes())
    }

    #[test]
    fn reads_a_peft_lora_config() {
        let s = spec(r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],"bias":"none","layers_to_transform":[0,2],"some_new_field":1}"#).unwrap();
        assert_eq!(s.rank, 8);
        assert_eq!(s.targets, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(s.layers, Some(vec![0, 2]));
        assert_eq!(s.scaling(8, 16.0), 2.0);
        let rs = spec(r#"{"r":16,"lora_alpha":16,"use_rslora":true,"target_modules":"all-linear"}"#).unwrap();
        assert_eq!(rs.targets, TargetModules::AllLinear);
        assert_eq!(rs.scaling(16, 16.0), 4.0);
        let re = spec(r#"{"r":4,"target_modules":".*\\.(q|v)_proj"}"#).unwrap();
        assert!(matches!(re.targets, TargetModules::Regex(_)));
    }

    #[test]
    fn rejections_name_the_field() {
        let cases = [
            (r#"{"target_modules":["q_proj"]}"#, "`r`"),
            (r#"{"r":0,"target_modules":["q_proj"]}"#, "`r`"),
            (r#"{"r":8,"target_modules":["q_proj"],"bias":"all"}"#, "`bias`"),
            (
                r#"{"r":8,"target_modules":["q_proj"],"init_lora_weights":"pissa_niter_4"}"#,
                "`init_lora_weights`",
            ),
            (r#"{"r":8,"target_modules":["q_proj"],"fan_in_fan_out":true}"#, "`fan_in_fan_out`"),
            (r#"{"r":8,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#, "`modules_to_save`"),
            (r#"{"r":8,"peft_type":"IA3","target_modules":["q_proj"]}"#, "`peft_type`"),
            (r#"{"r":8}"#, "`target_modules`"),
            (r#"{"r":8,"target_modules":["q_proj"],"rank_pattern":{"q_proj":0}}"#, "`rank_pattern`"),
            (r#"{"r":8,"target_modules":["q_proj"],"lora_bias":true}"#, "`lora_bias`"),
            (r#"{"r":8,"target_modules":["q_proj"],"layer_replication":[[0,4]]}"#, "`layer_replication`"),
            (r#"{"r":8,"target_modules":["q_proj"],"layers_pattern":"h"}"#, "`layers_pattern`"),
            (r#"{"r":8,"target_modules":["q_proj"],"exclude_modules":7}"#, "`exclude_modules`"),
        ];
        for (json, name) in cases {
            let err = spec(json).unwrap_err().to_string();
            assert!(err.contains(name), "{json}: {err}");
        }
        assert!(matches!(spec("{not json"), Err(AdapterError::Json(_))));
    }
}
