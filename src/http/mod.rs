//! The REST API: one file per resource, each with its own `router()`, merged here with one
//! [`AppState`] and the cross-cutting layers (trace, request metrics, compression, timeout, body
//! limits, bearer auth, JSON errors for everything the layers reject).

mod admission;
mod checkpoints;
mod configs;
mod corpora;
mod error;
mod evaluate;
mod events;
mod experiments;
mod fork;
mod guard;
mod health;
mod jobs;
mod metrics;
mod models;
mod nodes;
pub mod openapi;
mod overflows;
pub mod page;
mod server;
pub mod spec;
mod translate;

pub use error::{ApiError, ApiPath, ApiQuery, ApiResult};
pub use guard::LOOPBACK_HOSTS;
pub use health::HttpStats;
pub use server::{serve, ConnLimits};
pub use translate::{parse_translate_body, TranslateRequest};

use crate::store::Store;
use crate::worker::PoolHandle;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Fixed settings of the HTTP layer (resolved by `app::build_app`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Where uploaded corpora go (`<data-dir>/corpora`); always one of the data roots.
    pub corpora_dir: PathBuf,
    /// Canonical directories corpus paths must lie under.
    pub data_roots: Vec<PathBuf>,
    /// Where `config: "name"` finds `name.toml`.
    pub configs_dir: PathBuf,
    pub api_token: Option<String>,
    pub protect_reads: bool,
    /// Limit for JSON bodies.
    pub max_json_bytes: usize,
    /// Limit for corpus uploads (streamed to disk).
    pub max_upload_bytes: u64,
    pub request_timeout: Duration,
    /// Admission limit for one training job's estimated memory; `None` = what the machine has
    /// available at submission ([`crate::memory::available_bytes`]).
    pub max_job_memory: Option<u64>,
    /// Host names (lowercase, optionally `host:port`) requests must name; `None` = any.
    pub allowed_hosts: Option<Vec<String>>,
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub pool: PoolHandle,
    pub settings: Arc<Settings>,
    pub stats: Arc<HttpStats>,
    /// Flips to true when the server shuts down, so long-lived SSE streams end.
    pub shutdown: watch::Receiver<bool>,
    /// Loaded translation models (one batcher thread each).
    pub models: Arc<crate::infer::ModelCache>,
}

/// The whole API with its layers.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .merge(jobs::router())
        .merge(fork::router())
        .merge(experiments::router())
        .merge(metrics::router())
        .merge(overflows::router())
        .merge(events::router())
        .merge(checkpoints::router())
        .merge(corpora::router())
        .merge(models::router())
        .merge(evaluate::router())
        .merge(translate::router())
        .merge(configs::router())
        .merge(nodes::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let hard_limit = (state.settings.max_upload_bytes as usize).saturating_add(1 << 20);
    Router::new()
        .merge(health::router())
        .merge(page::router())
        .merge(openapi::router())
        .merge(api)
        .fallback(|| async { ApiError::from_status(StatusCode::NOT_FOUND) })
        .layer(DefaultBodyLimit::max(state.settings.max_json_bytes))
        .layer(RequestBodyLimitLayer::new(hard_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.settings.request_timeout,
        ))
        .layer(middleware::from_fn(guard::json_only))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::host_and_origin,
        ))
        .layer(middleware::from_fn(json_errors))
        .layer(CompressionLayer::new())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Routes that run decoding (or other work) on a GET: guarded like mutations.
const COMPUTE_READS: [&str; 1] = ["/api/translate"];

/// Bearer-token check: when a token is configured, mutating and compute requests need it, and
/// reads too with `--protect-reads`.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = state.settings.api_token.as_deref() else {
        return next.run(req).await;
    };
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || COMPUTE_READS.contains(&req.uri().path());
    if !mutating && !state.settings.protect_reads {
        return next.run(req).await;
    }
    match req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)")
            .into_response(),
        Some(v) => match v.strip_prefix("Bearer ") {
            Some(t) if constant_time_eq(t.trim().as_bytes(), token.as_bytes()) => {
                next.run(req).await
            }
            _ => ApiError::unauthorized("invalid bearer token").into_response(),
        },
    }
}

/// Compares SHA-256 digests, so neither the length nor the first differing byte of the token
/// shows in the time taken.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// Give error responses produced by layers or axum itself (plain text or empty bodies) the
/// JSON error shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .unwrap_or_default();
    let mut err = ApiError::from_status(parts.status);
    if !text.trim().is_empty() {
        err.message = text.trim().to_string();
    }
    err.into_response()
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

async fn record_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Labels stay bounded: any other method is one `OTHER` series, unmatched paths one
    // `unmatched` route.
    let method = method_label(req.method());
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state
        .stats
        .record(method, &path, resp.status().as_u16(), start.elapsed());
    resp
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison_accepts_only_the_same_bytes() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for other in [&b""[..], b"s3cre", b"s3cret!", b"S3cret", b"x"] {
            assert!(!constant_time_eq(other, b"s3cret"));
        }
    }
}
