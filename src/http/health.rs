//! Health and operations routes: `/healthz`, `/readyz` and `/metrics` (Prometheus text format),
//! named apart from `ops`, the differentiable building blocks of the model.

use super::{ApiError, AppState};
use crate::store::JobStatus;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
}

const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Request counts by (method, route, status) and latency histograms by (method, route).
#[derive(Default)]
pub struct HttpStats {
    inner: Mutex<StatsInner>,
}

#[derive(Default)]
struct StatsInner {
    counts: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<(String, String), Histogram>,
}

impl HttpStats {
    pub fn record(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut g = self.inner.lock().unwrap();
        *g.counts
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        let h = g
            .latency
            .entry((method.to_string(), route.to_string()))
            .or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }
}

#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "ops", responses((status = 200, description = "the process serves", body = Object)))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "ops", responses((status = 200, description = "ready", body = Object), (status = 503, description = "database does not answer", body = Object)))]
async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(serde_json::json!({ "status": "ready", "database": "ok" })).into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("database unreachable: {e}"),
        )
        .into_response(),
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[utoipa::path(get, path = "/metrics", operation_id = "prometheus", tag = "ops", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
async fn prometheus(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut out = String::new();
    let by_status: BTreeMap<String, i64> = state
        .store
        .count_jobs_by_status()
        .await?
        .into_iter()
        .collect();
    let _ = writeln!(
        out,
        "# HELP ampserve_jobs Jobs by status.\n# TYPE ampserve_jobs gauge"
    );
    for s in JobStatus::ALL {
        let n = by_status.get(s.as_str()).copied().unwrap_or(0);
        let _ = writeln!(out, "ampserve_jobs{{status=\"{s}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP ampserve_workers Workers (one per device).\n# TYPE ampserve_workers gauge\nampserve_workers {}",
        state.pool.devices().len()
    );

    let live = state.pool.live_jobs();
    type Getter = fn(&crate::worker::LiveJob) -> f64;
    let gauges: [(&str, &str, Getter); 6] = [
        (
            "ampserve_job_steps_per_second",
            "Optimizer steps per second of a running job.",
            |j| j.steps_per_s,
        ),
        (
            "ampserve_job_tokens_per_second",
            "Target tokens per second of a running job.",
            |j| j.tokens_per_s,
        ),
        (
            "ampserve_job_loss_scale",
            "Current loss scale of a running job.",
            |j| j.loss_scale,
        ),
        (
            "ampserve_job_skipped_steps",
            "Steps skipped for inf/NaN gradients.",
            |j| j.skipped_steps as f64,
        ),
        (
            "ampserve_job_step",
            "Latest optimizer step of a running job.",
            |j| j.step as f64,
        ),
        (
            "ampserve_job_loss",
            "Latest training loss of a running job.",
            |j| j.loss,
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (id, j) in &live {
            let _ = writeln!(
                out,
                "{name}{{job=\"{id}\",worker=\"{}\",device=\"{}\"}} {}",
                esc(&j.worker),
                esc(&j.device),
                num(get(j))
            );
        }
    }
    let w = state.pool.write_stats();
    let _ = writeln!(
        out,
        "# HELP ampserve_metric_rows_written_total Step rows persisted.\n# TYPE ampserve_metric_rows_written_total counter\nampserve_metric_rows_written_total {}",
        w.rows
    );
    let _ = writeln!(
        out,
        "# HELP ampserve_metric_flushes_total Batched metric inserts.\n# TYPE ampserve_metric_flushes_total counter\nampserve_metric_flushes_total {}",
        w.flushes
    );
    let _ = writeln!(
        out,
        "# HELP ampserve_metric_write_seconds_total Time spent persisting step rows.\n# TYPE ampserve_metric_write_seconds_total counter\nampserve_metric_write_seconds_total {}",
        num(w.seconds)
    );

    {
        let g = state.stats.inner.lock().unwrap();
        let _ = writeln!(
            out,
            "# HELP ampserve_http_requests_total HTTP requests by route and status.\n# TYPE ampserve_http_requests_total counter"
        );
        for ((m, r, s), n) in &g.counts {
            let _ = writeln!(
                out,
                "ampserve_http_requests_total{{method=\"{m}\",route=\"{}\",status=\"{s}\"}} {n}",
                esc(r)
            );
        }
        let name = "ampserve_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to response headers.\n# TYPE {name} histogram"
        );
        for ((m, r), h) in &g.latency {
            let r = esc(r);
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{method=\"{m}\",route=\"{r}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{method=\"{m}\",route=\"{r}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "{name}_sum{{method=\"{m}\",route=\"{r}\"}} {}",
                num(h.sum)
            );
            let _ = writeln!(
                out,
                "{name}_count{{method=\"{m}\",route=\"{r}\"}} {}",
                h.count
            );
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}
