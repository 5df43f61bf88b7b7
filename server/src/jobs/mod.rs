//! Fine-tuning jobs on the live server: uploaded training files, a queue of jobs trained one at
//! a time in the background on the resident base, their events, cancellation, and publication
//! of the result as a tenant's adapter. Durable across restarts (see `store`).
//!
//! It owns the job life cycle, not HTTP (the `http` layer parses requests into `NewJob` and
//! checks callers), not the optimisation (`crate::train`, behind `Trainer`), and not the adapter
//! store (results go out through `Publisher`, the same path as an upload).
//!
//! Visibility: every query takes the caller's tenant, `None` for an admin; a record of another
//! tenant is reported as absent.

pub mod records;
mod runner;
mod store;
pub mod trainer;

pub use records::{FileRecord, JobEvent, JobFailure, JobRecord, JobSettings, JobStatus};
pub use trainer::{BaseTrainer, DataSummary, Trainer};

use records::{PURPOSE_FINE_TUNE, PURPOSE_RESULTS};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};
use store::DiskStore;

/// Default largest training file, in bytes.
pub const DEFAULT_MAX_FILE_BYTES: usize = 512 << 20;
/// Events kept per job (see `push_event`).
pub const MAX_JOB_EVENTS: usize = 10_000;
/// Longest `suffix`: the adapter name `ft-<suffix>-<8 hex>` stays well within the name limit.
pub const MAX_SUFFIX_LEN: usize = 64;

/// What a tenant's unfinished jobs hold of its adapter quota: a place each for the adapter it
/// will publish, and that adapter's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reserved {
    pub places: usize,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// Unknown to this caller (another tenant's file or job is unknown too).
    #[error("the {what} `{id}` does not exist or you do not have access to it")]
    NotFound { what: &'static str, id: String },
    #[error("{message}")]
    Invalid { param: &'static str, message: String },
    /// A training file that does not parse or tokenize; the message names the line.
    #[error("invalid training file: {0}")]
    InvalidFile(String),
    /// The request is valid but not in the job's current state.
    #[error("{0}")]
    Conflict(String),
    #[error("jobs directory: {0}")]
    Io(String),
    /// The disk holding the jobs directory is full; nothing was stored.
    #[error("jobs directory: {0}")]
    OutOfSpace(String),
    /// A tenant's limit (its quota) refused it; nothing was stored.
    #[error("{0}")]
    Quota(String),
}

impl From<adapters::durable::DurableError> for JobsError {
    fn from(e: adapters::durable::DurableError) -> Self {
        let message = format!("cannot {} {}: {}", e.op, e.path.display(), e.source);
        if e.is_out_of_space() {
            JobsError::OutOfSpace(message)
        } else {
            JobsError::Io(message)
        }
    }
}

/// Where and how jobs run.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub dir: PathBuf,
    /// The base's id: the only `model` a job may name.
    pub base_id: String,
}

/// Puts a finished job's adapter into the tenant's namespace, validated against the base, the
/// way an upload does.
pub trait Publisher: Send + Sync + 'static {
    fn publish(&self, tenant: &str, name: &str, config: &[u8], weights: &[u8]) -> Result<(), String>;
    /// Whether `name` is stored in `tenant` (a job interrupted while publishing may have done so).
    fn is_published(&self, tenant: &str, name: &str) -> bool;
}

/// A validated job request.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub settings: JobSettings,
}

/// Jobs and files by status, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct JobCounts {
    pub by_status: BTreeMap<JobStatus, u64>,
    pub trained_tokens: u64,
    pub files: u64,
}

/// The handle the server holds; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    shared: Arc<Shared>,
}

struct Shared {
    config: JobsConfig,
    trainer: Arc<dyn Trainer>,
    publisher: Arc<dyn Publisher>,
    state: Mutex<State>,
    wake: Condvar,
    runner: Mutex<Option<JoinHandle<()>>>,
}

struct State {
    disk: DiskStore,
    queue: VecDeque<String>,
    /// The job the runner is training, if any.
    running: Option<Running>,
    stopping: bool,
}

struct Running {
    id: String,
    /// Cancelled by its owner or by shutdown: the trainer stops at its next step.
    stop: bool,
    /// Training is done and the adapter is being stored: too late to cancel.
    publishing: bool,
}

pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `prefix` + 12 hex digits of milliseconds + 12 random: ids sort by creation time.
fn new_id(prefix: &str) -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    format!("{prefix}{:012x}{:012x}", ms & 0xffff_ffff_ffff, rand::random::<u64>() & 0xffff_ffff_ffff)
}

fn visible(tenant: Option<&str>, owner: &str) -> bool {
    tenant.is_none_or(|t| t == owner)
}

impl Jobs {
    /// Opens the jobs directory, settles jobs a previous process left unfinished, and starts the
    /// runner thread.
    ///
    /// A job that was queued goes back in the queue, in the order the jobs were created: its
    /// inputs are durable and nothing of it ran. A job that was running is marked `failed`
    /// (interrupted), unless it had already stored its adapter (the store's publication is
    /// atomic), in which case it `succeeded`.
    pub fn open(
        config: JobsConfig,
        trainer: Arc<dyn Trainer>,
        publisher: Arc<dyn Publisher>,
    ) -> Result<Self, JobsError> {
        let mut disk = DiskStore::open(&config.dir)?;
        let unfinished: Vec<String> =
            disk.jobs.values().filter(|j| !j.status.is_terminal()).map(|j| j.id.clone()).collect();
        let mut requeued: Vec<(u64, String)> = Vec::new();
        for id in unfinished {
            let Some(mut job) = disk.jobs.get(&id).cloned() else { continue };
            if job.status != JobStatus::Running {
                if job.status != JobStatus::Queued {
                    job.status = JobStatus::Queued;
                    disk.put_job(job.clone())?;
                }
                tracing::info!(job = %job.id, "a job queued before the restart is queued again");
                requeued.push((job.created_at, job.id));
                continue;
            }
            if publisher.is_published(&job.tenant, &job.model_name) {
                job.fine_tuned_model = Some(job.model_name.clone());
                job.status = JobStatus::Succeeded;
                push_event(&mut job, "info", "The job has successfully completed", serde_json::Value::Null);
            } else {
                job.status = JobStatus::Failed;
                job.error = Some(JobFailure {
                    code: "interrupted".into(),
                    message: "the server stopped before the job finished; nothing was published".into(),
                });
                push_event(
                    &mut job,
                    "error",
                    "The job was interrupted by a server restart",
                    serde_json::Value::Null,
                );
            }
            job.finished_at = Some(unix_seconds());
            tracing::warn!(job = %job.id, status = job.status.label(), "settled a job left unfinished");
            disk.put_job(job)?;
        }
        requeued.sort();
        let queue = requeued.into_iter().map(|(_, id)| id).collect();
        let shared = Arc::new(Shared {
            config,
            trainer,
            publisher,
            state: Mutex::new(State { disk, queue, running: None, stopping: false }),
            wake: Condvar::new(),
            runner: Mutex::new(None),
        });
        let worker = shared.clone();
        let handle = std::thread::Builder::new()
            .name("lorahost-jobs".into())
            .spawn(move || runner::run(&worker))
            .map_err(|e| JobsError::Io(format!("cannot start the jobs thread: {e}")))?;
        *shared.runner.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(Self { shared })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Stores an uploaded file after checking it is training data the base can use (every line
    /// parses and tokenizes; errors name the line). Blocking: call off the async threads.
    ///
    /// `admit` sees the tenant's files as they are at the moment of storing (under the lock that
    /// stores, so concurrent uploads cannot pass a quota together) and may refuse.
    pub fn add_file(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        bytes: &[u8],
        admit: impl FnOnce(&[FileRecord]) -> Result<(), String>,
    ) -> Result<FileRecord, JobsError> {
        if purpose != PURPOSE_FINE_TUNE {
            return Err(JobsError::Invalid {
                param: "purpose",
                message: format!("purpose {purpose:?} is not supported; use \"{PURPOSE_FINE_TUNE}\""),
            });
        }
        let scratch = self.write_scratch("upload", bytes)?;
        let checked = self
            .shared
            .trainer
            .check_data(&scratch, DEFAULT_CHECK_SEQ_LEN)
            .map_err(|e| JobsError::InvalidFile(e.replace(&scratch.display().to_string(), filename)));
        if let Err(e) = checked {
            let _ = std::fs::remove_file(&scratch);
            return Err(e);
        }
        self.commit_file(tenant, filename, purpose, &scratch, bytes.len() as u64, admit)
    }

    /// Writes a scratch file without holding the state lock (uploads can be large).
    fn write_scratch(&self, what: &str, bytes: &[u8]) -> Result<PathBuf, JobsError> {
        let path = self.state().disk.scratch(what);
        store::write_synced(&path, bytes)?;
        Ok(path)
    }

    fn commit_file(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        scratch: &std::path::Path,
        bytes: u64,
        admit: impl FnOnce(&[FileRecord]) -> Result<(), String>,
    ) -> Result<FileRecord, JobsError> {
        let record = FileRecord {
            id: new_id("file-"),
            tenant: tenant.to_string(),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes,
            created_at: unix_seconds(),
        };
        let mut state = self.state();
        let held: Vec<FileRecord> =
            state.disk.files.values().filter(|f| f.tenant == tenant).cloned().collect();
        if let Err(refused) = admit(&held) {
            drop(state);
            let _ = std::fs::remove_file(scratch);
            return Err(JobsError::Quota(refused));
        }
        // A scratch file the rename did not take is removed now, not at the next start. (Data
        // renamed into place but without a record stays until then: the record's write may have
        // reached the disk before its error.)
        if let Err(e) = state.disk.commit_data(scratch, &record.id) {
            let _ = std::fs::remove_file(scratch);
            return Err(e);
        }
        state.disk.put_file(record.clone())?;
        Ok(record)
    }

    /// The caller's files, newest first.
    pub fn files(&self, tenant: Option<&str>) -> Vec<FileRecord> {
        let state = self.state();
        state.disk.files.values().rev().filter(|f| visible(tenant, &f.tenant)).cloned().collect()
    }

    pub fn file(&self, tenant: Option<&str>, id: &str) -> Result<FileRecord, JobsError> {
        self.state()
            .disk
            .files
            .get(id)
            .filter(|f| visible(tenant, &f.tenant))
            .cloned()
            .ok_or_else(|| JobsError::NotFound { what: "file", id: id.to_string() })
    }

    /// The bytes of a file.
    pub fn file_content(&self, tenant: Option<&str>, id: &str) -> Result<Vec<u8>, JobsError> {
        self.file(tenant, id)?;
        let path = self.state().disk.data_path(id);
        std::fs::read(&path).map_err(|e| JobsError::Io(format!("cannot read {}: {e}", path.display())))
    }

    /// Deletes a file no unfinished job uses.
    pub fn delete_file(&self, tenant: Option<&str>, id: &str) -> Result<(), JobsError> {
        self.file(tenant, id)?;
        let mut state = self.state();
        if let Some(job) = state.disk.jobs.values().find(|j| {
            !j.status.is_terminal() && (j.training_file == id || j.validation_file.as_deref() == Some(id))
        }) {
            return Err(JobsError::Conflict(format!(
                "the file `{id}` is used by the unfinished job `{}`",
                job.id
            )));
        }
        state.disk.delete_file(id)
    }

    /// Queues a job for `tenant`. The files must be the tenant's own fine-tune files.
    ///
    /// `admit` sees the new job (its `model_name` and `adapter_bytes`) and what the tenant's
    /// unfinished jobs reserve at the moment of queueing (under the lock that queues, so
    /// concurrent creations cannot pass a quota together), and may refuse with its own error.
    pub fn create_job(
        &self,
        tenant: &str,
        new: NewJob,
        admit: impl FnOnce(&JobRecord, Reserved) -> Result<(), JobsError>,
    ) -> Result<JobRecord, JobsError> {
        if new.model != self.shared.config.base_id {
            return Err(JobsError::NotFound { what: "model", id: new.model });
        }
        let own = Some(tenant);
        for (param, file) in
            [("training_file", Some(&new.training_file)), ("validation_file", new.validation_file.as_ref())]
        {
            let Some(file) = file else { continue };
            let record = self.file(own, file)?;
            if record.purpose != PURPOSE_FINE_TUNE {
                return Err(JobsError::Invalid {
                    param,
                    message: format!(
                        "the file `{file}` has purpose {:?}, not \"{PURPOSE_FINE_TUNE}\"",
                        record.purpose
                    ),
                });
            }
        }
        let shape = self.shared.trainer.base_shape();
        check_settings(&new.settings, &shape)?;
        let id = new_id("ftjob-");
        let short = &id[id.len() - 8..];
        let model_name = match &new.suffix {
            Some(s) => format!("ft-{s}-{short}"),
            None => format!("ft-{short}"),
        };
        adapters::store::AdapterKey::new(tenant, model_name.as_str())
            .map_err(|e| JobsError::Invalid { param: "suffix", message: e.to_string() })?;
        let mut job = JobRecord {
            id: id.clone(),
            tenant: tenant.to_string(),
            model: new.model,
            status: JobStatus::Queued,
            training_file: new.training_file,
            validation_file: new.validation_file,
            suffix: new.suffix,
            settings: new.settings,
            model_name,
            adapter_bytes: 0,
            fine_tuned_model: None,
            created_at: unix_seconds(),
            finished_at: None,
            trained_tokens: None,
            error: None,
            result_files: Vec::new(),
            events: Vec::new(),
        };
        push_event(&mut job, "info", &format!("Created fine-tuning job: {id}"), serde_json::Value::Null);
        let invalid = |message: String| JobsError::Invalid { param: "hyperparameters", message };
        job.adapter_bytes = runner::train_config(&self.shared, &job)
            .map_err(|f| invalid(f.message))?
            .adapter_upload_bytes(&shape)
            .map_err(|e| invalid(e.to_string()))?;
        let mut state = self.state();
        if state.stopping {
            return Err(JobsError::Conflict("the server is shutting down".into()));
        }
        admit(&job, self.shared.reserved(&state, tenant))?;
        state.disk.put_job(job.clone())?;
        state.queue.push_back(id);
        drop(state);
        self.shared.wake.notify_all();
        Ok(job)
    }

    /// What `tenant`'s queued and running jobs reserve: each will publish an adapter (one that
    /// has already stored it no longer counts; see `Shared::reserved`).
    pub fn reserved(&self, tenant: &str) -> Reserved {
        self.shared.reserved(&self.state(), tenant)
    }

    /// The caller's jobs, newest first.
    pub fn jobs(&self, tenant: Option<&str>) -> Vec<JobRecord> {
        let state = self.state();
        state.disk.jobs.values().rev().filter(|j| visible(tenant, &j.tenant)).cloned().collect()
    }

    pub fn job(&self, tenant: Option<&str>, id: &str) -> Result<JobRecord, JobsError> {
        self.state()
            .disk
            .jobs
            .get(id)
            .filter(|j| visible(tenant, &j.tenant))
            .cloned()
            .ok_or_else(|| JobsError::NotFound { what: "fine-tuning job", id: id.to_string() })
    }

    /// Cancels a queued or running job: it is `cancelled` when this returns and publishes
    /// nothing; a running trainer stops at its next step.
    pub fn cancel(&self, tenant: Option<&str>, id: &str) -> Result<JobRecord, JobsError> {
        self.job(tenant, id)?;
        let mut state = self.state();
        let state = &mut *state;
        let Some(job) = state.disk.jobs.get_mut(id) else {
            return Err(JobsError::NotFound { what: "fine-tuning job", id: id.to_string() });
        };
        if job.status.is_terminal() {
            return Err(JobsError::Conflict(format!("the job `{id}` has finished ({})", job.status.label())));
        }
        if let Some(running) = state.running.as_mut().filter(|r| r.id == id) {
            if running.publishing {
                return Err(JobsError::Conflict(format!("the job `{id}` is publishing its result")));
            }
            running.stop = true;
        }
        state.queue.retain(|q| q != id);
        job.status = JobStatus::Cancelled;
        job.finished_at = Some(unix_seconds());
        push_event(job, "info", "The job was cancelled", serde_json::Value::Null);
        let job = job.clone();
        state.disk.save_job(id)?;
        Ok(job)
    }

    pub fn counts(&self) -> JobCounts {
        let state = self.state();
        let mut counts = JobCounts { files: state.disk.files.len() as u64, ..Default::default() };
        for job in state.disk.jobs.values() {
            *counts.by_status.entry(job.status).or_default() += 1;
            counts.trained_tokens += job.trained_tokens.unwrap_or(0);
        }
        counts
    }

    /// Stops the runner: a running job is stopped at its next step and marked failed
    /// (interrupted), queued jobs stay queued for the restart. Waits for the runner thread.
    pub fn shutdown(&self) {
        self.state().stopping = true;
        self.shared.wake.notify_all();
        let handle = self.shared.runner.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Registers a job's metrics log as a results file of `tenant`.
    fn add_result_file(&self, tenant: &str, job_id: &str, bytes: &[u8]) -> Result<FileRecord, JobsError> {
        let scratch = self.write_scratch("result", bytes)?;
        self.commit_file(
            tenant,
            &format!("{job_id}-training_log.json"),
            PURPOSE_RESULTS,
            &scratch,
            bytes.len() as u64,
            |_| Ok(()),
        )
    }
}

impl Shared {
    /// What `tenant`'s unfinished jobs reserve. A job that has stored its adapter but not yet
    /// recorded its end no longer counts: its adapter is counted as stored.
    fn reserved(&self, state: &State, tenant: &str) -> Reserved {
        let reserved = state.disk.reserved(tenant);
        let published = state
            .running
            .as_ref()
            .filter(|r| r.publishing)
            .and_then(|r| state.disk.jobs.get(&r.id))
            .filter(|j| j.tenant == tenant && !j.status.is_terminal())
            .filter(|j| self.publisher.is_published(&j.tenant, &j.model_name));
        match published {
            Some(j) => Reserved {
                places: reserved.places.saturating_sub(1),
                bytes: reserved.bytes.saturating_sub(j.adapter_bytes),
            },
            None => reserved,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the records consistent; a panic elsewhere must not stop jobs.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tokens per example the upload check tokenizes to; longer examples are cut at training time by
/// the job's `max_seq_len`.
const DEFAULT_CHECK_SEQ_LEN: usize = 1 << 20;

/// Appends an event with the next sequence number. Past `MAX_JOB_EVENTS` the oldest step
/// metrics make room (messages are kept), so a job of a million steps stays a small record.
fn push_event(job: &mut JobRecord, level: &str, message: &str, data: serde_json::Value) {
    let seq = job.events.last().map_or(1, |e| e.seq + 1);
    if job.events.len() >= MAX_JOB_EVENTS {
        if let Some(oldest) = job.events.iter().position(|e| !e.data.is_null()) {
            job.events.remove(oldest);
        }
    }
    job.events.push(JobEvent {
        seq,
        created_at: unix_seconds(),
        level: level.to_string(),
        message: message.to_string(),
        data,
    });
}

/// Range checks that need the base (layers, rank) or the trainer's rules (targets).
fn check_settings(s: &JobSettings, shape: &adapters::BaseShape) -> Result<(), JobsError> {
    let invalid = |param, message: String| Err(JobsError::Invalid { param, message });
    let num_layers = shape.num_layers;
    let targets = match crate::train::Targets::parse(&s.targets) {
        Ok(t) => t,
        Err(e) => return invalid("targets", e.to_string()),
    };
    let narrowest = targets
        .modules()
        .into_iter()
        .map(|m| &shape.modules[m])
        .find(|m| s.rank > m.in_features.min(m.out_features));
    if let Some(m) = narrowest {
        return invalid(
            "rank",
            format!(
                "rank {} exceeds the dimensions of {} ({} x {})",
                s.rank, m.path, m.out_features, m.in_features
            ),
        );
    }
    if let Some((a, b)) = s.layers {
        if a > b || b >= num_layers {
            return invalid(
                "layers",
                format!("layers {a}-{b} are not within the model's {num_layers} layers"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_job_keeps_its_messages_and_the_newest_step_events() {
        let mut job = JobRecord {
            id: "ftjob-1".into(),
            tenant: "t".into(),
            model: "base".into(),
            status: JobStatus::Running,
            training_file: "file-1".into(),
            validation_file: None,
            suffix: None,
            settings: JobSettings {
                n_epochs: 1.0,
                batch_size: 1,
                learning_rate_multiplier: 1.0,
                rank: 1,
                alpha: 1.0,
                targets: "all-linear".into(),
                layers: None,
                steps: None,
                max_seq_len: 8,
                seed: 0,
            },
            model_name: "ft-1".into(),
            adapter_bytes: 0,
            fine_tuned_model: None,
            created_at: 0,
            finished_at: None,
            trained_tokens: None,
            error: None,
            result_files: vec![],
            events: vec![],
        };
        push_event(&mut job, "info", "started", serde_json::Value::Null);
        let steps = MAX_JOB_EVENTS + 5;
        for step in 1..=steps {
            push_event(&mut job, "info", "step", serde_json::json!({ "step": step }));
        }
        assert_eq!(job.events.len(), MAX_JOB_EVENTS);
        assert_eq!(job.events[0].message, "started");
        assert_eq!(job.events[1].data["step"], 7);
        let last = job.events.last().expect("events");
        assert_eq!((last.seq, last.data["step"].as_u64()), (steps as u64 + 1, Some(steps as u64)));
    }
}
