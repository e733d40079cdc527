//! `/api/jobs`: submit, list, inspect, cancel, resume, delete.

use super::spec::parse_job_request;
use super::{ApiError, ApiPath, ApiQuery, ApiResult, AppState};
use crate::config::TrainSpec;
use crate::store::{JobRow, JobStatus, NewJob};
use crate::worker::JobEventKind;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/jobs", post(create).get(list))
        .route("/api/jobs/{id}", get(show).delete(remove))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/jobs/{id}/resume", post(resume))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: i64,
    pub name: String,
    #[schema(value_type = String, example = "running")]
    pub status: JobStatus,
    pub priority: i64,
    pub worker: Option<String>,
    pub device: Option<String>,
    /// The node running the job (while it is active; the last one after), from `GET /api/nodes`.
    pub node: Option<String>,
    /// The device kind the job requires (`cpu` or `cuda`), null: any node may run it.
    pub requires_device: Option<String>,
    pub attempts: i64,
    pub error: Option<String>,
    pub run_dir: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
    pub progress: ProgressView,
    pub metrics: MetricsView,
    /// The full validated TrainSpec.
    #[schema(value_type = Object)]
    pub spec: TrainSpec,
    /// A fork's parent job (`POST /api/jobs/{id}/fork`), null otherwise.
    pub parent_job_id: Option<i64>,
    /// The step of the parent checkpoint a fork started from.
    pub parent_checkpoint: Option<i64>,
    /// Automatic recoveries from a collapsed loss scale (`amp.on_scale_collapse`), oldest
    /// first; only in the single-job view, and only when there were any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recoveries: Vec<crate::store::overflows::RecoveryRow>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProgressView {
    pub step: i64,
    pub total_steps: Option<i64>,
    /// step / total_steps, 0..=1.
    pub fraction: Option<f64>,
    pub epoch: i64,
    pub resumed_from_step: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MetricsView {
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    pub loss_scale: Option<f64>,
    pub skipped_steps: i64,
    pub tokens_per_s: Option<f64>,
    pub steps_per_s: Option<f64>,
    pub val_loss: Option<f64>,
    pub bleu: Option<f64>,
    pub chrf: Option<f64>,
    pub best_bleu: Option<f64>,
    pub best_bleu_step: Option<i64>,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> Self {
        let status = r.status();
        let fraction = r
            .total_steps
            .filter(|t| *t > 0)
            .map(|t| (r.current_step as f64 / t as f64).min(1.0));
        JobView {
            id: r.id,
            status,
            priority: r.priority,
            worker: r.worker,
            device: r.device,
            node: r.owner,
            requires_device: r.requires_device,
            attempts: r.attempts,
            error: r.error,
            run_dir: r.run_dir,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            updated_at: r.updated_at,
            progress: ProgressView {
                step: r.current_step,
                total_steps: r.total_steps,
                fraction,
                epoch: r.current_epoch,
                resumed_from_step: r.resumed_from_step,
            },
            metrics: MetricsView {
                loss: r.current_loss,
                lr: r.current_lr,
                loss_scale: r.loss_scale,
                skipped_steps: r.skipped_steps,
                tokens_per_s: r.tokens_per_s,
                steps_per_s: r.step_ms.filter(|ms| *ms > 0.0).map(|ms| 1000.0 / ms),
                val_loss: r.last_val_loss,
                bleu: r.last_bleu,
                chrf: r.last_chrf,
                best_bleu: r.best_bleu,
                best_bleu_step: r.best_bleu_step,
            },
            spec: r.spec,
            parent_job_id: r.parent_job_id,
            parent_checkpoint: r.parent_checkpoint,
            recoveries: Vec::new(),
            name: r.name,
        }
    }
}

pub(super) async fn load_job(state: &AppState, id: i64) -> ApiResult<JobRow> {
    state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(id))
}

#[utoipa::path(post, path = "/api/jobs", operation_id = "create_job", tag = "jobs", request_body(content = crate::http::openapi::JobSubmission, content_type = "application/json"), responses((status = 201, description = "queued", body = JobView), (status = 400, description = "malformed JSON", body = crate::http::openapi::ErrorBody), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody), (status = 507, description = "over the memory admission limit", body = crate::http::openapi::ErrorBody)))]
async fn create(State(state): State<AppState>, body: Bytes) -> ApiResult<impl IntoResponse> {
    super::corpora::fetch_named_uploads(&state, &body).await;
    let req = parse_job_request(&body, &state.settings)?;
    super::admission::admit(&state, &req.spec).await?;
    let row = state
        .store
        .insert_job(&NewJob {
            name: req.spec.name.clone(),
            priority: req.priority,
            spec: req.spec,
            requires_device: req.requires_device,
        })
        .await?;
    tracing::info!(job = row.id, name = %row.name, priority = row.priority, "job queued");
    state.pool.announce_queued([row.id]);
    Ok((StatusCode::CREATED, Json(JobView::from(row))))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct JobList {
    jobs: Vec<JobView>,
    total: i64,
    limit: i64,
    offset: i64,
}

#[utoipa::path(get, path = "/api/jobs", operation_id = "list_jobs", tag = "jobs", params(("status" = Option<String>, Query, description = "queued|running|succeeded|failed|cancelled"), ("limit" = Option<i64>, Query, description = "page size"), ("offset" = Option<i64>, Query, description = "rows to skip")), responses((status = 200, description = "jobs, newest first", body = JobList), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<JobList>> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "status",
                format!(
                    "unknown status `{s}`; one of {}",
                    JobStatus::ALL.map(|s| s.as_str()).join(", ")
                ),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit", "allowed 1..=500"));
    }
    let offset = q.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::invalid("offset", "must be >= 0"));
    }
    let (rows, total) = state.store.list_jobs(status, limit, offset).await?;
    Ok(Json(JobList {
        jobs: rows.into_iter().map(JobView::from).collect(),
        total,
        limit,
        offset,
    }))
}

#[utoipa::path(get, path = "/api/jobs/{id}", operation_id = "show_job", tag = "jobs", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "the job", body = JobView), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<JobView>> {
    let mut view: JobView = load_job(&state, id).await?.into();
    view.recoveries = state.store.list_recoveries(id).await?;
    Ok(Json(view))
}

/// Queued jobs are cancelled at once (200); running ones move to `cancelling` (202) and the
/// trainer checkpoints and stops at its next step.
#[utoipa::path(post, path = "/api/jobs/{id}/cancel", operation_id = "cancel_job", tag = "jobs", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "cancelled", body = JobView), (status = 202, description = "cancel requested (running)", body = JobView), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 409, description = "already finished", body = crate::http::openapi::ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<impl IntoResponse> {
    let store = &state.store;
    let code = if store.cancel_queued_job(id).await? {
        state.pool.publish(
            id,
            JobEventKind::Status {
                status: JobStatus::Cancelled,
                error: None,
            },
        );
        StatusCode::OK
    } else if store.mark_job_cancelling(id).await? {
        state.pool.request_cancel(id);
        state.pool.publish(
            id,
            JobEventKind::Status {
                status: JobStatus::Cancelling,
                error: None,
            },
        );
        StatusCode::ACCEPTED
    } else {
        let job = load_job(&state, id).await?;
        return Err(ApiError::conflict(format!(
            "job {id} is {}; only queued or running jobs can be cancelled",
            job.status
        )));
    };
    tracing::info!(job = id, "cancel requested");
    Ok((code, Json(JobView::from(load_job(&state, id).await?))))
}

/// `cancelled | failed → queued`: the worker continues from the latest valid checkpoint.
#[utoipa::path(post, path = "/api/jobs/{id}/resume", operation_id = "resume_job", tag = "jobs", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "queued again", body = JobView), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 409, description = "not resumable", body = crate::http::openapi::ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<JobView>> {
    if !state.store.requeue_job(id).await? {
        let job = load_job(&state, id).await?;
        return Err(ApiError::conflict(format!(
            "job {id} is {}; only cancelled or failed jobs can be resumed",
            job.status
        )));
    }
    tracing::info!(job = id, "job re-queued to resume");
    state.pool.announce_queued([id]);
    Ok(Json(load_job(&state, id).await?.into()))
}

/// Refused (409) while the job runs; otherwise removes its rows and its run directory.
#[utoipa::path(delete, path = "/api/jobs/{id}", operation_id = "delete_job", tag = "jobs", params(("id" = i64, Path, description = "id")), responses((status = 204, description = "deleted"), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 409, description = "still running", body = crate::http::openapi::ErrorBody)))]
async fn remove(State(state): State<AppState>, ApiPath(id): ApiPath<i64>) -> ApiResult<StatusCode> {
    match state.store.delete_job(id).await? {
        Some(row) => {
            if let Some(seed) = row.seed_dir.as_deref() {
                let _ = tokio::fs::remove_dir_all(seed).await;
            }
            let dir = state.pool.runs_dir().join(row.id.to_string());
            if dir.exists() {
                if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                    tracing::warn!(job = id, "could not remove {}: {e}", dir.display());
                }
            }
            tracing::info!(job = id, "job deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        None => {
            let job = load_job(&state, id).await?;
            Err(ApiError::conflict(format!(
                "job {id} is {}; cancel it before deleting",
                job.status
            )))
        }
    }
}
