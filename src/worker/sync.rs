//! The worker's side of the artifact store (`crate::artifacts`): what a run uploads and what a
//! node fetches before it resumes a job or serves a model it has not got. All of it is a no-op
//! without `--artifact-store` (the data directory is then the only copy).

use super::pool::PoolHandle;
use crate::store::{Lease, ModelRow};
use std::path::{Path, PathBuf};

fn run_key(job_id: i64, sub: &str) -> String {
    format!("runs/{job_id}/{sub}")
}

/// The file name of `path` as text.
fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl PoolHandle {
    /// Before a run: make the local run directory hold the job's checkpoints as the store has
    /// them (a takeover resumes from the latest one the store has; a local checkpoint the
    /// store never got, written by this node before it lost the job, is removed), fetch its
    /// tokenizers, and point the checkpoint rows at the local files.
    pub(super) async fn restore_run(&self, lease: &Lease, run_dir: &Path) -> anyhow::Result<()> {
        let Some(store) = self.artifacts() else {
            return Ok(());
        };
        let id = lease.job_id;
        let ck_dir = run_dir.join("checkpoints");
        let got = store
            .download_dir(&run_key(id, "checkpoints"), &ck_dir, true)
            .await?;
        store
            .download_dir(
                &run_key(id, "tokenizers"),
                &run_dir.join("tokenizers"),
                false,
            )
            .await?;
        if got > 0 {
            tracing::info!(
                job = id,
                files = got,
                "checkpoint files fetched from the artifact store"
            );
        }
        for row in self.store().list_checkpoints(id).await? {
            let local = ck_dir.join(name_of(Path::new(&row.path)));
            let local_s = local.to_string_lossy();
            if row.path != local_s && local.exists() {
                self.store()
                    .relocate_checkpoint(lease, &row.path, &local_s)
                    .await?;
            }
        }
        Ok(())
    }

    /// The run's tokenizers, once the trainer has written them (at its start).
    pub(super) async fn upload_tokenizers(
        &self,
        job_id: i64,
        run_dir: &Path,
    ) -> anyhow::Result<()> {
        if let Some(store) = self.artifacts() {
            store
                .upload_dir(&run_key(job_id, "tokenizers"), &run_dir.join("tokenizers"))
                .await?;
        }
        Ok(())
    }

    /// A new checkpoint file and its sidecar go up, and the files retention removed come down,
    /// before the checkpoint's row is recorded: a row names a checkpoint any node can fetch.
    pub(super) async fn upload_checkpoint(
        &self,
        job_id: i64,
        path: &Path,
        removed: &[PathBuf],
    ) -> anyhow::Result<()> {
        let Some(store) = self.artifacts() else {
            return Ok(());
        };
        let sidecar = crate::checkpoint::sidecar_path(path);
        for f in [path, sidecar.as_path()] {
            if f.exists() {
                store
                    .upload_file(&run_key(job_id, &format!("checkpoints/{}", name_of(f))), f)
                    .await?;
            }
        }
        for gone in removed {
            for f in [gone.clone(), crate::checkpoint::sidecar_path(gone)] {
                store
                    .delete(&run_key(job_id, &format!("checkpoints/{}", name_of(&f))))
                    .await?;
            }
        }
        Ok(())
    }

    /// An exported model directory goes up as `models/<dir name>/`.
    pub(super) async fn upload_model(&self, dir: &Path) -> anyhow::Result<()> {
        if let Some(store) = self.artifacts() {
            store
                .upload_dir(&format!("models/{}", name_of(dir)), dir)
                .await?;
        }
        Ok(())
    }

    /// Where this node reads model `m` from: its own export, or its cached copy of another
    /// node's, fetched from the artifact store the first time. Without an artifact store, the
    /// row's path.
    pub async fn local_model_dir(&self, m: &ModelRow) -> anyhow::Result<PathBuf> {
        let row_path = PathBuf::from(&m.path);
        let Some(store) = self.artifacts() else {
            return Ok(row_path);
        };
        let models = self.models_dir();
        if row_path.starts_with(&models) && row_path.is_dir() {
            return Ok(row_path);
        }
        let name = name_of(&row_path);
        let cached = models.join(&name);
        if cached.is_dir() {
            return Ok(cached);
        }
        // Fetched into a staging directory and renamed, so a half-fetched model is never read.
        let staging = models.join(crate::tempfiles::unique_name(
            "",
            &format!("{name}.partial"),
        ));
        let n = store
            .download_dir(&format!("models/{name}"), &staging, false)
            .await?;
        if n == 0 {
            let _ = std::fs::remove_dir_all(&staging);
            anyhow::bail!(
                "model {} is in neither this node's data directory nor the artifact store",
                m.id
            );
        }
        match std::fs::rename(&staging, &cached) {
            Ok(()) => {}
            // another request fetched it first
            Err(_) if cached.is_dir() => {
                let _ = std::fs::remove_dir_all(&staging);
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(model = m.id, path = %cached.display(), "model fetched from the artifact store");
        Ok(cached)
    }

    /// A deleted model's files leave the artifact store too (other nodes' cached copies stay
    /// until their data directories are cleaned; no row points at them any more).
    pub async fn delete_model_artifacts(&self, m: &ModelRow) -> anyhow::Result<()> {
        let Some(store) = self.artifacts() else {
            return Ok(());
        };
        let prefix = format!("models/{}", name_of(Path::new(&m.path)));
        for (rel, _) in store.list(&prefix).await? {
            store.delete(&format!("{prefix}/{rel}")).await?;
        }
        Ok(())
    }
}
