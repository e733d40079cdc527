//! One row per checkpoint file on disk. Retention (done by the trainer) reports the files it
//! removed; their rows are deleted in the same transaction that records the new checkpoint.

use super::{fence, on_pool, Lease, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CheckpointRow {
    pub id: i64,
    pub job_id: i64,
    pub step: i64,
    pub epoch: i64,
    pub path: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub val_bleu: Option<f64>,
    pub is_best: bool,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub step: i64,
    pub epoch: i64,
    pub path: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub val_bleu: Option<f64>,
    pub is_best: bool,
}

impl Store {
    /// Record a checkpoint (replacing a row for the same path), clear `is_best` elsewhere when
    /// this one is the best, and delete the rows of the files retention removed; all while
    /// `lease` holds.
    pub async fn record_checkpoint(
        &self,
        lease: &Lease,
        c: &NewCheckpoint,
        removed: &[String],
    ) -> StoreResult<()> {
        let insert = format!(
            "INSERT INTO checkpoints (job_id, step, epoch, path, size_bytes, sha256, val_bleu, is_best)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (job_id, path) DO UPDATE SET
               step = excluded.step, epoch = excluded.epoch, size_bytes = excluded.size_bytes,
               sha256 = excluded.sha256, val_bleu = excluded.val_bleu, is_best = excluded.is_best,
               created_at = {}",
            self.now_sql()
        );
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            for path in removed {
                sqlx::query("DELETE FROM checkpoints WHERE job_id = $1 AND path = $2")
                    .bind(lease.job_id)
                    .bind(path)
                    .execute(&mut *tx)
                    .await?;
            }
            if c.is_best {
                sqlx::query("UPDATE checkpoints SET is_best = FALSE WHERE job_id = $1")
                    .bind(lease.job_id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(&insert)
                .bind(lease.job_id)
                .bind(c.step)
                .bind(c.epoch)
                .bind(&c.path)
                .bind(c.size_bytes)
                .bind(&c.sha256)
                .bind(c.val_bleu.filter(|x| x.is_finite()))
                .bind(c.is_best)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Rows for checkpoints after the step a run resumed from: they were not valid (or are
    /// about to be rewritten).
    pub async fn delete_checkpoints_after(&self, lease: &Lease, step: i64) -> StoreResult<u64> {
        Ok(on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            let r = sqlx::query("DELETE FROM checkpoints WHERE job_id = $1 AND step > $2")
                .bind(lease.job_id)
                .bind(step)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            r.rows_affected()
        }))
    }

    /// Drop the rows of these checkpoint files (gone from disk and from the artifact store:
    /// retention removed them and a crash came before the event that reports it).
    pub async fn forget_checkpoints(&self, lease: &Lease, paths: &[String]) -> StoreResult<()> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            for path in paths {
                sqlx::query("DELETE FROM checkpoints WHERE job_id = $1 AND path = $2")
                    .bind(lease.job_id)
                    .bind(path)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// A checkpoint file restored into this node's run directory: its row names the local path.
    pub async fn relocate_checkpoint(
        &self,
        lease: &Lease,
        from: &str,
        to: &str,
    ) -> StoreResult<()> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            sqlx::query("UPDATE checkpoints SET path = $3 WHERE job_id = $1 AND path = $2")
                .bind(lease.job_id)
                .bind(from)
                .bind(to)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn list_checkpoints(&self, job_id: i64) -> StoreResult<Vec<CheckpointRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, CheckpointRow>(
            "SELECT * FROM checkpoints WHERE job_id = $1 ORDER BY step, id",
        )
        .bind(job_id)
        .fetch_all(p)
        .await?))
    }
}
