//! Typed, validated settings. `TrainSpec` is the one schema shared by the TOML files in
//! `configs/`, the CLI and the HTTP API. Every field has a default so a spec may name only what it
//! changes; unknown fields are rejected; `validate` checks every range once and names the field.

mod sections;
mod validate;

pub use sections::*;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The sample corpora shipped in the repository (`data/`, beside `configs/`): the default data
/// root of the server (relative to its working directory, like `configs`) and of the presets.
pub const BUNDLED_DATA_DIR: &str = "data";

/// A spec that failed validation: the dotted field path and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid value for `{field}`: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub name: String,
    pub data: DataSpec,
    pub model: ModelSpec,
    pub train: TrainSection,
    pub amp: AmpSpec,
    pub checkpoint: CheckpointSpec,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            name: "run".into(),
            data: DataSpec::default(),
            model: ModelSpec::default(),
            train: TrainSection::default(),
            amp: AmpSpec::default(),
            checkpoint: CheckpointSpec::default(),
        }
    }
}

impl TrainSpec {
    /// Parse a TOML spec (unknown fields are errors that name the field).
    pub fn from_toml_str(s: &str) -> Result<Self, SpecError> {
        let spec: TrainSpec = toml::from_str(s).map_err(|e| toml_error(&e))?;
        Ok(spec)
    }

    pub fn from_toml_file(path: &Path) -> Result<Self, SpecError> {
        Self::from_toml_file_in(path, &[])
    }

    /// [`Self::from_toml_file`], with relative corpus paths looked up first in `data_roots`
    /// (the CLI's `--data-root`), then as [`Self::resolve_paths`] says, then in the bundled
    /// sample corpus folder `data/` beside the config's directory (presets name corpora
    /// relative to a data root, e.g. `tatoeba-en-it/train.en-it.tsv`).
    pub fn from_toml_file_in(path: &Path, data_roots: &[PathBuf]) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SpecError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        let mut spec = Self::from_toml_str(&text)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        spec.resolve_against(data_roots);
        spec.resolve_paths(dir);
        if let Some(root) = dir.parent() {
            spec.resolve_against(&[root.join(BUNDLED_DATA_DIR)]);
        }
        Ok(spec)
    }

    /// Relative corpus paths that do not exist as given become `<root>/<path>` for the first
    /// root holding that file.
    pub fn resolve_against(&mut self, roots: &[PathBuf]) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() {
                if let Some(alt) = roots.iter().map(|r| r.join(&*p)).find(|a| a.exists()) {
                    *p = alt;
                }
            }
        };
        fix(&mut self.data.train);
        if let Some(p) = self.data.train_tgt.as_mut() {
            fix(p);
        }
        if let Some(p) = self.data.valid.as_mut() {
            fix(p);
        }
    }

    /// Relative corpus paths in a config file are taken relative to the current directory when
    /// they exist there (the repository root, the usual case), else relative to the config's
    /// directory's parent (so `configs/x.toml` works from anywhere inside the repo).
    pub fn resolve_paths(&mut self, config_dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() {
                if let Some(root) = config_dir.parent() {
                    let alt = root.join(&*p);
                    if alt.exists() {
                        *p = alt;
                    }
                }
            }
        };
        fix(&mut self.data.train);
        if let Some(p) = self.data.train_tgt.as_mut() {
            fix(p);
        }
        if let Some(p) = self.data.valid.as_mut() {
            fix(p);
        }
    }

    /// Whether the loss scaler runs: explicit `amp.enabled`, else on for f16 only.
    pub fn scaler_enabled(&self) -> bool {
        self.amp
            .enabled
            .unwrap_or(self.train.precision == Precision::F16)
    }
}

/// Turn a toml/serde error into a SpecError whose field is the dotted path when known.
fn toml_error(e: &toml::de::Error) -> SpecError {
    let msg = e.message().to_string();
    // serde's "unknown field `x`, expected one of ..." carries the name; toml does not give the
    // table path directly, so report the key it names.
    let field = msg
        .split('`')
        .nth(1)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "config".to_string());
    SpecError::new(field, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_precision_reads_as_bf16_with_bf16_dot_products_and_fp32_without_and_is_stored_concrete()
    {
        let want = if crate::kernels::bf16_dot_available() {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
        let s = TrainSpec::from_toml_str("[train]\nprecision = \"auto\"\n").unwrap();
        assert_eq!(s.train.precision, want);
        let stored = serde_json::to_value(&s).unwrap();
        assert_eq!(stored["train"]["precision"], want.as_str());
        let back: TrainSpec = serde_json::from_value(stored).unwrap();
        assert_eq!(back.train.precision, want);
        assert_eq!("AUTO".parse::<Precision>().unwrap(), want);
        let e = TrainSpec::from_toml_str("[train]\nprecision = \"fp8\"\n").unwrap_err();
        assert!(e.message.contains("fp32, f16, bf16, auto"), "{e}");
    }

    #[test]
    fn defaults_validate_and_configs_parse() {
        TrainSpec::default().validate().unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let s = TrainSpec::from_toml_file(&p).unwrap();
                s.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "configs/ should hold tiny, small and tutorial");
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut s = TrainSpec::default();
        s.model.heads = 7;
        assert_eq!(s.validate().unwrap_err().field, "model.heads");
        let mut s = TrainSpec::default();
        s.train.lr = -1.0;
        assert_eq!(s.validate().unwrap_err().field, "train.lr");
        let mut s = TrainSpec::default();
        s.amp.backoff_factor = 1.5;
        assert_eq!(s.validate().unwrap_err().field, "amp.backoff_factor");
        let e = TrainSpec::from_toml_str("[train]\nbatch_sise = 3\n").unwrap_err();
        assert_eq!(e.field, "batch_sise");
        let e = TrainSpec::from_toml_str("[train]\nprecision = \"fp8\"\n").unwrap_err();
        assert!(e.message.contains("fp8"), "{e}");
    }

    #[test]
    fn scaler_default_follows_precision() {
        let mut s = TrainSpec::default();
        assert!(!s.scaler_enabled());
        s.train.precision = Precision::F16;
        assert!(s.scaler_enabled());
        s.train.precision = Precision::Bf16;
        assert!(!s.scaler_enabled());
        s.amp.enabled = Some(true);
        assert!(s.scaler_enabled());
    }
}
