//! Fine-tuning on a live server, end to end: the real binary serving a tiny random model on
//! 127.0.0.1:0 with API keys.
//!
//! - The jobs API driven by the official `openai` Python client (`tests/e2e/jobs_e2e.py`, with
//!   `openai` installed from PyPI once into `target/`): a job to success and its model in use,
//!   tenant isolation, cancellation; then the server is killed (SIGKILL) while a job trains and
//!   restarted: finished jobs and their models are back, the killed job is failed.
//! - `lorahost train --push`: the adapter is servable when `train` exits.

mod common;

use common::{e2e_python_packages, ServeProcess};
use std::path::{Path, PathBuf};
use std::process::Command;

const ALICE: &str = "alice-jobs-key-0123456789";
const BOB: &str = "bob-jobs-key-0123456789ab";
const ADMIN: &str = "admin-jobs-key-0123456789";
/// A tenant whose quota holds no adapter of the tiny model's size.
const CAROL: &str = "carol-jobs-key-0123456789";

fn facts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/facts/train.jsonl")
}

/// A tiny model directory, a keys file and an adapters directory.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        lorahost::testing::TinyModel::default()
            .write_hf_dir(&dir.path().join("tiny"), &common::fixtures().join("base"))
            .expect("tiny model");
        std::fs::write(
            dir.path().join("keys.toml"),
            format!(
                "[[keys]]\nkey = \"{ALICE}\"\ntenant = \"alice\"\n\n[[keys]]\nkey = \"{BOB}\"\ntenant = \"bob\"\n\n\
                 [[keys]]\nkey = \"{ADMIN}\"\ntenant = \"ops\"\nadmin = true\n\n\
                 [[keys]]\nkey = \"{CAROL}\"\ntenant = \"carol\"\n\n[tenants.carol]\nmax_adapter_bytes = 1000\n"
            ),
        )
        .expect("keys file");
        Self { dir }
    }

    fn model(&self) -> PathBuf {
        self.dir.path().join("tiny")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The server on the tiny model, with one training thread.
fn start_server(setup: &Setup) -> ServeProcess {
    let flags = "--dtype f32 --port 0 --threads 1 --train-threads 1";
    let mut args: Vec<std::ffi::OsString> = flags.split(' ').map(Into::into).collect();
    args.extend([
        "--model".into(),
        setup.model().into(),
        "--adapters-dir".into(),
        setup.path("adapters").into(),
    ]);
    args.extend(["--api-keys".into(), setup.path("keys.toml").into()]);
    ServeProcess::start(args)
}

fn python(phase: &str, server: &ServeProcess, state: &Path, packages: &Path) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/jobs_e2e.py");
    let out = Command::new("python3")
        .arg(script)
        .args([phase, &server.url])
        .arg(facts())
        .arg(state)
        .args([ALICE, BOB, ADMIN])
        .env("PYTHONPATH", packages)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "jobs e2e phase {phase} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn openai_client_fine_tunes_cancels_and_jobs_survive_a_kill() {
    let packages = e2e_python_packages();
    let setup = Setup::new();
    let state = setup.path("state.json");
    let server = start_server(&setup);
    python("first", &server, &state, &packages);
    // A job is training now: a kill leaves its record saying `running`.
    server.kill();
    let server = start_server(&setup);
    python("after-restart", &server, &state, &packages);
    assert!(server.stop().success(), "SIGTERM stops the server and its jobs cleanly");
}

fn train(setup: &Setup, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args([
            "train",
            "--dtype",
            "f32",
            "--threads",
            "1",
            "--steps",
            "2",
            "--rank",
            "4",
            "--batch-size",
            "2",
        ])
        .arg("--model")
        .arg(setup.model())
        .arg("--data")
        .arg(facts())
        .arg("--out")
        .arg(setup.path("out"))
        .args(extra)
        .output()
        .expect("lorahost train runs")
}

#[test]
fn train_push_makes_the_adapter_servable_when_train_exits() {
    let setup = Setup::new();
    let server = start_server(&setup);

    // Refused before any training: a key the server does not know, a name it would refuse.
    let bad_key =
        train(&setup, &["--push", &server.url, "--name", "pushed", "--api-key", "not-a-key-at-all"]);
    assert!(!bad_key.status.success());
    assert!(
        String::from_utf8_lossy(&bad_key.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&bad_key.stderr)
    );
    let bad_name = train(&setup, &["--push", &server.url, "--name", "../x", "--api-key", ALICE]);
    assert!(!bad_name.status.success());
    let no_room = train(&setup, &["--push", &server.url, "--name", "pushed", "--api-key", CAROL]);
    assert!(!no_room.status.success());
    let message = String::from_utf8_lossy(&no_room.stderr);
    assert!(message.contains("may hold 1000"), "{message}");
    assert!(!setup.path("out").exists(), "nothing was trained");

    let out = train(&setup, &["--push", &server.url, "--name", "pushed", "--api-key", ALICE]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pushed to"));
    let (status, body) = server.request("GET", "/v1/adapters/pushed", ALICE, "");
    assert_eq!(status, 200, "{body}");
    let adapter: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(adapter["rank"], 4);
    assert_eq!(adapter["tenant"], "alice");
    let chat = r#"{"model": "pushed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#;
    let (status, body) = server.request("POST", "/v1/chat/completions", ALICE, chat);
    assert_eq!(status, 200, "{body}");
    let (status, _) = server.request("POST", "/v1/chat/completions", BOB, chat);
    assert_eq!(status, 404, "another tenant cannot use the pushed adapter");
    assert!(server.stop().success());
}
