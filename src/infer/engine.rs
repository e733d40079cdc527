//! What the batcher needs of a loaded model, whatever its kind: an ampserve model exported
//! from a training run ([`Translator`]) or a pretrained MarianMT checkpoint
//! ([`super::marian::MarianTranslator`]). The batcher, the cache and the HTTP layer see only
//! this trait; a model directory's `manifest.json` format says which kind loads it.

use super::export::{Manifest, MANIFEST_FILE};
use super::marian::{MarianTranslator, MARIAN_FORMAT};
use super::sampling::Sampling;
use super::translator::{Translation, Translator};
use super::InferError;
use crate::config::Precision;
use crate::data::WordTokenizer;
use crate::generation::{DecodeOptions, Hypothesis};
use candle_core::Device;
use std::path::Path;
use std::sync::Arc;

/// `kind` in the model list: trained here.
pub const KIND_AMPSERVE: &str = "ampserve";
/// `kind` in the model list: an imported pretrained MarianMT checkpoint.
pub const KIND_MARIAN: &str = "marian";

/// A model's kind from its manifest JSON (the `format` field).
pub fn kind_of_manifest(manifest_json: &str) -> &'static str {
    let format = serde_json::from_str::<serde_json::Value>(manifest_json)
        .ok()
        .and_then(|v| v.get("format").and_then(|f| f.as_str().map(String::from)));
    match format.as_deref() {
        Some(MARIAN_FORMAT) => KIND_MARIAN,
        _ => KIND_AMPSERVE,
    }
}

/// Turns source text into the ids a request carries (cheap to clone: the HTTP side encodes
/// before queueing, to check lengths against the model's bounds).
#[derive(Clone)]
pub enum SourceEncoder {
    /// An ampserve word/subword tokenizer (specials excluded).
    Words(Box<WordTokenizer>),
    /// A Hugging Face `tokenizer.json` (Marian's SentencePiece vocabularies), `</s>` excluded.
    Pretrained(Arc<tokenizers::Tokenizer>),
}

impl SourceEncoder {
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Self::Words(t) => t.encode(text),
            Self::Pretrained(t) => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default(),
        }
    }
}

/// A loaded model the batcher can decode with.
pub trait Engine: Send + 'static {
    fn manifest(&self) -> &Manifest;
    fn compute(&self) -> Precision;
    fn source_encoder(&self) -> SourceEncoder;
    fn max_source_words(&self) -> usize;
    fn max_output_tokens(&self) -> usize;
    fn resident_bytes(&self) -> usize;
    /// The output limit for a source of `src_words` tokens.
    fn limit(&self, src_words: usize, max_len: Option<usize>) -> usize;
    /// Decode source ids (from [`SourceEncoder::encode`]) with a limit each: deterministic
    /// (`sampling` is `None`: greedy or beam as `opts` says), or sampled with one [`Sampling`]
    /// per sentence.
    fn decode_batch(
        &self,
        words: &[Vec<u32>],
        limits: &[usize],
        opts: &DecodeOptions,
        sampling: Option<&[Sampling]>,
    ) -> Result<Vec<Hypothesis>, InferError>;
    fn detokenize(&self, h: &Hypothesis) -> String;

    /// Tokenize, decode as one call (deterministic), detokenize: what evaluation and the
    /// local `ampserve translate` do.
    fn translate_texts(
        &self,
        texts: &[&str],
        opts: &DecodeOptions,
        max_len: Option<usize>,
    ) -> Result<Vec<Translation>, InferError> {
        let enc = self.source_encoder();
        let words: Vec<Vec<u32>> = texts.iter().map(|t| enc.encode(t)).collect();
        let limits: Vec<usize> = words.iter().map(|w| self.limit(w.len(), max_len)).collect();
        let hyps = self.decode_batch(&words, &limits, opts, None)?;
        Ok(words
            .iter()
            .zip(hyps)
            .map(|(w, h)| Translation {
                text: self.detokenize(&h),
                source_tokens: w.len(),
                tokens: h.tokens.len(),
                score: h.score,
            })
            .collect())
    }
}

impl Engine for Translator {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    fn compute(&self) -> Precision {
        self.compute
    }
    fn source_encoder(&self) -> SourceEncoder {
        SourceEncoder::Words(Box::new(self.src_tokenizer().clone()))
    }
    fn max_source_words(&self) -> usize {
        Translator::max_source_words(self)
    }
    fn max_output_tokens(&self) -> usize {
        Translator::max_output_tokens(self)
    }
    fn resident_bytes(&self) -> usize {
        Translator::resident_bytes(self)
    }
    fn limit(&self, src_words: usize, max_len: Option<usize>) -> usize {
        Translator::limit(self, src_words, max_len)
    }
    fn decode_batch(
        &self,
        words: &[Vec<u32>],
        limits: &[usize],
        opts: &DecodeOptions,
        sampling: Option<&[Sampling]>,
    ) -> Result<Vec<Hypothesis>, InferError> {
        match sampling {
            None => self.decode_words(words, limits, opts),
            Some(s) => self.sample_words(words, limits, opts, s),
        }
    }
    fn detokenize(&self, h: &Hypothesis) -> String {
        Translator::detokenize(self, h)
    }
}

/// Load the model directory `dir` as the kind its manifest names (checksums verified first).
pub fn load(
    dir: &Path,
    device: &Device,
    compute: Option<Precision>,
) -> Result<Box<dyn Engine>, InferError> {
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap_or_default();
    if kind_of_manifest(&text) == KIND_MARIAN {
        Ok(Box::new(MarianTranslator::load(dir, device, compute)?))
    } else {
        Ok(Box::new(Translator::load(dir, device, compute)?))
    }
}
