//! The checkpointer (burn-train style: an object apart from the learner): it writes a run's
//! checkpoints through the `checkpoint` file format once the barrier says the rows they cover are
//! durable, then applies the retention strategy. The strategy is a pure function of the
//! checkpoints' steps and BLEU, so it is unit-tested here and the tests' fake trainer uses the
//! same one.

use super::events::{CheckpointRecord, TrainEvent};
use super::state::RunState;
use super::stepper::Stepper;
use super::{Barrier, BarrierError, TrainError};
use crate::checkpoint::{self, CheckpointFileError, CheckpointMeta};
use crate::config::TrainSpec;
use crate::model::{Config as ModelConfig, Transformer};
use candle_core::Tensor;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a run could not write or resume from a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    File(#[from] CheckpointFileError),
    #[error(
        "{} was written for a different model ({model:?}); the spec changed the model or data",
        path.display()
    )]
    ModelMismatch {
        path: PathBuf,
        model: Box<ModelConfig>,
    },
    #[error(
        "step {step}: the metrics it covers could not be made durable ({reason}); not writing it"
    )]
    NotDurable { step: u64, reason: BarrierError },
}

/// `checkpoint.keep_last`: keep the newest `keep_last` checkpoints plus the best by validation
/// BLEU ([`checkpoint::best_step`]); the rest go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepLastPlusBest {
    pub keep_last: usize,
}

impl KeepLastPlusBest {
    /// The steps to delete among `checkpoints` (step, validation BLEU), in step order.
    pub fn to_remove(&self, checkpoints: &[(u64, Option<f64>)]) -> Vec<u64> {
        let best = checkpoint::best_step(checkpoints.iter().copied());
        let mut steps: Vec<u64> = checkpoints.iter().map(|c| c.0).collect();
        steps.sort_unstable();
        let n = steps.len();
        steps
            .into_iter()
            .enumerate()
            .filter(|&(i, s)| i + self.keep_last < n && Some(s) != best)
            .map(|(_, s)| s)
            .collect()
    }

    /// The best of `checkpoints` (the one retention always keeps).
    pub fn best(&self, checkpoints: &[(u64, Option<f64>)]) -> Option<u64> {
        checkpoint::best_step(checkpoints.iter().copied())
    }
}

/// Writes, retains and finds one run's checkpoints.
pub(super) struct Checkpointer {
    dir: PathBuf,
    retention: KeepLastPlusBest,
    barrier: Option<Barrier>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Checkpointer {
    pub(super) fn new(dir: PathBuf, keep_last: usize, barrier: Option<Barrier>) -> Self {
        Self {
            dir,
            retention: KeepLastPlusBest { keep_last },
            barrier,
        }
    }

    /// Write the checkpoint at `st.step` (model, optimizer, scaler, run state, the settings in
    /// force `spec`), apply retention and announce it.
    pub(super) fn save(
        &self,
        spec: &TrainSpec,
        model: &Transformer,
        stepper: &Stepper,
        st: &mut RunState,
        sink: &mut dyn FnMut(TrainEvent),
    ) -> Result<(), TrainError> {
        // The rows this checkpoint covers must be durable before the checkpoint exists.
        if let Some(b) = &self.barrier {
            b.wait(st.step)
                .map_err(|reason| CheckpointError::NotDurable {
                    step: st.step,
                    reason,
                })?;
        }
        let val_bleu = st.last_bleu.filter(|(s, _)| *s == st.step).map(|(_, b)| b);
        let mut meta = CheckpointMeta {
            step: st.step,
            epoch: st.epoch,
            batch_pos: st.batch_pos,
            adam_t: stepper.opt.t,
            scaler: stepper.scaler.state(),
            seed: spec.train.seed,
            spec: spec.clone(),
            model: model.cfg.clone(),
            sha256: String::new(),
            size_bytes: 0,
            val_bleu,
            created_unix: now_unix(),
            best_bleu: st.best_bleu,
            wall_s: st.wall_s(),
            tokens_total: st.tokens_total,
            step_time_total_s: st.step_time_total,
            src_tokenizer: Some(st.tokenizers.0.clone()),
            tgt_tokenizer: Some(st.tokenizers.1.clone()),
        };
        let mut tensors: Vec<(String, Tensor)> = model
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (format!("param.{n}"), t))
            .collect();
        tensors.extend(stepper.opt.state_tensors());
        let path =
            checkpoint::write(&self.dir, &mut meta, tensors).map_err(CheckpointError::File)?;
        let on_disk = self.steps();
        let removed = checkpoint::remove_steps(&self.dir, &self.retention.to_remove(&on_disk));
        let is_best = self.retention.best(&on_disk) == Some(st.step);
        st.last_ckpt_step = Some(st.step);
        sink(TrainEvent::Checkpoint(CheckpointRecord {
            step: st.step,
            epoch: st.epoch,
            path,
            size_bytes: meta.size_bytes,
            sha256: meta.sha256,
            val_bleu,
            is_best,
            removed,
        }));
        Ok(())
    }

    /// (step, validation BLEU) of the checkpoints on disk.
    fn steps(&self) -> Vec<(u64, Option<f64>)> {
        checkpoint::list(&self.dir)
            .into_iter()
            .map(|(m, _)| (m.step, m.val_bleu))
            .collect()
    }

    /// Re-announce the checkpoint a run resumed from: a crash may have come between writing it
    /// and the event that records it (re-recording one is idempotent).
    pub(super) fn announce(&self, path: PathBuf, sink: &mut dyn FnMut(TrainEvent)) {
        let all = checkpoint::list(&self.dir);
        let best = self.retention.best(
            &all.iter()
                .map(|(m, _)| (m.step, m.val_bleu))
                .collect::<Vec<_>>(),
        );
        if let Some((meta, _)) = all.into_iter().find(|(_, p)| *p == path) {
            sink(TrainEvent::Checkpoint(CheckpointRecord {
                step: meta.step,
                epoch: meta.epoch,
                is_best: best == Some(meta.step),
                path,
                size_bytes: meta.size_bytes,
                sha256: meta.sha256,
                val_bleu: meta.val_bleu,
                removed: Vec::new(),
            }));
        }
    }

    /// The newest checkpoint whose checksum matches.
    pub(super) fn latest_valid(&self) -> Option<(CheckpointMeta, PathBuf)> {
        checkpoint::latest_valid(&self.dir)
    }

    /// The newest checkpoint written before `step`.
    pub(super) fn last_before(&self, step: u64) -> Option<(CheckpointMeta, PathBuf)> {
        checkpoint::list(&self.dir)
            .into_iter()
            .rfind(|(m, _)| m.step < step)
    }

    /// Delete the checkpoints after `step` (a recovery replays from it).
    pub(super) fn drop_after(&self, step: u64) {
        let later: Vec<u64> = self
            .steps()
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| *s > step)
            .collect();
        checkpoint::remove_steps(&self.dir, &later);
    }

    /// (best, latest) checkpoint paths, for the summary.
    pub(super) fn best_and_latest(&self) -> (Option<PathBuf>, Option<PathBuf>) {
        (
            checkpoint::best(&self.dir).map(|(_, p)| p),
            checkpoint::list(&self.dir).pop().map(|(_, p)| p),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_n_plus_the_best_by_bleu() {
        let r = KeepLastPlusBest { keep_last: 2 };
        let cks = [
            (10, None),
            (20, Some(10.0)),
            (30, Some(4.0)),
            (40, Some(5.0)),
            (50, None),
            (60, Some(0.0)),
        ];
        assert_eq!(r.to_remove(&cks), [10, 30, 40]);
        assert_eq!(r.best(&cks), Some(20));
    }

    #[test]
    fn retention_keeps_the_later_of_two_checkpoints_with_the_same_best_bleu() {
        let r = KeepLastPlusBest { keep_last: 1 };
        let cks = [
            (30, Some(7.0)),
            (10, Some(7.0)),
            (40, None),
            (20, Some(1.0)),
        ];
        assert_eq!(r.best(&cks), Some(30));
        assert_eq!(r.to_remove(&cks), [10, 20]);
    }

    #[test]
    fn retention_removes_nothing_while_there_are_at_most_keep_last() {
        let r = KeepLastPlusBest { keep_last: 3 };
        assert!(r.to_remove(&[(1, None), (2, None), (3, None)]).is_empty());
        assert_eq!(
            r.to_remove(&[(1, None), (2, None), (3, None), (4, None)]),
            [1]
        );
        assert!(r.to_remove(&[]).is_empty());
    }
}
