//! Pretrained MarianMT checkpoints (the OPUS-MT family, in their safetensors + `tokenizer.json`
//! form, as candle's `marian-mt` example uses them) served like the models trained here, so a
//! user can compare a model of theirs with a public baseline. The network is
//! `candle_transformers::models::marian`; this file imports a checkpoint directory into the
//! models area (files copied, checksummed in a manifest) and decodes with it.
//!
//! Decoding follows the candle example: source ids + `</s>`, the encoder once, then the decoder
//! from `decoder_start_token_id` one token at a time with its KV cache until `</s>` (or
//! `forced_eos_token_id`); the pad id is never emitted (as the Hugging Face generation config of
//! OPUS-MT bans it). Greedy or sampled (temperature / top-p); no beam search. candle's Marian
//! encoder has no padding mask, so sentences are decoded one at a time (a padded batch would
//! change the results), and its caches are reset before each sentence.
//!
//! ```text
//! config.json          candle_transformers::models::marian::Config (copied as given)
//! model.safetensors    the weights (copied as given)
//! src_tokenizer.json   the source tokenizer.json
//! tgt_tokenizer.json   the target tokenizer.json
//! manifest.json        Manifest with format `ampserve-marian/1`, sha256 of each file
//! ```

use super::export::{
    file_entry, FileEntry, Manifest, CONFIG_FILE, MANIFEST_FILE, SRC_TOKENIZER_FILE,
    TGT_TOKENIZER_FILE, WEIGHTS_FILE,
};
use super::sampling::Sampling;
use super::InferError;
use crate::config::Precision;
use crate::generation::{default_max_len, Hypothesis};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::generation::{LogitsProcessor, Sampling as Method};
use candle_transformers::models::marian::{Config, MTModel};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokenizers::Tokenizer;

pub const MARIAN_FORMAT: &str = "ampserve-marian/1";
/// A single `tokenizer.json` used for both sides when no per-side file is there.
pub const SHARED_TOKENIZER_FILE: &str = "tokenizer.json";

/// What `ampserve models import-marian` is given.
#[derive(Debug, Clone)]
pub struct MarianImport {
    /// Holds `config.json` and `model.safetensors` (and the tokenizers, unless named apart).
    pub dir: PathBuf,
    pub name: String,
    pub src_lang: String,
    pub tgt_lang: String,
    /// Default: `dir/src_tokenizer.json`, else `dir/tokenizer.json`.
    pub src_tokenizer: Option<PathBuf>,
    /// Default: `dir/tgt_tokenizer.json`, else `dir/tokenizer.json`.
    pub tgt_tokenizer: Option<PathBuf>,
}

impl MarianImport {
    /// The files to copy (config, weights, source and target tokenizer), or every one missing.
    fn sources(&self) -> Result<[PathBuf; 4], InferError> {
        let d = &self.dir;
        if !d.is_dir() {
            return Err(InferError::NotFound(format!(
                "{} is not a directory (expected a Marian checkpoint: {CONFIG_FILE}, \
                 {WEIGHTS_FILE}, tokenizer files)",
                d.display()
            )));
        }
        let tok = |given: &Option<PathBuf>, own: &str| -> Result<PathBuf, String> {
            match given {
                Some(p) if p.is_file() => Ok(p.clone()),
                Some(p) => Err(p.display().to_string()),
                None if d.join(own).is_file() => Ok(d.join(own)),
                None if d.join(SHARED_TOKENIZER_FILE).is_file() => {
                    Ok(d.join(SHARED_TOKENIZER_FILE))
                }
                None => Err(format!("{own} (or {SHARED_TOKENIZER_FILE})")),
            }
        };
        let file = |f: &str| {
            let p = d.join(f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(f.to_string())
            }
        };
        let all = [
            file(CONFIG_FILE),
            file(WEIGHTS_FILE),
            tok(&self.src_tokenizer, SRC_TOKENIZER_FILE),
            tok(&self.tgt_tokenizer, TGT_TOKENIZER_FILE),
        ];
        let missing: Vec<String> = all.iter().filter_map(|r| r.clone().err()).collect();
        if !missing.is_empty() {
            return Err(InferError::Missing {
                dir: d.display().to_string(),
                files: missing,
            });
        }
        Ok(all.map(|r| r.unwrap_or_default()))
    }
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> InferError {
    InferError::Invalid(format!("{}: {e}", path.display()))
}

fn read_config(path: &Path) -> Result<Config, InferError> {
    let text = fs::read_to_string(path).map_err(|e| invalid(path, e))?;
    let cfg: Config = serde_json::from_str(&text)
        .map_err(|e| invalid(path, format!("not a Marian config: {e}")))?;
    let dec = cfg.decoder_vocab_size.unwrap_or(cfg.vocab_size);
    if dec != cfg.vocab_size {
        return Err(invalid(
            path,
            format!(
                "decoder_vocab_size {dec} differs from vocab_size {}: candle's Marian shares one \
                 embedding between encoder, decoder and output",
                cfg.vocab_size
            ),
        ));
    }
    if cfg.max_position_embeddings < 2 {
        return Err(invalid(path, "max_position_embeddings must be at least 2"));
    }
    Ok(cfg)
}

fn read_tokenizer(path: &Path, cfg: &Config) -> Result<Tokenizer, InferError> {
    let t = Tokenizer::from_file(path).map_err(|e| invalid(path, e))?;
    let n = t.get_vocab_size(true);
    if n > cfg.vocab_size {
        return Err(invalid(
            path,
            format!(
                "{n} tokens, more than the model's vocab_size {}",
                cfg.vocab_size
            ),
        ));
    }
    Ok(t)
}

fn dtype_of(p: Precision) -> DType {
    match p {
        Precision::Fp32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}

/// Build the network from `weights` (every tensor candle's Marian names must be there with its
/// shape; the error names the first one that is not).
fn build(
    cfg: &Config,
    weights: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(MTModel, usize, DType), InferError> {
    let tensors =
        candle_core::safetensors::load(weights, device).map_err(|e| invalid(weights, e))?;
    let params = tensors.values().map(Tensor::elem_count).sum();
    let stored = tensors
        .get("model.shared.weight")
        .map(Tensor::dtype)
        .unwrap_or(DType::F32);
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = MTModel::new(cfg, vb)
        .map_err(|e| invalid(weights, format!("not a Marian checkpoint: {e}")))?;
    Ok((model, params, stored))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Check the checkpoint in `req.dir` (config, tokenizers, every weight the network needs) and
/// copy it into the new directory `out_dir` (written beside it, renamed into place) with a
/// manifest of checksums. Offline: nothing is downloaded.
pub fn import(req: &MarianImport, out_dir: &Path) -> Result<Manifest, InferError> {
    let [config, weights, src_tok, tgt_tok] = req.sources()?;
    let cfg = read_config(&config)?;
    read_tokenizer(&src_tok, &cfg)?;
    read_tokenizer(&tgt_tok, &cfg)?;
    let (_, params, stored) = build(&cfg, &weights, DType::F32, &Device::Cpu)?;
    if out_dir.exists() {
        return Err(InferError::Invalid(format!(
            "{} already exists",
            out_dir.display()
        )));
    }
    super::export::write_model_dir(out_dir, |tmp| {
        let mut files: BTreeMap<String, FileEntry> = BTreeMap::new();
        for (from, to) in [
            (&config, CONFIG_FILE),
            (&weights, WEIGHTS_FILE),
            (&src_tok, SRC_TOKENIZER_FILE),
            (&tgt_tok, TGT_TOKENIZER_FILE),
        ] {
            fs::copy(from, tmp.join(to))?;
            fs::File::open(tmp.join(to))?.sync_all()?;
            files.insert(to.to_string(), file_entry(&tmp.join(to))?);
        }
        let manifest = Manifest {
            format: MARIAN_FORMAT.into(),
            name: req.name.clone(),
            job_id: None,
            run_dir: req.dir.clone(),
            checkpoint: "pretrained".into(),
            step: 0,
            epoch: 0,
            checkpoint_sha256: files[WEIGHTS_FILE].sha256.clone(),
            val_bleu: None,
            src_lang: req.src_lang.clone(),
            tgt_lang: req.tgt_lang.clone(),
            train_precision: "pretrained".into(),
            dtype: format!("{stored:?}").to_lowercase(),
            params,
            created_unix: now_unix(),
            averaged_steps: Vec::new(),
            files,
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| InferError::Invalid(e.to_string()))?;
        fs::write(tmp.join(MANIFEST_FILE), json)?;
        fs::File::open(tmp.join(MANIFEST_FILE))?.sync_all()?;
        Ok(manifest)
    })
}

/// Read `dir/manifest.json` (format `ampserve-marian/1`) and check every file's sha256.
pub fn verify(dir: &Path) -> Result<Manifest, InferError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| invalid(&path, e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| invalid(&path, e))?;
    if m.format != MARIAN_FORMAT {
        return Err(invalid(
            &path,
            format!("format `{}`, expected `{MARIAN_FORMAT}`", m.format),
        ));
    }
    for (f, want) in &m.files {
        let got = file_entry(&dir.join(f)).map_err(|e| invalid(&dir.join(f), e))?;
        if got.sha256 != want.sha256 {
            return Err(InferError::Invalid(format!(
                "{} does not match the sha256 in its manifest",
                dir.join(f).display()
            )));
        }
    }
    Ok(m)
}

/// An imported Marian model, loaded.
pub struct MarianTranslator {
    pub manifest: Manifest,
    pub config: Config,
    pub compute: Precision,
    /// candle's Marian keeps its KV caches inside the model (`&mut` to decode).
    model: Mutex<MTModel>,
    src_tok: Arc<Tokenizer>,
    tgt_tok: Tokenizer,
    device: Device,
    params: usize,
}

impl MarianTranslator {
    /// Load an imported directory (checksums verified first) on `device`, computing in
    /// `compute` (default [`super::default_compute`]).
    pub fn load(
        dir: &Path,
        device: &Device,
        compute: Option<Precision>,
    ) -> Result<Self, InferError> {
        let manifest = verify(dir)?;
        let config = read_config(&dir.join(CONFIG_FILE))?;
        let src_tok = read_tokenizer(&dir.join(SRC_TOKENIZER_FILE), &config)?;
        let tgt_tok = read_tokenizer(&dir.join(TGT_TOKENIZER_FILE), &config)?;
        let compute = compute.unwrap_or_else(|| super::default_compute(device));
        let (model, params, _) =
            build(&config, &dir.join(WEIGHTS_FILE), dtype_of(compute), device)?;
        Ok(Self {
            manifest,
            config,
            compute,
            model: Mutex::new(model),
            src_tok: Arc::new(src_tok),
            tgt_tok,
            device: device.clone(),
            params,
        })
    }

    pub fn src_tokenizer(&self) -> &Arc<Tokenizer> {
        &self.src_tok
    }

    /// Source ids of `text` (`</s>` is added when decoding).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        super::engine::SourceEncoder::Pretrained(self.src_tok.clone()).encode(text)
    }

    /// Source tokens the positions allow (one is `</s>`).
    pub fn max_source_words(&self) -> usize {
        self.config.max_position_embeddings - 1
    }

    /// Output tokens the positions allow (position 0 is the start token).
    pub fn max_output_tokens(&self) -> usize {
        self.config.max_position_embeddings - 1
    }

    pub fn limit(&self, src_words: usize, max_len: Option<usize>) -> usize {
        max_len
            .unwrap_or_else(|| default_max_len(src_words))
            .clamp(1, self.max_output_tokens())
    }

    /// Decode each sentence on its own: greedy, or sampled with `sampling[i]`.
    pub fn decode_words(
        &self,
        words: &[Vec<u32>],
        limits: &[usize],
        sampling: Option<&[Sampling]>,
    ) -> Result<Vec<Hypothesis>, InferError> {
        let mut model = self.model.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            let mut p = match sampling {
                Some(s) => s[i].processor(),
                None => LogitsProcessor::from_sampling(0, Method::ArgMax),
            };
            out.push(self.decode_one(&mut model, w, limits[i], &mut p)?);
        }
        Ok(out)
    }

    fn decode_one(
        &self,
        model: &mut MTModel,
        words: &[u32],
        limit: usize,
        p: &mut LogitsProcessor,
    ) -> Result<Hypothesis, InferError> {
        let cfg = &self.config;
        model.reset_kv_cache();
        let mut src: Vec<u32> = words
            .iter()
            .copied()
            .take(self.max_source_words())
            .collect();
        src.push(cfg.eos_token_id);
        let src = Tensor::new(src.as_slice(), &self.device)?.unsqueeze(0)?;
        let memory = model.encoder().forward(&src, 0)?;
        let v = cfg.vocab_size;
        let mut ban = vec![0f32; v];
        if (cfg.pad_token_id as usize) < v {
            ban[cfg.pad_token_id as usize] = f32::NEG_INFINITY;
        }
        let ban = Tensor::from_vec(ban, v, &self.device)?;
        let mut h = Hypothesis::default();
        let mut last = cfg.decoder_start_token_id;
        while h.tokens.len() < limit {
            let pos = h.tokens.len();
            let input = Tensor::new(&[last], &self.device)?.unsqueeze(0)?;
            // (1, 1, vocab) -> (vocab,)
            let logits = model
                .decode(&input, &memory, pos)?
                .squeeze(0)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .add(&ban)?;
            let t = p.sample(&logits)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            h.score += logp.get(t as usize)?.to_scalar::<f32>()? as f64;
            if t == cfg.eos_token_id || t == cfg.forced_eos_token_id {
                h.finished = true;
                break;
            }
            h.tokens.push(t);
            last = t;
        }
        h.norm_score = h.score / (h.tokens.len() + h.finished as usize).max(1) as f64;
        Ok(h)
    }

    pub fn detokenize(&self, h: &Hypothesis) -> String {
        self.tgt_tok.decode(&h.tokens, true).unwrap_or_default()
    }

    /// Bytes of the resident weights in the compute dtype.
    pub fn resident_bytes(&self) -> usize {
        self.params * dtype_of(self.compute).size_in_bytes()
    }
}

impl super::engine::Engine for MarianTranslator {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    fn compute(&self) -> Precision {
        self.compute
    }
    fn source_encoder(&self) -> super::engine::SourceEncoder {
        super::engine::SourceEncoder::Pretrained(self.src_tok.clone())
    }
    fn max_source_words(&self) -> usize {
        MarianTranslator::max_source_words(self)
    }
    fn max_output_tokens(&self) -> usize {
        MarianTranslator::max_output_tokens(self)
    }
    fn resident_bytes(&self) -> usize {
        MarianTranslator::resident_bytes(self)
    }
    fn limit(&self, src_words: usize, max_len: Option<usize>) -> usize {
        MarianTranslator::limit(self, src_words, max_len)
    }
    fn decode_batch(
        &self,
        words: &[Vec<u32>],
        limits: &[usize],
        opts: &super::DecodeOptions,
        sampling: Option<&[Sampling]>,
    ) -> Result<Vec<Hypothesis>, InferError> {
        if opts.beam_size > 1 {
            return Err(InferError::Decode(
                "Marian models decode greedily or sampled; beam search is not supported".into(),
            ));
        }
        self.decode_words(words, limits, sampling)
    }
    fn detokenize(&self, h: &Hypothesis) -> String {
        MarianTranslator::detokenize(self, h)
    }
}
