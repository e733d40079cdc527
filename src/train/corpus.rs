//! Corpus preparation for a run: read the corpus (TSV or two aligned files), split off the
//! validation set, train or load the tokenizers (cached by corpus content and split), encode the
//! pairs and sample the validation set. Kept apart from the loop so a test or the CLI can
//! prepare a corpus without training.

use super::TrainError;
use crate::config::TrainSpec;
use crate::data::{self, Example, Pair, WordTokenizer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Why a corpus gives a run nothing to train on.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error(transparent)]
    Read(#[from] data::DataError),
    #[error("{}: no training pairs", path.display())]
    NoTrainingPairs { path: PathBuf },
    #[error("no training pair fits data.max_len = {max_len} ({dropped_long} dropped as too long)")]
    NothingFitsMaxLen { max_len: usize, dropped_long: usize },
}

fn data_err(e: data::DataError) -> TrainError {
    TrainError::Data(CorpusError::Read(e))
}

/// Everything a run needs from its corpus.
pub struct Prepared {
    pub src_tok: WordTokenizer,
    pub tgt_tok: WordTokenizer,
    pub train: Vec<Example>,
    /// Validation pairs that survived encoding, with their raw text for BLEU.
    pub valid: Vec<(Example, Pair)>,
    pub stats: data::EncodeStats,
    pub malformed: usize,
    pub train_pairs: usize,
    /// Tokenizer files, relative to the run directory.
    pub src_tok_file: PathBuf,
    pub tgt_tok_file: PathBuf,
}

pub fn prepare(spec: &TrainSpec, out_dir: &Path) -> Result<Prepared, TrainError> {
    let d = &spec.data;
    let corpus = match &d.train_tgt {
        Some(t) => data::read_parallel(&d.train, t),
        None => data::read_tsv(&d.train),
    }
    .map_err(data_err)?;
    let mut malformed = corpus.malformed.len();
    let mut pairs = corpus.pairs;
    if d.max_train_pairs > 0 {
        pairs.truncate(d.max_train_pairs);
    }
    let (train_pairs, valid_pairs) = match &d.valid {
        Some(v) => {
            let vc = data::read_tsv(v).map_err(data_err)?;
            malformed += vc.malformed.len();
            (pairs, vc.pairs)
        }
        None => data::split_seeded(pairs, d.valid_fraction, spec.train.seed),
    };
    if train_pairs.is_empty() {
        return Err(CorpusError::NoTrainingPairs {
            path: d.train.clone(),
        }
        .into());
    }
    // Tokenizers are trained on the training split only; the cache key covers the corpus
    // content and every choice that changes the split, plus the language.
    let key = {
        let mut h = Sha256::new();
        h.update(corpus.content_hash.as_bytes());
        h.update(format!(
            "|max={}|valid={:?}|frac={}|seed={}",
            d.max_train_pairs,
            d.valid.is_some(),
            d.valid_fraction,
            if d.valid.is_some() {
                0
            } else {
                spec.train.seed
            }
        ));
        hex::encode(h.finalize())
    };
    let tok_dir = out_dir.join("tokenizers");
    let opts = data::TokenizerOptions::from_spec(d);
    let ((src_tok, src_tok_path), (tgt_tok, tgt_tok_path)) = if d.joint_vocab {
        // one vocabulary for both sides: trained on the source and target sentences together
        let joint = data::load_or_train_tokenizer(
            &tok_dir,
            &format!("joint-{}-{}", d.src_lang, d.tgt_lang),
            &key,
            &opts,
            train_pairs
                .iter()
                .flat_map(|p| [p.src.as_str(), p.tgt.as_str()]),
        )
        .map_err(data_err)?;
        (joint.clone(), joint)
    } else {
        (
            data::load_or_train_tokenizer(
                &tok_dir,
                &d.src_lang,
                &key,
                &opts,
                train_pairs.iter().map(|p| p.src.as_str()),
            )
            .map_err(data_err)?,
            data::load_or_train_tokenizer(
                &tok_dir,
                &d.tgt_lang,
                &key,
                &opts,
                train_pairs.iter().map(|p| p.tgt.as_str()),
            )
            .map_err(data_err)?,
        )
    };
    let (train, stats) = data::encode_pairs(&train_pairs, &src_tok, &tgt_tok, d.max_len, d.on_long);
    if train.is_empty() {
        return Err(CorpusError::NothingFitsMaxLen {
            max_len: d.max_len,
            dropped_long: stats.dropped_long,
        }
        .into());
    }
    let mut valid = Vec::with_capacity(valid_pairs.len());
    for p in valid_pairs {
        let (mut ex, _) = data::encode_pairs(
            std::slice::from_ref(&p),
            &src_tok,
            &tgt_tok,
            d.max_len,
            d.on_long,
        );
        if let Some(e) = ex.pop() {
            valid.push((e, p));
        }
    }
    let valid = validation_sample(valid, spec.train.valid_max_sentences, spec.train.seed);
    let rel = |p: PathBuf| p.strip_prefix(out_dir).map(Path::to_path_buf).unwrap_or(p);
    Ok(Prepared {
        src_tok_file: rel(src_tok_path),
        tgt_tok_file: rel(tgt_tok_path),
        src_tok,
        tgt_tok,
        train_pairs: train.len(),
        train,
        valid,
        stats,
        malformed,
    })
}

/// `n` = 0: all of `valid`. Otherwise a seeded sample of up to `n` pairs whose sources are all
/// distinct (first occurrence kept), in corpus order: the first lines of a validation file often
/// repeat sources, and a score on repeats overstates what a model does on unseen text.
pub fn validation_sample(valid: Vec<(Example, Pair)>, n: usize, seed: u64) -> Vec<(Example, Pair)> {
    if n == 0 {
        return valid;
    }
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<(Example, Pair)> = valid
        .into_iter()
        .filter(|(_, p)| seen.insert(p.src.clone()))
        .collect();
    if distinct.len() <= n {
        return distinct;
    }
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..distinct.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_7a11d));
    let mut keep = vec![false; distinct.len()];
    for &i in &idx[..n] {
        keep[i] = true;
    }
    distinct
        .into_iter()
        .zip(keep)
        .filter_map(|(v, k)| k.then_some(v))
        .collect()
}
