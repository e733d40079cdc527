//! The one mixed-precision training step (`Stepper`), shared by the trainer and the benchmark.

use super::overflow::{self, Injector, OverflowRecord, UnderflowRecord};
use super::TrainError;
use crate::amp::{Autocast, GradScaler, ScalerConfig, ScalerError};
use crate::config::{ScheduleCounts, TrainSpec};
use crate::data;
use crate::model::{Ctx, Transformer};
use crate::ops;
use crate::optim::{self, Adam, AdamConfig, LrSchedule};
use candle_core::Tensor;

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepOut {
    pub loss: f64,
    pub lr: f64,
    pub scale_used: f64,
    pub found_inf: bool,
    pub skipped: bool,
    pub grad_norm: f64,
    /// On an overflowing step: which gradients (and, when traced, activations) were to blame.
    pub overflow: Option<OverflowRecord>,
    /// On a sampled step (`amp.underflow_every`, scaler on): the gradients' f16 underflow.
    pub underflow: Option<UnderflowRecord>,
    /// The backward graph as counted (`crate::counters::backward`).
    pub graph: crate::counters::GraphCounts,
}

/// One mixed-precision training step, shared by the trainer and the benchmark: forward under
/// autocast, loss in f32, scaled backward, one global-norm/overflow reduction, unscale + clip
/// fused into the Adam update (or skip), scaler update.
pub struct Stepper {
    pub opt: Adam,
    pub scaler: GradScaler,
    pub sched: LrSchedule,
    /// The share of the run's budget used before the next step, 0..=1 (the learner sets it
    /// before each step; the `linear` schedule decays with it). Stays 0 for a bare stepper.
    pub progress: f64,
    pub ac: Autocast,
    pub seed: u64,
    pub dropout: f64,
    pub label_smoothing: f64,
    pub clip: f64,
    pub schedule_counts: ScheduleCounts,
    pub trace_overflow: bool,
    pub underflow_every: u64,
    /// `amp.test_inject_inf` (test only).
    pub injector: Option<Injector>,
}

impl Stepper {
    pub fn new(spec: &TrainSpec, model: &Transformer) -> Result<Self, TrainError> {
        let names: Vec<&str> = model.params.iter().map(|(n, _)| n.as_str()).collect();
        Ok(Self {
            opt: Adam::new(model.params.clone(), AdamConfig::from_spec(&spec.train))?,
            scaler: GradScaler::new(ScalerConfig::from_spec(&spec.amp, spec.scaler_enabled())),
            sched: LrSchedule::from_spec(&spec.train),
            progress: 0.0,
            ac: Autocast::new(spec.train.precision),
            seed: spec.train.seed,
            dropout: spec.model.dropout,
            label_smoothing: spec.train.label_smoothing,
            clip: spec.train.clip_grad_norm,
            schedule_counts: spec.train.schedule_counts,
            trace_overflow: spec.amp.trace_overflow,
            underflow_every: spec.amp.underflow_every,
            injector: Injector::new(spec.amp.test_inject_inf.as_ref(), &names)?,
        })
    }

    /// The step the schedule reads for attempted step `step` (1-based): `step` itself, or the
    /// optimizer step this one would apply (skipped steps do not advance it).
    pub fn schedule_step(&self, step: u64) -> u64 {
        match self.schedule_counts {
            ScheduleCounts::AllSteps => step,
            ScheduleCounts::OptimizerSteps => self.opt.t + 1,
        }
    }

    /// `step` is the 1-based step number (it seeds dropout and, with
    /// `train.schedule_counts = "all_steps"`, sets the learning rate). Errors when the scaler
    /// gives up (see [`Self::step_checked`] for the step's record along with that verdict).
    pub fn step(
        &mut self,
        model: &Transformer,
        db: &data::DeviceBatch,
        step: u64,
    ) -> Result<StepOut, TrainError> {
        match self.step_checked(model, db, step)? {
            (out, None) => Ok(out),
            (_, Some(e)) => Err(e.into()),
        }
    }

    /// [`Self::step`], returning the step's record even when the scaler gave up on this step
    /// (the second value: overflow at `min_scale` for `amp.max_consecutive_skips` steps).
    pub fn step_checked(
        &mut self,
        model: &Transformer,
        db: &data::DeviceBatch,
        step: u64,
    ) -> Result<(StepOut, Option<ScalerError>), TrainError> {
        self.ac.new_step();
        let mut ctx = Ctx::new(
            &self.ac,
            true,
            self.dropout,
            ops::step_seed(self.seed, step),
        );
        if self.trace_overflow {
            ctx = ctx.with_overflow_trace();
        }
        let loss = model.loss(&ctx, &db.src, &db.tgt_in, &db.labels, self.label_smoothing)?;
        let (grads, graph) = crate::counters::backward(&self.scaler.scale_loss(&loss)?)?;
        let mut glist: Vec<Tensor> = model
            .params
            .iter()
            .map(|(_, v)| match self.ac.grad_of(v, &grads)? {
                Some(g) => Ok(g),
                None => {
                    crate::counters::device_ops(1);
                    v.zeros_like()
                }
            })
            .collect::<candle_core::Result<_>>()?;
        drop(grads);
        if self.scaler.is_enabled() {
            if let Some(inj) = self.injector.as_mut() {
                inj.apply(step, &mut glist)?;
            }
        }
        let scale = self.scaler.scale();
        let lr = self.sched.lr(self.schedule_step(step), self.progress);
        // On a CUDA device the sum of squares, the overflow check, the clip factor and the
        // update (skipped there on overflow) all happen on the device, and this is the step's
        // one host read. Elsewhere: the sum of squares first (on the CPU its pass leaves the
        // total in host memory), then the host reads the loss, decides, and updates.
        let on_device =
            self.opt
                .fused_step(&glist, &loss, lr, self.scaler.inv_scale(), self.clip)?;
        let (loss_v, ss) = match on_device {
            Some(d) => (d.loss, d.sum_squares),
            None => {
                let ss = optim::sum_squares(&glist)?;
                crate::counters::host_sync();
                (loss.to_scalar::<f32>()? as f64, ss)
            }
        };
        let found_inf = GradScaler::found_inf(ss) || !loss_v.is_finite();
        debug_assert!(on_device.is_none_or(|d| d.found_inf == found_inf));
        let grad_norm = ss.sqrt() * self.scaler.inv_scale();
        let overflow = if found_inf {
            let names: Vec<&str> = model.params.iter().map(|(n, _)| n.as_str()).collect();
            let act = ctx.first_overflow();
            Some(OverflowRecord {
                step,
                epoch: 0,
                loss_scale: scale,
                loss_finite: loss_v.is_finite(),
                tensors: overflow::inspect(&names, &glist)?,
                activation_max: act.as_ref().map(|a| a.1),
                activation: act.map(|a| a.0),
            })
        } else {
            None
        };
        let underflow = if !found_inf
            && self.scaler.is_enabled()
            && self.underflow_every > 0
            && step.is_multiple_of(self.underflow_every)
        {
            Some(overflow::underflow(step, scale, &glist)?)
        } else {
            None
        };
        if !found_inf && on_device.is_none() {
            let coef = optim::clip_coef(grad_norm, self.clip);
            self.opt.step(&glist, lr, self.scaler.inv_scale() * coef)?;
        }
        let (used, skipped, gave_up) = match self.scaler.update(found_inf) {
            Ok(o) => (o.scale_used, o.skipped, None),
            Err(e) => (scale, true, Some(e)),
        };
        Ok((
            StepOut {
                loss: loss_v,
                lr,
                scale_used: used,
                found_inf,
                skipped,
                grad_norm,
                overflow,
                underflow,
                graph,
            },
            gave_up,
        ))
    }
}
