//! `GET /api/nodes`: the ampserve processes sharing this database, their devices, their last
//! heartbeat and the jobs they run now.

use super::{ApiResult, AppState};
use crate::store::JobStatus;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/nodes", get(list))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub id: String,
    pub host: String,
    pub devices: Vec<String>,
    pub version: String,
    pub advertise_url: Option<String>,
    /// Unix milliseconds.
    pub started_at: i64,
    pub last_heartbeat_at: i64,
    /// The last heartbeat is within the lease timeout: the node's jobs are safe from takeover.
    pub alive: bool,
    /// The node answering this request.
    pub this_node: bool,
    /// Ids of the active jobs it owns.
    pub jobs: Vec<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
    /// The lease timeout of the answering node, in seconds.
    pub lease_timeout_s: f64,
}

#[utoipa::path(get, path = "/api/nodes", operation_id = "list_nodes", tag = "nodes", responses((status = 200, description = "the nodes sharing this database, by id", body = NodeList)))]
async fn list(State(state): State<AppState>) -> ApiResult<Json<NodeList>> {
    let timeout = state.pool.lease_timeout();
    let now = crate::store::unix_ms();
    let rows = state.store.list_nodes().await?;
    let mut active = Vec::new();
    for st in [JobStatus::Running, JobStatus::Cancelling] {
        let (jobs, _) = state.store.list_jobs(Some(st), 500, 0).await?;
        active.extend(jobs);
    }
    let nodes = rows
        .into_iter()
        .map(|n| {
            let mut jobs: Vec<i64> = active
                .iter()
                .filter(|j| j.owner.as_deref() == Some(n.id.as_str()))
                .map(|j| j.id)
                .collect();
            jobs.sort_unstable();
            NodeView {
                devices: serde_json::from_str(&n.devices).unwrap_or_default(),
                alive: now - n.last_heartbeat_at <= timeout.as_millis() as i64,
                this_node: n.id == state.pool.node_id(),
                jobs,
                id: n.id,
                host: n.host,
                version: n.version,
                advertise_url: n.advertise_url,
                started_at: n.started_at,
                last_heartbeat_at: n.last_heartbeat_at,
            }
        })
        .collect();
    Ok(Json(NodeList {
        nodes,
        lease_timeout_s: timeout.as_secs_f64(),
    }))
}
