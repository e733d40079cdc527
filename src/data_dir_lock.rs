//! One process owns a data directory. The server and `models import-marian` both take
//! `<data-dir>/ampserve.lock` without waiting, so an import never writes under a running server
//! and two servers never share one SQLite file. The lock lives as long as the returned value.

use std::fs::File;
use std::path::{Path, PathBuf};

/// The held lock, and the data directory it guards (canonical).
#[derive(Debug)]
pub struct DataDirLock {
    pub dir: PathBuf,
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the lock; callers say what the user should do about it.
    #[error("the data directory {} is in use ({source})", dir.display())]
    Busy {
        dir: PathBuf,
        source: std::fs::TryLockError,
    },
}

/// Creates `data_dir` if needed, canonicalises it and takes its lock.
pub fn lock(data_dir: &Path) -> Result<DataDirLock, LockError> {
    fn open(path: &Path) -> impl FnOnce(std::io::Error) -> LockError + '_ {
        move |source| LockError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
    std::fs::create_dir_all(data_dir).map_err(open(data_dir))?;
    let dir = std::fs::canonicalize(data_dir).map_err(open(data_dir))?;
    let path = dir.join("ampserve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(open(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock { dir, _file: file }),
        Err(source) => Err(LockError::Busy { dir, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_data_directory_is_refused_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock(&tmp.path().join("d")).unwrap();
        assert!(matches!(
            lock(&tmp.path().join("d")),
            Err(LockError::Busy { .. })
        ));
        drop(first);
        lock(&tmp.path().join("d")).unwrap();
    }
}
