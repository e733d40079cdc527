//! The sections of a `TrainSpec` (`data`, `model`, `train`, `amp`, `checkpoint`) and the
//! enums their fields take, each with the defaults a spec may leave out.

use super::SpecError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A spec's numeric mode. Specs and the CLI also take `auto`, read as [`Precision::auto`] where
/// the spec is read (a stored spec always names the mode chosen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
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

    /// The fastest mode on this machine's CPU: bf16 where it has AVX512-BF16 dot products (the
    /// bf16 matmuls run `vdpbf16ps`, 1.4-1.8x fp32 here), fp32 elsewhere (without them the mixed
    /// modes are conversions around f32 FMAs). On a GPU, name `f16` or `bf16` instead.
    pub fn auto() -> Self {
        if crate::kernels::bf16_dot_available() {
            Precision::Bf16
        } else {
            Precision::Fp32
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
            "auto" => Ok(Precision::auto()),
            _ => Err(SpecError::new(
                "train.precision",
                format!("`{s}` is not one of fp32, f16, bf16, auto"),
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Precision {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: SpecError| serde::de::Error::custom(e.message))
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
    /// Linear warm-up over `warmup_steps` (none at 0), then a straight line down to zero at the
    /// end of the run's budget: whichever of `epochs`, `max_steps` and `max_time_s` runs out
    /// first (the budget-aware decay of Li et al., "Budgeted training", ICLR 2020).
    Linear,
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
    /// Validate every N optimizer steps; 0 = at epoch ends only (see `valid_every_epochs`).
    pub valid_every: usize,
    /// Validate at the end of every N-th epoch (default 1: each epoch); 0 = not at epoch ends,
    /// so `valid_every` alone sets the cadence (a corpus of short epochs otherwise spends a
    /// good part of a time budget validating). The run's end validates in any case.
    pub valid_every_epochs: usize,
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
            valid_every_epochs: 1,
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
