//! Exported models: one row per model directory under `<data-dir>/models/`.

use super::{Store, StoreResult};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ModelRow {
    pub id: i64,
    pub name: String,
    pub job_id: Option<i64>,
    pub step: i64,
    pub checkpoint: String,
    pub path: String,
    pub src_lang: String,
    pub tgt_lang: String,
    pub dtype: String,
    pub train_precision: String,
    pub val_bleu: Option<f64>,
    pub params: i64,
    pub size_bytes: i64,
    pub manifest_json: String,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct NewModel {
    pub name: String,
    pub job_id: Option<i64>,
    pub step: i64,
    pub checkpoint: String,
    pub path: String,
    pub src_lang: String,
    pub tgt_lang: String,
    pub dtype: String,
    pub train_precision: String,
    pub val_bleu: Option<f64>,
    pub params: i64,
    pub size_bytes: i64,
    pub manifest_json: String,
}

impl Store {
    pub async fn insert_model(&self, m: &NewModel) -> StoreResult<ModelRow> {
        Ok(sqlx::query_as::<_, ModelRow>(
            "INSERT INTO models (name, job_id, step, checkpoint, path, src_lang, tgt_lang, dtype,
                                 train_precision, val_bleu, params, size_bytes, manifest_json)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(&m.name)
        .bind(m.job_id)
        .bind(m.step)
        .bind(&m.checkpoint)
        .bind(&m.path)
        .bind(&m.src_lang)
        .bind(&m.tgt_lang)
        .bind(&m.dtype)
        .bind(&m.train_precision)
        .bind(m.val_bleu.filter(|x| x.is_finite()))
        .bind(m.params)
        .bind(m.size_bytes)
        .bind(&m.manifest_json)
        .fetch_one(self.pool())
        .await?)
    }

    pub async fn get_model(&self, id: i64) -> StoreResult<Option<ModelRow>> {
        Ok(
            sqlx::query_as::<_, ModelRow>("SELECT * FROM models WHERE id = ?")
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Newest first.
    pub async fn list_models(&self) -> StoreResult<Vec<ModelRow>> {
        Ok(
            sqlx::query_as::<_, ModelRow>("SELECT * FROM models ORDER BY id DESC")
                .fetch_all(self.pool())
                .await?,
        )
    }

    pub async fn newest_model(&self) -> StoreResult<Option<ModelRow>> {
        Ok(
            sqlx::query_as::<_, ModelRow>("SELECT * FROM models ORDER BY id DESC LIMIT 1")
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// True when a row was deleted.
    pub async fn delete_model(&self, id: i64) -> StoreResult<bool> {
        let r = sqlx::query("DELETE FROM models WHERE id = ?")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() > 0)
    }
}
