//! Typed, validated settings. `TrainSpec` is the one schema shared by the TOML files in
//! `configs/`, the CLI and the HTTP API. Every field has a default so a spec may name only what it
//! changes; unknown fields are rejected; `validate` checks every range once and names the field.

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    F16,
    Bf16,
}

impl Precision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(SpecError::new(
                "train.precision",
                format!("`{s}` is not one of fp32, f16, bf16"),
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnLong {
    #[default]
    Drop,
    Truncate,
}

/// How text becomes token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One id per `\w+|[^\w\s]+` piece seen `data.min_frequency` times (the tutorial's setting);
    /// other words are `[UNK]`.
    #[default]
    Word,
    /// Byte-level BPE (GPT-2 style): every byte is in the vocabulary, so nothing is `[UNK]`.
    Bpe,
    /// SentencePiece-style unigram LM over Metaspace (`▁`) pieces.
    Unigram,
}

impl TokenizerKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenizerKind::Word => "word",
            TokenizerKind::Bpe => "bpe",
            TokenizerKind::Unigram => "unigram",
        }
    }
}

/// What decoding does with `[UNK]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnkPolicy {
    /// Never emit `[UNK]`: the next-best token is emitted instead.
    #[default]
    Ban,
    /// Emit `[UNK]` when it is the best token, then leave it out of the text (the tutorial's way).
    Drop,
}

/// The validation number early stopping watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    /// Higher is better.
    #[default]
    Bleu,
    /// Lower is better.
    ValidLoss,
}

/// `train.early_stopping`: stop after `patience` validations in a row that do not improve on
/// the best `metric` so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    #[serde(default)]
    pub metric: StopMetric,
    pub patience: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Constant,
    Noam,
}

/// Which step count drives the learning-rate schedule (`train.schedule_counts`).
///
/// PyTorch's usual AMP loop (`scaler.step(opt); scheduler.step(); scaler.update()`) calls
/// `scheduler.step()` on every iteration, so a step that `GradScaler` skipped still advances the
/// schedule (and PyTorch warns "Detected call of `lr_scheduler.step()` before
/// `optimizer.step()`"; pytorch/pytorch#44511, #67590): that is `all_steps`. fairseq and
/// Hugging Face's Trainer advance the schedule only on applied updates: `optimizer_steps`, the
/// default here, because a skipped step changes no weight, and Adam's bias correction already
/// counts only applied steps; warmup then means "this many real updates".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleCounts {
    /// The schedule advances only on steps the optimizer applied (skipped steps repeat the lr).
    #[default]
    OptimizerSteps,
    /// Every attempted step advances the schedule, skipped ones included (PyTorch's usual loop).
    AllSteps,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Adam,
    Adamw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// TSV of `source<TAB>target` pairs (or, with `train_tgt`, the source side of a pair of
    /// line-aligned text files).
    pub train: PathBuf,
    /// Target side when the corpus is two line-aligned text files.
    pub train_tgt: Option<PathBuf>,
    /// Validation TSV; when absent a seeded split of `train` is used.
    pub valid: Option<PathBuf>,
    pub valid_fraction: f64,
    pub src_lang: String,
    pub tgt_lang: String,
    /// Tokens including specials; longer pairs are dropped or truncated (`on_long`).
    pub max_len: usize,
    pub on_long: OnLong,
    /// Use only the first N training pairs (0 = all); handy for quick runs and tests.
    pub max_train_pairs: usize,
    /// Minimum word frequency for the word-level tokenizers (and the BPE merges).
    pub min_frequency: u64,
    /// `word` (default), `bpe` or `unigram`.
    pub tokenizer: TokenizerKind,
    /// Target vocabulary size (specials included) of the subword tokenizers; ignored by `word`.
    pub vocab_size: usize,
    /// One vocabulary trained on both sides (required by `model.tie_embeddings`).
    pub joint_vocab: bool,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            train: PathBuf::from("tatoeba-en-it/train.en-it.tsv"),
            train_tgt: None,
            valid: None,
            valid_fraction: 0.1,
            src_lang: "en".into(),
            tgt_lang: "it".into(),
            max_len: 64,
            on_long: OnLong::Drop,
            max_train_pairs: 0,
            min_frequency: 2,
            tokenizer: TokenizerKind::Word,
            vocab_size: 8000,
            joint_vocab: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    pub d_model: usize,
    /// Layers in each stack (encoder and decoder).
    pub layers: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub dropout: f64,
    /// The tutorial's layer norm: unbiased std with eps added to the std. `false` gives the
    /// standard biased-variance layer norm with eps inside the square root.
    pub tutorial_layer_norm: bool,
    pub norm_eps: f64,
    /// One embedding matrix for source, target and the output projection (needs
    /// `data.joint_vocab`).
    pub tie_embeddings: bool,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            d_model: 512,
            layers: 6,
            heads: 8,
            d_ff: 2048,
            dropout: 0.1,
            tutorial_layer_norm: true,
            norm_eps: 1e-6,
            tie_embeddings: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub precision: Precision,
    pub epochs: usize,
    /// 0 = no limit; otherwise stop after this many optimizer steps.
    pub max_steps: usize,
    /// Sentences per batch.
    pub batch_size: usize,
    /// When > 0, batches are filled up to this many (padded) tokens instead of `batch_size`
    /// sentences.
    pub max_tokens: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// `optimizer_steps` (default): skipped steps do not advance the schedule; `all_steps`:
    /// they do (PyTorch's usual loop). See [`ScheduleCounts`].
    pub schedule_counts: ScheduleCounts,
    pub optimizer: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global-norm gradient clipping after unscaling; 0 = off.
    pub clip_grad_norm: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Validate every N optimizer steps; 0 = at epoch end only.
    pub valid_every: usize,
    /// 0 (default): validate on the whole validation set. N > 0: on a seeded sample of N pairs
    /// with distinct sources (the same sample at every validation).
    pub valid_max_sentences: usize,
    /// `[UNK]` at decode time (validation, and the exported model's default): `ban` or `drop`.
    pub unk_policy: UnkPolicy,
    /// Sample translations stored with each validation.
    pub valid_samples: usize,
    /// Stop when validation stops improving (absent: train to epochs / max_steps).
    pub early_stopping: Option<EarlyStopping>,
    /// Time budget in seconds (0 = none): no step starts after it is spent; the run then
    /// validates, checkpoints and finishes normally (so the job is exported).
    pub max_time_s: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            precision: Precision::Fp32,
            epochs: 1,
            max_steps: 0,
            batch_size: 8,
            max_tokens: 0,
            lr: 1e-4,
            schedule: Schedule::Constant,
            warmup_steps: 4000,
            schedule_counts: ScheduleCounts::OptimizerSteps,
            optimizer: OptimizerKind::Adam,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-9,
            weight_decay: 0.0,
            clip_grad_norm: 0.0,
            label_smoothing: 0.1,
            seed: 42,
            valid_every: 0,
            valid_max_sentences: 0,
            unk_policy: UnkPolicy::Ban,
            valid_samples: 3,
            early_stopping: None,
            max_time_s: 0.0,
        }
    }
}

/// What a run does when its loss scale collapses (`amp.on_scale_collapse`): overflow at
/// `amp.min_scale` for `amp.max_consecutive_skips` steps in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnScaleCollapse {
    /// The run fails with advice (the behaviour before recovery existed).
    #[default]
    Fail,
    /// Resume from the last good checkpoint (written before the overflows began; the initial
    /// weights when there is none) in bf16, with the loss scaler off.
    Bf16,
    /// Resume from the last good checkpoint with the learning rate halved, at most
    /// `amp.max_rollbacks` times.
    Rollback,
}

impl OnScaleCollapse {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnScaleCollapse::Fail => "fail",
            OnScaleCollapse::Bf16 => "bf16",
            OnScaleCollapse::Rollback => "rollback",
        }
    }
}

/// TEST ONLY (`amp.test_inject_inf`): write an inf into one element of the gradient of the
/// parameter `tensor` on `count` steps from attempted step `from_step` on, while the loss scaler
/// is on (it stands for an f16 overflow there). It exists so tests can force overflows and scale
/// collapses deterministically; never set it in a real run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectInf {
    /// A parameter name as checkpoints spell it (e.g. `decoder.layers.0.ffn.w1`).
    pub tensor: String,
    #[serde(default = "one")]
    pub from_step: u64,
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// The GradScaler's settings (PyTorch defaults plus min_scale / hysteresis).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmpSpec {
    /// None = the precision's default: on for f16, off for fp32 and bf16.
    pub enabled: Option<bool>,
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    pub min_scale: f64,
    /// Fail the run after this many consecutive skipped steps at `min_scale`.
    pub max_consecutive_skips: u64,
    /// Overflowing steps tolerated before the scale backs off (1 = PyTorch behaviour).
    pub hysteresis: u64,
    /// Also find which forward activation first left the f16 range (two reductions per
    /// watched activation on every step: a diagnosis setting, not for speed runs).
    pub trace_overflow: bool,
    /// Every N steps (0 = never) record the share of gradient values that underflow f16 at the
    /// current scale; only while the loss scaler is on.
    pub underflow_every: u64,
    /// `fail` (default), `bf16` or `rollback`: see [`OnScaleCollapse`].
    pub on_scale_collapse: OnScaleCollapse,
    /// Rollbacks allowed before the run fails anyway.
    pub max_rollbacks: u64,
    /// TEST ONLY: see [`InjectInf`].
    pub test_inject_inf: Option<InjectInf>,
}

impl Default for AmpSpec {
    fn default() -> Self {
        Self {
            enabled: None,
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: 1.0,
            max_consecutive_skips: 50,
            hysteresis: 1,
            trace_overflow: false,
            underflow_every: 100,
            on_scale_collapse: OnScaleCollapse::Fail,
            max_rollbacks: 3,
            test_inject_inf: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Write a checkpoint every N optimizer steps (0 = only at epoch end / finish).
    pub every_steps: usize,
    /// Keep the last N checkpoints plus the best by validation BLEU.
    pub keep_last: usize,
    /// Exports average the weights of this many checkpoints (0 or 1 = none): the automatic
    /// export (and any export not asking otherwise) averages the last N; at most `keep_last`.
    pub average_last: usize,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: 500,
            keep_last: 3,
            average_last: 0,
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

fn check(cond: bool, field: &str, msg: impl FnOnce() -> String) -> Result<(), SpecError> {
    if cond {
        Ok(())
    } else {
        Err(SpecError::new(field, msg()))
    }
}

fn range_usize(v: usize, lo: usize, hi: usize, field: &str) -> Result<(), SpecError> {
    check(v >= lo && v <= hi, field, || {
        format!("{v} is out of range; allowed {lo}..={hi}")
    })
}

fn range_f64(v: f64, lo: f64, hi: f64, field: &str) -> Result<(), SpecError> {
    check(v.is_finite() && v >= lo && v <= hi, field, || {
        format!("{v} is out of range; allowed {lo}..={hi}")
    })
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

    /// Check every range once. The error names the first bad field and the allowed range.
    pub fn validate(&self) -> Result<(), SpecError> {
        check(
            !self.name.trim().is_empty() && self.name.len() <= 100,
            "name",
            || "must be 1..=100 characters".into(),
        )?;
        check(
            self.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "name",
            || "may contain only letters, digits, '-', '_' and '.'".into(),
        )?;
        let d = &self.data;
        check(!d.train.as_os_str().is_empty(), "data.train", || {
            "must name a corpus file".into()
        })?;
        range_f64(d.valid_fraction, 0.0, 0.5, "data.valid_fraction")?;
        if d.valid.is_none() {
            check(d.valid_fraction > 0.0, "data.valid_fraction", || {
                "must be > 0 when data.valid is not given".into()
            })?;
        }
        for (v, f) in [
            (&d.src_lang, "data.src_lang"),
            (&d.tgt_lang, "data.tgt_lang"),
        ] {
            check(
                !v.is_empty()
                    && v.len() <= 16
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                f,
                || "must be a short language code such as `en`".into(),
            )?;
        }
        range_usize(d.max_len, 4, 4096, "data.max_len")?;
        check(d.min_frequency >= 1, "data.min_frequency", || {
            "must be >= 1".into()
        })?;
        match d.tokenizer {
            TokenizerKind::Word => {}
            // byte-level BPE starts from 256 byte symbols plus the 4 specials
            TokenizerKind::Bpe => range_usize(d.vocab_size, 300, 1_000_000, "data.vocab_size")?,
            TokenizerKind::Unigram => range_usize(d.vocab_size, 100, 1_000_000, "data.vocab_size")?,
        }

        let m = &self.model;
        range_usize(m.d_model, 8, 8192, "model.d_model")?;
        range_usize(m.layers, 1, 48, "model.layers")?;
        range_usize(m.heads, 1, 128, "model.heads")?;
        check(m.d_model.is_multiple_of(m.heads), "model.heads", || {
            format!("must divide model.d_model ({}) evenly", m.d_model)
        })?;
        range_usize(m.d_ff, 1, 65536, "model.d_ff")?;
        range_f64(m.dropout, 0.0, 0.9, "model.dropout")?;
        range_f64(m.norm_eps, 1e-12, 1e-2, "model.norm_eps")?;
        if m.tie_embeddings {
            check(d.joint_vocab, "model.tie_embeddings", || {
                "needs data.joint_vocab = true (one vocabulary for both sides)".into()
            })?;
        }

        let t = &self.train;
        range_usize(t.epochs, 1, 10_000, "train.epochs")?;
        range_usize(t.max_steps, 0, 100_000_000, "train.max_steps")?;
        range_usize(t.batch_size, 1, 4096, "train.batch_size")?;
        range_usize(t.max_tokens, 0, 1_000_000, "train.max_tokens")?;
        if t.max_tokens > 0 {
            check(t.max_tokens >= d.max_len, "train.max_tokens", || {
                format!("must be 0 or at least data.max_len ({})", d.max_len)
            })?;
        }
        check(
            t.lr.is_finite() && t.lr > 0.0 && t.lr <= 10.0,
            "train.lr",
            || format!("{} is out of range; allowed (0, 10]", t.lr),
        )?;
        range_usize(t.warmup_steps, 0, 10_000_000, "train.warmup_steps")?;
        if t.schedule == Schedule::Noam {
            check(t.warmup_steps > 0, "train.warmup_steps", || {
                "must be > 0 for the noam schedule".into()
            })?;
        }
        range_f64(t.beta1, 0.0, 0.999999, "train.beta1")?;
        range_f64(t.beta2, 0.0, 0.99999999, "train.beta2")?;
        check(
            t.eps.is_finite() && t.eps > 0.0 && t.eps <= 1.0,
            "train.eps",
            || format!("{} is out of range; allowed (0, 1]", t.eps),
        )?;
        range_f64(t.weight_decay, 0.0, 1.0, "train.weight_decay")?;
        range_f64(t.clip_grad_norm, 0.0, 1e6, "train.clip_grad_norm")?;
        range_f64(t.label_smoothing, 0.0, 0.99, "train.label_smoothing")?;
        range_usize(t.valid_every, 0, 100_000_000, "train.valid_every")?;
        range_usize(
            t.valid_max_sentences,
            0,
            1_000_000,
            "train.valid_max_sentences",
        )?;
        range_usize(t.valid_samples, 0, 100, "train.valid_samples")?;
        if let Some(es) = &t.early_stopping {
            range_usize(es.patience, 1, 1_000_000, "train.early_stopping.patience")?;
        }
        range_f64(t.max_time_s, 0.0, 1e8, "train.max_time_s")?;

        let a = &self.amp;
        check(
            a.init_scale.is_finite() && a.init_scale >= 1.0 && a.init_scale <= 2f64.powi(100),
            "amp.init_scale",
            || format!("{} is out of range; allowed 1..=2^100", a.init_scale),
        )?;
        check(
            a.growth_factor.is_finite() && a.growth_factor > 1.0 && a.growth_factor <= 1e3,
            "amp.growth_factor",
            || format!("{} is out of range; allowed (1, 1000]", a.growth_factor),
        )?;
        check(
            a.backoff_factor.is_finite() && a.backoff_factor > 0.0 && a.backoff_factor < 1.0,
            "amp.backoff_factor",
            || format!("{} is out of range; allowed (0, 1)", a.backoff_factor),
        )?;
        check(
            (1..=10_000_000).contains(&a.growth_interval),
            "amp.growth_interval",
            || {
                format!(
                    "{} is out of range; allowed 1..=10000000",
                    a.growth_interval
                )
            },
        )?;
        check(
            a.min_scale.is_finite() && a.min_scale > 0.0 && a.min_scale <= a.init_scale,
            "amp.min_scale",
            || {
                format!(
                    "{} is out of range; allowed (0, amp.init_scale]",
                    a.min_scale
                )
            },
        )?;
        check(
            (1..=1_000_000).contains(&a.max_consecutive_skips),
            "amp.max_consecutive_skips",
            || "allowed 1..=1000000".into(),
        )?;
        check((1..=1000).contains(&a.hysteresis), "amp.hysteresis", || {
            "allowed 1..=1000".into()
        })?;
        check(
            a.underflow_every <= 100_000_000,
            "amp.underflow_every",
            || "allowed 0..=100000000".into(),
        )?;
        check(
            (1..=100).contains(&a.max_rollbacks),
            "amp.max_rollbacks",
            || "allowed 1..=100".into(),
        )?;
        if let Some(inj) = &a.test_inject_inf {
            check(
                !inj.tensor.is_empty() && inj.tensor.len() <= 200,
                "amp.test_inject_inf.tensor",
                || "must name a parameter".into(),
            )?;
            check(
                inj.from_step >= 1 && inj.count <= 100_000_000,
                "amp.test_inject_inf.from_step",
                || "from_step >= 1 and count <= 100000000".into(),
            )?;
        }

        range_usize(
            self.checkpoint.every_steps,
            0,
            100_000_000,
            "checkpoint.every_steps",
        )?;
        range_usize(self.checkpoint.keep_last, 1, 1000, "checkpoint.keep_last")?;
        check(
            self.checkpoint.average_last <= self.checkpoint.keep_last,
            "checkpoint.average_last",
            || {
                format!(
                    "{} is out of range; allowed 0..=checkpoint.keep_last ({})",
                    self.checkpoint.average_last, self.checkpoint.keep_last
                )
            },
        )?;
        Ok(())
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
