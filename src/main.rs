use clap::{Parser, Subcommand};

/// Training allocates and frees large activation and gradient buffers every step; glibc's
/// malloc returns them to the kernel (munmap + page faults + zeroing on every step). mimalloc
/// keeps them (tiny fp32 step, 2 cores: 1.9 s with glibc defaults, 1.5-1.7 s with mimalloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's option setter (in the statically linked libmimalloc; the Rust bindings for it sit
// behind libmimalloc-sys's `extended` feature). Indices from `mi_option_e` in the bundled v2
// `mimalloc.h` (libmimalloc-sys 0.1.49).
extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn mi_collect(force: bool);
}
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Even mimalloc purges freed pages after 10 ms by default, so every training step faulted its
/// buffers back in and the kernel zeroed them (tiny fp32: ~70k page faults in 4 steps, 15% of
/// the profile in page clearing). Never purging keeps them mapped for the next step (~850
/// faults); the resident size stays at the peak instead of shrinking between steps.
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: plain option setters on the linked allocator, called before any worker threads
    // exist; both options are read at each purge / arena creation.
    unsafe {
        mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
    }
}
/// The server must give memory back: a translation request can take gigabytes for a moment,
/// and with purging off that stays resident for good (issue 13, failure 2). So `serve` purges
/// freed pages after this delay, and an idle translation batcher forces the purge at once
/// ([`release_freed_pages`]). Training keeps its pages (the delay is read at every purge, so
/// jobs trained inside the server process see this delay; ones run in their own process keep
/// `keep_freed_pages`).
const SERVE_PURGE_DELAY_MS: std::ffi::c_long = 250;

fn serve_purges() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: as in `keep_freed_pages`.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, SERVE_PURGE_DELAY_MS) };
    ampserve::infer::set_release_memory(release_freed_pages);
}

/// Free the calling thread's empty pages and purge every freed arena range now.
fn release_freed_pages() {
    // SAFETY: mimalloc's collect is safe to call from any thread at any time.
    unsafe { mi_collect(true) };
}

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "ampserve",
    version,
    about = "Train Transformer translation models with automatic mixed precision and serve translations"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of `Serve`'s many flags is not worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the training server (REST API, device workers, SQLite or PostgreSQL store, status page)
    Serve(ampserve::app::ServeArgs),
    /// Train (or resume) a model from a TOML spec, e.g. `ampserve train --config configs/tiny.toml`
    Train(ampserve::cli::TrainArgs),
    /// Run a precision experiment's arms here, one after another, and print the comparison
    Experiment(ampserve::cli::experiment::ExperimentArgs),
    /// Export a run's checkpoint as an f16 model directory for translation
    Export(ampserve::cli::ExportArgs),
    /// Translate sentences (arguments, or stdin lines) with an exported model, or on a server
    /// with `--server URL`
    Translate(ampserve::cli::TranslateArgs),
    /// Jobs on a running server: submit, list, show, watch, cancel, resume, delete
    #[command(subcommand)]
    Jobs(ampserve::client::JobsCmd),
    /// Models on a running server: list
    #[command(subcommand)]
    Models(ampserve::client::ModelsCmd),
    /// Translate a test TSV with an exported model and score it (sacreBLEU 13a BLEU, chrF2)
    Eval(ampserve::cli::EvalArgs),
    /// Benchmarks: `ampserve bench train --size tiny --precision fp32,bf16,f16`, `ampserve bench translate`
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Internal: the server runs each training job in a child process with this subcommand
    /// (job request on stdin, events on stdout).
    #[command(name = "run-job", hide = true)]
    RunJob,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time training steps at the PyTorch reference's sizes; one JSON line per precision
    Train(ampserve::bench::BenchTrainArgs),
    /// Time KV-cached greedy/beam decoding at the reference's sizes; one JSON line per case
    Translate(ampserve::bench::BenchTranslateArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(color)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    keep_freed_pages();
    let cli = Cli::parse();
    init_tracing();
    match cli.cmd {
        Cmd::Serve(args) => {
            serve_purges();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(ampserve::app::serve(args))
        }
        Cmd::Train(a) => ampserve::cli::train(a, Arc::new(AtomicBool::new(false))),
        Cmd::Experiment(a) => {
            ampserve::cli::experiment::experiment(a, Arc::new(AtomicBool::new(false)))
        }
        Cmd::Export(a) => ampserve::cli::export(a),
        Cmd::Translate(a) => ampserve::cli::translate(a),
        Cmd::Jobs(c) => ampserve::client::run_jobs(c),
        Cmd::Models(c) => ampserve::client::run_models(c),
        Cmd::Eval(a) => ampserve::cli::eval(a),
        Cmd::Bench(BenchCmd::Train(a)) => ampserve::bench::run_train_bench(&a),
        Cmd::Bench(BenchCmd::Translate(a)) => ampserve::bench::run_translate_bench(&a),
        Cmd::RunJob => ampserve::worker::process::child_main(),
    }
}
