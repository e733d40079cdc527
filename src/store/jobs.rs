//! The `jobs` table. Every lifecycle transition is one guarded `UPDATE ... WHERE status = ...`,
//! so two workers (or a worker and an HTTP request) can never both win the same transition.

use super::{on_pool, Lease, Store, StoreError, StoreResult};
use crate::config::TrainSpec;
use crate::store::nodes::DeviceKind;
use serde::{Deserialize, Serialize};

/// `queued → running → succeeded | failed | cancelled`, with `cancelling` between `running`
/// and `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Cancelling,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Cancelling,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Cancelling => "cancelling",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further transitions happen on their own.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// A trainer thread may be working on the job.
    pub fn is_active(&self) -> bool {
        matches!(self, JobStatus::Running | JobStatus::Cancelling)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: i64,
    pub name: String,
    pub status: String,
    pub priority: i64,
    /// The validated spec, stored as JSON in `spec_json`; a row whose JSON does not parse is a
    /// `StoreError::Sqlx(ColumnDecode { index: "spec_json", .. })` when it is read.
    #[sqlx(rename = "spec_json", try_from = "String")]
    pub spec: TrainSpec,
    pub run_dir: Option<String>,
    pub worker: Option<String>,
    pub device: Option<String>,
    pub attempts: i64,
    /// Runner crashes since a user last queued the job (see migration 0003).
    pub crashes: i64,
    pub error: Option<String>,
    pub total_steps: Option<i64>,
    pub current_step: i64,
    pub resumed_from_step: i64,
    pub current_epoch: i64,
    pub current_loss: Option<f64>,
    pub current_lr: Option<f64>,
    pub loss_scale: Option<f64>,
    pub skipped_steps: i64,
    pub tokens_per_s: Option<f64>,
    pub step_ms: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_bleu: Option<f64>,
    pub last_chrf: Option<f64>,
    pub best_bleu: Option<f64>,
    pub best_bleu_step: Option<i64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
    /// A fork's parent job and the step of the parent checkpoint it starts from (migration 0006).
    #[sqlx(default)]
    pub parent_job_id: Option<i64>,
    #[sqlx(default)]
    pub parent_checkpoint: Option<i64>,
    /// A fork's copied checkpoint, moved into its run directory when it first runs.
    #[sqlx(default)]
    pub seed_dir: Option<String>,
    /// The node that runs (or last ran) the job while it is active, and until when (unix ms)
    /// its lease holds (migration 0008).
    #[sqlx(default)]
    pub owner: Option<String>,
    #[sqlx(default)]
    pub lease_expires_at: Option<i64>,
    /// The device kind a node needs to claim the job (`cpu` or `cuda`); None: any.
    #[sqlx(default)]
    pub requires_device: Option<String>,
}

impl JobRow {
    pub fn status(&self) -> JobStatus {
        // The CHECK constraint in the schema guarantees one of the known values.
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }
}

/// The `spec_json` column's form of a spec: the JSON the store wrote.
impl TryFrom<String> for TrainSpec {
    type Error = serde_json::Error;
    fn try_from(json: String) -> Result<Self, Self::Error> {
        serde_json::from_str(&json)
    }
}

/// The column form written for a spec.
pub(super) fn spec_column(spec: &TrainSpec) -> StoreResult<String> {
    Ok(serde_json::to_string(spec)?)
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    pub priority: i64,
    pub spec: TrainSpec,
    /// Only nodes with a device of this kind may claim the job; None: any node.
    pub requires_device: Option<DeviceKind>,
}

/// The latest step's numbers, written to the job row once per metrics flush.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub step: i64,
    pub epoch: i64,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    pub loss_scale: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub step_ms: Option<f64>,
    pub skipped_steps: i64,
}

impl Store {
    pub async fn insert_job(&self, job: &NewJob) -> StoreResult<JobRow> {
        let spec = spec_column(&job.spec)?;
        let device = job.requires_device.map(|d| d.as_str());
        Ok(on_pool!(self, p => sqlx::query_as::<_, JobRow>(
            "INSERT INTO jobs (name, priority, spec_json, requires_device) VALUES ($1, $2, $3, $4)
             RETURNING *",
        )
        .bind(&job.name)
        .bind(job.priority)
        .bind(&spec)
        .bind(device)
        .fetch_one(p)
        .await?))
    }

    /// A fork of `parent_job_id` starting from its checkpoint at `parent_checkpoint`, staged in
    /// `seed_dir`.
    pub async fn insert_fork(
        &self,
        job: &NewJob,
        parent_job_id: i64,
        parent_checkpoint: i64,
        seed_dir: &str,
    ) -> StoreResult<JobRow> {
        let spec = spec_column(&job.spec)?;
        let device = job.requires_device.map(|d| d.as_str());
        Ok(on_pool!(self, p => sqlx::query_as::<_, JobRow>(
            "INSERT INTO jobs (name, priority, spec_json, parent_job_id, parent_checkpoint, seed_dir,
                               requires_device)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        )
        .bind(&job.name)
        .bind(job.priority)
        .bind(&spec)
        .bind(parent_job_id)
        .bind(parent_checkpoint)
        .bind(seed_dir)
        .bind(device)
        .fetch_one(p)
        .await?))
    }

    /// The fork's staged checkpoint is in its run directory now.
    pub async fn clear_seed_dir(&self, lease: &Lease) -> StoreResult<()> {
        self.guarded_update(lease, "seed_dir = NULL", None).await
    }

    pub async fn get_job(&self, id: i64) -> StoreResult<Option<JobRow>> {
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, JobRow>("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(p)
            .await?),
        )
    }

    /// Newest first. Returns the page and the total count matching the filter.
    pub async fn list_jobs(
        &self,
        status: Option<JobStatus>,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<JobRow>, i64)> {
        let st = status.map(|s| s.as_str());
        let rows = on_pool!(self, p => sqlx::query_as::<_, JobRow>(
            "SELECT * FROM jobs WHERE (CAST($1 AS TEXT) IS NULL OR status = $1)
             ORDER BY id DESC LIMIT $2 OFFSET $3",
        )
        .bind(st)
        .bind(limit)
        .bind(offset)
        .fetch_all(p)
        .await?);
        let total: i64 = on_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE (CAST($1 AS TEXT) IS NULL OR status = $1)",
        )
        .bind(st)
        .fetch_one(p)
        .await?);
        Ok((rows, total))
    }

    /// One column update of a job this node runs, guarded by its lease (`set`: the SET list,
    /// binding `$3` when `value` is given). `updated_at` is set too.
    async fn guarded_update(
        &self,
        lease: &Lease,
        set: &str,
        value: Option<&str>,
    ) -> StoreResult<()> {
        let sql = format!(
            "UPDATE jobs SET {set}, updated_at = {now} WHERE id = $1 AND owner = $2",
            now = self.now_sql()
        );
        let n = on_pool!(self, p => {
            let mut q = sqlx::query(&sql).bind(lease.job_id).bind(&lease.owner);
            if let Some(v) = value {
                q = q.bind(v);
            }
            q.execute(p).await?.rows_affected()
        });
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost {
                job_id: lease.job_id,
            })
        }
    }

    pub async fn set_job_run_dir(&self, lease: &Lease, run_dir: &str) -> StoreResult<()> {
        self.guarded_update(lease, "run_dir = $3", Some(run_dir))
            .await
    }

    /// The trainer started (or resumed): record the plan and reset progress to the resume point.
    pub async fn set_job_started(
        &self,
        lease: &Lease,
        total_steps: i64,
        resumed_from_step: i64,
        skipped_steps: i64,
    ) -> StoreResult<()> {
        let sql = format!(
            "UPDATE jobs SET total_steps = $3, resumed_from_step = $4, current_step = $4,
                 skipped_steps = $5, updated_at = {}
             WHERE id = $1 AND owner = $2",
            self.now_sql()
        );
        let n = on_pool!(self, p => sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(&lease.owner)
            .bind(total_steps)
            .bind(resumed_from_step)
            .bind(skipped_steps)
            .execute(p)
            .await?
            .rows_affected());
        lease.check(n)
    }

    pub async fn set_job_progress(&self, lease: &Lease, p: &Progress) -> StoreResult<()> {
        let sql = format!(
            "UPDATE jobs SET current_step = $3, current_epoch = $4, current_loss = $5,
                 current_lr = $6, loss_scale = $7, tokens_per_s = $8, step_ms = $9,
                 skipped_steps = $10, updated_at = {}
             WHERE id = $1 AND owner = $2",
            self.now_sql()
        );
        let n = on_pool!(self, pool => sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(&lease.owner)
            .bind(p.step)
            .bind(p.epoch)
            .bind(p.loss)
            .bind(p.lr)
            .bind(p.loss_scale)
            .bind(p.tokens_per_s)
            .bind(p.step_ms)
            .bind(p.skipped_steps)
            .execute(pool)
            .await?
            .rows_affected());
        lease.check(n)
    }

    /// Latest validation numbers, and the best BLEU so far (ties keep the earlier step).
    pub async fn set_job_validation(
        &self,
        lease: &Lease,
        step: i64,
        val_loss: f64,
        bleu: f64,
        chrf: f64,
    ) -> StoreResult<()> {
        let sql = format!(
            "UPDATE jobs SET last_val_loss = $3, last_bleu = $4, last_chrf = $5,
                 best_bleu_step = CASE WHEN best_bleu IS NULL OR $4 > best_bleu THEN $6 ELSE best_bleu_step END,
                 best_bleu = CASE WHEN best_bleu IS NULL OR $4 > best_bleu THEN $4 ELSE best_bleu END,
                 updated_at = {}
             WHERE id = $1 AND owner = $2",
            self.now_sql()
        );
        let n = on_pool!(self, p => sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(&lease.owner)
            .bind(val_loss)
            .bind(bleu)
            .bind(chrf)
            .bind(step)
            .execute(p)
            .await?
            .rows_affected());
        lease.check(n)
    }

    /// `running → cancelling`. False when the job was not running.
    pub async fn mark_job_cancelling(&self, id: i64) -> StoreResult<bool> {
        let sql = format!(
            "UPDATE jobs SET status = 'cancelling', updated_at = {} WHERE id = $1 AND status = 'running'",
            self.now_sql()
        );
        let n = on_pool!(self, p => sqlx::query(&sql).bind(id).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    /// `queued → cancelled` (no trainer involved). False when the job was not queued.
    pub async fn cancel_queued_job(&self, id: i64) -> StoreResult<bool> {
        let sql = format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = {now}, updated_at = {now}
             WHERE id = $1 AND status = 'queued'",
            now = self.now_sql()
        );
        let n = on_pool!(self, p => sqlx::query(&sql).bind(id).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    /// `cancelled | failed → queued`; the worker resumes it from its latest checkpoint.
    pub async fn requeue_job(&self, id: i64) -> StoreResult<bool> {
        let sql = format!(
            "UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL, crashes = 0,
                 updated_at = {}
             WHERE id = $1 AND status IN ('cancelled', 'failed')",
            self.now_sql()
        );
        let n = on_pool!(self, p => sqlx::query(&sql).bind(id).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    /// End a run: `running | cancelling → status`, only while `lease` holds; the lease ends,
    /// the owner stays as the node that ran it last. `queued` puts it back in line (server shutdown). False when the job
    /// was not active (it was deleted or already finished) or another node owns it now.
    pub async fn finish_job(
        &self,
        lease: &Lease,
        status: JobStatus,
        error: Option<&str>,
    ) -> StoreResult<bool> {
        let now = self.now_sql();
        let finished = if status.is_terminal() { now } else { "NULL" };
        let sql = format!(
            "UPDATE jobs SET status = $3, error = $4, finished_at = {finished}, updated_at = {now},
                 lease_expires_at = NULL
             WHERE id = $1 AND owner = $2 AND status IN ('running', 'cancelling')"
        );
        let n = on_pool!(self, p => sqlx::query(&sql)
            .bind(lease.job_id)
            .bind(&lease.owner)
            .bind(status.as_str())
            .bind(error)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n == 1)
    }

    /// The job's training process died: count it. Returns the count so far.
    pub async fn record_crash(&self, lease: &Lease) -> StoreResult<i64> {
        let sql = format!(
            "UPDATE jobs SET crashes = crashes + 1, updated_at = {}
             WHERE id = $1 AND owner = $2 RETURNING crashes",
            self.now_sql()
        );
        let n: Option<i64> = on_pool!(self, p => sqlx::query_scalar(&sql)
            .bind(lease.job_id)
            .bind(&lease.owner)
            .fetch_optional(p)
            .await?);
        n.ok_or(StoreError::LeaseLost {
            job_id: lease.job_id,
        })
    }

    /// At start, before [`Store::recover_jobs`]: each job still `running` on this node (or on
    /// no node: a database from before leases) was interrupted by a server crash, which counts
    /// as a crash of its runner. Those that have now crashed `max_attempts` times are failed
    /// (not re-queued, so a job that kills the server cannot do it forever). Returns (id,
    /// crashes) of the failed ones.
    pub async fn fail_crash_loops(
        &self,
        node: &str,
        max_attempts: i64,
    ) -> StoreResult<Vec<(i64, i64)>> {
        let now = self.now_sql();
        let error = format!(
            "'its runner crashed ' || crashes || ' times (the last time the server ' ||
             'stopped while it ran); not re-queued (--max-attempts {max_attempts}); ' ||
             'resume it to try again'"
        );
        let fail = format!(
            "UPDATE jobs SET status = 'failed', error = {error}, finished_at = {now},
                 updated_at = {now}, owner = NULL, lease_expires_at = NULL
             WHERE status = 'running' AND (owner = $1 OR owner IS NULL) AND crashes >= $2
             RETURNING id, crashes"
        );
        Ok(on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(
                "UPDATE jobs SET crashes = crashes + 1
                 WHERE status = 'running' AND (owner = $1 OR owner IS NULL)",
            )
            .bind(node)
            .execute(&mut *tx)
            .await?;
            let failed: Vec<(i64, i64)> = sqlx::query_as(&fail)
                .bind(node)
                .bind(max_attempts)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            failed
        }))
    }

    /// At start, no trainer of this node runs: its jobs left `running` by a crash go back to
    /// `queued` (they resume from their latest checkpoint); its jobs left `cancelling` become
    /// `cancelled`. Jobs of other nodes are theirs (or, once their lease expires, anyone's).
    /// Returns (requeued, cancelled) ids.
    pub async fn recover_jobs(&self, node: &str) -> StoreResult<(Vec<i64>, Vec<i64>)> {
        let now = self.now_sql();
        let requeue = format!(
            "UPDATE jobs SET status = 'queued', updated_at = {now}, owner = NULL,
                 lease_expires_at = NULL
             WHERE status = 'running' AND (owner = $1 OR owner IS NULL) RETURNING id"
        );
        let cancel = format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = {now}, updated_at = {now},
                 owner = NULL, lease_expires_at = NULL
             WHERE status = 'cancelling' AND (owner = $1 OR owner IS NULL) RETURNING id"
        );
        let mut requeued: Vec<i64> =
            on_pool!(self, p => sqlx::query_scalar(&requeue).bind(node).fetch_all(p).await?);
        let mut cancelled: Vec<i64> =
            on_pool!(self, p => sqlx::query_scalar(&cancel).bind(node).fetch_all(p).await?);
        requeued.sort_unstable();
        cancelled.sort_unstable();
        Ok((requeued, cancelled))
    }

    /// Delete a job that is not active (its metrics, validations and checkpoint rows go with
    /// it through `ON DELETE CASCADE`). Returns the deleted row, None when refused or absent.
    pub async fn delete_job(&self, id: i64) -> StoreResult<Option<JobRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, JobRow>(
            "DELETE FROM jobs WHERE id = $1 AND status NOT IN ('running', 'cancelling') RETURNING *",
        )
        .bind(id)
        .fetch_optional(p)
        .await?))
    }

    pub async fn count_jobs_by_status(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, (String, i64)>(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status",
        )
        .fetch_all(p)
        .await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::leases::Claim;
    use crate::store::testing;
    use std::collections::HashSet;

    async fn add(s: &Store, name: &str, priority: i64) -> i64 {
        s.insert_job(&NewJob {
            name: name.into(),
            priority,
            spec: TrainSpec::default(),
            requires_device: None,
        })
        .await
        .unwrap()
        .id
    }

    fn claim(worker: &str) -> Claim<'_> {
        Claim {
            node: "n1",
            worker,
            device: "cpu",
            kind: DeviceKind::Cpu,
            lease_ms: 60_000,
            max_attempts: 3,
        }
    }

    #[tokio::test]
    async fn a_job_reads_back_with_the_spec_it_was_inserted_with() {
        for t in testing::engines().await {
            let s = &t.store;
            let mut spec = TrainSpec {
                name: "typed".into(),
                ..TrainSpec::default()
            };
            spec.train.precision = crate::config::Precision::Bf16;
            spec.checkpoint.keep_last = 7;
            let id = s
                .insert_job(&NewJob {
                    name: spec.name.clone(),
                    priority: 0,
                    spec: spec.clone(),
                    requires_device: Some(DeviceKind::Cuda),
                })
                .await
                .unwrap()
                .id;
            let back = s.get_job(id).await.unwrap().unwrap();
            assert_eq!(back.spec, spec, "{}", s.engine());
            assert_eq!(back.requires_device.as_deref(), Some("cuda"));
        }
    }

    #[tokio::test]
    async fn a_stored_spec_that_does_not_parse_is_a_decode_error_naming_the_column() {
        for t in testing::engines().await {
            let s = &t.store;
            let id = add(s, "broken", 0).await;
            s.execute(&format!(
                "UPDATE jobs SET spec_json = '{{\"train\": {{\"nope\": 1}}}}' WHERE id = {id}"
            ))
            .await
            .unwrap();
            match s.get_job(id).await {
                // (sqlx's derive loses the serde message here: its source prints as
                // "unprintable error"; the column is named)
                Err(crate::store::StoreError::Sqlx(sqlx::Error::ColumnDecode {
                    index, ..
                })) => {
                    assert_eq!(index, "spec_json");
                }
                other => panic!("{}: expected a decode error, got {other:?}", s.engine()),
            }
        }
    }

    #[tokio::test]
    async fn claims_follow_priority_then_age() {
        for t in testing::engines().await {
            let s = &t.store;
            let a = add(s, "a", 0).await;
            let b = add(s, "b", 5).await;
            let c = add(s, "c", 0).await;
            let d = add(s, "d", 5).await;
            let e = add(s, "e", -3).await;
            let mut order = Vec::new();
            while let Some(j) = s.claim_next_job(&claim("w")).await.unwrap() {
                assert_eq!(j.status(), JobStatus::Running);
                assert_eq!(j.attempts, 1);
                assert_eq!(j.owner.as_deref(), Some("n1"));
                assert!(j.started_at.is_some());
                order.push(j.id);
            }
            assert_eq!(order, [b, d, a, c, e], "{}", s.engine());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_never_share_a_job() {
        for t in testing::engines().await {
            let s = &t.store;
            let mut ids = HashSet::new();
            for i in 0..3 {
                ids.insert(add(s, &format!("j{i}"), 0).await);
            }
            let mut tasks = Vec::new();
            for w in 0..8 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    let name = format!("w{w}");
                    while let Some(j) = s.claim_next_job(&claim(&name)).await.unwrap() {
                        got.push(j.id);
                    }
                    got
                }));
            }
            let mut claimed = Vec::new();
            for t in tasks {
                claimed.extend(t.await.unwrap());
            }
            claimed.sort();
            let mut expected: Vec<_> = ids.into_iter().collect();
            expected.sort();
            assert_eq!(
                claimed,
                expected,
                "{}: each job claimed exactly once",
                s.engine()
            );
            for id in claimed {
                assert_eq!(s.get_job(id).await.unwrap().unwrap().attempts, 1);
            }
        }
    }

    #[tokio::test]
    async fn transitions_are_guarded() {
        for t in testing::engines().await {
            let s = &t.store;
            let q = add(s, "q", 0).await;
            let lease = Lease::new(q, "n1");
            // Not running yet: cannot be marked cancelling or finished, can be deleted.
            assert!(!s.mark_job_cancelling(q).await.unwrap());
            assert!(!s
                .finish_job(&lease, JobStatus::Succeeded, None)
                .await
                .unwrap());
            assert!(!s.requeue_job(q).await.unwrap());
            let r = s.claim_next_job(&claim("w")).await.unwrap().unwrap();
            assert_eq!(r.id, q);
            assert!(!s.cancel_queued_job(q).await.unwrap());
            assert!(
                s.delete_job(q).await.unwrap().is_none(),
                "running jobs are not deleted"
            );
            assert!(s.mark_job_cancelling(q).await.unwrap());
            assert!(!s.mark_job_cancelling(q).await.unwrap());
            // another node cannot end it
            assert!(!s
                .finish_job(&Lease::new(q, "n2"), JobStatus::Cancelled, None)
                .await
                .unwrap());
            assert!(s
                .finish_job(&lease, JobStatus::Cancelled, None)
                .await
                .unwrap());
            assert!(!s
                .finish_job(&lease, JobStatus::Failed, Some("late"))
                .await
                .unwrap());
            let j = s.get_job(q).await.unwrap().unwrap();
            assert_eq!(j.status(), JobStatus::Cancelled);
            assert!(j.finished_at.is_some() && j.error.is_none());
            assert_eq!(j.owner.as_deref(), Some("n1"), "the node that ran it last");
            assert_eq!(j.lease_expires_at, None);
            assert!(s.requeue_job(q).await.unwrap());
            assert_eq!(
                s.get_job(q).await.unwrap().unwrap().status(),
                JobStatus::Queued
            );

            // Recovery of this node's jobs: running -> queued, cancelling -> cancelled; the
            // job another node runs stays as it is.
            let a = s.claim_next_job(&claim("w")).await.unwrap().unwrap().id;
            let b = add(s, "b", 0).await;
            s.claim_next_job(&claim("w2")).await.unwrap().unwrap();
            assert!(s.mark_job_cancelling(b).await.unwrap());
            let other = add(s, "other", 0).await;
            let elsewhere = Claim {
                node: "n2",
                ..claim("w")
            };
            assert_eq!(
                s.claim_next_job(&elsewhere).await.unwrap().unwrap().id,
                other
            );
            let (requeued, cancelled) = s.recover_jobs("n1").await.unwrap();
            assert_eq!((requeued, cancelled), (vec![a], vec![b]), "{}", s.engine());
            let counts: std::collections::HashMap<_, _> = s
                .count_jobs_by_status()
                .await
                .unwrap()
                .into_iter()
                .collect();
            assert_eq!(counts.get("queued"), Some(&1));
            assert_eq!(counts.get("cancelled"), Some(&1));
            assert_eq!(counts.get("running"), Some(&1));
            assert!(s.delete_job(b).await.unwrap().is_some());
            assert!(s.get_job(b).await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn a_crash_loop_of_this_node_fails_its_job_with_the_count_in_words() {
        for t in testing::engines().await {
            let s = &t.store;
            let id = add(s, "looping", 0).await;
            s.claim_next_job(&claim("w")).await.unwrap().unwrap();
            assert!(s.fail_crash_loops("n1", 2).await.unwrap().is_empty());
            assert_eq!(s.fail_crash_loops("n1", 2).await.unwrap(), [(id, 2)]);
            let j = s.get_job(id).await.unwrap().unwrap();
            assert_eq!(j.status(), JobStatus::Failed);
            let e = j.error.unwrap();
            assert!(
                e.contains("crashed 2 times") && e.contains("--max-attempts 2"),
                "{}: {e}",
                s.engine()
            );
        }
    }
}
