//! The worker's side of the artifact store (`crate::artifacts`): what a run uploads and what a
//! node fetches before it resumes a job or serves a model it has not got. All of it is a no-op
//! without `--artifact-store` (the data directory is then the only copy).

use super::pool::PoolHandle;
use crate::artifacts::ArtifactStore;
use crate::config::TrainSpec;
use crate::store::{CorpusRow, JobRow, Lease, ModelRow};
use std::path::{Path, PathBuf};

fn corpus_key(file_name: &str) -> String {
    format!("corpora/{file_name}")
}

fn fork_key(seed: &Path) -> String {
    format!("forks/{}", name_of(seed))
}

fn run_key(job_id: i64, sub: &str) -> String {
    format!("runs/{job_id}/{sub}")
}

/// The file name of `path` as text.
fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Make `run_dir` hold job `job_id`'s checkpoints exactly as the store has them, and its
/// tokenizers; returns the checkpoint files downloaded.
async fn download_run(store: &ArtifactStore, job_id: i64, run_dir: &Path) -> anyhow::Result<usize> {
    let got = store
        .download_dir(
            &run_key(job_id, "checkpoints"),
            &run_dir.join("checkpoints"),
            true,
        )
        .await?;
    store
        .download_dir(
            &run_key(job_id, "tokenizers"),
            &run_dir.join("tokenizers"),
            false,
        )
        .await?;
    Ok(got)
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
        let got = download_run(store, id, run_dir).await?;
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
        store
            .delete_dir(&format!("models/{}", name_of(Path::new(&m.path))))
            .await?;
        Ok(())
    }

    /// An uploaded corpus goes up as `corpora/<file name>` before its row is recorded, so a
    /// job naming it can run on any node.
    pub async fn upload_corpus(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(store) = self.artifacts() {
            store.upload_file(&corpus_key(&name_of(path)), path).await?;
        }
        Ok(())
    }

    /// Before a run: point the spec's corpus files that are uploads (rows of `corpora`, by the
    /// path the uploading node recorded) at this node's copy, fetched from the artifact store
    /// into `<data-dir>/corpora` when this node has not got it and checked against the upload's
    /// sha256. Paths that are not uploads are left as they are: they must exist on every node.
    pub(super) async fn localize_corpora(&self, spec: &mut TrainSpec) -> anyhow::Result<()> {
        if self.artifacts().is_none() {
            return Ok(());
        }
        let d = &mut spec.data;
        for path in [Some(&mut d.train), d.train_tgt.as_mut(), d.valid.as_mut()]
            .into_iter()
            .flatten()
        {
            let mut row = self
                .store()
                .get_corpus_by_path(&path.to_string_lossy())
                .await?;
            if row.is_none() && !path.is_file() {
                // (submitted on a node that had fetched the upload: its own copy's path)
                row = self.corpus_by_file_name(&name_of(path)).await?;
            }
            if let Some(row) = row {
                *path = self.local_corpus(&row).await?;
            }
        }
        Ok(())
    }

    /// A job submitted here names an upload another node took (by its file name): this node's
    /// copy, fetched from the artifact store, so the submission's path checks find it. None
    /// when there is no artifact store, or no upload of that file name.
    pub async fn fetch_uploaded_corpus(&self, file_name: &str) -> anyhow::Result<Option<PathBuf>> {
        if self.artifacts().is_none() || self.corpora_dir().join(file_name).is_file() {
            return Ok(None);
        }
        match self.corpus_by_file_name(file_name).await? {
            Some(row) => Ok(Some(self.local_corpus(&row).await?)),
            None => Ok(None),
        }
    }

    async fn corpus_by_file_name(&self, file_name: &str) -> anyhow::Result<Option<CorpusRow>> {
        let rows = self.store().list_corpora().await?;
        Ok(rows
            .into_iter()
            .find(|r| name_of(Path::new(&r.path)) == file_name))
    }

    async fn local_corpus(&self, row: &CorpusRow) -> anyhow::Result<PathBuf> {
        let recorded = PathBuf::from(&row.path);
        let name = name_of(&recorded);
        let local = self.corpora_dir().join(&name);
        let sha = |p: PathBuf| async move {
            tokio::task::spawn_blocking(move || crate::checkpoint::sha256_file(&p)).await?
        };
        let matches = |got: &str| row.sha256.as_deref().is_none_or(|want| want == got);
        if local.is_file() && matches(&sha(local.clone()).await?) {
            return Ok(local);
        }
        let store = self.artifacts().expect("checked by the caller");
        store.download_file(&corpus_key(&name), &local).await?;
        let got = sha(local.clone()).await?;
        if !matches(&got) {
            let _ = std::fs::remove_file(&local);
            anyhow::bail!(
                "corpus `{}` from the artifact store has sha256 {got}, not the upload's {}",
                row.name,
                row.sha256.as_deref().unwrap_or("?")
            );
        }
        tracing::info!(corpus = %row.name, path = %local.display(), "corpus fetched from the artifact store");
        Ok(local)
    }

    /// `<data-dir>/corpora`: uploaded corpora (and other nodes' uploads, fetched).
    pub fn corpora_dir(&self) -> PathBuf {
        self.models_dir().with_file_name("corpora")
    }

    /// The run directory a fork of `parent` is staged from: the parent's own when this node
    /// ran it last (or there is no artifact store); else this node's copy of the parent's
    /// checkpoints and tokenizers as the store has them.
    pub(super) async fn fork_parent_run_dir(&self, parent: &JobRow) -> anyhow::Result<PathBuf> {
        let recorded = parent.run_dir.as_ref().map(PathBuf::from);
        let own = self.runs_dir().join(parent.id.to_string());
        let Some(store) = self.artifacts() else {
            return Ok(recorded.unwrap_or(own));
        };
        let ours = parent.owner.as_deref() == Some(self.node_id())
            || recorded
                .as_deref()
                .is_some_and(|r| r.starts_with(self.runs_dir()));
        if ours {
            return Ok(recorded.unwrap_or(own));
        }
        download_run(store, parent.id, &own).await?;
        Ok(own)
    }

    /// A staged fork goes up as `forks/<folder name>/`.
    pub(super) async fn upload_fork_seed(&self, seed: &Path) -> anyhow::Result<()> {
        if let Some(store) = self.artifacts() {
            store.upload_dir(&fork_key(seed), seed).await?;
        }
        Ok(())
    }

    /// Where this node reads the staged fork `seed` (a path on the node that staged it) from:
    /// that path when it is here, else this node's forks folder, fetched from the store.
    pub(super) async fn local_fork_seed(&self, seed: &Path) -> anyhow::Result<PathBuf> {
        let Some(store) = self.artifacts() else {
            return Ok(seed.to_path_buf());
        };
        if seed.is_dir() {
            return Ok(seed.to_path_buf());
        }
        let local = self.forks_dir().join(name_of(seed));
        let n = store.download_dir(&fork_key(seed), &local, true).await?;
        tracing::info!(seed = %local.display(), files = n, "staged fork fetched from the artifact store");
        Ok(local)
    }

    /// A fork's staged files leave the store once its run directory holds them.
    pub(super) async fn delete_fork_seed(&self, seed: &Path) -> anyhow::Result<()> {
        if let Some(store) = self.artifacts() {
            store.delete_dir(&fork_key(seed)).await?;
        }
        Ok(())
    }
}
