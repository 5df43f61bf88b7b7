//! The multipart upload routes, end to end through the router as a client reaches them:
//! `PUT /v1/adapters/{name}` (validated against a small base, stored) and `POST /v1/files`
//! (stored as a training file, then deleted). Any body and boundary must get a 2xx or a 4xx
//! with the API's error shape, never a panic or a 5xx.
//! Input: one byte picking the route, one byte of boundary length, the boundary, then the body.
#![no_main]

use adapters::store::FsStore;
use adapters::BaseShape;
use axum::body::Body;
use axum::http::{header, Request};
use axum::Router;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use lorahost::http::{router, AdapterPublisher, AppParts, AppState, Auth, Backend, Limits};
use lorahost::jobs::{DataSummary, Jobs, JobsConfig, Trainer};
use lorahost::train::{Progress, TrainConfig, TrainError, TrainReport};
use lorahost_fuzz::FuzzBackend;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

/// Small limits, so inputs of a few KB reach the too-large paths too.
const MAX_ADAPTER_BYTES: usize = 16 << 10;
const MAX_FILE_BYTES: usize = 16 << 10;

/// Training files are stored, never trained on.
struct NoTraining;

impl Trainer for NoTraining {
    fn base_shape(&self) -> BaseShape {
        lorahost_fuzz::small_base()
    }

    /// Any bytes are data here: what this target checks is the upload, not the format.
    fn check_data(&self, _path: &Path, _max_seq_len: usize) -> Result<DataSummary, String> {
        Ok(DataSummary { examples: 1, tokens: 1 })
    }

    fn train(&self, _config: &TrainConfig, _progress: &mut (dyn Progress + Send)) -> Result<TrainReport, TrainError> {
        Err(TrainError::Config("not in this target".into()))
    }
}

struct Server {
    runtime: tokio::runtime::Runtime,
    app: Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // A RAM disk where there is one: stored uploads are fsynced, and the store grows.
        let scratch = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = scratch.join(format!("lorahost-fuzz-multipart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = FsStore::open(dir.join("adapters")).expect("the scratch store opens");
        let backend: Arc<dyn Backend> = Arc::new(FuzzBackend::default());
        let publisher =
            AdapterPublisher { backend: backend.clone(), store: store.clone(), cache: None, quotas: Arc::default() };
        let jobs = Jobs::open(
            JobsConfig { dir: dir.join("jobs"), base_id: "base".into() },
            Arc::new(NoTraining),
            Arc::new(publisher),
        )
        .expect("the scratch jobs directory opens");
        let limits =
            Limits { max_adapter_bytes: MAX_ADAPTER_BYTES, max_file_bytes: MAX_FILE_BYTES, ..Limits::default() };
        let parts = AppParts { backend, store, cache: None, auth: Auth::Open, limits };
        let app = router(AppState::with_jobs(parts, jobs));
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
        Server { runtime, app }
    })
}

async fn send(app: &Router, request: Request<Body>) -> (u16, Vec<u8>) {
    let response = app.clone().oneshot(request).await.expect("the router is infallible");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.expect("bodies are in memory").to_bytes().to_vec();
    (status, body)
}

fn check(route: &str, status: u16, body: &[u8]) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{route}: {status} with a body that is not JSON ({e})"));
    assert!(status < 500, "{route}: {status}: {json}");
    if status >= 400 {
        assert!(json["error"]["message"].is_string(), "{route}: {status} without an error message: {json}");
    }
    json
}

fuzz_target!(|data: &[u8]| {
    let [route, boundary_len, rest @ ..] = data else { return };
    let (boundary, body) = rest.split_at(usize::from(*boundary_len).min(rest.len()));
    let content_type = [b"multipart/form-data; boundary=".as_slice(), boundary].concat();
    let Ok(content_type) = header::HeaderValue::from_bytes(&content_type) else { return };
    let (method, uri) = if route % 2 == 0 { ("PUT", "/v1/adapters/fuzz") } else { ("POST", "/v1/files") };
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_vec()))
        .expect("a valid request");
    let server = server();
    server.runtime.block_on(async {
        let (status, reply) = send(&server.app, request).await;
        let json = check(uri, status, &reply);
        if uri == "/v1/files" && status == 200 {
            // Keep the scratch directory small: every stored file is deleted again.
            let id = json["id"].as_str().expect("a stored file has an id");
            let delete = Request::delete(format!("/v1/files/{id}")).body(Body::empty()).expect("a valid request");
            let (status, reply) = send(&server.app, delete).await;
            check("DELETE /v1/files", status, &reply);
        }
    });
});
