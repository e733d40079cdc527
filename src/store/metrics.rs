//! Per-step training metrics, one row per (job, step). Inserted in batches by the worker.

use super::{Store, StoreResult};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct MetricRow {
    pub step: i64,
    pub epoch: i64,
    /// None when the value was not finite (SQLite stores NaN as NULL).
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    pub loss_scale: Option<f64>,
    pub found_inf: bool,
    pub skipped: bool,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub step_ms: Option<f64>,
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

impl Store {
    /// Insert a batch in one transaction. A row for an existing (job, step) replaces it, so a
    /// resumed run never duplicates steps.
    pub async fn insert_metrics(&self, job_id: i64, rows: &[MetricRow]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO metrics (job_id, step, epoch, loss, lr, loss_scale, found_inf, skipped,
                                      grad_norm, tokens_per_s, step_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (job_id, step) DO UPDATE SET
                   epoch = excluded.epoch, loss = excluded.loss, lr = excluded.lr,
                   loss_scale = excluded.loss_scale, found_inf = excluded.found_inf,
                   skipped = excluded.skipped, grad_norm = excluded.grad_norm,
                   tokens_per_s = excluded.tokens_per_s, step_ms = excluded.step_ms",
            )
            .bind(job_id)
            .bind(r.step)
            .bind(r.epoch)
            .bind(finite(r.loss))
            .bind(finite(r.lr))
            .bind(finite(r.loss_scale))
            .bind(r.found_inf)
            .bind(r.skipped)
            .bind(finite(r.grad_norm))
            .bind(finite(r.tokens_per_s))
            .bind(finite(r.step_ms))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Drop rows a resumed run will write again (steps after its checkpoint).
    pub async fn delete_metrics_after(&self, job_id: i64, step: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM metrics WHERE job_id = ? AND step > ?")
            .bind(job_id)
            .bind(step)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected())
    }

    /// Steps after `after_step`, in order; at most `limit` rows (all when None).
    pub async fn list_metrics(
        &self,
        job_id: i64,
        after_step: i64,
        limit: Option<i64>,
    ) -> StoreResult<Vec<MetricRow>> {
        Ok(sqlx::query_as::<_, MetricRow>(
            "SELECT step, epoch, loss, lr, loss_scale, found_inf, skipped, grad_norm, tokens_per_s, step_ms
             FROM metrics WHERE job_id = ? AND step > ? ORDER BY step LIMIT ?",
        )
        .bind(job_id)
        .bind(after_step)
        .bind(limit.unwrap_or(-1))
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn count_skipped_steps(&self, job_id: i64, up_to_step: i64) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM metrics WHERE job_id = ? AND step <= ? AND skipped",
        )
        .bind(job_id)
        .bind(up_to_step)
        .fetch_one(self.pool())
        .await?)
    }
}
