//! `lorahost generate`: one prompt, or a JSONL file of requests run as one continuously batched
//! workload. Results go to stdout (text, or JSON with `--json` / `--requests`); progress and
//! errors go to stderr.

use super::{AdapterArgs, EngineArgs, ModelArgs};
use crate::adapter_host::RunAdapters;
use crate::base::Base;
use crate::chat::ChatMessage;
use crate::engine::{
    AdapterChoice, Engine, FinishReason, SamplingParams, StopCriteria, TokenEvent, ValidRequest,
};
use adapters::store::AdapterKey;
use adapters::AdapterId;
use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// The adapter to apply: a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`)
    /// or the name of an adapter in `--adapters-dir`. With `--requests`, each line names its own.
    #[arg(long, conflicts_with = "requests")]
    pub adapter: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, required_unless_present = "requests", conflicts_with = "requests")]
    pub prompt: Option<String>,
    /// JSONL file of requests: `id`, `prompt` or `messages`, optional `adapter` (a PEFT
    /// directory, a name in `--adapters-dir`, or null for the base) and sampling fields; one JSON
    /// result line per request, in input order.
    #[arg(long)]
    pub requests: Option<PathBuf>,
    /// Render the prompt as one user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object with the text, token ids and timings instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// Sampling defaults for every request (a requests line may override them).
#[derive(Debug, Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Report log-probabilities with this many alternatives per token (JSON output).
    #[arg(long)]
    pub logprobs: Option<usize>,
}

/// One line of a `--requests` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    id: Value,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    adapter: Option<Value>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopField>,
    ignore_eos: Option<bool>,
    logprobs: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    // Read and check the requests before loading anything heavy.
    let lines = match &args.requests {
        Some(path) => Some(read_lines(path)?),
        None => None,
    };
    args.model.init_threads()?;
    let config = args.engine.config(args.model.dtype)?;
    let base = args.model.load_base(&config)?;
    let run_adapters = args.adapters.open_for_run(base.model.clone())?;
    let cache = Some(run_adapters.cache.clone());
    let engine = Engine::start(base.model.clone(), base.tokenizer.clone(), config, cache)?;
    let mut adapters = Adapters::new(&base, run_adapters);
    match lines {
        Some(lines) => run_batch(&args, &base, &engine, &mut adapters, lines),
        None => run_single(&args, &base, &engine, &mut adapters),
    }
}

/// Resolves the adapters a run names, each validated against the base before the run: names are
/// looked up in the store; a directory given with `--adapter` is loaded here, and directories
/// named by request lines are registered with the run's cache, which loads them as requests need
/// them (so a file naming many directories holds no more of them than `--adapter-cache-bytes`).
struct Adapters {
    model: Arc<crate::model::Llama>,
    run: RunAdapters,
    registered: HashMap<PathBuf, AdapterId>,
}

impl Adapters {
    fn new(base: &Base, run: RunAdapters) -> Self {
        Self { model: base.model.clone(), run, registered: HashMap::new() }
    }

    /// `--adapter`: a directory is loaded at once.
    fn resolve(&mut self, reference: &str) -> anyhow::Result<AdapterChoice> {
        let dir = Path::new(reference);
        if dir.is_dir() {
            let adapter = crate::adapter_host::load_dir_validated(&self.model, dir)
                .with_context(|| format!("adapter {}", dir.display()))?;
            return Ok(AdapterChoice::Loaded(Arc::new(adapter)));
        }
        self.resolve_name(reference)
    }

    /// A request line's `adapter`: a directory is served through the cache.
    fn resolve_line(&mut self, reference: &str) -> anyhow::Result<AdapterChoice> {
        let dir = Path::new(reference);
        if !dir.is_dir() {
            return self.resolve_name(reference);
        }
        if let Some(&id) = self.registered.get(dir) {
            return Ok(AdapterChoice::Cached(id));
        }
        let id =
            self.run.dirs.register(&self.model, dir).with_context(|| format!("adapter {}", dir.display()))?;
        self.registered.insert(dir.to_path_buf(), id);
        Ok(AdapterChoice::Cached(id))
    }

    fn resolve_name(&self, reference: &str) -> anyhow::Result<AdapterChoice> {
        let Some(store) = &self.run.store else {
            bail!("adapter `{reference}` is not a directory (give a PEFT adapter directory, or --adapters-dir to use names)")
        };
        let key = AdapterKey::in_default_tenant(reference)
            .map_err(|e| anyhow::anyhow!("adapter `{reference}`: {e}"))?;
        match store.get(&key) {
            Some(stored) => Ok(AdapterChoice::Cached(stored.id)),
            None => {
                bail!("adapter `{reference}` is neither a directory nor a name in {}", store.root().display())
            }
        }
    }
}

/// The file's lines; one that is not UTF-8 is kept as an error, for its line alone to fail.
fn read_lines(path: &PathBuf) -> anyhow::Result<Vec<Result<String, std::string::FromUtf8Error>>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let lines = std::io::BufReader::new(file)
        .split(b'\n')
        .map(|line| {
            line.map(|mut bytes| {
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
                String::from_utf8(bytes)
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(lines)
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            top_logprobs: self.logprobs,
        }
    }

    fn stop(&self) -> StopCriteria {
        StopCriteria { max_tokens: self.max_tokens, stop: self.stop.clone(), ignore_eos: self.ignore_eos }
    }
}

fn run_single(
    args: &GenerateArgs,
    base: &Base,
    engine: &Engine,
    adapters: &mut Adapters,
) -> anyhow::Result<()> {
    let Some(prompt) = &args.prompt else { bail!("give --prompt or --requests") };
    let prompt_ids = if args.chat {
        base.chat_prompt(&[ChatMessage { role: "user".into(), content: prompt.clone() }])?
    } else {
        base.tokenizer.encode(prompt)?
    };
    let sampling = args.sampling.params();
    sampling.validate().map_err(anyhow::Error::msg)?;
    let adapter = match &args.adapter {
        Some(reference) => Some(adapters.resolve(&reference.to_string_lossy())?),
        None => None,
    };
    let req = ValidRequest { prompt_ids, sampling, stop: args.sampling.stop(), adapter };
    let mut events = engine.submit(req.clone())?;
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let result = collect(&mut events, |text| {
        if stream {
            let _ = write!(stdout, "{text}");
            let _ = stdout.flush();
        }
    })?;
    if args.json {
        writeln!(stdout, "{}", result.to_json(&req.prompt_ids, args.sampling.logprobs.is_some()))?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

/// Everything a finished request produced.
#[derive(Debug, Default)]
pub struct Output {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<Value>,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Output {
    fn to_json(&self, prompt_ids: &[u32], with_logprobs: bool) -> Value {
        let mut v = json!({
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": self.finish_reason.map(FinishReason::as_openai),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
        });
        if with_logprobs {
            v["logprobs"] = Value::Array(self.logprobs.clone());
        }
        v
    }

    /// Folds one event in; returns whether the request is over.
    fn absorb(&mut self, event: TokenEvent, on_text: &mut impl FnMut(&str)) -> anyhow::Result<bool> {
        match event {
            TokenEvent::Token(t) => {
                on_text(&t.text);
                self.text.push_str(&t.text);
                self.token_ids.push(t.id);
                if let Some(lp) = t.logprob {
                    let top: Vec<Value> =
                        t.top_logprobs.iter().map(|c| json!({"id": c.id, "logprob": c.logprob})).collect();
                    self.logprobs.push(json!({"id": t.id, "logprob": lp, "top_logprobs": top}));
                }
                Ok(false)
            }
            TokenEvent::Finished(c) => {
                on_text(&c.trailing_text);
                self.text.push_str(&c.trailing_text);
                self.finish_reason = Some(c.reason);
                self.prompt_tokens = c.prompt_tokens;
                self.completion_tokens = c.completion_tokens;
                self.prefill_seconds = c.prefill_time.as_secs_f64();
                self.decode_seconds = c.decode_time.as_secs_f64();
                Ok(true)
            }
            TokenEvent::Failed(msg) => bail!("generation failed: {msg}"),
        }
    }
}

/// Reads a request's events to the end.
pub fn collect(
    events: &mut UnboundedReceiver<TokenEvent>,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<Output> {
    let mut out = Output::default();
    loop {
        let event = events.blocking_recv().context("the engine stopped before the request finished")?;
        if out.absorb(event, &mut on_text)? {
            return Ok(out);
        }
    }
}

/// A request line after validation, or why it was rejected.
enum Prepared {
    Ready { id: Value, req: ValidRequest, logprobs: bool },
    Rejected { id: Value, error: String },
}

fn prepare(
    line_no: usize,
    line: &str,
    args: &GenerateArgs,
    base: &Base,
    adapters: &mut Adapters,
) -> Prepared {
    let parsed: RequestLine = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            // The line's `id`, when it has one, so the error can be matched to its request.
            let id = serde_json::from_str::<Value>(line).ok().and_then(|v| v.get("id").cloned());
            return Prepared::Rejected {
                id: id.unwrap_or(Value::Null),
                error: format!("line {line_no}: malformed request: {e}"),
            };
        }
    };
    let id = parsed.id.clone();
    match validate_line(parsed, args, base, adapters) {
        Ok((req, logprobs)) => Prepared::Ready { id, req, logprobs },
        // `{:#}`: the whole chain of causes (why the adapter did not load, not only which).
        Err(e) => Prepared::Rejected { id, error: format!("line {line_no}: {e:#}") },
    }
}

fn validate_line(
    r: RequestLine,
    args: &GenerateArgs,
    base: &Base,
    adapters: &mut Adapters,
) -> anyhow::Result<(ValidRequest, bool)> {
    let adapter = match &r.adapter {
        None | Some(Value::Null) => None,
        Some(Value::String(reference)) => Some(adapters.resolve_line(reference)?),
        Some(other) => bail!("`adapter` must be a string or null, got {other}"),
    };
    let prompt_ids = match (&r.prompt, &r.messages) {
        (Some(p), None) => base.tokenizer.encode(p)?,
        (None, Some(m)) => base.chat_prompt(m)?,
        _ => bail!("give exactly one of `prompt` and `messages`"),
    };
    let d = &args.sampling;
    let sampling = SamplingParams {
        temperature: r.temperature.unwrap_or(d.temperature),
        top_p: r.top_p.unwrap_or(d.top_p),
        top_k: r.top_k.unwrap_or(d.top_k),
        min_p: r.min_p.unwrap_or(d.min_p),
        repetition_penalty: r.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: r.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: r.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: r.seed.or(d.seed),
        top_logprobs: r.logprobs.or(d.logprobs),
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let stop = StopCriteria {
        max_tokens: r.max_tokens.unwrap_or(d.max_tokens),
        stop: match r.stop {
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
            None => d.stop.clone(),
        },
        ignore_eos: r.ignore_eos.unwrap_or(d.ignore_eos),
    };
    let logprobs = sampling.top_logprobs.is_some();
    Ok((ValidRequest { prompt_ids, sampling, stop, adapter }, logprobs))
}

enum Slot {
    Running {
        id: Value,
        /// The request's line in the file, for the errors of its run.
        line: usize,
        prompt_ids: Vec<u32>,
        events: UnboundedReceiver<TokenEvent>,
        out: Output,
        logprobs: bool,
    },
    Done(Value),
}

fn run_batch(
    args: &GenerateArgs,
    base: &Base,
    engine: &Engine,
    adapters: &mut Adapters,
    lines: Vec<Result<String, std::string::FromUtf8Error>>,
) -> anyhow::Result<()> {
    let mut slots = Vec::new();
    let mut failures = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let line = match line {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => line,
            Err(e) => {
                let error = format!("line {}: not UTF-8 text ({e})", i + 1);
                slots.push(Slot::Done(rejected(&mut failures, Value::Null, error)));
                continue;
            }
        };
        let slot = match prepare(i + 1, line, args, base, adapters) {
            Prepared::Ready { id, req, logprobs } => {
                let prompt_ids = req.prompt_ids.clone();
                match engine.submit(req) {
                    Ok(events) => Slot::Running {
                        id,
                        line: i + 1,
                        prompt_ids,
                        events,
                        out: Output::default(),
                        logprobs,
                    },
                    Err(e) => Slot::Done(rejected(&mut failures, id, format!("line {}: {e}", i + 1))),
                }
            }
            Prepared::Rejected { id, error } => Slot::Done(rejected(&mut failures, id, error)),
        };
        slots.push(slot);
    }
    let running = slots.iter().filter(|s| matches!(s, Slot::Running { .. })).count() as u64;
    let bar = indicatif::ProgressBar::new(running);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} requests, {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut generated = 0usize;
    let started = std::time::Instant::now();
    let mut open = running;
    while open > 0 {
        let mut progressed = false;
        for slot in slots.iter_mut() {
            let Slot::Running { id, line, prompt_ids, events, out, logprobs } = slot else { continue };
            loop {
                match events.try_recv() {
                    Ok(event) => {
                        progressed = true;
                        if matches!(event, TokenEvent::Token(_)) {
                            generated += 1;
                        }
                        match out.absorb(event, &mut |_| {}) {
                            Ok(false) => continue,
                            Ok(true) => {
                                let mut v = out.to_json(prompt_ids, *logprobs);
                                v["id"] = id.clone();
                                *slot = Slot::Done(v);
                            }
                            Err(e) => {
                                let error = format!("line {line}: {e}");
                                *slot = Slot::Done(rejected(&mut failures, id.clone(), error))
                            }
                        }
                        open -= 1;
                        bar.inc(1);
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        let error = format!("line {line}: the engine stopped");
                        *slot = Slot::Done(rejected(&mut failures, id.clone(), error));
                        open -= 1;
                        break;
                    }
                }
            }
        }
        let rate = generated as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{generated} tokens, {rate:.1} tok/s"));
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    bar.finish_and_clear();
    let mut stdout = std::io::stdout().lock();
    for slot in &slots {
        if let Slot::Done(v) = slot {
            writeln!(stdout, "{v}")?;
        }
    }
    if failures > 0 {
        bail!("{failures} of {} requests failed (see their `error` fields)", slots.len());
    }
    Ok(())
}

fn rejected(failures: &mut usize, id: Value, error: String) -> Value {
    eprintln!("error: {error}");
    *failures += 1;
    json!({"id": id, "error": error})
}
