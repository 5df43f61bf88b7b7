//! `/v1/files` and `/v1/fine_tuning/jobs`: OpenAI's fine-tuning API over `crate::jobs`.
//!
//! This file parses and checks requests (wire shapes with `"auto"`, lorahost's extensions in
//! `hyperparameters` or a `lorahost` object) and renders OpenAI's objects; the job life cycle is
//! `Jobs`'. A tenant sees only its own files, jobs and models (404 otherwise); an admin sees all.

use super::adapters::multipart_error;
use super::auth::Caller;
use super::error::{ApiError, JsonBody};
use super::AppState;
use crate::jobs::{FileRecord, JobRecord, JobSettings, Jobs, JobsError, NewJob, Reserved, MAX_SUFFIX_LEN};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

/// Defaults of a job's settings where the request says nothing or `"auto"`.
pub const DEFAULT_EPOCHS: f64 = 3.0;
pub const DEFAULT_BATCH_SIZE: usize = 4;
pub const DEFAULT_RANK: usize = 16;
pub const DEFAULT_MAX_SEQ_LEN: usize = 512;
/// Upper bounds that keep one request from asking for an absurd job.
const MAX_RANK: usize = 256;
const MAX_BATCH_SIZE: usize = 256;
const MAX_EPOCHS: f64 = 1000.0;
const MAX_SEQ_LEN: usize = 1 << 16;
/// Jobs run one at a time: a bound on how long one may hold the queue.
const MAX_STEPS: usize = 1_000_000;
const MAX_FILENAME_CHARS: usize = 256;
/// Items per page of a list, by default and at most.
const DEFAULT_PAGE: usize = 20;
const MAX_PAGE: usize = 100;

fn jobs(state: &AppState) -> Result<&Jobs, ApiError> {
    state.jobs().ok_or_else(|| ApiError::NotFound {
        what: "route",
        name: "fine-tuning (this server was started without jobs)".into(),
    })
}

/// The tenant whose records the caller sees; `None` (all) for admins.
fn scope(caller: &Caller) -> Option<&str> {
    (!caller.admin).then_some(caller.tenant.as_str())
}

pub async fn upload_file(
    State(state): State<AppState>,
    caller: Caller,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    state.check_accepting()?;
    let jobs = jobs(&state)?.clone();
    let _upload = state.upload_permit()?;
    let mut multipart = multipart.map_err(|e| ApiError::Malformed(e.body_text()))?;
    let limit = state.limits().max_file_bytes;
    let (mut file, mut purpose): (Option<(String, Vec<u8>)>, Option<String>) = (None, None);
    let mut too_large = false;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        // Only ever shown back to its owner, but bounded like everything a client sends.
        let filename: String =
            field.file_name().unwrap_or("file.jsonl").chars().take(MAX_FILENAME_CHARS).collect();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            // Past the limit, keep reading (and dropping) so the client gets the 413.
            too_large |= bytes.len() + chunk.len() > limit;
            if !too_large {
                bytes.extend_from_slice(&chunk);
            }
        }
        match name.as_str() {
            "file" => file = Some((filename, bytes)),
            "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).trim().to_string()),
            other => {
                return Err(ApiError::Malformed(format!(
                    "unexpected part `{other}`: send `file` and `purpose`"
                )))
            }
        }
    }
    if too_large {
        return Err(ApiError::TooLarge(format!("the file is larger than the limit of {limit} bytes")));
    }
    let (Some((filename, bytes)), Some(purpose)) = (file, purpose) else {
        return Err(ApiError::Malformed("send the parts `file` and `purpose`".into()));
    };
    let tenant = caller.tenant.clone();
    let quotas = state.quotas().clone();
    let record = tokio::task::spawn_blocking(move || {
        let admit = |held: &[FileRecord]| {
            let held_bytes = held.iter().map(|f| f.bytes).sum();
            quotas.check_file(&tenant, bytes.len() as u64, held_bytes).map_err(|e| e.to_string())
        };
        jobs.add_file(&tenant, &filename, &purpose, &bytes, admit)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    tracing::info!(tenant = %caller.tenant, file = %record.id, bytes = record.bytes, "training file stored");
    Ok(Json(record.to_api()))
}

pub async fn list_files(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let files = jobs(&state)?.files(scope(&caller));
    let page = Page::parse(query.as_deref())?;
    let purpose = query_param(query.as_deref(), "purpose");
    let items: Vec<(String, Value)> = files
        .iter()
        .filter(|f| purpose.as_deref().is_none_or(|p| p == f.purpose))
        .map(|f| (f.id.clone(), f.to_api()))
        .collect();
    Ok(Json(page.render(items)))
}

pub async fn get_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(jobs(&state)?.file(scope(&caller), &id)?.to_api()))
}

pub async fn file_content(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?.clone();
    let tenant = scope(&caller).map(str::to_string);
    let bytes = tokio::task::spawn_blocking(move || jobs.file_content(tenant.as_deref(), &id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

pub async fn delete_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = jobs(&state)?.clone();
    let tenant = scope(&caller).map(str::to_string);
    let deleted = id.clone();
    tokio::task::spawn_blocking(move || jobs.delete_file(tenant.as_deref(), &deleted))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

/// A job as the caller sees it: the fine-tuned model by the name the caller uses.
fn job_json(caller: &Caller, job: &JobRecord) -> Value {
    job.to_api(
        |name| if job.tenant == caller.tenant { name.to_string() } else { format!("{}/{name}", job.tenant) },
    )
}

pub async fn create_job(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(wire): JsonBody<WireJob>,
) -> Result<Json<Value>, ApiError> {
    state.check_accepting()?;
    let jobs = jobs(&state)?.clone();
    let new = wire.validate()?;
    let tenant = caller.tenant.clone();
    let job = tokio::task::spawn_blocking(move || {
        let admit = |job: &JobRecord, reserved: Reserved| {
            // Every adapter the server stores fits the upload limit, fine-tuned ones too.
            let largest = state.limits().max_adapter_bytes as u64;
            if job.adapter_bytes > largest {
                return Err(JobsError::Invalid {
                    param: "hyperparameters",
                    message: format!(
                        "the job's adapter would be {} bytes, more than this server stores \
                         ({largest} bytes, --max-adapter-bytes): lower the rank or target fewer modules",
                        job.adapter_bytes
                    ),
                });
            }
            let held = state.store().list(Some(&tenant));
            let checked = state.quotas().check_upload(&tenant, &job.model_name, job.adapter_bytes, &held, reserved);
            let checked = checked.map_err(|e| {
                if e.limit().starts_with("adapter bytes") {
                    let held_bytes = held.iter().map(|a| a.bytes).sum::<u64>();
                    format!(
                        "{e}: the job's adapter would be {} bytes, beside {held_bytes} held and {} reserved by unfinished jobs",
                        job.adapter_bytes, reserved.bytes
                    )
                } else {
                    e.to_string()
                }
            });
            checked.map_err(JobsError::Quota)
        };
        let _admission = state.quotas().admitting_adapters();
        jobs.create_job(&tenant, new, admit)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    tracing::info!(tenant = %caller.tenant, job = %job.id, "fine-tuning job queued");
    Ok(Json(job_json(&caller, &job)))
}

pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let page = Page::parse(query.as_deref())?;
    let items =
        jobs(&state)?.jobs(scope(&caller)).iter().map(|j| (j.id.clone(), job_json(&caller, j))).collect();
    Ok(Json(page.render(items)))
}

pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = jobs(&state)?.job(scope(&caller), &id)?;
    Ok(Json(job_json(&caller, &job)))
}

pub async fn list_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let page = Page::parse(query.as_deref())?;
    let job = jobs(&state)?.job(scope(&caller), &id)?;
    // Newest first, as OpenAI lists them.
    let items = job.events.iter().rev().map(|e| (job.event_id(e.seq), job.event_to_api(e))).collect();
    Ok(Json(page.render(items)))
}

pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = jobs(&state)?.clone();
    let tenant = scope(&caller).map(str::to_string);
    let job = tokio::task::spawn_blocking(move || jobs.cancel(tenant.as_deref(), &id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    tracing::info!(job = %job.id, "fine-tuning job cancelled");
    Ok(Json(job_json(&caller, &job)))
}

/// `after` and `limit` of a list request.
struct Page {
    after: Option<String>,
    limit: usize,
}

/// The value of `key` in a query string (ids and purposes need no percent-decoding).
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
}

impl Page {
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let limit = match query_param(query, "limit") {
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| ApiError::invalid("limit", format!("limit must be 1 to {MAX_PAGE}")))?,
            None => DEFAULT_PAGE,
        };
        Ok(Self { after: query_param(query, "after"), limit })
    }

    /// One page of `(id, object)` items, in list order, starting after `after`.
    fn render(&self, items: Vec<(String, Value)>) -> Value {
        let start = match &self.after {
            Some(after) => items.iter().position(|(id, _)| id == after).map_or(items.len(), |i| i + 1),
            None => 0,
        };
        let rest = items.len().saturating_sub(start);
        let data: Vec<Value> = items.into_iter().skip(start).take(self.limit).map(|(_, v)| v).collect();
        json!({
            "object": "list",
            "has_more": rest > self.limit,
            "first_id": data.first().map(|v| v["id"].clone()),
            "last_id": data.last().map(|v| v["id"].clone()),
            "data": data,
        })
    }
}

/// `POST /v1/fine_tuning/jobs` as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireJob {
    model: String,
    training_file: String,
    #[serde(default)]
    validation_file: Option<String>,
    #[serde(default)]
    hyperparameters: Option<WireSettings>,
    #[serde(default)]
    method: Option<WireMethod>,
    /// lorahost's extensions, when the client keeps them apart (`extra_body`).
    #[serde(default)]
    lorahost: Option<WireSettings>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    /// Accepted for compatibility; lorahost has no integrations and keeps no metadata.
    #[serde(default, rename = "integrations")]
    _integrations: Option<IgnoredAny>,
    #[serde(default, rename = "metadata")]
    _metadata: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMethod {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    supervised: Option<WireSupervised>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSupervised {
    #[serde(default)]
    hyperparameters: Option<WireSettings>,
}

/// OpenAI's hyperparameters (numbers or `"auto"`) and lorahost's extensions.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireSettings {
    n_epochs: Option<Value>,
    batch_size: Option<Value>,
    learning_rate_multiplier: Option<Value>,
    rank: Option<usize>,
    alpha: Option<f64>,
    targets: Option<Value>,
    layers: Option<Value>,
    steps: Option<usize>,
    max_seq_len: Option<usize>,
    seed: Option<u64>,
}

impl WireSettings {
    /// `other`'s values where it has them.
    fn merge(self, other: WireSettings) -> WireSettings {
        WireSettings {
            n_epochs: other.n_epochs.or(self.n_epochs),
            batch_size: other.batch_size.or(self.batch_size),
            learning_rate_multiplier: other.learning_rate_multiplier.or(self.learning_rate_multiplier),
            rank: other.rank.or(self.rank),
            alpha: other.alpha.or(self.alpha),
            targets: other.targets.or(self.targets),
            layers: other.layers.or(self.layers),
            steps: other.steps.or(self.steps),
            max_seq_len: other.max_seq_len.or(self.max_seq_len),
            seed: other.seed.or(self.seed),
        }
    }
}

/// A number, or `None` for absent or `"auto"`.
fn auto_number(param: &'static str, v: Option<&Value>) -> Result<Option<f64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => {
            Err(ApiError::invalid(param, format!("`{param}` must be a number or \"auto\", not {other}")))
        }
    }
}

fn in_range(param: &'static str, v: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, not {v}")))
    }
}

/// `v` in `(0, hi]`.
fn positive(param: &'static str, v: f64, hi: f64) -> Result<f64, ApiError> {
    if v.is_finite() && v >= f64::MIN_POSITIVE && v <= hi {
        Ok(v)
    } else {
        Err(ApiError::invalid(param, format!("`{param}` must be positive and at most {hi}, not {v}")))
    }
}

impl WireJob {
    fn validate(self) -> Result<NewJob, ApiError> {
        let mut settings = self.hyperparameters.unwrap_or_default();
        if let Some(method) = self.method {
            if method.kind != "supervised" {
                return Err(ApiError::invalid(
                    "method",
                    format!("method {:?} is not supported; use \"supervised\"", method.kind),
                ));
            }
            if let Some(h) = method.supervised.and_then(|s| s.hyperparameters) {
                settings = settings.merge(h);
            }
        }
        if let Some(extra) = self.lorahost {
            settings = settings.merge(extra);
        }
        if let Some(suffix) = &self.suffix {
            if suffix.is_empty() || suffix.len() > MAX_SUFFIX_LEN {
                return Err(ApiError::invalid(
                    "suffix",
                    format!("`suffix` must be 1 to {MAX_SUFFIX_LEN} characters"),
                ));
            }
        }
        let n_epochs = match auto_number("n_epochs", settings.n_epochs.as_ref())? {
            Some(v) => positive("n_epochs", v, MAX_EPOCHS)?,
            None => DEFAULT_EPOCHS,
        };
        let batch_size = match auto_number("batch_size", settings.batch_size.as_ref())? {
            Some(v) if v.fract() == 0.0 => in_range("batch_size", v, 1.0, MAX_BATCH_SIZE as f64)? as usize,
            Some(v) => {
                return Err(ApiError::invalid(
                    "batch_size",
                    format!("`batch_size` must be a whole number, not {v}"),
                ))
            }
            None => DEFAULT_BATCH_SIZE,
        };
        let lr = match auto_number("learning_rate_multiplier", settings.learning_rate_multiplier.as_ref())? {
            Some(v) => positive("learning_rate_multiplier", v, 1000.0)?,
            None => 1.0,
        };
        let rank = settings.rank.unwrap_or(DEFAULT_RANK);
        in_range("rank", rank as f64, 1.0, MAX_RANK as f64)?;
        let alpha = positive("alpha", settings.alpha.unwrap_or(2.0 * rank as f64), 1e6)?;
        let targets = match settings.targets {
            None => "all-linear".to_string(),
            Some(Value::String(s)) => s,
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::invalid("targets", "`targets` must be \"all-linear\" or a list of module names")
                })?
                .join(","),
            Some(_) => {
                return Err(ApiError::invalid(
                    "targets",
                    "`targets` must be \"all-linear\" or a list of module names",
                ))
            }
        };
        let layers = match settings.layers {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_layers(&v)?),
        };
        if let Some(steps) = settings.steps {
            in_range("steps", steps as f64, 1.0, MAX_STEPS as f64)?;
        }
        let max_seq_len = settings.max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN);
        in_range("max_seq_len", max_seq_len as f64, 2.0, MAX_SEQ_LEN as f64)?;
        Ok(NewJob {
            model: self.model,
            training_file: self.training_file,
            validation_file: self.validation_file,
            suffix: self.suffix,
            settings: JobSettings {
                n_epochs,
                batch_size,
                learning_rate_multiplier: lr,
                rank,
                alpha,
                targets,
                layers,
                steps: settings.steps,
                max_seq_len,
                seed: self.seed.or(settings.seed).unwrap_or_else(|| rand::random::<u32>() as u64),
            },
        })
    }
}

/// `"A-B"`, `"A"` or `[A, B]` (inclusive).
fn parse_layers(v: &Value) -> Result<(usize, usize), ApiError> {
    let bad = || ApiError::invalid("layers", "`layers` must be \"A-B\" or [A, B] (inclusive)");
    let (a, b) = match v {
        Value::String(s) => {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?)
        }
        Value::Array(list) if list.len() == 2 => {
            let n = |v: &Value| v.as_u64().map(|n| n as usize).ok_or_else(bad);
            (n(&list[0])?, n(&list[1])?)
        }
        _ => return Err(bad()),
    };
    if a > b {
        return Err(bad());
    }
    Ok((a, b))
}
