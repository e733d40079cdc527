//! The `nodes` table (migration 0008): one row per ampserve process sharing the database, with
//! its devices, version and last heartbeat, for `GET /api/nodes` and the status page.

use super::{on_pool, Store, StoreResult};
use serde::{Deserialize, Serialize};

/// The kind of device a job may require (`"device"` in a submission) and a worker offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(DeviceKind::Cpu),
            "cuda" => Some(DeviceKind::Cuda),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct NodeRow {
    pub id: String,
    pub host: String,
    /// JSON array of device names.
    pub devices: String,
    pub version: String,
    pub advertise_url: Option<String>,
    /// Unix milliseconds.
    pub started_at: i64,
    pub last_heartbeat_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewNode {
    pub id: String,
    pub host: String,
    pub devices: Vec<String>,
    pub version: String,
    pub advertise_url: Option<String>,
}

impl Store {
    /// Insert or refresh this node's row (a restarted node keeps its id).
    pub async fn register_node(&self, n: &NewNode) -> StoreResult<()> {
        let now = super::unix_ms();
        let devices = serde_json::to_string(&n.devices)?;
        on_pool!(self, p => sqlx::query(
            "INSERT INTO nodes (id, host, devices, version, advertise_url, started_at, last_heartbeat_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (id) DO UPDATE SET host = excluded.host, devices = excluded.devices,
               version = excluded.version, advertise_url = excluded.advertise_url,
               started_at = excluded.started_at, last_heartbeat_at = excluded.last_heartbeat_at",
        )
        .bind(&n.id)
        .bind(&n.host)
        .bind(&devices)
        .bind(&n.version)
        .bind(&n.advertise_url)
        .bind(now)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// The node is alive now. False when its row is gone (deleted by hand): re-register.
    pub async fn node_heartbeat(&self, id: &str) -> StoreResult<bool> {
        let n = on_pool!(self, p => sqlx::query("UPDATE nodes SET last_heartbeat_at = $2 WHERE id = $1")
            .bind(id)
            .bind(super::unix_ms())
            .execute(p)
            .await?
            .rows_affected());
        Ok(n == 1)
    }

    /// A node that stops cleanly leaves the list.
    pub async fn remove_node(&self, id: &str) -> StoreResult<()> {
        on_pool!(self, p => sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(p)
            .await?
            .rows_affected());
        Ok(())
    }

    /// By id.
    pub async fn list_nodes(&self) -> StoreResult<Vec<NodeRow>> {
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, NodeRow>("SELECT * FROM nodes ORDER BY id")
            .fetch_all(p)
            .await?),
        )
    }
}
