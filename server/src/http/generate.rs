//! `/v1/completions` and `/v1/chat/completions`: validate, resolve the model for the caller,
//! submit one engine request per choice, then answer with one JSON body or a server-sent event
//! stream ending in `data: [DONE]`.
//!
//! A `Run` follows the choices' token streams to the end. Dropping it (the client went away, the
//! stream was dropped) drops the engine streams, which cancels the sequences: the engine frees
//! their KV blocks at its next step. Every run reports exactly once to the metrics.

use super::auth::Caller;
use super::error::{ApiError, JsonBody};
use super::metrics::{Outcome, RequestReport};
use super::openai::{ChatRequest, CompletionRequest, LogprobsFormat, Prepared};
use super::quota::SequenceLease;
use super::AppState;
use crate::engine::TokenEvent;
use ::adapters::store::{AdapterKey, ObjectPin};
use ::adapters::AdapterId;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let model = req.common.model.clone();
    let prepared = req.prepare(state.backend())?;
    run(state, caller, model, prepared, Kind::Completion).await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let model = req.common.model.clone();
    let prepared = req.prepare(state.backend())?;
    run(state, caller, model, prepared, Kind::Chat).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn run(
    state: AppState,
    caller: Caller,
    model: String,
    prepared: Prepared,
    kind: Kind,
) -> Result<Response, ApiError> {
    state.check_accepting()?;
    let target = state.resolve_model(&caller, &model)?;
    // Taken over before anything below can fail: the last pin of a replaced adapter removes its
    // files, which must not happen on an async thread.
    let adapter_files = AdapterFiles(target.pin);
    let stored_adapter = target.stored;
    let started = Instant::now();
    let n_choices = prepared.choices.len();
    let quota = state.quotas().admit(&caller.tenant, n_choices)?;
    let mut streams: SelectAll<BoxStream<'static, (usize, TokenEvent)>> = SelectAll::new();
    for (index, mut req) in prepared.choices.into_iter().enumerate() {
        req.adapter = target.adapter.clone();
        // On failure the choices already submitted are dropped with `streams`: cancelled.
        let mut rx = state.backend().submit(req, target.client)?;
        streams.push(stream::poll_fn(move |cx| rx.poll_recv(cx)).map(move |ev| (index, ev)).boxed());
    }
    let run = Run {
        deadline: tokio::time::Instant::from_std(started + state.limits().request_timeout),
        cancel: state.cancel_signal(),
        choices: vec![ChoiceState::default(); n_choices],
        open: n_choices,
        first_token: None,
        started,
        reported: false,
        tenant: caller.tenant,
        response: ResponseMeta { id: response_id(kind), created: unix_seconds(), model, kind },
        logprobs: prepared.logprobs,
        prompts_every: n_choices / prepared.prompts.max(1),
        _quota: quota,
        _adapter_files: adapter_files,
        stored_adapter,
        state,
        streams,
    };
    if prepared.stream {
        Ok(sse(run, prepared.include_usage))
    } else {
        collect(run).await
    }
}

/// What the response names: its id, time, model and object type.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

#[derive(Debug, Clone, Default)]
struct ChoiceState {
    text: String,
    finish_reason: Option<&'static str>,
    prompt_tokens: usize,
    completion_tokens: usize,
    decode_time: Duration,
    logprobs: Vec<TokenLogprobs>,
}

#[derive(Debug, Clone)]
struct TokenLogprobs {
    token: String,
    logprob: f32,
    top: Vec<(String, f32)>,
    /// Byte offset of the token's text in the choice's text.
    offset: usize,
}

/// A request's pin on its adapter's files. The last pin of a replaced or deleted adapter removes
/// its files (under the store's writer lock, with fsyncs), so it is released on a blocking
/// thread, never on the async ones.
struct AdapterFiles(Option<ObjectPin>);

impl Drop for AdapterFiles {
    fn drop(&mut self) {
        if let Some(pin) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(pin))),
                Err(_) => drop(pin),
            }
        }
    }
}

/// What happened next to a run.
enum Step {
    /// A choice's text grew (`delta`) and/or it finished.
    Progress {
        index: usize,
        delta: String,
        logprobs: Option<TokenLogprobs>,
        finished: bool,
    },
    AllDone,
    Failed(ApiError),
}

struct Run {
    state: AppState,
    streams: SelectAll<BoxStream<'static, (usize, TokenEvent)>>,
    deadline: tokio::time::Instant,
    cancel: tokio::sync::watch::Receiver<bool>,
    choices: Vec<ChoiceState>,
    /// The tenant's sequences, held until the response ends or the client goes away.
    _quota: SequenceLease,
    /// The adapter's files stay on disk until the request ends (they may still be loading).
    _adapter_files: AdapterFiles,
    /// The stored adapter `model` named, as it was when the request started.
    stored_adapter: Option<(AdapterKey, AdapterId)>,
    /// Choices not finished yet.
    open: usize,
    started: Instant,
    first_token: Option<Instant>,
    reported: bool,
    tenant: String,
    response: ResponseMeta,
    logprobs: LogprobsFormat,
    /// Choices per prompt (`n`): usage counts each prompt once.
    prompts_every: usize,
}

impl Run {
    async fn next(&mut self) -> Step {
        if self.open == 0 {
            self.report(Outcome::Finished);
            return Step::AllDone;
        }
        enum Woke {
            Event(Option<(usize, TokenEvent)>),
            Deadline,
            Cancelled,
        }
        let woke = tokio::select! {
            event = self.streams.next() => Woke::Event(event),
            _ = tokio::time::sleep_until(self.deadline) => Woke::Deadline,
            _ = self.cancel.wait_for(|cancelled| *cancelled) => Woke::Cancelled,
        };
        let event = match woke {
            Woke::Event(event) => event,
            Woke::Deadline => {
                self.report(Outcome::TimedOut);
                return Step::Failed(ApiError::Timeout(self.state.limits().request_timeout.as_secs()));
            }
            Woke::Cancelled => {
                self.report(Outcome::Cancelled);
                return Step::Failed(ApiError::NotReady("the server is shutting down".into()));
            }
        };
        let Some((index, event)) = event else {
            self.report(Outcome::Failed);
            return Step::Failed(ApiError::Internal("the engine stopped before the request finished".into()));
        };
        match event {
            TokenEvent::Token(t) => {
                self.first_token.get_or_insert_with(Instant::now);
                let logprobs = t.logprob.filter(|_| self.logprobs != LogprobsFormat::None).map(|lp| {
                    let backend = self.state.backend();
                    TokenLogprobs {
                        token: backend.token_text(t.id),
                        logprob: lp,
                        top: t.top_logprobs.iter().map(|c| (backend.token_text(c.id), c.logprob)).collect(),
                        offset: self.choices[index].text.len(),
                    }
                });
                let choice = &mut self.choices[index];
                choice.text.push_str(&t.text);
                choice.completion_tokens += 1;
                if let Some(lp) = &logprobs {
                    choice.logprobs.push(lp.clone());
                }
                Step::Progress { index, delta: t.text, logprobs, finished: false }
            }
            TokenEvent::Finished(c) => {
                let choice = &mut self.choices[index];
                choice.text.push_str(&c.trailing_text);
                choice.finish_reason = Some(c.reason.as_openai());
                choice.prompt_tokens = c.prompt_tokens;
                choice.completion_tokens = c.completion_tokens;
                choice.decode_time = c.decode_time;
                self.open -= 1;
                Step::Progress { index, delta: c.trailing_text, logprobs: None, finished: true }
            }
            TokenEvent::Failed(message) => {
                self.report(Outcome::Failed);
                Step::Failed(ApiError::Internal(format!("generation failed: {message}")))
            }
        }
    }

    fn usage(&self) -> Value {
        let prompt: usize =
            self.choices.iter().step_by(self.prompts_every.max(1)).map(|c| c.prompt_tokens).sum();
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    /// Reports the run to the metrics and the log, once.
    fn report(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let prompt_tokens: usize =
            self.choices.iter().step_by(self.prompts_every.max(1)).map(|c| c.prompt_tokens).sum();
        let generated_tokens = self.choices.iter().map(|c| c.completion_tokens).sum();
        let report = RequestReport {
            tenant: self.tenant.clone(),
            model: self.response.model.clone(),
            outcome,
            prompt_tokens,
            generated_tokens,
            time_to_first_token: self.first_token.map(|t| t.duration_since(self.started)),
            decode_time: self.choices.iter().map(|c| c.decode_time).max().unwrap_or_default(),
            total: self.started.elapsed(),
            // A name deleted or replaced while the request ran had its series dropped with it;
            // counting under it again would bring them back for good (or credit a newer adapter).
            count_model: self
                .stored_adapter
                .as_ref()
                .is_none_or(|(key, id)| self.state.store().get(key).is_some_and(|now| now.id == *id)),
        };
        tracing::info!(
            tenant = %report.tenant,
            model = %report.model,
            outcome = ?outcome,
            prompt_tokens,
            generated_tokens,
            seconds = report.total.as_secs_f64(),
            "generation"
        );
        self.state.metrics().request(&report);
    }

    fn logprobs_json(&self, entries: &[TokenLogprobs]) -> Value {
        match self.logprobs {
            LogprobsFormat::None => Value::Null,
            LogprobsFormat::Completion => json!({
                "tokens": entries.iter().map(|e| e.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": entries.iter().map(|e| {
                    e.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            }),
            LogprobsFormat::Chat => {
                let item = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
                json!({"content": entries.iter().map(|e| {
                    let mut v = item(&e.token, e.logprob);
                    v["top_logprobs"] = e.top.iter().map(|(t, lp)| item(t, *lp)).collect();
                    v
                }).collect::<Vec<_>>()})
            }
        }
    }

    /// The whole response of a non-streaming request.
    fn body(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = self.logprobs_json(&c.logprobs);
                match self.response.kind {
                    Kind::Completion => json!({
                        "index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                    }),
                    Kind::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }),
                }
            })
            .collect();
        let object = match self.response.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion",
        };
        json!({
            "id": self.response.id,
            "object": object,
            "created": self.response.created,
            "model": self.response.model,
            "choices": choices,
            "usage": self.usage(),
        })
    }

    /// One streamed chunk: `choice` is the per-choice part, or `None` for the usage chunk.
    fn chunk(&self, choice: Option<Value>, include_usage: bool) -> Event {
        let object = match self.response.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let mut v = json!({
            "id": self.response.id,
            "object": object,
            "created": self.response.created,
            "model": self.response.model,
            "choices": choice.map_or_else(Vec::new, |c| vec![c]),
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        Event::default().data(v.to_string())
    }

    fn progress_chunk(
        &self,
        index: usize,
        delta: String,
        logprobs: Option<TokenLogprobs>,
        finished: bool,
    ) -> Value {
        let finish_reason = if finished { self.choices[index].finish_reason } else { None };
        let logprobs = logprobs.map_or(Value::Null, |lp| self.logprobs_json(&[lp]));
        match self.response.kind {
            Kind::Completion => json!({
                "index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            }),
            Kind::Chat => {
                let delta = if delta.is_empty() { json!({}) } else { json!({"content": delta}) };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Dropped before the end: the client went away. The engine streams drop with `self`,
        // which cancels the sequences.
        self.report(Outcome::Cancelled);
    }
}

async fn collect(mut run: Run) -> Result<Response, ApiError> {
    loop {
        match run.next().await {
            Step::Progress { .. } => {}
            Step::AllDone => return Ok(Json(run.body()).into_response()),
            Step::Failed(e) => return Err(e),
        }
    }
}

/// The SSE response: role chunks first (chat), then one chunk per token with text, a final
/// chunk per choice with its `finish_reason`, the usage chunk when asked for, `[DONE]`.
fn sse(run: Run, include_usage: bool) -> Response {
    let mut pending = VecDeque::new();
    if run.response.kind == Kind::Chat {
        for index in 0..run.choices.len() {
            let role = json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            pending.push_back(run.chunk(Some(role), include_usage));
        }
    }
    struct Streaming {
        run: Run,
        pending: VecDeque<Event>,
        ended: bool,
        include_usage: bool,
    }
    let state = Streaming { run, pending, ended: false, include_usage };
    let events = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), s));
            }
            if s.ended {
                return None;
            }
            match s.run.next().await {
                Step::Progress { index, delta, logprobs, finished } => {
                    if !delta.is_empty() || logprobs.is_some() || finished {
                        let choice = s.run.progress_chunk(index, delta, logprobs, finished);
                        s.pending.push_back(s.run.chunk(Some(choice), s.include_usage));
                    }
                }
                Step::AllDone => {
                    if s.include_usage {
                        let mut usage = json!({
                            "id": s.run.response.id, "created": s.run.response.created, "model": s.run.response.model,
                            "object": if s.run.response.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                            "choices": [],
                        });
                        usage["usage"] = s.run.usage();
                        s.pending.push_back(Event::default().data(usage.to_string()));
                    }
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.ended = true;
                }
                Step::Failed(e) => {
                    s.pending.push_back(Event::default().data(e.body().to_string()));
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.ended = true;
                }
            }
        }
    });
    Sse::new(events).into_response()
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unique within a process and unlikely to repeat across restarts.
fn response_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    format!("{prefix}-{nanos:x}{n:04x}")
}
