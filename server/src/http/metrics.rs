//! The server's counters and histograms, and `/metrics` in the Prometheus text format (written
//! by hand: a handful of families does not need a client library).
//!
//! Request-level series are labelled by tenant and model (base or adapter name; an adapter's go
//! when it is deleted); engine and adapter-cache gauges are read from their owners when scraped.

use crate::engine::EngineStats;
use crate::jobs::{JobCounts, JobStatus};
use adapters::cache::{CacheStats, LOAD_LATENCY_BOUNDS_SECONDS};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Bucket bounds (seconds) of the time-to-first-token and end-to-end histograms.
const LATENCY_BOUNDS: [f64; 14] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0];
/// Bucket bounds (seconds) of the time-per-output-token histogram.
const TOKEN_BOUNDS: [f64; 12] = [0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0];

/// How a generation request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Finished,
    /// The client went away (or the server cancelled at the shutdown deadline).
    Cancelled,
    TimedOut,
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timeout",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, seconds: f64) {
        let i = self.bounds.iter().position(|&b| seconds <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// Labels of request-level series: (tenant, model).
type Who = (String, String);

/// One adapter's share of the request-level series, since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Generation requests that named it, whatever their outcome.
    pub requests: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
}

#[derive(Debug)]
struct Inner {
    responses: BTreeMap<(&'static str, u16), u64>,
    requests: BTreeMap<(String, String, Outcome), u64>,
    prompt_tokens: BTreeMap<Who, u64>,
    generated_tokens: BTreeMap<Who, u64>,
    uploads: BTreeMap<(String, u16), u64>,
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
}

/// Everything `/metrics` reports that the HTTP layer itself counts.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                responses: BTreeMap::new(),
                requests: BTreeMap::new(),
                prompt_tokens: BTreeMap::new(),
                generated_tokens: BTreeMap::new(),
                uploads: BTreeMap::new(),
                ttft: Histogram::new(&LATENCY_BOUNDS),
                tpot: Histogram::new(&TOKEN_BOUNDS),
                e2e: Histogram::new(&LATENCY_BOUNDS),
            }),
        }
    }
}

/// The (tenant, name) of the adapter a request series names: a `model` label `tenant/name` (an
/// admin naming another tenant's adapter) is that tenant's adapter, a plain one the caller's own.
fn adapter_of<'a>(tenant: &'a str, model: &'a str) -> (&'a str, &'a str) {
    model.split_once('/').unwrap_or((tenant, model))
}

/// What one finished (or abandoned) generation request reports.
#[derive(Debug, Clone)]
pub struct RequestReport {
    pub tenant: String,
    pub model: String,
    pub outcome: Outcome,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token: Option<Duration>,
    /// From the first token to the last; with `generated_tokens` gives the time per token.
    pub decode_time: Duration,
    pub total: Duration,
    /// Whether the request counts in the series labelled with `model` (the latency histograms
    /// have no model label and count it either way).
    pub count_model: bool,
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a few additions: the state is consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An HTTP response went out for `route` (a route template, never a raw path).
    pub fn response(&self, route: &'static str, status: u16) {
        *self.lock().responses.entry((route, status)).or_default() += 1;
    }

    pub fn upload(&self, tenant: &str, status: u16) {
        *self.lock().uploads.entry((tenant.to_string(), status)).or_default() += 1;
    }

    pub fn request(&self, r: &RequestReport) {
        let mut m = self.lock();
        if r.count_model {
            let who = (r.tenant.clone(), r.model.clone());
            *m.requests.entry((r.tenant.clone(), r.model.clone(), r.outcome)).or_default() += 1;
            *m.prompt_tokens.entry(who.clone()).or_default() += r.prompt_tokens as u64;
            *m.generated_tokens.entry(who).or_default() += r.generated_tokens as u64;
        }
        if r.outcome != Outcome::Finished {
            return;
        }
        if let Some(t) = r.time_to_first_token {
            m.ttft.observe(t.as_secs_f64());
        }
        if r.generated_tokens > 1 {
            m.tpot.observe(r.decode_time.as_secs_f64() / (r.generated_tokens - 1) as f64);
        }
        m.e2e.observe(r.total.as_secs_f64());
    }

    /// The request series folded by the adapter they name, keyed by (tenant, name): a `model`
    /// label `tenant/name` (an admin naming another tenant's adapter) counts for that tenant's
    /// adapter, a plain one for the caller's own. The base's series are there too, under its id.
    pub fn traffic_by_adapter(&self) -> HashMap<(String, String), Traffic> {
        let adapter_of = |tenant, model| {
            let (t, n) = adapter_of(tenant, model);
            (t.to_string(), n.to_string())
        };
        let m = self.lock();
        let mut out: HashMap<(String, String), Traffic> = HashMap::new();
        for ((tenant, model, _), v) in &m.requests {
            out.entry(adapter_of(tenant, model)).or_default().requests += v;
        }
        for ((tenant, model), v) in &m.prompt_tokens {
            out.entry(adapter_of(tenant, model)).or_default().prompt_tokens += v;
        }
        for ((tenant, model), v) in &m.generated_tokens {
            out.entry(adapter_of(tenant, model)).or_default().generated_tokens += v;
        }
        out
    }

    /// Drops the request series of a deleted adapter (`tenant`'s `name`, whoever named it), so
    /// the series stay bounded by the adapters stored rather than by every name ever served. A
    /// new adapter under the name starts from zero, as a counter reset.
    pub fn forget_adapter(&self, tenant: &str, name: &str) {
        let named = |t: &str, model: &str| adapter_of(t, model) == (tenant, name);
        let mut m = self.lock();
        m.requests.retain(|(t, model, _), _| !named(t, model));
        m.prompt_tokens.retain(|(t, model), _| !named(t, model));
        m.generated_tokens.retain(|(t, model), _| !named(t, model));
    }

    /// The Prometheus text exposition of everything, with the engine's and the adapter cache's
    /// state as of now.
    pub fn render(&self, engine: &EngineStats, cache: Option<&CacheStats>, adapters_stored: usize) -> String {
        let m = self.lock();
        let mut out = String::new();
        family(&mut out, "lorahost_http_responses_total", "counter", "HTTP responses by route and status.");
        for ((route, status), v) in &m.responses {
            sample(
                &mut out,
                "lorahost_http_responses_total",
                &[("route", route), ("status", &status.to_string())],
                *v,
            );
        }
        family(
            &mut out,
            "lorahost_requests_total",
            "counter",
            "Generation requests by tenant, model and outcome.",
        );
        for ((tenant, model, outcome), v) in &m.requests {
            let labels =
                [("tenant", tenant.as_str()), ("model", model.as_str()), ("outcome", outcome.label())];
            sample(&mut out, "lorahost_requests_total", &labels, *v);
        }
        for (name, help, map) in [
            ("lorahost_prompt_tokens_total", "Prompt tokens of generation requests.", &m.prompt_tokens),
            ("lorahost_generated_tokens_total", "Generated tokens.", &m.generated_tokens),
        ] {
            family(&mut out, name, "counter", help);
            for ((tenant, model), v) in map {
                sample(&mut out, name, &[("tenant", tenant), ("model", model)], *v);
            }
        }
        family(
            &mut out,
            "lorahost_adapter_uploads_total",
            "counter",
            "Adapter uploads by tenant and status.",
        );
        for ((tenant, status), v) in &m.uploads {
            sample(
                &mut out,
                "lorahost_adapter_uploads_total",
                &[("tenant", tenant), ("status", &status.to_string())],
                *v,
            );
        }
        histogram(
            &mut out,
            "lorahost_time_to_first_token_seconds",
            "From request arrival to the first token.",
            &m.ttft,
        );
        histogram(
            &mut out,
            "lorahost_time_per_output_token_seconds",
            "Decode time per token after the first.",
            &m.tpot,
        );
        histogram(
            &mut out,
            "lorahost_request_duration_seconds",
            "From request arrival to the last token.",
            &m.e2e,
        );
        drop(m);
        let gauges: [(&str, &str, u64); 7] = [
            ("lorahost_queue_depth", "New requests waiting for admission.", engine.queued as u64),
            (
                "lorahost_waiting_sequences",
                "Sequences not running (queued or preempted).",
                engine.waiting as u64,
            ),
            ("lorahost_running_sequences", "Sequences in the running batch.", engine.running as u64),
            (
                "lorahost_kv_blocks_in_use",
                "KV cache blocks held by sequences.",
                engine.total_blocks.saturating_sub(engine.free_blocks) as u64,
            ),
            ("lorahost_kv_blocks_total", "KV cache blocks.", engine.total_blocks as u64),
            ("lorahost_adapters_stored", "Named adapters in the store, all tenants.", adapters_stored as u64),
            (
                "lorahost_engine_preemptions",
                "Sequences preempted and recomputed since start.",
                engine.preemptions,
            ),
        ];
        for (name, help, v) in gauges {
            family(&mut out, name, "gauge", help);
            sample(&mut out, name, &[], v);
        }
        family(&mut out, "lorahost_engine_steps_total", "counter", "Forward steps run.");
        sample(&mut out, "lorahost_engine_steps_total", &[], engine.steps);
        if let Some(c) = cache {
            render_cache(&mut out, c);
        }
        out
    }
}

/// The fine-tuning families: jobs by status, a gauge of running jobs, trained tokens, files.
pub fn render_jobs(out: &mut String, counts: &JobCounts) {
    let name = "lorahost_fine_tuning_jobs";
    family(out, name, "gauge", "Fine-tuning jobs by status.");
    for status in JobStatus::ALL {
        let v = counts.by_status.get(&status).copied().unwrap_or(0);
        sample(out, name, &[("status", status.label())], v);
    }
    let running = counts.by_status.get(&JobStatus::Running).copied().unwrap_or(0);
    for (name, kind, help, v) in [
        ("lorahost_fine_tuning_jobs_running", "gauge", "Fine-tuning jobs training now.", running),
        (
            "lorahost_fine_tuning_trained_tokens_total",
            "counter",
            "Tokens learned from (loss targets) by fine-tuning jobs.",
            counts.trained_tokens,
        ),
        ("lorahost_fine_tuning_files", "gauge", "Files stored for fine-tuning, all tenants.", counts.files),
    ] {
        family(out, name, kind, help);
        sample(out, name, &[], v);
    }
}

fn render_cache(out: &mut String, c: &CacheStats) {
    for (name, help, v) in [
        ("lorahost_adapter_cache_hits_total", "Acquires that found the adapter resident.", c.hits),
        ("lorahost_adapter_cache_misses_total", "Acquires that started a load.", c.misses),
        ("lorahost_adapter_cache_loads_total", "Adapter loads that succeeded.", c.loads),
        ("lorahost_adapter_cache_load_failures_total", "Adapter loads that failed.", c.load_failures),
        ("lorahost_adapter_cache_evictions_total", "Adapters evicted to stay under the budget.", c.evictions),
        (
            "lorahost_adapter_cache_invalidations_total",
            "Adapters dropped after a delete or replace.",
            c.invalidations,
        ),
    ] {
        family(out, name, "counter", help);
        sample(out, name, &[("tier", "host")], v);
    }
    for (name, help, v) in [
        ("lorahost_adapter_cache_resident", "Adapters resident.", c.resident as u64),
        ("lorahost_adapter_cache_resident_bytes", "Bytes of resident adapters.", c.resident_bytes as u64),
        ("lorahost_adapter_cache_budget_bytes", "The cache budget.", c.budget_bytes as u64),
        ("lorahost_adapter_cache_pinned", "Resident adapters leased by running sequences.", c.pinned as u64),
        ("lorahost_adapter_cache_loading", "Adapter loads in flight.", c.loading as u64),
    ] {
        family(out, name, "gauge", help);
        sample(out, name, &[("tier", "host")], v);
    }
    let name = "lorahost_adapter_load_seconds";
    family(out, name, "histogram", "Time to load and validate an adapter into the cache.");
    let mut cumulative = 0;
    for (i, bound) in LOAD_LATENCY_BOUNDS_SECONDS.iter().enumerate() {
        cumulative += c.load_latency.counts[i];
        sample(out, &format!("{name}_bucket"), &[("tier", "host"), ("le", &bound.to_string())], cumulative);
    }
    sample(out, &format!("{name}_bucket"), &[("tier", "host"), ("le", "+Inf")], c.load_latency.count);
    let _ = writeln!(out, "{name}_sum{{tier=\"host\"}} {}", c.load_latency.sum_seconds);
    sample(out, &format!("{name}_count"), &[("tier", "host")], c.load_latency.count);
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let mut cumulative = 0;
    for (i, bound) in h.bounds.iter().enumerate() {
        cumulative += h.counts[i];
        sample(out, &format!("{name}_bucket"), &[("le", &bound.to_string())], cumulative);
    }
    sample(out, &format!("{name}_bucket"), &[("le", "+Inf")], h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    sample(out, &format!("{name}_count"), &[], h.count);
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_escaped_labels() {
        let m = Metrics::default();
        m.response("/v1/completions", 200);
        m.request(&RequestReport {
            tenant: "t\"1".into(),
            model: "base".into(),
            outcome: Outcome::Finished,
            prompt_tokens: 5,
            generated_tokens: 3,
            time_to_first_token: Some(Duration::from_millis(30)),
            decode_time: Duration::from_millis(40),
            total: Duration::from_millis(70),
            count_model: true,
        });
        let engine = EngineStats { total_blocks: 10, free_blocks: 7, running: 1, ..Default::default() };
        let text = m.render(&engine, None, 0);
        assert!(text.contains("lorahost_http_responses_total{route=\"/v1/completions\",status=\"200\"} 1"));
        assert!(
            text.contains("lorahost_requests_total{tenant=\"t\\\"1\",model=\"base\",outcome=\"finished\"} 1")
        );
        assert!(text.contains("lorahost_generated_tokens_total{tenant=\"t\\\"1\",model=\"base\"} 3"));
        assert!(text.contains("lorahost_time_to_first_token_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("lorahost_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("lorahost_time_per_output_token_seconds_bucket{le=\"0.02\"} 1"), "{text}");
        assert!(text.contains("lorahost_kv_blocks_in_use 3"));
        assert!(text.contains("lorahost_running_sequences 1"));
    }

    #[test]
    fn traffic_folds_outcomes_and_admin_names_into_the_adapter() {
        let m = Metrics::default();
        let report = |tenant: &str, model: &str, outcome, generated_tokens| RequestReport {
            tenant: tenant.into(),
            model: model.into(),
            outcome,
            prompt_tokens: 2,
            generated_tokens,
            time_to_first_token: None,
            decode_time: Duration::ZERO,
            total: Duration::ZERO,
            count_model: true,
        };
        m.request(&report("alice", "lora", Outcome::Finished, 3));
        m.request(&report("alice", "lora", Outcome::Cancelled, 1));
        m.request(&report("ops", "alice/lora", Outcome::Finished, 5));
        m.request(&report("bob", "lora", Outcome::Finished, 7));
        let t = m.traffic_by_adapter();
        let alice = t[&("alice".to_string(), "lora".to_string())];
        assert_eq!(alice, Traffic { requests: 3, prompt_tokens: 6, generated_tokens: 9 });
        assert_eq!(t[&("bob".to_string(), "lora".to_string())].requests, 1);
        assert!(!t.contains_key(&("ops".to_string(), "alice/lora".to_string())));

        // Deleting alice's adapter drops its series, however it was named, and no one else's.
        m.forget_adapter("alice", "lora");
        let t = m.traffic_by_adapter();
        assert!(!t.contains_key(&("alice".to_string(), "lora".to_string())), "{t:?}");
        assert_eq!(t[&("bob".to_string(), "lora".to_string())].generated_tokens, 7);
        let text = m.render(&EngineStats::default(), None, 0);
        assert!(!text.contains("alice"), "{text}");
    }
}
