//! Shared test helpers: fixture paths, tiny models, running requests through the engine core.

#![allow(dead_code)]

pub mod fake;
pub mod http;
pub mod tenants;

use lorahost::base::Base;
use lorahost::engine::{EngineConfig, EngineCore, SamplingParams, StopCriteria, TokenEvent, ValidRequest};
use lorahost::model::{Dtype, KvCacheConfig};
use lorahost::testing::TinyModel;
use std::path::PathBuf;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// The default model in `--dtype f32`, loaded once per test binary (fetched once per machine).
pub fn base_f32() -> &'static Base {
    static BASE: std::sync::OnceLock<Base> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let path = lorahost::fetch::default_model().expect("default model");
        Base::load(&path, Dtype::F32).expect("load default model")
    })
}

/// A JSON list of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// A JSON file under the golden fixtures.
pub fn golden_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture");
    serde_json::from_str(&text).expect("fixture json")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

/// A tiny random model in a temp directory, loaded.
pub fn tiny_base(shape: TinyModel) -> (tempfile::TempDir, Base) {
    let dir = tempfile::tempdir().expect("tempdir");
    shape.write_hf_dir(dir.path(), &fixtures().join("base")).expect("write tiny model");
    let base = Base::load(dir.path(), Dtype::F32).expect("load tiny model");
    (dir, base)
}

pub fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> ValidRequest {
    ValidRequest {
        prompt_ids: prompt,
        sampling,
        stop: StopCriteria { max_tokens, stop: vec![], ignore_eos: true },
        adapter: None,
    }
}

pub fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..Default::default() }
}

pub fn seeded(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 50, seed: Some(seed), ..Default::default() }
}

pub fn engine_config(kv_bytes: usize, block_size: usize, step_tokens: usize) -> EngineConfig {
    EngineConfig {
        max_step_tokens: step_tokens,
        max_running: 64,
        kv_cache: KvCacheConfig { budget_bytes: kv_bytes, block_size },
        ..Default::default()
    }
}

pub fn submit(core: &mut EngineCore, req: ValidRequest) -> UnboundedReceiver<TokenEvent> {
    let (tx, rx) = unbounded_channel();
    core.add(req, tx).expect("request accepted");
    rx
}

/// Token ids of a finished request's stream; panics if it failed or did not finish.
pub fn drain_tokens(rx: &mut UnboundedReceiver<TokenEvent>) -> Vec<u32> {
    let mut ids = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            TokenEvent::Token(t) => ids.push(t.id),
            TokenEvent::Finished(_) => return ids,
            TokenEvent::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("request did not finish");
}

pub fn run_to_end(core: &mut EngineCore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while core.has_work() {
        if !core.step().expect("step") {
            // Waiting for an adapter load.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(std::time::Instant::now() < deadline, "engine does not terminate");
    }
}

/// A directory holding the `openai` and `requests` Python packages, installed once per target
/// directory; pass it as `PYTHONPATH`.
pub fn e2e_python_packages() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-python");
    let ready = dir.join(".installed");
    if ready.is_file() {
        return dir;
    }
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts"])
        .args(["--upgrade", "--target"])
        .arg(&dir)
        .args(["openai", "requests"])
        .output()
        .expect("python3 -m pip runs");
    assert!(
        out.status.success(),
        "pip install openai requests failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&ready, b"").expect("marker");
    dir
}

/// A running `lorahost serve` started with `--port 0`: its address read from its log, its log
/// drained afterwards; SIGTERM (graceful) when dropped.
pub struct ServeProcess {
    child: std::process::Child,
    pub url: String,
}

impl ServeProcess {
    /// Starts `serve` with `args` (everything after the subcommand).
    pub fn start<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lorahost"));
        command.arg("serve").args(args);
        Self::spawn(command)
    }

    /// Starts a prepared `lorahost serve` command (for tests that set up the process itself).
    pub fn spawn(mut command: std::process::Command) -> Self {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lorahost serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(stderr).lines();
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait: the server drains and exits by itself.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate();
        self.child.wait().expect("wait")
    }

    /// SIGKILL: no chance to record anything.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// One HTTP/1.1 request; returns the status and the body.
    pub fn request(&self, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
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

    fn terminate(&self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
            let _ = self.child.wait();
        }
    }
}
