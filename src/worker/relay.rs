//! Live events across nodes. On PostgreSQL each published event is also sent with `NOTIFY` on
//! one channel, and every node `LISTEN`s and republishes the other nodes' events to its own SSE
//! subscribers, so a browser on any node follows a job running on any other. Delivery is best
//! effort, like the local channels: an event larger than PostgreSQL's payload limit (a
//! validation with long samples) goes in parts (`notify_parts`); one that finds the queue full
//! is dropped. The REST views read the database and are always complete.
//!
//! On SQLite, processes share a database only through one file (`--database-url sqlite://…`
//! from several data directories): a poller reads the subscribed jobs that another node runs,
//! once a second, and publishes their status changes and new metric rows.

use super::events::{JobEvent, JobEventKind};
use super::notify_parts::{self, Reassembler};
use super::pool::PoolHandle;
use crate::store::Db;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The NOTIFY channel.
pub const CHANNEL: &str = "ampserve_events";
/// Events waiting to be sent before new ones are dropped.
const QUEUE: usize = 4096;

#[derive(Serialize, Deserialize)]
struct Envelope {
    node: String,
    event: JobEvent,
}

/// Start the relay: a sender draining this node's queue into NOTIFY, and a listener
/// republishing the other nodes' events; on SQLite, the poller.
pub(super) async fn start(pool: PoolHandle) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let Db::Postgres(pg) = pool.store().db().clone() else {
        return Ok(vec![tokio::spawn(poll(pool))]);
    };
    let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
    *pool.inner.relay.lock().unwrap() = Some(tx);
    let mut listener = sqlx::postgres::PgListener::connect_with(&pg).await?;
    listener.listen(CHANNEL).await?;
    let me = pool.node_id().to_string();
    let sender = tokio::spawn(async move {
        // What queued up meanwhile goes in the same round trip (a busy node sends many steps).
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            if let Err(e) = sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::TEXT[]) AS p")
                .bind(CHANNEL)
                .bind(&batch)
                .execute(&pg)
                .await
            {
                tracing::debug!("event relay: notify failed: {e}");
            }
        }
    });
    let receiver = tokio::spawn(async move {
        let mut parts = Reassembler::default();
        loop {
            match listener.recv().await {
                Ok(n) => match parts
                    .feed(n.payload())
                    .map(|whole| serde_json::from_str::<Envelope>(&whole))
                {
                    None => {} // a part of a larger event
                    Some(Ok(env)) if env.node != me => {
                        // a job queued through another node: this node's idle workers look too
                        let queued = matches!(
                            env.event.kind,
                            JobEventKind::Status {
                                status: crate::store::JobStatus::Queued,
                                ..
                            }
                        );
                        pool.publish_local(env.event.job_id, env.event.kind);
                        if queued {
                            pool.notify_new_job();
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::debug!("event relay: unreadable notification: {e}"),
                },
                Err(e) => {
                    // PgListener reconnects on the next recv; do not spin meanwhile.
                    tracing::warn!("event relay: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(vec![sender, receiver])
}

/// Queue `kind` for the other nodes (PostgreSQL only).
pub(super) fn forward(pool: &PoolHandle, job_id: i64, kind: &JobEventKind) {
    let guard = pool.inner.relay.lock().unwrap();
    let Some(tx) = guard.as_ref() else {
        return;
    };
    let env = Envelope {
        node: pool.node_id().to_string(),
        event: JobEvent {
            job_id,
            kind: kind.clone(),
        },
    };
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Ok(payload) = serde_json::to_string(&env) {
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for part in notify_parts::split(&env.node, seq, payload) {
            let _ = tx.try_send(part);
        }
    }
}

/// SQLite's relay: the jobs this node has subscribers for and does not run itself (their
/// `owner` is another node, or none yet), read once a second; what changed since the last look
/// is published.
async fn poll(pool: PoolHandle) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids: Vec<i64> = pool
            .inner
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, tx)| tx.receiver_count() > 0)
            .map(|(id, _)| *id)
            .collect();
        let mut seen = std::mem::take(&mut *pool.inner.followed.lock().unwrap());
        seen.retain(|id, _| ids.contains(id));
        for id in ids {
            if let Err(e) = poll_job(&pool, id, &mut seen).await {
                tracing::debug!(job = id, "event poll: {e}");
            }
        }
        // cursors noted by routes meanwhile (new subscribers) win over this pass's
        let mut followed = pool.inner.followed.lock().unwrap();
        for (id, cursor) in seen {
            followed.entry(id).or_insert(cursor);
        }
    }
}

impl PoolHandle {
    /// A subscriber to job `id` was just sent its status at `step`: on SQLite, the poller
    /// publishes what another node's run does from there on.
    pub fn follow(&self, id: i64, status: &str, step: i64) {
        if matches!(self.store().db(), Db::Sqlite(_)) {
            self.inner
                .followed
                .lock()
                .unwrap()
                .entry(id)
                .or_insert_with(|| (status.to_string(), step));
        }
    }
}

const POLL_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn poll_job(
    pool: &PoolHandle,
    id: i64,
    seen: &mut HashMap<i64, (String, i64)>,
) -> crate::store::StoreResult<()> {
    let store = pool.store();
    let Some(j) = store.get_job(id).await? else {
        seen.remove(&id);
        return Ok(());
    };
    if j.owner.as_deref() == Some(pool.node_id()) {
        // this node's own run: published as it happens
        seen.remove(&id);
        return Ok(());
    }
    let Some((status, step)) = seen.get_mut(&id) else {
        // first look without a cursor from the route: from now on
        seen.insert(id, (j.status.clone(), j.current_step));
        return Ok(());
    };
    if j.current_step > *step {
        for r in store.list_metrics(id, *step, Some(1000)).await? {
            *step = r.step;
            pool.publish_local(id, JobEventKind::Step(step_record(&r)));
        }
    }
    if j.status != *status {
        status.clone_from(&j.status);
        pool.publish_local(
            id,
            JobEventKind::Status {
                status: j.status(),
                error: j.error.clone(),
            },
        );
    }
    Ok(())
}

fn step_record(r: &crate::store::MetricRow) -> crate::train::StepRecord {
    let v = |x: Option<f64>| x.unwrap_or(f64::NAN);
    crate::train::StepRecord {
        step: r.step as u64,
        epoch: r.epoch as u64,
        loss: v(r.loss),
        lr: v(r.lr),
        loss_scale: v(r.loss_scale),
        found_inf: r.found_inf,
        skipped: r.skipped,
        grad_norm: v(r.grad_norm),
        tokens_per_s: v(r.tokens_per_s),
        step_ms: v(r.step_ms),
    }
}
