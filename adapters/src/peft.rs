//! PEFT LoRA weights: reading `adapter_model.safetensors` against a resident base (every key,
//! shape, dtype and value checked before anything is used) and writing adapters in the same
//! format. The result, `LoraAdapter`, holds `A`/`B` per (layer, module) site with its scale: f32
//! as read, or int8 once quantized for serving next to a quantized base. Which sites a config
//! targets is `plan`'s.

use super::config::AdapterSpec;
use super::plan::SitePlan;
use super::{AdapterError, AdapterId};
use kernels::lora::{Int8LoraMatrices, LoraMatrices, LoraSiteWeights};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// File names of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's pickled weights file: never loaded (unpickling runs code), always refused by name.
pub const PICKLE_FILE: &str = "adapter_model.bin";
/// The prefix PEFT puts before a module path when it saves.
const KEY_PREFIX: &str = "base_model.model.";

/// A linear layer of the base that adapters may target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleShape {
    /// Path inside a decoder layer, e.g. `self_attn.q_proj`.
    pub path: String,
    pub out_features: usize,
    pub in_features: usize,
}

/// What an adapter must fit: the base's layer count and its targetable linear layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShape {
    pub num_layers: usize,
    pub modules: Vec<ModuleShape>,
}

impl BaseShape {
    /// The module path of layer `layer`, as PEFT names it (`model.layers.3.self_attn.q_proj`).
    pub fn module_name(&self, layer: usize, module: usize) -> String {
        format!("model.layers.{layer}.{}", self.modules[module].path)
    }
}

/// One adapted linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSite {
    pub layer: usize,
    /// Index into `BaseShape::modules`.
    pub module: usize,
    pub rank: usize,
    /// The factor on `B A x`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
    pub matrices: SiteMatrices,
    /// DoRA magnitude `m`, `[out_features]`, as PEFT saves it.
    pub magnitude: Option<Vec<f32>>,
    /// DoRA factor `m / ‖W + scale·B A‖` per output row, computed against the base by
    /// `LoraAdapter::set_dora_factors` before the adapter is used.
    pub dora_factor: Option<Vec<f32>>,
}

/// How a site's `A` and `B` are held.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteMatrices {
    /// As PEFT stores them: `a` `[rank, in_features]`, `b` `[out_features, rank]`, row-major.
    F32 { a: Vec<f32>, b: Vec<f32> },
    /// Quantized for serving: a quarter of the bytes (see `kernels::lora::Int8LoraMatrices`).
    Int8(Int8LoraMatrices),
}

impl LoraSite {
    /// `A` and `B` in PEFT's f32 layout, unless the site was quantized.
    pub fn f32_matrices(&self) -> Option<(&[f32], &[f32])> {
        match &self.matrices {
            SiteMatrices::F32 { a, b } => Some((a, b)),
            SiteMatrices::Int8(_) => None,
        }
    }

    /// The borrowed form the LoRA kernels take.
    pub fn kernel_weights(&self) -> LoraSiteWeights<'_> {
        LoraSiteWeights {
            matrices: match &self.matrices {
                SiteMatrices::F32 { a, b } => LoraMatrices::F32 { a, b },
                SiteMatrices::Int8(q) => q.view(),
            },
            rank: self.rank,
            scale: self.scale,
            dora_factor: self.dora_factor.as_deref(),
        }
    }

    fn bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let matrices = match &self.matrices {
            SiteMatrices::F32 { a, b } => (a.len() + b.len()) * f,
            SiteMatrices::Int8(q) => q.bytes(),
        };
        let vectors =
            self.magnitude.as_ref().map_or(0, Vec::len) + self.dora_factor.as_ref().map_or(0, Vec::len);
        matrices + vectors * f
    }
}

/// A validated adapter, ready for the kernels.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub id: AdapterId,
    pub spec: AdapterSpec,
    sites: Vec<LoraSite>,
    /// `sites` index of (layer, module) at `layer * modules + module`: the model asks for every
    /// site of every adapter of a step (thousands of lookups at decode), so this is one load.
    index: Vec<Option<u32>>,
    modules: usize,
}

impl LoraAdapter {
    /// Reads and validates a PEFT adapter directory.
    pub fn load_dir(dir: &Path, base: &BaseShape) -> Result<Self, AdapterError> {
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() && dir.join(PICKLE_FILE).is_file() {
            return Err(AdapterError::Format(format!(
                "{}: only {WEIGHTS_FILE} is accepted; {PICKLE_FILE} (pickle) is never loaded, convert it with safetensors",
                dir.display()
            )));
        }
        let read = |p: &Path| std::fs::read(p).map_err(|e| AdapterError::Io(format!("{}: {e}", p.display())));
        let config = read(&dir.join(CONFIG_FILE))?;
        let weights = read(&weights_path)?;
        Self::from_bytes(&config, &weights, base)
    }

    /// Validates an adapter given as the bytes of its two files.
    pub fn from_bytes(config: &[u8], weights: &[u8], base: &BaseShape) -> Result<Self, AdapterError> {
        let spec = AdapterSpec::from_json(config)?;
        let plan = SitePlan::new(&spec, base)?;
        let tensors = SafeTensors::deserialize(weights).map_err(|e| {
            AdapterError::Format(format!("{WEIGHTS_FILE} is not a valid safetensors file: {e}"))
        })?;
        // (layer, module) → the key and values of its A, B and magnitude.
        let mut found: BTreeMap<(usize, usize), [Option<KeyedValues>; 3]> = BTreeMap::new();
        let mut tensors = tensors.tensors();
        // safetensors hands them over in hash order: sorted, the same file fails the same way.
        tensors.sort_by(|l, r| l.0.cmp(&r.0));
        for (key, view) in tensors {
            let (layer, module, part) = parse_key(&key, base)?;
            let Some(&(rank, _)) = plan.sites.get(&(layer, module)) else {
                return Err(AdapterError::Key {
                    key,
                    reason: "this module is not targeted by adapter_config.json".into(),
                });
            };
            // `X.lora_A.weight` and `X.lora_A.default.weight` are one tensor to PEFT.
            if let Some((first, _)) = found.get(&(layer, module)).and_then(|s| s[part as usize].as_ref()) {
                return Err(AdapterError::Key {
                    reason: format!("the same tensor as `{first}`; an adapter holds each once"),
                    key,
                });
            }
            let m = &base.modules[module];
            let expected = match part {
                Part::A => vec![rank, m.in_features],
                Part::B => vec![m.out_features, rank],
                Part::Magnitude if spec.use_dora => vec![m.out_features],
                Part::Magnitude => {
                    return Err(AdapterError::Key {
                        key,
                        reason: "a DoRA magnitude, but use_dora is false".into(),
                    })
                }
            };
            if view.shape() != expected.as_slice() {
                return Err(AdapterError::Key {
                    key,
                    reason: format!(
                        "shape {:?}, expected {expected:?} for the base and this rank",
                        view.shape()
                    ),
                });
            }
            let values = to_f32(&key, view.dtype(), view.data())?;
            if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                return Err(AdapterError::Key { key, reason: format!("holds a non-finite value ({bad})") });
            }
            found.entry((layer, module)).or_default()[part as usize] = Some((key, values));
        }
        let mut sites = Vec::with_capacity(plan.sites.len());
        for (&(layer, module), &(rank, scale)) in &plan.sites {
            let name = base.module_name(layer, module);
            let [a, b, magnitude] = found.remove(&(layer, module)).unwrap_or_default();
            let missing = |suffix: &str| AdapterError::Key {
                key: format!("{KEY_PREFIX}{name}.{suffix}"),
                reason: "missing".into(),
            };
            let (_, a) = a.ok_or_else(|| missing("lora_A.weight"))?;
            let (_, b) = b.ok_or_else(|| missing("lora_B.weight"))?;
            let magnitude = magnitude.map(|(_, m)| m);
            if spec.use_dora && magnitude.is_none() {
                return Err(missing("lora_magnitude_vector"));
            }
            let matrices = SiteMatrices::F32 { a, b };
            sites.push(LoraSite { layer, module, rank, scale, matrices, magnitude, dora_factor: None });
        }
        let modules = base.modules.len();
        let mut index = vec![None; base.num_layers * modules];
        for (i, s) in sites.iter().enumerate() {
            index[s.layer * modules + s.module] = u32::try_from(i).ok();
        }
        Ok(Self { id: AdapterId::of_files(config, weights), spec, sites, index, modules })
    }

    /// The adapter's weights at one site, if it adapts that layer and module.
    pub fn site(&self, layer: usize, module: usize) -> Option<&LoraSite> {
        if module >= self.modules {
            return None;
        }
        let i = self.index.get(layer * self.modules + module).copied().flatten()?;
        self.sites.get(i as usize)
    }

    pub fn sites(&self) -> &[LoraSite] {
        &self.sites
    }

    /// Whether DoRA factors still have to be computed against the base.
    pub fn needs_dora_factors(&self) -> bool {
        self.sites.iter().any(|s| s.magnitude.is_some() && s.dora_factor.is_none())
    }

    /// Computes each DoRA site's factor with `factor(site)`, which knows the base weights.
    pub fn set_dora_factors<E>(
        &mut self,
        mut factor: impl FnMut(&LoraSite) -> Result<Vec<f32>, E>,
    ) -> Result<(), E> {
        for site in self.sites.iter_mut().filter(|s| s.magnitude.is_some()) {
            site.dora_factor = Some(factor(site)?);
        }
        Ok(())
    }

    /// Stores every site's `A` and `B` in int8 with per-row scales (a quarter of the bytes),
    /// dropping the f32 copy. Compute DoRA factors first: they need the f32 weights.
    pub fn quantize_int8(&mut self, base: &BaseShape) -> Result<(), AdapterError> {
        for s in &mut self.sites {
            let SiteMatrices::F32 { a, b } = &s.matrices else { continue };
            let m = base
                .modules
                .get(s.module)
                .ok_or_else(|| AdapterError::Format(format!("the base has no module {}", s.module)))?;
            s.matrices =
                SiteMatrices::Int8(Int8LoraMatrices::quantize(a, b, s.rank, m.in_features, m.out_features));
        }
        Ok(())
    }

    /// Memory the weights take.
    pub fn bytes(&self) -> usize {
        self.sites.iter().map(LoraSite::bytes).sum()
    }
}

/// Writes a PEFT adapter directory: `adapter_config.json` (as given) and
/// `adapter_model.safetensors` with PEFT's key names. See [`write_adapter_dir_with`].
pub fn write_adapter_dir(
    dir: &Path,
    config: &serde_json::Value,
    sites: &[LoraSite],
    base: &BaseShape,
) -> Result<(), AdapterError> {
    write_adapter_dir_with(dir, config, sites, base, |_| Ok(()))
}

/// Whether `dir` may be replaced by an adapter: absent, an empty directory, or an adapter
/// directory (it holds `adapter_config.json`). Anything else is the user's and is refused, never
/// overwritten.
pub fn check_replaceable(dir: &Path) -> Result<(), AdapterError> {
    let refuse = |what: &str| {
        Err(AdapterError::Io(format!(
            "{} exists and is {what}: refusing to replace it (give a new directory, or an adapter's)",
            dir.display()
        )))
    };
    match std::fs::symlink_metadata(dir) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_dir() => refuse("not a directory"),
        Ok(_) if dir.join(CONFIG_FILE).is_file() => Ok(()),
        Ok(_) if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none()) => Ok(()),
        Ok(_) => refuse(&format!("a directory without {CONFIG_FILE}")),
    }
}

/// The tensors PEFT saves for one site, keys and shapes, in the order `A`, `B`, then DoRA's
/// magnitude vector if `dora`.
fn site_tensors(
    base: &BaseShape,
    layer: usize,
    module: usize,
    rank: usize,
    dora: bool,
) -> Vec<(String, Vec<usize>)> {
    let m = &base.modules[module];
    let name = base.module_name(layer, module);
    let mut tensors = vec![
        (format!("{KEY_PREFIX}{name}.lora_A.weight"), vec![rank, m.in_features]),
        (format!("{KEY_PREFIX}{name}.lora_B.weight"), vec![m.out_features, rank]),
    ];
    if dora {
        tensors.push((format!("{KEY_PREFIX}{name}.lora_magnitude_vector"), vec![m.out_features]));
    }
    tensors
}

/// The exact length of the `adapter_model.safetensors` [`write_adapter_dir`] writes for f32
/// LoRA (not DoRA) sites at these `(layer, module, rank)`, known before any weight exists: what
/// a quota must find room for before a run spends time training.
pub fn weights_file_len(
    base: &BaseShape,
    sites: impl IntoIterator<Item = (usize, usize, usize)>,
) -> Result<u64, AdapterError> {
    let mut tensors = Vec::new();
    for (layer, module, rank) in sites {
        if module >= base.modules.len() {
            return Err(AdapterError::Format(format!("no module {module}")));
        }
        tensors.extend(site_tensors(base, layer, module, rank, false));
    }
    // The order safetensors stores them in: by dtype (all f32 here), then by key.
    tensors.sort_by(|l, r| l.0.cmp(&r.0));
    let overflow = || AdapterError::Format("the adapter's size overflows".into());
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(tensors.len());
    for (key, shape) in tensors {
        let len = shape
            .iter()
            .try_fold(std::mem::size_of::<f32>(), |n, &d| n.checked_mul(d))
            .ok_or_else(overflow)?;
        let end = offset.checked_add(len).ok_or_else(overflow)?;
        infos.push((key, TensorInfo { dtype: Dtype::F32, shape, data_offsets: (offset, end) }));
        offset = end;
    }
    let metadata = Metadata::new(None, infos).map_err(|e| AdapterError::Format(e.to_string()))?;
    let header = serde_json::to_string(&metadata).map_err(|e| AdapterError::Format(e.to_string()))?;
    // An 8-byte length, then the header padded to a multiple of 8, then the data.
    Ok((8 + header.len().next_multiple_of(8) + offset) as u64)
}

/// [`write_adapter_dir`], with `extra` adding files of its own to the new directory before it
/// is published (a training log, say). The directory appears complete, extras included, or not
/// at all: everything is written and synced in a sibling scratch directory that then takes its
/// place; an existing adapter directory is swapped out in one step (`durable::replace_dir`), and
/// anything that is not an adapter directory is refused ([`check_replaceable`]). Scratch
/// directories a killed writer left beside `dir` are removed first.
pub fn write_adapter_dir_with(
    dir: &Path,
    config: &serde_json::Value,
    sites: &[LoraSite],
    base: &BaseShape,
    extra: impl FnOnce(&Path) -> Result<(), AdapterError>,
) -> Result<(), AdapterError> {
    check_replaceable(dir)?;
    let io = |what: &str, e: std::io::Error| AdapterError::Io(format!("{what}: {e}"));
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * sites.len());
    for s in sites {
        let m = base
            .modules
            .get(s.module)
            .ok_or_else(|| AdapterError::Format(format!("no module {}", s.module)))?;
        let Some((a, b)) = s.f32_matrices() else {
            return Err(AdapterError::Format(format!(
                "site {} is quantized; only f32 adapters are written",
                base.module_name(s.layer, s.module)
            )));
        };
        if a.len() != s.rank * m.in_features || b.len() != m.out_features * s.rank {
            return Err(AdapterError::Format(format!(
                "site {} has the wrong shape",
                base.module_name(s.layer, s.module)
            )));
        }
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let values = [Some(a), Some(b), s.magnitude.as_deref()].into_iter().flatten();
        let names = site_tensors(base, s.layer, s.module, s.rank, s.magnitude.is_some());
        tensors.extend(names.into_iter().zip(values).map(|((key, shape), v)| (key, shape, bytes(v))));
    }
    let views = tensors
        .iter()
        .map(|(k, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| AdapterError::Format(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = safetensors::serialize(views, None).map_err(|e| AdapterError::Format(e.to_string()))?;
    let config = serde_json::to_vec_pretty(config).map_err(|e| AdapterError::Format(e.to_string()))?;

    let parent = super::durable::parent_dir(dir);
    std::fs::create_dir_all(parent).map_err(|e| io("creating the parent directory", e))?;
    let leaf =
        dir.file_name().ok_or_else(|| AdapterError::Io(format!("{} has no file name", dir.display())))?;
    let scratch_prefix = format!(".{}.tmp-", leaf.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(parent) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&scratch_prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = parent.join(format!("{scratch_prefix}{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| io("creating a temp directory", e))?;
    for (name, bytes) in [(CONFIG_FILE, &config), (WEIGHTS_FILE, &weights)] {
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(tmp.join(name))?;
            f.write_all(bytes)?;
            f.sync_all()
        };
        write().map_err(|e| io(name, e))?;
    }
    extra(&tmp)?;
    crate::durable::sync_dir(&tmp).map_err(|e| AdapterError::Io(e.to_string()))?;
    crate::durable::replace_dir(&tmp, dir)
        .map_err(|e| AdapterError::Io(format!("publishing the adapter: {e}")))
}

impl crate::cache::CacheValue for LoraAdapter {
    fn bytes(&self) -> usize {
        LoraAdapter::bytes(self)
    }
}

/// A tensor's key and its values as f32.
type KeyedValues = (String, Vec<f32>);

#[derive(Debug, Clone, Copy)]
enum Part {
    A = 0,
    B = 1,
    Magnitude = 2,
}

/// `base_model.model.model.layers.N.<path>.lora_{A,B}[.default].weight` → (layer, module, part).
fn parse_key(key: &str, base: &BaseShape) -> Result<(usize, usize, Part), AdapterError> {
    let bad = |reason: &str| AdapterError::Key { key: key.to_string(), reason: reason.to_string() };
    let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| bad("does not start with `base_model.model.`"))?;
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module_path, part) = if let Some(m) = rest.strip_suffix(".lora_A") {
        (m, Part::A)
    } else if let Some(m) = rest.strip_suffix(".lora_B") {
        (m, Part::B)
    } else if let Some(m) = rest.strip_suffix(".lora_magnitude_vector") {
        (m, Part::Magnitude)
    } else {
        return Err(bad("not a LoRA weight (lora_A, lora_B and DoRA's lora_magnitude_vector are accepted)"));
    };
    let inner = module_path.strip_prefix("model.layers.").ok_or_else(|| bad("not inside model.layers"))?;
    let (layer, path) = inner.split_once('.').ok_or_else(|| bad("no module after the layer index"))?;
    // `01` or `+1` would name layer 1 too, and so could collide with its real key.
    let canonical = !layer.is_empty()
        && layer.bytes().all(|c| c.is_ascii_digit())
        && (layer == "0" || !layer.starts_with('0'));
    if !canonical {
        return Err(bad("the layer index is not a plain decimal number (no sign, no leading zeros)"));
    }
    let layer: usize = layer.parse().map_err(|_| bad("the layer index is out of range"))?;
    if layer >= base.num_layers {
        return Err(bad(&format!("layer {layer} does not exist (the base has {})", base.num_layers)));
    }
    let module = base
        .modules
        .iter()
        .position(|m| m.path == path)
        .ok_or_else(|| bad("not a linear layer of the base"))?;
    Ok((layer, module, part))
}

fn to_f32(key: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, AdapterError> {
    let chunks = |n: usize| data.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(AdapterError::Key {
                key: key.to_string(),
                reason: format!("dtype {other:?} is not supported (F32, F16, BF16)"),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_base() -> BaseShape {
        let m = |path: &str, out, inp| ModuleShape { path: path.into(), out_features: out, in_features: inp };
        BaseShape {
            num_layers: 2,
            modules: vec![
                m("self_attn.q_proj", 8, 8),
                m("self_attn.v_proj", 4, 8),
                m("mlp.down_proj", 8, 16),
            ],
        }
    }

    fn tensor_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn adapter_files(config: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> (Vec<u8>, Vec<u8>) {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> =
            tensors.iter().map(|(k, s, v)| (k.to_string(), s.clone(), tensor_bytes(v))).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(k, s, b)| {
                (k.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap())
            })
            .collect();
        (config.as_bytes().to_vec(), safetensors::serialize(views, None).unwrap())
    }

    fn key(layer: usize, module: &str, part: &str) -> String {
        format!("base_model.model.model.layers.{layer}.{module}.lora_{part}.weight")
    }

    fn qv_tensors(rank: usize, layers: &[usize]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut t = Vec::new();
        for &l in layers {
            t.push((key(l, "self_attn.q_proj", "A"), vec![rank, 8], vec![0.5; rank * 8]));
            t.push((key(l, "self_attn.q_proj", "B"), vec![8, rank], vec![0.25; 8 * rank]));
            t.push((key(l, "self_attn.v_proj", "A"), vec![rank, 8], vec![0.5; rank * 8]));
            t.push((key(l, "self_attn.v_proj", "B"), vec![4, rank], vec![0.25; 4 * rank]));
        }
        t
    }

    fn load(config: &str, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<LoraAdapter, AdapterError> {
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
            tensors.iter().map(|(k, s, v)| (k.as_str(), s.clone(), v.clone())).collect();
        let (c, w) = adapter_files(config, &refs);
        LoraAdapter::from_bytes(&c, &w, &tiny_base())
    }

    #[test]
    fn loads_targeted_sites_with_scale() {
        let a =
            load(r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj","v_proj"]}"#, qv_tensors(2, &[0, 1]))
                .unwrap();
        assert_eq!(a.sites().len(), 4);
        let s = a.site(1, 1).unwrap();
        assert_eq!((s.rank, s.scale), (2, 2.0));
        assert!(a.site(0, 2).is_none());
        assert_eq!(a.bytes(), 2 * (16 + 16 + 16 + 8) * 4);
    }

    #[test]
    fn quantized_sites_hold_a_quarter_and_are_not_written() {
        let mut a =
            load(r#"{"r":4,"lora_alpha":8,"target_modules":["q_proj","v_proj"]}"#, qv_tensors(4, &[0, 1]))
                .unwrap();
        let f32_bytes = a.bytes();
        a.quantize_int8(&tiny_base()).unwrap();
        // Per site: 4 rank rows of A (8 bytes each) and of Bᵀ, plus 4 + 4 f32 row scales.
        let per_site = |out: usize| 4 * 8 + 4 * out + 8 * 4;
        assert_eq!(a.bytes(), 2 * (per_site(8) + per_site(4)));
        assert!(a.bytes() * 2 < f32_bytes);
        let site = a.site(1, 1).unwrap();
        assert!(site.f32_matrices().is_none());
        assert!(matches!(site.kernel_weights().matrices, LoraMatrices::Int8 { .. }));
        let dir = tempfile::tempdir().unwrap();
        let err = write_adapter_dir(&dir.path().join("q"), &serde_json::json!({}), a.sites(), &tiny_base());
        assert!(err.unwrap_err().to_string().contains("quantized"));
        assert!(!dir.path().join("q").exists());
    }

    #[test]
    fn layers_and_rank_pattern() {
        let mut t = qv_tensors(2, &[1]);
        // v_proj of layer 1 gets rank 3 through rank_pattern.
        t.retain(|(k, _, _)| !k.contains("v_proj"));
        t.push((key(1, "self_attn.v_proj", "A"), vec![3, 8], vec![0.1; 24]));
        t.push((key(1, "self_attn.v_proj", "B"), vec![4, 3], vec![0.1; 12]));
        let cfg = r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj","v_proj"],"layers_to_transform":[1],"rank_pattern":{"v_proj":3},"alpha_pattern":{"v_proj":6}}"#;
        let a = load(cfg, t).unwrap();
        assert_eq!(a.sites().len(), 2);
        assert_eq!((a.site(1, 1).unwrap().rank, a.site(1, 1).unwrap().scale), (3, 2.0));
        assert!(a.site(0, 0).is_none());
    }

    #[test]
    fn regex_targets_and_exclusions() {
        let cfg = r#"{"r":2,"target_modules":".*\\.(q|v)_proj","exclude_modules":["model.layers.0.self_attn.v_proj"]}"#;
        let mut t = qv_tensors(2, &[0, 1]);
        t.retain(|(k, _, _)| !k.contains("layers.0.self_attn.v_proj"));
        let a = load(cfg, t).unwrap();
        assert_eq!(a.sites().len(), 3);
    }

    #[test]
    fn written_adapters_read_back_identically() {
        let a =
            load(r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj","v_proj"]}"#, qv_tensors(2, &[0, 1]))
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]});
        write_adapter_dir(&out, &config, a.sites(), &tiny_base()).unwrap();
        write_adapter_dir(&out, &config, a.sites(), &tiny_base()).unwrap();
        let back = LoraAdapter::load_dir(&out, &tiny_base()).unwrap();
        assert_eq!(back.sites(), a.sites());
        let leftovers: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temp directories left: {leftovers:?}");
    }

    #[test]
    fn the_weights_file_length_is_known_before_the_weights() {
        let mut mixed_ranks = qv_tensors(2, &[1]);
        mixed_ranks.retain(|(k, _, _)| !k.contains("v_proj"));
        mixed_ranks.push((key(1, "self_attn.v_proj", "A"), vec![3, 8], vec![0.1; 24]));
        mixed_ranks.push((key(1, "self_attn.v_proj", "B"), vec![4, 3], vec![0.1; 12]));
        for (cfg, tensors) in [
            (r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj","v_proj"]}"#, qv_tensors(2, &[0, 1])),
            (
                r#"{"r":2,"target_modules":["q_proj","v_proj"],"layers_to_transform":[1],"rank_pattern":{"v_proj":3}}"#,
                mixed_ranks,
            ),
        ] {
            let a = load(cfg, tensors).unwrap();
            let dir = tempfile::tempdir().unwrap();
            write_adapter_dir(dir.path(), &serde_json::json!({}), a.sites(), &tiny_base()).unwrap();
            let written = std::fs::metadata(dir.path().join(WEIGHTS_FILE)).unwrap().len();
            let sites = a.sites().iter().map(|s| (s.layer, s.module, s.rank));
            assert_eq!(weights_file_len(&tiny_base(), sites).unwrap(), written, "{cfg}");
        }
        assert!(weights_file_len(&tiny_base(), [(0, 3, 2)]).is_err(), "no such module");
        assert!(weights_file_len(&tiny_base(), [(0, 0, usize::MAX)]).is_err(), "overflow");
    }

    #[test]
    fn only_adapter_directories_are_replaced_and_stale_scratch_goes() {
        let a =
            load(r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj","v_proj"]}"#, qv_tensors(2, &[0, 1]))
                .unwrap();
        let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]});
        let root = tempfile::tempdir().unwrap();
        let mine = root.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("notes.txt"), b"precious").unwrap();
        let file = root.path().join("afile");
        std::fs::write(&file, b"also precious").unwrap();
        for dir in [&mine, &file] {
            let err = write_adapter_dir(dir, &config, a.sites(), &tiny_base()).unwrap_err().to_string();
            assert!(err.contains("refusing to replace"), "{err}");
        }
        assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"precious");
        assert_eq!(std::fs::read(&file).unwrap(), b"also precious");
        // An empty directory is fine, and so is an adapter; a killed writer's scratch is removed.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::create_dir(root.path().join(".empty.tmp-999999")).unwrap();
        write_adapter_dir_with(&empty, &config, a.sites(), &tiny_base(), |staged| {
            std::fs::write(staged.join("log.json"), b"{}").map_err(|e| AdapterError::Io(e.to_string()))
        })
        .unwrap();
        write_adapter_dir(&empty, &config, a.sites(), &tiny_base()).unwrap();
        assert!(!empty.join("log.json").exists(), "a replacement holds only what it was given");
        let mut names: Vec<_> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["afile", "empty", "mine"]);
    }

    #[test]
    fn truncated_files_and_wrong_dtypes_are_refused() {
        let cfg = r#"{"r":2,"target_modules":["q_proj","v_proj"]}"#;
        let refs: Vec<(String, Vec<usize>, Vec<f32>)> = qv_tensors(2, &[0, 1]);
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
            refs.iter().map(|(k, s, v)| (k.as_str(), s.clone(), v.clone())).collect();
        let (c, w) = adapter_files(cfg, &refs);
        let err = LoraAdapter::from_bytes(&c, &w[..w.len() - 7], &tiny_base()).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
        let ints: Vec<u8> = vec![0; 16 * 4];
        let views = vec![(
            key(0, "self_attn.q_proj", "A"),
            safetensors::tensor::TensorView::new(Dtype::I32, vec![2, 8], &ints).unwrap(),
        )];
        let w = safetensors::serialize(views, None).unwrap();
        let err = LoraAdapter::from_bytes(&c, &w, &tiny_base()).unwrap_err().to_string();
        assert!(err.contains("q_proj.lora_A.weight") && err.contains("I32"), "{err}");
    }

    #[test]
    fn pickle_only_adapters_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"r":2,"target_modules":["q_proj"]}"#).unwrap();
        std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
        let err = LoraAdapter::load_dir(dir.path(), &tiny_base()).unwrap_err().to_string();
        assert!(err.contains("pickle"), "{err}");
    }

    #[test]
    fn rejections_name_the_key() {
        let cfg = r#"{"r":2,"target_modules":["q_proj","v_proj"]}"#;
        let check = |tensors: Vec<(String, Vec<usize>, Vec<f32>)>, needle: &str| {
            let err = load(cfg, tensors).unwrap_err().to_string();
            assert!(err.contains(needle), "expected `{needle}` in: {err}");
        };
        let mut t = qv_tensors(2, &[0, 1]);
        t[0].1 = vec![3, 8];
        t[0].2 = vec![0.0; 24];
        check(t, "layers.0.self_attn.q_proj.lora_A.weight");
        let mut t = qv_tensors(2, &[0, 1]);
        t[1].2[3] = f32::NAN;
        check(t, "non-finite");
        let mut t = qv_tensors(2, &[0, 1]);
        t.pop();
        check(t, "layers.1.self_attn.v_proj.lora_B.weight");
        let mut t = qv_tensors(2, &[0, 1]);
        t.push((key(5, "self_attn.q_proj", "A"), vec![2, 8], vec![0.0; 16]));
        check(t, "layer 5 does not exist");
        let mut t = qv_tensors(2, &[0, 1]);
        t.push((key(0, "mlp.down_proj", "A"), vec![2, 16], vec![0.0; 32]));
        check(t, "not targeted");
        let mut t = qv_tensors(2, &[0, 1]);
        t.push(("base_model.model.lm_head.weight".into(), vec![2], vec![0.0; 2]));
        check(t, "lm_head");
        let (c, _) = adapter_files(cfg, &[]);
        let err = LoraAdapter::from_bytes(&c, b"not safetensors", &tiny_base()).unwrap_err().to_string();
        assert!(err.contains("safetensors"), "{err}");
        let err = load(r#"{"r":2,"target_modules":["nothing_here"]}"#, vec![]).unwrap_err().to_string();
        assert!(err.contains("target_modules"), "{err}");
    }
}
