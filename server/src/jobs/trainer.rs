//! `Trainer`: what jobs need from the model side (checking data, training), and `BaseTrainer`,
//! which trains on the resident base on a dedicated thread pool of `--train-threads` threads at
//! the lowest scheduling priority, so serving keeps the cores it needs.

use crate::base::Base;
use crate::train::{Progress, TrainConfig, TrainError, TrainReport};
use adapters::BaseShape;
use std::path::Path;
use std::sync::Arc;

/// What an upload check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSummary {
    pub examples: usize,
    pub tokens: usize,
}

pub trait Trainer: Send + Sync + 'static {
    /// The base's decoder layers and adaptable projections (for `layers` in a job request and
    /// the size of the adapter a job will publish).
    fn base_shape(&self) -> BaseShape;
    /// Parses and tokenizes a training file as training would; the error names the line.
    fn check_data(&self, path: &Path, max_seq_len: usize) -> Result<DataSummary, String>;
    /// Trains and writes the adapter to `config.out`; stops with `TrainError::Cancelled` when
    /// `progress.cancelled()` says so.
    fn train(
        &self,
        config: &TrainConfig,
        progress: &mut (dyn Progress + Send),
    ) -> Result<TrainReport, TrainError>;
}

/// Trains on the resident base.
pub struct BaseTrainer {
    base: Arc<dyn AsRef<Base> + Send + Sync>,
    pool: rayon::ThreadPool,
}

impl BaseTrainer {
    /// `threads` compute threads for training (at least 1), apart from serving's.
    pub fn new(base: Arc<dyn AsRef<Base> + Send + Sync>, threads: usize) -> Result<Self, String> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("lorahost-train-{i}"))
            .start_handler(|_| lowest_priority())
            .build()
            .map_err(|e| format!("cannot start the training threads: {e}"))?;
        Ok(Self { base, pool })
    }
}

impl Trainer for BaseTrainer {
    fn base_shape(&self) -> BaseShape {
        self.base.as_ref().as_ref().model.base_shape()
    }

    fn check_data(&self, path: &Path, max_seq_len: usize) -> Result<DataSummary, String> {
        // Runs on the caller's thread: the training pool may be busy for a long while.
        let data = crate::train::data::load(path, self.base.as_ref().as_ref(), max_seq_len)
            .map_err(|e| e.to_string())?;
        let tokens = data.examples.iter().map(|e| e.ids.len()).sum();
        Ok(DataSummary { examples: data.examples.len(), tokens })
    }

    fn train(
        &self,
        config: &TrainConfig,
        progress: &mut (dyn Progress + Send),
    ) -> Result<TrainReport, TrainError> {
        let base = self.base.as_ref().as_ref();
        self.pool.install(|| crate::train::train(base, config, progress))
    }
}

/// Puts the calling thread in Linux's `SCHED_IDLE` class (nice 19 where that is refused): it
/// runs only on a core no serving thread wants, and a waking serving thread takes the core back
/// at once; idle cores still train at full speed. Under nice 19 alone (CFS weights 1024 to 15)
/// a training thread still held a core for part of each scheduling period, which on 2 cores
/// showed in serving's TPOT.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system calls on the calling thread; on Linux `sched_setscheduler(0, ..)`
        // and `setpriority(PRIO_PROCESS, tid)` change only that thread.
        let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
        let result = if idle {
            0
        } else {
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, 19)
            }
        };
        if result != 0 {
            tracing::warn!(
                "cannot lower the priority of a training thread: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
