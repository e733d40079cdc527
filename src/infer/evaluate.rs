//! Scores users can trust: translate a held-out TSV with an exported model and score the output
//! exactly as sacreBLEU does (13a BLEU with exp smoothing, chrF2), so the number next to a model
//! is comparable with published figures and with the PyTorch reference's `score.py`. The
//! scorers are the pure functions of `crate::scores` (no I/O, no model).

use super::{Engine, InferError};
use crate::generation::DecodeOptions;
use crate::scores;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What an evaluation found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The TSV that was translated.
    pub corpus: String,
    pub sentences: usize,
    pub beam_size: usize,
    pub bleu: f64,
    pub chrf: f64,
    /// BLEU's n-gram precisions (percent), brevity penalty and lengths, as sacreBLEU prints them.
    pub precisions: [f64; 4],
    pub bp: f64,
    pub sys_len: usize,
    pub ref_len: usize,
    /// Malformed lines skipped while reading the TSV.
    pub malformed_lines: usize,
}

/// Translate every source of the `source<TAB>reference` file at `tsv` (batches of `batch`
/// sentences) and score the hypotheses against the references. Returns the report and the
/// hypotheses, in file order.
pub fn evaluate_tsv(
    t: &dyn Engine,
    tsv: &Path,
    beam_size: usize,
    batch: usize,
) -> Result<(EvalReport, Vec<String>), InferError> {
    let corpus = crate::data::read_tsv(tsv).map_err(|e| InferError::Invalid(e.to_string()))?;
    let opts = DecodeOptions {
        beam_size: beam_size.max(1),
        ..DecodeOptions::default()
    };
    let mut hyps = Vec::with_capacity(corpus.pairs.len());
    for chunk in corpus.pairs.chunks(batch.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|p| p.src.as_str()).collect();
        hyps.extend(
            t.translate_texts(&texts, &opts, None)?
                .into_iter()
                .map(|r| r.text),
        );
    }
    let refs: Vec<String> = corpus.pairs.iter().map(|p| p.tgt.clone()).collect();
    let b = scores::corpus_bleu(&hyps, &refs);
    let report = EvalReport {
        corpus: tsv.display().to_string(),
        sentences: hyps.len(),
        beam_size: opts.beam_size,
        bleu: b.score,
        chrf: scores::corpus_chrf(&hyps, &refs),
        precisions: b.precisions,
        bp: b.bp,
        sys_len: b.sys_len,
        ref_len: b.ref_len,
        malformed_lines: corpus.malformed.len(),
    };
    Ok((report, hyps))
}
