//! The training loop (burn-train style): a `Learner` owns its parts (the model, the stepper with
//! its optimizer, scaler and schedule, the run state, the checkpointer, the logs, the prepared
//! corpus) and [`run`] drives it: resume, one step after another, validation and checkpoints on
//! their schedules, stops (cancel, `max_steps`, `max_time_s`, early stopping), the summary.
//! Healing a collapsed loss scale is in `recovery.rs`.

use super::checkpointer::{CheckpointError, Checkpointer};
use super::corpus::{prepare, Prepared};
use super::early_stop::EarlyStop;
use super::events::*;
use super::logs::{RunLogs, METRICS};
use super::state::RunState;
use super::stepper::Stepper;
use super::validation::evaluate;
use super::{tensorboard, RunOptions, TrainError};
use crate::checkpoint;
use crate::config::{TrainSection, TrainSpec};
use crate::data;
use crate::model::{self, Transformer};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub(super) struct Learner<'a> {
    /// The job's spec.
    pub(super) spec: &'a TrainSpec,
    /// The settings in force: the job's spec, changed by a recovery (amp.on_scale_collapse);
    /// checkpoints record it, and a resume adopts a recovered precision and lr from them.
    pub(super) cur: TrainSpec,
    pub(super) opts: &'a RunOptions,
    pub(super) prep: Prepared,
    pub(super) model: Transformer,
    pub(super) stepper: Stepper,
    pub(super) st: RunState,
    pub(super) ckpt: Checkpointer,
    pub(super) logs: RunLogs,
    /// Rollbacks so far in this attempt (`amp.max_rollbacks`).
    pub(super) rollbacks: u64,
    /// First step of the current run of skipped steps (None after a clean step).
    pub(super) streak_start: Option<u64>,
}

/// What a checkpoint restores, before the learner is assembled around it.
struct Parts {
    cur: TrainSpec,
    model: Transformer,
    stepper: Stepper,
    st: RunState,
}

impl Parts {
    /// Continue from the latest valid checkpoint, if there is one.
    fn resume(
        &mut self,
        ckpt: &Checkpointer,
        device: &candle_core::Device,
    ) -> Result<Option<PathBuf>, TrainError> {
        let Some((meta, path)) = ckpt.latest_valid() else {
            return Ok(None);
        };
        if meta.model != self.model.cfg {
            return Err(CheckpointError::ModelMismatch {
                path,
                model: Box::new(meta.model),
            }
            .into());
        }
        let tensors = checkpoint::load_tensors(&path, device).map_err(CheckpointError::File)?;
        self.model
            .load_named(&|n| tensors.get(&format!("param.{n}")).cloned())?;
        if meta.spec.train.precision != self.cur.train.precision
            || meta.spec.train.lr != self.cur.train.lr
        {
            // written after a recovery: continue with what the recovery chose
            self.cur.train.precision = meta.spec.train.precision;
            self.cur.amp.enabled = meta.spec.amp.enabled;
            self.cur.train.lr = meta.spec.train.lr;
            self.stepper = Stepper::new(&self.cur, &self.model)?;
        }
        self.stepper.opt.load_state(meta.adam_t, &tensors)?;
        self.stepper.scaler.load_state(meta.scaler.clone());
        self.st.rewind_to(&meta);
        self.st.wall_prev = meta.wall_s;
        self.st.tokens_total = meta.tokens_total;
        self.st.step_time_total = meta.step_time_total_s;
        Ok(Some(path))
    }
}

/// What the loop does after a step.
enum After {
    Continue,
    /// The epoch is over (or a recovery rewound the run): plan the epoch `st.epoch` again.
    NextEpoch,
    Stop,
}

impl<'a> Learner<'a> {
    /// Build the model and its parts, and resume from the latest valid checkpoint when asked.
    /// Returns the learner and the checkpoint resumed from.
    fn start(
        spec: &'a TrainSpec,
        opts: &'a RunOptions,
        prep: Prepared,
        t0: Instant,
    ) -> Result<(Self, Option<PathBuf>), TrainError> {
        let mcfg = model::Config::from_spec(
            &spec.model,
            prep.src_tok.vocab_size(),
            prep.tgt_tok.vocab_size(),
            spec.data.max_len,
        );
        // Cheap launches on a GPU (event tracking off, the memory pool kept): before the model
        // is built, since the switch applies to tensors created after it.
        #[cfg(feature = "cuda")]
        if let Some(msg) = crate::kernels::cuda::device::tune_for_training(&opts.device)? {
            tracing::info!("{msg}");
        }
        let model = Transformer::new(&mcfg, spec.train.seed, &opts.device)?;
        let cur = spec.clone();
        let stepper = Stepper::new(&cur, &model)?;
        let st = RunState::new(
            t0,
            (prep.src_tok_file.clone(), prep.tgt_tok_file.clone()),
            spec.train.early_stopping.map(EarlyStop::new),
        );
        let ckpt = Checkpointer::new(
            opts.out_dir.join("checkpoints"),
            spec.checkpoint.keep_last,
            opts.barrier.clone(),
        );
        let mut parts = Parts {
            cur,
            model,
            stepper,
            st,
        };
        let resumed = if opts.resume {
            parts.resume(&ckpt, &opts.device)?
        } else {
            None
        };
        let Parts {
            cur,
            model,
            stepper,
            st,
        } = parts;
        let logs = RunLogs::open_after(&opts.out_dir, st.step)?;
        Ok((
            Learner {
                spec,
                cur,
                opts,
                prep,
                model,
                stepper,
                st,
                ckpt,
                logs,
                rollbacks: 0,
                streak_start: None,
            },
            resumed,
        ))
    }

    /// The steps the run will take: epochs x steps per epoch, capped by `train.max_steps`.
    fn plan(&self) -> (u64, u64) {
        let tr = &self.spec.train;
        let steps_per_epoch =
            data::plan_epoch(&self.prep.train, tr.batch_size, tr.max_tokens, tr.seed, 0).len()
                as u64;
        let mut total_steps = steps_per_epoch * tr.epochs as u64;
        if tr.max_steps > 0 {
            total_steps = total_steps.min(tr.max_steps as u64);
        }
        (steps_per_epoch, total_steps)
    }

    fn start_info(&self, steps_per_epoch: u64, total_steps: u64) -> StartInfo {
        StartInfo {
            run_dir: self.opts.out_dir.clone(),
            steps_per_epoch,
            total_steps,
            resumed_from_step: self.st.step,
            src_vocab: self.model.cfg.src_vocab,
            tgt_vocab: self.model.cfg.tgt_vocab,
            train_pairs: self.prep.train_pairs,
            valid_pairs: self.prep.valid.len(),
            dropped_long: self.prep.stats.dropped_long,
            truncated_long: self.prep.stats.truncated,
            malformed_lines: self.prep.malformed,
            parameters: self.model.num_parameters(),
            device: format!("{:?}", self.opts.device),
        }
    }

    /// Validate now (when there is a validation set); true when early stopping says stop.
    fn validate(&mut self, sink: &mut dyn FnMut(TrainEvent)) -> Result<bool, TrainError> {
        if self.prep.valid.is_empty() {
            return Ok(false);
        }
        let spec = self.spec;
        let tr = &spec.train;
        let ev = evaluate(
            &self.model,
            &self.stepper.ac,
            &self.prep.valid,
            &self.prep.tgt_tok,
            0, // prepare() already took the validation sample
            tr.label_smoothing,
            tr.unk_policy,
        )?;
        let samples = (0..tr.valid_samples.min(ev.sentences))
            .map(|i| Sample {
                source: self.prep.valid[i].1.src.clone(),
                reference: self.prep.valid[i].1.tgt.clone(),
                hypothesis: ev.hypotheses[i].clone(),
            })
            .collect();
        let st = &mut self.st;
        let rec = ValidationRecord {
            step: st.step,
            epoch: st.epoch,
            val_loss: ev.val_loss,
            bleu: ev.bleu,
            chrf: ev.chrf,
            cer: ev.cer,
            wer: ev.wer,
            sentences: ev.sentences as u64,
            samples,
        };
        st.last_bleu = Some((st.step, ev.bleu));
        st.best_bleu = Some(st.best_bleu.map_or(ev.bleu, |b| b.max(ev.bleu)));
        self.logs.validations.write(&rec);
        sink(TrainEvent::Validation(rec));
        Ok(st
            .early_stop
            .as_mut()
            .is_some_and(|e| e.observe(ev.bleu, ev.val_loss)))
    }

    fn checkpoint(&mut self, sink: &mut dyn FnMut(TrainEvent)) -> Result<(), TrainError> {
        self.ckpt
            .save(&self.cur, &self.model, &self.stepper, &mut self.st, sink)
    }

    /// One step on batch `batch_pos` of `plan`, then whatever is due after it: validation,
    /// the epoch's end, a checkpoint, a recovery.
    fn step(
        &mut self,
        plan: &[Vec<usize>],
        stopped_by: &mut Option<String>,
        sink: &mut dyn FnMut(TrainEvent),
    ) -> Result<After, TrainError> {
        let ts = Instant::now();
        let batch = data::make_batch(&self.prep.train, &plan[self.st.batch_pos as usize]);
        let db = batch.to_device(&self.opts.device)?;
        self.stepper.progress = budget_used(&self.spec.train, &self.st, plan.len());
        self.st.step += 1;
        let (out, gave_up) = self.stepper.step_checked(&self.model, &db, self.st.step)?;
        let st = &mut self.st;
        st.batch_pos += 1;
        let secs = ts.elapsed().as_secs_f64();
        st.tokens_total += batch.n_tgt_tokens as f64;
        st.step_time_total += secs;
        st.last_loss = out.loss;
        let rec = StepRecord {
            step: st.step,
            epoch: st.epoch,
            loss: out.loss,
            lr: out.lr,
            loss_scale: out.scale_used,
            found_inf: out.found_inf,
            skipped: out.skipped,
            grad_norm: out.grad_norm,
            tokens_per_s: batch.n_tgt_tokens as f64 / secs.max(1e-9),
            step_ms: secs * 1e3,
        };
        self.logs.metrics.write(&rec);
        sink(TrainEvent::Step(rec));
        if let Some(mut o) = out.overflow {
            o.epoch = st.epoch;
            sink(TrainEvent::Overflow(o));
        }
        if let Some(u) = out.underflow {
            sink(TrainEvent::Underflow(u));
        }
        self.streak_start = if out.skipped {
            self.streak_start.or(Some(st.step))
        } else {
            None
        };
        if let Some(e) = gave_up {
            let began = self.streak_start.unwrap_or(st.step);
            let rec = self.recover(began, e)?;
            self.streak_start = None;
            self.logs = RunLogs::open_after(&self.opts.out_dir, rec.resumed_from_step)?;
            sink(TrainEvent::Recovery(rec));
            return Ok(After::NextEpoch);
        }
        let spec = self.spec;
        let tr = &spec.train;
        if tr.valid_every > 0
            && self.st.step.is_multiple_of(tr.valid_every as u64)
            && self.validate(sink)?
        {
            *stopped_by = Some("early_stopping".into());
        }
        if (self.st.batch_pos as usize) >= plan.len() {
            self.st.epoch += 1;
            self.st.batch_pos = 0;
            let due = tr.valid_every_epochs > 0
                && self.st.epoch.is_multiple_of(tr.valid_every_epochs as u64);
            if due && !self.st.validated_now() && self.validate(sink)? {
                *stopped_by = Some("early_stopping".into());
            }
            self.checkpoint(sink)?;
            return Ok(if stopped_by.is_some() {
                After::Stop
            } else {
                After::NextEpoch
            });
        }
        if stopped_by.is_some() {
            return Ok(After::Stop);
        }
        let every = spec.checkpoint.every_steps as u64;
        if every > 0 && self.st.step.is_multiple_of(every) {
            self.checkpoint(sink)?;
        }
        Ok(After::Continue)
    }

    /// Steps until the epochs, `max_steps` or `max_time_s` run out, a cancel, or early
    /// stopping; then the last validation and checkpoint and the summary.
    fn train(
        &mut self,
        sink: &mut dyn FnMut(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<Summary, TrainError> {
        let resumed_from = self.st.step;
        let spec = self.spec;
        let tr = &spec.train;
        let max_steps = if tr.max_steps > 0 {
            tr.max_steps as u64
        } else {
            u64::MAX
        };
        let mut cancelled = false;
        let mut stopped_by: Option<String> = None;
        'epochs: while (self.st.epoch as usize) < tr.epochs {
            let plan = data::plan_epoch(
                &self.prep.train,
                tr.batch_size,
                tr.max_tokens,
                tr.seed,
                self.st.epoch,
            );
            while (self.st.batch_pos as usize) < plan.len() {
                if self.st.step >= max_steps {
                    break 'epochs;
                }
                if cancel.load(Ordering::Relaxed) {
                    cancelled = true;
                    break 'epochs;
                }
                if tr.max_time_s > 0.0 && self.st.wall_s() >= tr.max_time_s {
                    stopped_by = Some("max_time_s".into());
                    break 'epochs;
                }
                match self.step(&plan, &mut stopped_by, sink)? {
                    After::Continue => {}
                    After::NextEpoch => continue 'epochs,
                    After::Stop => break 'epochs,
                }
            }
            // an empty plan (or a resume exactly at an epoch boundary): next epoch
            self.st.epoch += 1;
            self.st.batch_pos = 0;
        }
        if self.st.step > resumed_from && !cancelled && !self.st.validated_now() {
            self.validate(sink)?;
        }
        if self.st.last_ckpt_step != Some(self.st.step) || self.st.step == 0 {
            self.checkpoint(sink)?;
        }
        let (best_checkpoint, latest_checkpoint) = self.ckpt.best_and_latest();
        let st = &self.st;
        let summary = Summary {
            run_dir: self.opts.out_dir.clone(),
            steps: st.step,
            epochs_completed: st.epoch,
            skipped_steps: self.stepper.scaler.skipped_total(),
            final_loss: st.last_loss,
            final_loss_scale: self.stepper.scaler.scale(),
            best_bleu: st.best_bleu,
            best_checkpoint,
            latest_checkpoint,
            wall_s: st.wall_s(),
            tokens_per_s: if st.step_time_total > 0.0 {
                st.tokens_total / st.step_time_total
            } else {
                0.0
            },
            cancelled,
            stopped_by,
        };
        sink(TrainEvent::Finished(summary.clone()));
        Ok(summary)
    }
}

/// The share of the run's budget used so far, 0..=1: the largest of the epochs done (this one's
/// batches counted), `max_steps` and `max_time_s` spent, each where set. Steps and epochs make it
/// exact on a resume; a `max_time_s` budget makes it follow the wall clock.
fn budget_used(t: &TrainSection, st: &RunState, plan_len: usize) -> f64 {
    let mut used = 0.0f64;
    if t.epochs > 0 {
        let within = if plan_len > 0 {
            st.batch_pos as f64 / plan_len as f64
        } else {
            0.0
        };
        used = used.max((st.epoch as f64 + within) / t.epochs as f64);
    }
    if t.max_steps > 0 {
        used = used.max(st.step as f64 / t.max_steps as f64);
    }
    if t.max_time_s > 0.0 {
        used = used.max(st.wall_s() / t.max_time_s);
    }
    used.clamp(0.0, 1.0)
}

/// Run (or resume) a training job. `sink` receives every event in order; `cancel` is checked
/// before each step: when set, the run writes a checkpoint and returns a summary with
/// `cancelled = true`.
pub fn run(
    spec: &TrainSpec,
    opts: &RunOptions,
    sink: &mut dyn FnMut(TrainEvent),
    cancel: &AtomicBool,
) -> Result<Summary, TrainError> {
    spec.validate()?;
    let t0 = Instant::now();
    let out = &opts.out_dir;
    fs::create_dir_all(out.join("checkpoints"))?;
    checkpoint::write_atomic(
        &out.join("spec.json"),
        &serde_json::to_vec_pretty(spec).unwrap_or_default(),
    )?;
    let prep = prepare(spec, out)?;
    let (mut learner, resumed_path) = Learner::start(spec, opts, prep, t0)?;

    // Every step and validation also goes to a TensorBoard event file in the run directory.
    let skipped_before = tensorboard::skipped_in_metrics(&out.join(METRICS));
    let mut tb = tensorboard::EventWriter::create(out, skipped_before)?;
    let mut tb_failed = false;
    let mut tee = |ev: TrainEvent| {
        if !tb_failed {
            if let Err(e) = tb.record(&ev) {
                tb_failed = true;
                tracing::warn!("TensorBoard event file: {e}; no more scalars are written to it");
            }
        }
        sink(ev);
    };
    let sink: &mut dyn FnMut(TrainEvent) = &mut tee;

    let (steps_per_epoch, total_steps) = learner.plan();
    sink(TrainEvent::Started(
        learner.start_info(steps_per_epoch, total_steps),
    ));
    if let Some(path) = resumed_path {
        learner.ckpt.announce(path, sink);
    }
    learner.train(sink, cancel)
}
