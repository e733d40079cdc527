//! Translation from exported models: export (f16 model directories with checksums), the loaded
//! [`Translator`] (decoding itself is `crate::generation`, shared with validation), the dynamic
//! [`Batcher`] (one thread per model) and the [`ModelCache`] of loaded models. Pretrained
//! MarianMT checkpoints ([`marian`]) load through the same [`Engine`] seam, and every kind can
//! sample ([`sampling`]).
//!
//! No tokio/sqlx/axum here: the server wraps these in its handlers.

pub mod batcher;
pub mod cache;
pub mod engine;
pub mod evaluate;
pub mod export;
pub mod marian;
pub mod sampling;
pub mod translator;

pub use crate::generation::{DecodeOptions, Hypothesis};
pub use batcher::{
    sentence_cost, set_release_memory, Answer, Batcher, BatcherConfig, BatcherStats, Job,
    SubmitError,
};
pub use cache::{CacheConfig, ModelCache};
pub use engine::{kind_of_manifest, Engine, SourceEncoder};
pub use evaluate::{evaluate_tsv, EvalReport};
pub use export::{CheckpointChoice, Manifest, ModelConfig, NotACheckpointChoice};
pub use marian::{MarianImport, MarianTranslator};
pub use sampling::Sampling;
pub use translator::{default_compute, Translation, Translator};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// Something asked for does not exist (no checkpoint, missing file).
    #[error("{0}")]
    NotFound(String),
    /// The model was deleted (possibly while this request waited for it to load).
    #[error("model {0} was deleted")]
    Deleted(i64),
    /// Files a model directory must hold are not there (every missing one is named).
    #[error("{dir} is missing {}", files.join(", "))]
    Missing { dir: String, files: Vec<String> },
    /// A model directory or checkpoint is unusable (bad manifest, checksum mismatch, ...).
    #[error("{0}")]
    Invalid(String),
    /// Decoding failed.
    #[error("decoding failed: {0}")]
    Decode(String),
    /// The caller gave up (timed out, disconnected) before its request was decoded.
    #[error("the request was cancelled before it was decoded")]
    Cancelled,
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
