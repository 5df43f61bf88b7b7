//! The engine's state and its step: plan → apply (preempt, admit, allocate) → one forward over
//! the ragged batch → sample → emit → free. Synchronous and single-threaded; `Engine` runs it on
//! its own thread, tests drive it directly.

use super::blocks::BlockAllocator;
use super::fair::{ClientId, FairShare};
use super::plan::{plan, Budgets, SchedState, SeqId, SeqSched, StepPlan};
use super::request::AdapterChoice;
use super::request::{Completion, FinishReason, GeneratedToken, StopCriteria, TokenEvent, ValidRequest};
use super::sampler::Sampler;
use super::stop::TextStop;
use super::{EngineConfig, EngineError};
use crate::model::{AdapterReadiness, Executor, ForwardBatch, Llama, LoraBatch};
use crate::tokenizer::TextTokenizer;
use adapters::cache::{Acquire, HostCache, Lease, Residency};
use adapters::{AdapterId, LoraAdapter};
use kernels::attention::SeqRows;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

struct Sequence {
    prompt_len: usize,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    sampler: Sampler,
    text: TextStop,
    stop: StopCriteria,
    events: UnboundedSender<TokenEvent>,
    adapter: SeqAdapter,
    admitted_at: Option<Instant>,
    first_token_at: Option<Instant>,
    preemptions: usize,
    /// Who the sequence is accounted to for fair admission.
    client: ClientId,
}

/// A sequence's adapter: none, waiting for the cache, or held (pinned by a lease when it came
/// from the cache).
enum SeqAdapter {
    Base,
    Pending(AdapterId),
    Held { adapter: Arc<LoraAdapter>, _lease: Option<Lease<LoraAdapter>> },
}

impl SeqAdapter {
    fn held(&self) -> Option<&Arc<LoraAdapter>> {
        match self {
            SeqAdapter::Held { adapter, .. } => Some(adapter),
            _ => None,
        }
    }
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    fn sched(&self, id: SeqId) -> SeqSched {
        SeqSched {
            id,
            len: self.tokens.len(),
            computed: self.computed,
            blocks: self.blocks.len(),
            client: self.client,
            resumed: self.admitted_at.is_some(),
        }
    }
}

/// Counters a caller (metrics, tests) may read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub steps: u64,
    pub preemptions: u64,
    pub running: usize,
    /// Sequences not running: new requests plus preempted ones.
    pub waiting: usize,
    /// New requests not admitted yet (the queue `--max-waiting` bounds).
    pub queued: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
}

pub struct EngineCore {
    model: Arc<Llama>,
    tokenizer: Arc<TextTokenizer>,
    /// The forward pass and its KV storage, on the CPU or a GPU.
    exec: Executor,
    blocks: BlockAllocator,
    config: EngineConfig,
    seqs: HashMap<SeqId, Sequence>,
    running: Vec<SeqId>,
    waiting: VecDeque<SeqId>,
    next_id: SeqId,
    steps: u64,
    preemptions: u64,
    /// Where `AdapterChoice::Cached` adapters come from.
    adapter_cache: Option<HostCache<LoraAdapter>>,
    /// Service received per client, for fair admission.
    fair: FairShare,
    /// Shared count of new requests not admitted yet (see `with_queue_counter`).
    queue_counter: Option<Arc<AtomicUsize>>,
}

impl EngineCore {
    /// An engine running the model on the CPU.
    pub fn new(model: Arc<Llama>, tokenizer: Arc<TextTokenizer>, config: EngineConfig) -> Self {
        let exec = Executor::cpu(&model, config.kv_cache);
        Self::with_executor(model, tokenizer, config, exec)
    }

    /// An engine whose steps run on `exec` (see [`Executor::open`]).
    pub fn with_executor(
        model: Arc<Llama>,
        tokenizer: Arc<TextTokenizer>,
        config: EngineConfig,
        exec: Executor,
    ) -> Self {
        let blocks = BlockAllocator::new(exec.num_blocks());
        Self {
            model,
            tokenizer,
            exec,
            blocks,
            config,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 1,
            steps: 0,
            preemptions: 0,
            adapter_cache: None,
            fair: FairShare::default(),
            queue_counter: None,
        }
    }

    /// A counter its owner increments for every request it hands to `add`; the core decrements
    /// it the moment a request leaves the queue of new requests (first admitted, or ended before
    /// that), so the count is exact without waiting for a step to finish.
    pub fn with_queue_counter(mut self, counter: Arc<AtomicUsize>) -> Self {
        self.queue_counter = Some(counter);
        self
    }

    fn left_queue(&self) {
        if let Some(c) = &self.queue_counter {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Serves `AdapterChoice::Cached` requests from `cache`.
    pub fn with_adapter_cache(mut self, cache: HostCache<LoraAdapter>) -> Self {
        self.adapter_cache = Some(cache);
        self
    }

    /// The most tokens (prompt + generated) one sequence may hold.
    pub fn max_sequence_tokens(&self) -> usize {
        let cache_tokens = self.exec.num_blocks() * self.exec.block_size();
        cache_tokens.min(self.model.config().max_position_embeddings)
    }

    /// Queues a request, accounted to a client derived from its adapter (see `add_for`).
    pub fn add(
        &mut self,
        req: ValidRequest,
        events: UnboundedSender<TokenEvent>,
    ) -> Result<SeqId, EngineError> {
        let client = default_client(&req);
        self.add_for(req, events, client)
    }

    /// Queues a request accounted to `client` for fair admission. Fails without side effects
    /// when it can never fit.
    pub fn add_for(
        &mut self,
        req: ValidRequest,
        events: UnboundedSender<TokenEvent>,
        client: ClientId,
    ) -> Result<SeqId, EngineError> {
        check_request(&req, self.max_sequence_tokens(), self.model.config().vocab_size)?;
        let adapter = match req.adapter {
            None => SeqAdapter::Base,
            Some(AdapterChoice::Loaded(adapter)) => SeqAdapter::Held { adapter, _lease: None },
            Some(AdapterChoice::Cached(id)) if self.adapter_cache.is_some() => SeqAdapter::Pending(id),
            Some(AdapterChoice::Cached(_)) => {
                return Err(EngineError::InvalidRequest("this engine has no adapter cache".into()))
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let seq = Sequence {
            prompt_len: req.prompt_ids.len(),
            tokens: req.prompt_ids,
            computed: 0,
            blocks: Vec::new(),
            sampler: Sampler::new(req.sampling),
            text: TextStop::new(req.stop.stop.clone()),
            stop: req.stop,
            events,
            adapter,
            admitted_at: None,
            first_token_at: None,
            preemptions: 0,
            client,
        };
        let queued = self.waiting.iter().filter_map(|w| self.seqs.get(w)).filter(|s| s.admitted_at.is_none());
        self.fair.arrive(client, queued.map(|s| s.client));
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        Ok(id)
    }

    /// Ends a sequence now; its blocks are free for the next step.
    pub fn cancel(&mut self, id: SeqId) {
        self.finish(id, FinishReason::Cancelled);
    }

    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            steps: self.steps,
            preemptions: self.preemptions,
            running: self.running.len(),
            waiting: self.waiting.len(),
            queued: self.seqs.values().filter(|s| s.admitted_at.is_none()).count(),
            free_blocks: self.blocks.num_free(),
            total_blocks: self.blocks.num_blocks(),
        }
    }

    /// Runs one step; `Ok(false)` when there was nothing to run (every sequence is waiting for
    /// its adapter to load). A failing forward fails the sequences in that batch, not the engine.
    pub fn step(&mut self) -> Result<bool, EngineError> {
        let gone: Vec<SeqId> =
            self.seqs.iter().filter(|(_, s)| s.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            self.cancel(id);
        }
        self.poll_adapters();
        let off_device = self.prepare_device_adapters();
        let state = SchedState {
            running: self.running.iter().map(|id| self.seqs[id].sched(*id)).collect(),
            // A sequence whose adapter is still loading (into host memory, or onto the
            // device) waits in the queue, not in the batch.
            waiting: self
                .waiting
                .iter()
                .filter(|id| {
                    !matches!(self.seqs[id].adapter, SeqAdapter::Pending(_)) && !off_device.contains(id)
                })
                .map(|id| self.seqs[id].sched(*id))
                .collect(),
        };
        let budgets = Budgets {
            max_step_tokens: self.config.max_step_tokens,
            max_running: self.config.max_running,
            block_size: self.exec.block_size(),
            free_blocks: self.blocks.num_free(),
        };
        let step_plan = plan(&state, &budgets, &self.fair);
        self.apply(&step_plan)?;
        if step_plan.rows.is_empty() {
            // No step will start the device copies the executor queued.
            self.exec.start_queued_loads();
            return Ok(false);
        }
        self.steps += 1;
        match self.run_rows(&step_plan) {
            Ok(()) => Ok(true),
            Err(e) => {
                let msg = e.to_string();
                for r in &step_plan.rows {
                    if let Some(seq) = self.seqs.get(&r.id) {
                        let _ = seq.events.send(TokenEvent::Failed(msg.clone()));
                    }
                    self.remove(r.id);
                }
                Err(e)
            }
        }
    }

    /// Brings waiting sequences' adapters in, in queue order: takes a lease where the adapter is
    /// resident and starts loads for the others; fails the sequences whose adapter cannot be
    /// loaded. What the queue pins is bounded: a lease on a value nobody pins yet, or a new load,
    /// is taken only while the pinned bytes are under the cache's budget (or nothing is pinned,
    /// so one adapter larger than the whole budget still gets served), and at most one load per
    /// loader thread is in flight for the queue. The rest wait, holding nothing, until running
    /// sequences release what they pin.
    fn poll_adapters(&mut self) {
        let Some(cache) = &self.adapter_cache else { return };
        let budget = cache.config().budget_bytes;
        let max_loads = cache.config().loader_threads.max(1);
        let mut pinned = cache.pinned_bytes();
        let mut loading: HashSet<AdapterId> = HashSet::new();
        let pending = |seq: &Sequence| match seq.adapter {
            SeqAdapter::Pending(adapter_id) => Some(adapter_id),
            _ => None,
        };
        for adapter_id in self.waiting.iter().filter_map(|id| pending(self.seqs.get(id)?)) {
            if cache.residency(adapter_id) == Residency::Loading {
                loading.insert(adapter_id);
            }
        }
        let mut failed = Vec::new();
        for id in &self.waiting {
            let Some(seq) = self.seqs.get_mut(id) else { continue };
            let Some(adapter_id) = pending(seq) else { continue };
            let room = pinned < budget || pinned == 0;
            let fresh_bytes = match cache.residency(adapter_id) {
                Residency::Resident { pins: 0, bytes } if room => bytes,
                Residency::Resident { pins, .. } if pins > 0 => 0,
                // Joining a load in flight holds nothing more, and tells the cache it is waited
                // for (an upload's prefetch is not).
                Residency::Loading => 0,
                Residency::Absent if room && loading.len() < max_loads => 0,
                // A remembered failure fails the sequence without a load; a retry is one load.
                Residency::Failed { .. } => 0,
                _ => continue,
            };
            match cache.try_acquire(adapter_id) {
                Acquire::Ready(lease) => {
                    pinned += fresh_bytes;
                    seq.adapter = SeqAdapter::Held { adapter: lease.value().clone(), _lease: Some(lease) };
                }
                Acquire::Loading => {
                    loading.insert(adapter_id);
                }
                Acquire::Failed(msg) => failed.push((*id, msg)),
            }
        }
        for (id, msg) in failed {
            if let Some(seq) = self.seqs.get(&id) {
                let _ = seq.events.send(TokenEvent::Failed(format!("adapter failed to load: {msg}")));
            }
            self.remove(id);
        }
    }

    /// Asks the executor to bring the adapters of waiting sequences onto its device (on the CPU
    /// they are there already); returns the waiting sequences whose adapter is not there yet,
    /// and fails those whose adapter can never go there.
    fn prepare_device_adapters(&mut self) -> HashSet<SeqId> {
        let running: Vec<AdapterId> =
            self.running.iter().filter_map(|id| Some(self.seqs.get(id)?.adapter.held()?.id)).collect();
        let (ids, wanted): (Vec<SeqId>, Vec<Arc<LoraAdapter>>) = self
            .waiting
            .iter()
            .filter_map(|id| Some((*id, self.seqs.get(id)?.adapter.held()?.clone())))
            .unzip();
        let mut off_device = HashSet::new();
        let mut failed = Vec::new();
        for (id, readiness) in ids.into_iter().zip(self.exec.prepare_adapters(&wanted, &running)) {
            match readiness {
                AdapterReadiness::Ready => {}
                AdapterReadiness::NotYet => {
                    off_device.insert(id);
                }
                AdapterReadiness::Failed(why) => failed.push((id, why)),
            }
        }
        for (id, why) in failed {
            if let Some(seq) = self.seqs.get(&id) {
                let _ = seq
                    .events
                    .send(TokenEvent::Failed(format!("adapter cannot be placed on the device: {why}")));
            }
            self.remove(id);
        }
        off_device
    }

    fn apply(&mut self, step: &StepPlan) -> Result<(), EngineError> {
        let mut preempted = step.preempt.clone();
        preempted.sort_unstable();
        for &id in preempted.iter().rev() {
            if let Some(seq) = self.seqs.get_mut(&id) {
                self.blocks.release(seq.blocks.drain(..));
                seq.computed = 0;
                seq.preemptions += 1;
                self.preemptions += 1;
                self.running.retain(|&r| r != id);
                self.waiting.push_front(id);
            }
        }
        for &id in &step.admit {
            self.waiting.retain(|&w| w != id);
            self.running.push(id);
            let first_admission = match self.seqs.get_mut(&id) {
                Some(seq) if seq.admitted_at.is_none() => {
                    seq.admitted_at = Some(Instant::now());
                    self.fair.admitted(seq.client, seq.prompt_len);
                    true
                }
                _ => false,
            };
            if first_admission {
                self.left_queue();
            }
        }
        for r in &step.rows {
            let seq = self.seqs.get_mut(&r.id).ok_or(EngineError::Internal("planned an unknown sequence"))?;
            let new = self
                .blocks
                .allocate(r.new_blocks)
                .ok_or(EngineError::Internal("planned more blocks than free"))?;
            seq.blocks.extend(new);
        }
        Ok(())
    }

    fn run_rows(&mut self, step: &StepPlan) -> Result<(), EngineError> {
        // Rows of one adapter must be contiguous for the segmented LoRA kernel: order the
        // sequences by adapter (base first), keeping the plan's order within each group.
        let adapter_of = |id: &SeqId| self.seqs.get(id).and_then(|s| s.adapter.held().map(|a| a.id));
        let mut order: Vec<&super::plan::PlannedRows> = step.rows.iter().collect();
        order.sort_by_key(|r| adapter_of(&r.id));
        let total = step.total_rows();
        let mut tokens = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut logit_rows = Vec::new();
        let mut samplers = Vec::new();
        let mut ranges = Vec::with_capacity(order.len());
        let mut lora_segments: Vec<(std::ops::Range<usize>, &LoraAdapter)> = Vec::new();
        let mut last_adapter: Option<AdapterId> = None;
        for r in &order {
            let seq = &self.seqs[&r.id];
            let start = tokens.len();
            tokens.extend_from_slice(&seq.tokens[seq.computed..seq.computed + r.count]);
            positions.extend(seq.computed..seq.computed + r.count);
            ranges.push(start..tokens.len());
            if seq.computed + r.count == seq.tokens.len() {
                logit_rows.push((tokens.len() - 1) as u32);
                samplers.push(r.id);
            }
            if let Some(adapter) = seq.adapter.held() {
                match lora_segments.last_mut() {
                    Some((rows, _)) if last_adapter == Some(adapter.id) => rows.end = tokens.len(),
                    _ => lora_segments.push((start..tokens.len(), adapter)),
                }
                last_adapter = Some(adapter.id);
            }
        }
        let lora = LoraBatch::new(lora_segments);
        let seq_rows: Vec<SeqRows> = order
            .iter()
            .zip(&ranges)
            .map(|(r, range)| {
                let seq = &self.seqs[&r.id];
                SeqRows { rows: range.clone(), start_pos: seq.computed, block_table: &seq.blocks }
            })
            .collect();
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seq_rows,
            logit_rows: &logit_rows,
            lora: &lora,
        };
        let mut logits = self.exec.forward(&self.model, &batch)?;
        drop((seq_rows, lora));
        let vocab = self.model.config().vocab_size;
        for r in &step.rows {
            if let Some(seq) = self.seqs.get_mut(&r.id) {
                seq.computed += r.count;
            }
        }
        for (i, id) in samplers.into_iter().enumerate() {
            let row = &mut logits[i * vocab..(i + 1) * vocab];
            self.emit_next(id, row)?;
        }
        Ok(())
    }

    fn emit_next(&mut self, id: SeqId, logits: &mut [f32]) -> Result<(), EngineError> {
        let Some(seq) = self.seqs.get_mut(&id) else { return Ok(()) };
        if !super::sampler::all_finite(logits) {
            // An adapter may hold any finite numbers, and a product of them can still overflow:
            // no token drawn from such logits means anything, so this request fails, alone,
            // rather than answering noise. The other rows of the step are unaffected.
            let why = "the model produced non-finite logits for this request (its adapter's weights \
                       or scale overflow)";
            let _ = seq.events.send(TokenEvent::Failed(why.into()));
            self.remove(id);
            return Ok(());
        }
        let sampled =
            seq.sampler.sample(logits, &seq.tokens[..seq.prompt_len], &seq.tokens[seq.prompt_len..]);
        seq.tokens.push(sampled.id);
        self.fair.generated(seq.client);
        seq.first_token_at.get_or_insert_with(Instant::now);
        let is_eos = !seq.stop.ignore_eos && self.tokenizer.eos_token_ids.contains(&sampled.id);
        let step = if is_eos {
            super::stop::TextStep { text: String::new(), stopped: false }
        } else {
            seq.text.push(&self.tokenizer, sampled.id)?
        };
        let event = GeneratedToken {
            id: sampled.id,
            text: step.text,
            logprob: sampled.logprob,
            top_logprobs: sampled.top_logprobs,
        };
        let delivered = seq.events.send(TokenEvent::Token(event)).is_ok();
        let reason = if !delivered {
            Some(FinishReason::Cancelled)
        } else if is_eos {
            Some(FinishReason::Eos)
        } else if step.stopped {
            Some(FinishReason::StopString)
        } else if seq.generated().len() >= seq.stop.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.finish(id, reason);
        }
        Ok(())
    }

    /// Sends the final event and frees everything the sequence holds.
    fn finish(&mut self, id: SeqId, reason: FinishReason) {
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        let trailing_text = match reason {
            FinishReason::StopString | FinishReason::Cancelled => String::new(),
            _ => seq.text.finish(&self.tokenizer).unwrap_or_default(),
        };
        let now = Instant::now();
        let admitted = seq.admitted_at.unwrap_or(now);
        let first = seq.first_token_at.unwrap_or(now);
        let completion = Completion {
            reason,
            trailing_text,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated().len(),
            prefill_time: first.saturating_duration_since(admitted),
            decode_time: now.saturating_duration_since(first),
            preemptions: seq.preemptions,
        };
        let _ = seq.events.send(TokenEvent::Finished(completion));
        self.remove(id);
    }

    fn remove(&mut self, id: SeqId) {
        if let Some(mut seq) = self.seqs.remove(&id) {
            self.blocks.release(seq.blocks.drain(..));
            if seq.admitted_at.is_none() {
                self.left_queue();
            }
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        if self.fair.clients() > FORGET_CLIENTS_ABOVE {
            let seqs = &self.seqs;
            self.fair.forget_idle(|c| seqs.values().any(|s| s.client == c));
        }
    }
}

/// Counters kept before idle clients are forgotten (memory bound only: see `FairShare`).
const FORGET_CLIENTS_ABOVE: usize = 4096;

/// The client a request is accounted to when the caller does not say: one tenant, an account
/// per adapter.
pub fn default_client(req: &ValidRequest) -> ClientId {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match &req.adapter {
        None => 0u8.hash(&mut h),
        Some(AdapterChoice::Loaded(a)) => a.id.hash(&mut h),
        Some(AdapterChoice::Cached(id)) => id.hash(&mut h),
    }
    ClientId::new(0, h.finish())
}

/// The checks a request must pass before it is queued.
pub fn check_request(req: &ValidRequest, max_tokens_per_seq: usize, vocab: usize) -> Result<(), EngineError> {
    if req.prompt_ids.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if req.stop.max_tokens == 0 {
        return Err(EngineError::InvalidRequest("max_tokens must be at least 1".into()));
    }
    if let Some(bad) = req.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::InvalidRequest(format!(
            "prompt token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    // Saturating: a `max_tokens` near usize::MAX must fail here, not wrap around and pass.
    let needed = req.prompt_ids.len().saturating_add(req.stop.max_tokens);
    if needed > max_tokens_per_seq {
        return Err(EngineError::PromptTooLong {
            prompt_tokens: req.prompt_ids.len(),
            max_tokens: req.stop.max_tokens,
            limit: max_tokens_per_seq,
        });
    }
    Ok(())
}
