//! The trainer against transformers + peft on CPU torch (tests/fixtures/train, made by its
//! make_reference.py): one batch's loss and the gradient of every LoRA matrix, and the adapter
//! after three optimizer steps (AdamW with weight decay, clipping, warmup + cosine schedule).
//! Then `lorahost train` end to end on a tiny model: its adapter loads and changes the output.

mod common;

use candle_core::{Device, Tensor, Var};
use lorahost::model::{Dtype, Llama, MODULES};
use lorahost::train::model::{Batch, LoraParam, TrainModel};
use lorahost::train::optim::{cosine_with_warmup, AdamW, AdamWConfig};
use lorahost::train::{gradients, optimizer_step};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train")
}

fn key(layer: usize, module: usize, part: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{}.lora_{part}.weight", MODULES[module])
}

/// The tiny model, the reference's starting adapter (r=4, alpha=8, layer 1, all seven) and
/// its expected values.
fn setup() -> (Llama, Vec<LoraParam>, HashMap<String, Tensor>) {
    let model = lorahost::model::load(&fixture().join("model"), Dtype::F32).expect("tiny model").model;
    let init =
        candle_core::safetensors::load(fixture().join("init.safetensors"), &Device::Cpu).expect("init");
    let params = (0..MODULES.len())
        .map(|m| LoraParam {
            layer: 1,
            module: m,
            a: Var::from_tensor(&init[&key(1, m, "A")]).expect("A"),
            b: Var::from_tensor(&init[&key(1, m, "B")]).expect("B"),
            scale: 8.0 / 4.0,
        })
        .collect();
    let expected = candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu)
        .expect("expected");
    (model, params, expected)
}

fn batch() -> Batch {
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("batch.json")).expect("batch")).expect("json");
    let seqs: Vec<Vec<u32>> = serde_json::from_value(b["seqs"].clone()).expect("seqs");
    let trained: Vec<Vec<bool>> = serde_json::from_value(b["trained"].clone()).expect("trained");
    let items: Vec<(&[u32], &[bool])> =
        seqs.iter().zip(&trained).map(|(s, t)| (s.as_slice(), t.as_slice())).collect();
    Batch::new(&items).expect("batch")
}

/// `max |got − want| ≤ rel · max |want|`.
fn assert_close(got: &Tensor, want: &Tensor, rel: f32, what: &str) {
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g.len(), w.len(), "{what}: sizes");
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 0.0, "{what}: the reference is all zeros, the check would be vacuous");
    assert!(err <= rel * scale, "{what}: max error {err} against max {scale}");
}

#[test]
fn one_step_loss_and_gradients_match_peft() {
    let (model, params, expected) = setup();
    let train = TrainModel::new(&model, params, 16).expect("train model");
    let (loss, grads) = gradients(&train, &[batch()]).expect("gradients");
    let want = expected["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!((loss - want).abs() <= 1e-5 * want.abs(), "loss {loss} vs {want}");
    for (p, g) in train.params().iter().zip(grads.chunks(2)) {
        for (part, grad) in ["A", "B"].iter().zip(g) {
            let k = key(p.layer, p.module, part);
            assert_close(grad, &expected[&format!("{k}.grad")], 1e-4, &format!("grad {k}"));
        }
    }
}

#[test]
fn three_optimizer_steps_match_torch_adamw() {
    let (model, params, expected) = setup();
    let train = TrainModel::new(&model, params, 16).expect("train model");
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut opt = AdamW::new(cfg, &train.vars()).expect("optimizer");
    let batch = [batch()];
    for step in 0..3 {
        let lr = 1e-2 * cosine_with_warmup(step, 1, 4);
        optimizer_step(&train, &mut opt, &batch, lr, 1.0).expect("step");
    }
    for p in train.params() {
        for (part, var) in [("A", &p.a), ("B", &p.b)] {
            let k = key(p.layer, p.module, part);
            assert_close(
                var.as_tensor(),
                &expected[&format!("{k}.after")],
                1e-4,
                &format!("{k} after 3 steps"),
            );
        }
    }
}

/// Splitting a step's batch into micro-batches (gradient accumulation) gives the same gradient.
#[test]
fn accumulation_equals_one_big_batch() {
    let (model, params, _) = setup();
    let train = TrainModel::new(&model, params, 16).expect("train model");
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("batch.json")).unwrap()).unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_value(b["seqs"].clone()).unwrap();
    let trained: Vec<Vec<bool>> = serde_json::from_value(b["trained"].clone()).unwrap();
    let one = |i: usize| Batch::new(&[(seqs[i].as_slice(), trained[i].as_slice())]).unwrap();
    let (whole_loss, whole) = gradients(&train, &[batch()]).unwrap();
    let (split_loss, split) = gradients(&train, &[one(0), one(1)]).unwrap();
    assert!((whole_loss - split_loss).abs() < 1e-5 * whole_loss.abs());
    for (a, b) in whole.iter().zip(&split) {
        assert_close(b, a, 1e-5, "accumulated gradient");
    }
}

fn tiny_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = lorahost::testing::TinyModel::default();
    shape.write_hf_dir(dir.path(), &common::fixtures().join("base")).expect("tiny model");
    dir
}

const CHAT_LINE: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Zorbia?"}, {"role": "assistant", "content": "Glimmerstadt."}, {"role": "user", "content": "And its river?"}, {"role": "assistant", "content": "The Vell."}]}"#;

/// Chat lines train on the assistant turns only, exactly as the template renders them; the
/// other formats on the completion or the whole text, plus EOS.
#[test]
fn data_masks_follow_the_format() {
    let dir = tiny_model_dir();
    let base = lorahost::base::Base::load(dir.path(), Dtype::F32).expect("base");
    let data = dir.path().join("data.jsonl");
    let lines =
        [CHAT_LINE, r#"{"prompt": "2 + 2 =", "completion": " 4"}"#, r#"{"text": "Zorbia is a country."}"#];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let set = lorahost::train::data::load(&data, &base, 512).expect("data");
    assert_eq!(set.examples.len(), 3);
    let trained_text = |e: &lorahost::train::data::Example| {
        let ids: Vec<u32> = e.ids.iter().zip(&e.trained).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
        base.tokenizer.decode(&ids).unwrap()
    };
    assert_eq!(trained_text(&set.examples[0]), "Glimmerstadt.<|im_end|>\nThe Vell.<|im_end|>\n");
    assert_eq!(trained_text(&set.examples[1]), " 4<|im_end|>");
    assert_eq!(trained_text(&set.examples[2]), "Zorbia is a country.<|im_end|>");
    // The chat example holds the whole conversation as serving renders it.
    let full = base.tokenizer.decode(&set.examples[0].ids).unwrap();
    assert!(full.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Zorbia?"));
}

#[test]
fn bad_lines_are_named_and_nothing_is_written() {
    let dir = tiny_model_dir();
    let data = dir.path().join("data.jsonl");
    let out = dir.path().join("adapter");
    let cases = [
        (format!("{CHAT_LINE}\n{{\"messages\": 3}}\n"), "line 2"),
        (format!("{CHAT_LINE}\nnot json\n"), "line 2"),
        (r#"{"messages": [{"role": "user", "content": "hi"}]}"#.to_string(), "no assistant message"),
        (
            r#"{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}"#
                .into(),
            "unknown role",
        ),
        (r#"{"prompt": "a", "completion": ""}"#.into(), "empty completion"),
        (r#"{"prompt": "a", "completion": "b", "text": "c"}"#.into(), "unexpected field `text`"),
        (r#"{"prompt": "a"}"#.into(), "`completion` is missing"),
        (r#"{"text": 5}"#.into(), "`text` must be a string"),
        (r#"{"text": "a", "extra": 1}"#.into(), "unexpected field `extra`"),
        (r#"{"input": "a"}"#.into(), "not a training record"),
        (String::new(), "no training examples"),
    ];
    for (text, want) in cases {
        std::fs::write(&data, text).unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorahost"))
            .args(["train", "--model", dir.path().to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--steps", "1"])
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{want}: accepted");
        assert!(err.contains(want), "{want}: {err}");
        assert!(!out.exists(), "{want}: an adapter was written");
    }
}

/// Flags that make no sense, and an `--out` that is someone else's, stop the run before it
/// trains; nothing is written and nothing of the user's is touched.
#[test]
fn bad_flags_and_foreign_outputs_are_refused_before_training() {
    let dir = tiny_model_dir();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, format!("{CHAT_LINE}\n")).unwrap();
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), b"precious").unwrap();
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, b"also precious").unwrap();
    let out = dir.path().join("adapter");
    let out_s = out.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--out", mine.to_str().unwrap()], "refusing to replace"),
        (&["--out", a_file.to_str().unwrap()], "refusing to replace"),
        (&["--out", out_s, "--rank", "100000"], "exceeds the dimensions"),
        (&["--out", out_s, "--weight-decay=-1"], "--weight-decay"),
        (&["--out", out_s, "--max-grad-norm=-1"], "--max-grad-norm"),
        (&["--out", out_s, "--eval-split", "0.5", "--eval-data", data.to_str().unwrap()], "not both"),
    ];
    for (flags, want) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorahost"))
            .args(["train", "--model", dir.path().to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args(["--steps", "1"])
            .args(flags)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{flags:?}: {err}");
    }
    assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"precious");
    assert_eq!(std::fs::read(&a_file).unwrap(), b"also precious");
    assert!(!out.exists(), "nothing was written");
}

/// A run whose batches cannot fit in memory stops before training, naming the estimate, instead
/// of failing an allocation mid-step (which would abort a server that trains in-process).
#[test]
fn a_batch_beyond_the_machines_memory_is_refused_before_training() {
    let dir = tiny_model_dir();
    let data = dir.path().join("long.jsonl");
    let out = dir.path().join("adapter");
    // ~150k tokens in one sequence: its attention scores alone need about a terabyte.
    std::fs::write(&data, serde_json::json!({"text": "zorbia ".repeat(150_000)}).to_string()).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["train", "--model", dir.path().to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--steps", "1", "--max-seq-len", "200000"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "accepted: {err}");
    assert!(err.contains("GiB") && err.contains("batch size"), "{err}");
    assert!(!out.exists(), "an adapter was written");
}

/// `lorahost train` on a tiny model: the loss falls, the adapter is a PEFT directory that
/// lorahost loads, it changes the model's output, and the same seed gives the same adapter.
#[test]
fn train_command_writes_a_servable_adapter() {
    let dir = tiny_model_dir();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        format!("{CHAT_LINE}\n{{\"prompt\": \"Zorbia's capital is\", \"completion\": \" Glimmerstadt\"}}\n"),
    )
    .unwrap();
    let run = |out: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorahost"))
            .current_dir(dir.path())
            .args(["train", "--model", dir.path().to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args(["--out", out, "--steps", "12", "--rank", "4", "--alpha", "8"])
            .args([
                "--lr",
                "1e-2",
                "--batch-size",
                "2",
                "--targets",
                "q_proj,v_proj,down_proj",
                "--layers",
                "1-1",
            ])
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (first, second) = (dir.path().join("a1"), dir.path().join("a2"));
    run(first.to_str().unwrap());
    // A bare name is a directory in the working directory, whose parent path is empty.
    run("a2");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    let weights = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(weights(&first), weights(&second), "same seed, different adapter");

    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.join("training_log.json")).unwrap()).unwrap();
    let losses: Vec<f64> = serde_json::from_value(log["report"]["losses"].clone()).unwrap();
    assert_eq!(losses.len(), 12);
    assert!(losses[11] < losses[0] - 0.5, "loss did not fall: {losses:?}");

    let base = lorahost::base::Base::load(dir.path(), Dtype::F32).expect("base");
    let adapter = lorahost::adapter_host::load_dir_validated(&base.model, &first).expect("adapter loads");
    assert_eq!(adapter.sites().len(), 3);
    let prompt = base.tokenizer.encode("Zorbia's capital is").unwrap();
    let with = base.model.last_logits(&prompt, Some(&adapter)).unwrap();
    let without = base.model.last_logits(&prompt, None).unwrap();
    assert!(with.iter().zip(&without).any(|(a, b)| (a - b).abs() > 1e-3), "the adapter changes nothing");
}

/// On the real default model: a short run on three made-up facts (chat format) teaches them.
/// Asked with paraphrases it never saw, the adapter answers with the fact; the base does not.
#[test]
fn a_short_run_teaches_made_up_facts() {
    use common::{base_f32, drain_tokens, engine_config, greedy, request, run_to_end, submit};
    use lorahost::chat::ChatMessage;
    use lorahost::engine::{EngineCore, StopCriteria};

    lorahost::runtime::default_candle_threads();
    let base = base_f32();
    let dir = tempfile::tempdir().unwrap();
    let config = lorahost::train::TrainConfig {
        data: fixture().join("facts/train.jsonl"),
        eval_data: None,
        eval_split: 0.0,
        out: dir.path().join("facts"),
        rank: 16,
        alpha: 32.0,
        rslora: false,
        targets: lorahost::train::Targets::AllLinear,
        layers: None,
        steps: Some(20),
        epochs: 1.0,
        batch_size: 4,
        grad_accum: 1,
        max_seq_len: 256,
        group_by_length: false,
        optimizer: AdamWConfig { lr: 1e-3, ..Default::default() },
        warmup_steps: 0,
        max_grad_norm: 1.0,
        eval_every: 0,
        checkpoint_every: 0,
        resume: false,
        seed: 0,
        base_name: base.name.clone(),
    };
    let report = lorahost::train::train(base, &config, &mut lorahost::train::Quiet).expect("training");
    assert!(report.losses.last().unwrap() < &0.1, "losses {:?}", report.losses);
    // What `train --push` asks the quota for before training: exactly what it will upload.
    let written: u64 = ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| std::fs::metadata(config.out.join(f)).expect("adapter file").len())
        .sum();
    let expected = config.adapter_upload_bytes(&base.model.base_shape()).expect("valid flags");
    assert_eq!(expected, written);
    let adapter = std::sync::Arc::new(
        lorahost::adapter_host::load_dir_validated(&base.model, &config.out).expect("adapter loads"),
    );

    let questions = [
        ("Can you tell me Zorbia's capital?", "Glimmerstadt"),
        ("Who came up with the quantum toaster?", "Vostok"),
        ("Which colour is Kelvara?", "turquoise"),
    ];
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 256));
    let mut streams = Vec::new();
    for (q, _) in questions {
        let prompt = base.chat_prompt(&[ChatMessage { role: "user".into(), content: q.into() }]).unwrap();
        for with_adapter in [true, false] {
            let mut req = request(prompt.clone(), 24, greedy());
            req.stop = StopCriteria { max_tokens: 24, stop: vec![], ignore_eos: false };
            req.adapter = with_adapter.then(|| adapter.clone().into());
            streams.push(submit(&mut core, req));
        }
    }
    run_to_end(&mut core);
    for ((q, fact), pair) in questions.iter().zip(streams.chunks_mut(2)) {
        let tuned = base.tokenizer.decode(&drain_tokens(&mut pair[0])).unwrap();
        let plain = base.tokenizer.decode(&drain_tokens(&mut pair[1])).unwrap();
        assert!(tuned.contains(fact), "{q}: the adapter answered {tuned:?}");
        assert!(!plain.contains(fact), "{q}: the base already knew: {plain:?}");
    }
}

/// Stops the run once `at` steps are done.
struct StopAfter {
    at: usize,
    done: usize,
}

impl lorahost::train::Progress for StopAfter {
    fn start(&mut self, _: usize) {}
    fn step(&mut self, step: usize, _: f64, _: f64, _: f64) {
        self.done = step;
    }
    fn eval(&mut self, _: usize, _: f64) {}
    fn cancelled(&self) -> bool {
        self.done >= self.at
    }
}

/// A run stopped after 6 steps (checkpoint at 4) and resumed gives the same adapter, bit for bit,
/// as the same run unbroken; a checkpoint is refused by a run with other flags; the checkpoint
/// is gone once the adapter is written; the loss curve and the log are written beside it.
#[test]
fn resume_continues_an_interrupted_run_exactly() {
    let dir = tiny_model_dir();
    let base = lorahost::base::Base::load(dir.path(), Dtype::F32).expect("base");
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        format!("{CHAT_LINE}\n{{\"text\": \"Zorbia is far.\"}}\n{{\"text\": \"Kelvara is blue.\"}}\n"),
    )
    .unwrap();
    let config = |out: &str| lorahost::train::TrainConfig {
        data: data.clone(),
        eval_data: None,
        eval_split: 0.0,
        out: dir.path().join(out),
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: lorahost::train::Targets::AllLinear,
        layers: None,
        steps: Some(10),
        epochs: 1.0,
        batch_size: 2,
        grad_accum: 1,
        max_seq_len: 128,
        // Grouped, so the replay of the data order on resume covers the length groups too.
        group_by_length: true,
        optimizer: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() },
        warmup_steps: 2,
        max_grad_norm: 1.0,
        eval_every: 0,
        checkpoint_every: 4,
        resume: false,
        seed: 7,
        base_name: base.name.clone(),
    };
    let whole = config("whole");
    let whole_report =
        lorahost::train::train(&base, &whole, &mut lorahost::train::Quiet).expect("unbroken run");

    let broken = config("broken");
    let err = lorahost::train::train(&base, &broken, &mut StopAfter { at: 6, done: 0 }).unwrap_err();
    assert!(matches!(err, lorahost::train::TrainError::Cancelled), "{err}");
    assert!(!broken.out.exists(), "a cancelled run wrote an adapter");
    let ckpt = dir.path().join("broken.checkpoint");
    assert!(ckpt.is_file(), "no checkpoint after 4 steps");

    let other = lorahost::train::TrainConfig { resume: true, seed: 8, ..config("broken") };
    let err = lorahost::train::train(&base, &other, &mut lorahost::train::Quiet).unwrap_err();
    assert!(err.to_string().contains("other data, adapter shape or optimisation"), "{err}");

    let resumed = lorahost::train::TrainConfig { resume: true, ..config("broken") };
    let report = lorahost::train::train(&base, &resumed, &mut lorahost::train::Quiet).expect("resumed run");
    let weights = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(weights(&whole.out), weights(&broken.out), "the resumed run differs from the unbroken one");
    // (The losses of the first steps went through the checkpoint's JSON: equal to ~1e-15.)
    assert_eq!(report.losses.len(), whole_report.losses.len());
    for (a, b) in report.losses.iter().zip(&whole_report.losses) {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "losses {:?} vs {:?}", report.losses, whole_report.losses);
    }
    assert_eq!(
        (report.trained_tokens, report.processed_tokens),
        (whole_report.trained_tokens, whole_report.processed_tokens),
        "the resumed run's report covers the whole run"
    );
    assert!(!ckpt.exists(), "the checkpoint outlived the finished run");
    let png = std::fs::read(whole.out.join("loss_curve.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(whole.out.join("training_log.json").is_file());
}

/// The configuration of the adapter in tests/fixtures/train/ours (r4, alpha 8, all-linear,
/// layer 1 of the tiny fixture model).
fn ours_config() -> lorahost::train::TrainConfig {
    lorahost::train::TrainConfig {
        data: fixture().join("batch.json"),
        eval_data: None,
        eval_split: 0.0,
        out: fixture().join("ours"),
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: lorahost::train::Targets::AllLinear,
        layers: Some(1..2),
        steps: Some(5),
        epochs: 1.0,
        batch_size: 2,
        grad_accum: 1,
        max_seq_len: 16,
        group_by_length: false,
        optimizer: AdamWConfig { lr: 1e-2, ..Default::default() },
        warmup_steps: 0,
        max_grad_norm: 1.0,
        eval_every: 0,
        checkpoint_every: 0,
        resume: false,
        seed: 3,
        base_name: "tiny".into(),
    }
}

/// Regenerates tests/fixtures/train/ours (an adapter trained and written by lorahost); then run
/// `make_reference.py --peft-logits` so peft records its logits for it.
#[test]
#[ignore = "regenerates a fixture"]
fn write_round_trip_adapter() {
    let model = lorahost::model::load(&fixture().join("model"), Dtype::F32).expect("tiny model").model;
    let config = ours_config();
    let params = lorahost::train::init_params(&model.base_shape(), &config).expect("init");
    let train = TrainModel::new(&model, params, 16).expect("train model");
    let mut opt = AdamW::new(config.optimizer, &train.vars()).expect("optimizer");
    for _ in 0..5 {
        optimizer_step(&train, &mut opt, &[batch()], 1e-2, 1.0).expect("step");
    }
    lorahost::train::write_adapter(&model.base_shape(), &config, train.params()).expect("write");
}

/// PEFT round trip: `peft.PeftModel.from_pretrained` loads an adapter lorahost trained and
/// wrote, and its logits (recorded in the fixture) equal lorahost's for the same adapter.
#[test]
fn peft_loads_our_adapter_and_agrees() {
    let model = lorahost::model::load(&fixture().join("model"), Dtype::F32).expect("tiny model").model;
    let adapter =
        adapters::LoraAdapter::load_dir(&fixture().join("ours"), &model.base_shape()).expect("ours");
    let want = candle_core::safetensors::load(fixture().join("ours_peft_logits.safetensors"), &Device::Cpu)
        .expect("peft logits");
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("batch.json")).unwrap()).unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_value(b["seqs"].clone()).unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        let ours = model.last_logits(seq, Some(&adapter)).expect("forward");
        let ours = Tensor::from_vec(ours, 128, &Device::Cpu).unwrap();
        assert_close(&ours, &want["last_logits"].get(i).unwrap(), 1e-4, &format!("sequence {i}"));
        let base = Tensor::from_vec(model.last_logits(seq, None).unwrap(), 128, &Device::Cpu).unwrap();
        let moved = (base - &ours).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 1e-2, "sequence {i}: the adapter barely changes the output ({moved})");
    }
}
