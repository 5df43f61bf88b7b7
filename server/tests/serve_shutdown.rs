//! `http::serve` on a real socket with the real engine on a tiny random model: on shutdown,
//! requests in flight finish when the drain deadline allows, and are cancelled (their sequences
//! freed) when it passes; the connection limits cut off slow or oversized request heads and
//! stalled bodies.

mod common;

use adapters::store::FsStore;
use common::*;
use lorahost::engine::Engine;
use lorahost::http::{serve, AppParts, AppState, Auth, EngineBackend, Limits};
use lorahost::testing::TinyModel;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

struct Running {
    runtime: tokio::runtime::Runtime,
    state: AppState,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn start(drain_deadline: Duration) -> Running {
    start_with(Limits::default(), drain_deadline)
}

fn start_with(limits: Limits, drain_deadline: Duration) -> Running {
    let (model_dir, base) = tiny_base(TinyModel::default());
    let engine =
        Engine::start(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512), None)
            .expect("engine");
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(store_dir.path()).expect("store");
    let backend = Arc::new(EngineBackend { base, engine });
    let state = AppState::new(AppParts { backend, store, cache: None, auth: Auth::Open, limits });
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let server = runtime.spawn(serve(listener, state.clone(), shutdown, drain_deadline));
    Running { runtime, state, addr, stop, server, _dirs: (model_dir, store_dir) }
}

/// Sends a streaming completion and returns the reader positioned after the first token.
fn stream_until_first_token(r: &Running, max_tokens: usize) -> BufReader<std::net::TcpStream> {
    let body = serde_json::json!({
        "model": r.state.backend().model_id(), "prompt": [5, 6, 7], "max_tokens": max_tokens,
        "ignore_eos": true, "temperature": 0, "stream": true,
    })
    .to_string();
    let mut stream = std::net::TcpStream::connect(r.addr).expect("connect");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).expect("read") > 0, "stream ended before a token");
        if line.starts_with("data: ") && line.contains("\"text\"") {
            return reader;
        }
    }
}

#[test]
fn requests_in_flight_finish_when_the_deadline_allows() {
    let r = start(Duration::from_secs(600));
    let mut reader = stream_until_first_token(&r, 40);
    r.stop.send(()).expect("signal");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("read");
    assert!(rest.contains("\"finish_reason\":\"length\"") && rest.contains("data: [DONE]"), "{rest}");
    assert!(!rest.contains("error"), "{rest}");
    r.runtime.block_on(r.server).expect("joined").expect("served");
    assert!(r.state.is_draining());
}

#[test]
fn requests_still_running_at_the_deadline_are_cancelled_and_freed() {
    let r = start(Duration::ZERO);
    let max_tokens = r.state.backend().max_sequence_tokens() - 3;
    let mut reader = stream_until_first_token(&r, max_tokens);
    r.stop.send(()).expect("signal");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("read");
    assert!(rest.contains("shutting down") && rest.contains("data: [DONE]"), "{rest}");
    assert!(!rest.contains("\"finish_reason\":\"length\""), "{rest}");
    r.runtime.block_on(r.server).expect("joined").expect("served");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = r.state.backend().stats();
        if stats.running == 0 && stats.free_blocks == stats.total_blocks {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "sequence not freed: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `head` (and nothing more) and returns what the server answers before it closes the
/// connection, or panics if it neither answers nor closes within 10 s.
fn send_and_read_to_close(r: &Running, head: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(r.addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    stream.write_all(head).expect("send");
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server kept the connection open: {e}"),
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn slow_or_oversized_request_heads_and_stalled_bodies_are_cut_off() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let r = start_with(limits, Duration::from_secs(5));
    // Slowloris: the request head never completes; the connection is closed, unanswered or 408.
    let started = std::time::Instant::now();
    let answer = send_and_read_to_close(&r, b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: 1\r\n");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "cut off after the header timeout");

    // A head past the size limit: 431, not a buffer that grows with the client's patience.
    let huge = format!("GET /health HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\n\r\n", "a".repeat(200 << 10));
    let answer = send_and_read_to_close(&r, huge.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A body that stops arriving: the request fails with a 4xx once the pause passes the limit.
    let head = "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{\"model\":";
    let answer = send_and_read_to_close(&r, head.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(answer.contains("\"error\""), "an API error body: {answer}");

    // Ordinary requests are unaffected.
    let answer =
        send_and_read_to_close(&r, b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _ = r.stop.send(());
    r.runtime.block_on(r.server).expect("join").expect("serve");
}
