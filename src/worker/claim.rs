//! The claim loop: one per device. It waits for queued work (a wake-up from a route that queued
//! a job, or the fallback poll), claims the next job in the single call to
//! `store.claim_next_job` below, and runs it (`job.rs`) to its end before claiming again.

use super::events::JobEventKind;
use super::pool::PoolHandle;
use crate::store::leases::Claim;
use crate::store::nodes::DeviceKind;
use crate::store::JobStatus;
use std::sync::atomic::Ordering;

pub(super) struct Worker {
    pub(super) name: String,
    pub(super) device_name: String,
    pub(super) kind: DeviceKind,
    pub(super) device: candle_core::Device,
    pub(super) pool: PoolHandle,
}

impl Worker {
    pub(super) async fn run(self) {
        let inner = &self.pool.inner;
        loop {
            // Register for wake-ups before looking, so a job queued in between is not missed.
            let wake = inner.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if inner.shutting_down.load(Ordering::SeqCst) {
                break;
            }
            let max_attempts = inner.config.max_attempts.max(1) as i64;
            self.fail_abandoned_crash_loops(max_attempts).await;
            let claim = Claim {
                node: &inner.config.node_id,
                worker: &self.name,
                device: &self.device_name,
                kind: self.kind,
                lease_ms: inner.config.lease_timeout.as_millis() as i64,
                max_attempts,
            };
            match inner.store.claim_next_job(&claim).await {
                Ok(Some(job)) => {
                    let id = job.id;
                    if let Err(e) = self.run_job(job).await {
                        if is_lease_lost(&e) {
                            tracing::warn!(
                                job = id,
                                "lease lost: another node runs the job now; stopped here"
                            );
                            continue;
                        }
                        tracing::error!(job = id, "persisting job failed: {e:#}");
                        let error = Some(format!("server error: {e:#}"));
                        if let Err(e) = self.pool.end_job(id, JobStatus::Failed, error).await {
                            tracing::error!(job = id, "recording the failure failed: {e}");
                        }
                    }
                }
                Ok(None) => {
                    // Also look for expired leases (takeovers) a few times per lease timeout.
                    let poll = inner.config.poll_every.min(inner.config.lease_timeout / 3);
                    tokio::select! {
                        _ = &mut wake => {}
                        _ = tokio::time::sleep(poll) => {}
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

    /// Fail (rather than take over) the dead nodes' jobs that have crashed `--max-attempts`
    /// times, and tell their subscribers on every node.
    async fn fail_abandoned_crash_loops(&self, max_attempts: i64) {
        let inner = &self.pool.inner;
        match inner
            .store
            .fail_abandoned_crash_loops(&inner.config.node_id, max_attempts)
            .await
        {
            Ok(failed) => {
                for (id, crashes) in failed {
                    tracing::error!(
                        job = id,
                        crashes,
                        "job failed: its node stopped renewing the lease, {crashes} runner crashes in all (--max-attempts {max_attempts}); not taken over"
                    );
                    let error = inner
                        .store
                        .get_job(id)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|j| j.error);
                    self.pool.publish(
                        id,
                        JobEventKind::Status {
                            status: JobStatus::Failed,
                            error,
                        },
                    );
                }
            }
            Err(e) => {
                tracing::error!(worker = %self.name, "failing crash-looping jobs failed: {e}")
            }
        }
    }
}

/// A guarded write found the job owned by another node.
fn is_lease_lost(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::store::StoreError>()
        .is_some_and(|e| e.is_lease_lost())
}
