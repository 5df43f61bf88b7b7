//! PEFT's own reading of `adapter_config.json` and of the weights' keys, checked through the
//! public API: which modules an adapter targets (`check_target_module_exists`), which
//! `rank_pattern` / `alpha_pattern` key a module takes (`get_pattern_key`), which
//! `init_lora_weights` change the base, and what an error names.

use adapters::{AdapterError, AdapterSpec, BaseShape, LoraAdapter, ModuleShape, TargetModules};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const Q: &str = "self_attn.q_proj";
const V: &str = "self_attn.v_proj";
const DOWN: &str = "mlp.down_proj";

/// Two layers of q_proj (8×8), v_proj (out 4, in 8) and down_proj (out 8, in 16).
fn base() -> BaseShape {
    let m = |path: &str, out, inp| ModuleShape { path: path.into(), out_features: out, in_features: inp };
    BaseShape { num_layers: 2, modules: vec![m(Q, 8, 8), m(V, 4, 8), m(DOWN, 8, 16)] }
}

fn dims(module: &str) -> (usize, usize) {
    let b = base();
    let m = b.modules.iter().find(|m| m.path == module).expect("a module of the base");
    (m.out_features, m.in_features)
}

/// `lora_A` and `lora_B` of one site, under the layer spelling `layer` and PEFT's key names.
fn site_named(layer: &str, module: &str, rank: usize) -> Vec<(String, Vec<usize>)> {
    let (out, inp) = dims(module);
    let key = |part: &str| format!("base_model.model.model.layers.{layer}.{module}.lora_{part}.weight");
    vec![(key("A"), vec![rank, inp]), (key("B"), vec![out, rank])]
}

fn site(layer: usize, module: &str, rank: usize) -> Vec<(String, Vec<usize>)> {
    site_named(&layer.to_string(), module, rank)
}

fn weights(tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect()
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((k, s), d)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), d).expect("a valid view")))
        .collect();
    safetensors::serialize(views, None).expect("serializable")
}

fn load(config: &str, tensors: &[(String, Vec<usize>)]) -> Result<LoraAdapter, AdapterError> {
    LoraAdapter::from_bytes(config.as_bytes(), &weights(tensors), &base())
}

fn spec(config: &str) -> Result<AdapterSpec, AdapterError> {
    AdapterSpec::from_json(config.as_bytes())
}

fn err(result: Result<impl std::fmt::Debug, AdapterError>) -> String {
    result.expect_err("expected a rejection").to_string()
}

/// (layer, module index, rank, scale) of every site.
fn sites(a: &LoraAdapter) -> Vec<(usize, usize, usize, f32)> {
    a.sites().iter().map(|s| (s.layer, s.module, s.rank, s.scale)).collect()
}

#[test]
fn only_inits_that_change_the_base_are_refused() {
    for init in ["\"pissa\"", "\"pissa_niter_4\"", "\"olora\"", "\"loftq\"", "\"corda\"", "\"lora_ga\""] {
        let e = err(spec(&format!(r#"{{"r":8,"target_modules":["q_proj"],"init_lora_weights":{init}}}"#)));
        assert!(e.contains("`init_lora_weights`") && e.contains("base weights"), "{init}: {e}");
    }
    // EVA, orthogonal and MiCA only initialise A and B; the trained weights are in the file.
    for init in ["true", "false", "null", "\"gaussian\"", "\"eva\"", "\"orthogonal\"", "\"mica\""] {
        let cfg = format!(r#"{{"r":8,"target_modules":["q_proj"],"init_lora_weights":{init}}}"#);
        assert!(spec(&cfg).is_ok(), "{init}: {:?}", spec(&cfg));
    }
    // PEFT raises on an initialisation it does not know, so no adapter carries one.
    let e = err(spec(r#"{"r":8,"target_modules":["q_proj"],"init_lora_weights":"mystery"}"#));
    assert!(e.contains("`init_lora_weights`"), "{e}");
}

#[test]
fn pattern_keys_are_tried_in_file_order() {
    // The first key in file order that matches wins, though sorting would put the long key first.
    let cfg = r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],
        "rank_pattern":{"q_proj":3,"model.layers.0.self_attn.q_proj":4},
        "alpha_pattern":{"q_proj":6,"model.layers.0.self_attn.q_proj":16}}"#;
    let t = [site(0, Q, 3), site(1, Q, 3)].concat();
    assert_eq!(sites(&load(cfg, &t).unwrap()), [(0, 0, 3, 2.0), (1, 0, 3, 2.0)]);
    let cfg = r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],
        "rank_pattern":{"model.layers.0.self_attn.q_proj":4,"q_proj":3},
        "alpha_pattern":{"model.layers.0.self_attn.q_proj":16,"q_proj":6}}"#;
    let t = [site(0, Q, 4), site(1, Q, 3)].concat();
    assert_eq!(sites(&load(cfg, &t).unwrap()), [(0, 0, 4, 4.0), (1, 0, 3, 2.0)]);
}

#[test]
fn pattern_keys_match_like_get_pattern_key() {
    // re.match(rf"(.*\.)?({key})$", name): the key ends the name, starting at a `.` boundary.
    let rank_for = |key: &str| {
        let cfg = format!(r#"{{"r":2,"target_modules":["q_proj"],"rank_pattern":{{"{key}":5}}}}"#);
        let expected = |layer: usize| {
            let hit = match key {
                "proj" | "layers.0" => false,
                "layers.0.self_attn.q_proj" => layer == 0,
                _ => true,
            };
            if hit {
                5
            } else {
                2
            }
        };
        let t = [site(0, Q, expected(0)), site(1, Q, expected(1))].concat();
        load(&cfg, &t).map(|a| sites(&a).iter().map(|s| s.2).collect::<Vec<_>>())
    };
    assert_eq!(rank_for("q_proj").unwrap(), [5, 5]);
    assert_eq!(rank_for("proj").unwrap(), [2, 2]);
    assert_eq!(rank_for("layers.0").unwrap(), [2, 2]);
    assert_eq!(rank_for("layers.0.self_attn.q_proj").unwrap(), [5, 2]);
    assert_eq!(rank_for(r"^model\\.layers\\.\\d\\.self_attn\\.q_proj").unwrap(), [5, 5]);
    assert_eq!(rank_for("q_.*").unwrap(), [5, 5]);
}

#[test]
fn repeated_pattern_keys_are_refused() {
    let e = err(spec(r#"{"r":2,"target_modules":["q_proj"],"rank_pattern":{"q_proj":3,"q_proj":4}}"#));
    assert!(e.contains("`rank_pattern`") && e.contains("q_proj"), "{e}");
}

#[test]
fn layers_to_transform_filters_only_suffix_matches() {
    // An entry that is a full module path is matched exactly, in whichever layer it names.
    let cfg =
        r#"{"r":2,"target_modules":["q_proj","model.layers.0.self_attn.v_proj"],"layers_to_transform":[1]}"#;
    let a = load(cfg, &[site(1, Q, 2), site(0, V, 2)].concat()).unwrap();
    assert_eq!(sites(&a).iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(), [(0, 1), (1, 0)]);
    // An empty list means every layer; indices the base lacks never match.
    let all = [site(0, Q, 2), site(1, Q, 2)].concat();
    let a = load(r#"{"r":2,"target_modules":["q_proj"],"layers_to_transform":[]}"#, &all).unwrap();
    assert_eq!(a.sites().len(), 2);
    let cfg = r#"{"r":2,"target_modules":["q_proj"],"layers_to_transform":[1,7],"layers_pattern":"layers"}"#;
    assert_eq!(load(cfg, &site(1, Q, 2)).unwrap().sites().len(), 1);
    let a = load(r#"{"r":2,"target_modules":["q_proj"],"layers_to_transform":1}"#, &site(1, Q, 2)).unwrap();
    assert_eq!(a.sites().len(), 1);
}

#[test]
fn layer_options_peft_refuses_are_refused() {
    for (cfg, name) in [
        (r#"{"r":2,"target_modules":".*q_proj","layers_to_transform":[1]}"#, "`layers_to_transform`"),
        (r#"{"r":2,"target_modules":"all-linear","layers_to_transform":[]}"#, "`layers_to_transform`"),
        (r#"{"r":2,"target_modules":".*q_proj","layers_pattern":"layers"}"#, "`layers_pattern`"),
        (r#"{"r":2,"target_modules":["q_proj"],"layers_pattern":"layers"}"#, "`layers_pattern`"),
        (r#"{"r":2,"target_modules":["q_proj"],"layers_to_transform":["1"]}"#, "`layers_to_transform`"),
    ] {
        let e = err(spec(cfg));
        assert!(e.contains(name), "{cfg}: {e}");
    }
}

#[test]
fn two_tensors_for_one_slot_are_refused() {
    let cfg = r#"{"r":2,"target_modules":["q_proj"]}"#;
    let mut t = [site(0, Q, 2), site(1, Q, 2)].concat();
    t.push(("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight".into(), vec![2, 8]));
    let e = err(load(cfg, &t));
    assert!(
        e.contains("layers.0.self_attn.q_proj.lora_A.weight")
            && e.contains("layers.0.self_attn.q_proj.lora_A.default.weight"),
        "{e}"
    );
}

#[test]
fn layer_indices_must_be_canonical() {
    let cfg = r#"{"r":2,"target_modules":["q_proj"]}"#;
    for spelling in ["01", "+1"] {
        let t = [site(0, Q, 2), site_named(spelling, Q, 2)].concat();
        let e = err(load(cfg, &t));
        assert!(e.contains(&format!("layers.{spelling}.")) && e.contains("layer index"), "{spelling}: {e}");
    }
}

#[test]
fn pattern_regexes_are_checked_with_the_config() {
    for name in ["rank_pattern", "alpha_pattern"] {
        let e = err(spec(&format!(r#"{{"r":2,"target_modules":["q_proj"],"{name}":{{"(q_proj":3}}}}"#)));
        assert!(e.contains(&format!("`{name}`")) && e.contains("(q_proj"), "{e}");
    }
}

#[test]
fn type_errors_name_the_field() {
    for (cfg, name) in [
        (r#"{"r":"8","target_modules":["q_proj"]}"#, "`r`"),
        (r#"{"r":8,"use_rslora":"yes","target_modules":["q_proj"]}"#, "`use_rslora`"),
        (r#"{"r":8,"target_modules":["q_proj"],"rank_pattern":{"q_proj":"x"}}"#, "`rank_pattern`"),
        (r#"{"r":8,"target_modules":["q_proj"],"alpha_pattern":[1]}"#, "`alpha_pattern`"),
        (r#"{"r":8,"lora_alpha":"big","target_modules":["q_proj"]}"#, "`lora_alpha`"),
    ] {
        let e = err(spec(cfg));
        assert!(e.contains(name) && e.contains("invalid type"), "{cfg}: {e}");
    }
    assert!(matches!(spec("{not json"), Err(AdapterError::Json(_))));
}

#[test]
fn scales_must_be_finite_in_f32() {
    let e = err(load(r#"{"r":1,"lora_alpha":1e39,"target_modules":["q_proj"]}"#, &site(0, Q, 1)));
    assert!(e.contains("`lora_alpha`"), "{e}");
    let cfg = r#"{"r":1,"target_modules":["q_proj"],"alpha_pattern":{"q_proj":-1e39}}"#;
    let e = err(load(cfg, &[site(0, Q, 1), site(1, Q, 1)].concat()));
    assert!(e.contains("`alpha_pattern`") && e.contains("q_proj"), "{e}");
}

#[test]
fn edge_cases_read_as_peft_reads_them() {
    // Only target_modules expands the shorthand, case-insensitively; in exclude_modules it is a
    // regex that matches no module.
    assert_eq!(spec(r#"{"r":2,"target_modules":"ALL-Linear"}"#).unwrap().targets, TargetModules::AllLinear);
    let cfg = r#"{"r":2,"target_modules":["q_proj"],"exclude_modules":"all-linear"}"#;
    assert_eq!(load(cfg, &[site(0, Q, 2), site(1, Q, 2)].concat()).unwrap().sites().len(), 2);
    // PEFT sets fan_in_fan_out back to false on nn.Linear, and every module here is one.
    let cfg = r#"{"r":2,"target_modules":["q_proj"],"fan_in_fan_out":true}"#;
    assert_eq!(load(cfg, &[site(0, Q, 2), site(1, Q, 2)].concat()).unwrap().sites().len(), 2);
    // A rank above min(in, out) is only wasteful: PEFT trains and saves it.
    let a = load(r#"{"r":6,"target_modules":["v_proj"]}"#, &[site(0, V, 6), site(1, V, 6)].concat()).unwrap();
    assert_eq!(a.site(1, 1).map(|s| s.rank), Some(6));
}

#[test]
fn lora_variants_with_other_weights_or_forward_are_refused_by_name() {
    for option in ["use_bdlora", "arrow_config", "velora_config", "monteclora_config", "kasa_config"] {
        let set = format!(r#"{{"r":8,"target_modules":["q_proj"],"{option}":{{"top_k":2}}}}"#);
        let e = err(spec(&set));
        assert!(e.contains(&format!("`{option}`")), "{option}: {e}");
        for off in ["null", "false"] {
            let unset = format!(r#"{{"r":8,"target_modules":["q_proj"],"{option}":{off}}}"#);
            assert!(spec(&unset).is_ok(), "{option}: {off}: {:?}", spec(&unset));
        }
    }
}
