//! `GET /api/configs`: the presets in `--configs-dir` (`<name>.toml`), each resolved exactly as
//! `POST /api/jobs` with `{"config": "<name>"}` would resolve it (defaults filled in, ranges
//! checked, corpus paths made canonical), for the status page's new-job form. A preset that
//! does not resolve is listed with `spec: null` and the error that a job using it would get.

use super::spec::parse_job_request;
use super::{ApiResult, AppState};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/configs", get(list))
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub name: String,
    /// The resolved `TrainSpec`; null when the preset does not resolve.
    pub spec: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ConfigError>,
}

#[derive(Debug, Serialize)]
pub struct ConfigError {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Serialize)]
struct ConfigList {
    configs: Vec<ConfigView>,
}

/// Preset names (`*.toml` stems usable as `config`), sorted; empty when the directory is
/// missing.
pub fn preset_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
                .filter_map(|p| p.file_stem()?.to_str().map(str::to_string))
                .filter(|n| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[utoipa::path(get, path = "/api/configs", operation_id = "list_configs", tag = "configs", responses((status = 200, description = "presets with resolved specs", body = Object)))]
async fn list(State(state): State<AppState>) -> ApiResult<Json<ConfigList>> {
    let settings = state.settings.clone();
    // File reads and canonicalisation: off the async workers.
    let configs = tokio::task::spawn_blocking(move || {
        preset_names(&settings.configs_dir)
            .into_iter()
            .map(|name| {
                let body = serde_json::json!({ "config": name }).to_string();
                match parse_job_request(body.as_bytes(), &settings) {
                    Ok(req) => ConfigView {
                        spec: serde_json::to_value(&req.spec).unwrap_or(Value::Null),
                        name,
                        error: None,
                    },
                    Err(e) => ConfigView {
                        name,
                        spec: Value::Null,
                        error: Some(ConfigError {
                            message: e.message,
                            field: e.field,
                        }),
                    },
                }
            })
            .collect()
    })
    .await
    .map_err(|e| super::ApiError::internal(format!("listing presets failed: {e}")))?;
    Ok(Json(ConfigList { configs }))
}
