//! `/api/models`: exported models (list, inspect, delete) and `POST /api/jobs/{id}/export`.

use super::jobs::load_job;
use super::{ApiError, ApiPath, ApiQuery, ApiResult, AppState};
use crate::infer::cache::LoadedInfo;
use crate::infer::CheckpointChoice;
use crate::store::{EvaluationRow, ModelRow};
use crate::worker::ExportFailure;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/models", get(list))
        .route("/api/models/{id}", get(show).delete(remove))
        .route("/api/jobs/{id}/export", post(export))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelView {
    id: i64,
    name: String,
    /// `ampserve` (trained here) or `marian` (an imported pretrained MarianMT checkpoint).
    kind: String,
    job_id: Option<i64>,
    step: i64,
    checkpoint: String,
    src_lang: String,
    tgt_lang: String,
    /// Storage dtype of the weights (`f16`).
    dtype: String,
    train_precision: String,
    val_bleu: Option<f64>,
    params: i64,
    size_bytes: i64,
    path: String,
    created_at: String,
    /// Loaded in the translation cache now.
    loaded: bool,
    /// Compute dtype, resident bytes and batcher counters while loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    runtime: Option<LoadedInfo>,
    /// sha256 and size of every file (from the manifest).
    #[schema(value_type = Object)]
    files: Value,
    /// Test-set scores from `POST /api/models/{id}/evaluate`, oldest first.
    #[schema(value_type = Vec<Object>)]
    evaluations: Vec<EvaluationRow>,
}

async fn view(state: &AppState, r: ModelRow) -> ApiResult<ModelView> {
    let evaluations = state.store.list_evaluations(r.id).await?;
    Ok(view_with(state, r, evaluations))
}

fn view_with(state: &AppState, r: ModelRow, evaluations: Vec<EvaluationRow>) -> ModelView {
    let runtime = state.models.info(r.id);
    let files = serde_json::from_str::<Value>(&r.manifest_json)
        .ok()
        .and_then(|m| m.get("files").cloned())
        .unwrap_or(Value::Null);
    ModelView {
        kind: crate::infer::kind_of_manifest(&r.manifest_json).to_string(),
        loaded: runtime.is_some(),
        runtime,
        files,
        evaluations,
        id: r.id,
        name: r.name,
        job_id: r.job_id,
        step: r.step,
        checkpoint: r.checkpoint,
        src_lang: r.src_lang,
        tgt_lang: r.tgt_lang,
        dtype: r.dtype,
        train_precision: r.train_precision,
        val_bleu: r.val_bleu,
        params: r.params,
        size_bytes: r.size_bytes,
        path: r.path,
        created_at: r.created_at,
    }
}

pub(super) async fn load_model(state: &AppState, id: i64) -> ApiResult<ModelRow> {
    state
        .store
        .get_model(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no model with id {id}")).with_field("model"))
}

#[derive(Serialize, utoipa::ToSchema)]
struct ModelList {
    models: Vec<ModelView>,
}

#[utoipa::path(get, path = "/api/models", operation_id = "list_models", tag = "models", responses((status = 200, description = "models, newest first", body = ModelList)))]
async fn list(State(state): State<AppState>) -> ApiResult<Json<ModelList>> {
    let rows = state.store.list_models().await?;
    let mut models = Vec::with_capacity(rows.len());
    for r in rows {
        models.push(view(&state, r).await?);
    }
    Ok(Json(ModelList { models }))
}

#[utoipa::path(get, path = "/api/models/{id}", operation_id = "show_model", tag = "models", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "the model", body = ModelView), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ModelView>> {
    let r = load_model(&state, id).await?;
    Ok(Json(view(&state, r).await?))
}

#[utoipa::path(delete, path = "/api/models/{id}", operation_id = "delete_model", tag = "models", params(("id" = i64, Path, description = "id")), responses((status = 204, description = "deleted"), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn remove(State(state): State<AppState>, ApiPath(id): ApiPath<i64>) -> ApiResult<StatusCode> {
    let r = load_model(&state, id).await?;
    state.store.delete_model(id).await?;
    if let Err(e) = state.pool.delete_model_artifacts(&r).await {
        tracing::warn!(
            model = id,
            "cannot remove its files from the artifact store: {e:#}"
        );
    }
    // Waits for a load of this model in progress: its readers must not see the files vanish.
    let cache = state.models.clone();
    let _ = tokio::task::spawn_blocking(move || cache.forget(id)).await;
    // only ever delete inside <data-dir>/models
    let dir = Path::new(&r.path);
    let models_dir = state.pool.models_dir();
    if dir.starts_with(&models_dir) && dir != models_dir {
        if let Err(e) = tokio::fs::remove_dir_all(dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(model = id, "cannot remove {}: {e}", dir.display());
            }
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    checkpoint: Option<String>,
    /// Average this many checkpoints ending at `checkpoint` (absent: the job's
    /// `checkpoint.average_last`).
    average_last: Option<usize>,
}

#[derive(Serialize)]
struct Exported {
    model: ModelView,
}

#[utoipa::path(post, path = "/api/jobs/{id}/export", operation_id = "export_model", tag = "models", params(("id" = i64, Path, description = "job id"), ("checkpoint" = Option<String>, Query, description = "best|last|step number"), ("average_last" = Option<i64>, Query, description = "average this many checkpoints")), responses((status = 201, description = "exported", body = Object), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody), (status = 409, description = "no checkpoint yet", body = crate::http::openapi::ErrorBody)))]
async fn export(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult<impl IntoResponse> {
    let choice: CheckpointChoice = match q.checkpoint.as_deref() {
        None | Some("") => CheckpointChoice::Best,
        Some(s) => s.parse().map_err(|e: crate::infer::NotACheckpointChoice| {
            ApiError::invalid("checkpoint", e.to_string())
        })?,
    };
    if let Some(n) = q.average_last {
        if !(1..=1000).contains(&n) {
            return Err(ApiError::invalid(
                "average_last",
                format!("{n} is out of range; allowed 1..=1000"),
            ));
        }
    }
    let job = load_job(&state, id).await?;
    let row = state
        .pool
        .export_job(&job, choice, q.average_last)
        .await
        .map_err(|e| match e {
            ExportFailure::NotFound(m) => {
                ApiError::conflict(format!("job {id} cannot be exported: {m}"))
            }
            ExportFailure::Failed(m) => ApiError::internal(format!("export failed: {m}")),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(Exported {
            model: view_with(&state, row, Vec::new()),
        }),
    ))
}
