//! The `experiments` and `experiment_arms` tables (migration 0006): an experiment's base spec
//! and settings, and one row per arm naming the job that runs it. The experiment and its arms'
//! jobs are inserted in one transaction, so no experiment exists with a missing arm.

use super::jobs::spec_column;
use super::{on_pool, JobRow, NewJob, Store, StoreResult};
use crate::config::TrainSpec;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExperimentRow {
    pub id: i64,
    pub name: String,
    /// The base spec the arms' overrides apply to, stored as JSON in `spec_json`.
    #[sqlx(rename = "spec_json", try_from = "String")]
    pub spec: TrainSpec,
    pub settings_json: String,
    pub created_at: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArmRow {
    pub experiment_id: i64,
    pub position: i64,
    pub label: String,
    pub overrides_json: String,
    /// None once the arm's job was deleted.
    pub job_id: Option<i64>,
}

/// One arm to insert: its label, overrides (JSON) and job.
#[derive(Debug, Clone)]
pub struct NewArm {
    pub label: String,
    pub overrides_json: String,
    pub job: NewJob,
}

impl Store {
    /// Insert the experiment, one queued job per arm (in arm order) and the arm rows.
    pub async fn insert_experiment(
        &self,
        name: &str,
        spec: &TrainSpec,
        settings_json: &str,
        arms: &[NewArm],
    ) -> StoreResult<(ExperimentRow, Vec<JobRow>)> {
        let spec = spec_column(spec)?;
        let arm_specs = arms
            .iter()
            .map(|a| spec_column(&a.job.spec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let exp = sqlx::query_as::<_, ExperimentRow>(
                "INSERT INTO experiments (name, spec_json, settings_json) VALUES ($1, $2, $3)
                 RETURNING *",
            )
            .bind(name)
            .bind(&spec)
            .bind(settings_json)
            .fetch_one(&mut *tx)
            .await?;
            let mut jobs = Vec::with_capacity(arms.len());
            for (i, (a, arm_spec)) in arms.iter().zip(&arm_specs).enumerate() {
                let job = sqlx::query_as::<_, JobRow>(
                    "INSERT INTO jobs (name, priority, spec_json, requires_device)
                     VALUES ($1, $2, $3, $4) RETURNING *",
                )
                .bind(&a.job.name)
                .bind(a.job.priority)
                .bind(arm_spec)
                .bind(a.job.requires_device.map(|d| d.as_str()))
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO experiment_arms (experiment_id, position, label, overrides_json, job_id)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(exp.id)
                .bind(i as i64)
                .bind(&a.label)
                .bind(&a.overrides_json)
                .bind(job.id)
                .execute(&mut *tx)
                .await?;
                jobs.push(job);
            }
            tx.commit().await?;
            (exp, jobs)
        }))
    }

    pub async fn get_experiment(&self, id: i64) -> StoreResult<Option<ExperimentRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, ExperimentRow>(
            "SELECT * FROM experiments WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(p)
        .await?))
    }

    /// Newest first, with the total count.
    pub async fn list_experiments(
        &self,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<ExperimentRow>, i64)> {
        let rows = on_pool!(self, p => sqlx::query_as::<_, ExperimentRow>(
            "SELECT * FROM experiments ORDER BY id DESC LIMIT $1 OFFSET $2",
        )
        .bind(limit)
        .bind(offset)
        .fetch_all(p)
        .await?);
        let total: i64 = on_pool!(self, p => sqlx::query_scalar("SELECT COUNT(*) FROM experiments")
            .fetch_one(p)
            .await?);
        Ok((rows, total))
    }

    /// The arms in order.
    pub async fn experiment_arms(&self, id: i64) -> StoreResult<Vec<ArmRow>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, ArmRow>(
            "SELECT * FROM experiment_arms WHERE experiment_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(p)
        .await?))
    }
}
