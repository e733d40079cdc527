//! Test-set scores of exported models: why a table of their own? A model is scored on several
//! corpora (and beam sizes) over its life, and each score must stay next to the model it
//! describes (rows go with the model on delete).

use super::{on_pool, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct EvaluationRow {
    pub id: i64,
    pub model_id: i64,
    pub corpus: String,
    pub sentences: i64,
    pub beam_size: i64,
    pub bleu: f64,
    pub chrf: f64,
    #[serde(skip)]
    pub report_json: String,
    pub created_at: String,
}

/// One test-set score to record for a model.
#[derive(Debug, Clone)]
pub struct NewEvaluation<'a> {
    pub corpus: &'a str,
    pub sentences: i64,
    pub beam_size: i64,
    pub bleu: f64,
    pub chrf: f64,
    pub report_json: &'a str,
}

impl Store {
    pub async fn insert_evaluation(
        &self,
        model_id: i64,
        e: &NewEvaluation<'_>,
    ) -> StoreResult<EvaluationRow> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, EvaluationRow>(
            "INSERT INTO model_evaluations (model_id, corpus, sentences, beam_size, bleu, chrf, report_json)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        )
        .bind(model_id)
        .bind(e.corpus)
        .bind(e.sentences)
        .bind(e.beam_size)
        .bind(e.bleu)
        .bind(e.chrf)
        .bind(e.report_json)
        .fetch_one(p)
        .await?))
    }

    /// Oldest first.
    pub async fn list_evaluations(&self, model_id: i64) -> StoreResult<Vec<EvaluationRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, EvaluationRow>(
            "SELECT * FROM model_evaluations WHERE model_id = $1 ORDER BY id",
        )
        .bind(model_id)
        .fetch_all(p)
        .await?))
    }
}
