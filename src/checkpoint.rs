//! The checkpoint file format, kept apart from the training loop that writes it and the export
//! that reads it (as burn keeps `checkpoint/` apart from `learner/`); it names only the types it
//! stores (`TrainSpec`, `ScalerState`, the model `Config`).
//!
//! Checkpoints: one safetensors file (master weights `param.<name>`, Adam moments
//! `adam.m.<name>` / `adam.v.<name>`) plus a JSON sidecar (step, data position, optimizer step,
//! scaler state, seed, the full spec, the file's sha256). Both are written atomically (temp file,
//! fsync, rename). Loading verifies the checksum. `best_step` is the one rule for "best"; the
//! retention strategy built on it is `train::KeepLastPlusBest`.

use crate::amp::ScalerState;
use crate::config::TrainSpec;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub step: u64,
    /// Data position to continue from: epoch and the next batch index in that epoch's plan.
    pub epoch: u64,
    pub batch_pos: u64,
    pub adam_t: u64,
    pub scaler: ScalerState,
    pub seed: u64,
    pub spec: TrainSpec,
    pub model: crate::model::Config,
    pub sha256: String,
    pub size_bytes: u64,
    pub val_bleu: Option<f64>,
    pub created_unix: u64,
    /// Run bookkeeping carried across resumes.
    pub best_bleu: Option<f64>,
    pub wall_s: f64,
    pub tokens_total: f64,
    pub step_time_total_s: f64,
    /// The tokenizer files the model was trained with, relative to the run directory
    /// (`tokenizers/tokenizer-<lang>-<hash>-min<f>.json`); needed to export the model.
    #[serde(default)]
    pub src_tokenizer: Option<PathBuf>,
    #[serde(default)]
    pub tgt_tokenizer: Option<PathBuf>,
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Write `bytes` to `path` atomically: temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp-write");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        fsync_dir(d);
    }
    Ok(())
}

pub fn checkpoint_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.safetensors"))
}

pub fn sidecar_path(st: &Path) -> PathBuf {
    st.with_extension("json")
}

/// Why a checkpoint file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointFileError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {}: {source}", path.display())]
    Tensors {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("sidecar of {}: {source}", path.display())]
    Sidecar {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointFileError {
    let path = path.to_path_buf();
    move |source| CheckpointFileError::Io {
        action,
        path,
        source,
    }
}

/// Write a checkpoint; returns the safetensors path and fills `meta.sha256/size_bytes`.
pub fn write(
    dir: &Path,
    meta: &mut CheckpointMeta,
    tensors: Vec<(String, Tensor)>,
) -> Result<PathBuf, CheckpointFileError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let path = checkpoint_path(dir, meta.step);
    let tmp = path.with_extension("safetensors.tmp");
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, &tmp).map_err(|source| CheckpointFileError::Tensors {
        action: "write",
        path: tmp.clone(),
        source,
    })?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync", &tmp))?;
    meta.sha256 = sha256_file(&tmp).map_err(io_err("hash", &tmp))?;
    meta.size_bytes = fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
    fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    let json = serde_json::to_vec_pretty(meta).map_err(|source| CheckpointFileError::Sidecar {
        path: path.clone(),
        source,
    })?;
    let sidecar = sidecar_path(&path);
    write_atomic(&sidecar, &json).map_err(io_err("write", &sidecar))?;
    Ok(path)
}

/// Checkpoints in `dir` that have a sidecar, sorted by step.
pub fn list(dir: &Path) -> Vec<(CheckpointMeta, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let side = sidecar_path(&p);
            if let Ok(text) = fs::read_to_string(&side) {
                if let Ok(meta) = serde_json::from_str::<CheckpointMeta>(&text) {
                    out.push((meta, p));
                }
            }
        }
    }
    out.sort_by_key(|(m, _)| m.step);
    out
}

/// The newest checkpoint whose file matches its recorded checksum; corrupt ones are skipped
/// with a warning.
pub fn latest_valid(dir: &Path) -> Option<(CheckpointMeta, PathBuf)> {
    for (meta, path) in list(dir).into_iter().rev() {
        match sha256_file(&path) {
            Ok(sum) if sum == meta.sha256 => return Some((meta, path)),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "checkpoint checksum mismatch; skipping it")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "unreadable checkpoint ({e}); skipping it")
            }
        }
    }
    None
}

pub fn load_tensors(
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, CheckpointFileError> {
    candle_core::safetensors::load(path, device).map_err(|source| CheckpointFileError::Tensors {
        action: "load",
        path: path.to_path_buf(),
        source,
    })
}

/// Delete the checkpoints at `steps` in `dir` (file and sidecar). Returns the removed
/// safetensors paths.
pub fn remove_steps(dir: &Path, steps: &[u64]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (m, p) in list(dir) {
        if !steps.contains(&m.step) {
            continue;
        }
        let _ = fs::remove_file(sidecar_path(&p));
        if fs::remove_file(&p).is_ok() {
            removed.push(p);
        }
    }
    if !removed.is_empty() {
        fsync_dir(dir);
    }
    removed
}

/// Which of `checkpoints` (step, validation BLEU) is the best: the highest BLEU, the later step
/// among equals; None when none was validated. The one rule retention and export share.
pub fn best_step(checkpoints: impl IntoIterator<Item = (u64, Option<f64>)>) -> Option<u64> {
    checkpoints
        .into_iter()
        .filter_map(|(step, bleu)| bleu.map(|b| (b, step)))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
        .map(|(_, step)| step)
}

/// The best checkpoint (by validation BLEU, see [`best_step`]), if any was validated.
pub fn best(dir: &Path) -> Option<(CheckpointMeta, PathBuf)> {
    let all = list(dir);
    let step = best_step(all.iter().map(|(m, _)| (m.step, m.val_bleu)))?;
    all.into_iter().find(|(m, _)| m.step == step)
}
