use clap::{Parser, Subcommand};
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

#[derive(Subcommand)]
enum Cmd {
    /// Train (or resume) a model from a TOML spec, e.g. `ampserve train --config configs/tiny.toml`
    Train(ampserve::cli::TrainArgs),
    /// Benchmarks: `ampserve bench train --size tiny --precision fp32,bf16,f16`
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time training steps at the PyTorch reference's sizes; one JSON line per precision
    Train(ampserve::bench::BenchTrainArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Train(a) => ampserve::cli::train(a, Arc::new(AtomicBool::new(false))),
        Cmd::Bench(BenchCmd::Train(a)) => ampserve::bench::run_train_bench(&a),
    }
}
