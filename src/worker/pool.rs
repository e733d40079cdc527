//! Worker tasks (one per device), the trainer thread per job, and event persistence.

use super::{DeviceSpec, Trainer, WorkerError};
use crate::store::checkpoints::NewCheckpoint;
use crate::store::jobs::Progress;
use crate::store::overflows::{OverflowEventRow, OverflowTensorRow, RecoveryRow, UnderflowRow};
use crate::store::{JobRow, JobStatus, MetricRow, Store, ValidationRow};
use crate::train::{
    Barrier, CheckpointRecord, OverflowRecord, RecoveryRecord, RunOptions, StartInfo, StepRecord,
    Summary, TrainEvent, ValidationRecord,
};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::task::JoinHandle;

/// Tuning knobs; the defaults suit production and tests alike.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Flush buffered step rows at least this often...
    pub flush_every: Duration,
    /// ...or as soon as this many are buffered.
    pub flush_rows: usize,
    /// Fallback poll for queued jobs (new jobs also wake workers directly).
    pub poll_every: Duration,
    /// A job whose runner crashed this many times (server crashes during it included) is
    /// failed at start instead of re-queued.
    pub max_attempts: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            flush_every: Duration::from_millis(250),
            flush_rows: 200,
            poll_every: Duration::from_secs(2),
            max_attempts: 3,
        }
    }
}

/// What SSE subscribers and the Prometheus endpoint see.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub job_id: i64,
    #[serde(flatten)]
    pub kind: JobEventKind,
}

#[derive(Debug, Clone, Serialize)]
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

/// The latest numbers of a job running in this process.
#[derive(Debug, Clone, Serialize)]
pub struct LiveJob {
    pub worker: String,
    pub device: String,
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub loss_scale: f64,
    pub skipped_steps: u64,
    pub tokens_per_s: f64,
    pub steps_per_s: f64,
}

/// Cost of persisting step metrics, for the overhead report and `/metrics`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WriteStats {
    pub flushes: u64,
    pub rows: u64,
    pub seconds: f64,
}

#[derive(Default)]
struct CancelState {
    flag: Arc<AtomicBool>,
    /// Set when a user asked for it (as opposed to server shutdown).
    by_user: AtomicBool,
}

struct Inner {
    store: Store,
    trainer: Arc<dyn Trainer>,
    runs_dir: PathBuf,
    config: PoolConfig,
    /// One channel per job with subscribers: a subscriber gets only its job's events, and a
    /// busy job cannot make another job's subscribers lag.
    events: Mutex<HashMap<i64, broadcast::Sender<JobEvent>>>,
    wake: Notify,
    shutting_down: AtomicBool,
    cancels: Mutex<HashMap<i64, Arc<CancelState>>>,
    live: Mutex<HashMap<i64, LiveJob>>,
    write_stats: Mutex<WriteStats>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    devices: Vec<DeviceSpec>,
    exports: Mutex<HashMap<(i64, String), ExportSlot>>,
}

/// One export per (job, checkpoint choice) at a time; holds the last result (checkpoint
/// sha256, model id) so a concurrent second request returns the first's model.
pub(super) type ExportSlot = Arc<tokio::sync::Mutex<Option<(String, i64)>>>;

/// Handle on the running pool; cheap to clone.
#[derive(Clone)]
pub struct PoolHandle {
    inner: Arc<Inner>,
}

impl PoolHandle {
    /// Re-queue jobs interrupted by a crash, then start one worker per device. Devices are
    /// opened here so a bad one fails startup with a clear error.
    pub async fn start(
        store: Store,
        trainer: Arc<dyn Trainer>,
        devices: Vec<DeviceSpec>,
        runs_dir: PathBuf,
        config: PoolConfig,
    ) -> anyhow::Result<Self> {
        if devices.is_empty() {
            return Err(WorkerError::Empty.into());
        }
        let opened = devices
            .iter()
            .map(|d| d.open())
            .collect::<Result<Vec<_>, _>>()?;
        std::fs::create_dir_all(&runs_dir)?;
        for (id, crashes) in store
            .fail_crash_loops(config.max_attempts.max(1) as i64)
            .await?
        {
            tracing::error!(
                job = id,
                crashes,
                "job failed: the server stopped while it ran, {crashes} runner crashes in all (--max-attempts {})",
                config.max_attempts
            );
        }
        let (requeued, cancelled) = store.recover_jobs().await?;
        if !requeued.is_empty() {
            tracing::warn!(
                jobs = ?requeued,
                "re-queued jobs interrupted by a crash; they resume from their latest checkpoint"
            );
        }
        if !cancelled.is_empty() {
            tracing::info!(jobs = ?cancelled, "jobs that were being cancelled are now cancelled");
        }
        let inner = Arc::new(Inner {
            store,
            trainer,
            runs_dir,
            config,
            events: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
            cancels: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            write_stats: Mutex::new(WriteStats::default()),
            tasks: Mutex::new(Vec::new()),
            devices: devices.clone(),
            exports: Mutex::new(HashMap::new()),
        });
        let handle = PoolHandle { inner };
        let mut tasks = Vec::new();
        for (i, (spec, device)) in devices.iter().zip(opened).enumerate() {
            let worker = Worker {
                name: format!("worker-{i}"),
                device_name: spec.to_string(),
                device,
                pool: handle.clone(),
            };
            tracing::info!(worker = %worker.name, device = %worker.device_name, "worker started");
            tasks.push(tokio::spawn(worker.run()));
        }
        *handle.inner.tasks.lock().unwrap() = tasks;
        Ok(handle)
    }

    pub(super) fn export_slot(&self, job_id: i64, choice: String) -> ExportSlot {
        self.inner
            .exports
            .lock()
            .unwrap()
            .entry((job_id, choice))
            .or_default()
            .clone()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn devices(&self) -> &[DeviceSpec] {
        &self.inner.devices
    }

    pub fn runs_dir(&self) -> &PathBuf {
        &self.inner.runs_dir
    }

    /// A job was queued: wake idle workers.
    pub fn notify_new_job(&self) {
        self.inner.wake.notify_waiters();
    }

    /// Tells subscribers that `job_ids` are queued, then wakes the claim loop once: what every
    /// route that queues work (submit, resume, fork, experiments) does after its insert.
    pub fn announce_queued(&self, job_ids: impl IntoIterator<Item = i64>) {
        for id in job_ids {
            self.publish(
                id,
                JobEventKind::Status {
                    status: JobStatus::Queued,
                    error: None,
                },
            );
        }
        self.notify_new_job();
    }

    /// Events of job `job_id` from now on.
    pub fn subscribe(&self, job_id: i64) -> broadcast::Receiver<JobEvent> {
        let mut map = self.inner.events.lock().unwrap();
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.entry(job_id)
            .or_insert_with(|| broadcast::channel(4096).0)
            .subscribe()
    }

    pub fn publish(&self, job_id: i64, kind: JobEventKind) {
        let mut map = self.inner.events.lock().unwrap();
        if let Some(tx) = map.get(&job_id) {
            if tx.send(JobEvent { job_id, kind }).is_err() {
                // nobody listens any more
                map.remove(&job_id);
            }
        }
    }

    /// Ask a running job to stop (the trainer checkpoints and returns). The caller has already
    /// moved it to `cancelling` in the database.
    pub fn request_cancel(&self, job_id: i64) {
        let state = self
            .inner
            .cancels
            .lock()
            .unwrap()
            .entry(job_id)
            .or_default()
            .clone();
        state.by_user.store(true, Ordering::SeqCst);
        state.flag.store(true, Ordering::SeqCst);
    }

    pub fn live_jobs(&self) -> Vec<(i64, LiveJob)> {
        let mut v: Vec<_> = self
            .inner
            .live
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    pub fn write_stats(&self) -> WriteStats {
        *self.inner.write_stats.lock().unwrap()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Graceful stop: running jobs checkpoint and go back to `queued`; returns when every
    /// worker has persisted its job's final state.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        for state in self.inner.cancels.lock().unwrap().values() {
            state.flag.store(true, Ordering::SeqCst);
        }
        self.inner.wake.notify_waiters();
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap());
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!("worker task ended abnormally: {e}");
            }
        }
    }
}

/// Events a trainer may have in flight before it waits for the worker to persist them.
const EVENT_QUEUE: usize = 1024;

enum Msg {
    Event(TrainEvent),
    /// The trainer is about to write the checkpoint at this step: flush, then answer.
    Barrier(u64, std::sync::mpsc::SyncSender<Result<(), String>>),
    Done(Result<Summary, Failure>),
}

/// Why a run ended without a summary.
struct Failure {
    message: String,
    /// The training process died (as opposed to the trainer reporting an error).
    crashed: bool,
}

struct Worker {
    name: String,
    device_name: String,
    device: candle_core::Device,
    pool: PoolHandle,
}

impl Worker {
    async fn run(self) {
        let inner = &self.pool.inner;
        loop {
            // Register for wake-ups before looking, so a job queued in between is not missed.
            let wake = inner.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if inner.shutting_down.load(Ordering::SeqCst) {
                break;
            }
            match inner
                .store
                .claim_next_job(&self.name, &self.device_name)
                .await
            {
                Ok(Some(job)) => {
                    let id = job.id;
                    if let Err(e) = self.run_job(job).await {
                        tracing::error!(job = id, "persisting job failed: {e:#}");
                        let _ = inner
                            .store
                            .finish_job(
                                id,
                                JobStatus::Failed,
                                Some(&format!("server error: {e:#}")),
                            )
                            .await;
                        self.pool.publish(
                            id,
                            JobEventKind::Status {
                                status: JobStatus::Failed,
                                error: Some(format!("server error: {e:#}")),
                            },
                        );
                    }
                }
                Ok(None) => {
                    tokio::select! {
                        _ = &mut wake => {}
                        _ = tokio::time::sleep(inner.config.poll_every) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(worker = %self.name, "claiming a job failed: {e}");
                    tokio::time::sleep(inner.config.poll_every).await;
                }
            }
        }
        tracing::info!(worker = %self.name, "worker stopped");
    }

    async fn run_job(&self, job: JobRow) -> anyhow::Result<()> {
        let inner = &self.pool.inner;
        let id = job.id;
        let run_dir = inner.runs_dir.join(id.to_string());
        std::fs::create_dir_all(&run_dir)?;
        // A fork's first run: its parent's checkpoint moves in, and the resume below starts there.
        if let Some(seed) = job.seed_dir.as_deref() {
            super::fork::seed_run_dir(std::path::Path::new(seed), &run_dir)?;
            inner.store.clear_seed_dir(id).await?;
        }
        inner
            .store
            .set_job_run_dir(id, &run_dir.to_string_lossy())
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
        let spec = job.spec;
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
                .map_err(|_| "the worker stopped listening".to_string())?;
            ack_rx
                .recv()
                .map_err(|_| "the worker stopped listening".to_string())?
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
                let r = self.consume(id, rx).await;
                let _ = tokio::task::spawn_blocking(move || handle.join()).await;
                r?
            }
            Err(e) => Err(Failure {
                message: format!("cannot spawn the trainer thread: {e}"),
                crashed: false,
            }),
        };
        inner.cancels.lock().unwrap().remove(&id);
        inner.live.lock().unwrap().remove(&id);

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
                    let n = inner.store.record_crash(id).await?;
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
        let changed = inner.store.finish_job(id, status, error.as_deref()).await?;
        if changed {
            match &error {
                Some(e) => tracing::warn!(job = id, "job failed: {e}"),
                None => tracing::info!(job = id, status = %status, "job ended"),
            }
            // export before announcing the terminal status: SSE streams end with it
            if status == JobStatus::Succeeded {
                self.auto_export(id).await;
            }
            self.pool
                .publish(id, JobEventKind::Status { status, error });
        }
        Ok(())
    }

    /// Export a succeeded job's best checkpoint for translation. A job without checkpoints (or
    /// a failed export) stays succeeded; the reason is logged.
    async fn auto_export(&self, id: i64) {
        let job = match self.pool.inner.store.get_job(id).await {
            Ok(Some(j)) => j,
            _ => return,
        };
        match self
            .pool
            .export_job(&job, crate::infer::CheckpointChoice::Best, None)
            .await
        {
            Ok(m) => {
                tracing::info!(job = id, model = m.id, path = %m.path, "exported for translation");
                self.pool.publish(
                    id,
                    JobEventKind::Model {
                        model_id: m.id,
                        name: m.name,
                    },
                );
            }
            Err(super::ExportFailure::NotFound(why)) => {
                tracing::info!(job = id, "not exported: {why}")
            }
            Err(e) => tracing::warn!(job = id, "export failed: {e}"),
        }
    }

    /// Persist the trainer's events until it is done. Step rows are buffered and written in
    /// one transaction every `flush_every` or `flush_rows`; other events flush first so rows
    /// stay in step order relative to them.
    async fn consume(
        &self,
        id: i64,
        mut rx: mpsc::Receiver<Msg>,
    ) -> anyhow::Result<Result<Summary, Failure>> {
        let inner = &self.pool.inner;
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
                            self.flush(id, &mut buf, &progress).await?;
                        }
                    }
                    Some(Msg::Event(ev)) => {
                        self.flush(id, &mut buf, &progress).await?;
                        self.handle_event(id, ev, &mut progress, &mut total_steps).await?;
                    }
                    Some(Msg::Barrier(_step, ack)) => {
                        match self.flush(id, &mut buf, &progress).await {
                            Ok(()) => {
                                let _ = ack.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = ack.send(Err(format!("{e:#}")));
                                return Err(e);
                            }
                        }
                    }
                    Some(Msg::Done(result)) => {
                        self.flush(id, &mut buf, &progress).await?;
                        return Ok(result);
                    }
                    None => {
                        self.flush(id, &mut buf, &progress).await?;
                        return Ok(Err(Failure {
                            message: "the trainer thread exited without a result".into(),
                            crashed: false,
                        }));
                    }
                },
                _ = ticker.tick() => {
                    self.flush(id, &mut buf, &progress).await?;
                }
            }
        }
    }

    async fn flush(
        &self,
        id: i64,
        buf: &mut Vec<MetricRow>,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let store = &self.pool.inner.store;
        store.insert_metrics(id, buf).await?;
        store.set_job_progress(id, progress).await?;
        let mut st = self.pool.inner.write_stats.lock().unwrap();
        st.flushes += 1;
        st.rows += buf.len() as u64;
        st.seconds += t.elapsed().as_secs_f64();
        buf.clear();
        Ok(())
    }

    async fn handle_event(
        &self,
        id: i64,
        ev: TrainEvent,
        progress: &mut Progress,
        total_steps: &mut u64,
    ) -> anyhow::Result<()> {
        let store = &self.pool.inner.store;
        match ev {
            TrainEvent::Started(info) => {
                let from = info.resumed_from_step as i64;
                // A resumed run rewrites everything after its checkpoint.
                let m = store.delete_metrics_after(id, from).await?;
                store.delete_validations_after(id, from).await?;
                store.delete_checkpoints_after(id, from).await?;
                store.delete_overflows_after(id, from).await?;
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
                    store.forget_checkpoints(id, &gone).await?;
                }
                let skipped = store.count_skipped_steps(id, from).await?;
                store
                    .set_job_started(id, info.total_steps as i64, from, skipped)
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
                        id,
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
                    .set_job_validation(id, v.step as i64, v.val_loss, v.bleu, v.chrf)
                    .await?;
                self.pool.publish(id, JobEventKind::Validation(v));
            }
            TrainEvent::Checkpoint(c) => {
                let removed: Vec<String> = c
                    .removed
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                store
                    .record_checkpoint(
                        id,
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
                store.insert_overflow(id, &overflow_row(&o)).await?;
                self.pool.publish(id, JobEventKind::Overflow(o));
            }
            TrainEvent::Recovery(r) => {
                // The run went back to a checkpoint: what came after it is written again. The
                // overflow forensics stay: they are the record of what led to the collapse.
                let from = r.resumed_from_step as i64;
                store.delete_metrics_after(id, from).await?;
                store.delete_validations_after(id, from).await?;
                store.delete_checkpoints_after(id, from).await?;
                store
                    .insert_recovery(
                        id,
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
                store.set_job_progress(id, progress).await?;
                tracing::warn!(job = id, step = r.step, action = %r.action, from, "loss scale collapsed; recovered");
                self.pool.publish(id, JobEventKind::Recovery(r));
            }
            TrainEvent::Underflow(u) => {
                store
                    .insert_underflow(
                        id,
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
                store.set_job_progress(id, progress).await?;
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

pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}
