//! `/api/experiments`: a precision experiment as one request. `POST` takes a job spec (with an
//! optional `config` preset, as `POST /api/jobs`), `arms` and a budget, and queues one job per
//! arm in arm order (on one CPU worker they run one after another; several devices may run
//! them side by side). `GET` reports each arm's figures and verdict, computed from the stored
//! step rows and validations by [`crate::experiment::summary`].

use super::spec::parse_job_request;
use super::{ApiError, ApiPath, ApiQuery, ApiResult, AppState};
use crate::config::{SpecError, TrainSpec};
use crate::experiment::summary::{
    self, step_tokens, ArmRun, ArmSummary, FinalValidation, MemorySource, StepPoint,
};
use crate::experiment::{arm_spec, parse_arms, Budget};
use crate::store::experiments::{ExperimentRow, NewArm};
use crate::store::{JobStatus, NewJob};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/experiments", post(create).get(list))
        .route("/api/experiments/{id}", get(show))
}

fn spec_error(e: SpecError) -> ApiError {
    ApiError::invalid(e.field, e.message)
}

/// Stored with the experiment.
#[derive(Debug, Serialize, Deserialize)]
struct Settings {
    max_steps: usize,
    max_time_s: f64,
    noise_bleu: f64,
    /// The memory-admission estimate of each arm, bytes.
    memory_estimates: Vec<Option<u64>>,
}

#[derive(Debug, Serialize)]
struct ArmView {
    position: i64,
    job_id: Option<i64>,
    /// The job's status (`deleted` once the job is gone).
    status: String,
    overrides: Value,
    #[serde(flatten)]
    summary: ArmSummary,
}

#[derive(Debug, Serialize)]
struct ExperimentView {
    id: i64,
    name: String,
    created_at: String,
    /// `queued` (no arm started), `running`, or `finished` (every arm ended).
    status: &'static str,
    max_steps: usize,
    max_time_s: f64,
    noise_bleu: f64,
    equal_step: Option<u64>,
    equal_time_s: Option<f64>,
    /// Steps averaged for the equal-step and equal-time losses.
    window: usize,
    arms: Vec<ArmView>,
    /// The base spec every arm starts from.
    spec: TrainSpec,
}

fn number(obj: &mut Map<String, Value>, key: &str) -> ApiResult<Option<f64>> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::invalid(key, "expected a number")),
    }
}

/// Body: a job spec (`config`, `name`, sections, `priority`) plus `arms`, `max_steps` and/or
/// `max_time_s`, and optionally `noise_bleu`.
#[utoipa::path(post, path = "/api/experiments", operation_id = "create_experiment", tag = "experiments",
    request_body(content = crate::http::openapi::ExperimentSubmission, content_type = "application/json"),
    responses((status = 201, description = "the experiment, its arms queued as jobs", body = Object),
        (status = 400, description = "malformed JSON", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody)))]
async fn create(State(state): State<AppState>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::malformed_json(format!("malformed JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::invalid("body", "expected a JSON object"));
    };
    let arms_v = obj
        .remove("arms")
        .ok_or_else(|| ApiError::invalid("arms", "required: e.g. [\"fp32\", \"f16\"]"))?;
    let max_steps = match number(&mut obj, "max_steps")? {
        None => 0,
        Some(x) if x >= 0.0 && x.fract() == 0.0 => x as usize,
        Some(x) => {
            return Err(ApiError::invalid(
                "max_steps",
                format!("{x} is not a step count"),
            ))
        }
    };
    let max_time_s = number(&mut obj, "max_time_s")?.unwrap_or(0.0);
    let noise_bleu = number(&mut obj, "noise_bleu")?.unwrap_or(summary::DEFAULT_NOISE_BLEU);
    if !(0.0..=100.0).contains(&noise_bleu) {
        return Err(ApiError::invalid(
            "noise_bleu",
            "allowed 0..=100 BLEU points",
        ));
    }
    let budget = Budget::new(max_steps, max_time_s).map_err(spec_error)?;
    let arms = parse_arms(&arms_v).map_err(spec_error)?;
    let rest =
        serde_json::to_vec(&Value::Object(obj)).map_err(|e| ApiError::internal(e.to_string()))?;
    super::corpora::fetch_named_uploads(&state, &rest).await;
    let req = parse_job_request(&rest, &state.settings)?;
    let base: TrainSpec = req.spec;
    let specs = arms
        .iter()
        .enumerate()
        .map(|(i, a)| arm_spec(&base, a, i, &budget))
        .collect::<Result<Vec<_>, _>>()
        .map_err(spec_error)?;
    let mut estimates = Vec::with_capacity(specs.len());
    for s in &specs {
        super::admission::admit(&state, s).await?;
        let scan = s.clone();
        let est = tokio::task::spawn_blocking(move || {
            crate::memory::scan_corpus(&scan)
                .ok()
                .map(|f| crate::memory::estimate(&scan, f).total_bytes())
        })
        .await
        .ok()
        .flatten();
        estimates.push(est);
    }
    let settings = Settings {
        max_steps,
        max_time_s,
        noise_bleu,
        memory_estimates: estimates,
    };
    let new_arms = arms
        .iter()
        .zip(&specs)
        .map(|(a, s)| {
            Ok(NewArm {
                label: a.label.clone(),
                overrides_json: serde_json::to_string(&a.overrides)?,
                job: NewJob {
                    name: s.name.clone(),
                    priority: req.priority,
                    spec: s.clone(),
                    requires_device: None,
                },
            })
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (exp, jobs) = state
        .store
        .insert_experiment(&base.name, &base, &to_json(&settings)?, &new_arms)
        .await?;
    state.pool.announce_queued(jobs.iter().map(|j| j.id));
    tracing::info!(experiment = exp.id, arms = jobs.len(), "experiment queued");
    Ok((StatusCode::CREATED, Json(view(&state, exp).await?)))
}

fn to_json<T: Serialize>(v: &T) -> ApiResult<String> {
    serde_json::to_string(v).map_err(|e| ApiError::internal(e.to_string()))
}

async fn view(state: &AppState, exp: ExperimentRow) -> ApiResult<ExperimentView> {
    let settings: Settings = serde_json::from_str(&exp.settings_json)
        .map_err(|e| ApiError::internal(format!("experiment {}: {e}", exp.id)))?;
    let rows = state.store.experiment_arms(exp.id).await?;
    let mut runs = Vec::with_capacity(rows.len());
    let mut statuses = Vec::with_capacity(rows.len());
    for (i, arm) in rows.iter().enumerate() {
        let mut run = ArmRun {
            label: arm.label.clone(),
            peak_memory: settings
                .memory_estimates
                .get(i)
                .copied()
                .flatten()
                .map(|b| (b, MemorySource::Estimated)),
            ..ArmRun::default()
        };
        let job = match arm.job_id {
            Some(id) => state.store.get_job(id).await?,
            None => None,
        };
        match job {
            None => {
                run.error = Some("its job was deleted".into());
                statuses.push(None);
            }
            Some(job) => {
                let id = job.id;
                run.steps = state
                    .store
                    .list_metrics(id, 0, None)
                    .await?
                    .into_iter()
                    .map(|m| {
                        let ms = m.step_ms.unwrap_or(0.0);
                        StepPoint {
                            step: m.step as u64,
                            loss: m.loss.unwrap_or(f64::NAN),
                            step_ms: ms,
                            tokens: step_tokens(m.tokens_per_s.unwrap_or(0.0), ms),
                            skipped: m.skipped,
                        }
                    })
                    .collect();
                run.validation =
                    state
                        .store
                        .list_validations(id)
                        .await?
                        .last()
                        .map(|v| FinalValidation {
                            step: v.step as u64,
                            val_loss: v.val_loss.unwrap_or(f64::NAN),
                            bleu: v.bleu.unwrap_or(f64::NAN),
                            chrf: v.chrf.unwrap_or(f64::NAN),
                        });
                let st = job.status();
                if matches!(st, JobStatus::Failed | JobStatus::Cancelled) {
                    run.error = Some(job.error.clone().unwrap_or_else(|| st.to_string()));
                }
                statuses.push(Some(st));
            }
        }
        runs.push(run);
    }
    let s = summary::summarize(&runs, settings.noise_bleu);
    let status = if statuses.iter().all(|s| s.is_none_or(|s| s.is_terminal())) {
        "finished"
    } else if statuses.iter().all(|s| *s == Some(JobStatus::Queued)) {
        "queued"
    } else {
        "running"
    };
    let arms = rows
        .into_iter()
        .zip(statuses)
        .zip(s.arms)
        .map(|((r, st), summary)| ArmView {
            position: r.position,
            job_id: r.job_id,
            status: st.map_or("deleted".into(), |s| s.to_string()),
            overrides: serde_json::from_str(&r.overrides_json).unwrap_or(Value::Null),
            summary,
        })
        .collect();
    Ok(ExperimentView {
        id: exp.id,
        name: exp.name,
        created_at: exp.created_at,
        status,
        max_steps: settings.max_steps,
        max_time_s: settings.max_time_s,
        noise_bleu: settings.noise_bleu,
        equal_step: s.equal_step,
        equal_time_s: s.equal_time_s,
        window: s.window,
        arms,
        spec: exp.spec,
    })
}

#[utoipa::path(get, path = "/api/experiments/{id}", operation_id = "show_experiment", tag = "experiments",
    params(("id" = i64, Path, description = "id")),
    responses((status = 200, description = "the experiment with each arm's figures and verdict", body = Object),
        (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ExperimentView>> {
    let exp = state
        .store
        .get_experiment(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no experiment with id {id}")))?;
    Ok(Json(view(&state, exp).await?))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<i64>,
    offset: Option<i64>,
}

#[derive(Serialize)]
struct ExperimentList {
    experiments: Vec<ExperimentView>,
    total: i64,
}

#[utoipa::path(get, path = "/api/experiments", operation_id = "list_experiments", tag = "experiments",
    params(("limit" = Option<i64>, Query, description = "page size 1..=100 (default 20)"), ("offset" = Option<i64>, Query, description = "rows to skip")),
    responses((status = 200, description = "experiments, newest first, each as GET /api/experiments/{id} gives it", body = Object),
        (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<ExperimentList>> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", "allowed 1..=100"));
    }
    let offset = q.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::invalid("offset", "must be >= 0"));
    }
    let (rows, total) = state.store.list_experiments(limit, offset).await?;
    let mut experiments = Vec::with_capacity(rows.len());
    for r in rows {
        experiments.push(view(&state, r).await?);
    }
    Ok(Json(ExperimentList { experiments, total }))
}
