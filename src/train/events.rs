//! What a training run reports while it runs. The CLI prints these; the server's worker stores
//! them in SQLite and streams them as Server-Sent Events. Plain data, serde-serialisable.

use serde::{Deserialize, Deserializer, Serialize};
use std::path::PathBuf;

/// JSON has no NaN or infinity: serde_json writes them as `null`. Reading `null` back as NaN
/// lets events cross a pipe (the isolated training process) and come out as they went in
/// (an infinite grad norm comes back NaN: both mean "not finite" everywhere they are used).
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One optimizer step (skipped steps included: `skipped = true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based count of optimizer steps attempted (skipped ones included).
    pub step: u64,
    pub epoch: u64,
    /// Unscaled training loss (label-smoothed cross-entropy per non-pad target token).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// The loss scale used for this step (1.0 when the scaler is disabled).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss_scale: f64,
    pub found_inf: bool,
    pub skipped: bool,
    /// Global L2 norm of the unscaled gradients (before clipping); NaN/inf when found_inf.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Non-pad target tokens per second for this step.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub step_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub source: String,
    pub reference: String,
    pub hypothesis: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationRecord {
    pub step: u64,
    pub epoch: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// Corpus BLEU (sacreBLEU-compatible, 13a tokenisation), 0-100.
    #[serde(deserialize_with = "nan_if_null")]
    pub bleu: f64,
    /// chrF (sacreBLEU defaults: char order 6, beta 2), 0-100.
    #[serde(deserialize_with = "nan_if_null")]
    pub chrf: f64,
    /// Character error rate (edit distance / reference characters), 0-1 (can exceed 1).
    #[serde(deserialize_with = "nan_if_null")]
    pub cer: f64,
    /// Word error rate, 0-1 (can exceed 1).
    #[serde(deserialize_with = "nan_if_null")]
    pub wer: f64,
    pub sentences: u64,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub epoch: u64,
    /// Path of the `.safetensors` file (its JSON sidecar is the same path with `.json`).
    pub path: PathBuf,
    pub size_bytes: u64,
    /// sha256 of the safetensors file, hex.
    pub sha256: String,
    pub val_bleu: Option<f64>,
    pub is_best: bool,
    /// Checkpoints deleted by retention when this one was written.
    pub removed: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartInfo {
    pub run_dir: PathBuf,
    pub steps_per_epoch: u64,
    /// Optimizer steps the run will take (epochs x steps_per_epoch, capped by max_steps).
    pub total_steps: u64,
    /// Step the run resumed from (0 for a fresh run).
    pub resumed_from_step: u64,
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    pub train_pairs: usize,
    pub valid_pairs: usize,
    pub dropped_long: usize,
    pub truncated_long: usize,
    pub malformed_lines: usize,
    pub parameters: usize,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub epochs_completed: u64,
    pub skipped_steps: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub final_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub final_loss_scale: f64,
    pub best_bleu: Option<f64>,
    pub best_checkpoint: Option<PathBuf>,
    pub latest_checkpoint: Option<PathBuf>,
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_s: f64,
    /// Mean non-pad target tokens per second over the run's steps.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    pub cancelled: bool,
    /// Why the run ended before its epochs / max_steps: `early_stopping` or `max_time_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<String>,
}

/// The run healed a collapsed loss scale (`amp.on_scale_collapse`): it went back to the
/// checkpoint at `resumed_from_step` and continues from there with the new settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    /// The step at which the scale was found collapsed.
    pub step: u64,
    /// `bf16` or `rollback`.
    pub action: String,
    /// The checkpoint step the run continues from (0: the initial weights).
    pub resumed_from_step: u64,
    /// The precision from here on.
    pub precision: String,
    /// The base learning rate from here on.
    pub lr: f64,
    /// Rollbacks so far in this run.
    pub rollbacks: u64,
    /// The scaler's verdict that triggered it.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TrainEvent {
    Started(StartInfo),
    Step(StepRecord),
    Validation(ValidationRecord),
    Checkpoint(CheckpointRecord),
    /// A step whose gradients overflowed: the tensors (and activation) to blame.
    Overflow(super::overflow::OverflowRecord),
    /// A sampled step's f16 gradient underflow.
    Underflow(super::overflow::UnderflowRecord),
    /// A collapsed loss scale was healed by switching to bf16 or rolling back.
    Recovery(RecoveryRecord),
    Finished(Summary),
}
