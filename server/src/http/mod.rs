//! The OpenAI-compatible HTTP server: routes, authentication, validation and responses. It
//! never sees a tensor or a KV block: requests are validated into `ValidRequest`s and handed to
//! a `Backend` (the engine), whose token streams become JSON or server-sent events.
//!
//! `router(state)` has no I/O, so every route is testable without a socket; `serve(listener,
//! state, shutdown)` runs it and drains in order on shutdown: stop accepting, stop admitting,
//! let requests in flight finish until the deadline, cancel the rest.

mod adapters;
pub mod auth;
pub mod backend;
mod console;
pub mod error;
mod fine_tuning;
mod generate;
pub mod metrics;
pub mod openai;
pub mod quota;

pub use adapters::AdapterPublisher;
pub use auth::{ApiKeys, Auth, Caller};
pub use backend::{Backend, EngineBackend};
pub use error::ApiError;
pub use quota::{Quota, Quotas};

use crate::engine::{AdapterChoice, ClientId};
use crate::jobs::Jobs;
use ::adapters::cache::HostCache;
use ::adapters::store::{AdapterKey, FsStore, ObjectPin};
use ::adapters::{AdapterId, LoraAdapter};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics::Metrics;
use serde_json::json;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Default `--max-adapter-bytes`: a rank-64 all-linear adapter of a 7B model in f16 is ~320 MB.
pub const DEFAULT_MAX_ADAPTER_BYTES: usize = 1 << 30;
/// Default `--max-uploads`: each upload holds its whole body in memory (up to
/// `--max-adapter-bytes`, and a copy while it is validated), so a few at a time bound that.
pub const DEFAULT_MAX_UPLOADS: usize = 4;
/// Default `--request-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Default `--shutdown-timeout`: how long requests in flight may finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest JSON body of a generation request.
pub const MAX_JSON_BODY_BYTES: usize = 8 << 20;
/// Default `--header-read-timeout`: a client must send its request line and headers within it
/// (a slowloris client that trickles them is disconnected).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--body-read-timeout`: the longest pause allowed while a request body arrives (a
/// slow but steady upload is fine; a stalled one is cut off).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head (request line plus headers); larger ones get 431.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Most header fields in one request; more get 431.
pub const MAX_HEADERS: usize = 100;

/// Per-request limits of the HTTP layer (the engine has its own).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_adapter_bytes: usize,
    pub request_timeout: Duration,
    /// Largest training file upload (`/v1/files`).
    pub max_file_bytes: usize,
    /// Time a client has to send a request's line and headers.
    pub header_read_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_read_timeout: Duration,
    /// Uploads (adapters and training files) read at once; more get 429 with `Retry-After`.
    pub max_uploads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_adapter_bytes: DEFAULT_MAX_ADAPTER_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_file_bytes: crate::jobs::DEFAULT_MAX_FILE_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_uploads: DEFAULT_MAX_UPLOADS,
        }
    }
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    store: FsStore,
    cache: Option<HostCache<LoraAdapter>>,
    auth: Auth,
    limits: Limits,
    /// One permit per upload being read (`Limits::max_uploads`).
    uploads: Arc<Semaphore>,
    /// Per-tenant quotas (none on an open server).
    quotas: Arc<Quotas>,
    metrics: Metrics,
    /// Fine-tuning jobs and files; `None` when the server does not train.
    jobs: Option<Jobs>,
    /// Set on shutdown: `/ready` fails and new requests get 503.
    draining: AtomicBool,
    /// When the server started (Unix seconds): the base model's `created` in `/v1/models`.
    started_unix: u64,
    /// Set at the shutdown deadline: requests still running end now.
    cancel: watch::Sender<bool>,
}

/// The parts a server is made of.
pub struct AppParts {
    pub backend: Arc<dyn Backend>,
    pub store: FsStore,
    /// Serves adapters to the engine; `None` only in tests whose backend does not load them.
    pub cache: Option<HostCache<LoraAdapter>>,
    pub auth: Auth,
    pub limits: Limits,
}

/// The model a request names, resolved for its caller.
#[derive(Debug, Clone)]
pub struct Target {
    pub adapter: Option<AdapterChoice>,
    /// Who the request is accounted to for fair scheduling: tenant and adapter.
    pub client: ClientId,
    /// Keeps the adapter's files on disk until the request ends: the name may be replaced or
    /// deleted while the request waits for the adapter to load.
    pub pin: Option<ObjectPin>,
    /// The name and the version of the stored adapter, when `model` named one.
    pub stored: Option<(AdapterKey, AdapterId)>,
}

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self::build(parts, None)
    }

    /// A server that also runs fine-tuning jobs (`/v1/files`, `/v1/fine_tuning/jobs`).
    pub fn with_jobs(parts: AppParts, jobs: Jobs) -> Self {
        Self::build(parts, Some(jobs))
    }

    fn build(parts: AppParts, jobs: Option<Jobs>) -> Self {
        let (cancel, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                backend: parts.backend,
                store: parts.store,
                cache: parts.cache,
                quotas: parts.auth.quotas(),
                auth: parts.auth,
                uploads: Arc::new(Semaphore::new(parts.limits.max_uploads)),
                limits: parts.limits,
                metrics: Metrics::default(),
                jobs,
                draining: AtomicBool::new(false),
                started_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                cancel,
            }),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.inner.backend.as_ref()
    }

    pub fn store(&self) -> &FsStore {
        &self.inner.store
    }

    pub fn cache(&self) -> Option<&HostCache<LoraAdapter>> {
        self.inner.cache.as_ref()
    }

    pub fn auth(&self) -> &Auth {
        &self.inner.auth
    }

    /// A place among the uploads read at once, held until the upload is answered; 429 when all
    /// are taken, before any of the body is read.
    pub fn upload_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.inner.uploads.clone().try_acquire_owned().map_err(|_| {
            ApiError::Overloaded(format!(
                "{} uploads are being received; retry shortly",
                self.inner.limits.max_uploads
            ))
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// When the server started, in Unix seconds.
    pub fn started_unix(&self) -> u64 {
        self.inner.started_unix
    }

    pub fn quotas(&self) -> &Arc<Quotas> {
        &self.inner.quotas
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn jobs(&self) -> Option<&Jobs> {
        self.inner.jobs.as_ref()
    }

    /// How adapters are published: validated, stored, cached.
    pub fn publisher(&self) -> AdapterPublisher {
        AdapterPublisher {
            backend: self.inner.backend.clone(),
            store: self.inner.store.clone(),
            cache: self.inner.cache.clone(),
            quotas: self.inner.quotas.clone(),
        }
    }

    /// Stop admitting: `/ready` answers 503, new requests too.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// End every request still running (the shutdown deadline passed).
    pub fn cancel_all(&self) {
        self.inner.cancel.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    fn cancel_signal(&self) -> watch::Receiver<bool> {
        self.inner.cancel.subscribe()
    }

    fn check_accepting(&self) -> Result<(), ApiError> {
        if self.is_draining() {
            Err(ApiError::NotReady("the server is shutting down".into()))
        } else {
            Ok(())
        }
    }

    /// The store key `reference` names for `caller`: a name in the caller's tenant, or
    /// `tenant/name` for an admin. `None` when it cannot name an adapter (so: not found).
    fn adapter_key(&self, caller: &Caller, reference: &str) -> Option<AdapterKey> {
        match reference.split_once('/') {
            Some((tenant, name)) if caller.admin => AdapterKey::new(tenant, name).ok(),
            _ => AdapterKey::new(caller.tenant.clone(), reference).ok(),
        }
    }

    /// `model` is the base's id or an adapter the caller may use; anything else is 404.
    pub fn resolve_model(&self, caller: &Caller, model: &str) -> Result<Target, ApiError> {
        if model == self.backend().model_id() {
            let client = client_id(&caller.tenant, None);
            return Ok(Target { adapter: None, client, pin: None, stored: None });
        }
        let not_found = || ApiError::NotFound { what: "model", name: model.to_string() };
        let key = self.adapter_key(caller, model).ok_or_else(not_found)?;
        let (stored, pin) = self.store().get_pinned(&key).ok_or_else(not_found)?;
        Ok(Target {
            adapter: Some(AdapterChoice::Cached(stored.id)),
            client: client_id(key.tenant(), Some(key.name())),
            pin: Some(pin),
            stored: Some((key, stored.id)),
        })
    }

    /// Drops a replaced or deleted adapter from the cache once no name refers to its bytes
    /// (sequences holding a lease finish on it first).
    fn forget_if_unreferenced(&self, id: AdapterId) {
        if let Some(cache) = self.cache() {
            if !self.store().is_referenced(id) {
                cache.invalidate(id);
            }
        }
    }
}

/// The fairness accounts of a request: its tenant, and the model within the tenant.
fn client_id(tenant: &str, adapter: Option<&str>) -> ClientId {
    fn hash_of(v: impl std::hash::Hash) -> u64 {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        v.hash(&mut h);
        h.finish()
    }
    ClientId::new(hash_of(tenant), hash_of(adapter))
}

/// Every route. No I/O: tests drive it with `tower::ServiceExt::oneshot`.
pub fn router(state: AppState) -> Router {
    let upload_limit =
        state.limits().max_adapter_bytes.saturating_mul(2).saturating_add(adapters::MULTIPART_OVERHEAD_BYTES);
    let api = Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/models", get(adapters::list_models))
        .route("/v1/adapters", get(adapters::list_adapters))
        .route(
            "/v1/adapters/{name}",
            get(adapters::get_adapter)
                .delete(adapters::delete_adapter)
                .put(adapters::put_adapter)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            "/v1/adapters/{tenant}/{name}",
            get(adapters::get_tenant_adapter).delete(adapters::delete_tenant_adapter),
        )
        .route(
            "/v1/files",
            get(fine_tuning::list_files).post(fine_tuning::upload_file).layer(DefaultBodyLimit::max(
                state.limits().max_file_bytes.saturating_add(adapters::MULTIPART_OVERHEAD_BYTES),
            )),
        )
        .route("/v1/files/{id}", get(fine_tuning::get_file).delete(fine_tuning::delete_file))
        .route("/v1/files/{id}/content", get(fine_tuning::file_content))
        .route("/v1/fine_tuning/jobs", get(fine_tuning::list_jobs).post(fine_tuning::create_job))
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::get_job))
        .route("/v1/fine_tuning/jobs/{id}/events", get(fine_tuning::list_events))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(fine_tuning::cancel_job))
        .route("/v1/quota", get(quota::tenant_quota))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES));
    api.layer(axum::middleware::from_fn_with_state(state.clone(), count_responses)).with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.check_accepting()?;
    Ok(Json(json!({"status": "ready", "model": state.backend().model_id()})))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound { what: "route", name: request.uri().path().to_string() }
}

/// `/metrics`: open on an open server; with keys, admins only (it names every tenant's adapters).
async fn metrics_text(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    if !state.auth().is_open() {
        let header = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !state.auth().authenticate(header)?.admin {
            return Err(ApiError::Forbidden("/metrics needs an admin key".into()));
        }
    }
    let engine = state.backend().stats();
    let cache = state.cache().map(|c| c.stats());
    let stored = state.store().list(None).len();
    let mut text = state.metrics().render(&engine, cache.as_ref(), stored);
    if let Some(jobs) = state.jobs() {
        metrics::render_jobs(&mut text, &jobs.counts());
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The route template of a path, for metric labels (never the raw path: names are unbounded).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/v1/adapters" => "/v1/adapters",
        "/v1/quota" => "/v1/quota",
        "/health" => "/health",
        "/ready" => "/ready",
        "/metrics" => "/metrics",
        "/" => "/",
        p if p.starts_with("/console/") => "/console/{file}",
        p if p.starts_with("/v1/adapters/") => "/v1/adapters/{name}",
        "/v1/files" => "/v1/files",
        p if p.starts_with("/v1/files/") => "/v1/files/{id}",
        "/v1/fine_tuning/jobs" => "/v1/fine_tuning/jobs",
        p if p.starts_with("/v1/fine_tuning/jobs/") => "/v1/fine_tuning/jobs/{id}",
        _ => "other",
    }
}

async fn count_responses(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_label(request.uri().path());
    let response = next.run(request).await;
    state.metrics().response(route, response.status().as_u16());
    response
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then drains: stops accepting,
/// answers 503 to new requests, lets requests in flight finish for up to `drain_deadline`, then
/// cancels the rest and returns once every connection is closed.
///
/// Each connection is HTTP/1.1 with the connection limits of [`Limits`]: the request head must
/// arrive within `header_read_timeout` and stay within [`MAX_HEADER_BYTES`] and [`MAX_HEADERS`]
/// (431 otherwise), and a body may pause at most `body_read_timeout` between pieces.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_deadline: Duration,
) -> std::io::Result<()> {
    let limits = state.limits().clone();
    let app = router(state.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Streamed tokens are small writes: send each at once, not after an ACK.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("setting TCP_NODELAY: {e}");
                    }
                    stream
                }
                Err(e) => {
                    // Per-connection failures (reset before accept) and running out of file
                    // descriptors: keep serving the connections there are.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let body_timeout = limits.body_read_timeout;
        let service = hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
            let req = req
                .map(|body| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(body_timeout, body)));
            tower::ServiceExt::oneshot(app.clone(), req)
        });
        let connection =
            connections.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection closed with an error: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections or requests");
    state.begin_drain();
    let finished = connections.shutdown();
    tokio::pin!(finished);
    tokio::select! {
        () = &mut finished => return Ok(()),
        () = tokio::time::sleep(drain_deadline) => {
            tracing::warn!("shutdown deadline passed: cancelling the requests still running");
            state.cancel_all();
        }
    }
    finished.await;
    Ok(())
}
