//! `lorahost serve` end to end: the real binary and the default model in `--dtype f32` on
//! 127.0.0.1:0, driven by the official `openai` Python client and `requests` (installed from PyPI
//! once into `target/`), plus the `lorahost adapters` client. See `tests/e2e/openai_e2e.py` for
//! what is checked; the server is restarted in between to check that uploads persist.

mod common;

use common::{e2e_python_packages, fixtures, ServeProcess};
use std::path::{Path, PathBuf};
use std::process::Command;

const ALICE: &str = "alice-e2e-key-0123456789";
const BOB: &str = "bob-e2e-key-0123456789ab";
const ADMIN: &str = "admin-e2e-key-0123456789";

/// The server on the default model in `--dtype f32`, with tight limits so overload is reachable.
fn start_server(adapters_dir: &Path, keys: &Path) -> ServeProcess {
    let flags =
        "--dtype f32 --port 0 --threads 2 --max-running 1 --max-waiting 2 --max-adapter-bytes 25165824";
    let mut args: Vec<std::ffi::OsString> = flags.split(' ').map(Into::into).collect();
    args.extend(["--adapters-dir".into(), adapters_dir.into(), "--api-keys".into(), keys.into()]);
    ServeProcess::start(args)
}

fn python(phase: &str, server: &ServeProcess, packages: &Path) {
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
fn adapters_cli(server: &ServeProcess, key: &str, args: &[&str]) -> String {
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
    let packages = e2e_python_packages();
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

    let server = start_server(&adapters_dir, &keys);
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
    let server = start_server(&adapters_dir, &keys);
    python("after-restart", &server, &packages);
    assert!(server.stop().success());
}
