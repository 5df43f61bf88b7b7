//! Per-tenant quotas, set in the keys file (`[[tenants]]` tables): adapters held and their bytes,
//! fine-tuning file bytes, generation requests per minute and sequences at once. Every refusal
//! is a 429 that names the quota; nothing is changed by a refused request. `GET /v1/quota` shows
//! a tenant its limits and what it uses of them.
//!
//! The request rate is a token bucket per tenant holding up to a minute's worth of requests and
//! refilling continuously; sequences are counted from admission until the response ends (or the
//! client goes away), by a [`SequenceLease`].

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::jobs::Reserved;
use adapters::store::StoredAdapter;

use super::{AppState, Caller};

/// One tenant's limits; an absent field is no limit.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Adapters the tenant may hold (uploaded or fine-tuned).
    pub max_adapters: Option<usize>,
    /// Total bytes (config plus weights) of those adapters.
    pub max_adapter_bytes: Option<u64>,
    /// Total bytes of the files the tenant holds (training files and the results jobs add).
    pub max_file_bytes: Option<u64>,
    /// Completion and chat requests per minute.
    pub requests_per_minute: Option<u32>,
    /// Sequences (choices) running or queued at once.
    pub max_concurrent_sequences: Option<usize>,
}

/// What a tenant holds against its adapter quotas, as seen by one upload.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdapterHoldings {
    /// Adapters stored.
    pub count: usize,
    /// Their bytes (config plus weights).
    pub bytes: u64,
    /// The bytes of the stored adapter the upload replaces (same name), if any.
    pub replaced: Option<u64>,
    /// What unfinished fine-tuning jobs hold for the adapters they will publish.
    pub reserved: Reserved,
}

impl AdapterHoldings {
    /// The bytes the tenant holds, reservations included, once an adapter of `bytes` is stored.
    pub fn bytes_with(&self, bytes: u64) -> u64 {
        // Saturating: a client's holdings come from two replies that may disagree by a moment.
        let kept = self.bytes.saturating_sub(self.replaced.unwrap_or(0));
        kept.saturating_add(bytes).saturating_add(self.reserved.bytes)
    }
}

impl Quota {
    /// Whether an adapter of `bytes` bytes fits beside `holdings`: a replacement frees the old
    /// one's bytes and takes no new place; reservations count as held. The server checks every
    /// upload with this, and `train --push` asks it before training.
    pub fn check_adapter(&self, bytes: u64, holdings: &AdapterHoldings) -> Result<(), QuotaError> {
        let h = holdings;
        if let Some(most) = self.max_adapters {
            let places = match h.replaced {
                Some(_) => h.count,
                None => h.count + h.reserved.places + 1,
            };
            if places > most {
                let limit = if h.replaced.is_none() && h.reserved.places > 0 {
                    "adapters held, counting unfinished fine-tuning jobs"
                } else {
                    "adapters held"
                };
                return Err(QuotaError::exceeded(limit, most));
            }
        }
        if let Some(most) = self.max_adapter_bytes {
            if h.bytes_with(bytes) > most {
                let limit = if h.reserved.bytes > 0 {
                    "adapter bytes held, counting unfinished fine-tuning jobs"
                } else {
                    "adapter bytes held"
                };
                return Err(QuotaError::exceeded(limit, most));
            }
        }
        Ok(())
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuotaError {
    #[error("tenant quota exceeded: {limit} (the quota is {quota})")]
    Exceeded {
        limit: &'static str,
        quota: String,
        /// Whether waiting alone lets the request through (a rate, sequences that end), as
        /// against quotas on what the tenant holds, which only deleting frees.
        frees_with_time: bool,
    },
}

impl QuotaError {
    /// A quota on what the tenant holds.
    fn exceeded(limit: &'static str, quota: impl ToString) -> Self {
        QuotaError::Exceeded { limit, quota: quota.to_string(), frees_with_time: false }
    }

    /// A quota that frees up with time.
    fn exceeded_for_now(limit: &'static str, quota: impl ToString) -> Self {
        QuotaError::Exceeded { limit, quota: quota.to_string(), frees_with_time: true }
    }

    pub fn frees_with_time(&self) -> bool {
        let QuotaError::Exceeded { frees_with_time, .. } = self;
        *frees_with_time
    }

    /// The limit's name, e.g. `adapter bytes held`.
    pub fn limit(&self) -> &'static str {
        let QuotaError::Exceeded { limit, .. } = self;
        limit
    }
}

/// What a tenant is using right now.
struct Usage {
    /// Requests left in the bucket (fractional: it refills continuously).
    bucket: f64,
    refilled: Instant,
    sequences: usize,
}

/// The quotas of every tenant and what each is using.
#[derive(Default)]
pub struct Quotas {
    by_tenant: HashMap<String, Quota>,
    /// For tenants without a table of their own (`name = "*"`).
    default: Quota,
    usage: Mutex<HashMap<String, Usage>>,
    /// See [`Quotas::admitting_adapters`].
    adapter_admission: Mutex<()>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").field("by_tenant", &self.by_tenant).field("default", &self.default).finish()
    }
}

impl Quotas {
    pub fn new(by_tenant: HashMap<String, Quota>, default: Quota) -> Self {
        Self { by_tenant, default, usage: Mutex::default(), adapter_admission: Mutex::default() }
    }

    /// Held across each check-and-commit against the adapter quotas: an upload's check and its
    /// store, a fine-tuning job's check and its queueing, a job's publication. Each then sees
    /// what the others committed, so an upload and a job creation cannot pass a quota together.
    /// Taken before the jobs' lock and the store's, never under them.
    pub fn admitting_adapters(&self) -> MutexGuard<'_, ()> {
        self.adapter_admission.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn quota(&self, tenant: &str) -> &Quota {
        self.by_tenant.get(tenant).unwrap_or(&self.default)
    }

    /// Admits a generation request of `sequences` sequences for `tenant`: takes one request from
    /// its rate and holds the sequences until the lease is dropped. On `Err` nothing is taken.
    pub fn admit(self: &Arc<Self>, tenant: &str, sequences: usize) -> Result<SequenceLease, QuotaError> {
        self.admit_at(tenant, sequences, Instant::now())
    }

    fn admit_at(
        self: &Arc<Self>,
        tenant: &str,
        sequences: usize,
        now: Instant,
    ) -> Result<SequenceLease, QuotaError> {
        let quota = self.quota(tenant);
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        let capacity = quota.requests_per_minute.map_or(f64::INFINITY, f64::from);
        let u = usage.entry(tenant.to_string()).or_insert(Usage {
            bucket: capacity,
            refilled: now,
            sequences: 0,
        });
        if let Some(per_minute) = quota.requests_per_minute {
            let per_second = f64::from(per_minute) / 60.0;
            let elapsed = now.saturating_duration_since(u.refilled).as_secs_f64();
            u.bucket = (u.bucket + elapsed * per_second).min(capacity);
            u.refilled = now;
            if u.bucket < 1.0 {
                return Err(QuotaError::exceeded_for_now("requests per minute", per_minute));
            }
        }
        if let Some(most) = quota.max_concurrent_sequences {
            if u.sequences + sequences > most {
                return Err(QuotaError::exceeded_for_now("sequences at once", most));
            }
        }
        if quota.requests_per_minute.is_some() {
            u.bucket -= 1.0;
        }
        u.sequences += sequences;
        Ok(SequenceLease { quotas: Arc::clone(self), tenant: tenant.to_string(), sequences })
    }

    /// Whether `tenant` may store an adapter of `bytes` bytes under `name`, given what it holds
    /// (`held`: its stored adapters) and what its unfinished fine-tuning jobs have `reserved`
    /// for the adapters they will publish ([`Quota::check_adapter`]).
    pub fn check_upload(
        &self,
        tenant: &str,
        name: &str,
        bytes: u64,
        held: &[StoredAdapter],
        reserved: Reserved,
    ) -> Result<(), QuotaError> {
        let holdings = AdapterHoldings {
            count: held.len(),
            bytes: held.iter().map(|a| a.bytes).sum(),
            replaced: held.iter().find(|a| a.key.name() == name).map(|a| a.bytes),
            reserved,
        };
        self.quota(tenant).check_adapter(bytes, &holdings)
    }

    /// Whether `tenant` may store a file of `bytes` bytes, holding files of `held` bytes in all.
    pub fn check_file(&self, tenant: &str, bytes: u64, held: u64) -> Result<(), QuotaError> {
        match self.quota(tenant).max_file_bytes {
            Some(most) if held.saturating_add(bytes) > most => {
                Err(QuotaError::exceeded("file bytes held", most))
            }
            _ => Ok(()),
        }
    }

    /// Sequences `tenant` holds now.
    pub fn sequences(&self, tenant: &str) -> usize {
        let usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        usage.get(tenant).map_or(0, |u| u.sequences)
    }
}

/// `GET /v1/quota`: the caller's tenant, its limits (`null`: none), what it uses of them now,
/// and the server's largest single uploads. Lets a client check that an upload will fit before
/// it spends time making the adapter.
pub async fn tenant_quota(State(state): State<AppState>, caller: Caller) -> Json<Value> {
    let tenant = caller.tenant.as_str();
    let held = state.store().list(Some(tenant));
    let (file_bytes, reserved) = state.jobs().map_or((0, Reserved::default()), |jobs| {
        let files = jobs.files(Some(tenant)).iter().map(|f| f.bytes).sum::<u64>();
        (files, jobs.reserved(tenant))
    });
    Json(json!({
        "object": "quota",
        "tenant": tenant,
        "limits": state.quotas().quota(tenant),
        "usage": {
            "adapters": held.len(),
            "adapter_bytes": held.iter().map(|a| a.bytes).sum::<u64>(),
            "file_bytes": file_bytes,
            "pending_fine_tuning_jobs": reserved.places,
            "pending_adapter_bytes": reserved.bytes,
            "concurrent_sequences": state.quotas().sequences(tenant),
        },
        "upload_limits": {
            "adapter_bytes": state.limits().max_adapter_bytes,
            "file_bytes": state.limits().max_file_bytes,
        },
    }))
}

/// Sequences admitted by [`Quotas::admit`]; they count against the tenant until this is dropped.
pub struct SequenceLease {
    quotas: Arc<Quotas>,
    tenant: String,
    sequences: usize,
}

impl Drop for SequenceLease {
    fn drop(&mut self) {
        let mut usage = self.quotas.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(u) = usage.get_mut(&self.tenant) {
            u.sequences = u.sequences.saturating_sub(self.sequences);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::store::AdapterKey;
    use adapters::AdapterId;
    use std::time::Duration;

    fn quotas(q: Quota) -> Arc<Quotas> {
        Arc::new(Quotas::new(HashMap::from([("alice".to_string(), q)]), Quota::default()))
    }

    #[test]
    fn the_rate_refills_over_time_and_other_tenants_are_unaffected() {
        let q = quotas(Quota { requests_per_minute: Some(2), ..Quota::default() });
        let t0 = Instant::now();
        let _a = q.admit_at("alice", 1, t0).expect("first");
        let _b = q.admit_at("alice", 1, t0).expect("second");
        let err = q.admit_at("alice", 1, t0).err().expect("a third within the minute is refused");
        assert!(err.to_string().contains("requests per minute"), "{err}");
        assert!(err.frees_with_time(), "a rate frees up by waiting");
        // Half a minute later one request has come back.
        q.admit_at("alice", 1, t0 + Duration::from_secs(30)).expect("refilled");
        assert!(q.admit_at("alice", 1, t0 + Duration::from_secs(30)).is_err());
        for _ in 0..10 {
            q.admit_at("bob", 1, t0).expect("bob has no quota");
        }
    }

    #[test]
    fn sequences_are_held_until_the_lease_drops_and_a_refusal_takes_nothing() {
        let q = quotas(Quota {
            max_concurrent_sequences: Some(3),
            requests_per_minute: Some(100),
            ..Quota::default()
        });
        let t0 = Instant::now();
        let two = q.admit_at("alice", 2, t0).expect("two");
        let err = q.admit_at("alice", 2, t0).err().expect("four at once is too many");
        assert!(err.to_string().contains("sequences at once"), "{err}");
        assert_eq!(q.sequences("alice"), 2, "the refusal reserved nothing");
        let one = q.admit_at("alice", 1, t0).expect("three fit");
        drop(two);
        assert_eq!(q.sequences("alice"), 1);
        let _more = q.admit_at("alice", 2, t0).expect("room again");
        drop(one);
        assert_eq!(q.sequences("alice"), 2);
    }

    fn stored(name: &str, bytes: u64) -> StoredAdapter {
        StoredAdapter {
            key: AdapterKey::new("alice", name).expect("valid key"),
            id: AdapterId::of_files(name.as_bytes(), b""),
            generation: 1,
            created_unix_ms: 0,
            bytes,
            dir: std::path::PathBuf::new(),
        }
    }

    #[test]
    fn uploads_count_adapters_and_bytes_and_a_replacement_frees_its_own() {
        let q = quotas(Quota { max_adapters: Some(2), max_adapter_bytes: Some(100), ..Quota::default() });
        let held = [stored("a", 40), stored("b", 50)];
        let none = Reserved::default();
        let err = q.check_upload("alice", "c", 1, &held, none).expect_err("a third adapter");
        assert!(err.to_string().contains("adapters held"), "{err}");
        assert!(!err.frees_with_time());
        q.check_upload("alice", "b", 60, &held, none).expect("replacing b: 40 + 60");
        let err = q.check_upload("alice", "b", 61, &held, none).expect_err("40 + 61 bytes");
        assert!(err.to_string().contains("adapter bytes held"), "{err}");
        q.check_upload("bob", "c", 1 << 40, &held, none).expect("bob has no quota");

        // Unfinished jobs hold a place and their adapters' bytes; a replacement needs no place.
        let one_held = [stored("a", 40)];
        let job = Reserved { places: 1, bytes: 30 };
        let err = q.check_upload("alice", "c", 1, &one_held, job).expect_err("the last place is the job's");
        assert!(err.to_string().contains("counting unfinished fine-tuning jobs"), "{err}");
        q.check_upload("alice", "a", 70, &one_held, job).expect("replacing a: 70 + 30");
        let err = q.check_upload("alice", "a", 71, &one_held, job).expect_err("71 + 30 bytes");
        assert_eq!(err.limit(), "adapter bytes held, counting unfinished fine-tuning jobs");
    }
}
