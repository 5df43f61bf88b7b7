//! `lorahost serve`: load the base, open the adapter store, start the engine and serve the
//! OpenAI-compatible API until SIGTERM or ctrl-c, then drain.

use super::{AdapterArgs, EngineArgs, ModelArgs};
use crate::engine::Engine;
use crate::http::{self, AdapterPublisher, AppParts, AppState, Auth, EngineBackend, Limits};
use crate::jobs::{self, BaseTrainer, Jobs, JobsConfig};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "LORAHOST_HOST")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed at start).
    #[arg(long, default_value_t = 8080, env = "LORAHOST_PORT")]
    pub port: u16,
    /// TOML file of API keys: `[[keys]]` tables with `key`, `tenant` and optional `admin = true`,
    /// and optional `[tenants.NAME]` quota tables. Without it the server is open: every caller is
    /// the tenant `default`.
    #[arg(long, env = "LORAHOST_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// New requests allowed to wait for admission; beyond it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Largest adapter upload (config plus weights), in bytes; larger uploads get 413.
    #[arg(long, default_value_t = http::DEFAULT_MAX_ADAPTER_BYTES)]
    pub max_adapter_bytes: usize,
    /// Uploads (adapters, training files) received at once; each holds its body in memory, and
    /// more get 429 with Retry-After.
    #[arg(long, default_value_t = http::DEFAULT_MAX_UPLOADS, value_parser = at_least_one)]
    pub max_uploads: usize,
    /// Seconds a generation request may take before it is cancelled (503).
    #[arg(long, default_value_t = http::DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub request_timeout: u64,
    /// Seconds requests in flight may take to finish after SIGTERM or ctrl-c before they are
    /// cancelled.
    #[arg(long, default_value_t = http::DEFAULT_SHUTDOWN_TIMEOUT.as_secs())]
    pub shutdown_timeout: u64,
    /// Compute threads of fine-tuning jobs, apart from serving's (jobs run one at a time).
    #[arg(long, default_value_t = 1, env = "LORAHOST_TRAIN_THREADS")]
    pub train_threads: usize,
    /// Where uploaded training files and fine-tuning jobs are kept (default: `jobs/` in the
    /// adapters directory).
    #[arg(long, env = "LORAHOST_JOBS_DIR")]
    pub jobs_dir: Option<PathBuf>,
    /// Largest training file upload (`/v1/files`), in bytes.
    #[arg(long, default_value_t = jobs::DEFAULT_MAX_FILE_BYTES)]
    pub max_file_bytes: usize,
    /// Seconds a client has to send a request's line and headers before it is disconnected.
    #[arg(long, default_value_t = http::DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    pub header_read_timeout: u64,
    /// Longest pause, in seconds, while a request body arrives before the request fails.
    #[arg(long, default_value_t = http::DEFAULT_BODY_READ_TIMEOUT.as_secs())]
    pub body_read_timeout: u64,
}

/// Where named adapters live without `--adapters-dir`: user data, not cache (uploads must
/// survive a cache clean).
/// A count that must be positive (`--max-uploads 0` would refuse every upload).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn default_adapters_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("lorahost").join("adapters");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".local").join("share").join("lorahost").join("adapters")
}

pub fn run(mut args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.max_waiting > 0, "--max-waiting must be positive");
    anyhow::ensure!(args.request_timeout > 0, "--request-timeout must be positive");
    anyhow::ensure!(args.header_read_timeout > 0, "--header-read-timeout must be positive");
    anyhow::ensure!(args.body_read_timeout > 0, "--body-read-timeout must be positive");
    anyhow::ensure!(args.train_threads > 0, "--train-threads must be positive");
    // Read the keys before loading anything heavy, so a bad file fails at once.
    let auth = match &args.api_keys {
        Some(path) => Auth::Keys(http::ApiKeys::load(path)?),
        None => Auth::Open,
    };
    args.model.init_threads()?;
    let config = args.engine.config(args.model.dtype)?;
    let base = args.model.load_base(&config)?;
    let adapters_dir = args.adapters.adapters_dir.get_or_insert_with(default_adapters_dir).clone();
    let jobs_dir = args.jobs_dir.clone().unwrap_or_else(|| adapters_dir.join("jobs"));
    let host = args.adapters.open(base.model.clone())?.context("the adapter store did not open")?;
    let engine = Engine::start(base.model.clone(), base.tokenizer.clone(), config, Some(host.cache.clone()))?
        .with_max_waiting(args.max_waiting);
    let backend = Arc::new(EngineBackend { base, engine });
    let limits = Limits {
        max_adapter_bytes: args.max_adapter_bytes,
        request_timeout: Duration::from_secs(args.request_timeout),
        max_file_bytes: args.max_file_bytes,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        body_read_timeout: Duration::from_secs(args.body_read_timeout),
        max_uploads: args.max_uploads,
    };
    let open = auth.is_open();
    let trainer = BaseTrainer::new(backend.clone(), args.train_threads).map_err(anyhow::Error::msg)?;
    let parts =
        AppParts { backend: backend.clone(), store: host.store, cache: Some(host.cache), auth, limits };
    let publisher = Arc::new(AdapterPublisher {
        backend: parts.backend.clone(),
        store: parts.store.clone(),
        cache: parts.cache.clone(),
        quotas: parts.auth.quotas(),
    });
    let jobs = Jobs::open(
        JobsConfig { dir: jobs_dir.clone(), base_id: backend.base.name.clone() },
        Arc::new(trainer),
        publisher,
    )
    .with_context(|| format!("opening the jobs directory {}", jobs_dir.display()))?;
    let state = AppState::with_jobs(parts, jobs.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lorahost-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let address = format!("{}:{}", args.host, args.port);
    let drain = Duration::from_secs(args.shutdown_timeout);
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        let local = listener.local_addr().context("reading the bound address")?;
        if open {
            tracing::warn!("no --api-keys: the server is open, every caller is the tenant `default`");
            eprintln!(
                "lorahost: warning: no --api-keys given, the server is open to anyone who can reach it"
            );
        }
        eprintln!("lorahost: serving {} on http://{local}", state.backend().model_id());
        http::serve(listener, state, shutdown_signal(), drain).await.context("serving")
    });
    // A job still training stops at its next step and is recorded as interrupted.
    jobs.shutdown();
    served?;
    eprintln!("lorahost: stopped");
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
