//! Validation results (loss, BLEU, chrF, CER, WER) with sample translations as JSON.

use super::{fence, on_pool, Lease, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ValidationRow {
    pub step: i64,
    pub epoch: i64,
    pub val_loss: Option<f64>,
    pub bleu: Option<f64>,
    pub chrf: Option<f64>,
    pub cer: Option<f64>,
    pub wer: Option<f64>,
    pub sentences: i64,
    /// JSON array of `{source, reference, hypothesis}`.
    pub samples_json: String,
    pub created_at: String,
}

impl Store {
    /// Record (or replace) a validation, while `lease` holds.
    pub async fn insert_validation(&self, lease: &Lease, v: &ValidationRow) -> StoreResult<()> {
        let f = |x: Option<f64>| x.filter(|x| x.is_finite());
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            sqlx::query(
                "INSERT INTO validations (job_id, step, epoch, val_loss, bleu, chrf, cer, wer, sentences, samples_json)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (job_id, step) DO UPDATE SET
                   epoch = excluded.epoch, val_loss = excluded.val_loss, bleu = excluded.bleu,
                   chrf = excluded.chrf, cer = excluded.cer, wer = excluded.wer,
                   sentences = excluded.sentences, samples_json = excluded.samples_json",
            )
            .bind(lease.job_id)
            .bind(v.step)
            .bind(v.epoch)
            .bind(f(v.val_loss))
            .bind(f(v.bleu))
            .bind(f(v.chrf))
            .bind(f(v.cer))
            .bind(f(v.wer))
            .bind(v.sentences)
            .bind(&v.samples_json)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn delete_validations_after(&self, lease: &Lease, step: i64) -> StoreResult<u64> {
        Ok(on_pool!(self, p => {
            let mut tx = p.begin().await?;
            fence!(tx, lease);
            let r = sqlx::query("DELETE FROM validations WHERE job_id = $1 AND step > $2")
                .bind(lease.job_id)
                .bind(step)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            r.rows_affected()
        }))
    }

    pub async fn list_validations(&self, job_id: i64) -> StoreResult<Vec<ValidationRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, ValidationRow>(
            "SELECT step, epoch, val_loss, bleu, chrf, cer, wer, sentences, samples_json, created_at
             FROM validations WHERE job_id = $1 ORDER BY step",
        )
        .bind(job_id)
        .fetch_all(p)
        .await?))
    }
}
