//! Uploaded corpora (TSV files under `<data-dir>/corpora`, and in the artifact store under
//! `corpora/` when there is one).

use super::{on_pool, Store, StoreResult};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct CorpusRow {
    pub id: i64,
    pub name: String,
    pub src_lang: String,
    pub tgt_lang: String,
    pub path: String,
    pub size_bytes: i64,
    pub lines: i64,
    pub malformed_lines: i64,
    pub created_at: String,
    /// Of the file's bytes as uploaded (NULL for uploads from before checksums were kept).
    pub sha256: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewCorpus {
    pub name: String,
    pub src_lang: String,
    pub tgt_lang: String,
    pub path: String,
    pub size_bytes: i64,
    pub lines: i64,
    pub malformed_lines: i64,
    pub sha256: String,
}

impl Store {
    /// None when a corpus with that name exists already.
    pub async fn insert_corpus(&self, c: &NewCorpus) -> StoreResult<Option<CorpusRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, CorpusRow>(
            "INSERT INTO corpora (name, src_lang, tgt_lang, path, size_bytes, lines, malformed_lines, sha256)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (name) DO NOTHING
             RETURNING *",
        )
        .bind(&c.name)
        .bind(&c.src_lang)
        .bind(&c.tgt_lang)
        .bind(&c.path)
        .bind(c.size_bytes)
        .bind(c.lines)
        .bind(c.malformed_lines)
        .bind(&c.sha256)
        .fetch_optional(p)
        .await?))
    }

    pub async fn get_corpus(&self, name: &str) -> StoreResult<Option<CorpusRow>> {
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, CorpusRow>("SELECT * FROM corpora WHERE name = $1")
            .bind(name)
            .fetch_optional(p)
            .await?),
        )
    }

    /// The upload stored at `path` on the node that took it (what a job's spec names).
    pub async fn get_corpus_by_path(&self, path: &str) -> StoreResult<Option<CorpusRow>> {
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, CorpusRow>("SELECT * FROM corpora WHERE path = $1")
            .bind(path)
            .fetch_optional(p)
            .await?),
        )
    }

    pub async fn list_corpora(&self) -> StoreResult<Vec<CorpusRow>> {
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, CorpusRow>("SELECT * FROM corpora ORDER BY name")
            .fetch_all(p)
            .await?),
        )
    }
}
