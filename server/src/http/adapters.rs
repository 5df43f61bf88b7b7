//! `/v1/adapters`: upload (multipart `adapter_config.json` + `adapter_model.safetensors`),
//! list, describe and delete the caller's adapters, and `/v1/models`.
//!
//! An upload is read within `--max-adapter-bytes`, validated against the resident base, and only
//! then stored (atomically, by the store); when the response is sent the name resolves to the new
//! generation, so the next request uses it. Requests already running keep the version they
//! leased. A tenant only ever sees its own names: another tenant's adapter is 404.

use super::auth::Caller;
use super::backend::Backend;
use super::error::ApiError;
use super::metrics::Traffic;
use super::quota::{QuotaError, Quotas};
use super::AppState;
use crate::jobs::Reserved;
use adapters::cache::{HostCache, Residency};
use adapters::store::{AdapterKey, FsStore, StoreError, StoredAdapter, CONFIG_FILE, WEIGHTS_FILE};
use adapters::{AdapterSpec, LoraAdapter, TargetModules, PICKLE_FILE};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Room for the multipart framing around the two files when limiting the request body.
pub const MULTIPART_OVERHEAD_BYTES: usize = 64 << 10;

pub async fn list_models(State(state): State<AppState>, caller: Caller) -> Json<Value> {
    let base = state.backend().model_id().to_string();
    let mut data = vec![
        json!({"id": base, "object": "model", "created": state.started_unix(), "owned_by": "lorahost", "parent": null}),
    ];
    for a in state.store().list(visible_tenant(&caller)) {
        data.push(json!({
            "id": model_name(&caller, &a.key),
            "object": "model",
            "created": a.created_unix_ms / 1000,
            "owned_by": a.key.tenant(),
            "parent": base,
            "root": base,
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

pub async fn list_adapters(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let stored = state.store().list(visible_tenant(&caller));
    let worker = state.clone();
    let data = tokio::task::spawn_blocking(move || {
        let traffic = worker.metrics().traffic_by_adapter();
        stored.iter().map(|a| describe(&worker, &caller, a, &traffic)).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get_adapter(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    describe_one(&state, &caller, &name)
}

/// `GET /v1/adapters/{tenant}/{name}`: an admin naming another tenant's adapter by the id it is
/// listed under (`tenant/name`); anyone else gets 404, as for any name not theirs.
pub async fn get_tenant_adapter(
    State(state): State<AppState>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    describe_one(&state, &caller, &format!("{tenant}/{name}"))
}

fn describe_one(state: &AppState, caller: &Caller, name: &str) -> Result<Json<Value>, ApiError> {
    let key = state.adapter_key(caller, name).ok_or_else(|| not_found(name))?;
    let stored = state.store().get(&key).ok_or_else(|| not_found(name))?;
    Ok(Json(describe(state, caller, &stored, &state.metrics().traffic_by_adapter())))
}

pub async fn delete_adapter(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    delete_one(&state, &caller, name).await
}

/// `DELETE /v1/adapters/{tenant}/{name}`: see [`get_tenant_adapter`].
pub async fn delete_tenant_adapter(
    State(state): State<AppState>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete_one(&state, &caller, format!("{tenant}/{name}")).await
}

async fn delete_one(state: &AppState, caller: &Caller, name: String) -> Result<Json<Value>, ApiError> {
    let key = state.adapter_key(caller, &name).ok_or_else(|| not_found(&name))?;
    let old = state.store().get(&key).ok_or_else(|| not_found(&name))?;
    let store = state.store().clone();
    let deleted_key = key.clone();
    let deleted = tokio::task::spawn_blocking(move || store.delete(&deleted_key))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if !deleted {
        return Err(not_found(&name));
    }
    state.forget_if_unreferenced(old.id);
    state.metrics().forget_adapter(key.tenant(), key.name());
    tracing::info!(tenant = %key.tenant(), name = %key.name(), "adapter deleted");
    Ok(Json(json!({"id": name, "object": "adapter", "deleted": true})))
}

pub async fn put_adapter(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let result = upload(&state, &caller, &name, multipart).await;
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    state.metrics().upload(&caller.tenant, status.as_u16());
    result
}

async fn upload(
    state: &AppState,
    caller: &Caller,
    name: &str,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    state.check_accepting()?;
    // Uploads go to the caller's own tenant; the name becomes a path component, so it is checked
    // (charset, length, no separators or dot names) before anything is read.
    let key = AdapterKey::new(caller.tenant.clone(), name).map_err(|e| ApiError::Malformed(e.to_string()))?;
    if name == state.backend().model_id() {
        // `model` resolves to the base first: an adapter of that name could never be used.
        return Err(ApiError::Malformed(format!("invalid adapter name {name:?}: it is the base model's id")));
    }
    let _upload = state.upload_permit()?;
    let mut multipart = multipart.map_err(|e| ApiError::Malformed(e.body_text()))?;
    let limit = state.limits().max_adapter_bytes;
    let (mut config, mut weights): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    let mut total = 0usize;
    let mut too_large = false;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        let part = [field.name(), field.file_name()]
            .into_iter()
            .flatten()
            .find(|n| *n == CONFIG_FILE || *n == WEIGHTS_FILE)
            .map(str::to_string);
        let Some(part) = part else {
            if too_large {
                // The answer is the 413 already; what follows is only read to give it.
                while field.chunk().await.map_err(multipart_error)?.is_some() {}
                continue;
            }
            if [field.name(), field.file_name()].into_iter().flatten().any(|n| n.ends_with(".bin")) {
                return Err(ApiError::InvalidAdapter(format!(
                    "{PICKLE_FILE}: pickled weights are never loaded; send {WEIGHTS_FILE} (convert with safetensors)"
                )));
            }
            let got = field.name().unwrap_or("").to_string();
            return Err(ApiError::Malformed(format!(
                "unexpected part `{got}`: send `{CONFIG_FILE}` and `{WEIGHTS_FILE}`"
            )));
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            total += chunk.len();
            // Past the limit, keep reading (and dropping) so the client gets the 413 instead of a
            // reset connection; the body limit bounds how much is read.
            too_large |= total > limit;
            if !too_large {
                bytes.extend_from_slice(&chunk);
            }
        }
        let slot = if part == CONFIG_FILE { &mut config } else { &mut weights };
        if slot.replace(bytes).is_some() && !too_large {
            return Err(ApiError::Malformed(format!("the part `{part}` was sent twice")));
        }
    }
    if too_large {
        return Err(ApiError::TooLarge(format!("the adapter is larger than the limit of {limit} bytes")));
    }
    let (Some(config), Some(weights)) = (config, weights) else {
        return Err(ApiError::Malformed(format!("send both `{CONFIG_FILE}` and `{WEIGHTS_FILE}` parts")));
    };
    // A first look before the costly validation; the publisher checks again as it stores.
    // Unfinished fine-tuning jobs hold places and bytes for the adapters they will publish.
    let bytes = (config.len() + weights.len()) as u64;
    let jobs = state.jobs().cloned();
    let tenant = key.tenant().to_string();
    let reserved = move || jobs.as_ref().map_or(Reserved::default(), |jobs| jobs.reserved(&tenant));
    let held = state.store().list(Some(key.tenant()));
    state.quotas().check_upload(key.tenant(), key.name(), bytes, &held, reserved())?;
    let publisher = state.publisher();
    let stored_key = key.clone();
    let (stored, replaced) =
        tokio::task::spawn_blocking(move || publisher.publish_key(&stored_key, &config, &weights, reserved))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    tracing::info!(
        tenant = %key.tenant(),
        name = %key.name(),
        id = %stored.id,
        generation = stored.generation,
        replaced = replaced.is_some(),
        "adapter stored"
    );
    let status = if replaced.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    let traffic = state.metrics().traffic_by_adapter();
    Ok((status, Json(describe(state, caller, &stored, &traffic))).into_response())
}

/// The one path by which adapters become servable, for uploads and fine-tuning jobs alike:
/// validated against the resident base, stored atomically, the replaced version dropped from the
/// cache once unreferenced, and the new one warmed.
#[derive(Clone)]
pub struct AdapterPublisher {
    pub backend: Arc<dyn Backend>,
    pub store: FsStore,
    pub cache: Option<HostCache<LoraAdapter>>,
    /// Checked as the adapter is stored, whichever path it came by.
    pub quotas: Arc<Quotas>,
}

/// Why a publication stored nothing, past validation.
enum Refusal {
    Quota(QuotaError),
    Store(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e)
    }
}

impl AdapterPublisher {
    /// Blocking (validation is CPU-heavy): call it off the async threads. `reserved` is what
    /// unfinished fine-tuning jobs hold of the tenant's adapter quota, asked once the quota
    /// checks are serialized ([`Quotas::admitting_adapters`]).
    pub fn publish_key(
        &self,
        key: &AdapterKey,
        config: &[u8],
        weights: &[u8],
        reserved: impl FnOnce() -> Reserved,
    ) -> Result<(StoredAdapter, Option<StoredAdapter>), ApiError> {
        self.backend.validate_adapter(config, weights).map_err(ApiError::InvalidAdapter)?;
        let bytes = (config.len() + weights.len()) as u64;
        let _admission = self.quotas.admitting_adapters();
        // Asked before the store's lock: the jobs' lock is never taken under it.
        let reserved = reserved();
        let admit = |held: &[StoredAdapter]| {
            self.quotas.check_upload(key.tenant(), key.name(), bytes, held, reserved).map_err(Refusal::Quota)
        };
        let (stored, replaced) = self.store.put_if(key, config, weights, admit).map_err(|e| match e {
            Refusal::Quota(e) => ApiError::from(e),
            Refusal::Store(e) if e.is_out_of_space() => {
                ApiError::out_of_space("nothing was stored", &e.to_string())
            }
            Refusal::Store(e) => ApiError::Internal(e.to_string()),
        })?;
        if let (Some(old), Some(cache)) = (&replaced, &self.cache) {
            if old.id != stored.id && !self.store.is_referenced(old.id) {
                cache.invalidate(old.id);
            }
        }
        if let Some(cache) = &self.cache {
            // A failure remembered for these bytes (a load that lost a race with their deletion,
            // a passing read error) is about files that are now published again: forget it.
            if matches!(cache.residency(stored.id), Residency::Failed { .. }) {
                cache.invalidate(stored.id);
            }
            // Start loading it, so its first request finds it resident.
            cache.prefetch(stored.id);
        }
        Ok((stored, replaced))
    }
}

impl crate::jobs::Publisher for AdapterPublisher {
    fn publish(&self, tenant: &str, name: &str, config: &[u8], weights: &[u8]) -> Result<(), String> {
        let key = AdapterKey::new(tenant, name).map_err(|e| e.to_string())?;
        // Only what is stored: the job was admitted beside every reservation, its own included,
        // and since then every upload and job creation has counted its reservation too.
        self.publish_key(&key, config, weights, Reserved::default).map(|_| ()).map_err(|e| e.to_string())
    }

    fn is_published(&self, tenant: &str, name: &str) -> bool {
        AdapterKey::new(tenant, name).ok().is_some_and(|key| self.store.get(&key).is_some())
    }
}

pub(super) fn multipart_error(e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(e.body_text())
    } else {
        ApiError::Malformed(e.body_text())
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound { what: "adapter", name: name.to_string() }
}

/// The tenant whose adapters the caller sees; `None` (all) for admins.
fn visible_tenant(caller: &Caller) -> Option<&str> {
    (!caller.admin).then_some(caller.tenant.as_str())
}

/// How the caller names an adapter as a `model`: its name in the caller's tenant, `tenant/name`
/// for an admin looking at another tenant.
fn model_name(caller: &Caller, key: &AdapterKey) -> String {
    if key.tenant() == caller.tenant {
        key.name().to_string()
    } else {
        key.to_string()
    }
}

/// The public description of a stored adapter: identity, generation, size, shape, residency, and
/// the traffic its name has had since the server started (all generations, as `/metrics` counts
/// it).
fn describe(
    state: &AppState,
    caller: &Caller,
    a: &StoredAdapter,
    traffic: &HashMap<(String, String), Traffic>,
) -> Value {
    let spec = std::fs::read(a.config_path()).ok().and_then(|bytes| AdapterSpec::from_json(&bytes).ok());
    let targets = spec.as_ref().map(|s| match &s.targets {
        TargetModules::Names(names) => json!(names),
        TargetModules::Regex(re) => json!(re),
        TargetModules::AllLinear => json!("all-linear"),
    });
    let residency = match state.cache().map(|c| c.residency(a.id)) {
        Some(Residency::Resident { .. }) => "host",
        Some(Residency::Loading) => "loading",
        _ => "disk",
    };
    let traffic =
        traffic.get(&(a.key.tenant().to_string(), a.key.name().to_string())).copied().unwrap_or_default();
    json!({
        "id": model_name(caller, &a.key),
        "object": "adapter",
        "name": a.key.name(),
        "tenant": a.key.tenant(),
        "adapter_id": a.id.to_hex(),
        "generation": a.generation,
        "bytes": a.bytes,
        "created": a.created_unix_ms / 1000,
        "rank": spec.as_ref().map(|s| s.rank),
        "alpha": spec.as_ref().map(|s| s.alpha),
        "use_dora": spec.as_ref().map(|s| s.use_dora),
        "targets": targets,
        "residency": residency,
        "traffic": {
            "requests": traffic.requests,
            "prompt_tokens": traffic.prompt_tokens,
            "generated_tokens": traffic.generated_tokens,
        },
        "parent": state.backend().model_id(),
    })
}
