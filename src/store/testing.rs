//! Fresh stores for tests, on each engine: a SQLite file in a new temporary directory, and a
//! new PostgreSQL database on the server `AMPSERVE_TEST_DATABASE_URL` names (scripts/services.sh
//! starts one and prints the variable). Without that variable the PostgreSQL half is skipped
//! with a note, unless `AMPSERVE_REQUIRE_POSTGRES=1` (set by `scripts/test.sh` and CI), which
//! makes it a failure: CI cannot pass by silently testing one engine.

use super::{Lease, Store, StoreResult};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A store and what it lives in (removed on drop for SQLite; PostgreSQL test databases are
/// left for the throwaway cluster).
pub struct TestStore {
    pub store: Store,
    /// `sqlite://...` or `postgres://...`: other processes (test servers) can open the same.
    pub url: String,
    dir: Option<PathBuf>,
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        super::unix_ms()
    )
}

/// The PostgreSQL server to test against, if any; panics when it is required but unset.
pub fn postgres_server_url() -> Option<String> {
    match std::env::var("AMPSERVE_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            if std::env::var("AMPSERVE_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "AMPSERVE_REQUIRE_POSTGRES=1 but AMPSERVE_TEST_DATABASE_URL is unset \
                     (run `eval \"$(scripts/services.sh)\"` first)"
                );
            }
            eprintln!(
                "note: AMPSERVE_TEST_DATABASE_URL is unset: PostgreSQL half skipped \
                 (scripts/services.sh starts a server)"
            );
            None
        }
    }
}

/// A URL of a new, empty PostgreSQL database on the test server (None: no server).
pub async fn fresh_postgres_url() -> StoreResult<Option<String>> {
    let Some(server) = postgres_server_url() else {
        return Ok(None);
    };
    let name = unique("t");
    let admin = Store::connect_raw_postgres(&server).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let base = match server.rfind('/') {
        Some(i) if i > "postgres://".len() => &server[..i],
        _ => server.as_str(),
    };
    Ok(Some(format!("{base}/{name}")))
}

/// A new SQLite store in its own temporary directory.
pub async fn sqlite() -> StoreResult<TestStore> {
    let dir = std::env::temp_dir().join(unique("ampserve-store"));
    std::fs::create_dir_all(&dir).map_err(sqlx::Error::Io)?;
    let path = dir.join("test.db");
    let store = Store::open(&path).await?;
    Ok(TestStore {
        store,
        url: format!("sqlite://{}", path.display()),
        dir: Some(dir),
    })
}

/// A new PostgreSQL store (None: no server configured).
pub async fn postgres() -> StoreResult<Option<TestStore>> {
    let Some(url) = fresh_postgres_url().await? else {
        return Ok(None);
    };
    let store = Store::connect(&url).await?;
    Ok(Some(TestStore {
        store,
        url,
        dir: None,
    }))
}

/// A fresh store on each engine there is: SQLite always, PostgreSQL when configured.
pub async fn engines() -> Vec<TestStore> {
    let mut out = vec![sqlite().await.expect("a SQLite test store")];
    if let Some(pg) = postgres().await.expect("a PostgreSQL test database") {
        out.push(pg);
    }
    out
}

/// Make job `job_id` running and owned by `owner`, as a claim would, and return the lease
/// (store tests that write a job's rows without a worker).
pub async fn adopt(store: &Store, job_id: i64, owner: &str) -> StoreResult<Lease> {
    let n = super::on_pool!(store, p => sqlx::query(
        "UPDATE jobs SET status = 'running', owner = $2, lease_expires_at = $3 WHERE id = $1",
    )
    .bind(job_id)
    .bind(owner)
    .bind(super::unix_ms() + 60_000)
    .execute(p)
    .await?
    .rows_affected());
    let lease = Lease::new(job_id, owner);
    lease.check(n)?;
    Ok(lease)
}
