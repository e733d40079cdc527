//! The pool's handle: start (recovery of interrupted jobs, one worker per device), the per-job
//! event channels, cancellation, live numbers, shutdown, and [`PoolHandle::end_job`], the one
//! place a job's run ends. The claim loop is `claim.rs`, a job's run `job.rs`, event
//! persistence `persist.rs`.

use super::claim::Worker;
use super::events::{JobEvent, JobEventKind};
use super::{DeviceSpec, Trainer, WorkerError};
use crate::artifacts::ArtifactStore;
use crate::store::{JobStatus, Lease, Store, StoreResult};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};
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
    /// This node's id: the `owner` of the jobs it claims, its row in `nodes`.
    pub node_id: String,
    /// A job whose owner has not renewed its lease for this long may be claimed by another
    /// node; the heartbeat renews every third of it.
    pub lease_timeout: Duration,
    /// The URL other nodes and users reach this node's API at (shown in `GET /api/nodes`).
    pub advertise_url: Option<String>,
    /// Where checkpoints and models are shared with other nodes; None: the data directory
    /// is the store (one node, or several on one file system).
    pub artifacts: Option<ArtifactStore>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            flush_every: Duration::from_millis(250),
            flush_rows: 200,
            poll_every: Duration::from_secs(2),
            max_attempts: 3,
            node_id: "local".into(),
            lease_timeout: Duration::from_secs(30),
            advertise_url: None,
            artifacts: None,
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
pub(super) struct CancelState {
    pub(super) flag: Arc<AtomicBool>,
    /// Set when a user asked for it (as opposed to server shutdown).
    pub(super) by_user: AtomicBool,
    /// Set when another node took the job over: nothing more is written for this run.
    pub(super) lease_lost: AtomicBool,
}

pub(super) struct Inner {
    pub(super) store: Store,
    pub(super) trainer: Arc<dyn Trainer>,
    pub(super) runs_dir: PathBuf,
    pub(super) config: PoolConfig,
    /// One channel per job with subscribers: a subscriber gets only its job's events, and a
    /// busy job cannot make another job's subscribers lag.
    pub(super) events: Mutex<HashMap<i64, broadcast::Sender<JobEvent>>>,
    pub(super) wake: Notify,
    pub(super) shutting_down: AtomicBool,
    pub(super) cancels: Mutex<HashMap<i64, Arc<CancelState>>>,
    pub(super) live: Mutex<HashMap<i64, LiveJob>>,
    pub(super) write_stats: Mutex<WriteStats>,
    pub(super) tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(super) devices: Vec<DeviceSpec>,
    pub(super) exports: Mutex<HashMap<(i64, String), ExportSlot>>,
    /// The heartbeat and the cross-node event relay: stopped at shutdown.
    pub(super) background: Mutex<Vec<JoinHandle<()>>>,
    /// Jobs a worker of this node runs now (the heartbeat checks their leases).
    pub(super) running: Mutex<HashSet<i64>>,
    /// The queue of events for other nodes (PostgreSQL only; see `relay.rs`).
    pub(super) relay: Mutex<Option<tokio::sync::mpsc::Sender<String>>>,
    /// SQLite's poller: (status, step) last published per followed job (see `relay.rs`).
    pub(super) followed: Mutex<HashMap<i64, (String, i64)>>,
}

/// One export per (job, checkpoint choice) at a time; holds the last result (checkpoint
/// sha256, model id) so a concurrent second request returns the first's model.
pub(super) type ExportSlot = Arc<tokio::sync::Mutex<Option<(String, i64)>>>;

/// Handle on the running pool; cheap to clone.
#[derive(Clone)]
pub struct PoolHandle {
    pub(super) inner: Arc<Inner>,
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
        let node = config.node_id.clone();
        for (id, crashes) in store
            .fail_crash_loops(&node, config.max_attempts.max(1) as i64)
            .await?
        {
            tracing::error!(
                job = id,
                crashes,
                "job failed: the server stopped while it ran, {crashes} runner crashes in all (--max-attempts {})",
                config.max_attempts
            );
        }
        let (requeued, cancelled) = store.recover_jobs(&node).await?;
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
            background: Mutex::new(Vec::new()),
            running: Mutex::new(HashSet::new()),
            relay: Mutex::new(None),
            followed: Mutex::new(HashMap::new()),
        });
        let handle = PoolHandle { inner };
        handle.register_node().await?;
        let heartbeat = tokio::spawn(handle.clone().heartbeat());
        let relay = super::relay::start(handle.clone()).await?;
        let mut bg = handle.inner.background.lock().unwrap();
        bg.push(heartbeat);
        bg.extend(relay);
        drop(bg);
        let mut tasks = Vec::new();
        for (i, (spec, device)) in devices.iter().zip(opened).enumerate() {
            let worker = Worker {
                name: format!("worker-{i}"),
                device_name: spec.to_string(),
                kind: spec.kind(),
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

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    pub fn lease_timeout(&self) -> Duration {
        self.inner.config.lease_timeout
    }

    pub fn artifacts(&self) -> Option<&ArtifactStore> {
        self.inner.config.artifacts.as_ref()
    }

    /// This node's lease on job `job_id` (valid while the database names it the owner).
    pub fn lease(&self, job_id: i64) -> Lease {
        Lease::new(job_id, self.node_id())
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

    /// Publish to this node's subscribers and, through the database, to every other node's
    /// (PostgreSQL NOTIFY; other nodes relay it into their own channels).
    pub fn publish(&self, job_id: i64, kind: JobEventKind) {
        super::relay::forward(self, job_id, &kind);
        self.publish_local(job_id, kind);
    }

    /// Publish to this node's subscribers only.
    pub(super) fn publish_local(&self, job_id: i64, kind: JobEventKind) {
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

    /// End a job's run as `status` (with `error`, the cause of a failure): the one place that
    /// finishes a run and announces it. When the row changed (it was still active) the end is
    /// logged, a succeeded job is exported for translation before the status is published (SSE
    /// streams end with it), and subscribers get the status. Returns whether the row changed.
    pub(super) async fn end_job(
        &self,
        id: i64,
        status: JobStatus,
        error: Option<String>,
    ) -> StoreResult<bool> {
        let changed = self
            .inner
            .store
            .finish_job(&self.lease(id), status, error.as_deref())
            .await?;
        if changed {
            match &error {
                Some(e) => tracing::warn!(job = id, "job failed: {e}"),
                None => tracing::info!(job = id, status = %status, "job ended"),
            }
            if status == JobStatus::Succeeded {
                self.auto_export(id).await;
            }
            self.publish(id, JobEventKind::Status { status, error });
        }
        Ok(changed)
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
        for t in std::mem::take(&mut *self.inner.background.lock().unwrap()) {
            t.abort();
        }
        if let Err(e) = self.inner.store.remove_node(self.node_id()).await {
            tracing::warn!("cannot remove this node's row: {e}");
        }
    }
}
