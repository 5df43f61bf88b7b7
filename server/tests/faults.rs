//! Faults of the real process, on a tiny random model:
//!
//! - `kill -9` of `lorahost serve` while adapter uploads, training-file uploads and streamed
//!   generations are in flight, three times over, restarting on the same directories each time:
//!   every upload the server acknowledged is back, with its bytes, and servable; every adapter
//!   listed is complete and servable (nothing partial is ever visible).
//! - A disk that fills during an upload (the server runs under a file-size limit, so its writes
//!   fail as on a full disk): a 507 with a clear message, nothing half-written left behind, and
//!   the server keeps serving and storing what fits.

mod common;

use adapters::AdapterId;
use common::http::{http, json_request, upload_adapter, upload_file};
use common::{fixtures, ServeProcess};
use lorahost::testing::TinyModel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A tiny model directory, and the adapters and jobs directories the restarts share.
struct Setup {
    dir: tempfile::TempDir,
    shape: TinyModel,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let shape = TinyModel::default();
        shape.write_hf_dir(&dir.path().join("tiny"), &fixtures().join("base")).expect("tiny model");
        Self { dir, shape }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve_command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lorahost"));
        command.arg("serve").args([
            "--dtype",
            "f32",
            "--port",
            "0",
            "--threads",
            "1",
            "--train-threads",
            "1",
        ]);
        command.arg("--model").arg(self.path("tiny"));
        command.arg("--adapters-dir").arg(self.path("adapters"));
        command.arg("--jobs-dir").arg(self.path("jobs"));
        command
    }

    fn start(&self) -> ServeProcess {
        ServeProcess::spawn(self.serve_command())
    }

    /// A PEFT adapter's two files, distinct for every `seed`.
    fn adapter(&self, seed: u64, rank: usize, targets: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let dir = self.path(&format!("adapter-{seed}-{rank}"));
        self.shape.write_adapter(&dir, rank, 2.0 * rank as f64, targets, seed).expect("adapter");
        let read = |name: &str| std::fs::read(dir.join(name)).expect("adapter file");
        (read(adapters::store::CONFIG_FILE), read(adapters::store::WEIGHTS_FILE))
    }
}

/// A short completion on `model`: the adapter (or base) is servable.
fn assert_servable(url: &str, model: &str) {
    let (status, reply) = json_request(
        url,
        "POST",
        "/v1/completions",
        &json!({"model": model, "prompt": "hello", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "completion on {model}: {reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 2, "{reply}");
}

fn training_line(i: usize) -> Vec<u8> {
    let line = json!({"messages": [
        {"role": "user", "content": format!("question {i}")},
        {"role": "assistant", "content": format!("answer {i}")},
    ]});
    format!("{line}\n{line}\n").into_bytes()
}

/// What the server acknowledged: adapter names with their content ids, file ids with their bytes.
#[derive(Default)]
struct Acknowledged {
    adapters: Vec<(String, String)>,
    files: Vec<(String, Vec<u8>)>,
}

/// Everything acknowledged is there with its bytes and servable; every listed adapter is whole.
fn verify(url: &str, acked: &Acknowledged) {
    let (status, list) = json_request(url, "GET", "/v1/adapters", &Value::Null);
    assert_eq!(status, 200, "{list}");
    let listed: Vec<(String, String)> = list["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|a| {
            (a["id"].as_str().expect("name").to_string(), a["adapter_id"].as_str().expect("id").to_string())
        })
        .collect();
    for (name, id) in &acked.adapters {
        assert!(
            listed.contains(&(name.clone(), id.clone())),
            "acknowledged adapter {name} ({id}) is missing"
        );
    }
    // Uploads cut by the kill may or may not have committed; if listed, they must be whole.
    for (name, _) in &listed {
        assert_servable(url, name);
    }
    let (status, files) = json_request(url, "GET", "/v1/files", &Value::Null);
    assert_eq!(status, 200, "{files}");
    for (id, bytes) in &acked.files {
        let (status, content) =
            http(url, "GET", &format!("/v1/files/{id}/content"), "application/json", b"").expect("answers");
        assert_eq!(status, 200, "acknowledged file {id} is missing: {files}");
        assert_eq!(&content, bytes, "file {id} came back with other bytes");
    }
}

#[test]
fn kill_9_during_uploads_and_generation_loses_nothing_acknowledged() {
    let setup = Setup::new();
    let adapters: Vec<(Vec<u8>, Vec<u8>)> =
        (0..24).map(|seed| setup.adapter(seed, 4, &["q_proj", "v_proj", "down_proj"])).collect();
    let adapters = Arc::new(adapters);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    for round in 0..3u64 {
        let server = setup.start();
        verify(&server.url, &acked.lock().expect("acks"));
        let stop = Arc::new(AtomicBool::new(false));
        let acked_before = {
            let a = acked.lock().expect("acks");
            a.adapters.len() + a.files.len()
        };
        let mut workers = Vec::new();
        for uploader in 0..2u64 {
            let (url, stop, acked, adapters) =
                (server.url.clone(), stop.clone(), acked.clone(), adapters.clone());
            workers.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let name = format!("r{round}-u{uploader}-{i}");
                    let adapter =
                        &adapters[((round * 7 + uploader * 3 + i) % adapters.len() as u64) as usize];
                    match upload_adapter(&url, &name, adapter) {
                        Ok((201, reply)) => {
                            let expected = AdapterId::of_files(&adapter.0, &adapter.1).to_hex();
                            assert_eq!(reply["adapter_id"], expected.as_str(), "{reply}");
                            acked.lock().expect("acks").adapters.push((name, expected));
                        }
                        Ok((status, reply)) => panic!("upload {name}: {status} {reply}"),
                        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                            panic!("upload {name}: an answer that is not JSON")
                        }
                        Err(_) => break, // killed
                    }
                    i += 1;
                }
            }));
        }
        {
            let (url, stop, acked) = (server.url.clone(), stop.clone(), acked.clone());
            workers.push(std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let bytes = training_line(round as usize * 1000 + i);
                    match upload_file(&url, &bytes) {
                        Ok((200, reply)) => {
                            let id = reply["id"].as_str().expect("file id").to_string();
                            acked.lock().expect("acks").files.push((id, bytes));
                        }
                        Ok((status, reply)) => panic!("file upload: {status} {reply}"),
                        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                            panic!("file upload: an answer that is not JSON")
                        }
                        Err(_) => break, // killed
                    }
                    i += 1;
                }
            }));
        }
        for generator in 0..2 {
            let (url, stop) = (server.url.clone(), stop.clone());
            let model = match acked.lock().expect("acks").adapters.first() {
                Some((name, _)) if generator == 1 => name.clone(),
                _ => "tiny".to_string(),
            };
            workers.push(std::thread::spawn(move || {
                let body = json!({"model": model, "prompt": "once upon", "max_tokens": 64, "stream": true});
                while !stop.load(Ordering::SeqCst) {
                    if http(&url, "POST", "/v1/completions", "application/json", body.to_string().as_bytes())
                        .is_err()
                    {
                        break;
                    }
                }
            }));
        }
        // Kill once a few uploads of this round are through, a little later each round, so
        // the kill lands at different points of the writes in flight.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let a = acked.lock().expect("acks");
            if a.adapters.len() + a.files.len() >= acked_before + 6 {
                break;
            }
            drop(a);
            assert!(Instant::now() < deadline, "uploads do not get through");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(13 * round));
        server.kill();
        stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().expect("a worker panicked");
        }
    }
    let server = setup.start();
    let acked = acked.lock().expect("acks");
    eprintln!(
        "acknowledged before the kills: {} adapters, {} files",
        acked.adapters.len(),
        acked.files.len()
    );
    assert!(acked.adapters.len() >= 6 && !acked.files.is_empty(), "too little was uploaded to test anything");
    verify(&server.url, &acked);
    // Scratch of the killed writes is gone once the store is open again.
    let scratch: Vec<_> = std::fs::read_dir(setup.path("adapters").join("tmp")).expect("tmp/").collect();
    assert!(scratch.is_empty(), "scratch left in the store: {scratch:?}");
    assert!(server.stop().success());
}

/// Scratch files anywhere under `dir` (the store's `tmp/`, `.NAME.tmp` beside records).
fn scratch_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "tmp") {
                found.extend(std::fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path()));
            } else {
                found.extend(scratch_files(&path));
            }
        } else if path.extension().is_some_and(|e| e == "tmp") {
            found.push(path);
        }
    }
    found
}

#[test]
fn a_full_disk_during_upload_is_a_507_and_leaves_nothing_behind() {
    /// Every file the server writes may grow to this: a small adapter fits, a large one not.
    const FILE_LIMIT: u64 = 64 << 10;
    let setup = Setup::new();
    let small = setup.adapter(1, 2, &["q_proj"]);
    let large =
        setup.adapter(2, 32, &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    assert!(small.1.len() < FILE_LIMIT as usize / 4 && large.1.len() > 2 * FILE_LIMIT as usize);
    let mut command = setup.serve_command();
    // SAFETY: between fork and exec only async-signal-safe calls: `signal` and `setrlimit`.
    // With SIGXFSZ ignored (an ignored signal stays ignored across exec), a write past the
    // limit fails with EFBIG, as a write to a full disk fails with ENOSPC.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: FILE_LIMIT, rlim_max: FILE_LIMIT };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = ServeProcess::spawn(command);
    let url = &server.url;

    let (status, reply) = upload_adapter(url, "large", &large).expect("answers");
    assert_eq!(status, 507, "{reply}");
    assert_eq!(reply["error"]["code"], "insufficient_storage", "{reply}");
    let message = reply["error"]["message"].as_str().expect("message");
    assert!(message.contains("no disk space") && message.contains("nothing was stored"), "{message}");
    assert!(!message.contains(setup.dir.path().to_str().expect("utf-8")), "paths stay in the log: {message}");
    let (status, reply) = json_request(url, "GET", "/v1/adapters/large", &Value::Null);
    assert_eq!(status, 404, "the failed upload is not visible: {reply}");
    assert_eq!(scratch_files(&setup.path("adapters")), Vec::<PathBuf>::new(), "half-written files left");

    let big_file = training_line(0).repeat((2 * FILE_LIMIT as usize) / training_line(0).len());
    let (status, reply) = upload_file(url, &big_file).expect("answers");
    assert_eq!(status, 507, "{reply}");
    assert_eq!(reply["error"]["code"], "insufficient_storage", "{reply}");
    assert_eq!(scratch_files(&setup.path("jobs")), Vec::<PathBuf>::new(), "half-written files left");

    // The server keeps serving, and stores what fits.
    assert_servable(url, "tiny");
    let (status, reply) = upload_adapter(url, "small", &small).expect("answers");
    assert_eq!(status, 201, "{reply}");
    assert_servable(url, "small");
    let (status, reply) = upload_file(url, &training_line(1)).expect("answers");
    assert_eq!(status, 200, "{reply}");
    assert!(server.stop().success());

    // And a restart finds a consistent store: the small adapter, not the large one.
    let server = setup.start();
    let (status, list) = json_request(&server.url, "GET", "/v1/adapters", &Value::Null);
    assert_eq!(status, 200);
    let names: Vec<&str> =
        list["data"].as_array().expect("list").iter().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(names, ["small"]);
    assert_servable(&server.url, "small");
    assert!(server.stop().success());
}
