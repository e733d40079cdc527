//! How much memory a training job will need, before it runs: admission control refuses a job
//! whose estimate exceeds what the device has, instead of letting it grow until the process is
//! killed (issue 13, failure 1). Beside `config` (library side, no I/O but the corpus scan for
//! the vocabulary); the HTTP edge compares the estimate with [`available_bytes`] or
//! `--max-job-memory`.
//!
//! The formula (bytes; P parameters, T tokens per batch and side, L = `data.max_len`):
//! - weights, gradients, Adam m and v, all f32: 16·P (the whole model is trainable).
//! - autocast casts: 2·P for f16/bf16 (the per-step cache of half-precision weights), 0 for fp32.
//! - activations kept for backward, per encoder layer 96·T·d + 16·T·f + 12·h·T·L, per decoder
//!   layer 160·T·d + 16·T·f + 24·h·T·L (self and cross attention), plus the output layer's
//!   logits, log-probabilities and their gradient, 12·T·V_tgt. The backward pass holds the
//!   activation gradients at the same time: activations count twice. T is `batch_size`·L (the
//!   worst case, every sentence at the length cap) or `max_tokens` when that is set; c is 4
//!   bytes per element (fp32 saved values dominate even under autocast).
//! - the fixed cost of the process and the corpus: 40 MiB + 8 bytes per corpus byte (strings,
//!   token ids, the length-bucketed batches).
//!
//! The constants come from counting the tensors `model::Transformer::forward_t` creates and
//! were checked against the peak RSS of real tiny runs (`tests/admission.rs`).

use crate::config::{Precision, TokenizerKind, TrainSpec};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

const MIB: u64 = 1 << 20;
/// Special tokens every vocabulary holds ([UNK], [PAD], [SOS], [EOS]).
const SPECIALS: u64 = 4;
const PROCESS_BASE: u64 = 40 * MIB;
const CORPUS_FACTOR: u64 = 8;

/// The parts of one job's estimate, in bytes (parameters as a count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    pub parameters: u64,
    /// Weights, gradients and Adam moments.
    pub parameter_state_bytes: u64,
    pub cast_bytes: u64,
    pub activation_bytes: u64,
    /// Process and corpus.
    pub fixed_bytes: u64,
}

impl MemoryEstimate {
    pub fn total_bytes(&self) -> u64 {
        self.parameter_state_bytes
            .saturating_add(self.cast_bytes)
            .saturating_add(self.activation_bytes)
            .saturating_add(self.fixed_bytes)
    }

    /// What does not depend on the batch: the model's own state plus the fixed cost.
    pub fn model_bytes(&self) -> u64 {
        self.parameter_state_bytes
            .saturating_add(self.cast_bytes)
            .saturating_add(self.fixed_bytes)
    }
}

/// Vocabulary sizes (specials included) and the corpus bytes the estimate assumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorpusFacts {
    pub src_vocab: u64,
    pub tgt_vocab: u64,
    pub bytes: u64,
}

/// Trainable parameters of `model::Transformer` for this spec: embeddings, per encoder layer
/// two norms + attention + feed-forward, per decoder layer three norms + two attentions +
/// feed-forward, the two final norms, and the output projection with its bias.
pub fn parameter_count(spec: &TrainSpec, src_vocab: u64, tgt_vocab: u64) -> u64 {
    let m = &spec.model;
    let (d, f, n) = (m.d_model as u64, m.d_ff as u64, m.layers as u64);
    let ffn = 2 * d * f + f + d;
    let enc_layer = 4 * d + 4 * d * d + ffn;
    let dec_layer = 6 * d + 8 * d * d + ffn;
    // Tied: one matrix is both embeddings and the projection's weight (the bias stays).
    let matrices = if m.tie_embeddings {
        tgt_vocab * d
    } else {
        (src_vocab + 2 * tgt_vocab) * d
    };
    matrices + n * (enc_layer + dec_layer) + 4 * d + tgt_vocab
}

/// The estimate for `spec` with the given corpus facts (see the module docs for the formula).
pub fn estimate(spec: &TrainSpec, corpus: CorpusFacts) -> MemoryEstimate {
    let p = parameter_count(spec, corpus.src_vocab, corpus.tgt_vocab);
    let m = &spec.model;
    let (d, f, h, n) = (
        m.d_model as u64,
        m.d_ff as u64,
        m.heads as u64,
        m.layers as u64,
    );
    let len = spec.data.max_len as u64;
    let t = &spec.train;
    let tokens = if t.max_tokens > 0 {
        t.max_tokens as u64
    } else {
        (t.batch_size as u64).saturating_mul(len)
    };
    let enc = 96 * tokens * d + 16 * tokens * f + 12 * h * tokens * len;
    let dec = 160 * tokens * d + 16 * tokens * f + 24 * h * tokens * len;
    let logits = 12 * tokens * corpus.tgt_vocab;
    let activations = 2u64.saturating_mul(
        n.saturating_mul(enc.saturating_add(dec))
            .saturating_add(logits),
    );
    MemoryEstimate {
        parameters: p,
        parameter_state_bytes: 16u64.saturating_mul(p),
        cast_bytes: if t.precision == Precision::Fp32 {
            0
        } else {
            2u64.saturating_mul(p)
        },
        activation_bytes: activations,
        fixed_bytes: PROCESS_BASE.saturating_add(CORPUS_FACTOR.saturating_mul(corpus.bytes)),
    }
}

/// The vocabulary sizes a job's tokenizers can reach: distinct `\w+|[^\w\s]+` pieces (the
/// tokenizer's pre-tokenizer) seen at least `data.min_frequency` times, per side, in the first
/// `data.max_train_pairs` lines (all when 0), plus the specials. An upper bound: the tokenizer
/// trains on the training split only.
pub fn scan_corpus(spec: &TrainSpec) -> std::io::Result<CorpusFacts> {
    let d = &spec.data;
    let limit = if d.max_train_pairs > 0 {
        d.max_train_pairs
    } else {
        usize::MAX
    };
    let (mut src, mut tgt) = (HashMap::new(), HashMap::new());
    let mut bytes = 0u64;
    match &d.train_tgt {
        None => {
            for line in lines(&d.train, limit)? {
                let line = line?;
                bytes += line.len() as u64 + 1;
                let mut parts = line.split('\t');
                if let (Some(s), Some(t)) = (parts.next(), parts.next()) {
                    count_pieces(s, &mut src);
                    count_pieces(t, &mut tgt);
                }
            }
        }
        Some(tgt_path) => {
            for (side, path) in [(&mut src, &d.train), (&mut tgt, tgt_path)] {
                for line in lines(path, limit)? {
                    let line = line?;
                    bytes += line.len() as u64 + 1;
                    count_pieces(&line, side);
                }
            }
        }
    }
    let size = |m: &HashMap<String, u64>| {
        SPECIALS + m.values().filter(|c| **c >= d.min_frequency).count() as u64
    };
    let (src_vocab, tgt_vocab) = match d.tokenizer {
        TokenizerKind::Word if d.joint_vocab => {
            let mut both = src;
            for (k, c) in tgt {
                *both.entry(k).or_default() += c;
            }
            (size(&both), size(&both))
        }
        TokenizerKind::Word => (size(&src), size(&tgt)),
        // Subword trainers stop at `data.vocab_size` (specials included).
        TokenizerKind::Bpe | TokenizerKind::Unigram => (d.vocab_size as u64, d.vocab_size as u64),
    };
    Ok(CorpusFacts {
        src_vocab,
        tgt_vocab,
        bytes,
    })
}

fn lines(
    path: &Path,
    limit: usize,
) -> std::io::Result<impl Iterator<Item = std::io::Result<String>>> {
    let f = std::fs::File::open(path)?;
    Ok(BufReader::new(f).lines().take(limit))
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Count the `\w+|[^\w\s]+` pieces of `text`.
fn count_pieces(text: &str, counts: &mut HashMap<String, u64>) {
    let mut start: Option<(usize, bool)> = None;
    for (i, c) in text.char_indices() {
        let class = if c.is_whitespace() {
            None
        } else {
            Some(is_word(c))
        };
        match (start, class) {
            (Some((_, w)), Some(cw)) if w == cw => {}
            (Some((s, _)), _) => {
                *counts.entry(text[s..i].to_string()).or_default() += 1;
                start = class.map(|w| (i, w));
            }
            (None, _) => start = class.map(|w| (i, w)),
        }
    }
    if let Some((s, _)) = start {
        *counts.entry(text[s..].to_string()).or_default() += 1;
    }
}

/// Memory this machine can give a new job now: `MemAvailable`, or less when a cgroup (v2
/// `memory.max`, v1 `memory.limit_in_bytes`) leaves less. `None` when neither can be read.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = match (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => match (
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ) {
            // v1 reports "no limit" as a huge number.
            (Some(max), Some(cur)) if max < (1 << 60) => Some(max.saturating_sub(cur)),
            _ => None,
        },
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Why a size such as `--max-job-memory 8GiB` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size such as 8GiB or 512MiB")]
    NotANumber(String),
    #[error("`{0}`: unknown unit; use B, KiB, MiB, GiB or TiB")]
    UnknownUnit(String),
    #[error("`{0}` is out of range")]
    OutOfRange(String),
}

/// `8GiB`, `512MiB`, `512M`, `1.5G`, `1048576` (bytes): binary units, case-insensitive.
pub fn parse_bytes(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| SizeError::NotANumber(s.to_string()))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(SizeError::UnknownUnit(s.to_string())),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(SizeError::OutOfRange(s.to_string()));
    }
    Ok(bytes as u64)
}

/// `3.2 GiB` style, for messages.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 40) as f64 {
        format!("{:.1} TiB", b / (1u64 << 40) as f64)
    } else if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b / MIB as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Config, Transformer};
    use candle_core::Device;

    #[test]
    fn the_parameter_count_matches_the_model_it_builds_tied_or_not() {
        // Untied: two vocabularies; tied: one joint vocabulary, the shared matrix counted once.
        for (src_vocab, tgt_vocab, tie) in [(50, 70, false), (60, 60, true)] {
            let mut spec = TrainSpec::default();
            spec.model.d_model = 24;
            spec.model.layers = 2;
            spec.model.heads = 3;
            spec.model.d_ff = 40;
            spec.model.tie_embeddings = tie;
            let cfg = Config {
                src_vocab,
                tgt_vocab,
                d_model: 24,
                layers: 2,
                heads: 3,
                d_ff: 40,
                dropout: 0.0,
                tutorial_layer_norm: true,
                norm_eps: 1e-6,
                max_positions: 16,
                tie_embeddings: tie,
            };
            let model = Transformer::new(&cfg, 1, &Device::Cpu).unwrap();
            assert_eq!(
                parameter_count(&spec, src_vocab as u64, tgt_vocab as u64),
                model.num_parameters() as u64,
                "tie_embeddings = {tie}"
            );
        }
    }

    #[test]
    fn the_issues_models_need_far_more_than_a_machine_has() {
        let facts = CorpusFacts {
            src_vocab: 8000,
            tgt_vocab: 12000,
            bytes: 1 << 20,
        };
        let mut spec = TrainSpec::default();
        spec.model.d_model = 4096;
        spec.model.layers = 6;
        spec.model.heads = 16;
        spec.model.d_ff = 16384;
        let e = estimate(&spec, facts);
        // 2.9e9 parameters: 47 GB of weights, gradients and moments alone.
        assert!(e.parameters > 2_800_000_000, "{e:?}");
        assert!(e.model_bytes() > 40 << 30, "{e:?}");
        spec.model.d_model = 8192;
        spec.model.layers = 48;
        spec.model.heads = 8;
        spec.model.d_ff = 65536;
        assert!(estimate(&spec, facts).total_bytes() > 1 << 40);
    }

    #[test]
    fn activations_grow_with_the_batch_and_max_tokens_replaces_it() {
        let facts = CorpusFacts {
            src_vocab: 100,
            tgt_vocab: 100,
            bytes: 0,
        };
        let mut spec = TrainSpec::default();
        let a = estimate(&spec, facts).activation_bytes;
        spec.train.batch_size *= 4;
        assert_eq!(estimate(&spec, facts).activation_bytes, 4 * a);
        spec.train.max_tokens = spec.data.max_len * 8; // the default batch, in tokens
        assert_eq!(estimate(&spec, facts).activation_bytes, a);
    }

    #[test]
    fn the_corpus_scan_counts_pieces_per_side_above_min_frequency() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.tsv");
        std::fs::write(
            &p,
            "a cat.\tun gatto.\na dog!\tun cane!\nthe cat\til gatto\n",
        )
        .unwrap();
        let mut spec = TrainSpec::default();
        spec.data.train = p;
        spec.data.min_frequency = 1;
        let f = scan_corpus(&spec).unwrap();
        // a cat . dog ! the / un gatto . cane ! il
        assert_eq!((f.src_vocab, f.tgt_vocab), (6 + SPECIALS, 6 + SPECIALS));
        spec.data.min_frequency = 2;
        let f = scan_corpus(&spec).unwrap();
        // a cat / un gatto
        assert_eq!((f.src_vocab, f.tgt_vocab), (2 + SPECIALS, 2 + SPECIALS));
        spec.data.max_train_pairs = 1;
        assert_eq!(scan_corpus(&spec).unwrap().src_vocab, SPECIALS);
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
