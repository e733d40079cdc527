//! The node's heartbeat: its row in `nodes`, and the leases of the jobs it runs, renewed every
//! third of `--lease-timeout`. A job this node runs that the database no longer names it the
//! owner of was taken over (this node was presumed dead): its trainer is stopped at the next
//! step and nothing more is written for it. A job cancelled through another node's API is
//! cancelled here.

use super::events::JobEventKind;
use super::pool::PoolHandle;
use crate::store::{JobStatus, NewNode, StoreResult};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The host name, for the node list.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

impl PoolHandle {
    pub(super) async fn register_node(&self) -> StoreResult<()> {
        let inner = &self.inner;
        inner
            .store
            .register_node(&NewNode {
                id: inner.config.node_id.clone(),
                host: host_name(),
                devices: inner.devices.iter().map(|d| d.to_string()).collect(),
                version: env!("CARGO_PKG_VERSION").into(),
                advertise_url: inner.config.advertise_url.clone(),
            })
            .await
    }

    /// Runs until the pool stops it.
    pub(super) async fn heartbeat(self) {
        let every = (self.lease_timeout() / 3).max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.beat().await {
                tracing::warn!(node = %self.node_id(), "heartbeat failed: {e}");
            }
        }
    }

    async fn beat(&self) -> StoreResult<()> {
        let inner = &self.inner;
        let node = self.node_id();
        if !inner.store.node_heartbeat(node).await? {
            self.register_node().await?;
        }
        let lease_ms = self.lease_timeout().as_millis() as i64;
        // The jobs to judge, taken before the renewal: a job enters `running` only after its
        // claim committed, so the renewal sees each of them. One claimed while the renewal ran
        // is judged at the next beat (judged now, it looked lost: the renewal predates its
        // claim, and the job stopped here was left running under this node, which never
        // claims its own running job: found by tests/fault_injection.rs).
        let running: Vec<i64> = inner.running.lock().unwrap().iter().copied().collect();
        let renewal = inner.store.renew_leases(node, lease_ms).await?;
        for id in renewal.cancelled {
            tracing::info!(job = id, "its node died while cancelling it: cancelled");
            self.publish(
                id,
                JobEventKind::Status {
                    status: JobStatus::Cancelled,
                    error: None,
                },
            );
        }
        for id in running {
            let status = renewal
                .owned
                .iter()
                .find(|(j, _)| *j == id)
                .map(|(_, s)| s.as_str());
            let Some(state) = inner.cancels.lock().unwrap().get(&id).cloned() else {
                continue;
            };
            match status {
                None => {
                    if !state.lease_lost.swap(true, Ordering::SeqCst) {
                        tracing::warn!(
                            job = id,
                            "lease lost (another node owns the job now): stopping it here"
                        );
                    }
                    state.flag.store(true, Ordering::SeqCst);
                }
                Some("cancelling") if !state.by_user.load(Ordering::SeqCst) => {
                    tracing::info!(job = id, "cancelled through another node");
                    state.by_user.store(true, Ordering::SeqCst);
                    state.flag.store(true, Ordering::SeqCst);
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}
