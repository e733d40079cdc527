//! Wiring: settings from the command line / environment, the store, the worker pool, the HTTP
//! router, and graceful shutdown.

use crate::config::Precision;
use crate::data_dir_lock::{self, DataDirLock, LockError};
use crate::http::{self, AppState, HttpStats, Settings};
use crate::infer::{BatcherConfig, CacheConfig, ModelCache};
use crate::store::Store;
use crate::worker::{parse_devices, DeviceSpec, PoolConfig, PoolHandle, ProcessTrainer, Trainer};
use anyhow::Context;
use axum::Router;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// `ampserve serve` options; each also comes from an `AMPSERVE_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory for the SQLite database, run directories and uploaded corpora.
    #[arg(long, env = "AMPSERVE_DATA_DIR", default_value = "./ampserve-data")]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "AMPSERVE_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Training devices, one worker each: `cpu`, `cuda:0`, ... (comma-separated or repeated).
    /// Default: every CUDA device when built with `cuda`, else one CPU worker.
    #[arg(long = "devices", env = "AMPSERVE_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Directory corpus paths must lie in (repeatable); relative corpus paths (the presets') are
    /// looked up in each. Default: the bundled sample corpora `./data` (the repository's).
    /// `<data-dir>/corpora` is always allowed.
    #[arg(long = "data-root", env = "AMPSERVE_DATA_ROOTS", value_delimiter = ',')]
    pub data_roots: Vec<PathBuf>,
    /// When set, mutating endpoints require `Authorization: Bearer <token>`.
    #[arg(long, env = "AMPSERVE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Require the token for reads too.
    #[arg(long, env = "AMPSERVE_PROTECT_READS")]
    pub protect_reads: bool,
    /// Where `config: "<name>"` in a job request finds `<name>.toml`.
    #[arg(long, env = "AMPSERVE_CONFIGS_DIR", default_value = "configs")]
    pub configs_dir: PathBuf,
    /// Largest corpus upload, in MiB.
    #[arg(long, env = "AMPSERVE_MAX_UPLOAD_MB", default_value_t = 256)]
    pub max_upload_mb: u64,
    /// Device for translation: `cpu`, `cuda:N`, or `auto` (the first CUDA training device,
    /// else the CPU).
    #[arg(long, env = "AMPSERVE_TRANSLATE_DEVICE", default_value = "auto")]
    pub translate_device: String,
    /// Compute dtype for translation: `auto` (f16 on CUDA, f32 on CPU), `fp32`, `f16`, `bf16`.
    /// Weights are stored f16 either way.
    #[arg(long, env = "AMPSERVE_TRANSLATE_COMPUTE", default_value = "auto")]
    pub translate_compute: String,
    /// Models kept loaded for translation (least recently used unloaded first).
    #[arg(long, env = "AMPSERVE_MAX_LOADED_MODELS", default_value_t = 4)]
    pub max_loaded_models: usize,
    /// Translation requests that may wait per model before new ones get 429.
    #[arg(long, env = "AMPSERVE_TRANSLATE_QUEUE", default_value_t = 64)]
    pub translate_queue: usize,
    /// Refuse (422) jobs whose estimated memory exceeds this (e.g. `8GiB`). Default: the memory
    /// available when the job is submitted (MemAvailable, or the cgroup limit when lower).
    #[arg(long, env = "AMPSERVE_MAX_JOB_MEMORY", value_parser = crate::memory::parse_bytes)]
    pub max_job_memory: Option<u64>,
    /// Budget of one translation decode call, in source tokens × beam size; larger requests are
    /// split across calls, and a single text above it gets 422.
    #[arg(long, env = "AMPSERVE_TRANSLATE_BATCH_TOKENS", default_value_t = 8192)]
    pub translate_batch_tokens: usize,
    /// Seconds a request may take before it gets 408 (its translation, if queued, is dropped).
    #[arg(
        long = "request-timeout",
        env = "AMPSERVE_REQUEST_TIMEOUT",
        default_value_t = 120
    )]
    pub request_timeout_s: u64,
    /// Host names (optionally `host:port`) the server answers to, comma-separated; requests
    /// with another `Host` or `Origin` get 421/403 (DNS rebinding). Default: the loopback names
    /// when bound to a loopback address, else any host.
    #[arg(long, env = "AMPSERVE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Seconds a client has to send a request's headers (slowloris), and that an idle
    /// keep-alive connection stays open.
    #[arg(
        long = "header-timeout",
        env = "AMPSERVE_HEADER_TIMEOUT",
        default_value_t = 10
    )]
    pub header_timeout_s: u64,
    /// Open connections at most; further ones wait in the kernel's accept queue.
    #[arg(long, env = "AMPSERVE_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// A job whose training process crashed this many times (server crashes while it ran
    /// included) is failed instead of re-queued at start.
    #[arg(long, env = "AMPSERVE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// The job store: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`. Several nodes on one
    /// PostgreSQL database share one queue. Default: the SQLite file `<data-dir>/ampserve.db`.
    #[arg(long, env = "AMPSERVE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// This node's id in the shared store (the owner of the jobs it runs). Default: an id made
    /// once and kept in `<data-dir>/node-id` (`<host>-<random>`), so a restarted node is the
    /// same node.
    #[arg(long, env = "AMPSERVE_NODE_ID")]
    pub node_id: Option<String>,
    /// Seconds without a heartbeat after which another node may take over this node's jobs
    /// (they resume from their latest checkpoint). The heartbeat runs every third of it.
    #[arg(
        long = "lease-timeout",
        env = "AMPSERVE_LEASE_TIMEOUT",
        default_value_t = 30.0
    )]
    pub lease_timeout_s: f64,
    /// Where checkpoints and exported models are shared between nodes: a directory, or
    /// `s3://bucket/prefix` (credentials and endpoint from the AWS_* variables). Default: the
    /// data directory itself (nothing is copied).
    #[arg(long, env = "AMPSERVE_ARTIFACT_STORE")]
    pub artifact_store: Option<String>,
    /// The URL of this node's API as others reach it, listed by `GET /api/nodes`.
    #[arg(long, env = "AMPSERVE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
}

impl Default for ServeArgs {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./ampserve-data"),
            bind: "127.0.0.1:8080".into(),
            devices: Vec::new(),
            data_roots: Vec::new(),
            api_token: None,
            protect_reads: false,
            configs_dir: PathBuf::from("configs"),
            max_upload_mb: 256,
            translate_device: "auto".into(),
            translate_compute: "auto".into(),
            max_loaded_models: 4,
            translate_queue: 64,
            max_job_memory: None,
            translate_batch_tokens: 8192,
            request_timeout_s: 120,
            allowed_hosts: Vec::new(),
            header_timeout_s: 10,
            max_connections: 512,
            max_attempts: 3,
            database_url: None,
            node_id: None,
            lease_timeout_s: 30.0,
            artifact_store: None,
            advertise_url: None,
        }
    }
}

/// JSON request bodies above this are refused with 413.
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// Everything `serve` runs, exposed so tests can drive the real router on a temporary
/// directory.
pub struct App {
    pub router: Router,
    /// Header timeout and connection cap for [`http::serve`].
    pub limits: http::ConnLimits,
    pub state: AppState,
    pub pool: PoolHandle,
    shutdown_tx: watch::Sender<bool>,
    /// Exclusive lock on `<data-dir>/ampserve.lock` for the life of the app: two servers on one
    /// data directory would re-queue each other's running jobs.
    _lock: DataDirLock,
}

impl App {
    /// End SSE streams (so an HTTP graceful shutdown can finish).
    pub fn stop_streams(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Graceful stop: end streams, let running jobs checkpoint and go back to `queued`, close
    /// the database.
    pub async fn shutdown(&self) {
        self.stop_streams();
        self.pool.shutdown().await;
        self.state.store.close().await;
    }
}

fn canonical_dir(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("data root {} is not accessible", p.display()))
}

pub async fn build_app(args: &ServeArgs, trainer: Arc<dyn Trainer>) -> anyhow::Result<App> {
    build_app_with(args, trainer, PoolConfig::default()).await
}

pub async fn build_app_with(
    args: &ServeArgs,
    trainer: Arc<dyn Trainer>,
    mut pool_config: PoolConfig,
) -> anyhow::Result<App> {
    if args
        .api_token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        anyhow::bail!("--api-token (AMPSERVE_API_TOKEN) is empty; give a token or leave it unset");
    }
    if args.max_attempts == 0 {
        anyhow::bail!("--max-attempts must be at least 1");
    }
    pool_config.max_attempts = args.max_attempts;
    let devices = parse_devices(&args.devices)?;
    let models = Arc::new(model_cache(args, &devices)?);
    let data_dir = &args.data_dir;
    let corpora_dir = data_dir.join("corpora");
    let runs_dir = data_dir.join("runs");
    for d in [data_dir, &corpora_dir, &runs_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let lock = data_dir_lock::lock(data_dir).map_err(|e| match e {
        LockError::Busy { dir, source } => anyhow::anyhow!(
            "another ampserve is using the data directory {} ({source})",
            dir.display()
        ),
        e => e.into(),
    })?;
    let data_dir = lock.dir.clone();
    // Nothing writes yet (we hold the lock): what a crash left half-written goes now.
    let swept = crate::tempfiles::sweep(&data_dir, 3);
    if !swept.is_empty() {
        tracing::warn!(count = swept.len(), "removed leftovers of an earlier crash");
    }
    let corpora_dir = canonical_dir(&corpora_dir)?;
    let runs_dir = canonical_dir(&runs_dir)?;
    let mut roots = vec![corpora_dir.clone()];
    if args.data_roots.is_empty() {
        let bundled = Path::new(crate::config::BUNDLED_DATA_DIR);
        if bundled.is_dir() {
            roots.push(canonical_dir(bundled)?);
        }
    } else {
        for r in &args.data_roots {
            roots.push(canonical_dir(r)?);
        }
    }
    roots.dedup();

    let store = match &args.database_url {
        Some(url) => Store::connect(url)
            .await
            .with_context(|| format!("cannot open the database {}", redact_url(url)))?,
        None => {
            let db_path = data_dir.join("ampserve.db");
            Store::open(&db_path)
                .await
                .with_context(|| format!("cannot open the database {}", db_path.display()))?
        }
    };
    if !(args.lease_timeout_s.is_finite() && args.lease_timeout_s >= 0.3) {
        anyhow::bail!("--lease-timeout must be at least 0.3 seconds");
    }
    pool_config.lease_timeout = Duration::from_secs_f64(args.lease_timeout_s);
    pool_config.node_id = match &args.node_id {
        Some(id) if !id.trim().is_empty() => id.trim().to_string(),
        Some(_) => anyhow::bail!("--node-id is empty; give an id or leave it unset"),
        None => stable_node_id(&data_dir)?,
    };
    pool_config.advertise_url = args.advertise_url.clone();
    pool_config.artifacts = match &args.artifact_store {
        Some(url) if !same_dir(url, &data_dir) => Some(
            crate::artifacts::ArtifactStore::open(url)
                .with_context(|| format!("--artifact-store {url}"))?,
        ),
        _ => None,
    };
    let pool = PoolHandle::start(store.clone(), trainer, devices, runs_dir, pool_config).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let settings = Settings {
        data_dir,
        corpora_dir,
        data_roots: roots,
        configs_dir: args.configs_dir.clone(),
        api_token: args.api_token.clone(),
        protect_reads: args.protect_reads,
        max_json_bytes: MAX_JSON_BYTES,
        max_upload_bytes: args.max_upload_mb.saturating_mul(1 << 20),
        request_timeout: Duration::from_secs(args.request_timeout_s.max(1)),
        max_job_memory: args.max_job_memory,
        allowed_hosts: allowed_hosts(args),
    };
    let state = AppState {
        store,
        pool: pool.clone(),
        settings: Arc::new(settings),
        stats: Arc::new(HttpStats::default()),
        shutdown: shutdown_rx,
        models,
    };
    let router = http::router(state.clone());
    Ok(App {
        router,
        limits: http::ConnLimits {
            header_timeout: Duration::from_secs(args.header_timeout_s.max(1)),
            max_connections: args.max_connections.max(1),
        },
        state,
        pool,
        shutdown_tx,
        _lock: lock,
    })
}

/// The node id kept in `<data-dir>/node-id`, made on first start.
fn stable_node_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = format!(
        "{}-{:08x}",
        crate::worker::host_name(),
        rand::random::<u32>()
    );
    crate::checkpoint::write_atomic(&path, id.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Is the artifact store URL the data directory itself (then nothing needs copying)?
fn same_dir(url: &str, data_dir: &Path) -> bool {
    !url.contains("://") && std::fs::canonicalize(url).is_ok_and(|p| p == data_dir)
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `--allowed-hosts`, else the loopback names when bound to a loopback address (the case DNS
/// rebinding attacks), else any host.
fn allowed_hosts(args: &ServeArgs) -> Option<Vec<String>> {
    if !args.allowed_hosts.is_empty() {
        return Some(
            args.allowed_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        );
    }
    let host = http_host_of(&args.bind);
    let loopback = host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback.then(|| http::LOOPBACK_HOSTS.iter().map(|s| s.to_string()).collect())
}

/// The host of a bind address such as `127.0.0.1:8080` or `[::1]:80`.
fn http_host_of(bind: &str) -> &str {
    match bind.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => bind,
    }
}

/// The translation model cache on the translation device.
fn model_cache(args: &ServeArgs, devices: &[DeviceSpec]) -> anyhow::Result<ModelCache> {
    let spec = match args.translate_device.as_str() {
        "auto" | "" => devices
            .iter()
            .find(|d| matches!(d, DeviceSpec::Cuda(_)))
            .copied()
            .unwrap_or(DeviceSpec::Cpu),
        other => other
            .parse::<DeviceSpec>()
            .with_context(|| "--translate-device".to_string())?,
    };
    let device = spec.open()?;
    let compute = match args.translate_compute.as_str() {
        "auto" | "" => None,
        other => Some(
            other
                .parse::<Precision>()
                .map_err(|e| anyhow::anyhow!("--translate-compute: {}", e.message))?,
        ),
    };
    if args.max_loaded_models == 0 || args.translate_queue == 0 {
        anyhow::bail!("--max-loaded-models and --translate-queue must be at least 1");
    }
    if args.translate_batch_tokens < 64 {
        anyhow::bail!("--translate-batch-tokens must be at least 64");
    }
    Ok(ModelCache::new(
        device,
        CacheConfig {
            max_models: args.max_loaded_models,
            compute,
            batcher: BatcherConfig {
                queue_capacity: args.translate_queue,
                max_batch_tokens: args.translate_batch_tokens,
                ..BatcherConfig::default()
            },
            ..CacheConfig::default()
        },
    ))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Run the server until Ctrl-C / SIGTERM; running jobs then checkpoint and go back to `queued`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Each job in its own process of this binary: a job that dies takes only itself down.
    let trainer = ProcessTrainer::current_exe().context("cannot find the ampserve executable")?;
    let app = build_app(&args, Arc::new(trainer)).await?;
    let listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .with_context(|| format!("cannot listen on {}", args.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        data_dir = %app.state.settings.data_dir.display(),
        devices = ?app.pool.devices().iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        roots = ?app.state.settings.data_roots,
        "ampserve listening on http://{addr}/ (API under http://{addr}/api/jobs)"
    );
    let stop = app.shutdown_tx.clone();
    http::serve(listener, app.router.clone(), app.limits, async move {
        shutdown_signal().await;
        tracing::info!("shutting down: running jobs will checkpoint and be re-queued");
        let _ = stop.send(true);
    })
    .await?;
    app.shutdown().await;
    tracing::info!("bye");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn serve_args_defaults_and_lists() {
        let d = Cli::parse_from(["ampserve"]).serve;
        assert_eq!(d.data_dir, PathBuf::from("./ampserve-data"));
        assert_eq!(d.bind, "127.0.0.1:8080");
        assert!(d.devices.is_empty() && d.data_roots.is_empty() && d.api_token.is_none());
        assert!(!d.protect_reads);
        let a = Cli::parse_from([
            "ampserve",
            "--devices",
            "cpu,cpu",
            "--data-root",
            "/a",
            "--data-root",
            "/b",
            "--api-token",
            "t",
            "--protect-reads",
        ])
        .serve;
        assert_eq!(a.devices, ["cpu", "cpu"]);
        assert_eq!(a.data_roots, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(a.api_token.as_deref(), Some("t"));
        assert!(a.protect_reads);
    }
}
