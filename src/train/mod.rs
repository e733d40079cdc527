//! The synchronous training loop: data, model under autocast, loss scaling, optimizer,
//! validation and checkpoints. Free of tokio/sqlx/axum so the CLI and the server's workers both
//! drive it.

pub mod early_stop;
pub mod events;
pub mod overflow;
mod runner;
pub mod tensorboard;

pub use events::*;
pub use overflow::{OverflowRecord, TensorOverflow, UnderflowRecord};
pub use runner::{
    evaluate, prepare, run, validation_sample, Evaluation, Prepared, StepOut, Stepper,
};

use crate::config::SpecError;
use std::path::PathBuf;
use std::sync::Arc;

/// Called with the step number right before the checkpoint at that step is written; returns
/// once every event the sink has received so far is durable (the server's worker: the step
/// rows committed to SQLite). A resume starts after the newest checkpoint on disk, so a
/// checkpoint must never exist before the rows it covers, or a crash leaves permanent gaps.
#[derive(Clone)]
pub struct Barrier(pub Arc<dyn Fn(u64) -> Result<(), String> + Send + Sync>);

impl Barrier {
    pub fn new(f: impl Fn(u64) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn wait(&self, step: u64) -> Result<(), String> {
        (self.0)(step)
    }
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Barrier")
    }
}

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
    /// Waited on before each checkpoint is written (None: nothing to wait for, as in the CLI).
    pub barrier: Option<Barrier>,
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
    /// The training process died (signal, abort, non-zero exit) or broke its protocol.
    #[error("the training process {0}")]
    Crashed(String),
    /// A run in another process failed with this message.
    #[error("{0}")]
    Failed(String),
}
