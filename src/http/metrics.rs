//! `/api/jobs/{id}/metrics` (per-step training metrics, paginated, optionally downsampled) and
//! `/api/jobs/{id}/validations`.

use super::jobs::load_job;
use super::{ApiError, ApiPath, ApiQuery, ApiResult, AppState};
use crate::store::MetricRow;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/jobs/{id}/metrics", get(metrics))
        .route("/api/jobs/{id}/validations", get(validations))
}

pub const DEFAULT_LIMIT: i64 = 1000;
pub const MAX_LIMIT: i64 = 100_000;

#[derive(Debug, Deserialize)]
struct MetricsQuery {
    after_step: Option<i64>,
    limit: Option<i64>,
    /// Buckets of N consecutive steps.
    every: Option<usize>,
    /// At most N buckets over the whole range.
    points: Option<usize>,
}

/// One returned point. Downsampled points are the last step of their bucket, with the bucket's
/// loss range and its exact counts of skipped and overflowed steps (a plain row: 0 or 1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    #[serde(flatten)]
    pub row: MetricRow,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_max: Option<f64>,
    /// Steps in this point's bucket.
    pub bucket: usize,
    /// Skipped optimizer steps in this point's bucket.
    pub bucket_skipped: usize,
    /// Steps with inf/NaN gradients in this point's bucket.
    pub bucket_overflowed: usize,
}

#[derive(Serialize)]
struct MetricsPage {
    job_id: i64,
    points: Vec<Point>,
    /// Pass as `after_step` to continue; null when nothing was returned.
    next_after_step: Option<i64>,
    downsampled: bool,
}

#[utoipa::path(get, path = "/api/jobs/{id}/metrics", operation_id = "job_metrics", tag = "jobs", params(("id" = i64, Path, description = "job id"), ("after_step" = Option<i64>, Query, description = "steps after this one"), ("limit" = Option<i64>, Query, description = "most points"), ("every" = Option<i64>, Query, description = "buckets of N consecutive steps"), ("points" = Option<i64>, Query, description = "at most N buckets")), responses((status = 200, description = "training curve points", body = Object), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody)))]
async fn metrics(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<MetricsQuery>,
) -> ApiResult<Json<MetricsPage>> {
    load_job(&state, id).await?;
    let after = q.after_step.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("allowed 1..={MAX_LIMIT}"),
        ));
    }
    let bucket = match (q.every, q.points) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "points",
                "give either `every` or `points`, not both",
            ))
        }
        (Some(0), _) => return Err(ApiError::invalid("every", "must be >= 1")),
        (_, Some(0)) => return Err(ApiError::invalid("points", "must be >= 1")),
        (Some(n), None) => Some(Bucket::Every(n)),
        (None, Some(n)) => Some(Bucket::Points(n)),
        (None, None) => None,
    };
    let points: Vec<Point> = match bucket {
        None => state
            .store
            .list_metrics(id, after, Some(limit))
            .await?
            .into_iter()
            .map(|row| Point {
                bucket_skipped: row.skipped as usize,
                bucket_overflowed: row.found_inf as usize,
                row,
                loss_min: None,
                loss_max: None,
                bucket: 1,
            })
            .collect(),
        // Downsampled in SQL: only the buckets' rows leave the database.
        Some(b) => {
            let size = match b {
                Bucket::Every(n) => n as i64,
                Bucket::Points(n) => {
                    let rows = state.store.count_metrics(id, after).await?.max(0) as u64;
                    rows.div_ceil(n as u64) as i64
                }
            };
            state
                .store
                .downsample_metrics(id, after, size, limit)
                .await?
                .into_iter()
                .map(|b| Point {
                    row: b.row,
                    loss_min: b.loss_min,
                    loss_max: b.loss_max,
                    bucket: b.rows_in_bucket as usize,
                    bucket_skipped: b.skipped_in_bucket.max(0) as usize,
                    bucket_overflowed: b.overflowed_in_bucket.max(0) as usize,
                })
                .collect()
        }
    };
    Ok(Json(MetricsPage {
        job_id: id,
        next_after_step: points.last().map(|p| p.row.step),
        downsampled: bucket.is_some(),
        points,
    }))
}

#[derive(Clone, Copy)]
enum Bucket {
    Every(usize),
    Points(usize),
}

#[derive(Serialize)]
struct ValidationView {
    step: i64,
    epoch: i64,
    val_loss: Option<f64>,
    bleu: Option<f64>,
    chrf: Option<f64>,
    cer: Option<f64>,
    wer: Option<f64>,
    sentences: i64,
    samples: Value,
    created_at: String,
}

#[utoipa::path(get, path = "/api/jobs/{id}/validations", operation_id = "job_validations", tag = "jobs", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "validation results", body = Object), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn validations(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<Value>> {
    load_job(&state, id).await?;
    let rows = state.store.list_validations(id).await?;
    let views: Vec<ValidationView> = rows
        .into_iter()
        .map(|v| ValidationView {
            step: v.step,
            epoch: v.epoch,
            val_loss: v.val_loss,
            bleu: v.bleu,
            chrf: v.chrf,
            cer: v.cer,
            wer: v.wer,
            sentences: v.sentences,
            samples: serde_json::from_str(&v.samples_json).unwrap_or(Value::Null),
            created_at: v.created_at,
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "job_id": id, "validations": views }),
    ))
}
