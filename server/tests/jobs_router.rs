//! The fine-tuning routes without a socket (`tower::ServiceExt::oneshot`): `/v1/files` and
//! `/v1/fine_tuning/jobs` over the real job store and runner, with a fake backend (instant
//! answers, any adapter with `r >= 1` is valid) and a trainer that checks data with the real
//! loader on a tiny model but "trains" only when a test opens its gate.
//!
//! Checked: file upload and validation errors naming the line, job creation and parameter
//! checks, the job's life to `succeeded` and its model in the next request, events and
//! pagination, cancellation (queued and running; nothing published), tenant isolation, quotas,
//! metrics, and a shutdown that marks a running job interrupted, which a reopened store keeps,
//! while a queued job runs after the restart.

mod common;

use adapters::store::FsStore;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::fake::{InstantBackend as FakeBackend, BASE};
use common::tenants::{ALICE, BOB, KEYS, ROOT};
use http_body_util::BodyExt;
use lorahost::base::Base;
use lorahost::http::{router, AdapterPublisher, ApiKeys, AppParts, AppState, Auth, Backend, Limits};
use lorahost::jobs::{DataSummary, JobRecord, JobSettings, JobStatus, Jobs, JobsConfig, Publisher, Trainer};
use lorahost::testing::TinyModel;
use lorahost::train::{Progress, TrainConfig, TrainError, TrainReport};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tower::ServiceExt;

const GOOD: &str = concat!(
    r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
    "\n",
    r#"{"prompt": "2+2=", "completion": "4"}"#,
    "\n",
    r#"{"text": "plain text"}"#,
    "\n"
);

/// The tiny base the data checks tokenize with, loaded once.
fn tiny() -> &'static Base {
    static BASE: OnceLock<(tempfile::TempDir, Base)> = OnceLock::new();
    &BASE.get_or_init(|| common::tiny_base(TinyModel::default())).1
}

/// Checks data for real; trains two fake steps once its gate is open, watching for cancellation.
#[derive(Default)]
struct GatedTrainer {
    open: Mutex<bool>,
    opened: Condvar,
    configs: Mutex<Vec<TrainConfig>>,
}

impl GatedTrainer {
    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Trainer for GatedTrainer {
    fn base_shape(&self) -> adapters::BaseShape {
        tiny().model.base_shape()
    }

    fn check_data(&self, path: &Path, max_seq_len: usize) -> Result<DataSummary, String> {
        let data = lorahost::train::data::load(path, tiny(), max_seq_len).map_err(|e| e.to_string())?;
        Ok(DataSummary { examples: data.examples.len(), tokens: 0 })
    }

    fn train(
        &self,
        config: &TrainConfig,
        progress: &mut (dyn Progress + Send),
    ) -> Result<TrainReport, TrainError> {
        self.configs.lock().unwrap().push(config.clone());
        progress.start(2);
        let mut open = self.open.lock().unwrap();
        while !*open {
            if progress.cancelled() {
                return Err(TrainError::Cancelled);
            }
            open = self.opened.wait_timeout(open, Duration::from_millis(5)).unwrap().0;
        }
        drop(open);
        progress.step(1, 2.0, 1e-4, 100.0);
        progress.step(2, 1.0, 1e-4, 100.0);
        std::fs::create_dir_all(&config.out).unwrap();
        let adapter_config = json!({"peft_type": "LORA", "r": config.rank, "lora_alpha": config.alpha});
        std::fs::write(config.out.join("adapter_config.json"), adapter_config.to_string()).unwrap();
        std::fs::write(config.out.join("adapter_model.safetensors"), b"weights").unwrap();
        std::fs::write(config.out.join("training_log.json"), b"{\"losses\": [2.0, 1.0]}").unwrap();
        Ok(TrainReport {
            steps: 2,
            examples: 3,
            truncated: 0,
            losses: vec![2.0, 1.0],
            eval_losses: vec![],
            trained_tokens: 42,
            processed_tokens: 60,
            tokens_per_second: 100.0,
            seconds: 0.6,
            peak_rss_bytes: None,
        })
    }
}

/// The server's publisher, able to hold a job in the moment after it has stored its adapter
/// and before it records its end.
#[derive(Default)]
struct HeldPublisher {
    inner: OnceLock<AdapterPublisher>,
    holding: Mutex<bool>,
    released: Condvar,
}

impl HeldPublisher {
    fn hold(&self) {
        *self.holding.lock().unwrap() = true;
    }

    fn release(&self) {
        *self.holding.lock().unwrap() = false;
        self.released.notify_all();
    }
}

impl Publisher for HeldPublisher {
    fn publish(&self, tenant: &str, name: &str, config: &[u8], weights: &[u8]) -> Result<(), String> {
        let inner = self.inner.get().expect("publisher set");
        inner.publish(tenant, name, config, weights)?;
        let mut holding = self.holding.lock().unwrap();
        while *holding {
            holding = self.released.wait(holding).unwrap();
        }
        Ok(())
    }

    fn is_published(&self, tenant: &str, name: &str) -> bool {
        self.inner.get().expect("publisher set").is_published(tenant, name)
    }
}

struct Fixture {
    app: Router,
    publisher: Arc<HeldPublisher>,
    jobs: Jobs,
    trainer: Arc<GatedTrainer>,
    store: FsStore,
    dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    start(dir)
}

fn start(dir: tempfile::TempDir) -> Fixture {
    start_with(dir, Limits::default())
}

fn start_with(dir: tempfile::TempDir, limits: Limits) -> Fixture {
    start_keyed(dir, limits, KEYS)
}

fn start_keyed(dir: tempfile::TempDir, limits: Limits, keys: &str) -> Fixture {
    let store = FsStore::open(dir.path().join("adapters")).expect("store");
    let backend: Arc<dyn Backend> = Arc::new(FakeBackend);
    let trainer = Arc::new(GatedTrainer::default());
    let auth = Auth::Keys(ApiKeys::parse(keys).expect("keys"));
    let publisher = AdapterPublisher {
        backend: backend.clone(),
        store: store.clone(),
        cache: None,
        quotas: auth.quotas(),
    };
    let held = Arc::new(HeldPublisher::default());
    assert!(held.inner.set(publisher).is_ok());
    let jobs = Jobs::open(
        JobsConfig { dir: dir.path().join("jobs"), base_id: BASE.into() },
        trainer.clone(),
        held.clone(),
    )
    .expect("jobs");
    let parts = AppParts { backend, store: store.clone(), cache: None, auth, limits };
    let state = AppState::with_jobs(parts, jobs.clone());
    Fixture { app: router(state), publisher: held, jobs, trainer, store, dir }
}

struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn ok(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", String::from_utf8_lossy(&self.body));
        self.json()
    }

    /// An OpenAI-shaped error with this status; returns the message.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{}", String::from_utf8_lossy(&self.body));
        self.json()["error"]["message"].as_str().expect("message").to_string()
    }
}

async fn send(app: &Router, method: &str, uri: &str, key: &str, body: Body, ct: Option<&str>) -> Reply {
    let mut r =
        Request::builder().method(method).uri(uri).header(header::AUTHORIZATION, format!("Bearer {key}"));
    if let Some(ct) = ct {
        r = r.header(header::CONTENT_TYPE, ct);
    }
    let response = app.clone().oneshot(r.body(body).expect("request")).await.expect("infallible");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    Reply { status, body }
}

async fn get(app: &Router, uri: &str, key: &str) -> Reply {
    send(app, "GET", uri, key, Body::empty(), None).await
}

async fn post(app: &Router, uri: &str, key: &str, body: Value) -> Reply {
    send(app, "POST", uri, key, Body::from(body.to_string()), Some("application/json")).await
}

async fn upload_file(app: &Router, key: &str, purpose: &str, content: &str) -> Reply {
    const B: &str = "jobs-test-boundary";
    let body = format!(
        "--{B}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{B}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={B}");
    send(app, "POST", "/v1/files", key, Body::from(body), Some(&ct)).await
}

async fn good_file(app: &Router, key: &str) -> String {
    let file = upload_file(app, key, "fine-tune", GOOD).await.ok();
    file["id"].as_str().expect("file id").to_string()
}

async fn create_job(app: &Router, key: &str, file: &str, extra: Value) -> Value {
    let mut body = json!({"model": BASE, "training_file": file});
    body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    post(app, "/v1/fine_tuning/jobs", key, body).await.ok()
}

/// Polls the job until `done` says so (the runner is a thread of its own).
async fn wait_for(app: &Router, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = get(app, &format!("/v1/fine_tuning/jobs/{id}"), key).await.ok();
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job never got there: {job}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn status_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |job| job["status"] == s
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
}

#[tokio::test]
async fn files_are_validated_stored_listed_and_deleted() {
    let f = fixture();
    let file = upload_file(&f.app, ALICE, "fine-tune", GOOD).await.ok();
    assert!(file["id"].as_str().unwrap().starts_with("file-"), "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], GOOD.len());
    assert_eq!(file["filename"], "train.jsonl");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["status"], "processed");
    let id = file["id"].as_str().unwrap();

    let bad = format!("{GOOD}{{\"messages\": 3}}\n");
    let msg = upload_file(&f.app, ALICE, "fine-tune", &bad).await.error(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(msg.contains("train.jsonl line 4"), "{msg}");
    let msg = upload_file(&f.app, ALICE, "fine-tune", "{\"text\": \"a\"}\nnot json\n")
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(msg.contains("line 2"), "{msg}");
    let msg = upload_file(&f.app, ALICE, "assistants", GOOD).await.error(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(msg.contains("purpose"), "{msg}");
    let msg =
        send(&f.app, "POST", "/v1/files", ALICE, Body::from("x"), Some("multipart/form-data; boundary=q"))
            .await
            .error(StatusCode::BAD_REQUEST);
    assert!(!msg.is_empty());

    let list = get(&f.app, "/v1/files", ALICE).await.ok();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "bad uploads store nothing: {list}");
    assert_eq!(get(&f.app, &format!("/v1/files/{id}"), ALICE).await.ok()["id"], id);
    let content = get(&f.app, &format!("/v1/files/{id}/content"), ALICE).await;
    assert_eq!(content.body, GOOD.as_bytes());

    let deleted = send(&f.app, "DELETE", &format!("/v1/files/{id}"), ALICE, Body::empty(), None).await.ok();
    assert_eq!(deleted["deleted"], true);
    get(&f.app, &format!("/v1/files/{id}"), ALICE).await.error(StatusCode::NOT_FOUND);
    assert!(get(&f.app, "/v1/files", ALICE).await.ok()["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_file_over_the_limit_is_413_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = start_with(dir, Limits { max_file_bytes: 64, ..Limits::default() });
    upload_file(&f.app, ALICE, "fine-tune", GOOD).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    upload_file(&f.app, ALICE, "fine-tune", &GOOD.repeat(20_000)).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(get(&f.app, "/v1/files", ALICE).await.ok()["data"].as_array().unwrap().is_empty());
    let small = "{\"text\": \"a\"}\n";
    assert_eq!(upload_file(&f.app, ALICE, "fine-tune", small).await.ok()["bytes"], small.len());
}

#[tokio::test]
async fn job_requests_are_checked_before_anything_is_queued() {
    let f = fixture();
    let file = good_file(&f.app, ALICE).await;
    let jobs = "/v1/fine_tuning/jobs";
    let body = |extra: Value| {
        let mut b = json!({"model": BASE, "training_file": file});
        b.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap());
        b
    };
    post(&f.app, jobs, ALICE, json!({"model": "gpt-4o", "training_file": file}))
        .await
        .error(StatusCode::NOT_FOUND);
    post(&f.app, jobs, ALICE, json!({"model": BASE, "training_file": "file-nope"}))
        .await
        .error(StatusCode::NOT_FOUND);
    for (extra, param) in [
        (json!({"hyperparameters": {"n_epochs": 0}}), "n_epochs"),
        (json!({"hyperparameters": {"n_epochs": "many"}}), "n_epochs"),
        (json!({"hyperparameters": {"batch_size": 2.5}}), "batch_size"),
        (json!({"hyperparameters": {"learning_rate_multiplier": -1}}), "learning_rate_multiplier"),
        (json!({"hyperparameters": {"rank": 0}}), "rank"),
        // Within the API's bound, but wider than the tiny base's k/v projections (32).
        (json!({"hyperparameters": {"rank": 200}}), "rank"),
        (json!({"lorahost": {"targets": ["q_proj", "nope"]}}), "targets"),
        (json!({"lorahost": {"layers": "1-5"}}), "layers"),
        (json!({"lorahost": {"steps": 0}}), "steps"),
        (json!({"lorahost": {"steps": 1_000_000_000_000u64}}), "steps"),
        (json!({"suffix": "has space"}), "suffix"),
        (json!({"method": {"type": "dpo"}}), "method"),
    ] {
        let reply = post(&f.app, jobs, ALICE, body(extra.clone())).await;
        reply.error(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.json()["error"]["param"], param, "{extra}");
    }
    post(&f.app, jobs, ALICE, body(json!({"hyperparameters": {"epochs": 1}})))
        .await
        .error(StatusCode::BAD_REQUEST);
    post(&f.app, jobs, ALICE, json!({"training_file": file})).await.error(StatusCode::BAD_REQUEST);
    assert!(get(&f.app, jobs, ALICE).await.ok()["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_job_trains_publishes_and_its_model_serves_the_owner_only() {
    let f = fixture();
    let file = good_file(&f.app, ALICE).await;
    let valid = good_file(&f.app, ALICE).await;
    let job = create_job(
        &f.app,
        ALICE,
        &file,
        json!({"suffix": "facts", "seed": 7, "validation_file": valid,
               "metadata": {"team": "x"}, "integrations": [],
               "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "rank": 4},
               "lorahost": {"targets": ["q_proj", "v_proj"], "layers": [1, 1], "steps": 2}}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ftjob-"), "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["model"], BASE);
    assert!(job["fine_tuned_model"].is_null());
    assert_eq!(job["hyperparameters"]["n_epochs"], 2.0);
    assert_eq!(job["hyperparameters"]["rank"], 4);
    assert_eq!(job["seed"], 7);

    wait_for(&f.app, ALICE, &id, status_is("running")).await;
    f.trainer.open_gate();
    let done = wait_for(&f.app, ALICE, &id, status_is("succeeded")).await;
    let model = done["fine_tuned_model"].as_str().expect("model").to_string();
    assert!(model.starts_with("ft-facts-"), "{done}");
    assert_eq!(done["trained_tokens"], 42);
    assert!(done["finished_at"].is_u64());
    assert!(done["error"].is_null());
    let config = f.trainer.configs.lock().unwrap()[0].clone();
    assert_eq!((config.rank, config.alpha, config.steps, config.seed), (4, 8.0, Some(2), 7));
    assert_eq!(config.layers, Some(1..2));
    assert_eq!(done["validation_file"], valid.as_str());
    let eval = config.eval_data.as_ref().expect("the validation file is the eval data");
    assert_eq!(std::fs::read_to_string(eval).unwrap(), GOOD);
    assert_eq!(std::fs::read_to_string(&config.data).unwrap(), GOOD);

    // The result is a stored adapter of alice's, servable at once, and a results file.
    assert!(f.store.get(&adapters::store::AdapterKey::new("alice", model.as_str()).unwrap()).is_some());
    post(&f.app, "/v1/chat/completions", ALICE, chat(&model)).await.ok();
    let models = get(&f.app, "/v1/models", ALICE).await.ok().to_string();
    assert!(models.contains(&model), "{models}");
    let results = done["result_files"][0].as_str().expect("results file");
    assert_eq!(
        get(&f.app, &format!("/v1/files/{results}"), ALICE).await.ok()["purpose"],
        "fine-tune-results"
    );

    // Events: newest first, steps with their loss, paginated.
    let events = get(&f.app, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100"), ALICE).await.ok();
    let data = events["data"].as_array().unwrap();
    assert_eq!(data[0]["message"], "The job has successfully completed");
    let step = data.iter().find(|e| e["data"]["step"] == 2).expect("step 2 event");
    assert_eq!(step["data"]["train_loss"], 1.0);
    assert_eq!(step["type"], "metrics");
    let first = get(&f.app, &format!("/v1/fine_tuning/jobs/{id}/events?limit=2"), ALICE).await.ok();
    assert_eq!(first["has_more"], true);
    let after = first["data"][1]["id"].as_str().unwrap();
    let next =
        get(&f.app, &format!("/v1/fine_tuning/jobs/{id}/events?limit=2&after={after}"), ALICE).await.ok();
    assert_eq!(next["data"][0], data[2]);

    // Bob sees none of it; the admin sees all of it.
    for uri in [
        format!("/v1/fine_tuning/jobs/{id}"),
        format!("/v1/fine_tuning/jobs/{id}/events"),
        format!("/v1/files/{file}"),
        format!("/v1/files/{file}/content"),
    ] {
        get(&f.app, &uri, BOB).await.error(StatusCode::NOT_FOUND);
    }
    post(&f.app, &format!("/v1/fine_tuning/jobs/{id}/cancel"), BOB, json!({}))
        .await
        .error(StatusCode::NOT_FOUND);
    post(&f.app, "/v1/fine_tuning/jobs", BOB, json!({"model": BASE, "training_file": file}))
        .await
        .error(StatusCode::NOT_FOUND);
    post(&f.app, "/v1/chat/completions", BOB, chat(&model)).await.error(StatusCode::NOT_FOUND);
    assert!(get(&f.app, "/v1/fine_tuning/jobs", BOB).await.ok()["data"].as_array().unwrap().is_empty());
    assert!(get(&f.app, "/v1/files", BOB).await.ok()["data"].as_array().unwrap().is_empty());
    let admin = get(&f.app, &format!("/v1/fine_tuning/jobs/{id}"), ROOT).await.ok();
    assert_eq!(admin["fine_tuned_model"], format!("alice/{model}"));
    assert_eq!(get(&f.app, "/v1/files", ROOT).await.ok()["data"].as_array().unwrap().len(), 3);

    // A finished job cannot be cancelled, and its file outlives it.
    post(&f.app, &format!("/v1/fine_tuning/jobs/{id}/cancel"), ALICE, json!({}))
        .await
        .error(StatusCode::CONFLICT);

    let metrics = get(&f.app, "/metrics", ROOT).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("lorahost_fine_tuning_jobs{status=\"succeeded\"} 1"), "{text}");
    assert!(text.contains("lorahost_fine_tuning_jobs_running 0"), "{text}");
    assert!(text.contains("lorahost_fine_tuning_trained_tokens_total 42"), "{text}");
}

#[tokio::test]
async fn cancelled_jobs_publish_nothing_and_the_queue_moves_on() {
    let f = fixture();
    let file = good_file(&f.app, ALICE).await;
    let running = create_job(&f.app, ALICE, &file, json!({"suffix": "one"})).await;
    let queued = create_job(&f.app, ALICE, &file, json!({"suffix": "two"})).await;
    let third = create_job(&f.app, ALICE, &file, json!({"suffix": "three"})).await;
    let (running, queued, third) =
        (running["id"].as_str().unwrap(), queued["id"].as_str().unwrap(), third["id"].as_str().unwrap());
    wait_for(&f.app, ALICE, running, status_is("running")).await;
    assert_eq!(get(&f.app, &format!("/v1/fine_tuning/jobs/{queued}"), ALICE).await.ok()["status"], "queued");

    // A file in use by an unfinished job stays.
    send(&f.app, "DELETE", &format!("/v1/files/{file}"), ALICE, Body::empty(), None)
        .await
        .error(StatusCode::CONFLICT);

    let c = post(&f.app, &format!("/v1/fine_tuning/jobs/{queued}/cancel"), ALICE, json!({})).await.ok();
    assert_eq!(c["status"], "cancelled");
    let c = post(&f.app, &format!("/v1/fine_tuning/jobs/{running}/cancel"), ALICE, json!({})).await.ok();
    assert_eq!(c["status"], "cancelled");
    let message = post(&f.app, &format!("/v1/fine_tuning/jobs/{running}/cancel"), ALICE, json!({}))
        .await
        .error(StatusCode::CONFLICT);
    assert!(message.contains("has finished (cancelled)"), "{message}");

    // The third job runs next; the trainer stopped the cancelled one at its next step.
    wait_for(&f.app, ALICE, third, status_is("running")).await;
    f.trainer.open_gate();
    wait_for(&f.app, ALICE, third, status_is("succeeded")).await;
    assert_eq!(f.trainer.configs.lock().unwrap().len(), 2, "the cancelled queued job never ran");
    for id in [running, queued] {
        let job = get(&f.app, &format!("/v1/fine_tuning/jobs/{id}"), ALICE).await.ok();
        assert_eq!(job["status"], "cancelled", "{job}");
        assert!(job["fine_tuned_model"].is_null());
    }
    let names: Vec<String> = f.store.list(Some("alice")).iter().map(|a| a.key.name().to_string()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("ft-three-"), "{names:?}");
}

#[tokio::test]
async fn a_job_stopped_by_shutdown_is_failed_after_a_restart_and_a_queued_one_runs() {
    let f = fixture();
    let file = good_file(&f.app, ALICE).await;
    let job = create_job(&f.app, ALICE, &file, json!({})).await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(&f.app, ALICE, &id, status_is("running")).await;
    let waiting = create_job(&f.app, ALICE, &file, json!({})).await;
    let waiting = waiting["id"].as_str().unwrap().to_string();
    let jobs = f.jobs.clone();
    tokio::task::spawn_blocking(move || jobs.shutdown()).await.unwrap();
    let Fixture { app, jobs, store, publisher, dir, .. } = f;
    drop((app, jobs, store, publisher));

    let f = start(dir);
    let job = get(&f.app, &format!("/v1/fine_tuning/jobs/{id}"), ALICE).await.ok();
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "interrupted", "{job}");
    assert!(job["fine_tuned_model"].is_null());
    assert!(f.store.list(None).is_empty());
    assert_eq!(get(&f.app, &format!("/v1/files/{file}"), ALICE).await.ok()["id"], file.as_str());
    // The job that was only queued lost nothing: it runs after the restart.
    wait_for(&f.app, ALICE, &waiting, status_is("running")).await;
    f.trainer.open_gate();
    let job = wait_for(&f.app, ALICE, &waiting, status_is("succeeded")).await;
    assert!(job["fine_tuned_model"].is_string(), "{job}");
    assert_eq!(f.store.list(Some("alice")).len(), 1);
}

#[tokio::test]
async fn fine_tuned_adapters_count_against_the_adapter_quota() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapters = 1\n");
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let file = good_file(&f.app, ALICE).await;
    let job = |suffix: &str| json!({"model": BASE, "training_file": file, "suffix": suffix});
    let id = |job: Value| job["id"].as_str().unwrap().to_string();
    let first = id(post(&f.app, "/v1/fine_tuning/jobs", ALICE, job("one")).await.ok());
    wait_for(&f.app, ALICE, &first, status_is("running")).await;
    // While it trains, the tenant fills its quota another way; a second job is refused...
    let manual = adapters::store::AdapterKey::new("alice", "manual").unwrap();
    f.store.put(&manual, br#"{"r": 4}"#, b"weights").unwrap();
    let message =
        post(&f.app, "/v1/fine_tuning/jobs", ALICE, job("two")).await.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("adapters held") && message.contains("fine-tuning"), "{message}");
    // ...and the running one is checked again as it stores its adapter.
    f.trainer.open_gate();
    let failed = wait_for(&f.app, ALICE, &first, status_is("failed")).await;
    assert_eq!(failed["error"]["code"], "publish_failed", "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap_or("").contains("quota"), "{failed}");
    let names =
        || -> Vec<String> { f.store.list(Some("alice")).iter().map(|a| a.key.name().to_string()).collect() };
    assert_eq!(names(), ["manual"]);

    // With room for one, a job runs and publishes; then a further job is refused at once.
    assert!(f.store.delete(&manual).unwrap());
    let third = id(post(&f.app, "/v1/fine_tuning/jobs", ALICE, job("three")).await.ok());
    wait_for(&f.app, ALICE, &third, status_is("succeeded")).await;
    post(&f.app, "/v1/fine_tuning/jobs", ALICE, job("four")).await.error(StatusCode::TOO_MANY_REQUESTS);
    let held = names();
    assert!(held.len() == 1 && held[0].starts_with("ft-three-"), "{held:?}");
    assert_eq!(f.trainer.configs.lock().unwrap().len(), 2, "the refused jobs never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_job_creations_cannot_pass_the_adapter_quota_together() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapters = 2\n");
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let file = good_file(&f.app, ALICE).await;
    let creations: Vec<_> = (0..12)
        .map(|i| {
            let app = f.app.clone();
            let body = json!({"model": BASE, "training_file": file, "suffix": format!("n{i}")});
            tokio::spawn(async move { post(&app, "/v1/fine_tuning/jobs", ALICE, body).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in creations {
        statuses.push(c.await.expect("creation task"));
    }
    let queued = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((queued, refused), (2, 10), "{statuses:?}");
    let listed = get(&f.app, "/v1/fine_tuning/jobs", ALICE).await.ok();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2), "nothing else queued: {listed}");
    let usage = get(&f.app, "/v1/quota", ALICE).await.ok()["usage"].clone();
    assert_eq!(usage["pending_fine_tuning_jobs"], 2, "{usage}");
    assert_eq!(usage["file_bytes"], GOOD.len(), "{usage}");
    f.trainer.open_gate();
}

#[tokio::test]
async fn a_job_whose_adapter_would_not_fit_the_byte_quota_is_refused_at_once() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapter_bytes = 1000\n");
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let file = good_file(&f.app, ALICE).await;
    let body = json!({"model": BASE, "training_file": file, "hyperparameters": {"rank": 1}});
    let message =
        post(&f.app, "/v1/fine_tuning/jobs", ALICE, body).await.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("adapter bytes held") && message.contains("beside 0 held"), "{message}");
    let listed = get(&f.app, "/v1/fine_tuning/jobs", ALICE).await.ok();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0), "nothing queued: {listed}");
    assert!(f.trainer.configs.lock().unwrap().is_empty(), "nothing trained");
    // Bob has no byte quota.
    let bob_file = good_file(&f.app, BOB).await;
    create_job(&f.app, BOB, &bob_file, json!({})).await;
    f.trainer.open_gate();
}

#[tokio::test]
async fn a_job_whose_adapter_would_exceed_the_servers_upload_limit_is_refused() {
    let limits = Limits { max_adapter_bytes: 1000, ..Limits::default() };
    let f = start_with(tempfile::tempdir().expect("tempdir"), limits);
    let file = good_file(&f.app, ALICE).await;
    let body = json!({"model": BASE, "training_file": file, "hyperparameters": {"rank": 1}});
    let reply = post(&f.app, "/v1/fine_tuning/jobs", ALICE, body).await;
    assert_eq!(reply.json()["error"]["param"], "hyperparameters", "{}", reply.json());
    let message = reply.error(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("--max-adapter-bytes") && message.contains("1000 bytes"), "{message}");
    let listed = get(&f.app, "/v1/fine_tuning/jobs", ALICE).await.ok();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0), "nothing queued: {listed}");
    assert!(f.trainer.configs.lock().unwrap().is_empty(), "nothing trained");
}

#[tokio::test]
async fn unfinished_jobs_reserve_their_adapters_bytes() {
    let rank_one = json!({"hyperparameters": {"rank": 1}});
    // How large a rank-1 job's adapter is on this base, from a tenant without limits.
    let size = {
        let f = fixture();
        let file = good_file(&f.app, BOB).await;
        create_job(&f.app, BOB, &file, rank_one.clone()).await;
        let usage = get(&f.app, "/v1/quota", BOB).await.ok()["usage"].clone();
        f.trainer.open_gate();
        usage["pending_adapter_bytes"].as_u64().expect("reserved bytes")
    };
    assert!(size > 1000, "{size}");
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapter_bytes = {}\n", size + size / 2);
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let file = good_file(&f.app, ALICE).await;
    create_job(&f.app, ALICE, &file, rank_one.clone()).await;
    // A second job fits the quota alone but not beside the first one's reservation.
    let mut body = json!({"model": BASE, "training_file": file});
    body.as_object_mut().unwrap().extend(rank_one.as_object().cloned().unwrap());
    let message =
        post(&f.app, "/v1/fine_tuning/jobs", ALICE, body).await.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("counting unfinished fine-tuning jobs"), "{message}");
    assert!(message.contains(&format!("{size} reserved")), "{message}");
    assert!(f.trainer.configs.lock().unwrap().len() <= 1, "the refused job never ran");
    f.trainer.open_gate();
}

/// `PUT /v1/adapters/{name}` of a small adapter (the fake backend accepts any).
async fn upload_adapter(app: &Router, key: &str, name: &str) -> Reply {
    const B: &str = "adapter-boundary";
    let body = format!(
        "--{B}\r\nContent-Disposition: form-data; name=\"adapter_config.json\"\r\n\r\n{{\"r\": 4}}\r\n\
         --{B}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"\r\n\r\nweights\r\n--{B}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={B}");
    send(app, "PUT", &format!("/v1/adapters/{name}"), key, Body::from(body), Some(&ct)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_and_job_creations_cannot_pass_the_adapter_quota_together() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapters = 1\n");
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let file = good_file(&f.app, ALICE).await;
    let mut attempts = Vec::new();
    for i in 0..8 {
        let app = f.app.clone();
        let body = json!({"model": BASE, "training_file": file, "suffix": format!("n{i}")});
        attempts
            .push(tokio::spawn(async move { post(&app, "/v1/fine_tuning/jobs", ALICE, body).await.status }));
        let app = f.app.clone();
        attempts
            .push(tokio::spawn(async move { upload_adapter(&app, ALICE, &format!("m{i}")).await.status }));
    }
    let mut statuses = Vec::new();
    for a in attempts {
        statuses.push(a.await.expect("attempt task"));
    }
    let passed = statuses.iter().filter(|s| s.is_success()).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((passed, refused), (1, 15), "{statuses:?}");
    let usage = get(&f.app, "/v1/quota", ALICE).await.ok()["usage"].clone();
    let held = usage["adapters"].as_u64().expect("adapters")
        + usage["pending_fine_tuning_jobs"].as_u64().expect("jobs");
    assert_eq!(held, 1, "{usage}");
    f.trainer.open_gate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_has_stored_its_adapter_is_not_counted_twice() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapters = 2\n");
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let file = good_file(&f.app, ALICE).await;
    f.publisher.hold();
    let job = create_job(&f.app, ALICE, &file, json!({})).await;
    let id = job["id"].as_str().expect("job id");
    f.trainer.open_gate();
    let deadline = Instant::now() + Duration::from_secs(60);
    while f.store.list(Some("alice")).is_empty() {
        assert!(Instant::now() < deadline, "the job never stored its adapter");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Stored, its end not yet recorded: it holds one place, not two.
    let job = get(&f.app, &format!("/v1/fine_tuning/jobs/{id}"), ALICE).await.ok();
    assert_eq!(job["status"], "running", "{job}");
    let usage = get(&f.app, "/v1/quota", ALICE).await.ok()["usage"].clone();
    assert_eq!((usage["adapters"].as_u64(), usage["pending_fine_tuning_jobs"].as_u64()), (Some(1), Some(0)));
    assert_eq!(usage["pending_adapter_bytes"], 0, "{usage}");
    assert_eq!(upload_adapter(&f.app, ALICE, "manual").await.status, StatusCode::CREATED);
    upload_adapter(&f.app, ALICE, "third").await.error(StatusCode::TOO_MANY_REQUESTS);
    f.publisher.release();
    wait_for(&f.app, ALICE, id, status_is("succeeded")).await;
}

#[tokio::test]
async fn an_unfinished_job_holds_its_place_against_uploads() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_adapters = 1\n");
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let file = good_file(&f.app, ALICE).await;
    let job = create_job(&f.app, ALICE, &file, json!({})).await;
    let upload = |name: &'static str| upload_adapter(&f.app, ALICE, name);
    let message = upload("manual").await.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("unfinished fine-tuning jobs"), "{message}");
    assert!(f.store.list(Some("alice")).is_empty(), "nothing stored");
    // Once the job no longer holds the place, the upload fits.
    let id = job["id"].as_str().expect("job id");
    post(&f.app, &format!("/v1/fine_tuning/jobs/{id}/cancel"), ALICE, json!({})).await.ok();
    assert_eq!(upload("manual").await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn training_files_count_against_the_file_quota() {
    let keys = format!("{KEYS}\n[tenants.alice]\nmax_file_bytes = {}\n", GOOD.len() + 10);
    let f = start_keyed(tempfile::tempdir().expect("tempdir"), Limits::default(), &keys);
    let first = good_file(&f.app, ALICE).await;
    let message = upload_file(&f.app, ALICE, "fine-tune", GOOD).await.error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("file bytes held"), "{message}");
    let listed = get(&f.app, "/v1/files", ALICE).await.ok();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "nothing stored: {listed}");
    // Another tenant has no such quota; and room freed is room again.
    good_file(&f.app, BOB).await;
    send(&f.app, "DELETE", &format!("/v1/files/{first}"), ALICE, Body::empty(), None).await.ok();
    good_file(&f.app, ALICE).await;
}

/// A job record as a previous process left it.
fn left_running(id: &str, model_name: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        tenant: "alice".into(),
        model: BASE.into(),
        status: JobStatus::Running,
        training_file: "file-gone".into(),
        validation_file: None,
        suffix: None,
        settings: JobSettings {
            n_epochs: 1.0,
            batch_size: 1,
            learning_rate_multiplier: 1.0,
            rank: 4,
            alpha: 8.0,
            targets: "all-linear".into(),
            layers: None,
            steps: None,
            max_seq_len: 64,
            seed: 0,
        },
        model_name: model_name.into(),
        adapter_bytes: 0,
        fine_tuned_model: None,
        created_at: 1,
        finished_at: None,
        trained_tokens: Some(10),
        error: None,
        result_files: vec![],
        events: vec![],
    }
}

#[tokio::test]
async fn a_restart_settles_running_jobs_by_whether_their_adapter_was_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let records = dir.path().join("jobs/jobs");
    std::fs::create_dir_all(&records).unwrap();
    let (published, lost) = ("ftjob-000000000001aaaaaaaaaaaa", "ftjob-000000000002bbbbbbbbbbbb");
    for (id, name) in [(published, "ft-aaaaaaaa"), (lost, "ft-bbbbbbbb")] {
        std::fs::write(
            records.join(format!("{id}.json")),
            serde_json::to_vec(&left_running(id, name)).unwrap(),
        )
        .unwrap();
    }
    {
        // Killed after the store's atomic publish, before the job's record said so.
        let store = FsStore::open(dir.path().join("adapters")).expect("store");
        let key = adapters::store::AdapterKey::new("alice", "ft-aaaaaaaa").unwrap();
        store.put(&key, br#"{"r": 4}"#, b"weights").unwrap();
    }
    let f = start(dir);
    let job = get(&f.app, &format!("/v1/fine_tuning/jobs/{published}"), ALICE).await.ok();
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["fine_tuned_model"], "ft-aaaaaaaa");
    post(&f.app, "/v1/chat/completions", ALICE, chat("ft-aaaaaaaa")).await.ok();
    let job = get(&f.app, &format!("/v1/fine_tuning/jobs/{lost}"), ALICE).await.ok();
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "interrupted");
    assert!(job["fine_tuned_model"].is_null());
    assert!(f.store.get(&adapters::store::AdapterKey::new("alice", "ft-bbbbbbbb").unwrap()).is_none());
}
