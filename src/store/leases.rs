//! Claims with leases: how several nodes share one queue. A node claims the next job its
//! devices can run and becomes its owner until `lease_expires_at`, which its heartbeat renews.
//! A job whose owner stopped renewing is claimable again: another node takes it over and
//! resumes it from its latest checkpoint. Every write a node makes for a running job is guarded
//! by `owner = me` (a [`Lease`]), so a node that lost its lease cannot write another row.
//!
//! On PostgreSQL the claim locks its candidate row with `FOR UPDATE SKIP LOCKED`, so racing
//! claimers each take a different job instead of queueing on the same row; on SQLite, where a
//! write locks the whole database, the guarded `UPDATE` alone decides.

use super::nodes::DeviceKind;
use super::{on_pool, Db, JobRow, Store, StoreError, StoreResult};

/// This node's hold on one job: the job and the node that must still own it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: i64,
    pub owner: String,
}

impl Lease {
    pub fn new(job_id: i64, owner: impl Into<String>) -> Self {
        Self {
            job_id,
            owner: owner.into(),
        }
    }

    /// A guarded single-row write changed `rows`: none means the lease is gone.
    pub(crate) fn check(&self, rows: u64) -> StoreResult<()> {
        if rows == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost {
                job_id: self.job_id,
            })
        }
    }
}

/// Who claims, with what, for how long.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    /// The node id (the job's `owner`).
    pub node: &'a str,
    /// The worker within the node (`worker-0`, ...).
    pub worker: &'a str,
    /// The device it runs on (`cpu`, `cuda:0`).
    pub device: &'a str,
    pub kind: DeviceKind,
    /// The lease's length from now, in milliseconds.
    pub lease_ms: i64,
    /// `--max-attempts`: a job whose runner has crashed this many times (a takeover counts one
    /// crash) is failed instead of taken over again.
    pub max_attempts: i64,
}

/// What one heartbeat found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Renewal {
    /// Jobs this node still owns (their leases were extended), with their status (a
    /// `cancelling` one was cancelled through another node).
    pub owned: Vec<(i64, String)>,
    /// `cancelling` jobs whose owner died before it finished the cancel: now `cancelled`.
    pub cancelled: Vec<i64>,
}

/// A queued job, or a running one whose lease has expired, that a device of kind `$6` may run.
/// Never this node's own running job (`$1`): a late heartbeat must not make a second worker of
/// the same node start it again (its own interrupted jobs are re-queued at start instead).
/// A takeover is a crash of the job's runner: one that would make `$7` (`--max-attempts`)
/// crashes is not taken over but failed ([`Store::fail_abandoned_crash_loops`]).
const CLAIMABLE: &str = "(status = 'queued'
      OR (status = 'running' AND lease_expires_at < $5 AND owner <> $1 AND crashes + 1 < $7))
     AND (requires_device IS NULL OR requires_device = $6)";

impl Store {
    /// Atomically claim the claimable job with the highest priority (oldest first among
    /// equals): a queued job, or a running one whose owner's lease expired (a takeover, which
    /// counts as a crash of its runner). The repeated condition in the outer `WHERE` makes a
    /// concurrent claim of the same row a no-op on SQLite; PostgreSQL skips rows another
    /// claimer has locked.
    pub async fn claim_next_job(&self, c: &Claim<'_>) -> StoreResult<Option<JobRow>> {
        let now_ms = super::unix_ms();
        let lock = match self.db() {
            Db::Postgres(_) => "FOR UPDATE SKIP LOCKED",
            Db::Sqlite(_) => "",
        };
        let now = self.now_sql();
        let sql = format!(
            "UPDATE jobs SET owner = $1, worker = $2, device = $3, lease_expires_at = $4,
                 crashes = crashes + CASE WHEN status = 'running' THEN 1 ELSE 0 END,
                 status = 'running', attempts = attempts + 1, error = NULL, finished_at = NULL,
                 started_at = COALESCE(started_at, {now}), updated_at = {now}
             WHERE id = (SELECT id FROM jobs WHERE {CLAIMABLE}
                         ORDER BY priority DESC, id ASC LIMIT 1 {lock})
               AND {CLAIMABLE}
             RETURNING *"
        );
        Ok(on_pool!(self, p => sqlx::query_as::<_, JobRow>(&sql)
            .bind(c.node)
            .bind(c.worker)
            .bind(c.device)
            .bind(now_ms + c.lease_ms)
            .bind(now_ms)
            .bind(c.kind.as_str())
            .bind(c.max_attempts)
            .fetch_optional(p)
            .await?))
    }

    /// Running jobs of other nodes whose leases expired and which a takeover would make crash
    /// `max_attempts` times: failed, not taken over (a job that kills every node it lands on
    /// must not walk through the whole cluster). The claim loop calls it before each claim;
    /// the dead owner, should it come back, finds its lease gone. Returns (id, crashes).
    pub async fn fail_abandoned_crash_loops(
        &self,
        node: &str,
        max_attempts: i64,
    ) -> StoreResult<Vec<(i64, i64)>> {
        let now = self.now_sql();
        let sql = format!(
            "UPDATE jobs SET crashes = crashes + 1, status = 'failed', finished_at = {now},
                 updated_at = {now}, owner = NULL, lease_expires_at = NULL,
                 error = 'its runner crashed ' || (crashes + 1) || ' times (the last time its ' ||
                         'node ' || COALESCE(owner, '?') || ' stopped renewing its lease); ' ||
                         'not taken over again (--max-attempts {max_attempts}); resume it to try again'
             WHERE status = 'running' AND lease_expires_at < $1 AND owner <> $2
               AND crashes + 1 >= $3
             RETURNING id, crashes"
        );
        let mut failed: Vec<(i64, i64)> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(super::unix_ms())
            .bind(node)
            .bind(max_attempts)
            .fetch_all(p)
            .await?);
        failed.sort_unstable();
        Ok(failed)
    }

    /// The heartbeat: extend the leases of every active job `node` owns by `lease_ms` from
    /// now, and finish the cancels of nodes that died while cancelling.
    pub async fn renew_leases(&self, node: &str, lease_ms: i64) -> StoreResult<Renewal> {
        let now_ms = super::unix_ms();
        let now = self.now_sql();
        let cancel = format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = {now}, updated_at = {now},
                 owner = NULL, lease_expires_at = NULL
             WHERE status = 'cancelling' AND lease_expires_at < $1 RETURNING id"
        );
        let mut owned: Vec<(i64, String)> = on_pool!(self, p => sqlx::query_as(
            "UPDATE jobs SET lease_expires_at = $2
             WHERE owner = $1 AND status IN ('running', 'cancelling') RETURNING id, status",
        )
        .bind(node)
        .bind(now_ms + lease_ms)
        .fetch_all(p)
        .await?);
        let mut cancelled: Vec<i64> =
            on_pool!(self, p => sqlx::query_scalar(&cancel).bind(now_ms).fetch_all(p).await?);
        owned.sort_unstable();
        cancelled.sort_unstable();
        Ok(Renewal { owned, cancelled })
    }

    /// Give a running job's lease a new expiry (tests: make a node look dead).
    pub async fn set_lease_expiry(&self, job_id: i64, expires_ms: i64) -> StoreResult<u64> {
        Ok(
            on_pool!(self, p => sqlx::query("UPDATE jobs SET lease_expires_at = $2 WHERE id = $1")
            .bind(job_id)
            .bind(expires_ms)
            .execute(p)
            .await?
            .rows_affected()),
        )
    }
}
