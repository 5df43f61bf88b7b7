//! The engine: owns the model, the KV cache and every running sequence, on its own thread.
//! Callers `submit` a `ValidRequest` and read `TokenEvent`s from the returned stream; dropping
//! the stream cancels the request (its KV blocks are freed at the next step).
//!
//! Continuous batching: requests join and leave between steps; each step runs one forward over
//! the rows `plan` chose (decode tokens and prefill chunks of many sequences together).

mod blocks;
mod core;
pub mod fair;
pub mod plan;
mod request;
mod sampler;
mod stop;

pub use self::core::{check_request, default_client, EngineCore, EngineStats};
pub use blocks::{blocks_for, BlockAllocator};
pub use fair::ClientId;
pub use plan::SeqId;
pub use request::{
    AdapterChoice, Completion, FinishReason, GeneratedToken, SamplingParams, StopCriteria, TokenEvent,
    TokenLogprob, ValidRequest, MAX_TOP_LOGPROBS,
};
pub use sampler::{argmax, Sampler};

use crate::model::{DeviceConfig, Executor, KvCacheConfig, Llama, ModelError};
use crate::tokenizer::{TextTokenizer, TokenizerError};
use adapters::cache::HostCache;
use adapters::LoraAdapter;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Default rows per step: enough to keep the matmuls efficient, small enough that a prefill
/// chunk does not hold decode rows back for long.
pub const DEFAULT_MAX_STEP_TOKENS: usize = 512;
/// Default sequences running at once.
pub const DEFAULT_MAX_RUNNING: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub max_step_tokens: usize,
    pub max_running: usize,
    pub kv_cache: KvCacheConfig,
    /// Where the steps run.
    pub device: DeviceConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: DEFAULT_MAX_STEP_TOKENS,
            max_running: DEFAULT_MAX_RUNNING,
            kv_cache: KvCacheConfig::default(),
            device: DeviceConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the limit of {limit} tokens per sequence (context length or KV cache)"
    )]
    PromptTooLong { prompt_tokens: usize, max_tokens: usize, limit: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("{queued} requests are already waiting (the limit is {limit}); retry later")]
    Overloaded { queued: usize, limit: usize },
    #[error("model error: {0}")]
    Model(#[from] ModelError),
    #[error("tokenizer error: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("internal engine error: {0}")]
    Internal(&'static str),
}

enum Command {
    Submit(ValidRequest, ClientId, UnboundedSender<TokenEvent>),
    Shutdown,
}

/// What the engine thread shares with the handles: its last stats, and the exact number of new
/// requests not admitted yet (counted by `submit`, uncounted by the core when it admits or ends
/// one, or by the loop when `add` refuses one).
#[derive(Default)]
struct Shared {
    stats: Mutex<EngineStats>,
    queued: Arc<AtomicUsize>,
}

impl Shared {
    fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, stats: EngineStats) {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = stats;
    }
}

/// A handle to the engine thread. Cheap to share behind an `Arc`; dropping the last handle
/// stops the thread after the sequences in flight are cancelled.
pub struct Engine {
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    max_sequence_tokens: usize,
    vocab_size: usize,
    shared: Arc<Shared>,
    /// New requests allowed to wait for admission; beyond it `submit` answers `Overloaded`.
    max_waiting: Option<usize>,
}

impl Engine {
    /// Starts the engine thread. `adapter_cache` serves `AdapterChoice::Cached` requests.
    pub fn start(
        model: Arc<Llama>,
        tokenizer: Arc<TextTokenizer>,
        config: EngineConfig,
        adapter_cache: Option<HostCache<LoraAdapter>>,
    ) -> Result<Self, EngineError> {
        let vocab_size = model.config().vocab_size;
        let shared = Arc::new(Shared::default());
        let exec = Executor::open(&model, config.device, config.kv_cache)?;
        let mut core = EngineCore::with_executor(model, tokenizer, config, exec)
            .with_queue_counter(shared.queued.clone());
        if let Some(cache) = adapter_cache {
            core = core.with_adapter_cache(cache);
        }
        let max_sequence_tokens = core.max_sequence_tokens();
        let (tx, rx) = mpsc::channel();
        shared.publish(core.stats());
        let published = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lorahost-engine".into())
            .spawn(move || run_loop(&mut core, &rx, &published))
            .map_err(|_| EngineError::Internal("cannot spawn the engine thread"))?;
        Ok(Self {
            commands: tx,
            thread: Some(thread),
            max_sequence_tokens,
            vocab_size,
            shared,
            max_waiting: None,
        })
    }

    /// Bounds the queue of new requests waiting for admission: `submit` beyond it fails with
    /// `Overloaded` (the server answers 429).
    pub fn with_max_waiting(mut self, max_waiting: usize) -> Self {
        self.max_waiting = Some(max_waiting);
        self
    }

    /// Queues a request, accounted to its adapter for fairness; its tokens arrive on the
    /// returned stream.
    pub fn submit(&self, req: ValidRequest) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        let client = default_client(&req);
        self.submit_for(req, client)
    }

    /// Queues a request accounted to `client` for fair admission (the server uses tenant and
    /// adapter); its tokens arrive on the returned stream.
    pub fn submit_for(
        &self,
        req: ValidRequest,
        client: ClientId,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        check_request(&req, self.max_sequence_tokens, self.vocab_size)?;
        // Count this request before checking, so concurrent submits cannot all pass the check.
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if let Some(limit) = self.max_waiting.filter(|&limit| queued >= limit) {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded { queued, limit });
        }
        let (tx, rx) = unbounded_channel();
        if self.commands.send(Command::Submit(req, client, tx)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }

    /// The engine's counters as of its last step, with `queued` as of now: every submitted
    /// request not admitted yet (the queue `with_max_waiting` bounds).
    pub fn stats(&self) -> EngineStats {
        let mut stats = self.shared.stats();
        stats.queued = self.shared.queued.load(Ordering::SeqCst);
        stats
    }

    pub fn max_sequence_tokens(&self) -> usize {
        self.max_sequence_tokens
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long an engine with nothing runnable waits before looking at its adapter loads again.
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(2);

fn run_loop(core: &mut EngineCore, rx: &mpsc::Receiver<Command>, shared: &Shared) {
    let mut pending: Vec<Command> = Vec::new();
    loop {
        let mut commands = std::mem::take(&mut pending);
        if !core.has_work() && commands.is_empty() {
            match rx.recv() {
                Ok(c) => commands.push(c),
                Err(_) => return,
            }
        }
        commands.extend(rx.try_iter());
        for command in commands {
            match command {
                Command::Submit(req, client, events) => {
                    if let Err(e) = core.add_for(req, events.clone(), client) {
                        shared.queued.fetch_sub(1, Ordering::SeqCst);
                        let _ = events.send(TokenEvent::Failed(e.to_string()));
                    }
                }
                Command::Shutdown => return,
            }
        }
        shared.publish(core.stats());
        if core.has_work() {
            match core.step() {
                Ok(true) => {}
                // Only sequences waiting for adapters: wait for a command or a load, not spin.
                Ok(false) => match rx.recv_timeout(IDLE_POLL) {
                    Ok(c) => pending.push(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
                Err(e) => tracing::error!(error = %e, "engine step failed; its sequences were failed"),
            }
            shared.publish(core.stats());
        }
    }
}
