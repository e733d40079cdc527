//! `GET /api/jobs/{id}/overflows`: the overflow forensics of a job, which tensors and layers
//! overflow, how often and at which loss scales, which activation was traced first beyond f16,
//! the most recent overflowing steps, and the sampled f16 underflow of the gradients.

use super::jobs::load_job;
use super::{ApiError, ApiPath, ApiQuery, ApiResult, AppState};
use crate::store::overflows::{OverflowEventRow, OverflowSummary, RecoveryRow, UnderflowRow};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/jobs/{id}/overflows", get(overflows))
}

pub const DEFAULT_RECENT: i64 = 20;
pub const MAX_RECENT: i64 = 1000;

#[derive(Debug, Deserialize)]
struct OverflowsQuery {
    /// How many of the newest overflowing steps to list (default 20).
    recent: Option<i64>,
}

#[derive(Serialize)]
struct OverflowsView {
    job_id: i64,
    #[serde(flatten)]
    summary: OverflowSummary,
    /// Newest first.
    recent: Vec<OverflowEventRow>,
    /// Sampled steps (amp.underflow_every), oldest first.
    underflow: Vec<UnderflowRow>,
    /// Automatic recoveries from a collapsed scale, oldest first.
    recoveries: Vec<RecoveryRow>,
}

#[utoipa::path(get, path = "/api/jobs/{id}/overflows", operation_id = "job_overflows", tag = "jobs", params(("id" = i64, Path, description = "job id"), ("recent" = Option<i64>, Query, description = "newest overflowing steps to list (1..=1000, default 20)")), responses((status = 200, description = "overflow forensics: per tensor and layer, traced activations, recent events, sampled underflow", body = Object), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody)))]
async fn overflows(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<OverflowsQuery>,
) -> ApiResult<Json<OverflowsView>> {
    load_job(&state, id).await?;
    let recent = q.recent.unwrap_or(DEFAULT_RECENT);
    if !(1..=MAX_RECENT).contains(&recent) {
        return Err(ApiError::invalid(
            "recent",
            format!("allowed 1..={MAX_RECENT}"),
        ));
    }
    Ok(Json(OverflowsView {
        job_id: id,
        summary: state.store.overflow_summary(id).await?,
        recent: state.store.recent_overflows(id, recent).await?,
        underflow: state.store.list_underflow(id, 200).await?,
        recoveries: state.store.list_recoveries(id).await?,
    }))
}
