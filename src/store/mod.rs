//! Persistence over two engines: SQLite (the embedded default: one file in the data dir, WAL,
//! busy timeout) or PostgreSQL (several nodes sharing one job store). Every query is written
//! once, in the SQL both engines accept (`$N` placeholders, `ON CONFLICT`, `RETURNING`), and
//! [`on_pool!`] runs it on whichever pool the store holds. Each submodule keeps the SQL next to
//! the code that needs it; the schema lives in `migrations/sqlite` and `migrations/postgres`
//! (the same tables in each engine's types) and is applied at open with `sqlx::migrate!`.

pub mod checkpoints;
pub mod corpora;
pub mod evaluations;
pub mod experiments;
pub mod jobs;
pub mod leases;
pub mod metrics;
pub mod models;
pub mod nodes;
pub mod overflows;
pub mod testing;
pub mod validations;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

pub use checkpoints::CheckpointRow;
pub use corpora::CorpusRow;
pub use evaluations::EvaluationRow;
pub use jobs::{JobRow, JobStatus, NewJob};
pub use leases::Lease;
pub use metrics::{MetricBucket, MetricRow};
pub use models::{ModelRow, NewModel};
pub use nodes::{NewNode, NodeRow};
pub use validations::ValidationRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("json column: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported database URL `{0}`: expected sqlite://PATH or postgres://...")]
    BadUrl(String),
    /// A guarded write found the job owned by another node (or by none): this node's lease on
    /// it is gone, and it must write nothing more for the job.
    #[error("lease on job {job_id} lost: another node owns it now")]
    LeaseLost { job_id: i64 },
}

impl StoreError {
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, StoreError::LeaseLost { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Which engine the store runs on, and its pool.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Run `$body` with `$pool` bound to the store's pool, whichever engine it is. The body is
/// compiled once per engine, so the same query text and binds serve both.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store.db() {
            $crate::store::Db::Sqlite($pool) => $body,
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// `UPDATE` that succeeds only while `$lease` holds (the job's owner is the lease's node): the
/// first statement of every guarded write's transaction. On PostgreSQL it also locks the job
/// row, so a takeover waits for the write to commit (or the write sees the new owner).
macro_rules! fence {
    ($tx:expr, $lease:expr) => {{
        let r = sqlx::query("UPDATE jobs SET owner = owner WHERE id = $1 AND owner = $2")
            .bind($lease.job_id)
            .bind(&$lease.owner)
            .execute(&mut *$tx)
            .await?;
        if r.rows_affected() != 1 {
            return Err($crate::store::StoreError::LeaseLost {
                job_id: $lease.job_id,
            });
        }
    }};
}
pub(crate) use fence;

/// The engine's expression for "now" as the ISO-8601 UTC text both schemas store.
const NOW_SQLITE: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
const NOW_PG: &str =
    "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

/// A cheap-to-clone handle on the connection pool.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Open (creating if needed) the SQLite database file, switch it to WAL with a busy
    /// timeout, and apply pending migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Self::open_sqlite(SqliteConnectOptions::new().filename(path)).await
    }

    /// Open `sqlite://PATH` (or `sqlite:PATH`) or `postgres://...` (`postgresql://` too) and
    /// apply pending migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|_| StoreError::BadUrl(url.to_string()))?;
            Self::open_sqlite(opts).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(Duration::from_secs(15))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Ok(Self {
                db: Db::Postgres(pool),
            })
        } else {
            Err(StoreError::BadUrl(url.to_string()))
        }
    }

    async fn open_sqlite(opts: SqliteConnectOptions) -> StoreResult<Self> {
        let opts = opts
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
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self {
            db: Db::Sqlite(pool),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// SQL for the current time as stored text (ISO-8601 UTC, milliseconds).
    pub(crate) fn now_sql(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => NOW_SQLITE,
            Db::Postgres(_) => NOW_PG,
        }
    }

    /// Run one statement without binds (tests and maintenance), returning the rows it changed.
    pub async fn execute(&self, sql: &str) -> StoreResult<u64> {
        Ok(on_pool!(self, p => sqlx::query(sql).execute(p).await?.rows_affected()))
    }

    /// A trivial query: is the database reachable?
    pub async fn ping(&self) -> StoreResult<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await?.rows_affected());
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}

/// Unix time in milliseconds: lease and heartbeat times are compared as numbers, computed by
/// the node (not by SQL, whose clock functions differ between the engines).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// A bare pool on a PostgreSQL server (no migrations): creating test databases.
    pub(crate) async fn connect_raw_postgres(url: &str) -> StoreResult<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(1)
            .connect_with(PgConnectOptions::from_str(url)?)
            .await?)
    }
}
