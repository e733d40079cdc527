//! Validation results (loss, BLEU, chrF, CER, WER) with sample translations as JSON.

use super::{Store, StoreResult};

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
    pub async fn insert_validation(&self, job_id: i64, v: &ValidationRow) -> StoreResult<()> {
        let f = |x: Option<f64>| x.filter(|x| x.is_finite());
        sqlx::query(
            "INSERT INTO validations (job_id, step, epoch, val_loss, bleu, chrf, cer, wer, sentences, samples_json)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (job_id, step) DO UPDATE SET
               epoch = excluded.epoch, val_loss = excluded.val_loss, bleu = excluded.bleu,
               chrf = excluded.chrf, cer = excluded.cer, wer = excluded.wer,
               sentences = excluded.sentences, samples_json = excluded.samples_json",
        )
        .bind(job_id)
        .bind(v.step)
        .bind(v.epoch)
        .bind(f(v.val_loss))
        .bind(f(v.bleu))
        .bind(f(v.chrf))
        .bind(f(v.cer))
        .bind(f(v.wer))
        .bind(v.sentences)
        .bind(&v.samples_json)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn delete_validations_after(&self, job_id: i64, step: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM validations WHERE job_id = ? AND step > ?")
            .bind(job_id)
            .bind(step)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected())
    }

    pub async fn list_validations(&self, job_id: i64) -> StoreResult<Vec<ValidationRow>> {
        Ok(sqlx::query_as::<_, ValidationRow>(
            "SELECT step, epoch, val_loss, bleu, chrf, cer, wer, sentences, samples_json, created_at
             FROM validations WHERE job_id = ? ORDER BY step",
        )
        .bind(job_id)
        .fetch_all(self.pool())
        .await?)
    }
}
