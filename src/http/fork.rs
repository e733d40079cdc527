//! `POST /api/jobs/{id}/fork`: a new job that starts from a checkpoint of job `id` (`latest`,
//! `best` or a step) with some settings changed. Only settings that keep the model, the data and
//! their order may change (precision, learning rate and schedule, budgets, amp, checkpointing);
//! anything else is a 422 naming `overrides.<field>`. The fork continues the parent's step
//! counter and data position, so `train.max_steps` and `train.max_time_s` count the parent's
//! steps and training time too (see [`crate::worker::fork`] for what is copied).

use super::jobs::{load_job, JobView};
use super::spec::{deep_merge, serde_field_error};
use super::{ApiError, ApiPath, ApiResult, AppState};
use crate::config::TrainSpec;
use crate::infer::CheckpointChoice;
use crate::spec_overrides::{self, Allowed, Refusal};
use crate::store::NewJob;
use crate::worker::ForkFailure;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/jobs/{id}/fork", post(fork))
}

/// Settings a fork may change, by section (`None`: every field of the section).
const ALLOWED: &Allowed = &[
    ("name", Some(&[])),
    (
        "train",
        Some(&[
            "precision",
            "lr",
            "schedule",
            "warmup_steps",
            "max_steps",
            "max_time_s",
            "epochs",
            "clip_grad_norm",
            "valid_every",
            "valid_every_epochs",
            "valid_samples",
            "early_stopping",
        ]),
    ),
    ("amp", None),
    ("checkpoint", None),
];

/// 422 for the first override outside [`ALLOWED`].
pub fn check_overrides(o: &Map<String, Value>) -> ApiResult<()> {
    let refuse = |field: String| {
        ApiError::invalid(
            format!("overrides.{field}"),
            "a fork cannot change this: it would change the model, the data or their order \
             (submit a new job instead); allowed: name, train.{precision, lr, schedule, \
             warmup_steps, max_steps, max_time_s, epochs, clip_grad_norm, valid_every, \
             valid_every_epochs, valid_samples, early_stopping}, amp.*, checkpoint.*",
        )
    };
    spec_overrides::check(o, ALLOWED).map_err(|r| match r {
        Refusal::NotAllowed(f) => refuse(f),
        Refusal::NotAnObject(key) => {
            ApiError::invalid(format!("overrides.{key}"), "expected an object")
        }
    })
}

/// The parent's spec with `overrides` merged in and validated (fields named `overrides.*`).
pub fn forked_spec(parent: &TrainSpec, overrides: Map<String, Value>) -> ApiResult<TrainSpec> {
    check_overrides(&overrides)?;
    let mut merged = serde_json::to_value(parent).map_err(|e| ApiError::internal(e.to_string()))?;
    deep_merge(&mut merged, Value::Object(overrides));
    let prefix = |mut e: ApiError| {
        e.field = e.field.map(|f| format!("overrides.{f}"));
        e
    };
    let spec: TrainSpec = serde_path_to_error::deserialize(merged)
        .map_err(serde_field_error)
        .map_err(prefix)?;
    spec.validate()
        .map_err(|e| prefix(ApiError::invalid(e.field.clone(), e.message.clone())))?;
    Ok(spec)
}

/// `"latest"` (default), `"best"`, or a step as a number or a string.
fn parse_choice(v: Option<Value>) -> ApiResult<CheckpointChoice> {
    match v {
        None | Some(Value::Null) => Ok(CheckpointChoice::Latest),
        Some(Value::String(s)) => s.parse().map_err(|e: crate::infer::NotACheckpointChoice| {
            ApiError::invalid("checkpoint", e.to_string())
        }),
        Some(Value::Number(n)) => n.as_u64().map(CheckpointChoice::Step).ok_or_else(|| {
            ApiError::invalid(
                "checkpoint",
                format!("{n} is not a step number (an integer >= 0)"),
            )
        }),
        Some(_) => Err(ApiError::invalid(
            "checkpoint",
            "expected `latest`, `best` or a step number",
        )),
    }
}

/// Body: `{"checkpoint": "latest" | "best" | <step>, "overrides": {<spec sections>}, "priority": n}`.
#[utoipa::path(post, path = "/api/jobs/{id}/fork", operation_id = "fork_job", tag = "jobs",
    params(("id" = i64, Path, description = "the parent job")),
    request_body(content = crate::http::openapi::ForkRequest, content_type = "application/json"),
    responses((status = 201, description = "the fork, queued", body = JobView),
        (status = 400, description = "malformed JSON", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "no such job", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "invalid field (named in `error.field`), or no such checkpoint", body = crate::http::openapi::ErrorBody)))]
async fn fork(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let mut obj = if body.iter().all(|b| b.is_ascii_whitespace()) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(&body)
            .map_err(|e| ApiError::malformed_json(format!("malformed JSON: {e}")))?
        {
            Value::Object(o) => o,
            _ => return Err(ApiError::invalid("body", "expected a JSON object")),
        }
    };
    let choice = parse_choice(obj.remove("checkpoint"))?;
    let overrides = match obj.remove("overrides") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::invalid("overrides", "expected an object")),
    };
    let priority = match obj.remove("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .filter(|p| (super::spec::MIN_PRIORITY..=super::spec::MAX_PRIORITY).contains(p))
            .ok_or_else(|| ApiError::invalid("priority", "allowed integers -1000..=1000"))?,
    };
    if let Some(k) = obj.keys().next() {
        return Err(ApiError::invalid(
            k.clone(),
            "unknown field; expected checkpoint, overrides, priority",
        ));
    }
    let parent = load_job(&state, id).await?;
    let parent_spec = &parent.spec;
    let has_name = overrides.contains_key("name");
    let mut spec = forked_spec(parent_spec, overrides)?;
    super::admission::admit(&state, &spec).await?;
    let staged = state
        .pool
        .stage_fork(&parent, choice, &spec)
        .await
        .map_err(|e| match e {
            ForkFailure::NotFound(m) => ApiError::invalid(
                "checkpoint",
                format!("job {id} has no such checkpoint: {m}"),
            ),
            ForkFailure::Failed(m) => ApiError::internal(m),
        })?;
    if !has_name {
        let mut name = format!("{}-fork{}", parent_spec.name, staged.step);
        name.truncate(100);
        spec.name = name;
    }
    let seed = staged.seed_dir.to_string_lossy().into_owned();
    let row = match state
        .store
        .insert_fork(
            &NewJob {
                name: spec.name.clone(),
                priority,
                spec,
                // a fork needs what its parent needed
                requires_device: parent
                    .requires_device
                    .as_deref()
                    .and_then(crate::store::nodes::DeviceKind::parse),
            },
            id,
            staged.step as i64,
            &seed,
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staged.seed_dir);
            return Err(e.into());
        }
    };
    tracing::info!(
        job = row.id,
        parent = id,
        step = staged.step,
        scaler_reset = staged.scaler_reset,
        "fork queued"
    );
    state.pool.announce_queued([row.id]);
    Ok((StatusCode::CREATED, Json(JobView::from(row))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn overrides(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_fork_may_change_precision_lr_and_amp_but_not_the_model() {
        let parent = TrainSpec::default();
        let s = forked_spec(
            &parent,
            overrides(
                json!({"train": {"precision": "f16", "lr": 0.01}, "amp": {"init_scale": 8.0}}),
            ),
        )
        .unwrap();
        assert_eq!(s.train.precision, crate::config::Precision::F16);
        assert_eq!(s.train.lr, 0.01);
        assert_eq!(s.amp.init_scale, 8.0);
        assert_eq!(s.model, parent.model);
        let e = forked_spec(&parent, overrides(json!({"model": {"d_model": 64}}))).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("overrides.model"));
        let e = forked_spec(&parent, overrides(json!({"train": {"seed": 1}}))).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("overrides.train.seed"));
    }

    #[test]
    fn an_out_of_range_override_is_named_under_overrides() {
        let e = forked_spec(
            &TrainSpec::default(),
            overrides(json!({"train": {"lr": -1.0}})),
        )
        .unwrap_err();
        assert_eq!(e.status, 422);
        assert_eq!(e.field.as_deref(), Some("overrides.train.lr"));
        let e = forked_spec(
            &TrainSpec::default(),
            overrides(json!({"train": {"precision": "fp8"}})),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("overrides.train.precision"));
    }
}
