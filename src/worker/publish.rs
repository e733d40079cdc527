//! Publishing a job's model for translation: the pool's side of an export (the file format is
//! `infer::export`, hence the different module name). Exports a job's checkpoint as an f16 model
//! directory under `<data-dir>/models/` and records it in the `models` table. Used when a job succeeds and by `POST /api/jobs/{id}/export`. One
//! export per job and checkpoint choice runs at a time; each writes its own unique directory.

use super::PoolHandle;
use crate::infer::{self, CheckpointChoice, InferError};
use crate::store::{JobRow, ModelRow, NewModel};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ExportFailure {
    /// The job has no checkpoint of the kind asked for.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// The `models` row of a model directory written at `path` (an export, or an imported
/// pretrained model when `job_id` is `None`), from its manifest.
pub fn model_row(manifest: &infer::Manifest, job_id: Option<i64>, path: &Path) -> NewModel {
    NewModel {
        name: manifest.name.clone(),
        job_id,
        step: manifest.step as i64,
        checkpoint: manifest.checkpoint.clone(),
        path: path.to_string_lossy().into_owned(),
        src_lang: manifest.src_lang.clone(),
        tgt_lang: manifest.tgt_lang.clone(),
        dtype: manifest.dtype.clone(),
        train_precision: manifest.train_precision.clone(),
        val_bleu: manifest.val_bleu,
        params: manifest.params as i64,
        size_bytes: manifest.total_bytes() as i64,
        manifest_json: serde_json::to_string(manifest).unwrap_or_default(),
    }
}

impl PoolHandle {
    /// `<data-dir>/models`: exported model directories.
    pub fn models_dir(&self) -> PathBuf {
        self.runs_dir()
            .parent()
            .map(|p| p.join("models"))
            .unwrap_or_else(|| self.runs_dir().join("models"))
    }

    /// Export checkpoint `choice` of `job` (averaging `average_last` checkpoints; `None`: as
    /// the job's spec says) and insert its `models` row.
    pub async fn export_job(
        &self,
        job: &JobRow,
        choice: CheckpointChoice,
        average_last: Option<usize>,
    ) -> Result<ModelRow, ExportFailure> {
        let run_dir = job
            .run_dir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.runs_dir().join(job.id.to_string()));
        // One export of this job and choice at a time; a request that waited for another
        // gets that one's model when it exported the same checkpoint.
        let slot = self.export_slot(job.id, choice.to_string());
        let mut last = slot.lock().await;
        if let Some((sha, model_id)) = last.clone() {
            let dir = run_dir.clone();
            let current = tokio::task::spawn_blocking(move || {
                infer::export::find_checkpoint(&dir, choice).map(|(m, _)| m.sha256)
            })
            .await
            .ok()
            .and_then(Result::ok);
            if current.as_deref() == Some(sha.as_str()) {
                if let Ok(Some(m)) = self.store().get_model(model_id).await {
                    return Ok(m);
                }
            }
        }
        let out = self.models_dir().join(crate::tempfiles::unique_name(
            "",
            &format!("job{}-{choice}", job.id),
        ));
        let (job_id, job_name) = (job.id, job.name.clone());
        let out2 = out.clone();
        let manifest = tokio::task::spawn_blocking(move || {
            let (meta, _) = infer::export::find_checkpoint(&run_dir, choice)?;
            let name = format!("{job_name}@{}", meta.step);
            infer::export::export_averaged(
                &run_dir,
                choice,
                &out2,
                &name,
                Some(job_id),
                average_last,
            )
        })
        .await
        .map_err(|e| ExportFailure::Failed(format!("export task failed: {e}")))?
        .map_err(|e| match e {
            InferError::NotFound(m) => ExportFailure::NotFound(m),
            other => ExportFailure::Failed(other.to_string()),
        })?;
        if let Err(e) = self.upload_model(&out).await {
            let _ = std::fs::remove_dir_all(&out);
            return Err(ExportFailure::Failed(format!(
                "cannot upload the model to the artifact store: {e:#}"
            )));
        }
        let row = model_row(&manifest, Some(job.id), &out);
        match self.store().insert_model(&row).await {
            Ok(r) => {
                *last = Some((manifest.checkpoint_sha256.clone(), r.id));
                Ok(r)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&out);
                Err(ExportFailure::Failed(format!(
                    "cannot record the model: {e}"
                )))
            }
        }
    }
}

impl PoolHandle {
    /// Export a succeeded job's best checkpoint for translation. A job without checkpoints (or
    /// a failed export) stays succeeded; the reason is logged.
    pub(super) async fn auto_export(&self, id: i64) {
        let job = match self.inner.store.get_job(id).await {
            Ok(Some(j)) => j,
            _ => return,
        };
        match self
            .export_job(&job, crate::infer::CheckpointChoice::Best, None)
            .await
        {
            Ok(m) => {
                tracing::info!(job = id, model = m.id, path = %m.path, "exported for translation");
                self.publish(
                    id,
                    super::JobEventKind::Model {
                        model_id: m.id,
                        name: m.name,
                    },
                );
            }
            Err(ExportFailure::NotFound(why)) => {
                tracing::info!(job = id, "not exported: {why}")
            }
            Err(e) => tracing::warn!(job = id, "export failed: {e}"),
        }
    }
}
