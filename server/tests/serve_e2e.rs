//! `lorahost serve` end to end: the real binary and the default model in `--dtype f32` on
//! 127.0.0.1:0, driven by the official `openai` Python client and `requests` (installed from PyPI
//! once into `target/`), plus the `lorahost adapters` client. See `tests/e2e/openai_e2e.py` for
//! what is checked; the server is restarted in between to check that uploads persist.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const ALICE: &str = "alice-e2e-key-0123456789";
const BOB: &str = "bob-e2e-key-0123456789ab";
const ADMIN: &str = "admin-e2e-key-0123456789";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

/// A directory holding `openai` and `requests`, installed once per target directory.
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
    assert!(
        out.status.success(),
        "pip install openai requests failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&ready, b"").expect("marker");
    dir
}

/// A running `lorahost serve`; stopped with SIGTERM (graceful) when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(adapters_dir: &Path, keys: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lorahost"))
            .args(["serve", "--dtype", "f32", "--port", "0", "--threads", "2"])
            .args(["--max-running", "1", "--max-waiting", "2", "--max-adapter-bytes", "25165824"])
            .arg("--adapters-dir")
            .arg(adapters_dir)
            .arg("--api-keys")
            .arg(keys)
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

    /// SIGTERM, then wait: the server drains and exits by itself.
    fn stop(mut self) -> std::process::ExitStatus {
        terminate(&self.child);
        self.child.wait().expect("wait")
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

fn python(phase: &str, server: &Server, packages: &Path) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_e2e.py");
    let out = Command::new("python3")
        .arg(script)
        .args([phase, &server.url])
        .arg(fixtures())
        .args([ALICE, BOB, ADMIN])
        .env("PYTHONPATH", packages)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "e2e phase {phase} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `lorahost adapters ARGS --server URL --api-key KEY`; returns stdout, panics on failure.
fn adapters_cli(server: &Server, key: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .arg("adapters")
        .args(args)
        .args(["--server", &server.url, "--api-key", key])
        .output()
        .expect("lorahost adapters runs");
    assert!(out.status.success(), "adapters {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn openai_client_against_the_real_server_with_tenants_and_a_restart() {
    let packages = python_packages();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nkey = \"{ALICE}\"\ntenant = \"alice\"\n\n[[keys]]\nkey = \"{BOB}\"\ntenant = \"bob\"\n\n\
             [[keys]]\nkey = \"{ADMIN}\"\ntenant = \"ops\"\nadmin = true\n"
        ),
    )
    .expect("keys file");
    let adapters_dir = dir.path().join("adapters");

    let server = Server::start(&adapters_dir, &keys);
    python("first", &server, &packages);

    // The adapters client: list, upload, delete.
    let listed = adapters_cli(&server, ALICE, &["list"]);
    assert!(listed.contains("golden-a") && listed.contains("rank 8"), "{listed}");
    let a = fixtures().join("adapters/a_r8_qv");
    let uploaded = adapters_cli(&server, BOB, &["upload", "extra", a.to_str().expect("utf-8 path")]);
    assert!(uploaded.contains("\"generation\": 1"), "{uploaded}");
    assert!(adapters_cli(&server, BOB, &["list"]).contains("extra"));
    adapters_cli(&server, BOB, &["delete", "extra"]);
    assert!(!adapters_cli(&server, BOB, &["list"]).contains("extra"));
    let wrong_key = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["adapters", "list", "--server", &server.url, "--api-key", "not-a-key"])
        .output()
        .expect("runs");
    assert!(!wrong_key.status.success());
    assert!(String::from_utf8_lossy(&wrong_key.stderr).contains("401"));

    assert!(server.stop().success(), "SIGTERM drains and exits cleanly");
    let server = Server::start(&adapters_dir, &keys);
    python("after-restart", &server, &packages);
    assert!(server.stop().success());
}
