//! `lorahost serve` and `lorahost adapters` as a user runs them, on bad input: a bad keys file
//! fails before anything loads and never echoes a key; the client reports unreachable servers and
//! missing files by name.

use std::process::{Command, Output};

fn lorahost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorahost")).args(args).output().expect("run lorahost")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_bad_keys_file_fails_at_once_without_quoting_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "[[keys]]\nkey = \"secret-but-short\"\ntenant = \"a/b\"\n").expect("write");
    // A model path that does not exist: the keys file must be refused before it is looked at.
    let out = lorahost(&[
        "serve",
        "--model",
        "/nonexistent/model.gguf",
        "--api-keys",
        keys.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("keys file: entry 1") && err.contains("tenant"), "{err}");
    assert!(!err.contains("secret-but-short"), "{err}");
    let missing = lorahost(&["serve", "--api-keys", "/nonexistent/keys.toml"]);
    assert!(stderr(&missing).contains("/nonexistent/keys.toml"), "{}", stderr(&missing));
}

#[test]
fn a_zero_upload_limit_is_refused_before_anything_loads() {
    let out = lorahost(&["serve", "--model", "/nonexistent/model.gguf", "--max-uploads", "0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--max-uploads") && err.contains("at least 1"), "{err}");
    assert!(!err.contains("/nonexistent/model.gguf"), "refused before the model is looked at: {err}");
}

#[test]
fn the_adapters_client_names_what_went_wrong() {
    // Port 9 (discard) on loopback: nothing listens there in a test environment.
    let out = lorahost(&["adapters", "list", "--server", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot connect to 127.0.0.1:9"), "{}", stderr(&out));
    let out =
        lorahost(&["adapters", "upload", "x", "/nonexistent/adapter", "--server", "http://127.0.0.1:9"]);
    assert!(stderr(&out).contains("/nonexistent/adapter/adapter_config.json"), "{}", stderr(&out));
    let out = lorahost(&["adapters", "list", "--server", "https://example.invalid"]);
    assert!(stderr(&out).contains("only http://"), "{}", stderr(&out));
}
