//! Load and soak: the real server on a tiny random model, on loopback, for a fixed time
//! (`LORAHOST_SOAK_SECONDS`, default 20): clients with random adapters, streaming and not, some
//! cancelling mid-stream, while adapters are uploaded, replaced and deleted under them and the
//! adapter cache is too small for all of them. At the end:
//!
//! - every request completed, or was cancelled by its client, or was refused with a 4xx it
//!   deserved (the adapter was just deleted: 404; the queue was full: 429); no 5xx anywhere;
//! - every KV block, sequence and adapter lease is returned (the server's own metrics);
//! - the resident set after warm-up stays within 10 %.

mod common;

use common::http::{http, json_request, upload_adapter};
use common::{fixtures, ServeProcess};
use kernels::lora::workload::SplitMix64;
use lorahost::testing::TinyModel;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Adapter names the clients pick from; the admin keeps uploading and deleting them.
const NAMES: usize = 6;
const CLIENTS: u64 = 8;

/// What the clients saw.
#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    cancelled: AtomicU64,
    deleted_under_it: AtomicU64,
    overloaded: AtomicU64,
    /// Anything else: the test fails with these.
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().expect("tally").push(what);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The value of an unlabelled metric, or the sum over a labelled one's series matching `filter`.
fn metric(text: &str, name: &str, filter: impl Fn(&str) -> bool) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series == &name
                || series.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') && filter(rest))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

fn metrics(url: &str) -> String {
    let (status, body) = http(url, "GET", "/metrics", "text/plain", b"").expect("metrics");
    assert_eq!(status, 200);
    String::from_utf8(body).expect("utf-8")
}

/// Sends a streamed completion and hangs up after the first bytes of the stream.
fn cancel_mid_stream(url: &str, body: &Value) -> std::io::Result<()> {
    let authority = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(authority)?;
    let body = body.to_string();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut first = [0u8; 256];
    match stream.read(&mut first)? {
        0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

fn client(url: String, seed: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut rng = SplitMix64::new(seed);
    while !stop.load(Ordering::SeqCst) {
        let pick = rng.next_u64() as usize % (NAMES + 1);
        let model = if pick == NAMES { "tiny".to_string() } else { format!("adapter-{pick}") };
        let max_tokens = 1 + rng.next_u64() % 24;
        let kind = rng.next_u64() % 10;
        let stream = kind >= 4;
        let body = json!({"model": model, "prompt": format!("story {seed} {max_tokens}"),
                          "max_tokens": max_tokens, "stream": stream});
        if kind >= 8 {
            match cancel_mid_stream(&url, &body) {
                Ok(()) => tally.cancelled.fetch_add(1, Ordering::SeqCst),
                Err(e) => return tally.fail(format!("cancelled stream: {e}")),
            };
            continue;
        }
        let (status, reply) =
            match http(&url, "POST", "/v1/completions", "application/json", body.to_string().as_bytes()) {
                Ok(answer) => answer,
                Err(e) => return tally.fail(format!("{model}: no answer: {e}")),
            };
        let text = String::from_utf8_lossy(&reply);
        match status {
            200 if stream && text.trim_end().ends_with("data: [DONE]") && !has_error_event(&text) => {
                tally.completed.fetch_add(1, Ordering::SeqCst);
            }
            200 if !stream && text.contains("\"completion_tokens\"") => {
                tally.completed.fetch_add(1, Ordering::SeqCst);
            }
            404 if model != "tiny" && text.contains("model_not_found") => {
                tally.deleted_under_it.fetch_add(1, Ordering::SeqCst);
            }
            429 => {
                tally.overloaded.fetch_add(1, Ordering::SeqCst);
            }
            _ => tally.fail(format!("{model} (stream {stream}): {status} {text}")),
        }
    }
}

/// Whether a server-sent event stream carries an error object (generated text may well contain
/// the word "error", so the events are parsed rather than searched).
fn has_error_event(stream: &str) -> bool {
    stream
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .any(|data| serde_json::from_str::<Value>(data).map_or(true, |v| v.get("error").is_some()))
}

fn admin(url: String, adapters: Vec<(Vec<u8>, Vec<u8>)>, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut rng = SplitMix64::new(99);
    while !stop.load(Ordering::SeqCst) {
        let name = format!("adapter-{}", rng.next_u64() as usize % NAMES);
        if rng.next_u64().is_multiple_of(4) {
            let (status, reply) = json_request(&url, "DELETE", &format!("/v1/adapters/{name}"), &Value::Null);
            if status != 200 && status != 404 {
                tally.fail(format!("delete {name}: {status} {reply}"));
            }
        } else {
            let adapter = &adapters[rng.next_u64() as usize % adapters.len()];
            match upload_adapter(&url, &name, adapter) {
                Ok((200 | 201, _)) => {}
                Ok((status, reply)) => tally.fail(format!("upload {name}: {status} {reply}")),
                Err(e) => tally.fail(format!("upload {name}: no answer: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(40 + rng.next_u64() % 80));
    }
}

#[test]
fn soak_with_random_adapters_cancellations_uploads_and_deletes() {
    let seconds: u64 = std::env::var("LORAHOST_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = TinyModel::default();
    shape.write_hf_dir(&dir.path().join("tiny"), &fixtures().join("base")).expect("tiny model");
    let adapters: Vec<(Vec<u8>, Vec<u8>)> = (0..10)
        .map(|seed| {
            let path = dir.path().join(format!("adapter-{seed}"));
            shape
                .write_adapter(
                    &path,
                    4 + 4 * (seed as usize % 3),
                    8.0,
                    &["q_proj", "v_proj", "up_proj"],
                    seed,
                )
                .expect("adapter");
            let read = |name: &str| std::fs::read(path.join(name)).expect("adapter file");
            (read(adapters::store::CONFIG_FILE), read(adapters::store::WEIGHTS_FILE))
        })
        .collect();
    // Room for about three of the six names: loads and evictions all the time.
    let cache_bytes = 3 * adapters.iter().map(|(c, w)| c.len() + w.len()).max().expect("adapters");
    let mut args: Vec<String> = "--dtype f32 --port 0 --threads 2 --max-running 8 --max-waiting 16"
        .split(' ')
        .map(String::from)
        .collect();
    args.extend(["--adapter-cache-bytes".into(), cache_bytes.to_string()]);
    args.extend(["--model".into(), dir.path().join("tiny").display().to_string()]);
    args.extend(["--adapters-dir".into(), dir.path().join("adapters").display().to_string()]);
    let server = ServeProcess::start(&args);
    let url = server.url.clone();
    for (i, adapter) in adapters.iter().take(NAMES).enumerate() {
        let (status, reply) = upload_adapter(&url, &format!("adapter-{i}"), adapter).expect("upload");
        assert_eq!(status, 201, "{reply}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut threads: Vec<_> = (0..CLIENTS)
        .map(|seed| {
            let (url, stop, tally) = (url.clone(), stop.clone(), tally.clone());
            std::thread::spawn(move || client(url, seed, stop, tally))
        })
        .collect();
    {
        let (url, stop, tally) = (url.clone(), stop.clone(), tally.clone());
        threads.push(std::thread::spawn(move || admin(url, adapters, stop, tally)));
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds) / 4);
    let warm_rss = rss_kib(server.pid());
    let mut peak_rss = warm_rss;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(250));
        peak_rss = peak_rss.max(rss_kib(server.pid()));
    }
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        thread.join().expect("a client panicked");
    }

    // Cancelled sequences are freed at the engine's next step; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = metrics(&url);
        let busy = ["lorahost_kv_blocks_in_use", "lorahost_running_sequences", "lorahost_waiting_sequences"]
            .iter()
            .any(|m| metric(&text, m, |_| true) != 0.0);
        if !busy || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let end_rss = rss_kib(server.pid());
    let t = &*tally;
    let (completed, cancelled) = (t.completed.load(Ordering::SeqCst), t.cancelled.load(Ordering::SeqCst));
    eprintln!(
        "soak {seconds}s: {completed} completed, {cancelled} cancelled by the client, {} found their adapter \
         deleted, {} overloaded; RSS after warm-up {warm_rss} KiB, peak {peak_rss} KiB, end {end_rss} KiB",
        t.deleted_under_it.load(Ordering::SeqCst),
        t.overloaded.load(Ordering::SeqCst),
    );
    let failures = t.failures.lock().expect("tally");
    assert!(
        failures.is_empty(),
        "{} requests failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(completed > 50 && cancelled > 10, "too little traffic to mean anything");
    for gauge in [
        "lorahost_kv_blocks_in_use",
        "lorahost_running_sequences",
        "lorahost_waiting_sequences",
        "lorahost_queue_depth",
        "lorahost_adapter_cache_pinned",
        "lorahost_adapter_cache_loading",
    ] {
        assert_eq!(metric(&text, gauge, |_| true), 0.0, "{gauge} is not back to zero:\n{text}");
    }
    let server_errors =
        metric(&text, "lorahost_http_responses_total", |labels| labels.contains("status=\"5"));
    assert_eq!(server_errors, 0.0, "5xx responses:\n{text}");
    assert!(
        metric(&text, "lorahost_adapter_cache_evictions_total", |_| true) > 0.0,
        "the cache never evicted"
    );
    assert!(
        end_rss as f64 <= warm_rss as f64 * 1.10 && peak_rss as f64 <= warm_rss as f64 * 1.10,
        "resident set grew past 10 % after warm-up: {warm_rss} -> peak {peak_rss}, end {end_rss} KiB"
    );
    assert!(server.stop().success());
}
