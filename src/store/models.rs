//! Exported models: one row per model directory under `<data-dir>/models/`.

use super::{on_pool, Store, StoreResult};

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
        Ok(on_pool!(self, p => sqlx::query_as::<_, ModelRow>(
            "INSERT INTO models (name, job_id, step, checkpoint, path, src_lang, tgt_lang, dtype,
                                 train_precision, val_bleu, params, size_bytes, manifest_json)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING *",
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
        .fetch_one(p)
        .await?))
    }

    pub async fn get_model(&self, id: i64) -> StoreResult<Option<ModelRow>> {
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, ModelRow>("SELECT * FROM models WHERE id = $1")
            .bind(id)
            .fetch_optional(p)
            .await?),
        )
    }

    /// Newest first.
    pub async fn list_models(&self) -> StoreResult<Vec<ModelRow>> {
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, ModelRow>("SELECT * FROM models ORDER BY id DESC")
            .fetch_all(p)
            .await?),
        )
    }

    pub async fn newest_model(&self) -> StoreResult<Option<ModelRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, ModelRow>(
            "SELECT * FROM models ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(p)
        .await?))
    }

    /// True when a row was deleted.
    pub async fn delete_model(&self, id: i64) -> StoreResult<bool> {
        let n = on_pool!(self, p => sqlx::query("DELETE FROM models WHERE id = $1")
            .bind(id)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n > 0)
    }
}
