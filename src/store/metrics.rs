//! Per-step training metrics, one row per (job, step). Inserted in batches by the worker.

use super::{fence, on_pool, Lease, Store, StoreResult};
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

/// One bucket of [`Store::downsample_metrics`]: its last row, the bucket's loss range and how
/// many of its steps were skipped and overflowed (exact counts, not inferred from the scale).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct MetricBucket {
    #[sqlx(flatten)]
    pub row: MetricRow,
    pub loss_min: Option<f64>,
    pub loss_max: Option<f64>,
    pub rows_in_bucket: i64,
    pub skipped_in_bucket: i64,
    pub overflowed_in_bucket: i64,
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

impl Store {
    /// Insert a batch in one transaction, while `lease` holds. A row for an existing (job,
    /// step) replaces it, so a resumed run never duplicates steps.
    pub async fn insert_metrics(&self, lease: &Lease, rows: &[MetricRow]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            for r in rows {
                sqlx::query(
                    "INSERT INTO metrics (job_id, step, epoch, loss, lr, loss_scale, found_inf,
                                          skipped, grad_norm, tokens_per_s, step_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (job_id, step) DO UPDATE SET
                       epoch = excluded.epoch, loss = excluded.loss, lr = excluded.lr,
                       loss_scale = excluded.loss_scale, found_inf = excluded.found_inf,
                       skipped = excluded.skipped, grad_norm = excluded.grad_norm,
                       tokens_per_s = excluded.tokens_per_s, step_ms = excluded.step_ms",
                )
                .bind(lease.job_id)
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
        });
        Ok(())
    }

    /// Drop rows a resumed run will write again (steps after its checkpoint).
    pub async fn delete_metrics_after(&self, lease: &Lease, step: i64) -> StoreResult<u64> {
        Ok(on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            let r = sqlx::query("DELETE FROM metrics WHERE job_id = $1 AND step > $2")
                .bind(lease.job_id)
                .bind(step)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            r.rows_affected()
        }))
    }

    /// Steps after `after_step`, in order; at most `limit` rows (all when None).
    pub async fn list_metrics(
        &self,
        job_id: i64,
        after_step: i64,
        limit: Option<i64>,
    ) -> StoreResult<Vec<MetricRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, MetricRow>(
            "SELECT step, epoch, loss, lr, loss_scale, found_inf, skipped, grad_norm, tokens_per_s, step_ms
             FROM metrics WHERE job_id = $1 AND step > $2 ORDER BY step LIMIT $3",
        )
        .bind(job_id)
        .bind(after_step)
        .bind(limit.unwrap_or(i64::MAX))
        .fetch_all(p)
        .await?))
    }

    /// Rows after `after_step` in consecutive buckets of `size` rows (in step order), computed in
    /// SQL so a long job's rows never sit in memory: each bucket's last row, its loss range
    /// (non-finite losses, stored as NULL, are ignored) and its row count; at most `limit` buckets.
    pub async fn downsample_metrics(
        &self,
        job_id: i64,
        after_step: i64,
        size: i64,
        limit: i64,
    ) -> StoreResult<Vec<MetricBucket>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, MetricBucket>(
            "WITH r AS (
                 SELECT step, epoch, loss, lr, loss_scale, found_inf, skipped, grad_norm,
                        tokens_per_s, step_ms,
                        (ROW_NUMBER() OVER (ORDER BY step) - 1) / $1 AS b
                 FROM metrics WHERE job_id = $2 AND step > $3
             ), g AS (
                 SELECT b, MAX(step) AS last_step, MIN(loss) AS loss_min, MAX(loss) AS loss_max,
                        COUNT(*) AS rows_in_bucket,
                        SUM(CASE WHEN skipped THEN 1 ELSE 0 END) AS skipped_in_bucket,
                        SUM(CASE WHEN found_inf THEN 1 ELSE 0 END) AS overflowed_in_bucket
                 FROM r GROUP BY b
             )
             SELECT r.step, r.epoch, r.loss, r.lr, r.loss_scale, r.found_inf, r.skipped,
                    r.grad_norm, r.tokens_per_s, r.step_ms, g.loss_min, g.loss_max, g.rows_in_bucket,
                    g.skipped_in_bucket, g.overflowed_in_bucket
             FROM g JOIN r ON r.step = g.last_step
             ORDER BY r.step LIMIT $4",
        )
        .bind(size.max(1))
        .bind(job_id)
        .bind(after_step)
        .bind(limit)
        .fetch_all(p)
        .await?))
    }

    /// Rows after `after_step`.
    pub async fn count_metrics(&self, job_id: i64, after_step: i64) -> StoreResult<i64> {
        Ok(on_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM metrics WHERE job_id = $1 AND step > $2",
        )
        .bind(job_id)
        .bind(after_step)
        .fetch_one(p)
        .await?))
    }

    pub async fn count_skipped_steps(&self, job_id: i64, up_to_step: i64) -> StoreResult<i64> {
        Ok(on_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM metrics WHERE job_id = $1 AND step <= $2 AND skipped",
        )
        .bind(job_id)
        .bind(up_to_step)
        .fetch_one(p)
        .await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewJob;
    use std::time::Instant;

    fn row(step: i64, loss: f64) -> MetricRow {
        MetricRow {
            step,
            epoch: 1,
            loss: Some(loss),
            lr: Some(1e-3),
            loss_scale: Some(65536.0),
            found_inf: step % 10 == 0,
            skipped: step % 10 == 0,
            grad_norm: if step % 10 == 0 {
                Some(f64::NAN)
            } else {
                Some(0.5)
            },
            tokens_per_s: Some(1234.0),
            step_ms: Some(12.0),
        }
    }

    async fn owned_job(s: &Store) -> Lease {
        let job = s
            .insert_job(&NewJob {
                name: "m".into(),
                priority: 0,
                spec: crate::config::TrainSpec::default(),
                requires_device: None,
            })
            .await
            .unwrap()
            .id;
        crate::store::testing::adopt(s, job, "n1").await.unwrap()
    }

    #[tokio::test]
    async fn downsampled_buckets_count_their_skipped_and_overflowed_steps_exactly() {
        for t in crate::store::testing::engines().await {
            downsampled_buckets_on(&t.store).await;
        }
    }

    async fn downsampled_buckets_on(s: &Store) {
        let lease = owned_job(s).await;
        let job = lease.job_id;
        // skipped (and overflowed) at steps 10, 20, 30, 40; one overflow that was not skipped
        // (step 15) so the two counts differ; the scale never changes, so no scale drop says it
        let mut rows: Vec<_> = (1..=40).map(|i| row(i, 1.0)).collect();
        rows[14].found_inf = true;
        s.insert_metrics(&lease, &rows).await.unwrap();
        let b = s.downsample_metrics(job, 0, 15, 100).await.unwrap();
        assert_eq!(
            b.iter()
                .map(|b| (
                    b.row.step,
                    b.rows_in_bucket,
                    b.skipped_in_bucket,
                    b.overflowed_in_bucket
                ))
                .collect::<Vec<_>>(),
            [(15, 15, 1, 2), (30, 15, 2, 2), (40, 10, 1, 1)]
        );
        // after_step starts the buckets after it
        let b = s.downsample_metrics(job, 20, 100, 100).await.unwrap();
        assert_eq!((b[0].skipped_in_bucket, b[0].overflowed_in_bucket), (2, 2));
    }

    /// Also measures the batched insert cost that the worker pays per step.
    #[tokio::test]
    async fn batched_inserts_replace_and_cascade() {
        for t in crate::store::testing::engines().await {
            batched_inserts_on(&t.store).await;
        }
    }

    async fn batched_inserts_on(s: &Store) {
        let lease = owned_job(s).await;
        let job = lease.job_id;
        let n = 20_000;
        let rows: Vec<_> = (1..=n).map(|i| row(i, 1.0 / i as f64)).collect();
        let t = Instant::now();
        for chunk in rows.chunks(200) {
            s.insert_metrics(&lease, chunk).await.unwrap();
        }
        let el = t.elapsed();
        eprintln!(
            "{}: inserted {n} metric rows in batches of 200: {:.1} ms, {:.2} us/row",
            s.engine(),
            el.as_secs_f64() * 1e3,
            el.as_secs_f64() * 1e6 / n as f64
        );
        let back = s.list_metrics(job, 0, None).await.unwrap();
        assert_eq!(back.len(), n as usize);
        assert!(back.windows(2).all(|w| w[0].step + 1 == w[1].step));
        assert_eq!(back[9].grad_norm, None, "NaN is stored as NULL");
        assert_eq!(s.count_skipped_steps(job, 100).await.unwrap(), 10);

        // A resumed run: drop rows after its checkpoint, then rewrite (or upsert) them.
        assert_eq!(
            s.delete_metrics_after(&lease, 100).await.unwrap(),
            n as u64 - 100
        );
        s.insert_metrics(&lease, &[row(100, 9.0), row(101, 8.0)])
            .await
            .unwrap();
        let back = s.list_metrics(job, 98, Some(10)).await.unwrap();
        assert_eq!(
            back.iter().map(|r| (r.step, r.loss)).collect::<Vec<_>>(),
            [(99, Some(1.0 / 99.0)), (100, Some(9.0)), (101, Some(8.0))]
        );
        // Downsampling in SQL: buckets of 3 over steps 96..=101, their last rows and loss ranges.
        let b = s.downsample_metrics(job, 95, 3, 100).await.unwrap();
        assert_eq!(
            b.iter()
                .map(|b| (b.row.step, b.rows_in_bucket))
                .collect::<Vec<_>>(),
            [(98, 3), (101, 3)]
        );
        assert_eq!(
            (b[0].loss_min, b[0].loss_max),
            (Some(1.0 / 98.0), Some(1.0 / 96.0))
        );
        assert_eq!(
            (b[1].loss_min, b[1].loss_max),
            (Some(1.0 / 99.0), Some(9.0))
        );
        assert_eq!(s.count_metrics(job, 95).await.unwrap(), 6);
        // A bucket larger than the data is one point: the last row, the global range.
        let one = s.downsample_metrics(job, 0, 1_000, 100).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].row.step, one[0].rows_in_bucket), (101, 101));
        assert_eq!(
            (one[0].loss_min, one[0].loss_max),
            (Some(1.0 / 99.0), Some(9.0))
        );
        // `limit` caps the buckets, from the first.
        let two = s.downsample_metrics(job, 0, 10, 2).await.unwrap();
        assert_eq!(two.iter().map(|b| b.row.step).collect::<Vec<_>>(), [10, 20]);
        // Deleting the job removes its rows (foreign key cascade).
        s.execute(&format!(
            "UPDATE jobs SET status = 'failed' WHERE id = {job}"
        ))
        .await
        .unwrap();
        s.delete_job(job).await.unwrap().unwrap();
        assert!(s.list_metrics(job, 0, None).await.unwrap().is_empty());
    }
}
