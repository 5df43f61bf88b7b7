//! `adapter_config.json` as PEFT writes it (`PeftConfig`, the wire type) and the validated
//! `AdapterSpec` lorahost works with. Only plain LoRA is accepted; every option that changes the
//! base model or needs weights lorahost does not serve is rejected by name. Which modules of a
//! base a spec targets is `plan`'s.

use super::AdapterError;
use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::HashSet;
use std::marker::PhantomData;

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
    /// Keys in the file's order (see [`ModulePatterns`]).
    #[serde(default, deserialize_with = "ordered_map")]
    pub rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "ordered_map")]
    pub alpha_pattern: Vec<(String, f64)>,
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
    /// LoRA variants whose weights or forward differ from plain LoRA's (block-diagonal B, routing
    /// among experts, sampled or vector-scaled updates): refused when set.
    pub use_bdlora: Option<serde_json::Value>,
    pub arrow_config: Option<serde_json::Value>,
    pub velora_config: Option<serde_json::Value>,
    pub monteclora_config: Option<serde_json::Value>,
    pub kasa_config: Option<serde_json::Value>,
}

/// The `PeftConfig` fields whose type serde checks (the `serde_json::Value` ones take anything):
/// a type error in one of them is reported under its name.
const TYPED_FIELDS: [&str; 13] = [
    "peft_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "bias",
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "use_qalora",
];

/// Which modules an adapter targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names matched against the last component(s) of a module path (`q_proj`), or a
    /// whole module path matched exactly.
    Names(Vec<String>),
    /// A regular expression matched against the whole module path.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

/// A `rank_pattern` or `alpha_pattern`: keys in the file's order, each compiled once, because
/// PEFT gives a module the value of the first key in that order that matches its path.
#[derive(Debug, Clone)]
pub struct ModulePatterns<T> {
    entries: Vec<(String, T, Regex)>,
}

impl<T> ModulePatterns<T> {
    fn compile(field_name: &'static str, pairs: Vec<(String, T)>) -> Result<Self, AdapterError> {
        let mut seen = HashSet::new();
        let entries = pairs
            .into_iter()
            .map(|(key, value)| {
                // Python would keep the last value at the first key's place; nobody means that.
                if !seen.insert(key.clone()) {
                    return Err(field(field_name, format!("key `{key}` is given twice")));
                }
                // PEFT's get_pattern_key is `re.match(rf"(.*\.)?({key})$", path)`: anchored at
                // the start only, with the key spliced in as text, so the same text goes in
                // one anchored group here.
                let re = Regex::new(&format!(r"^(?:(?:.*\.)?({key})$)"))
                    .map_err(|e| field(field_name, format!("key `{key}` is not a valid regex: {e}")))?;
                Ok((key, value, re))
            })
            .collect::<Result<_, AdapterError>>()?;
        Ok(Self { entries })
    }

    /// The first key, in file order, matching the module path `module`, with its value.
    pub fn get(&self, module: &str) -> Option<(&str, &T)> {
        self.entries.iter().find(|(_, _, re)| re.is_match(module)).map(|(k, v, _)| (k.as_str(), v))
    }

    /// The keys and values in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries.iter().map(|(k, v, _)| (k.as_str(), v))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

impl<T> Default for ModulePatterns<T> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<T: PartialEq> PartialEq for ModulePatterns<T> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
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
    /// Modules excluded from `targets` (PEFT `exclude_modules`); never `AllLinear`.
    pub exclude: Option<TargetModules>,
    pub rank_pattern: ModulePatterns<usize>,
    pub alpha_pattern: ModulePatterns<f64>,
    /// PEFT `layers_to_transform`: the layers in which a `TargetModules::Names` entry matching a
    /// module path's tail selects it (an entry equal to the whole path selects it anyway).
    /// `None` means every layer; an index the base lacks never matches.
    pub layers: Option<Vec<usize>>,
}

impl AdapterSpec {
    /// Parses and validates `adapter_config.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AdapterError> {
        let wire: PeftConfig = serde_json::from_slice(bytes).map_err(|e| name_the_field(bytes, e))?;
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

/// serde_json says where a value of the wrong type is (line and column), not which field it is
/// in: on that error only, each top-level field is read again on its own to find the one that
/// fails.
fn name_the_field(bytes: &[u8], e: serde_json::Error) -> AdapterError {
    if e.classify() != serde_json::error::Category::Data {
        return AdapterError::Json(e.to_string());
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return AdapterError::Json(e.to_string());
    };
    for (key, value) in fields {
        let Some(&name) = TYPED_FIELDS.iter().find(|f| **f == key) else { continue };
        let alone = serde_json::Value::Object([(key, value)].into_iter().collect());
        if let Err(inner) = serde_json::from_value::<PeftConfig>(alone) {
            return field(name, format!("{inner} (line {}, column {})", e.line(), e.column()));
        }
    }
    AdapterError::Json(e.to_string())
}

/// Reads a JSON object as its (key, value) pairs in file order, `null` as none: PEFT tries
/// pattern keys in that order, so a sorted map would change which key wins. A key given twice
/// stays twice, for `ModulePatterns::compile` to refuse by the field's name.
fn ordered_map<'de, D, T>(deserializer: D) -> Result<Vec<(String, T)>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Ordered<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Ordered<T> {
        type Value = Vec<(String, T)>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object mapping module patterns to values")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::new();
            while let Some(pair) = map.next_entry::<String, T>()? {
                pairs.push(pair);
            }
            Ok(pairs)
        }
    }

    deserializer.deserialize_any(Ordered(PhantomData))
}

fn field(field: &'static str, reason: impl Into<String>) -> AdapterError {
    AdapterError::Field { field, reason: reason.into() }
}

/// Refuses an `init_lora_weights` that PEFT applies by changing the base weights (it subtracts
/// the initial `B A`, or quantizes the base), or one PEFT does not know (it raises on those, so
/// no trained adapter carries one, and a newer method might change the base too).
fn check_init(init: Option<&serde_json::Value>) -> Result<(), AdapterError> {
    let init = match init {
        None | Some(serde_json::Value::Null | serde_json::Value::Bool(_)) => return Ok(()),
        Some(serde_json::Value::String(s)) => s,
        Some(other) => return Err(field("init_lora_weights", format!("unexpected value {other}"))),
    };
    let lower = init.to_lowercase();
    if ["pissa", "corda", "olora", "loftq", "lora_ga"].iter().any(|m| lower.starts_with(m)) {
        return Err(field(
            "init_lora_weights",
            format!("`{init}` changes the base weights; lorahost serves one shared base"),
        ));
    }
    // These only initialise A and B, which the trained adapter's file then replaces.
    if ["gaussian", "eva", "orthogonal", "mica"].contains(&lower.as_str()) {
        return Ok(());
    }
    Err(field("init_lora_weights", format!("`{init}` is not an initialization PEFT knows")))
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
        // `fan_in_fan_out` is not checked: PEFT resets it to false, with a warning, on every
        // nn.Linear it adapts, and every module lorahost adapts is an nn.Linear.
        match self.bias.as_deref() {
            None | Some("none") => {}
            Some(other) => return Err(field("bias", format!("`{other}` is not supported (only \"none\")"))),
        }
        check_init(self.init_lora_weights.as_ref())?;
        if let Some(m) = self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(field(
                "modules_to_save",
                format!("{m:?}: per-adapter replacement modules are not supported"),
            ));
        }
        let targets = match self.target_modules {
            Some(serde_json::Value::String(s)) if s.to_lowercase() == "all-linear" => {
                TargetModules::AllLinear
            }
            Some(v) => parse_modules("target_modules", v)?,
            None => return Err(field("target_modules", "missing")),
        };
        // PEFT expands the `all-linear` shorthand in target_modules only.
        let exclude = match self.exclude_modules {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_modules("exclude_modules", v)?),
        };
        let layers = parse_layers(&targets, self.layers_to_transform, self.layers_pattern)?;
        let unsupported: [(&'static str, bool); 11] = [
            ("lora_bias", self.lora_bias),
            ("use_qalora", self.use_qalora),
            ("layer_replication", is_set(&self.layer_replication)),
            ("target_parameters", is_set(&self.target_parameters)),
            ("trainable_token_indices", is_set(&self.trainable_token_indices)),
            ("alora_invocation_tokens", is_set(&self.alora_invocation_tokens)),
            ("use_bdlora", is_set(&self.use_bdlora)),
            ("arrow_config", is_set(&self.arrow_config)),
            ("velora_config", is_set(&self.velora_config)),
            ("monteclora_config", is_set(&self.monteclora_config)),
            ("kasa_config", is_set(&self.kasa_config)),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(field(name, "this PEFT option is not supported"));
        }
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, r)| *r == 0) {
            return Err(field("rank_pattern", format!("rank of `{key}` must be at least 1")));
        }
        Ok(AdapterSpec {
            rank,
            alpha,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            targets,
            exclude,
            rank_pattern: ModulePatterns::compile("rank_pattern", self.rank_pattern)?,
            alpha_pattern: ModulePatterns::compile("alpha_pattern", self.alpha_pattern)?,
            layers,
        })
    }
}

/// Whether an optional PEFT option is on: present, not `null` and not `false`.
fn is_set(v: &Option<serde_json::Value>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_null() && v.as_bool() != Some(false))
}

/// A list of module names or one regex, as `target_modules` and `exclude_modules` take them.
fn parse_modules(name: &'static str, value: serde_json::Value) -> Result<TargetModules, AdapterError> {
    match value {
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

/// `layers_to_transform` and `layers_pattern`, refused where PEFT's LoraConfig refuses them.
fn parse_layers(
    targets: &TargetModules,
    layers: Option<serde_json::Value>,
    pattern: Option<serde_json::Value>,
) -> Result<Option<Vec<usize>>, AdapterError> {
    let layers = layers.filter(|v| !v.is_null());
    let pattern = pattern.filter(|v| !v.is_null());
    if !matches!(targets, TargetModules::Names(_)) {
        for (name, set) in [("layers_to_transform", layers.is_some()), ("layers_pattern", pattern.is_some())]
        {
            if set {
                return Err(field(
                    name,
                    "only applies to a list of target_modules (PEFT refuses it with a regex or all-linear)",
                ));
            }
        }
    }
    // Empty means "any layer pattern" to PEFT; the base's decoder layers are `layers`.
    let pattern_given = match &pattern {
        None => false,
        Some(serde_json::Value::String(p)) if p.is_empty() => false,
        Some(serde_json::Value::String(p)) if p == "layers" => true,
        Some(serde_json::Value::Array(a)) if a.iter().all(|p| p.as_str() == Some("layers")) => !a.is_empty(),
        Some(other) => {
            return Err(field("layers_pattern", format!("{other}: the base's decoder layers are `layers`")))
        }
    };
    if pattern_given && layers.is_none() {
        return Err(field("layers_pattern", "is given without layers_to_transform, which PEFT refuses"));
    }
    // An index that is not a layer of any base (negative, say) is kept out: it never matches.
    let index = |v: &serde_json::Value| match (v.as_u64(), v.as_i64()) {
        (Some(n), _) => Ok(usize::try_from(n).ok()),
        (None, Some(_)) => Ok(None),
        _ => Err(field("layers_to_transform", format!("{v} is not an integer layer index"))),
    };
    Ok(match layers {
        None => None,
        Some(serde_json::Value::Array(items)) if items.is_empty() => None,
        Some(serde_json::Value::Array(items)) => {
            Some(items.iter().map(index).filter_map(Result::transpose).collect::<Result<_, _>>()?)
        }
        Some(v @ serde_json::Value::Number(_)) => Some(index(&v)?.into_iter().collect()),
        Some(other) => return Err(field("layers_to_transform", format!("unexpected value {other}"))),
    })
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
