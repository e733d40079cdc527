//! Healing a collapsed f16 loss scale (`amp.on_scale_collapse`): back to the newest checkpoint
//! written before the run of skipped steps, then on in bf16 or with the learning rate halved.

use super::events::RecoveryRecord;
use super::learner::Learner;
use super::stepper::Stepper;
use super::TrainError;
use crate::amp::{ScalerError, ScalerState};
use crate::checkpoint;
use crate::config::{OnScaleCollapse, Precision};
use crate::model::Transformer;
use candle_core::Tensor;

impl Learner<'_> {
    /// Heal a collapsed loss scale as `amp.on_scale_collapse` says (or fail with the scaler's
    /// verdict): reload the newest checkpoint written before the run of skipped steps that began
    /// at `streak_start` (the initial weights when there is none), drop the checkpoints after it,
    /// and rebuild the stepper in bf16 or with the learning rate halved. The run state is reset
    /// to that checkpoint so the loop replays from there.
    pub(super) fn recover(
        &mut self,
        streak_start: u64,
        verdict: ScalerError,
    ) -> Result<RecoveryRecord, TrainError> {
        let collapsed_at = self.st.step;
        let cur = &mut self.cur;
        match cur.amp.on_scale_collapse {
            OnScaleCollapse::Fail => return Err(verdict.into()),
            OnScaleCollapse::Bf16 => {
                if !self.stepper.scaler.is_enabled() {
                    // nothing left to switch: the scaler is already off
                    return Err(verdict.into());
                }
                cur.train.precision = Precision::Bf16;
                cur.amp.enabled = Some(false);
            }
            OnScaleCollapse::Rollback => {
                if self.rollbacks >= cur.amp.max_rollbacks {
                    return Err(TrainError::RollbacksExhausted {
                        verdict,
                        rollbacks: self.rollbacks,
                    });
                }
                self.rollbacks += 1;
                cur.train.lr /= 2.0;
            }
        }
        let good = self.ckpt.last_before(streak_start);
        let injector = self.stepper.injector.take();
        let model = &self.model;
        let dev = model.device().clone();
        match &good {
            Some((meta, path)) => {
                let tensors =
                    checkpoint::load_tensors(path, &dev).map_err(super::CheckpointError::File)?;
                model.load_named(&|n| tensors.get(&format!("param.{n}")).cloned())?;
                self.stepper = Stepper::new(cur, model)?;
                self.stepper.opt.load_state(meta.adam_t, &tensors)?;
                // rollback keeps f16 with the checkpoint's scale; bf16 starts a scaler that is
                // off, but the steps skipped before the checkpoint stay counted
                let scaler = match cur.amp.on_scale_collapse {
                    OnScaleCollapse::Rollback => meta.scaler.clone(),
                    _ => ScalerState {
                        skipped_total: meta.scaler.skipped_total,
                        ..self.stepper.scaler.state()
                    },
                };
                self.stepper.scaler.load_state(scaler);
                self.st.rewind_to(meta);
            }
            None => {
                let fresh = Transformer::new(&model.cfg, cur.train.seed, &dev)?;
                let named: std::collections::HashMap<String, Tensor> =
                    fresh.named_tensors().into_iter().collect();
                model.load_named(&|n| named.get(n).cloned())?;
                self.stepper = Stepper::new(cur, model)?;
                self.st.rewind_to_start();
            }
        }
        self.stepper.injector = injector;
        self.st.last_bleu = None;
        let from = self.st.step;
        self.ckpt.drop_after(from);
        Ok(RecoveryRecord {
            step: collapsed_at,
            action: cur.amp.on_scale_collapse.as_str().to_string(),
            resumed_from_step: from,
            precision: cur.train.precision.as_str().to_string(),
            lr: cur.train.lr,
            rollbacks: self.rollbacks,
            reason: verdict.to_string(),
        })
    }
}
