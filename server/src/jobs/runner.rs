//! The runner thread: takes queued jobs one at a time, trains each through the `Trainer`,
//! records progress as job events, and publishes the result, or records why it did not.

use super::records::{JobFailure, JobRecord, JobStatus};
use super::{push_event, unix_seconds, Jobs, Running, Shared};
use crate::train::optim::AdamWConfig;
use crate::train::{Progress, Targets, TrainConfig, TrainError, TrainReport};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The learning rate `learning_rate_multiplier` multiplies (the `lorahost train` default).
pub const BASE_LEARNING_RATE: f64 = 2e-4;
/// Step events are kept in memory at once; the record on disk is rewritten at most this often
/// while a job runs (status changes are written at once). A restart fails running jobs anyway.
const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// Runs until `Jobs::shutdown`.
pub(super) fn run(shared: &Arc<Shared>) {
    let jobs = Jobs { shared: shared.clone() };
    while let Some(job) = next_job(shared) {
        let id = job.id.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| train_job(shared, &job)))
            .unwrap_or_else(|_| Err(failure("training_failed", "the trainer panicked")));
        finish(&jobs, &job, outcome);
        let work = shared.state().disk.work_dir(&id);
        if work.exists() {
            if let Err(e) = std::fs::remove_dir_all(&work) {
                tracing::warn!(path = %work.display(), "cannot remove a job's work directory: {e}");
            }
        }
        shared.state().running = None;
    }
}

/// Waits for a queued job and marks it running; `None` once shutting down.
fn next_job(shared: &Shared) -> Option<JobRecord> {
    let mut state = shared.state();
    loop {
        if state.stopping {
            return None;
        }
        while let Some(id) = state.queue.pop_front() {
            let Some(job) = state.disk.jobs.get_mut(&id) else { continue };
            if job.status != JobStatus::Queued {
                continue;
            }
            job.status = JobStatus::Running;
            push_event(job, "info", "Fine-tuning job started", Value::Null);
            let job = job.clone();
            state.running = Some(Running { id: id.clone(), stop: false, publishing: false });
            if let Err(e) = state.disk.save_job(&id) {
                tracing::error!(job = %id, "cannot record that the job started: {e}");
            }
            return Some(job);
        }
        state = shared.wake.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

fn failure(code: &str, message: impl Into<String>) -> JobFailure {
    JobFailure { code: code.to_string(), message: message.into() }
}

/// The trainer's configuration for a job.
pub(super) fn train_config(shared: &Shared, job: &JobRecord) -> Result<TrainConfig, JobFailure> {
    let state = shared.state();
    let s = &job.settings;
    let targets =
        Targets::parse(&s.targets).map_err(|e| failure("invalid_hyperparameters", e.to_string()))?;
    Ok(TrainConfig {
        data: state.disk.data_path(&job.training_file),
        eval_data: job.validation_file.as_deref().map(|f| state.disk.data_path(f)),
        eval_split: 0.0,
        out: state.disk.work_dir(&job.id).join("adapter"),
        rank: s.rank,
        alpha: s.alpha,
        rslora: false,
        targets,
        layers: s.layers.map(|(a, b)| a..b + 1),
        steps: s.steps,
        epochs: s.n_epochs,
        batch_size: s.batch_size,
        grad_accum: 1,
        max_seq_len: s.max_seq_len,
        // Jobs' data are chat transcripts of any length: grouping saves the padding.
        group_by_length: true,
        optimizer: AdamWConfig { lr: BASE_LEARNING_RATE * s.learning_rate_multiplier, ..Default::default() },
        warmup_steps: 0,
        max_grad_norm: 1.0,
        eval_every: 0,
        // A job interrupted by a restart fails rather than resumes, so it keeps no checkpoint.
        checkpoint_every: 0,
        resume: false,
        seed: s.seed,
        base_name: job.model.clone(),
    })
}

/// Trains; `Ok` holds the report and the adapter's directory.
fn train_job(shared: &Arc<Shared>, job: &JobRecord) -> Result<(TrainReport, PathBuf), JobFailure> {
    let config = train_config(shared, job)?;
    let mut progress =
        JobProgress { shared: shared.clone(), id: job.id.clone(), total: 0, saved: Instant::now() };
    match shared.trainer.train(&config, &mut progress) {
        Ok(report) => Ok((report, config.out)),
        Err(TrainError::Cancelled) => Err(failure("cancelled", "the job was stopped")),
        Err(e @ TrainError::Data(_)) => Err(failure("invalid_training_file", e.to_string())),
        Err(e) => Err(failure("training_failed", e.to_string())),
    }
}

/// Records the end of a job: published and succeeded, cancelled, or failed.
fn finish(jobs: &Jobs, job: &JobRecord, outcome: Result<(TrainReport, PathBuf), JobFailure>) {
    let shared = &jobs.shared;
    let id = &job.id;
    let (report, dir) = {
        let mut state = shared.state();
        // Cancelled by its owner: the record already says so, and nothing is published even if
        // training got to its end first.
        if state.running.as_ref().is_some_and(|r| r.stop) {
            return;
        }
        match outcome {
            Err(f) => {
                let f = if state.stopping && f.code == "cancelled" {
                    failure(
                        "interrupted",
                        "the server shut down before the job finished; nothing was published",
                    )
                } else {
                    f
                };
                drop(state);
                record_end(shared, id, JobStatus::Failed, Some(f), None);
                return;
            }
            Ok(done) => {
                if let Some(r) = state.running.as_mut() {
                    r.publishing = true;
                }
                done
            }
        }
    };
    if let Some(j) = shared.state().disk.jobs.get_mut(id) {
        j.trained_tokens = Some(report.trained_tokens as u64);
    }
    let published = read_adapter(&dir).and_then(|(config, weights)| {
        shared.publisher.publish(&job.tenant, &job.model_name, &config, &weights)
    });
    if let Err(e) = published {
        record_end(shared, id, JobStatus::Failed, Some(failure("publish_failed", e)), None);
        return;
    }
    let results = std::fs::read(dir.join(crate::train::LOG_FILE))
        .ok()
        .and_then(|log| jobs.add_result_file(&job.tenant, id, &log).ok())
        .map(|f| f.id);
    record_end(shared, id, JobStatus::Succeeded, None, results);
    tracing::info!(job = %id, tenant = %job.tenant, model = %job.model_name, "fine-tuned model published");
}

fn read_adapter(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("cannot read the trained {f}: {e}"));
    Ok((read(adapters::CONFIG_FILE)?, read(adapters::WEIGHTS_FILE)?))
}

fn record_end(
    shared: &Shared,
    id: &str,
    status: JobStatus,
    error: Option<JobFailure>,
    result: Option<String>,
) {
    let mut state = shared.state();
    let Some(job) = state.disk.jobs.get_mut(id) else { return };
    let message = match (&error, status) {
        (_, JobStatus::Succeeded) => "The job has successfully completed".to_string(),
        (Some(e), _) => format!("The job failed: {}", e.message),
        (None, _) => format!("The job ended: {}", status.label()),
    };
    push_event(job, if status == JobStatus::Succeeded { "info" } else { "error" }, &message, Value::Null);
    job.status = status;
    job.error = error;
    job.finished_at = Some(unix_seconds());
    if status == JobStatus::Succeeded {
        job.fine_tuned_model = Some(job.model_name.clone());
    }
    job.result_files.extend(result);
    if let Err(e) = state.disk.save_job(id) {
        tracing::error!(job = %id, "cannot record the end of the job: {e}");
    }
}

/// Turns the trainer's progress into job events and answers its cancellation question.
struct JobProgress {
    shared: Arc<Shared>,
    id: String,
    total: usize,
    saved: Instant,
}

impl JobProgress {
    fn event(&mut self, message: String, data: Value) {
        let mut state = self.shared.state();
        let Some(job) = state.disk.jobs.get_mut(&self.id) else { return };
        if job.status != JobStatus::Running {
            return;
        }
        push_event(job, "info", &message, data);
        if self.saved.elapsed() >= PERSIST_EVERY {
            self.saved = Instant::now();
            if let Err(e) = state.disk.save_job(&self.id) {
                tracing::warn!(job = %self.id, "cannot save the job's progress: {e}");
            }
        }
    }
}

impl Progress for JobProgress {
    fn start(&mut self, total_steps: usize) {
        self.total = total_steps;
        self.event(format!("Training {total_steps} steps"), Value::Null);
    }

    fn step(&mut self, step: usize, loss: f64, lr: f64, tokens_per_second: f64) {
        let total = self.total;
        self.event(
            format!("Step {step}/{total}: training loss={loss:.4}"),
            json!({"step": step, "total_steps": total, "train_loss": loss, "learning_rate": lr,
                   "tokens_per_second": tokens_per_second}),
        );
    }

    fn eval(&mut self, step: usize, loss: f64) {
        let total = self.total;
        self.event(
            format!("Step {step}/{total}: validation loss={loss:.4}"),
            json!({"step": step, "total_steps": total, "valid_loss": loss}),
        );
    }

    fn cancelled(&self) -> bool {
        let state = self.shared.state();
        state.stopping || state.running.as_ref().is_some_and(|r| r.stop)
    }
}
