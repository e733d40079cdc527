//! `POST /api/models/{id}/evaluate`: score an exported model on held-out text, the sacreBLEU way,
//! and keep the score with the model. Why here and not only the CLI? The number a user sees after
//! training is a validation score; this gives the comparable test-set number in the same place.

use super::models::load_model;
use super::spec::{confine, serde_field_error};
use super::{ApiError, ApiPath, ApiResult, AppState};
use crate::store::evaluations::NewEvaluation;
use crate::store::EvaluationRow;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/models/{id}/evaluate", post(evaluate))
        .route("/api/models/{id}/evaluations", get(list))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EvalBody {
    /// A `source<TAB>reference` TSV under the data roots.
    #[schema(value_type = Option<String>)]
    corpus: Option<PathBuf>,
    /// `test`: the `test*.{src}-{tgt}.tsv` file beside the model's training corpus.
    split: Option<String>,
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 16)]
    beam_size: usize,
}

fn one() -> usize {
    1
}

#[derive(Serialize)]
struct Evaluated {
    evaluation: EvaluationRow,
    report: crate::infer::EvalReport,
}

#[derive(Serialize)]
struct EvaluationList {
    evaluations: Vec<EvaluationRow>,
}

/// The test split beside the training corpus of the run the model came from.
fn test_split(run_dir: &Path, src: &str, tgt: &str) -> ApiResult<PathBuf> {
    let no_split = |why: String| ApiError::invalid("split", why);
    let spec_path = run_dir.join("spec.json");
    let text = std::fs::read_to_string(&spec_path)
        .map_err(|e| no_split(format!("cannot read {}: {e}", spec_path.display())))?;
    let spec: crate::config::TrainSpec = serde_json::from_str(&text)
        .map_err(|e| no_split(format!("{}: {e}", spec_path.display())))?;
    let dir = spec
        .data
        .train
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let suffix = format!(".{src}-{tgt}.tsv");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| no_split(format!("cannot list {}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("test") && n.ends_with(&suffix))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(no_split(format!(
            "no test*{suffix} beside the training corpus in {}",
            dir.display()
        ))),
        _ => Err(no_split(format!(
            "several test*{suffix} files in {}; name one with `corpus`",
            dir.display()
        ))),
    }
}

#[utoipa::path(post, path = "/api/models/{id}/evaluate", operation_id = "evaluate_model", tag = "models", params(("id" = i64, Path, description = "id")), request_body(content = EvalBody, content_type = "application/json"), responses((status = 201, description = "scores", body = Object), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody)))]
async fn evaluate(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let mut de = serde_json::Deserializer::from_slice(&body);
    let req: EvalBody = match serde_path_to_error::deserialize(&mut de) {
        Ok(r) => r,
        Err(e) if e.inner().is_syntax() || e.inner().is_eof() => {
            return Err(ApiError::malformed_json(format!(
                "malformed JSON: {}",
                e.into_inner()
            )))
        }
        Err(e) => return Err(serde_field_error(e)),
    };
    if !(1..=16).contains(&req.beam_size) {
        return Err(ApiError::invalid(
            "beam_size",
            format!("{} is out of range; allowed 1..=16", req.beam_size),
        ));
    }
    let m = load_model(&state, id).await?;
    if req.beam_size > 1
        && crate::infer::kind_of_manifest(&m.manifest_json) == crate::infer::engine::KIND_MARIAN
    {
        return Err(ApiError::invalid(
            "beam_size",
            format!("model {id} is a Marian model: it decodes greedily (beam_size 1)"),
        ));
    }
    let tsv = match (&req.corpus, req.split.as_deref()) {
        (Some(c), None) => confine(c, &state.settings.data_roots, "corpus")?,
        (None, Some("test")) => {
            let run_dir = serde_json::from_str::<serde_json::Value>(&m.manifest_json)
                .ok()
                .and_then(|v| v.get("run_dir").and_then(|r| r.as_str()).map(PathBuf::from))
                .ok_or_else(|| ApiError::invalid("split", "the model records no run directory"))?;
            let p = test_split(&run_dir, &m.src_lang, &m.tgt_lang)?;
            confine(&p, &state.settings.data_roots, "split")?
        }
        (None, Some(other)) => {
            return Err(ApiError::invalid(
                "split",
                format!("`{other}` is not a split; allowed: test"),
            ))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "corpus",
                "give `corpus` or `split`, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "corpus",
                "give `corpus` (a TSV under the data roots) or `split` = \"test\"",
            ))
        }
    };
    let cache = state.models.clone();
    let dir = state
        .pool
        .local_model_dir(&m)
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tsv2 = tsv.clone();
    let beam = req.beam_size;
    let report = tokio::task::spawn_blocking(move || cache.evaluate(&dir, &tsv2, beam))
        .await
        .map_err(|e| ApiError::internal(format!("evaluation task failed: {e}")))?
        .map_err(|e| ApiError::invalid("corpus", e.to_string()))?;
    let json = serde_json::to_string(&report).map_err(|e| ApiError::internal(e.to_string()))?;
    let row = state
        .store
        .insert_evaluation(
            id,
            &NewEvaluation {
                corpus: &tsv.display().to_string(),
                sentences: report.sentences as i64,
                beam_size: report.beam_size as i64,
                bleu: report.bleu,
                chrf: report.chrf,
                report_json: &json,
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Evaluated {
            evaluation: row,
            report,
        }),
    ))
}

#[utoipa::path(get, path = "/api/models/{id}/evaluations", operation_id = "list_evaluations", tag = "models", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "evaluations, oldest first", body = Object), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<EvaluationList>> {
    load_model(&state, id).await?;
    Ok(Json(EvaluationList {
        evaluations: state.store.list_evaluations(id).await?,
    }))
}
