//! SQLite persistence (sqlx, WAL mode, busy timeout) and every query the server runs. Each
//! submodule keeps the SQL next to the code that needs it; the schema lives in `migrations/`
//! and is applied at open with `sqlx::migrate!`.

pub mod checkpoints;
pub mod corpora;
pub mod evaluations;
pub mod experiments;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod overflows;
pub mod validations;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::path::Path;
use std::time::Duration;

pub use checkpoints::CheckpointRow;
pub use corpora::CorpusRow;
pub use evaluations::EvaluationRow;
pub use jobs::{JobRow, JobStatus, NewJob};
pub use metrics::{MetricBucket, MetricRow};
pub use models::{ModelRow, NewModel};
pub use validations::ValidationRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("json column: {0}")]
    Json(#[from] serde_json::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A cheap-to-clone handle on the connection pool.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Open (creating if needed) the database file, switch it to WAL with a busy timeout, and
    /// apply pending migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk when it returns, so the step rows a checkpoint covers
            // survive a power loss too, not only a killed process.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A trivial query: is the database reachable?
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
