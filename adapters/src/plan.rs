//! Which (layer, module) sites of a base an `AdapterSpec` targets, with each site's rank and
//! scale: PEFT's `check_target_module_exists` and `get_pattern_key` over the base's module
//! paths. Reading the weights for those sites is `peft`'s.

use super::config::{AdapterSpec, TargetModules};
use super::peft::BaseShape;
use super::AdapterError;
use regex::Regex;
use std::collections::BTreeMap;

/// The sites a config targets: (layer, module) → (rank, scale).
pub(crate) struct SitePlan {
    pub(crate) sites: BTreeMap<(usize, usize), (usize, f32)>,
}

/// Whether a `Names` entry matches the module path `name`: the whole path, or its tail after
/// a `.` (PEFT: `key in target_modules`, `key.endswith("." + target)`).
fn is_suffix(name: &str, entry: &str) -> bool {
    name.strip_suffix(entry).is_some_and(|head| head.ends_with('.'))
}

fn field(field: &'static str, reason: String) -> AdapterError {
    AdapterError::Field { field, reason }
}

/// PEFT fully matches a `target_modules` or `exclude_modules` string (`re.fullmatch`).
fn full_match(
    field_name: &'static str,
    modules: Option<&TargetModules>,
) -> Result<Option<Regex>, AdapterError> {
    match modules {
        Some(TargetModules::Regex(r)) => Regex::new(&format!("^(?:{r})$"))
            .map(Some)
            .map_err(|e| field(field_name, format!("not a valid regex: {e}"))),
        _ => Ok(None),
    }
}

impl SitePlan {
    pub(crate) fn new(spec: &AdapterSpec, base: &BaseShape) -> Result<Self, AdapterError> {
        let target_regex = full_match("target_modules", Some(&spec.targets))?;
        let exclude_regex = full_match("exclude_modules", spec.exclude.as_ref())?;
        let mut sites = BTreeMap::new();
        for layer in 0..base.num_layers {
            let in_layers = spec.layers.as_ref().is_none_or(|l| l.contains(&layer));
            for module in 0..base.modules.len() {
                let name = base.module_name(layer, module);
                let excluded = match &spec.exclude {
                    None => false,
                    Some(TargetModules::Names(list)) => {
                        list.iter().any(|t| *t == name || is_suffix(&name, t))
                    }
                    Some(TargetModules::Regex(_)) => {
                        exclude_regex.as_ref().is_some_and(|r| r.is_match(&name))
                    }
                    Some(TargetModules::AllLinear) => true,
                };
                let targeted = match &spec.targets {
                    TargetModules::AllLinear => true,
                    TargetModules::Regex(_) => target_regex.as_ref().is_some_and(|r| r.is_match(&name)),
                    // PEFT filters by layer only what an entry matched as a path's tail.
                    TargetModules::Names(list) => {
                        list.contains(&name) || (in_layers && list.iter().any(|t| is_suffix(&name, t)))
                    }
                };
                if excluded || !targeted {
                    continue;
                }
                let rank = spec.rank_pattern.get(&name).map_or(spec.rank, |(_, &r)| r);
                let alpha_key = spec.alpha_pattern.get(&name);
                let alpha = alpha_key.map_or(spec.alpha, |(_, &a)| a);
                // The kernels take the scale as f32; a finite f64 alpha can still overflow it.
                let scale = spec.scaling(rank, alpha) as f32;
                if !scale.is_finite() {
                    let reason = |what: String| {
                        format!("{what} gives {name} (rank {rank}) a scale that is not a finite f32")
                    };
                    return Err(match alpha_key {
                        Some((key, _)) => field("alpha_pattern", reason(format!("`{key}`: {alpha}"))),
                        None => field("lora_alpha", reason(alpha.to_string())),
                    });
                }
                sites.insert((layer, module), (rank, scale));
            }
        }
        if sites.is_empty() {
            return Err(field("target_modules", "matches no linear layer of the base".into()));
        }
        Ok(Self { sites })
    }
}
