//! Corpora, tokenizers (word-level or subword) and batching for the translation trainer.
//!
//! * [`read_tsv`] / [`read_parallel`] read a corpus into [`Pair`]s, reporting malformed lines
//!   (with 1-based line numbers) instead of failing on them, and hash the file bytes so that
//!   derived artefacts (tokenizers) can be cached by content.
//! * [`TextTokenizer`] (alias [`WordTokenizer`]) wraps a `tokenizers` tokenizer: WordLevel with
//!   the Whitespace pre-tokenizer, or byte-level BPE / unigram (`subword`), always with the fixed
//!   special ids [`UNK_ID`], [`PAD_ID`], [`SOS_ID`], [`EOS_ID`]; [`load_or_train_tokenizer`]
//!   caches trained tokenizers by corpus hash, language and [`TokenizerOptions`].
//! * [`encode_pairs`] turns pairs into [`Example`]s (`[SOS] words [EOS]` on both sides) with the
//!   `max_len` policy, [`plan_epoch`] builds length-bucketed batches deterministically for a
//!   `(seed, epoch)`, and [`make_batch`] pads a batch to its own longest member.
//!
//! No tokio/sqlx/axum here: the module is usable from the CLI and from worker threads alike.

mod batch;
mod corpus;
mod subword;
mod tokenizer;

pub use batch::*;
pub use corpus::*;
pub use tokenizer::*;

use std::path::PathBuf;

/// `[UNK]`: words not in the vocabulary.
pub const UNK_ID: u32 = 0;
/// `[PAD]`: padding in batches (ignored by the loss).
pub const PAD_ID: u32 = 1;
/// `[SOS]`: start of sentence (first decoder input).
pub const SOS_ID: u32 = 2;
/// `[EOS]`: end of sentence (last label).
pub const EOS_ID: u32 = 3;
/// The special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 4] = ["[UNK]", "[PAD]", "[SOS]", "[EOS]"];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no usable sentence pairs ({malformed} malformed lines skipped)")]
    EmptyCorpus { path: PathBuf, malformed: usize },
    #[error(
        "parallel files differ in length: {src} has {src_lines} lines, {tgt} has {tgt_lines} lines"
    )]
    LineCountMismatch {
        src: PathBuf,
        src_lines: usize,
        tgt: PathBuf,
        tgt_lines: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tokenizer {path}: special token {token} has id {found:?}, expected {expected}")]
    SpecialTokens {
        path: String,
        token: &'static str,
        expected: u32,
        found: Option<u32>,
    },
    #[error("cannot train a tokenizer on an empty text collection")]
    NoTrainingText,
    #[error("{path}: {model} models are not supported")]
    UnsupportedModel { path: PathBuf, model: &'static str },
}

impl DataError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        DataError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
