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
/// loss range.
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
}

#[derive(Serialize)]
struct MetricsPage {
    job_id: i64,
    points: Vec<Point>,
    /// Pass as `after_step` to continue; null when nothing was returned.
    next_after_step: Option<i64>,
    downsampled: bool,
}

/// Split `rows` (in step order) into consecutive buckets of `size` and keep each bucket's last
/// row plus its min/max loss. The overall last row is always kept.
pub fn downsample(rows: Vec<MetricRow>, size: usize) -> Vec<Point> {
    let size = size.max(1);
    rows.chunks(size)
        .map(|chunk| {
            let losses = chunk.iter().filter_map(|r| r.loss);
            let min = losses
                .clone()
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
            let max = losses.fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
            Point {
                row: chunk[chunk.len() - 1].clone(),
                loss_min: min,
                loss_max: max,
                bucket: chunk.len(),
            }
        })
        .collect()
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
    let points = match bucket {
        None => state
            .store
            .list_metrics(id, after, Some(limit))
            .await?
            .into_iter()
            .map(|row| Point {
                row,
                loss_min: None,
                loss_max: None,
                bucket: 1,
            })
            .collect(),
        Some(b) => {
            let rows = state.store.list_metrics(id, after, None).await?;
            let size = match b {
                Bucket::Every(n) => n,
                Bucket::Points(n) => rows.len().div_ceil(n),
            };
            let mut pts = downsample(rows, size);
            pts.truncate(limit as usize);
            pts
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: i64, loss: f64) -> MetricRow {
        MetricRow {
            step,
            epoch: 1,
            loss: Some(loss),
            lr: Some(1e-3),
            loss_scale: Some(1.0),
            found_inf: false,
            skipped: false,
            grad_norm: Some(1.0),
            tokens_per_s: Some(100.0),
            step_ms: Some(10.0),
        }
    }

    #[test]
    fn downsample_keeps_last_and_extremes() {
        // Losses 10, 3, 7, 1, 9, 2, 8 in buckets of 3: [10,3,7] [1,9,2] [8].
        let losses = [10.0, 3.0, 7.0, 1.0, 9.0, 2.0, 8.0];
        let rows: Vec<_> = losses
            .iter()
            .enumerate()
            .map(|(i, l)| row(i as i64 + 1, *l))
            .collect();
        let pts = downsample(rows.clone(), 3);
        assert_eq!(pts.len(), 3);
        assert_eq!(
            pts.iter().map(|p| p.row.step).collect::<Vec<_>>(),
            [3, 6, 7]
        );
        assert_eq!(
            pts.iter()
                .map(|p| (p.loss_min.unwrap(), p.loss_max.unwrap()))
                .collect::<Vec<_>>(),
            [(3.0, 10.0), (1.0, 9.0), (8.0, 8.0)]
        );
        assert_eq!(pts.iter().map(|p| p.bucket).sum::<usize>(), 7);
        // A bucket larger than the data collapses to the last point with global extremes.
        let one = downsample(rows, 100);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].row.step, 7);
        assert_eq!((one[0].loss_min, one[0].loss_max), (Some(1.0), Some(10.0)));
        // Non-finite losses are stored as NULL and ignored for the range.
        let mut r = row(1, 0.0);
        r.loss = None;
        let pts = downsample(vec![r, row(2, 4.0)], 2);
        assert_eq!((pts[0].loss_min, pts[0].loss_max), (Some(4.0), Some(4.0)));
    }
}
