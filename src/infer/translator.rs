//! A loaded exported model: tokenizers, the Transformer with its weights, and the compute dtype.

use super::export::{self, Manifest, ModelConfig};
use super::sampling::Sampling;
use super::InferError;
use crate::amp::Autocast;
use crate::config::{Precision, UnkPolicy};
use crate::data::{WordTokenizer, EOS_ID, SOS_ID};
use crate::generation::{self as decode, DecodeOptions, Hypothesis};
use crate::model::Transformer;
use candle_core::Device;
use std::path::Path;

/// The compute dtype used when none is asked for: f16 on CUDA (tensor cores); f32 on CPU, where
/// candle's f16/bf16 matmuls convert to f32 internally and are slower (measured with
/// `ampserve bench translate`, see the README). Weights are stored f16 either way.
pub fn default_compute(device: &Device) -> Precision {
    if device.is_cuda() {
        Precision::F16
    } else {
        Precision::Fp32
    }
}

/// One translated sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub text: String,
    /// Source words (specials excluded).
    pub source_tokens: usize,
    /// Generated tokens (EOS excluded).
    pub tokens: usize,
    /// Sum of the generated tokens' log-probabilities.
    pub score: f64,
}

pub struct Translator {
    pub manifest: Manifest,
    pub config: ModelConfig,
    pub compute: Precision,
    model: Transformer,
    ac: Autocast,
    src_tok: WordTokenizer,
    tgt_tok: WordTokenizer,
}

impl Translator {
    /// Load an exported model directory, verifying every file's checksum first.
    pub fn load(
        dir: &Path,
        device: &Device,
        compute: Option<Precision>,
    ) -> Result<Self, InferError> {
        let manifest = export::verify(dir)?;
        let config = export::read_config(dir)?;
        let src_tok = WordTokenizer::from_file(&dir.join(export::SRC_TOKENIZER_FILE))
            .map_err(|e| InferError::Invalid(e.to_string()))?;
        let tgt_tok = WordTokenizer::from_file(&dir.join(export::TGT_TOKENIZER_FILE))
            .map_err(|e| InferError::Invalid(e.to_string()))?;
        if src_tok.vocab_size() != config.model.src_vocab
            || tgt_tok.vocab_size() != config.model.tgt_vocab
        {
            return Err(InferError::Invalid(format!(
                "{}: tokenizer vocabularies ({}, {}) do not match the model ({}, {})",
                dir.display(),
                src_tok.vocab_size(),
                tgt_tok.vocab_size(),
                config.model.src_vocab,
                config.model.tgt_vocab
            )));
        }
        let model = Transformer::new(&config.model, 0, device)?;
        let weights = candle_core::safetensors::load(dir.join(export::WEIGHTS_FILE), device)?;
        model
            .load_named(&|n| weights.get(n).cloned())
            .map_err(|e| InferError::Invalid(format!("{}: {e}", dir.display())))?;
        let compute = compute.unwrap_or_else(|| default_compute(device));
        Ok(Self {
            manifest,
            config,
            compute,
            model,
            ac: Autocast::new(compute),
            src_tok,
            tgt_tok,
        })
    }

    /// Wrap an in-memory model (tests, or translating straight from a training run).
    pub fn from_parts(
        manifest: Manifest,
        config: ModelConfig,
        model: Transformer,
        compute: Precision,
        src_tok: WordTokenizer,
        tgt_tok: WordTokenizer,
    ) -> Self {
        Self {
            manifest,
            config,
            compute,
            model,
            ac: Autocast::new(compute),
            src_tok,
            tgt_tok,
        }
    }

    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// Source word ids (specials excluded; unknown words are `[UNK]`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.src_tok.encode(text)
    }

    pub fn src_tokenizer(&self) -> &WordTokenizer {
        &self.src_tok
    }

    /// The longest source (in words) the model's positions allow.
    pub fn max_source_words(&self) -> usize {
        self.config.model.max_positions.saturating_sub(2)
    }

    /// The longest output the model's positions allow.
    pub fn max_output_tokens(&self) -> usize {
        self.config.model.max_positions.saturating_sub(1)
    }

    /// Approximate bytes of the resident weights (f32 masters plus the compute-dtype copies).
    pub fn resident_bytes(&self) -> usize {
        let n = self.model.num_parameters();
        let extra = match self.compute {
            Precision::Fp32 => 0,
            _ => 2,
        };
        n * (4 + extra)
    }

    /// Decode source word-id lists (as from [`Self::encode`]). `max_len` caps the output of
    /// every sentence (default [`decode::default_max_len`] of its source).
    pub fn translate_ids(
        &self,
        words: &[Vec<u32>],
        opts: &DecodeOptions,
        max_len: Option<usize>,
    ) -> Result<Vec<Hypothesis>, InferError> {
        let limits: Vec<usize> = words.iter().map(|w| self.limit(w.len(), max_len)).collect();
        self.decode_words(words, &limits, opts)
    }

    /// The output limit for a source of `src_words` words.
    pub fn limit(&self, src_words: usize, max_len: Option<usize>) -> usize {
        max_len
            .unwrap_or_else(|| decode::default_max_len(src_words))
            .min(self.max_output_tokens())
    }

    /// Decode with a length limit per sentence.
    pub fn decode_words(
        &self,
        words: &[Vec<u32>],
        limits: &[usize],
        opts: &DecodeOptions,
    ) -> Result<Vec<Hypothesis>, InferError> {
        let src = self.frame_sources(words);
        let opts = self.effective_options(opts);
        Ok(decode::decode(&self.model, &self.ac, &src, limits, &opts)?)
    }

    /// Sampled decoding ([`super::sampling`]), one [`Sampling`] per sentence.
    pub fn sample_words(
        &self,
        words: &[Vec<u32>],
        limits: &[usize],
        opts: &DecodeOptions,
        sampling: &[Sampling],
    ) -> Result<Vec<Hypothesis>, InferError> {
        let src = self.frame_sources(words);
        let opts = self.effective_options(opts);
        Ok(super::sampling::sample_transformer(
            &self.model,
            &self.ac,
            &src,
            limits,
            &opts,
            sampling,
        )?)
    }

    /// `[SOS] words [EOS]`, the words cut to what the positions allow.
    fn frame_sources(&self, words: &[Vec<u32>]) -> Vec<Vec<u32>> {
        words
            .iter()
            .map(|w| {
                let mut v = Vec::with_capacity(w.len() + 2);
                v.push(SOS_ID);
                v.extend(w.iter().take(self.max_source_words()));
                v.push(EOS_ID);
                v
            })
            .collect()
    }

    /// The options as this model's unk policy has them.
    fn effective_options(&self, opts: &DecodeOptions) -> DecodeOptions {
        let mut opts = opts.clone();
        if self.config.unk_policy == UnkPolicy::Drop {
            // the `drop` policy: [UNK] may win, and is left out of the text
            opts.ban_unk = false;
        }
        opts
    }

    /// Turn hypotheses back into text.
    pub fn detokenize(&self, h: &Hypothesis) -> String {
        self.tgt_tok
            .decode_with(&h.tokens, self.config.unk_policy == UnkPolicy::Drop)
    }

    /// Tokenize, decode as one batch, detokenize ([`super::Engine::translate_texts`]).
    pub fn translate(
        &self,
        texts: &[&str],
        opts: &DecodeOptions,
        max_len: Option<usize>,
    ) -> Result<Vec<Translation>, InferError> {
        super::Engine::translate_texts(self, texts, opts, max_len)
    }
}
