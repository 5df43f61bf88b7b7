//! Fine-tuning on a live server, end to end: the real binary serving a tiny random model on
//! 127.0.0.1:0 with API keys.
//!
//! - The jobs API driven by the official `openai` Python client (`tests/e2e/jobs_e2e.py`, with
//!   `openai` installed from PyPI once into `target/`): a job to success and its model in use,
//!   tenant isolation, cancellation; then the server is killed (SIGKILL) while a job trains and
//!   restarted: finished jobs and their models are back, the killed job is failed.
//! - `lorahost train --push`: the adapter is servable when `train` exits.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const ALICE: &str = "alice-jobs-key-0123456789";
const BOB: &str = "bob-jobs-key-0123456789ab";
const ADMIN: &str = "admin-jobs-key-0123456789";

fn facts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/facts/train.jsonl")
}

/// A directory holding `openai` and `requests`, installed once per target directory (shared with
/// `serve_e2e`).
fn python_packages() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-python");
    let ready = dir.join(".installed");
    if ready.is_file() {
        return dir;
    }
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts"])
        .args(["--upgrade", "--target"])
        .arg(&dir)
        .args(["openai", "requests"])
        .output()
        .expect("python3 -m pip runs");
    assert!(out.status.success(), "pip install openai failed:\n{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&ready, b"").expect("marker");
    dir
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
                 [[keys]]\nkey = \"{ADMIN}\"\ntenant = \"ops\"\nadmin = true\n"
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

/// A running `lorahost serve`; stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(setup: &Setup) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lorahost"))
            .args(["serve", "--dtype", "f32", "--port", "0", "--threads", "1", "--train-threads", "1"])
            .arg("--model")
            .arg(setup.model())
            .arg("--adapters-dir")
            .arg(setup.path("adapters"))
            .arg("--api-keys")
            .arg(setup.path("keys.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lorahost serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            let line = lines.next().expect("server printed its address").expect("stderr line");
            if let Some(at) = line.find("http://") {
                break line[at..].trim().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, url }
    }

    /// SIGKILL: no chance to record anything.
    fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    fn stop(mut self) -> std::process::ExitStatus {
        terminate(&self.child);
        self.child.wait().expect("wait")
    }

    /// One HTTP/1.1 request; returns the status and the body.
    fn request(&self, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
        let authority = self.url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(authority).expect("connect");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("read");
        let status = reply.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }
}

fn terminate(child: &Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&self.child);
            let _ = self.child.wait();
        }
    }
}

fn python(phase: &str, server: &Server, state: &Path, packages: &Path) {
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
    let packages = python_packages();
    let setup = Setup::new();
    let state = setup.path("state.json");
    let server = Server::start(&setup);
    python("first", &server, &state, &packages);
    // A job is training now: a kill leaves its record saying `running`.
    server.kill();
    let server = Server::start(&setup);
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
    let server = Server::start(&setup);

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
