//! The synchronous training loop: data, model under autocast, loss scaling, optimizer,
//! validation and checkpoints. Free of tokio/sqlx/axum so the CLI and the server's workers both
//! drive it. `learner.rs` holds the loop (a `Learner` owning its parts), `stepper.rs` the one
//! mixed-precision step, `checkpointer.rs` checkpoints and their retention, `recovery.rs` the
//! scale-collapse healing, `corpus.rs` corpus preparation, `validation.rs` evaluation,
//! `logs.rs` the JSONL logs, `state.rs` the run state.

mod checkpointer;
mod corpus;
pub mod early_stop;
pub mod events;
mod learner;
mod logs;
pub mod overflow;
mod recovery;
mod state;
mod stepper;
pub mod tensorboard;
mod validation;

pub use checkpointer::{CheckpointError, KeepLastPlusBest};
pub use corpus::{prepare, validation_sample, CorpusError, Prepared};
pub use events::*;
pub use learner::run;
pub use overflow::{OverflowRecord, TensorOverflow, UnderflowRecord};
pub use stepper::{StepOut, Stepper};
pub use validation::{evaluate, Evaluation};

use crate::config::SpecError;
use std::path::PathBuf;
use std::sync::Arc;

/// Called with the step number right before the checkpoint at that step is written; returns
/// once every event the sink has received so far is durable (the server's worker: the step
/// rows committed to SQLite). A resume starts after the newest checkpoint on disk, so a
/// checkpoint must never exist before the rows it covers, or a crash leaves permanent gaps.
#[derive(Clone)]
pub struct Barrier(pub Arc<dyn Fn(u64) -> Result<(), BarrierError> + Send + Sync>);

/// Why the rows a checkpoint covers could not be made durable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BarrierError {
    /// Writing them failed; the store's message (it may come from another process).
    #[error("{0}")]
    Persist(String),
    /// Nobody acknowledges any more: who stopped listening.
    #[error("{0}")]
    Gone(&'static str),
}

impl Barrier {
    pub fn new(f: impl Fn(u64) -> Result<(), BarrierError> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn wait(&self, step: u64) -> Result<(), BarrierError> {
        (self.0)(step)
    }
}

impl From<checkpointer::CheckpointError> for TrainError {
    fn from(e: checkpointer::CheckpointError) -> Self {
        TrainError::Checkpoint(Box::new(e))
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
    Data(#[from] corpus::CorpusError),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The loss scaler gave up (overflow at min_scale for too many steps).
    #[error(transparent)]
    Scaler(#[from] crate::amp::ScalerError),
    /// `amp.on_scale_collapse = "rollback"` ran out of `amp.max_rollbacks`.
    #[error(
        "{verdict} (after {rollbacks} rollbacks with the learning rate halved each time, \
         amp.max_rollbacks)"
    )]
    RollbacksExhausted {
        verdict: crate::amp::ScalerError,
        rollbacks: u64,
    },
    /// Boxed: the file errors carry paths and sources, and `TrainError` travels in every `Result`.
    #[error("checkpoint: {0}")]
    Checkpoint(Box<checkpointer::CheckpointError>),
    /// The training process died (signal, abort, non-zero exit) or broke its protocol.
    #[error("the training process {0}")]
    Crashed(String),
    /// A run in another process failed with this message.
    #[error("{0}")]
    Failed(String),
}
