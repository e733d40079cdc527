//! `/api/jobs/{id}/checkpoints`: the checkpoint files of a job (step, path, size, sha256, val
//! BLEU, best flag) as recorded by the worker.

use super::jobs::load_job;
use super::{ApiPath, ApiResult, AppState};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/jobs/{id}/checkpoints", get(list))
}

#[derive(Serialize)]
struct CheckpointView {
    id: i64,
    step: i64,
    epoch: i64,
    path: String,
    size_bytes: i64,
    sha256: String,
    val_bleu: Option<f64>,
    is_best: bool,
    created_at: String,
    /// The file is present on disk.
    exists: bool,
}

#[derive(Serialize)]
struct CheckpointList {
    job_id: i64,
    checkpoints: Vec<CheckpointView>,
}

#[utoipa::path(get, path = "/api/jobs/{id}/checkpoints", operation_id = "job_checkpoints", tag = "jobs", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "checkpoints on disk", body = Object), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<CheckpointList>> {
    load_job(&state, id).await?;
    let rows = state.store.list_checkpoints(id).await?;
    let checkpoints = rows
        .into_iter()
        .map(|r| CheckpointView {
            exists: std::path::Path::new(&r.path).is_file(),
            id: r.id,
            step: r.step,
            epoch: r.epoch,
            path: r.path,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            val_bleu: r.val_bleu,
            is_best: r.is_best,
            created_at: r.created_at,
        })
        .collect();
    Ok(Json(CheckpointList {
        job_id: id,
        checkpoints,
    }))
}
