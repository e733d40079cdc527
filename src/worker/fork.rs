//! Forks: a new job that starts from a checkpoint of another one (`POST /api/jobs/{id}/fork`).
//! The parent's checkpoint (weights, Adam moments, step, data position, scaler state) and its
//! tokenizers are staged in `<runs>/.forks/<unique>/` when the fork is created (hard links where
//! the filesystem allows, else copies), so retention in a still-running parent cannot delete it
//! before the fork runs. The staged sidecar carries the fork's spec, and a fresh scaler state
//! when the fork changes the loss-scaler settings. When the fork first runs, its worker moves
//! the staged files into the run directory and the ordinary resume path continues from them:
//! same step counter, same data order. With `--artifact-store` the staged folder also goes up as
//! `forks/<unique>/`, so whichever node claims the fork fetches it (`worker::sync`).

use super::PoolHandle;
use crate::amp::{GradScaler, ScalerConfig};
use crate::checkpoint;
use crate::config::TrainSpec;
use crate::infer::{self, CheckpointChoice, InferError};
use crate::store::JobRow;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ForkFailure {
    /// The parent has no checkpoint of the kind asked for.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// What [`PoolHandle::stage_fork`] prepared.
#[derive(Debug, Clone)]
pub struct StagedFork {
    /// Step of the parent checkpoint the fork starts from.
    pub step: u64,
    pub seed_dir: PathBuf,
    /// The scaler settings changed: the fork starts with a fresh scaler state.
    pub scaler_reset: bool,
}

fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)?;
    }
    Ok(())
}

/// Stage checkpoint `choice` of the run in `parent_run_dir` for a fork with `spec` under
/// `forks_dir`. Blocking (file copies, a checksum).
pub fn stage(
    parent_run_dir: &Path,
    choice: CheckpointChoice,
    spec: &TrainSpec,
    forks_dir: &Path,
    name: &str,
) -> Result<StagedFork, ForkFailure> {
    let (mut meta, path) =
        infer::export::find_checkpoint(parent_run_dir, choice).map_err(|e| match e {
            InferError::NotFound(m) => ForkFailure::NotFound(m),
            other => ForkFailure::Failed(other.to_string()),
        })?;
    let failed = |e: std::io::Error| ForkFailure::Failed(format!("staging the fork: {e}"));
    let seed = forks_dir.join(crate::tempfiles::unique_name("", name));
    let ck_dir = seed.join("checkpoints");
    fs::create_dir_all(&ck_dir).map_err(failed)?;
    let result = (|| {
        let file = path
            .file_name()
            .ok_or_else(|| ForkFailure::Failed(format!("{} has no file name", path.display())))?;
        link_or_copy(&path, &ck_dir.join(file)).map_err(failed)?;
        let old = ScalerConfig::from_spec(&meta.spec.amp, meta.spec.scaler_enabled());
        let new = ScalerConfig::from_spec(&spec.amp, spec.scaler_enabled());
        let scaler_reset = old != new;
        if scaler_reset {
            let mut fresh = GradScaler::new(new).state();
            fresh.skipped_total = meta.scaler.skipped_total;
            fresh.steps = meta.scaler.steps;
            meta.scaler = fresh;
        }
        meta.spec = spec.clone();
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| ForkFailure::Failed(e.to_string()))?;
        checkpoint::write_atomic(&checkpoint::sidecar_path(&ck_dir.join(file)), &json)
            .map_err(failed)?;
        let tok_src = parent_run_dir.join("tokenizers");
        if tok_src.is_dir() {
            let tok_dst = seed.join("tokenizers");
            fs::create_dir_all(&tok_dst).map_err(failed)?;
            for e in fs::read_dir(&tok_src).map_err(failed)?.flatten() {
                if e.path().is_file() {
                    link_or_copy(&e.path(), &tok_dst.join(e.file_name())).map_err(failed)?;
                }
            }
        }
        Ok(StagedFork {
            step: meta.step,
            seed_dir: seed.clone(),
            scaler_reset,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&seed);
    }
    result
}

/// Move a staged fork into `run_dir` (its first run). A run directory that already holds a
/// checkpoint (a retry after a crash) is left as it is. The staging folder is removed.
pub fn seed_run_dir(seed: &Path, run_dir: &Path) -> std::io::Result<()> {
    if !seed.is_dir() {
        return Ok(());
    }
    if checkpoint::list(&run_dir.join("checkpoints")).is_empty() {
        for sub in ["checkpoints", "tokenizers"] {
            let from = seed.join(sub);
            if !from.is_dir() {
                continue;
            }
            let to = run_dir.join(sub);
            fs::create_dir_all(&to)?;
            for e in fs::read_dir(&from)?.flatten() {
                let dst = to.join(e.file_name());
                if !dst.exists() {
                    fs::rename(e.path(), dst)?;
                }
            }
        }
    }
    fs::remove_dir_all(seed)
}

impl PoolHandle {
    /// `<runs>/.forks`: staged fork checkpoints waiting for their job's first run.
    pub fn forks_dir(&self) -> PathBuf {
        self.runs_dir().join(".forks")
    }

    /// [`stage`] checkpoint `choice` of `parent` for a fork with `spec`.
    pub async fn stage_fork(
        &self,
        parent: &JobRow,
        choice: CheckpointChoice,
        spec: &TrainSpec,
    ) -> Result<StagedFork, ForkFailure> {
        // (another node's run: its files as the artifact store has them)
        let run_dir = self
            .fork_parent_run_dir(parent)
            .await
            .map_err(|e| ForkFailure::Failed(format!("fetching job {}: {e:#}", parent.id)))?;
        let (spec, forks, name) = (
            spec.clone(),
            self.forks_dir(),
            format!("job{}-{choice}", parent.id),
        );
        let staged =
            tokio::task::spawn_blocking(move || stage(&run_dir, choice, &spec, &forks, &name))
                .await
                .map_err(|e| ForkFailure::Failed(format!("staging task failed: {e}")))??;
        // In the artifact store before the fork's row exists, so any node can run it.
        if let Err(e) = self.upload_fork_seed(&staged.seed_dir).await {
            let _ = fs::remove_dir_all(&staged.seed_dir);
            return Err(ForkFailure::Failed(format!(
                "uploading the staged fork to the artifact store: {e:#}"
            )));
        }
        Ok(staged)
    }
}
