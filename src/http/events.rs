//! `/api/jobs/{id}/events`: Server-Sent Events. The first event is the job's current status;
//! then `started`, `step`, `validation`, `checkpoint`, `finished` and `status` events as they
//! happen. The stream ends after a terminal status (or when the server shuts down). Each job
//! has its own channel, so a subscriber receives only its job's events.

use super::jobs::load_job;
use super::{ApiPath, ApiResult, AppState};
use crate::worker::{JobEvent, JobEventKind};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use std::convert::Infallible;
use tokio::sync::{broadcast, watch};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/jobs/{id}/events", get(events))
}

struct StreamState {
    job_id: i64,
    rx: broadcast::Receiver<JobEvent>,
    shutdown: watch::Receiver<bool>,
    first: Option<JobEvent>,
    done: bool,
}

fn to_sse(ev: &JobEvent) -> Event {
    Event::default()
        .event(ev.kind.name())
        .json_data(ev)
        .unwrap_or_else(|_| Event::default().event("error").data("unserialisable event"))
}

fn is_end(ev: &JobEvent) -> bool {
    matches!(&ev.kind, JobEventKind::Status { status, .. } if status.is_terminal())
}

#[utoipa::path(get, path = "/api/jobs/{id}/events", operation_id = "job_events", tag = "jobs", params(("id" = i64, Path, description = "id")), responses((status = 200, description = "server-sent events (status, step, checkpoint, ...)", content_type = "text/event-stream"), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody)))]
async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    // Subscribe before reading the status so nothing between the two is lost.
    let rx = state.pool.subscribe(id);
    let job = load_job(&state, id).await?;
    if job.owner.as_deref() != Some(state.pool.node_id()) {
        // another node's job: relayed from the database from this status and step on
        state.pool.follow(id, &job.status, job.current_step);
    }
    let first = JobEvent {
        job_id: id,
        kind: JobEventKind::Status {
            status: job.status(),
            error: job.error.clone(),
        },
    };
    let st = StreamState {
        job_id: id,
        rx,
        shutdown: state.shutdown.clone(),
        first: Some(first),
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.done || *st.shutdown.borrow() {
            return None;
        }
        if let Some(ev) = st.first.take() {
            st.done = is_end(&ev);
            return Some((Ok(to_sse(&ev)), st));
        }
        tokio::select! {
            r = st.rx.recv() => match r {
                Ok(ev) => {
                    // the job's own channel; the check guards the contract
                    debug_assert_eq!(ev.job_id, st.job_id);
                    st.done = is_end(&ev);
                    Some((Ok(to_sse(&ev)), st))
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let e = Event::default().event("lagged").data(format!("{n} events dropped"));
                    Some((Ok(e), st))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = st.shutdown.changed() => None,
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
