//! Export a training checkpoint as a self-contained model directory:
//!
//! ```text
//! model.safetensors    weights in f16 (master weights cast once; no optimizer state)
//! src_tokenizer.json   the source tokenizer the model was trained with
//! tgt_tokenizer.json   the target tokenizer
//! config.json          ModelConfig: the model config, languages, training max length
//! manifest.json        Manifest: source job/run/checkpoint, step, validation BLEU, sha256 of each file
//! ```
//!
//! The directory is written next to its final place and renamed into it, so a crash never
//! leaves a half-written model behind under the final name.

use super::InferError;
use crate::checkpoint::{self, CheckpointMeta};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "ampserve-model/1";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const SRC_TOKENIZER_FILE: &str = "src_tokenizer.json";
pub const TGT_TOKENIZER_FILE: &str = "tgt_tokenizer.json";
pub const CONFIG_FILE: &str = "config.json";
pub const MANIFEST_FILE: &str = "manifest.json";

/// Which checkpoint of a run to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointChoice {
    /// Best validation BLEU (the latest when no checkpoint has one).
    Best,
    Latest,
    Step(u64),
}

/// A checkpoint choice that is none of `best`, `latest` or a step number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not `best`, `latest` or a step number")]
pub struct NotACheckpointChoice(pub String);

impl std::str::FromStr for CheckpointChoice {
    type Err = NotACheckpointChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "best" => Ok(Self::Best),
            "latest" => Ok(Self::Latest),
            _ => s
                .parse::<u64>()
                .map(Self::Step)
                .map_err(|_| NotACheckpointChoice(s.to_string())),
        }
    }
}

impl std::fmt::Display for CheckpointChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Best => f.write_str("best"),
            Self::Latest => f.write_str("latest"),
            Self::Step(s) => write!(f, "{s}"),
        }
    }
}

/// `config.json`: what is needed to rebuild the model and feed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model: crate::model::Config,
    pub src_lang: String,
    pub tgt_lang: String,
    /// `data.max_len` of the training run (source/target positions incl. specials).
    pub train_max_len: usize,
    /// `train.unk_policy` of the run: what translation does with `[UNK]`.
    #[serde(default)]
    pub unk_policy: crate::config::UnkPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub size_bytes: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub job_id: Option<i64>,
    pub run_dir: PathBuf,
    /// What was asked for: `best`, `latest` or a step.
    pub checkpoint: String,
    pub step: u64,
    pub epoch: u64,
    pub checkpoint_sha256: String,
    pub val_bleu: Option<f64>,
    pub src_lang: String,
    pub tgt_lang: String,
    /// Training precision of the run (`fp32`, `f16`, `bf16`).
    pub train_precision: String,
    /// Storage dtype of `model.safetensors`.
    pub dtype: String,
    pub params: usize,
    pub created_unix: u64,
    /// Steps of the checkpoints whose weights were averaged into this model (empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub averaged_steps: Vec<u64>,
    /// sha256 and size of every other file in the directory.
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size_bytes).sum()
    }
}

/// Find the checkpoint `choice` names in `run_dir/checkpoints`, with its checksum verified.
pub fn find_checkpoint(
    run_dir: &Path,
    choice: CheckpointChoice,
) -> Result<(CheckpointMeta, PathBuf), InferError> {
    let dir = run_dir.join("checkpoints");
    let verified = |(meta, path): (CheckpointMeta, PathBuf)| {
        let sum = checkpoint::sha256_file(&path)?;
        if sum != meta.sha256 {
            return Err(InferError::Invalid(format!(
                "checkpoint {} does not match its recorded sha256",
                path.display()
            )));
        }
        Ok((meta, path))
    };
    match choice {
        CheckpointChoice::Latest => checkpoint::latest_valid(&dir).ok_or_else(|| {
            InferError::NotFound(format!("no valid checkpoint in {}", dir.display()))
        }),
        CheckpointChoice::Best => match checkpoint::best(&dir) {
            Some(c) => verified(c),
            None => find_checkpoint(run_dir, CheckpointChoice::Latest),
        },
        CheckpointChoice::Step(step) => {
            let c = checkpoint::list(&dir)
                .into_iter()
                .find(|(m, _)| m.step == step)
                .ok_or_else(|| {
                    InferError::NotFound(format!(
                        "no checkpoint at step {step} in {}",
                        dir.display()
                    ))
                })?;
            verified(c)
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn file_entry(path: &Path) -> Result<FileEntry, InferError> {
    Ok(FileEntry {
        sha256: checkpoint::sha256_file(path)?,
        size_bytes: fs::metadata(path)?.len(),
    })
}

/// Export checkpoint `choice` of the run in `run_dir` to the new directory `out_dir` (which
/// must not exist), averaging as the run's `checkpoint.average_last` says. Returns the manifest
/// written into it.
pub fn export(
    run_dir: &Path,
    choice: CheckpointChoice,
    out_dir: &Path,
    name: &str,
    job_id: Option<i64>,
) -> Result<Manifest, InferError> {
    export_averaged(run_dir, choice, out_dir, name, job_id, None)
}

/// The checkpoints to average: `anchor` and the `n - 1` newest before it, oldest first, each
/// checksum-verified. Fewer than `n` of them is an error that says how many there are.
pub fn averaging_set(
    run_dir: &Path,
    anchor: &CheckpointMeta,
    n: usize,
) -> Result<Vec<(CheckpointMeta, PathBuf)>, InferError> {
    let all: Vec<_> = checkpoint::list(&run_dir.join("checkpoints"))
        .into_iter()
        .filter(|(m, _)| m.step <= anchor.step)
        .collect();
    if all.len() < n {
        return Err(InferError::NotFound(format!(
            "average_last = {n} needs {n} checkpoints up to step {}, {} has {}",
            anchor.step,
            run_dir.display(),
            all.len()
        )));
    }
    let set = all[all.len() - n..].to_vec();
    for (m, p) in &set {
        if checkpoint::sha256_file(p)? != m.sha256 {
            return Err(InferError::Invalid(format!(
                "checkpoint {} does not match its recorded sha256",
                p.display()
            )));
        }
    }
    Ok(set)
}

/// The element-wise mean of the `param.*` tensors of `set` (f32), by parameter name.
pub fn average_weights(
    set: &[(CheckpointMeta, PathBuf)],
) -> Result<HashMap<String, Tensor>, InferError> {
    let mut sum: HashMap<String, Tensor> = HashMap::new();
    for (_, p) in set {
        let t = checkpoint::load_tensors(p, &Device::Cpu)
            .map_err(|e| InferError::Invalid(e.to_string()))?;
        for (n, x) in t {
            if let Some(name) = n.strip_prefix("param.") {
                let x = x.to_dtype(DType::F32)?;
                let acc = match sum.remove(name) {
                    Some(a) => (a + x)?,
                    None => x,
                };
                sum.insert(name.to_string(), acc);
            }
        }
    }
    let k = set.len() as f64;
    sum.into_iter().map(|(n, t)| Ok((n, (t / k)?))).collect()
}

/// [`export`] with an explicit averaging choice: `Some(n)` averages `n` checkpoints ending at
/// `choice` (0 or 1: none); `None` takes the run's `checkpoint.average_last`, and then, when
/// it averages, ends at the latest checkpoint (the best one's neighbours may be deleted).
pub fn export_averaged(
    run_dir: &Path,
    choice: CheckpointChoice,
    out_dir: &Path,
    name: &str,
    job_id: Option<i64>,
    average_last: Option<usize>,
) -> Result<Manifest, InferError> {
    if out_dir.exists() {
        return Err(InferError::Invalid(format!(
            "{} already exists",
            out_dir.display()
        )));
    }
    let (mut meta, mut ckpt) = find_checkpoint(run_dir, choice)?;
    let n = average_last.unwrap_or(meta.spec.checkpoint.average_last);
    if average_last.is_none() && n > 1 && choice == CheckpointChoice::Best {
        (meta, ckpt) = find_checkpoint(run_dir, CheckpointChoice::Latest)?;
    }
    let set = if n > 1 {
        averaging_set(run_dir, &meta, n)?
    } else {
        Vec::new()
    };
    let tok = |p: &Option<PathBuf>, side: &str| -> Result<PathBuf, InferError> {
        let p = p.as_ref().ok_or_else(|| {
            InferError::Invalid(format!(
                "checkpoint {} records no {side} tokenizer (written by an older ampserve); \
                 resume the job for one more checkpoint, then export",
                ckpt.display()
            ))
        })?;
        let full = run_dir.join(p);
        if !full.is_file() {
            return Err(InferError::NotFound(format!(
                "{side} tokenizer {} is missing",
                full.display()
            )));
        }
        Ok(full)
    };
    let src_tok = tok(&meta.src_tokenizer, "source")?;
    let tgt_tok = tok(&meta.tgt_tokenizer, "target")?;

    write_model_dir(out_dir, |tmp| {
        let masters: HashMap<String, Tensor> = if set.is_empty() {
            checkpoint::load_tensors(&ckpt, &Device::Cpu)
                .map_err(|e| InferError::Invalid(e.to_string()))?
                .into_iter()
                .filter_map(|(n, t)| n.strip_prefix("param.").map(|s| (s.to_string(), t)))
                .collect()
        } else {
            average_weights(&set)?
        };
        let mut weights: HashMap<String, Tensor> = HashMap::new();
        let mut params = 0usize;
        for (name, t) in masters {
            params += t.elem_count();
            weights.insert(name, t.to_dtype(DType::F16)?);
        }
        if weights.is_empty() {
            return Err(InferError::Invalid(format!(
                "{} holds no model weights",
                ckpt.display()
            )));
        }
        candle_core::safetensors::save(&weights, tmp.join(WEIGHTS_FILE))?;
        fs::copy(&src_tok, tmp.join(SRC_TOKENIZER_FILE))?;
        fs::copy(&tgt_tok, tmp.join(TGT_TOKENIZER_FILE))?;
        let cfg = ModelConfig {
            model: meta.model.clone(),
            src_lang: meta.spec.data.src_lang.clone(),
            tgt_lang: meta.spec.data.tgt_lang.clone(),
            train_max_len: meta.spec.data.max_len,
            unk_policy: meta.spec.train.unk_policy,
        };
        fs::write(
            tmp.join(CONFIG_FILE),
            serde_json::to_vec_pretty(&cfg).map_err(|e| InferError::Invalid(e.to_string()))?,
        )?;
        let mut files = BTreeMap::new();
        for f in [
            WEIGHTS_FILE,
            SRC_TOKENIZER_FILE,
            TGT_TOKENIZER_FILE,
            CONFIG_FILE,
        ] {
            files.insert(f.to_string(), file_entry(&tmp.join(f))?);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            name: name.to_string(),
            job_id,
            run_dir: run_dir.to_path_buf(),
            checkpoint: choice.to_string(),
            step: meta.step,
            epoch: meta.epoch,
            checkpoint_sha256: meta.sha256.clone(),
            // an averaged model was never validated as such
            val_bleu: if set.is_empty() { meta.val_bleu } else { None },
            src_lang: cfg.src_lang.clone(),
            tgt_lang: cfg.tgt_lang.clone(),
            train_precision: meta.spec.train.precision.to_string(),
            dtype: "f16".into(),
            params,
            created_unix: now_unix(),
            averaged_steps: set.iter().map(|(m, _)| m.step).collect(),
            files,
        };
        checkpoint::write_atomic(
            &tmp.join(MANIFEST_FILE),
            &serde_json::to_vec_pretty(&manifest)
                .map_err(|e| InferError::Invalid(e.to_string()))?,
        )?;
        for f in manifest.files.keys() {
            fs::File::open(tmp.join(f))?.sync_all()?;
        }
        Ok(manifest)
    })
}

/// Read `dir/manifest.json` and check every file it lists against its sha256.
pub fn verify(dir: &Path) -> Result<Manifest, InferError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| {
        InferError::Invalid(format!("{}: {e} (not an exported model?)", path.display()))
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| InferError::Invalid(format!("{}: {e}", path.display())))?;
    if m.format != FORMAT {
        return Err(InferError::Invalid(format!(
            "{}: format `{}`, expected `{FORMAT}`",
            path.display(),
            m.format
        )));
    }
    for (f, want) in &m.files {
        let got = file_entry(&dir.join(f))
            .map_err(|e| InferError::Invalid(format!("{}: {e}", dir.join(f).display())))?;
        if got.sha256 != want.sha256 {
            return Err(InferError::Invalid(format!(
                "{} does not match the sha256 in its manifest",
                dir.join(f).display()
            )));
        }
    }
    Ok(m)
}

/// Read `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig, InferError> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path)
        .map_err(|e| InferError::Invalid(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| InferError::Invalid(format!("{}: {e}", path.display())))
}

/// Writes a model directory all or nothing: `fill` writes into a fresh hidden directory beside
/// `out_dir` (unique per call, so concurrent writers never share or delete each other's), which
/// is then renamed into place and the rename made durable; on error it is removed.
pub(crate) fn write_model_dir(
    out_dir: &Path,
    fill: impl FnOnce(&Path) -> Result<Manifest, InferError>,
) -> Result<Manifest, InferError> {
    let parent = out_dir
        .parent()
        .ok_or_else(|| InferError::Invalid(format!("{} has no parent", out_dir.display())))?;
    fs::create_dir_all(parent)?;
    let base = out_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model");
    let tmp = parent.join(crate::tempfiles::unique_name(
        ".",
        &format!("{base}.partial"),
    ));
    fs::create_dir(&tmp)?;
    match fill(&tmp) {
        Ok(m) => {
            fs::rename(&tmp, out_dir)?;
            if let Ok(d) = fs::File::open(parent) {
                let _ = d.sync_all();
            }
            Ok(m)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_choice_parses() {
        assert_eq!("best".parse(), Ok(CheckpointChoice::Best));
        assert_eq!("latest".parse(), Ok(CheckpointChoice::Latest));
        assert_eq!("120".parse(), Ok(CheckpointChoice::Step(120)));
        assert!("newest".parse::<CheckpointChoice>().is_err());
        assert!("-3".parse::<CheckpointChoice>().is_err());
    }
}
