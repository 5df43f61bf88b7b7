//! The HTTP router without a socket (`tower::ServiceExt::oneshot`), against a fake backend that
//! answers instantly: routes, status codes and error bodies, authentication and tenant
//! isolation, validation, uploads, SSE framing, overload, timeouts, disconnects and draining.

mod common;

use adapters::store::FsStore;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::tenants::{ALICE, BOB, KEYS, ROOT};
use http_body_util::BodyExt;
use lorahost::chat::ChatMessage;
use lorahost::engine::{
    AdapterChoice, ClientId, EngineError, EngineStats, GeneratedToken, TokenEvent, TokenLogprob, ValidRequest,
};
use lorahost::http::{router, ApiKeys, AppParts, AppState, Auth, Backend, Limits};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tower::ServiceExt;

const BASE: &str = "fake-base";

/// Answers every request at once with `max_tokens` tokens `w0 w1 ...` (ids 100, 101, ...), or
/// with nothing at all while `hang` is set (the stream stays open: the request is "running").
#[derive(Default)]
struct FakeBackend {
    submitted: Mutex<Vec<(ValidRequest, ClientId)>>,
    /// Senders of hanging requests, to see whether the server dropped (cancelled) them.
    hanging: Mutex<Vec<UnboundedSender<TokenEvent>>>,
    hang: AtomicBool,
    overloaded: AtomicBool,
}

impl Backend for FakeBackend {
    fn model_id(&self) -> &str {
        BASE
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        let text: String = messages.iter().map(|m| format!("{}:{}\n", m.role, m.content)).collect();
        self.encode(&text)
    }

    fn token_text(&self, id: u32) -> String {
        format!("w{}", id - 100)
    }

    fn max_sequence_tokens(&self) -> usize {
        4096
    }

    fn submit(
        &self,
        req: ValidRequest,
        client: ClientId,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        if self.overloaded.load(Ordering::SeqCst) {
            return Err(EngineError::Overloaded { queued: 4, limit: 4 });
        }
        self.submitted.lock().unwrap().push((req.clone(), client));
        let (tx, rx) = unbounded_channel();
        if self.hang.load(Ordering::SeqCst) {
            let _ = tx.send(TokenEvent::Token(token(0, &req)));
            self.hanging.lock().unwrap().push(tx);
            return Ok(rx);
        }
        for i in 0..req.stop.max_tokens {
            let _ = tx.send(TokenEvent::Token(token(i, &req)));
        }
        let _ = tx.send(common::fake::finished_at_length(&req));
        Ok(rx)
    }

    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    fn validate_adapter(&self, config: &[u8], weights: &[u8]) -> Result<(), String> {
        let config: Value =
            serde_json::from_slice(config).map_err(|e| format!("adapter_config.json: {e}"))?;
        if config["r"].as_u64().unwrap_or(0) == 0 {
            return Err("adapter_config.json: field `r`: must be at least 1".into());
        }
        if weights.starts_with(b"corrupt") {
            return Err("adapter_model.safetensors is not a valid safetensors file".into());
        }
        Ok(())
    }
}

fn token(i: usize, req: &ValidRequest) -> GeneratedToken {
    let id = 100 + i as u32;
    GeneratedToken {
        id,
        text: format!("w{i} "),
        logprob: req.sampling.top_logprobs.map(|_| -0.5),
        top_logprobs: (0..req.sampling.top_logprobs.unwrap_or(0))
            .map(|k| TokenLogprob { id: id + k as u32, logprob: -0.5 - k as f32 })
            .collect(),
    }
}

struct Fixture {
    app: Router,
    state: AppState,
    backend: Arc<FakeBackend>,
    _dir: tempfile::TempDir,
}

fn fixture(keys: bool, limits: Limits) -> Fixture {
    let auth = if keys { Auth::Keys(ApiKeys::parse(KEYS).expect("keys")) } else { Auth::Open };
    fixture_with(auth, limits)
}

fn fixture_with(auth: Auth, limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(dir.path().join("adapters")).expect("store");
    let backend = Arc::new(FakeBackend::default());
    let state = AppState::new(AppParts { backend: backend.clone(), store, cache: None, auth, limits });
    Fixture { app: router(state.clone()), state, backend, _dir: dir }
}

fn open() -> Fixture {
    fixture(false, Limits::default())
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// An OpenAI-shaped error with this status; returns the message.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"]["message"].as_str().expect("message").to_string()
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let response = app.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    Reply { status, headers, body }
}

fn request(
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Body,
    content_type: Option<&str>,
) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        r = r.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    if let Some(ct) = content_type {
        r = r.header(header::CONTENT_TYPE, ct);
    }
    r.body(body).expect("request")
}

async fn get(app: &Router, uri: &str, key: Option<&str>) -> Reply {
    send(app, request("GET", uri, key, Body::empty(), None)).await
}

async fn post(app: &Router, uri: &str, key: Option<&str>, body: Value) -> Reply {
    send(app, request("POST", uri, key, Body::from(body.to_string()), Some("application/json"))).await
}

async fn delete(app: &Router, uri: &str, key: Option<&str>) -> Reply {
    send(app, request("DELETE", uri, key, Body::empty(), None)).await
}

const BOUNDARY: &str = "test-boundary-7d1f";

fn multipart(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload_parts(app: &Router, name: &str, key: Option<&str>, parts: &[(&str, &[u8])]) -> Reply {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    send(app, request("PUT", &format!("/v1/adapters/{name}"), key, Body::from(multipart(parts)), Some(&ct)))
        .await
}

async fn upload(app: &Router, name: &str, key: Option<&str>, weights: &[u8]) -> Reply {
    let config = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).to_string();
    upload_parts(
        app,
        name,
        key,
        &[("adapter_config.json", config.as_bytes()), ("adapter_model.safetensors", weights)],
    )
    .await
}

fn chat(model: &str, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

#[tokio::test]
async fn health_ready_models_and_unknown_routes() {
    let f = open();
    assert_eq!(get(&f.app, "/health", None).await.status, StatusCode::OK);
    let ready = get(&f.app, "/ready", None).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["model"], BASE);
    let models = get(&f.app, "/v1/models", None).await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], BASE);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let created = models["data"][0]["created"].as_u64().expect("created");
    assert!(now - 600 < created && created <= now, "the base is dated by the server's start: {created}");
    get(&f.app, "/v1/nothing", None).await.error(StatusCode::NOT_FOUND);
    get(&f.app, "/v1/completions", None).await.error(StatusCode::METHOD_NOT_ALLOWED);
    // A JSON body is read as JSON whatever the content type says (`curl -d` sends a form type).
    let form = request(
        "POST",
        "/v1/completions",
        None,
        Body::from(json!({"model": BASE, "prompt": "a", "max_tokens": 1}).to_string()),
        Some("application/x-www-form-urlencoded"),
    );
    assert_eq!(send(&f.app, form).await.status, StatusCode::OK);
    let metrics = get(&f.app, "/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.text().contains("lorahost_http_responses_total{route=\"/health\",status=\"200\"} 1"),
        "{}",
        metrics.text()
    );
}

#[tokio::test]
async fn completion_json_has_text_usage_and_logprobs() {
    let f = open();
    let body = json!({"model": BASE, "prompt": "abc", "max_tokens": 3, "logprobs": 2, "temperature": 0});
    let r = post(&f.app, "/v1/completions", None, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    assert_eq!(v["model"], BASE);
    assert_eq!(v["choices"][0]["text"], "w0 w1 w2 ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"], json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}));
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["w0", "w1", "w2"]));
    assert_eq!(lp["text_offset"], json!([0, 3, 6]));
    assert_eq!(lp["top_logprobs"][0].as_object().map(|o| o.len()), Some(2));
    // The request the engine got: tokenised prompt, greedy, bounded.
    let (req, _) = f.backend.submitted.lock().unwrap()[0].clone();
    assert_eq!(req.prompt_ids, vec![97, 98, 99]);
    assert_eq!(req.sampling.temperature, 0.0);
    assert_eq!(req.stop.max_tokens, 3);
    assert!(req.adapter.is_none());
}

#[tokio::test]
async fn n_choices_and_prompt_lists_fan_out_with_distinct_seeds() {
    let f = open();
    let body =
        json!({"model": BASE, "prompt": ["ab", "cde"], "n": 2, "max_tokens": 1, "seed": 7, "stop": "x"});
    let v = post(&f.app, "/v1/completions", None, body).await.json();
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["usage"]["prompt_tokens"], 5, "each prompt counted once");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let submitted = f.backend.submitted.lock().unwrap();
    let seeds: Vec<Option<u64>> = submitted.iter().map(|(r, _)| r.sampling.seed).collect();
    assert_eq!(seeds, vec![Some(7), Some(8), Some(7), Some(8)]);
    assert_eq!(submitted[2].0.prompt_ids, vec![99, 100, 101]);
    assert_eq!(submitted[0].0.stop.stop, vec!["x".to_string()]);
}

/// The `data:` payloads of an SSE body, checking the framing on the way.
fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "events end with a blank line: {body:?}");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e:?}")).to_string())
        .collect()
}

#[tokio::test]
async fn chat_streaming_frames_and_equals_the_json_answer() {
    let f = open();
    let mut body = chat(BASE, 4);
    let whole = post(&f.app, "/v1/chat/completions", None, body.clone()).await.json();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&f.app, "/v1/chat/completions", None, body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_events(&r.text());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("JSON chunk")).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn completion_streaming_ends_with_done() {
    let f = open();
    let r = post(
        &f.app,
        "/v1/completions",
        None,
        json!({"model": BASE, "prompt": "a", "max_tokens": 2, "stream": true}),
    )
    .await;
    let events = sse_events(&r.text());
    assert_eq!(events.len(), 4, "{events:?}");
    let texts: Vec<Value> = events[..3]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].clone())
        .collect();
    assert_eq!(texts, vec![json!("w0 "), json!("w1 "), json!("")]);
    assert_eq!(events[3], "[DONE]");
}

#[tokio::test]
async fn bad_requests_get_400_or_422_and_reach_no_engine() {
    let f = open();
    let malformed = send(
        &f.app,
        request("POST", "/v1/completions", None, Body::from("{not json"), Some("application/json")),
    )
    .await;
    malformed.error(StatusCode::BAD_REQUEST);
    post(&f.app, "/v1/completions", None, json!({"model": BASE})).await.error(StatusCode::BAD_REQUEST);
    post(&f.app, "/v1/completions", None, json!({"model": BASE, "prompt": 5}))
        .await
        .error(StatusCode::BAD_REQUEST);
    for (body, param) in [
        (json!({"model": BASE, "prompt": "a", "temperature": -1}), "temperature"),
        (json!({"model": BASE, "prompt": "a", "top_p": 0}), "top_p"),
        (json!({"model": BASE, "prompt": "a", "n": 0}), "n"),
        (json!({"model": BASE, "prompt": "a", "n": 17}), "n"),
        (json!({"model": BASE, "prompt": "a", "max_tokens": 0}), "max_tokens"),
        (json!({"model": BASE, "prompt": "a", "logprobs": 21}), "logprobs"),
        (json!({"model": BASE, "prompt": "a", "echo": true}), "echo"),
        (json!({"model": BASE, "prompt": "a", "stop": [""]}), "stop"),
        (json!({"model": BASE, "prompt": "a", "stop": "x".repeat(1025)}), "stop"),
        // n × prompts wraps around to 0 in 64 bits: still too many.
        (json!({"model": BASE, "prompt": [[1], [2]], "n": 1u64 << 63}), "n"),
        (json!({"model": BASE, "prompt": ""}), "prompt"),
    ] {
        let message =
            post(&f.app, "/v1/completions", None, body.clone()).await.error(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(message.contains(param), "{body}: {message}");
    }
    // Errors name the parameter at fault in `param`, whichever it is.
    for (field, value) in [
        ("temperature", json!(1e308)),
        ("top_p", json!(2)),
        ("min_p", json!(-1)),
        ("repetition_penalty", json!(0)),
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!(-3)),
        ("max_completion_tokens", json!(0)),
    ] {
        let body = json!({"model": BASE, "messages": [{"role": "user", "content": "x"}], field: value});
        let reply = post(&f.app, "/v1/chat/completions", None, body).await;
        let message = reply.error(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.json()["error"]["param"], field, "{message}");
    }
    for messages in [
        json!([{"role": "wizard", "content": "x"}]),
        json!([{"role": "tool", "content": "x"}]),
        json!([{"role": "user"}]),
    ] {
        let body = json!({"model": BASE, "messages": messages});
        let reply = post(&f.app, "/v1/chat/completions", None, body).await;
        let message = reply.error(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.json()["error"]["param"], "messages", "{messages}: {message}");
    }
    let no_messages = json!({"model": BASE, "messages": []});
    post(&f.app, "/v1/chat/completions", None, no_messages).await.error(StatusCode::UNPROCESSABLE_ENTITY);
    let message = post(&f.app, "/v1/chat/completions", None, chat("no-such-model", 1))
        .await
        .error(StatusCode::NOT_FOUND);
    assert!(message.contains("no-such-model"));
    assert!(f.backend.submitted.lock().unwrap().is_empty());
    // OpenAI's `developer` role is the system role.
    let developer = json!({"model": BASE, "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"}]});
    assert_eq!(post(&f.app, "/v1/chat/completions", None, developer).await.status, StatusCode::OK);
}

#[tokio::test]
async fn upload_replace_describe_use_and_delete() {
    let f = open();
    let r = upload(&f.app, "my-lora", None, b"weights-1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let first = r.json();
    assert_eq!(
        (first["id"].as_str(), first["generation"].as_u64(), first["rank"].as_u64()),
        (Some("my-lora"), Some(1), Some(4))
    );
    assert_eq!(first["targets"], json!(["q_proj"]));
    assert_eq!(first["parent"], BASE);
    let r = upload(&f.app, "my-lora", None, b"weights-2").await;
    assert_eq!(r.status, StatusCode::OK, "replacing answers 200");
    let second = r.json();
    assert_eq!(second["generation"], 2);
    assert_ne!(second["adapter_id"], first["adapter_id"]);
    let described = get(&f.app, "/v1/adapters/my-lora", None).await.json();
    assert_eq!(described["adapter_id"], second["adapter_id"]);
    assert_eq!(described["residency"], "disk");
    let listed = get(&f.app, "/v1/adapters", None).await.json();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1));
    let models = get(&f.app, "/v1/models", None).await.json();
    assert_eq!(models["data"][1]["id"], "my-lora");
    assert_eq!(models["data"][1]["parent"], BASE);
    // Servable at once: the request carries the stored generation's id.
    let r = post(&f.app, "/v1/chat/completions", None, chat("my-lora", 1)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let stored = f.state.store().list(None)[0].id;
    let (req, _) = f.backend.submitted.lock().unwrap()[0].clone();
    assert!(matches!(req.adapter, Some(AdapterChoice::Cached(id)) if id == stored));
    assert_eq!(delete(&f.app, "/v1/adapters/my-lora", None).await.status, StatusCode::OK);
    delete(&f.app, "/v1/adapters/my-lora", None).await.error(StatusCode::NOT_FOUND);
    get(&f.app, "/v1/adapters/my-lora", None).await.error(StatusCode::NOT_FOUND);
    post(&f.app, "/v1/chat/completions", None, chat("my-lora", 1)).await.error(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_running_request_keeps_its_adapter_files_while_the_name_is_deleted() {
    let f = open();
    assert_eq!(upload(&f.app, "short-lived", None, b"weights-1").await.status, StatusCode::CREATED);
    let object = f.state.store().list(None)[0].dir.clone();
    f.backend.hang.store(true, Ordering::SeqCst);
    let mut body = chat("short-lived", 5);
    body["stream"] = json!(true);
    let ct = Some("application/json");
    let response = f
        .app
        .clone()
        .oneshot(request("POST", "/v1/chat/completions", None, Body::from(body.to_string()), ct))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    // Deleted while the request runs (its adapter may still be loading from these files).
    assert_eq!(delete(&f.app, "/v1/adapters/short-lived", None).await.status, StatusCode::OK);
    assert!(object.is_dir(), "the running request's adapter files were removed under it");
    drop(response);
    // The last pin is released on a blocking thread (removal takes the store's lock and fsyncs).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while object.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!object.exists(), "the files go once the last request using them ends");
    let metrics = get(&f.app, "/metrics", None).await.text();
    assert!(metrics.contains("lorahost_requests_total"), "{metrics}");
    assert!(
        !metrics.contains("model=\"short-lived\""),
        "a request that outlived its adapter's deletion brought its series back: {metrics}"
    );
}

#[tokio::test]
async fn bad_uploads_are_4xx_and_store_nothing() {
    let f = fixture(false, Limits { max_adapter_bytes: 1000, ..Limits::default() });
    let config = json!({"r": 4}).to_string();
    let long = "x".repeat(200);
    for name in ["..", ".hidden", "a%2Fb", "a%20b", "%2E%2E%2Fescape", long.as_str(), BASE] {
        let message = upload(&f.app, name, None, b"w").await.error(StatusCode::BAD_REQUEST);
        assert!(message.contains("invalid adapter name"), "{name}: {message}");
    }
    upload(&f.app, "bad", None, b"corrupt bytes").await.error(StatusCode::UNPROCESSABLE_ENTITY);
    let rank0 = json!({"r": 0}).to_string();
    let invalid: [(&str, &str, &[u8], &str); 2] = [
        ("bad", "adapter_model.safetensors", rank0.as_bytes(), "`r`"),
        (
            "pickle",
            "adapter_model.bin",
            config.as_bytes(),
            "adapter_model.bin: pickled weights are never loaded",
        ),
    ];
    for (name, weights_part, config, want) in invalid {
        let parts: &[(&str, &[u8])] = &[("adapter_config.json", config), (weights_part, b"w")];
        let message = upload_parts(&f.app, name, None, parts).await.error(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(message.contains(want), "{name}: {message}");
    }
    upload(&f.app, "big", None, &[0u8; 1001]).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    // Too large is the answer whatever parts follow the one that went over the limit.
    let over = [0u8; 1001];
    let after_the_limit: [&[(&str, &[u8])]; 3] = [
        &[("adapter_model.safetensors", &over), ("notes.txt", b"x")],
        &[("adapter_model.safetensors", &over), ("adapter_model.safetensors", b"w")],
        &[("adapter_model.safetensors", &over), ("adapter_model.bin", b"w")],
    ];
    for parts in after_the_limit {
        upload_parts(&f.app, "big", None, parts).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    }
    upload_parts(&f.app, "half", None, &[("adapter_config.json", config.as_bytes())])
        .await
        .error(StatusCode::BAD_REQUEST);
    upload_parts(&f.app, "odd", None, &[("adapter_config.json", config.as_bytes()), ("notes.txt", b"x")])
        .await
        .error(StatusCode::BAD_REQUEST);
    let not_multipart =
        send(&f.app, request("PUT", "/v1/adapters/x", None, Body::from("{}"), Some("application/json")))
            .await;
    not_multipart.error(StatusCode::BAD_REQUEST);
    assert!(f.state.store().list(None).is_empty(), "nothing stored");
    // Still serving.
    assert_eq!(upload(&f.app, "good", None, b"w").await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn keys_tenants_and_admins() {
    let f = fixture(true, Limits::default());
    // No key, wrong key: 401, also for listing. Health needs no key.
    get(&f.app, "/v1/models", None).await.error(StatusCode::UNAUTHORIZED);
    get(&f.app, "/v1/models", Some("alice-key-0123456780")).await.error(StatusCode::UNAUTHORIZED);
    post(&f.app, "/v1/chat/completions", None, chat(BASE, 1)).await.error(StatusCode::UNAUTHORIZED);
    assert_eq!(get(&f.app, "/health", None).await.status, StatusCode::OK);
    // Alice's adapter is invisible to Bob: 404 as if absent, everywhere.
    let alice = upload(&f.app, "shared-name", Some(ALICE), b"alice-weights").await;
    assert_eq!(alice.status, StatusCode::CREATED);
    get(&f.app, "/v1/adapters/shared-name", Some(BOB)).await.error(StatusCode::NOT_FOUND);
    delete(&f.app, "/v1/adapters/shared-name", Some(BOB)).await.error(StatusCode::NOT_FOUND);
    post(&f.app, "/v1/chat/completions", Some(BOB), chat("shared-name", 1))
        .await
        .error(StatusCode::NOT_FOUND);
    post(&f.app, "/v1/chat/completions", Some(BOB), chat("alice/shared-name", 1))
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(get(&f.app, "/v1/adapters", Some(BOB)).await.json()["data"], json!([]));
    // The same name in Bob's tenant is another adapter.
    let bob = upload(&f.app, "shared-name", Some(BOB), b"bob-weights").await;
    assert_eq!(bob.status, StatusCode::CREATED, "a new adapter for Bob, not a replacement of Alice's");
    assert_ne!(bob.json()["adapter_id"], alice.json()["adapter_id"]);
    assert_eq!(
        post(&f.app, "/v1/chat/completions", Some(ALICE), chat("shared-name", 1)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        post(&f.app, "/v1/chat/completions", Some(BOB), chat("shared-name", 1)).await.status,
        StatusCode::OK
    );
    {
        let submitted = f.backend.submitted.lock().unwrap();
        let ids: Vec<_> = submitted
            .iter()
            .map(|(r, _)| match &r.adapter {
                Some(AdapterChoice::Cached(id)) => id.to_hex(),
                _ => panic!("adapter expected"),
            })
            .collect();
        assert_eq!(ids[0], alice.json()["adapter_id"].as_str().unwrap());
        assert_eq!(ids[1], bob.json()["adapter_id"].as_str().unwrap());
        assert_ne!(submitted[0].1, submitted[1].1, "tenants are accounted separately for fairness");
    }
    // Each tenant lists its own; the admin sees both, and may use `tenant/name`.
    let listed = get(&f.app, "/v1/adapters", Some(ALICE)).await.json();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed["data"][0]["tenant"], "alice");
    let all = get(&f.app, "/v1/models", Some(ROOT)).await.json();
    let ids: Vec<&str> = all["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, vec![BASE, "alice/shared-name", "bob/shared-name"]);
    assert_eq!(
        post(&f.app, "/v1/chat/completions", Some(ROOT), chat("bob/shared-name", 1)).await.status,
        StatusCode::OK
    );
    // The admin reaches an adapter by the id it is listed under, as a path; other callers get
    // 404 for it, as for any name not theirs.
    let described = get(&f.app, "/v1/adapters/bob/shared-name", Some(ROOT)).await.json();
    assert_eq!(
        (described["tenant"].as_str(), described["adapter_id"].as_str()),
        (Some("bob"), bob.json()["adapter_id"].as_str())
    );
    get(&f.app, "/v1/adapters/bob/shared-name", Some(ALICE)).await.error(StatusCode::NOT_FOUND);
    delete(&f.app, "/v1/adapters/bob/shared-name", Some(ALICE)).await.error(StatusCode::NOT_FOUND);
    // Deleting is per tenant too.
    assert_eq!(delete(&f.app, "/v1/adapters/shared-name", Some(ALICE)).await.status, StatusCode::OK);
    assert_eq!(get(&f.app, "/v1/adapters/shared-name", Some(BOB)).await.status, StatusCode::OK);
    assert_eq!(delete(&f.app, "/v1/adapters/bob/shared-name", Some(ROOT)).await.status, StatusCode::OK);
    get(&f.app, "/v1/adapters/shared-name", Some(BOB)).await.error(StatusCode::NOT_FOUND);
    // Metrics name every tenant: admins only.
    get(&f.app, "/metrics", None).await.error(StatusCode::UNAUTHORIZED);
    get(&f.app, "/metrics", Some(ALICE)).await.error(StatusCode::FORBIDDEN);
    assert_eq!(get(&f.app, "/metrics", Some(ROOT)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn overload_is_429_with_retry_after() {
    let f = open();
    f.backend.overloaded.store(true, Ordering::SeqCst);
    let r = post(&f.app, "/v1/chat/completions", None, chat(BASE, 1)).await;
    r.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    f.backend.overloaded.store(false, Ordering::SeqCst);
    assert_eq!(post(&f.app, "/v1/chat/completions", None, chat(BASE, 1)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_timed_out_request_is_503_and_cancelled_in_the_engine() {
    let f = fixture(false, Limits { request_timeout: Duration::from_millis(50), ..Limits::default() });
    f.backend.hang.store(true, Ordering::SeqCst);
    let message = post(&f.app, "/v1/chat/completions", None, chat(BASE, 5))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("did not finish"), "{message}");
    assert!(f.backend.hanging.lock().unwrap()[0].is_closed(), "the engine stream was dropped: cancelled");
    let metrics = get(&f.app, "/metrics", None).await.text();
    assert!(metrics.contains("outcome=\"timeout\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_cancels_its_sequence() {
    let f = open();
    f.backend.hang.store(true, Ordering::SeqCst);
    let mut body = chat(BASE, 5);
    body["stream"] = json!(true);
    let response = f
        .app
        .clone()
        .oneshot(request(
            "POST",
            "/v1/chat/completions",
            None,
            Body::from(body.to_string()),
            Some("application/json"),
        ))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.into_body();
    // The role chunk and the first token arrive; then the client hangs up.
    let first = stream.frame().await.expect("a frame").expect("ok");
    assert!(String::from_utf8_lossy(first.data_ref().expect("data")).starts_with("data: "));
    assert!(!f.backend.hanging.lock().unwrap()[0].is_closed(), "still running while the client listens");
    drop(stream);
    assert!(f.backend.hanging.lock().unwrap()[0].is_closed(), "dropping the response cancels the sequence");
    let metrics = get(&f.app, "/metrics", None).await.text();
    assert!(metrics.contains("outcome=\"cancelled\"} 1"), "{metrics}");
}

#[tokio::test]
async fn draining_refuses_new_work_and_the_deadline_cancels_running_work() {
    let f = open();
    f.backend.hang.store(true, Ordering::SeqCst);
    let app = f.app.clone();
    let running = tokio::spawn(async move { post(&app, "/v1/chat/completions", None, chat(BASE, 5)).await });
    while f.backend.hanging.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    f.state.begin_drain();
    get(&f.app, "/ready", None).await.error(StatusCode::SERVICE_UNAVAILABLE);
    post(&f.app, "/v1/chat/completions", None, chat(BASE, 1)).await.error(StatusCode::SERVICE_UNAVAILABLE);
    f.state.cancel_all();
    let reply = running.await.expect("joined");
    reply.error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(f.backend.hanging.lock().unwrap()[0].is_closed());
}

/// Opens a streaming chat request and returns its body unread: the request stays running (with
/// `hang`) until the body is dropped.
async fn open_stream(f: &Fixture, key: &str, n: usize) -> (StatusCode, Body) {
    let mut body = chat(BASE, 5);
    body["stream"] = json!(true);
    body["n"] = json!(n);
    let req = request(
        "POST",
        "/v1/chat/completions",
        Some(key),
        Body::from(body.to_string()),
        Some("application/json"),
    );
    let response = f.app.clone().oneshot(req).await.expect("response");
    (response.status(), response.into_body())
}

#[tokio::test]
async fn tenant_quotas_answer_429_naming_the_quota_and_change_nothing() {
    let keys = format!(
        "{KEYS}\n[tenants.alice]\nmax_concurrent_sequences = 2\nmax_adapters = 1\n\n[tenants.\"*\"]\nrequests_per_minute = 2\n"
    );
    let f = fixture_with(Auth::Keys(ApiKeys::parse(&keys).expect("keys with quotas")), Limits::default());

    // Sequences at once: two running choices fill alice's quota; a third waits for them to end.
    f.backend.hang.store(true, Ordering::SeqCst);
    let (status, running) = open_stream(&f, ALICE, 2).await;
    assert_eq!(status, StatusCode::OK);
    let refused = post(&f.app, "/v1/chat/completions", Some(ALICE), chat(BASE, 1)).await;
    let message = refused.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("sequences at once") && message.contains('2'), "{message}");
    assert_eq!(refused.json()["error"]["code"], "quota_exceeded");
    assert!(refused.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(f.backend.submitted.lock().unwrap().len(), 2, "the refused request reached no engine");
    drop(running);
    f.backend.hang.store(false, Ordering::SeqCst);
    assert_eq!(post(&f.app, "/v1/chat/completions", Some(ALICE), chat(BASE, 1)).await.status, StatusCode::OK);

    // Requests per minute, from the "*" table: bob gets two, then 429; alice has her own table.
    for _ in 0..2 {
        assert_eq!(
            post(&f.app, "/v1/chat/completions", Some(BOB), chat(BASE, 1)).await.status,
            StatusCode::OK
        );
    }
    let message = post(&f.app, "/v1/chat/completions", Some(BOB), chat(BASE, 1))
        .await
        .error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("requests per minute"), "{message}");
    assert_eq!(post(&f.app, "/v1/chat/completions", Some(ALICE), chat(BASE, 1)).await.status, StatusCode::OK);

    // Adapters held: alice may keep one; replacing it is fine, a second name is refused and not stored.
    assert_eq!(upload(&f.app, "first", Some(ALICE), b"weights-1").await.status, StatusCode::CREATED);
    let refused = upload(&f.app, "second", Some(ALICE), b"weights-2").await;
    let message = refused.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("adapters held"), "{message}");
    assert_eq!(refused.json()["error"]["code"], "quota_exceeded");
    assert!(!refused.headers.contains_key(header::RETRY_AFTER), "waiting frees no adapter");
    assert_eq!(get(&f.app, "/v1/adapters/second", Some(ALICE)).await.status, StatusCode::NOT_FOUND);
    assert_eq!(upload(&f.app, "first", Some(ALICE), b"weights-3").await.status, StatusCode::OK);

    // What alice uses of her quota, and bob's, who has the "*" table and holds nothing.
    let reply = get(&f.app, "/v1/quota", Some(ALICE)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let alice = reply.json();
    assert_eq!(alice["tenant"], "alice");
    assert_eq!(alice["limits"]["max_adapters"], 1);
    assert_eq!(alice["limits"]["max_concurrent_sequences"], 2);
    assert_eq!(alice["limits"]["requests_per_minute"], Value::Null, "no limit is null");
    assert_eq!(alice["usage"]["adapters"], 1);
    let stored = get(&f.app, "/v1/adapters/first", Some(ALICE)).await.json();
    assert_eq!(alice["usage"]["adapter_bytes"], stored["bytes"]);
    assert_eq!(alice["usage"]["concurrent_sequences"], 0);
    assert_eq!(alice["upload_limits"]["adapter_bytes"], Limits::default().max_adapter_bytes);
    let bob = get(&f.app, "/v1/quota", Some(BOB)).await.json();
    assert_eq!(
        (bob["tenant"].clone(), bob["limits"]["requests_per_minute"].clone()),
        ("bob".into(), 2.into())
    );
    assert_eq!(bob["usage"]["adapters"], 0);
    assert_eq!(get(&f.app, "/v1/quota", None).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_cannot_pass_the_adapter_quota_together() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapters = 2\n");
    let f = fixture_with(Auth::Keys(ApiKeys::parse(&keys).expect("keys with quotas")), Limits::default());
    let uploads: Vec<_> = (0..12)
        .map(|i| {
            let app = f.app.clone();
            tokio::spawn(async move {
                upload(&app, &format!("lora-{i}"), Some(ALICE), format!("weights-{i}").as_bytes())
                    .await
                    .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for u in uploads {
        statuses.push(u.await.expect("upload task"));
    }
    let stored = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((stored, refused), (2, 10), "{statuses:?}");
    let listed = get(&f.app, "/v1/adapters", Some(ALICE)).await.json();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2), "{listed}");
}

#[test]
fn quota_tables_are_checked_when_the_keys_file_loads() {
    for (extra, want) in [
        ("[tenants.alice]\nmax_sequences = 3\n", "max_sequences"),
        ("[tenants.\"../x\"]\nmax_adapters = 1\n", "tenants"),
        ("[tenants.alice]\nrequests_per_minute = -1\n", "expected u32"),
    ] {
        let err = ApiKeys::parse(&format!("{KEYS}\n{extra}")).expect_err(extra).to_string();
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}

#[tokio::test]
async fn oversized_json_bodies_are_413_in_the_api_error_shape() {
    let f = open();
    let huge = json!({"model": BASE, "prompt": "x".repeat(9 << 20)});
    post(&f.app, "/v1/completions", None, huge).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(f.backend.submitted.lock().unwrap().is_empty(), "nothing reached the engine");
    let huge_job = json!({"model": BASE, "training_file": "x".repeat(9 << 20)});
    post(&f.app, "/v1/fine_tuning/jobs", None, huge_job).await.error(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_failed_load_is_forgotten_when_the_same_files_are_published_again() {
    use adapters::cache::{CacheConfig, HostCache, Loader, Residency};
    use adapters::{AdapterId, LoraAdapter};
    let shape = lorahost::testing::TinyModel::default();
    let (_model_dir, base) = common::tiny_base(shape);
    let written = tempfile::tempdir().expect("tempdir");
    shape.write_adapter(&written.path().join("a"), 4, 8.0, &["q_proj"], 7).expect("write adapter");
    let config = std::fs::read(written.path().join("a/adapter_config.json")).expect("config");
    let weights = std::fs::read(written.path().join("a/adapter_model.safetensors")).expect("weights");
    let id = AdapterId::of_files(&config, &weights);

    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(dir.path().join("adapters")).expect("store");
    let (reader, base_shape) = (store.clone(), base.model.base_shape());
    let loader: Loader<LoraAdapter> = Arc::new(move |id| {
        let files = reader.read(id).map_err(|e| e.to_string())?;
        LoraAdapter::from_bytes(&files.config, &files.weights, &base_shape).map_err(|e| e.to_string())
    });
    // Failures remembered for longer than the test runs.
    let config_of_cache =
        CacheConfig { retry_failed_after: Duration::from_secs(600), ..CacheConfig::default() };
    let cache = HostCache::new(config_of_cache, loader).expect("cache");
    let backend = Arc::new(FakeBackend::default());
    let parts =
        AppParts { backend, store, cache: Some(cache.clone()), auth: Auth::Open, limits: Limits::default() };
    let app = router(AppState::new(parts));
    let files =
        [("adapter_config.json", config.as_slice()), ("adapter_model.safetensors", weights.as_slice())];

    assert_eq!(upload_parts(&app, "a", None, &files).await.status, StatusCode::CREATED);
    drop(cache.acquire_blocking(id, Duration::from_secs(10)).expect("uploaded: loads"));
    assert_eq!(delete(&app, "/v1/adapters/a", None).await.status, StatusCode::OK);
    // A request admitted before the delete asks for the id after it: the load fails, remembered.
    assert!(cache.acquire_blocking(id, Duration::from_secs(10)).is_err());
    assert!(matches!(cache.residency(id), Residency::Failed { .. }));

    assert_eq!(upload_parts(&app, "a", None, &files).await.status, StatusCode::CREATED);
    let lease = cache.acquire_blocking(id, Duration::from_secs(10)).expect("published again: loads");
    assert_eq!(lease.id(), id);
}

#[tokio::test]
async fn uploads_beyond_the_limit_at_once_are_429_and_store_nothing() {
    let f = fixture(false, Limits { max_uploads: 1, ..Limits::default() });
    let config = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).to_string();
    let body = multipart(&[("adapter_config.json", config.as_bytes()), ("adapter_model.safetensors", b"w")]);
    // The first upload's body arrives in two pieces: the server reads the first, then waits.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let pieces = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let slow = request("PUT", "/v1/adapters/slow", None, Body::from_stream(pieces), Some(&content_type));
    let (head, tail) = body.split_at(body.len() / 2);
    tx.send(Ok(head.to_vec())).await.expect("send");
    let app = f.app.clone();
    let first = tokio::spawn(async move { send(&app, slow).await });
    // On this single-threaded runtime the first upload runs until it waits for its body.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }

    let refused = upload(&f.app, "fast", None, b"w").await;
    let message = refused.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("uploads"), "{message}");
    assert!(refused.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(get(&f.app, "/v1/adapters/fast", None).await.status, StatusCode::NOT_FOUND, "nothing stored");

    tx.send(Ok(tail.to_vec())).await.expect("send");
    drop(tx);
    assert_eq!(first.await.expect("first upload").status, StatusCode::CREATED);
    assert_eq!(
        upload(&f.app, "fast", None, b"w").await.status,
        StatusCode::CREATED,
        "the place is free again"
    );
}
