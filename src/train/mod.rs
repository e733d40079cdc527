//! The synchronous training loop: data, model under autocast, loss scaling, optimizer,
//! validation and checkpoints. Free of tokio/sqlx/axum so the CLI and the server's workers both
//! drive it.

pub mod checkpoint;
pub mod early_stop;
pub mod events;
pub mod metrics;
mod runner;
pub mod tensorboard;

pub use events::*;
pub use runner::{
    evaluate, prepare, run, validation_sample, Evaluation, Prepared, StepOut, Stepper,
};

use crate::config::SpecError;
use std::path::PathBuf;

/// How to run one training job.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run directory: `spec.json`, `tokenizers/`, `checkpoints/`, `metrics.jsonl`,
    /// `validations.jsonl`, `events.out.tfevents.*` (TensorBoard).
    pub out_dir: PathBuf,
    pub device: candle_core::Device,
    /// Continue from the latest valid checkpoint in `out_dir` (checksums verified; a corrupt one
    /// is skipped with a warning) when there is one; start fresh otherwise.
    pub resume: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("data: {0}")]
    Data(String),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The loss scaler gave up (overflow at min_scale for too many steps).
    #[error("{0}")]
    Scaler(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}
