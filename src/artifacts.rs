//! The artifact store: where checkpoints, tokenizers and exported models live so that any node
//! can resume any job and serve any model (`--artifact-store`). A local directory, or
//! `s3://bucket/prefix` on an S3-compatible store, both through the `object_store` crate.
//!
//! Keys mirror the data directory's layout (`runs/<job>/checkpoints/ckpt-….safetensors`,
//! `runs/<job>/tokenizers/…`, `models/<dir>/…`), so each node's data directory is a cache of
//! the store: training writes locally and uploads each checkpoint before its row is recorded
//! (a row means "in the store"), a node taking a job over downloads the run's files first, and
//! a node asked to serve a model it has not got downloads the model directory once. The files'
//! integrity is checked as on one node: checkpoints against their sha256 sidecars when a run
//! resumes, models against their manifest when they load.
//!
//! Without `--artifact-store` the data directory itself is the store and nothing is copied.

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact store `{url}`: {source}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("artifact store `{0}`: expected a local directory or s3://bucket[/prefix]")]
    BadUrl(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type ArtifactResult<T> = Result<T, ArtifactError>;

/// A cheap-to-clone handle on the store.
#[derive(Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStore")
            .field("url", &self.url)
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ArtifactStore {
    /// `s3://bucket[/prefix]` (endpoint, region and credentials from the standard `AWS_*`
    /// variables: `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`; `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint), or a local
    /// directory (created if missing).
    pub fn open(url: &str) -> ArtifactResult<Self> {
        let store_err = |source| ArtifactError::Store {
            url: url.to_string(),
            source,
        };
        let inner: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ArtifactError::BadUrl(url.to_string()));
            }
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                b = b.with_endpoint(endpoint);
            }
            if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1") {
                b = b.with_allow_http(true);
            }
            let s3 = b.build().map_err(store_err)?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            }
        } else if url.contains("://") {
            return Err(ArtifactError::BadUrl(url.to_string()));
        } else {
            let dir = Path::new(url);
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(store_err)?)
        };
        Ok(Self {
            inner,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, source: object_store::Error) -> ArtifactError {
        ArtifactError::Store {
            url: self.url.clone(),
            source,
        }
    }

    /// Upload one file under `key`. (Read whole: checkpoints and models of the sizes this
    /// server trains fit in memory; multipart uploads would be the next step for larger ones.)
    pub async fn upload_file(&self, key: &str, local: &Path) -> ArtifactResult<()> {
        let bytes = tokio::fs::read(local).await.map_err(io(local))?;
        self.inner
            .put(&Key::from(key), PutPayload::from(bytes))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Download `key` to `local`, atomically (a temporary file renamed into place).
    pub async fn download_file(&self, key: &str, local: &Path) -> ArtifactResult<()> {
        let got = self
            .inner
            .get(&Key::from(key))
            .await
            .map_err(|e| self.err(e))?;
        let bytes = got.bytes().await.map_err(|e| self.err(e))?;
        if let Some(parent) = local.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(parent))?;
        }
        // (`.partial-` marks it a leftover for the sweep at start, should this node die now)
        let tmp = local.with_extension(format!(
            "{}.partial-download",
            local.extension().and_then(|e| e.to_str()).unwrap_or("")
        ));
        tokio::fs::write(&tmp, &bytes).await.map_err(io(&tmp))?;
        tokio::fs::rename(&tmp, local).await.map_err(io(local))?;
        Ok(())
    }

    /// Delete `key`; one that is not there is not an error.
    pub async fn delete(&self, key: &str) -> ArtifactResult<()> {
        match self.inner.delete(&Key::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// (path relative to `prefix`, size) of every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> ArtifactResult<Vec<(String, u64)>> {
        let p = Key::from(prefix);
        let metas: Vec<_> = self
            .inner
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                let rel = full
                    .strip_prefix(p.as_ref())
                    .map(|r| r.trim_start_matches('/').to_string())?;
                (!rel.is_empty()).then_some((rel, m.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Delete every object under `prefix` (a folder's worth: an exported model, a staged fork).
    pub async fn delete_dir(&self, prefix: &str) -> ArtifactResult<()> {
        for (rel, _) in self.list(prefix).await? {
            self.delete(&format!("{prefix}/{rel}")).await?;
        }
        Ok(())
    }

    /// Upload every file under `dir` to `prefix/<relative path>`.
    pub async fn upload_dir(&self, prefix: &str, dir: &Path) -> ArtifactResult<usize> {
        let mut n = 0;
        for rel in files_under(dir).map_err(io(dir))? {
            let key = format!("{prefix}/{}", rel.to_string_lossy());
            self.upload_file(&key, &dir.join(&rel)).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Make `dir` hold what the store holds under `prefix`: download what is missing or of
    /// another size. With `exact`, local files the store does not have are removed (a run
    /// directory resumed from the store must not resume from a checkpoint the store never had).
    /// Returns the files downloaded.
    pub async fn download_dir(
        &self,
        prefix: &str,
        dir: &Path,
        exact: bool,
    ) -> ArtifactResult<usize> {
        let remote = self.list(prefix).await?;
        let mut n = 0;
        for (rel, size) in &remote {
            let local = dir.join(rel);
            let same = std::fs::metadata(&local).is_ok_and(|m| m.len() == *size);
            if !same {
                self.download_file(&format!("{prefix}/{rel}"), &local)
                    .await?;
                n += 1;
            }
        }
        if exact {
            let keep: std::collections::HashSet<&str> =
                remote.iter().map(|(r, _)| r.as_str()).collect();
            for rel in files_under(dir).map_err(io(dir))? {
                if !keep.contains(rel.to_string_lossy().as_ref()) {
                    let p = dir.join(&rel);
                    tokio::fs::remove_file(&p).await.map_err(io(&p))?;
                }
            }
        }
        Ok(n)
    }
}

/// Relative paths of the files under `dir` (recursively; none when it does not exist).
fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let rd = match std::fs::read_dir(dir.join(&rel)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                stack.push(r);
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The S3 half runs against the server `AMPSERVE_TEST_S3_ENDPOINT` names (moto, started by
    /// scripts/services.sh), like the PostgreSQL half of the store tests.
    fn stores(tag: &str) -> Vec<(ArtifactStore, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let mut out = vec![(
            ArtifactStore::open(dir.path().join("store").to_str().unwrap()).unwrap(),
            Some(dir),
        )];
        match std::env::var("AMPSERVE_TEST_S3_ENDPOINT") {
            Ok(_) => {
                let url = format!(
                    "s3://ampserve-test/{tag}-{}-{}",
                    std::process::id(),
                    crate::store::unix_ms()
                );
                out.push((ArtifactStore::open(&url).unwrap(), None));
            }
            Err(_) if std::env::var("AMPSERVE_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!("AMPSERVE_REQUIRE_POSTGRES=1 but AMPSERVE_TEST_S3_ENDPOINT is unset")
            }
            Err(_) => eprintln!("note: AMPSERVE_TEST_S3_ENDPOINT is unset: S3 half skipped"),
        }
        out
    }

    #[tokio::test]
    async fn a_directory_round_trips_through_the_store_and_exact_sync_drops_strays() {
        for (store, _keep) in stores("roundtrip") {
            let src = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(src.path().join("checkpoints")).unwrap();
            std::fs::write(src.path().join("checkpoints/ckpt-1.safetensors"), b"one").unwrap();
            std::fs::write(src.path().join("checkpoints/ckpt-1.json"), b"{}").unwrap();
            std::fs::write(src.path().join("spec.json"), vec![7u8; 5000]).unwrap();
            assert_eq!(store.upload_dir("runs/9", src.path()).await.unwrap(), 3);
            let listed = store.list("runs/9").await.unwrap();
            assert_eq!(
                listed,
                [
                    ("checkpoints/ckpt-1.json".to_string(), 2),
                    ("checkpoints/ckpt-1.safetensors".to_string(), 3),
                    ("spec.json".to_string(), 5000)
                ],
                "{}",
                store.url()
            );

            let dst = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dst.path().join("checkpoints")).unwrap();
            std::fs::write(dst.path().join("checkpoints/ckpt-2.safetensors"), b"stray").unwrap();
            assert_eq!(
                store
                    .download_dir("runs/9", dst.path(), true)
                    .await
                    .unwrap(),
                3
            );
            assert_eq!(
                std::fs::read(dst.path().join("checkpoints/ckpt-1.safetensors")).unwrap(),
                b"one"
            );
            assert_eq!(
                std::fs::read(dst.path().join("spec.json")).unwrap(),
                vec![7u8; 5000]
            );
            assert!(!dst.path().join("checkpoints/ckpt-2.safetensors").exists());
            // a second sync has nothing to fetch
            assert_eq!(
                store
                    .download_dir("runs/9", dst.path(), true)
                    .await
                    .unwrap(),
                0
            );
            store.delete("runs/9/spec.json").await.unwrap();
            store.delete("runs/9/spec.json").await.unwrap();
            assert_eq!(store.list("runs/9").await.unwrap().len(), 2);
        }
    }

    #[test]
    fn a_url_that_is_neither_a_path_nor_s3_is_refused() {
        assert!(matches!(
            ArtifactStore::open("gs://bucket/x"),
            Err(ArtifactError::BadUrl(_))
        ));
        assert!(matches!(
            ArtifactStore::open("s3:///x"),
            Err(ArtifactError::BadUrl(_))
        ));
    }
}
