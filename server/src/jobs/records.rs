//! The durable records of the jobs API, as stored on disk and as OpenAI's API shows them:
//! uploaded files, fine-tuning jobs with their hyperparameters, and job events.
//!
//! Records carry the owning tenant; the JSON the API answers with is built by `to_api`, which
//! never shows another tenant's names (the caller decides what is visible).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The only `purpose` accepted on upload.
pub const PURPOSE_FINE_TUNE: &str = "fine-tune";
/// The purpose of the metrics file a finished job leaves behind (as OpenAI names it).
pub const PURPOSE_RESULTS: &str = "fine-tune-results";

/// An uploaded file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub tenant: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    pub created_at: u64,
}

impl FileRecord {
    pub fn to_api(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }
}

/// Where a job is in its life. Terminal: `Succeeded`, `Failed`, `Cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::ValidatingFiles,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn label(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// The training settings of a job, resolved (no "auto" left): what the trainer is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSettings {
    pub n_epochs: f64,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    pub rank: usize,
    pub alpha: f64,
    /// `all-linear` or a comma-separated list of module names.
    pub targets: String,
    /// Decoder layers `[first, last]`, inclusive; `None`: all.
    pub layers: Option<(usize, usize)>,
    /// Optimizer steps; `None`: `n_epochs` passes over the data.
    pub steps: Option<usize>,
    pub max_seq_len: usize,
    pub seed: u64,
}

/// Why a job failed, as OpenAI shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFailure {
    pub code: String,
    pub message: String,
}

/// One entry of a job's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Position in the job's log, from 1; the API id is `ftevent-<job>-<seq>`.
    pub seq: u64,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    /// Step metrics (`step`, `train_loss`, `valid_loss`, `total_steps`); `null` for messages.
    pub data: Value,
}

/// A fine-tuning job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub tenant: String,
    /// The base model's id.
    pub model: String,
    pub status: JobStatus,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub settings: JobSettings,
    /// The adapter name the result is (or will be) published under, in `tenant`.
    pub model_name: String,
    /// Bytes of the adapter the job publishes (config and weights, known from its settings),
    /// reserved against the tenant's adapter quota until the adapter is stored or the job ends
    /// (0 in older records).
    #[serde(default)]
    pub adapter_bytes: u64,
    /// Set once the adapter is published.
    pub fine_tuned_model: Option<String>,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobFailure>,
    pub result_files: Vec<String>,
    pub events: Vec<JobEvent>,
}

impl JobRecord {
    /// The OpenAI job object; `model_name` is how the caller names the fine-tuned model.
    pub fn to_api(&self, model_name: impl Fn(&str) -> String) -> Value {
        let s = &self.settings;
        let hyperparameters = json!({
            "n_epochs": s.n_epochs,
            "batch_size": s.batch_size,
            "learning_rate_multiplier": s.learning_rate_multiplier,
            "rank": s.rank,
            "alpha": s.alpha,
            "targets": s.targets,
            "layers": s.layers.map(|(a, b)| format!("{a}-{b}")),
            "steps": s.steps,
            "max_seq_len": s.max_seq_len,
        });
        json!({
            "id": self.id,
            "object": "fine_tuning.job",
            "model": self.model,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "fine_tuned_model": self.fine_tuned_model.as_deref().map(&model_name),
            "organization_id": self.tenant,
            "result_files": self.result_files,
            "status": self.status.label(),
            "validation_file": self.validation_file,
            "training_file": self.training_file,
            "hyperparameters": hyperparameters,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            "trained_tokens": self.trained_tokens,
            "error": self.error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "param": null})),
            "seed": s.seed,
            "user_provided_suffix": self.suffix,
            "estimated_finish": null,
            "integrations": [],
            "metadata": null,
        })
    }

    pub fn event_id(&self, seq: u64) -> String {
        format!("ftevent-{}-{seq}", self.id.trim_start_matches("ftjob-"))
    }

    pub fn event_to_api(&self, e: &JobEvent) -> Value {
        json!({
            "id": self.event_id(e.seq),
            "object": "fine_tuning.job.event",
            "created_at": e.created_at,
            "level": e.level,
            "message": e.message,
            "data": e.data,
            "type": if e.data.is_null() { "message" } else { "metrics" },
        })
    }
}
