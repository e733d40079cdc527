//! The OpenAPI 3.1 description, generated from the code: the handlers carry `#[utoipa::path]`
//! and the request/response types `ToSchema`, and [`ApiDoc`] only lists them. Served at
//! `/openapi.json`, rendered by the embedded `/docs` page (no CDN). Both sit outside the auth
//! layer, like the status page: they describe the API, they expose no data.

use super::page;
use super::AppState;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

/// The error body every 4xx/5xx carries.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable kind (`invalid_field`, `not_found`, ...).
    pub code: String,
    pub message: String,
    /// Dotted path of the offending field, when one is to blame.
    pub field: Option<String>,
}

/// `POST /api/jobs` body: a `TrainSpec` (sections deep-merged over the optional `config`
/// preset) plus `priority`. The sections are checked field by field by the server (422 naming
/// the field); here they are open objects.
#[derive(Serialize, ToSchema)]
pub struct JobSubmission {
    /// Name of a preset in the configs directory (`tiny`, ...).
    pub config: Option<String>,
    pub name: Option<String>,
    /// -1000..=1000, higher runs first (default 0).
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i64>,
    /// `cpu` or `cuda`: only nodes with such a device claim the job (default: any node).
    #[schema(example = "cuda")]
    pub device: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub model: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub train: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub amp: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<Value>,
}

/// `POST /api/jobs/{id}/fork` body.
#[derive(Serialize, ToSchema)]
pub struct ForkRequest {
    /// `latest` (default), `best`, or a step number (number or string).
    #[schema(value_type = Option<String>, example = "latest")]
    pub checkpoint: Option<Value>,
    /// Spec sections to change: `name`, `train.{precision, lr, schedule, warmup_steps,
    /// max_steps, max_time_s, epochs, clip_grad_norm, valid_every, valid_every_epochs,
    /// valid_samples, early_stopping}`, `amp.*`, `checkpoint.*`.
    #[schema(value_type = Option<Object>)]
    pub overrides: Option<Value>,
    /// -1000..=1000 (default 0).
    pub priority: Option<i64>,
}

/// `POST /api/experiments` body: a job spec as in [`JobSubmission`] plus the arms and a budget.
#[derive(Serialize, ToSchema)]
pub struct ExperimentSubmission {
    pub config: Option<String>,
    pub name: Option<String>,
    /// Precision names (`fp32`, `f16`, `bf16`) or objects `{"label", "train": {precision, lr,
    /// schedule, warmup_steps, clip_grad_norm}, "amp": {...}}`; 1..=8, the first is the baseline.
    #[schema(value_type = Vec<Object>)]
    pub arms: Vec<Value>,
    /// Step budget of every arm (0 or absent: none); at least one budget is required.
    pub max_steps: Option<u64>,
    /// Training-time budget of every arm, seconds.
    pub max_time_s: Option<f64>,
    /// BLEU points within which an arm is "within noise" of the first (default 1.0).
    pub noise_bleu: Option<f64>,
    pub priority: Option<i64>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub model: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub train: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub amp: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<Value>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ampserve",
        description = "Train Transformer translation models with mixed precision and serve translations."
    ),
    paths(
        super::jobs::create,
        super::jobs::list,
        super::jobs::show,
        super::jobs::remove,
        super::jobs::cancel,
        super::jobs::resume,
        super::fork::fork,
        super::experiments::create,
        super::experiments::list,
        super::experiments::show,
        super::metrics::metrics,
        super::metrics::validations,
        super::overflows::overflows,
        super::events::events,
        super::checkpoints::list,
        super::corpora::upload,
        super::corpora::list,
        super::models::list,
        super::models::show,
        super::models::remove,
        super::models::export,
        super::evaluate::evaluate,
        super::evaluate::list,
        super::translate::translate_get,
        super::translate::translate_post,
        super::configs::list,
        super::nodes::list,
        super::health::healthz,
        super::health::readyz,
        super::health::prometheus,
        super::page::index,
        super::page::asset,
        openapi_json,
        docs,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        JobSubmission,
        ForkRequest,
        ExperimentSubmission
    ))
)]
pub struct ApiDoc;

/// The description as JSON (what `/openapi.json` serves).
pub fn document() -> Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs))
}

/// This description.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "docs",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
async fn openapi_json() -> Json<Value> {
    Json(document())
}

/// HTML page rendering the description (scripts from `/static/docs.js`).
#[utoipa::path(get, path = "/docs", operation_id = "docs", tag = "docs",
    responses((status = 200, description = "HTML page", content_type = "text/html")))]
async fn docs() -> Response {
    let mut resp = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../static/docs.html"),
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(page::CSP),
    );
    resp
}
