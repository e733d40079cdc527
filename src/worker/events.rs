//! What SSE subscribers and the Prometheus endpoint see of a job: its status changes and the
//! trainer's events, published by the pool as they are persisted.

use crate::store::JobStatus;
use crate::train::{
    CheckpointRecord, OverflowRecord, RecoveryRecord, StartInfo, StepRecord, Summary,
    ValidationRecord,
};
use serde::{Deserialize, Serialize};

/// What SSE subscribers and the Prometheus endpoint see.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: i64,
    #[serde(flatten)]
    pub kind: JobEventKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEventKind {
    Status {
        status: JobStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Started(StartInfo),
    Step(StepRecord),
    Validation(ValidationRecord),
    Checkpoint(CheckpointRecord),
    /// An overflowing step's forensics (which gradients, which activation).
    Overflow(OverflowRecord),
    /// A collapsed loss scale was healed (bf16 switch or rollback).
    Recovery(RecoveryRecord),
    Finished(Summary),
    /// The succeeded job was exported for translation.
    Model {
        model_id: i64,
        name: String,
    },
}

impl JobEventKind {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            JobEventKind::Status { .. } => "status",
            JobEventKind::Started(_) => "started",
            JobEventKind::Step(_) => "step",
            JobEventKind::Validation(_) => "validation",
            JobEventKind::Checkpoint(_) => "checkpoint",
            JobEventKind::Overflow(_) => "overflow",
            JobEventKind::Recovery(_) => "recovery",
            JobEventKind::Finished(_) => "finished",
            JobEventKind::Model { .. } => "model",
        }
    }
}
