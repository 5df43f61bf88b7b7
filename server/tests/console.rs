//! The web console's routes without a socket: the page and every asset it loads, with their
//! content types and security and cache headers, public even on a keyed server; unknown assets
//! are 404 in the API's error shape; and the per-adapter traffic `/v1/adapters` reports for the
//! adapters table.

mod common;

use adapters::store::FsStore;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::fake::{InstantBackend as FakeBackend, BASE};
use common::tenants::{ALICE, BOB, KEYS, ROOT};
use http_body_util::BodyExt;
use lorahost::http::{router, ApiKeys, AppParts, AppState, Auth, Limits};
use serde_json::{json, Value};
use tower::ServiceExt;

fn app(auth: Auth) -> (Router, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(dir.path().join("adapters")).expect("store");
    let parts = AppParts {
        backend: std::sync::Arc::new(FakeBackend),
        store,
        cache: None,
        auth,
        limits: Limits::default(),
    };
    (router(AppState::new(parts)), dir)
}

fn keyed() -> (Router, tempfile::TempDir) {
    app(Auth::Keys(ApiKeys::parse(KEYS).expect("keys")))
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers.get(&name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Body,
    ct: Option<&str>,
) -> Reply {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        r = r.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    if let Some(ct) = ct {
        r = r.header(header::CONTENT_TYPE, ct);
    }
    let response = app.clone().oneshot(r.body(body).expect("request")).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    Reply { status, headers, body }
}

async fn get(app: &Router, uri: &str, key: Option<&str>) -> Reply {
    send(app, "GET", uri, key, Body::empty(), None).await
}

/// The headers every console file carries.
fn assert_served(r: &Reply, uri: &str, content_type: &str) {
    assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.text());
    assert_eq!(r.header(header::CONTENT_TYPE), content_type, "{uri}");
    assert_eq!(r.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{uri}");
    let csp = r.header(header::CONTENT_SECURITY_POLICY);
    for directive in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'"] {
        assert!(csp.contains(directive), "{uri}: CSP lacks {directive}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{uri}: {csp}");
    assert_eq!(r.header(header::CACHE_CONTROL), "no-cache", "{uri}");
    assert!(r.header(header::ETAG).starts_with('"'), "{uri}");
    assert!(!r.body.is_empty(), "{uri}");
}

/// `src="/console/..."` and `href="/console/..."` of the page, and `from './x.js'` of the modules.
fn references(text: &str, prefix: &str) -> Vec<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            rest[..rest.find(['"', '\'']).expect("closing quote")].to_string()
        })
        .collect()
}

#[tokio::test]
async fn page_and_every_asset_it_loads_have_their_types_and_headers_without_a_key() {
    let (app, _dir) = keyed();
    let page = get(&app, "/", None).await;
    assert_served(&page, "/", "text/html; charset=utf-8");
    let html = page.text();
    assert!(html.contains("<script type=\"module\" src=\"/console/app.js\">"), "{html}");
    assert!(!html.contains("<script>") && !html.contains("style=\""), "no inline script or style");

    let mut pending: Vec<String> =
        [references(&html, "src=\"/console/"), references(&html, "href=\"/console/")].concat();
    let mut seen = Vec::new();
    while let Some(name) = pending.pop() {
        if seen.contains(&name) {
            continue;
        }
        let uri = format!("/console/{name}");
        let r = get(&app, &uri, None).await;
        let content_type = match name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            other => panic!("{uri}: unexpected asset type {other:?}"),
        };
        assert_served(&r, &uri, content_type);
        if name.ends_with(".js") {
            pending.extend(references(&r.text(), "from './"));
        }
        seen.push(name);
    }
    for module in ["app.js", "api.js", "adapters.js", "upload.js", "playground.js", "metrics.js", "chart.js"]
    {
        assert!(seen.iter().any(|s| s == module), "{module} is not reachable from the page: {seen:?}");
    }

    // Revalidation with the ETag is a 304.
    let etag = page.header(header::ETAG).to_string();
    let r = app
        .clone()
        .oneshot(Request::get("/").header(header::IF_NONE_MATCH, &etag).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn unknown_console_paths_are_404_in_the_api_error_shape() {
    let (app, _dir) = keyed();
    for uri in ["/console/nope.js", "/console/test/console.spec.mjs", "/console/", "/console/..%2Fapp.js"] {
        let r = get(&app, uri, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{uri}: {v}");
        assert_eq!(v["error"]["code"], "not_found", "{uri}: {v}");
        assert!(v["error"]["message"].is_string(), "{uri}: {v}");
    }
    let r = send(&app, "POST", "/", None, Body::empty(), None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    // The API behind the page still needs a key.
    assert_eq!(get(&app, "/v1/adapters", None).await.status, StatusCode::UNAUTHORIZED);
}

const BOUNDARY: &str = "console-test-boundary";

async fn upload(app: &Router, name: &str, key: &str) {
    let mut body = Vec::new();
    for (part, bytes) in [
        ("adapter_config.json", &br#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#[..]),
        ("adapter_model.safetensors", b"w"),
    ] {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{part}\"\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let r = send(app, "PUT", &format!("/v1/adapters/{name}"), Some(key), Body::from(body), Some(&ct)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["traffic"], json!({"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}));
}

async fn chat(app: &Router, model: &str, key: &str, stream: bool) {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 3,
        "stream": stream,
    });
    let r = send(
        app,
        "POST",
        "/v1/chat/completions",
        Some(key),
        Body::from(body.to_string()),
        Some("application/json"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

fn adapter<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["data"]
        .as_array()
        .expect("list")
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("{id}: {list}"))
}

#[tokio::test]
async fn adapters_report_their_traffic_per_tenant_and_name() {
    let (app, _dir) = keyed();
    upload(&app, "lora", ALICE).await;
    upload(&app, "lora", BOB).await;
    chat(&app, "lora", ALICE, false).await;
    chat(&app, "lora", ALICE, true).await;
    chat(&app, BASE, ALICE, false).await;
    // An admin naming alice's adapter counts for it, not for a `lora` of its own tenant.
    chat(&app, "alice/lora", ROOT, false).await;

    let list = get(&app, "/v1/adapters", Some(ALICE)).await.json();
    let a = adapter(&list, "lora");
    // "hello" is 5 prompt tokens; 3 generated per request.
    assert_eq!(a["traffic"], json!({"requests": 3, "prompt_tokens": 15, "generated_tokens": 9}), "{a}");
    for field in ["residency", "bytes", "generation", "rank", "created"] {
        assert!(!a[field].is_null(), "{field}: {a}");
    }
    assert_eq!(a["residency"], "disk");
    assert_eq!(a["generation"], 1);
    let one = get(&app, "/v1/adapters/lora", Some(ALICE)).await.json();
    assert_eq!(one["traffic"], a["traffic"]);

    let bob = get(&app, "/v1/adapters/lora", Some(BOB)).await.json();
    assert_eq!(bob["traffic"]["requests"], 0, "{bob}");
    let all = get(&app, "/v1/adapters", Some(ROOT)).await.json();
    assert_eq!(adapter(&all, "alice/lora")["traffic"]["requests"], 3);
    assert_eq!(adapter(&all, "bob/lora")["traffic"]["requests"], 0);
}
