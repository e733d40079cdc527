//! Event persistence: what a running trainer streams back, written to the store. Step rows are
//! buffered and written in batches; every other event flushes them first so rows stay in step
//! order; a checkpoint's barrier is answered once the rows it covers are durable. Each event is
//! published to the job's subscribers after it is stored.

use super::claim::Worker;
use super::events::JobEventKind;
use super::job::{Failure, Msg};
use super::pool::LiveJob;
use crate::store::checkpoints::NewCheckpoint;
use crate::store::jobs::Progress;
use crate::store::overflows::{OverflowEventRow, OverflowTensorRow, RecoveryRow, UnderflowRow};
use crate::store::{Lease, MetricRow, ValidationRow};
use crate::train::{BarrierError, OverflowRecord, StepRecord, Summary, TrainEvent};
use std::time::Instant;
use tokio::sync::mpsc;

impl Worker {
    /// Persist the trainer's events until it is done. Step rows are buffered and written in
    /// one transaction every `flush_every` or `flush_rows`; other events flush first so rows
    /// stay in step order relative to them.
    pub(super) async fn consume(
        &self,
        lease: &Lease,
        mut rx: mpsc::Receiver<Msg>,
    ) -> anyhow::Result<Result<Summary, Failure>> {
        let inner = &self.pool.inner;
        let id = lease.job_id;
        let mut buf: Vec<MetricRow> = Vec::new();
        let mut progress = Progress::default();
        let mut total_steps = 0u64;
        let mut ticker = tokio::time::interval(inner.config.flush_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Event(TrainEvent::Step(s))) => {
                        if s.skipped {
                            progress.skipped_steps += 1;
                        }
                        progress.step = s.step as i64;
                        progress.epoch = s.epoch as i64;
                        progress.loss = Some(s.loss);
                        progress.lr = Some(s.lr);
                        progress.loss_scale = Some(s.loss_scale);
                        progress.tokens_per_s = Some(s.tokens_per_s);
                        progress.step_ms = Some(s.step_ms);
                        inner.live.lock().unwrap().insert(id, LiveJob {
                            worker: self.name.clone(),
                            device: self.device_name.clone(),
                            step: s.step,
                            total_steps,
                            loss: s.loss,
                            loss_scale: s.loss_scale,
                            skipped_steps: progress.skipped_steps as u64,
                            tokens_per_s: s.tokens_per_s,
                            steps_per_s: if s.step_ms > 0.0 { 1000.0 / s.step_ms } else { 0.0 },
                        });
                        buf.push(metric_row(&s));
                        self.pool.publish(id, JobEventKind::Step(s));
                        if buf.len() >= inner.config.flush_rows {
                            self.flush(lease, &mut buf, &progress).await?;
                        }
                    }
                    Some(Msg::Event(ev)) => {
                        self.flush(lease, &mut buf, &progress).await?;
                        self.handle_event(lease, ev, &mut progress, &mut total_steps).await?;
                    }
                    Some(Msg::Barrier(_step, ack)) => {
                        match self.flush(lease, &mut buf, &progress).await {
                            Ok(()) => {
                                let _ = ack.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = ack.send(Err(BarrierError::Persist(format!("{e:#}"))));
                                return Err(e);
                            }
                        }
                    }
                    Some(Msg::Done(result)) => {
                        self.flush(lease, &mut buf, &progress).await?;
                        return Ok(result);
                    }
                    None => {
                        self.flush(lease, &mut buf, &progress).await?;
                        return Ok(Err(Failure {
                            message: "the trainer thread exited without a result".into(),
                            crashed: false,
                        }));
                    }
                },
                _ = ticker.tick() => {
                    self.flush(lease, &mut buf, &progress).await?;
                }
            }
        }
    }

    async fn flush(
        &self,
        lease: &Lease,
        buf: &mut Vec<MetricRow>,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let store = &self.pool.inner.store;
        store.insert_metrics(lease, buf).await?;
        store.set_job_progress(lease, progress).await?;
        let mut st = self.pool.inner.write_stats.lock().unwrap();
        st.flushes += 1;
        st.rows += buf.len() as u64;
        st.seconds += t.elapsed().as_secs_f64();
        buf.clear();
        Ok(())
    }

    async fn handle_event(
        &self,
        lease: &Lease,
        ev: TrainEvent,
        progress: &mut Progress,
        total_steps: &mut u64,
    ) -> anyhow::Result<()> {
        let store = &self.pool.inner.store;
        let id = lease.job_id;
        match ev {
            TrainEvent::Started(info) => {
                let from = info.resumed_from_step as i64;
                // A resumed run rewrites everything after its checkpoint.
                let m = store.delete_metrics_after(lease, from).await?;
                store.delete_validations_after(lease, from).await?;
                store.delete_checkpoints_after(lease, from).await?;
                store.delete_overflows_after(lease, from).await?;
                self.pool.upload_tokenizers(id, &info.run_dir).await?;
                // Rows of files that are gone (removed by retention just before a crash).
                let gone: Vec<String> = store
                    .list_checkpoints(id)
                    .await?
                    .into_iter()
                    .map(|c| c.path)
                    .filter(|p| !std::path::Path::new(p).exists())
                    .collect();
                if !gone.is_empty() {
                    tracing::info!(
                        job = id,
                        rows = gone.len(),
                        "dropped rows of checkpoints no longer on disk"
                    );
                    store.forget_checkpoints(lease, &gone).await?;
                }
                let skipped = store.count_skipped_steps(id, from).await?;
                store
                    .set_job_started(lease, info.total_steps as i64, from, skipped)
                    .await?;
                *progress = Progress {
                    step: from,
                    skipped_steps: skipped,
                    ..Progress::default()
                };
                *total_steps = info.total_steps;
                if from > 0 {
                    tracing::info!(
                        job = id,
                        step = from,
                        replaced_rows = m,
                        "job resumed from checkpoint"
                    );
                }
                self.pool.publish(id, JobEventKind::Started(info));
            }
            TrainEvent::Validation(v) => {
                store
                    .insert_validation(
                        lease,
                        &ValidationRow {
                            step: v.step as i64,
                            epoch: v.epoch as i64,
                            val_loss: Some(v.val_loss),
                            bleu: Some(v.bleu),
                            chrf: Some(v.chrf),
                            cer: Some(v.cer),
                            wer: Some(v.wer),
                            sentences: v.sentences as i64,
                            samples_json: serde_json::to_string(&v.samples)?,
                            created_at: String::new(),
                        },
                    )
                    .await?;
                store
                    .set_job_validation(lease, v.step as i64, v.val_loss, v.bleu, v.chrf)
                    .await?;
                self.pool.publish(id, JobEventKind::Validation(v));
            }
            TrainEvent::Checkpoint(c) => {
                let removed: Vec<String> = c
                    .removed
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                self.pool.upload_checkpoint(id, &c.path, &c.removed).await?;
                store
                    .record_checkpoint(
                        lease,
                        &NewCheckpoint {
                            step: c.step as i64,
                            epoch: c.epoch as i64,
                            path: c.path.to_string_lossy().into_owned(),
                            size_bytes: c.size_bytes as i64,
                            sha256: c.sha256.clone(),
                            val_bleu: c.val_bleu,
                            is_best: c.is_best,
                        },
                        &removed,
                    )
                    .await?;
                self.pool.publish(id, JobEventKind::Checkpoint(c));
            }
            TrainEvent::Overflow(o) => {
                store.insert_overflow(lease, &overflow_row(&o)).await?;
                self.pool.publish(id, JobEventKind::Overflow(o));
            }
            TrainEvent::Recovery(r) => {
                // The run went back to a checkpoint: what came after it is written again. The
                // overflow forensics stay: they are the record of what led to the collapse.
                let from = r.resumed_from_step as i64;
                store.delete_metrics_after(lease, from).await?;
                store.delete_validations_after(lease, from).await?;
                store.delete_checkpoints_after(lease, from).await?;
                store
                    .insert_recovery(
                        lease,
                        &RecoveryRow {
                            step: r.step as i64,
                            action: r.action.clone(),
                            resumed_from_step: from,
                            precision: r.precision.clone(),
                            lr: r.lr,
                            reason: r.reason.clone(),
                            created_at: String::new(),
                        },
                    )
                    .await?;
                progress.step = from;
                progress.skipped_steps = store.count_skipped_steps(id, from).await?;
                store.set_job_progress(lease, progress).await?;
                tracing::warn!(job = id, step = r.step, action = %r.action, from, "loss scale collapsed; recovered");
                self.pool.publish(id, JobEventKind::Recovery(r));
            }
            TrainEvent::Underflow(u) => {
                store
                    .insert_underflow(
                        lease,
                        &UnderflowRow {
                            step: u.step as i64,
                            loss_scale: Some(u.loss_scale),
                            n_values: u.values as i64,
                            zero_share: u.zero_share,
                            underflow_share: u.underflow_share,
                        },
                    )
                    .await?;
            }
            TrainEvent::Finished(s) => {
                // Skipped steps are counted from the stored rows (the summary may only cover
                // this attempt).
                progress.loss_scale = Some(s.final_loss_scale);
                store.set_job_progress(lease, progress).await?;
                self.pool.publish(id, JobEventKind::Finished(s));
            }
            TrainEvent::Step(_) => unreachable!("steps are buffered by the caller"),
        }
        Ok(())
    }
}

fn overflow_row(o: &OverflowRecord) -> OverflowEventRow {
    OverflowEventRow {
        step: o.step as i64,
        epoch: o.epoch as i64,
        loss_scale: Some(o.loss_scale),
        loss_finite: o.loss_finite,
        activation: o.activation.clone(),
        activation_max: o.activation_max,
        tensors: o
            .tensors
            .iter()
            .map(|t| OverflowTensorRow {
                tensor: t.name.clone(),
                non_finite: t.non_finite as i64,
                numel: t.numel as i64,
                max_finite: t.max_finite,
            })
            .collect(),
    }
}

fn metric_row(s: &StepRecord) -> MetricRow {
    MetricRow {
        step: s.step as i64,
        epoch: s.epoch as i64,
        loss: Some(s.loss),
        lr: Some(s.lr),
        loss_scale: Some(s.loss_scale),
        found_inf: s.found_inf,
        skipped: s.skipped,
        grad_norm: Some(s.grad_norm),
        tokens_per_s: Some(s.tokens_per_s),
        step_ms: Some(s.step_ms),
    }
}
