//! Where a run stands: step, data position, best BLEU, timing totals carried across resumes.
//! Checkpoints record it and resume and recovery rewind it; the loop only moves it forward.

use super::early_stop::EarlyStop;
use crate::checkpoint::CheckpointMeta;
use std::path::PathBuf;
use std::time::Instant;

pub(super) struct RunState {
    pub(super) step: u64,
    pub(super) epoch: u64,
    pub(super) batch_pos: u64,
    pub(super) best_bleu: Option<f64>,
    /// (step, BLEU) of the latest validation.
    pub(super) last_bleu: Option<(u64, f64)>,
    pub(super) last_ckpt_step: Option<u64>,
    /// Wall time of the attempts before this one (from the checkpoint resumed from).
    pub(super) wall_prev: f64,
    pub(super) tokens_total: f64,
    pub(super) step_time_total: f64,
    pub(super) last_loss: f64,
    /// The tokenizer files, relative to the run directory (checkpoints name them).
    pub(super) tokenizers: (PathBuf, PathBuf),
    pub(super) early_stop: Option<EarlyStop>,
    /// When this attempt started (before its corpus was prepared).
    pub(super) t0: Instant,
}

impl RunState {
    pub(super) fn new(
        t0: Instant,
        tokenizers: (PathBuf, PathBuf),
        early_stop: Option<EarlyStop>,
    ) -> Self {
        Self {
            step: 0,
            epoch: 0,
            batch_pos: 0,
            best_bleu: None,
            last_bleu: None,
            last_ckpt_step: None,
            wall_prev: 0.0,
            tokens_total: 0.0,
            step_time_total: 0.0,
            last_loss: f64::NAN,
            tokenizers,
            early_stop,
            t0,
        }
    }

    /// Back to where a checkpoint was written (on resume and on recovery): the step, the
    /// position in the data, the best BLEU so far.
    pub(super) fn rewind_to(&mut self, meta: &CheckpointMeta) {
        self.step = meta.step;
        self.epoch = meta.epoch;
        self.batch_pos = meta.batch_pos;
        self.best_bleu = meta.best_bleu;
        self.last_ckpt_step = Some(meta.step);
    }

    /// Back to the initial weights (a recovery with no checkpoint before the collapse).
    pub(super) fn rewind_to_start(&mut self) {
        self.step = 0;
        self.epoch = 0;
        self.batch_pos = 0;
        self.best_bleu = None;
        self.last_ckpt_step = None;
    }

    /// Wall time of the whole run so far, earlier attempts included.
    pub(super) fn wall_s(&self) -> f64 {
        self.wall_prev + self.t0.elapsed().as_secs_f64()
    }

    /// Whether the latest validation was at the current step.
    pub(super) fn validated_now(&self) -> bool {
        self.last_bleu.map(|(s, _)| s) == Some(self.step)
    }
}
