//! One claimed job's run: its run directory (a fork's staged checkpoint moved in), a fresh
//! cancel state, the trainer on its own OS thread streaming events back over a bounded channel,
//! and the outcome turned into the job's final status through [`PoolHandle::end_job`].

use super::claim::Worker;
use super::events::JobEventKind;
use super::pool::CancelState;
use crate::store::{JobRow, JobStatus};
use crate::train::{Barrier, BarrierError, RunOptions, Summary, TrainEvent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Events a trainer may have in flight before it waits for the worker to persist them.
const EVENT_QUEUE: usize = 1024;

pub(super) enum Msg {
    Event(TrainEvent),
    /// The trainer is about to write the checkpoint at this step: flush, then answer.
    Barrier(u64, std::sync::mpsc::SyncSender<Result<(), BarrierError>>),
    Done(Result<Summary, Failure>),
}

/// Why a run ended without a summary.
pub(super) struct Failure {
    pub(super) message: String,
    /// The training process died (as opposed to the trainer reporting an error).
    pub(super) crashed: bool,
}

impl Worker {
    /// Run a job this node has claimed. Every write for it is guarded by its lease: an error
    /// that says the lease is lost means another node runs it now.
    pub(super) async fn run_job(&self, job: JobRow) -> anyhow::Result<()> {
        let id = job.id;
        self.pool.inner.running.lock().unwrap().insert(id);
        let r = self.run_leased(job).await;
        self.pool.inner.running.lock().unwrap().remove(&id);
        r
    }

    async fn run_leased(&self, job: JobRow) -> anyhow::Result<()> {
        let inner = &self.pool.inner;
        let id = job.id;
        let lease = self.pool.lease(id);
        let run_dir = inner.runs_dir.join(id.to_string());
        std::fs::create_dir_all(&run_dir)?;
        // A job another node ran (or this one before another took it over): its files as the
        // artifact store has them.
        self.pool.restore_run(&lease, &run_dir).await?;
        // A fork's first run: its parent's checkpoint moves in, and the resume below starts there.
        if let Some(seed) = job.seed_dir.as_deref() {
            // (staged on another node: fetched from the artifact store)
            let seed = self
                .pool
                .local_fork_seed(std::path::Path::new(seed))
                .await?;
            if !seed.is_dir() && crate::checkpoint::list(&run_dir.join("checkpoints")).is_empty() {
                // (not a retry whose run directory holds the seed already)
                anyhow::bail!(
                    "the fork's staged checkpoint ({}) is neither on this node nor in the artifact store",
                    seed.display()
                );
            }
            super::fork::seed_run_dir(&seed, &run_dir)?;
            inner.store.clear_seed_dir(&lease).await?;
            self.pool.delete_fork_seed(&seed).await?;
        }
        inner
            .store
            .set_job_run_dir(&lease, &run_dir.to_string_lossy())
            .await?;
        // A fresh cancel state: one left by a cancel that came after the previous run of this
        // job ended must not stop this one. A cancel that came between the claim and now is
        // in the database.
        let cancel = Arc::new(CancelState::default());
        inner.cancels.lock().unwrap().insert(id, cancel.clone());
        if inner.shutting_down.load(Ordering::SeqCst) {
            cancel.flag.store(true, Ordering::SeqCst);
        }
        if let Some(j) = inner.store.get_job(id).await? {
            if j.status() == JobStatus::Cancelling {
                cancel.by_user.store(true, Ordering::SeqCst);
                cancel.flag.store(true, Ordering::SeqCst);
            }
        }
        tracing::info!(job = id, worker = %self.name, device = %self.device_name, attempt = job.attempts, "job started");
        let mut spec = job.spec;
        // Uploaded corpora another node took: this node's copy, fetched from the artifact store.
        self.pool.localize_corpora(&mut spec).await?;
        self.pool.publish(
            id,
            JobEventKind::Status {
                status: JobStatus::Running,
                error: None,
            },
        );

        // Bounded: a trainer faster than the database waits instead of growing a queue.
        let (tx, rx) = mpsc::channel::<Msg>(EVENT_QUEUE);
        let barrier_tx = tx.clone();
        let barrier = Barrier::new(move |step| {
            let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
            barrier_tx
                .blocking_send(Msg::Barrier(step, ack_tx))
                .map_err(|_| BarrierError::Gone("the worker stopped listening"))?;
            ack_rx
                .recv()
                .map_err(|_| BarrierError::Gone("the worker stopped listening"))?
        });
        let opts = RunOptions {
            out_dir: run_dir,
            device: self.device.clone(),
            resume: true,
            barrier: Some(barrier),
        };
        let trainer = inner.trainer.clone();
        let flag = cancel.flag.clone();
        let thread = std::thread::Builder::new()
            .name(format!("train-job-{id}"))
            .spawn(move || {
                let events = tx.clone();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut sink = |ev: TrainEvent| {
                        let _ = events.blocking_send(Msg::Event(ev));
                    };
                    trainer.run(&spec, &opts, &mut sink, &flag)
                }));
                let result = match result {
                    Ok(Ok(summary)) => Ok(summary),
                    Ok(Err(e)) => Err(Failure {
                        crashed: matches!(e, crate::train::TrainError::Crashed(_)),
                        message: e.to_string(),
                    }),
                    Err(panic) => Err(Failure {
                        message: format!("trainer panicked: {}", panic_message(&*panic)),
                        crashed: false,
                    }),
                };
                let _ = tx.blocking_send(Msg::Done(result));
            });
        let outcome = match thread {
            Ok(handle) => {
                let r = self.consume(&lease, rx).await;
                if r.is_err() {
                    // Nobody persists its events any more (the lease is lost or the database
                    // failed): the trainer stops at its next step.
                    cancel.flag.store(true, Ordering::SeqCst);
                }
                let _ = tokio::task::spawn_blocking(move || handle.join()).await;
                r
            }
            Err(e) => Ok(Err(Failure {
                message: format!("cannot spawn the trainer thread: {e}"),
                crashed: false,
            })),
        };
        inner.cancels.lock().unwrap().remove(&id);
        inner.live.lock().unwrap().remove(&id);
        let outcome = outcome?;
        if cancel.lease_lost.load(Ordering::SeqCst) {
            return Err(crate::store::StoreError::LeaseLost { job_id: id }.into());
        }

        let (status, error) = match outcome {
            Ok(s) if !s.cancelled => (JobStatus::Succeeded, None),
            Ok(_) => {
                if cancel.by_user.load(Ordering::SeqCst) || !self.pool.is_shutting_down() {
                    (JobStatus::Cancelled, None)
                } else {
                    (JobStatus::Queued, None)
                }
            }
            // Killed along with the server (a service manager stopping the whole group): the
            // shutdown re-queues it like any other running job.
            Err(f) if f.crashed && self.pool.is_shutting_down() => (JobStatus::Queued, None),
            Err(f) => {
                if f.crashed {
                    let n = inner.store.record_crash(&lease).await?;
                    tracing::error!(
                        job = id,
                        crashes = n,
                        "training process died: {}",
                        f.message
                    );
                }
                (JobStatus::Failed, Some(f.message))
            }
        };
        // A cancel that was answered 202 wins over a run that finished in the meantime.
        let status = if status == JobStatus::Succeeded
            && (cancel.by_user.load(Ordering::SeqCst)
                || inner
                    .store
                    .get_job(id)
                    .await?
                    .is_some_and(|j| j.status() == JobStatus::Cancelling))
        {
            JobStatus::Cancelled
        } else {
            status
        };
        self.pool.end_job(id, status, error).await?;
        Ok(())
    }
}

pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}
