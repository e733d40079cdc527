//! The `jobs` table. Every lifecycle transition is one guarded `UPDATE ... WHERE status = ...`,
//! so two workers (or a worker and an HTTP request) can never both win the same transition.

use super::{Store, StoreResult};
use crate::config::TrainSpec;
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

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

impl Store {
    pub async fn insert_job(&self, job: &NewJob) -> StoreResult<JobRow> {
        let row = sqlx::query_as::<_, JobRow>(
            "INSERT INTO jobs (name, priority, spec_json) VALUES (?, ?, ?) RETURNING *",
        )
        .bind(&job.name)
        .bind(job.priority)
        .bind(spec_column(&job.spec)?)
        .fetch_one(self.pool())
        .await?;
        Ok(row)
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
        let row = sqlx::query_as::<_, JobRow>(
            "INSERT INTO jobs (name, priority, spec_json, parent_job_id, parent_checkpoint, seed_dir)
             VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(&job.name)
        .bind(job.priority)
        .bind(spec_column(&job.spec)?)
        .bind(parent_job_id)
        .bind(parent_checkpoint)
        .bind(seed_dir)
        .fetch_one(self.pool())
        .await?;
        Ok(row)
    }

    /// The fork's staged checkpoint is in its run directory now.
    pub async fn clear_seed_dir(&self, id: i64) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET seed_dir = NULL WHERE id = ?")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn get_job(&self, id: i64) -> StoreResult<Option<JobRow>> {
        Ok(
            sqlx::query_as::<_, JobRow>("SELECT * FROM jobs WHERE id = ?")
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
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
        let rows = sqlx::query_as::<_, JobRow>(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR status = ?1) ORDER BY id DESC LIMIT ?2 OFFSET ?3",
        )
        .bind(st)
        .bind(limit)
        .bind(offset)
        .fetch_all(self.pool())
        .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE (?1 IS NULL OR status = ?1)")
                .bind(st)
                .fetch_one(self.pool())
                .await?;
        Ok((rows, total))
    }

    /// Atomically claim the queued job with the highest priority (oldest first among equals).
    /// The `AND status = 'queued'` guard makes a concurrent claim of the same row a no-op.
    pub async fn claim_next_job(&self, worker: &str, device: &str) -> StoreResult<Option<JobRow>> {
        let sql = format!(
            "UPDATE jobs SET status = 'running', worker = ?1, device = ?2, attempts = attempts + 1,
                 error = NULL, finished_at = NULL, started_at = COALESCE(started_at, {NOW}),
                 updated_at = {NOW}
             WHERE id = (SELECT id FROM jobs WHERE status = 'queued'
                         ORDER BY priority DESC, id ASC LIMIT 1)
               AND status = 'queued'
             RETURNING *"
        );
        Ok(sqlx::query_as::<_, JobRow>(&sql)
            .bind(worker)
            .bind(device)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn set_job_run_dir(&self, id: i64, run_dir: &str) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE jobs SET run_dir = ?, updated_at = {NOW} WHERE id = ?"
        ))
        .bind(run_dir)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The trainer started (or resumed): record the plan and reset progress to the resume point.
    pub async fn set_job_started(
        &self,
        id: i64,
        total_steps: i64,
        resumed_from_step: i64,
        skipped_steps: i64,
    ) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE jobs SET total_steps = ?, resumed_from_step = ?, current_step = ?,
                 skipped_steps = ?, updated_at = {NOW}
             WHERE id = ?"
        ))
        .bind(total_steps)
        .bind(resumed_from_step)
        .bind(resumed_from_step)
        .bind(skipped_steps)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn set_job_progress(&self, id: i64, p: &Progress) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE jobs SET current_step = ?, current_epoch = ?, current_loss = ?, current_lr = ?,
                 loss_scale = ?, tokens_per_s = ?, step_ms = ?, skipped_steps = ?, updated_at = {NOW}
             WHERE id = ?"
        ))
        .bind(p.step)
        .bind(p.epoch)
        .bind(p.loss)
        .bind(p.lr)
        .bind(p.loss_scale)
        .bind(p.tokens_per_s)
        .bind(p.step_ms)
        .bind(p.skipped_steps)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Latest validation numbers, and the best BLEU so far (ties keep the earlier step).
    pub async fn set_job_validation(
        &self,
        id: i64,
        step: i64,
        val_loss: f64,
        bleu: f64,
        chrf: f64,
    ) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE jobs SET last_val_loss = ?2, last_bleu = ?3, last_chrf = ?4,
                 best_bleu_step = CASE WHEN best_bleu IS NULL OR ?3 > best_bleu THEN ?5 ELSE best_bleu_step END,
                 best_bleu = CASE WHEN best_bleu IS NULL OR ?3 > best_bleu THEN ?3 ELSE best_bleu END,
                 updated_at = {NOW}
             WHERE id = ?1"
        ))
        .bind(id)
        .bind(val_loss)
        .bind(bleu)
        .bind(chrf)
        .bind(step)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// `running → cancelling`. False when the job was not running.
    pub async fn mark_job_cancelling(&self, id: i64) -> StoreResult<bool> {
        let r = sqlx::query(&format!(
            "UPDATE jobs SET status = 'cancelling', updated_at = {NOW} WHERE id = ? AND status = 'running'"
        ))
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// `queued → cancelled` (no trainer involved). False when the job was not queued.
    pub async fn cancel_queued_job(&self, id: i64) -> StoreResult<bool> {
        let r = sqlx::query(&format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = {NOW}, updated_at = {NOW}
             WHERE id = ? AND status = 'queued'"
        ))
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// `cancelled | failed → queued`; the worker resumes it from its latest checkpoint.
    pub async fn requeue_job(&self, id: i64) -> StoreResult<bool> {
        let r = sqlx::query(&format!(
            "UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL, crashes = 0,
                 updated_at = {NOW}
             WHERE id = ? AND status IN ('cancelled', 'failed')"
        ))
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// End a run: `running | cancelling → status`. `queued` puts it back in line (server
    /// shutdown). False when the job was not active (it was deleted or already finished).
    pub async fn finish_job(
        &self,
        id: i64,
        status: JobStatus,
        error: Option<&str>,
    ) -> StoreResult<bool> {
        let finished = if status.is_terminal() { NOW } else { "NULL" };
        let r = sqlx::query(&format!(
            "UPDATE jobs SET status = ?, error = ?, finished_at = {finished}, updated_at = {NOW}
             WHERE id = ? AND status IN ('running', 'cancelling')"
        ))
        .bind(status.as_str())
        .bind(error)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The job's training process died: count it. Returns the count so far.
    pub async fn record_crash(&self, id: i64) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(&format!(
            "UPDATE jobs SET crashes = crashes + 1, updated_at = {NOW} WHERE id = ? RETURNING crashes"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?
        .unwrap_or(0))
    }

    /// At start, before [`Store::recover_jobs`]: each job still `running` was interrupted by a
    /// server crash, which counts as a crash of its runner. Those that have now crashed
    /// `max_attempts` times are failed (not re-queued, so a job that kills the server cannot do
    /// it forever). Returns (id, crashes) of the failed ones.
    pub async fn fail_crash_loops(&self, max_attempts: i64) -> StoreResult<Vec<(i64, i64)>> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("UPDATE jobs SET crashes = crashes + 1 WHERE status = 'running'")
            .execute(&mut *tx)
            .await?;
        let failed: Vec<(i64, i64)> = sqlx::query_as(&format!(
            "UPDATE jobs SET status = 'failed',
                 error = 'its runner crashed ' || crashes || ' times (the last time the server ' ||
                         'stopped while it ran); not re-queued (--max-attempts ' || ?1 || '); ' ||
                         'resume it to try again',
                 finished_at = {NOW}, updated_at = {NOW}
             WHERE status = 'running' AND crashes >= ?1 RETURNING id, crashes"
        ))
        .bind(max_attempts)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(failed)
    }

    /// At start, no trainer runs: jobs left `running` by a crash go back to `queued` (they
    /// resume from their latest checkpoint); jobs left `cancelling` become `cancelled`.
    /// Returns (requeued, cancelled) ids.
    pub async fn recover_jobs(&self) -> StoreResult<(Vec<i64>, Vec<i64>)> {
        let requeued: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE jobs SET status = 'queued', updated_at = {NOW} WHERE status = 'running' RETURNING id"
        ))
        .fetch_all(self.pool())
        .await?;
        let cancelled: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = {NOW}, updated_at = {NOW}
             WHERE status = 'cancelling' RETURNING id"
        ))
        .fetch_all(self.pool())
        .await?;
        Ok((requeued, cancelled))
    }

    /// Delete a job that is not active (its metrics, validations and checkpoint rows go with
    /// it through `ON DELETE CASCADE`). Returns the deleted row, None when refused or absent.
    pub async fn delete_job(&self, id: i64) -> StoreResult<Option<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(
            "DELETE FROM jobs WHERE id = ? AND status NOT IN ('running', 'cancelling') RETURNING *",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?)
    }

    pub async fn count_jobs_by_status(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as::<_, (String, i64)>("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                .fetch_all(self.pool())
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).await.unwrap();
        (dir, s)
    }

    async fn add(s: &Store, name: &str, priority: i64) -> i64 {
        s.insert_job(&NewJob {
            name: name.into(),
            priority,
            spec: TrainSpec::default(),
        })
        .await
        .unwrap()
        .id
    }

    #[tokio::test]
    async fn a_job_reads_back_with_the_spec_it_was_inserted_with() {
        let (_d, s) = store().await;
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
            })
            .await
            .unwrap()
            .id;
        assert_eq!(s.get_job(id).await.unwrap().unwrap().spec, spec);
    }

    #[tokio::test]
    async fn a_stored_spec_that_does_not_parse_is_a_decode_error_naming_the_column() {
        let (_d, s) = store().await;
        let id = add(&s, "broken", 0).await;
        sqlx::query("UPDATE jobs SET spec_json = '{\"train\": {\"nope\": 1}}' WHERE id = ?")
            .bind(id)
            .execute(s.pool())
            .await
            .unwrap();
        match s.get_job(id).await {
            // (sqlx's derive loses the serde message here: its source prints as "unprintable
            // error"; the column is named)
            Err(crate::store::StoreError::Sqlx(sqlx::Error::ColumnDecode { index, .. })) => {
                assert_eq!(index, "spec_json");
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn claims_follow_priority_then_age() {
        let (_d, s) = store().await;
        let a = add(&s, "a", 0).await;
        let b = add(&s, "b", 5).await;
        let c = add(&s, "c", 0).await;
        let d = add(&s, "d", 5).await;
        let e = add(&s, "e", -3).await;
        let mut order = Vec::new();
        while let Some(j) = s.claim_next_job("w", "cpu").await.unwrap() {
            assert_eq!(j.status(), JobStatus::Running);
            assert_eq!(j.attempts, 1);
            assert!(j.started_at.is_some());
            order.push(j.id);
        }
        assert_eq!(order, [b, d, a, c, e]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_never_share_a_job() {
        let (_d, s) = store().await;
        let mut ids = HashSet::new();
        for i in 0..3 {
            ids.insert(add(&s, &format!("j{i}"), 0).await);
        }
        let mut tasks = Vec::new();
        for w in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(j) = s.claim_next_job(&format!("w{w}"), "cpu").await.unwrap() {
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
        assert_eq!(claimed, expected, "each job claimed exactly once");
        for id in claimed {
            assert_eq!(s.get_job(id).await.unwrap().unwrap().attempts, 1);
        }
    }

    #[tokio::test]
    async fn transitions_are_guarded() {
        let (_d, s) = store().await;
        let q = add(&s, "q", 0).await;
        // Not running yet: cannot be marked cancelling or finished, can be deleted.
        assert!(!s.mark_job_cancelling(q).await.unwrap());
        assert!(!s.finish_job(q, JobStatus::Succeeded, None).await.unwrap());
        assert!(!s.requeue_job(q).await.unwrap());
        let r = s.claim_next_job("w", "cpu").await.unwrap().unwrap();
        assert_eq!(r.id, q);
        assert!(!s.cancel_queued_job(q).await.unwrap());
        assert!(
            s.delete_job(q).await.unwrap().is_none(),
            "running jobs are not deleted"
        );
        assert!(s.mark_job_cancelling(q).await.unwrap());
        assert!(!s.mark_job_cancelling(q).await.unwrap());
        assert!(s.finish_job(q, JobStatus::Cancelled, None).await.unwrap());
        assert!(!s
            .finish_job(q, JobStatus::Failed, Some("late"))
            .await
            .unwrap());
        let j = s.get_job(q).await.unwrap().unwrap();
        assert_eq!(j.status(), JobStatus::Cancelled);
        assert!(j.finished_at.is_some() && j.error.is_none());
        assert!(s.requeue_job(q).await.unwrap());
        assert_eq!(
            s.get_job(q).await.unwrap().unwrap().status(),
            JobStatus::Queued
        );

        // Recovery: running -> queued, cancelling -> cancelled.
        let a = s.claim_next_job("w", "cpu").await.unwrap().unwrap().id;
        let b = add(&s, "b", 0).await;
        s.claim_next_job("w2", "cpu").await.unwrap().unwrap();
        assert!(s.mark_job_cancelling(b).await.unwrap());
        let (requeued, cancelled) = s.recover_jobs().await.unwrap();
        assert_eq!((requeued, cancelled), (vec![a], vec![b]));
        let counts: std::collections::HashMap<_, _> = s
            .count_jobs_by_status()
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(counts.get("queued"), Some(&1));
        assert_eq!(counts.get("cancelled"), Some(&1));
        assert!(s.delete_job(b).await.unwrap().is_some());
        assert!(s.get_job(b).await.unwrap().is_none());
    }
}
