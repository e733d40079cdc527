//! Evaluation on the validation set: the token-weighted loss without dropout and greedy
//! decoding scored with BLEU, chrF, CER and WER (`scores`). The loop calls it every
//! `train.valid_every` steps and at epoch ends; it holds no run state.

use super::TrainError;
use crate::amp::Autocast;
use crate::config::UnkPolicy;
use crate::data::{self, Example, Pair, WordTokenizer};
use crate::generation::{self, DecodeOptions};
use crate::model::{Ctx, Transformer};
use crate::scores;

/// Result of evaluating a model on a validation set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub val_loss: f64,
    pub bleu: f64,
    pub chrf: f64,
    pub cer: f64,
    pub wer: f64,
    pub sentences: usize,
    pub hypotheses: Vec<String>,
}

/// Validation loss (token-weighted, no dropout) and greedy-decoded BLEU / chrF / CER / WER on
/// up to `max_sentences` validation pairs (0 = all), `[UNK]` handled as `unk` says.
pub fn evaluate(
    model: &Transformer,
    ac: &Autocast,
    valid: &[(Example, Pair)],
    tgt_tok: &WordTokenizer,
    max_sentences: usize,
    label_smoothing: f64,
    unk: UnkPolicy,
) -> Result<Evaluation, TrainError> {
    let n = if max_sentences == 0 {
        valid.len()
    } else {
        valid.len().min(max_sentences)
    };
    let set = &valid[..n];
    let dev = model.device().clone();
    // batches of similar length
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| set[i].0.src.len());
    let exs: Vec<Example> = set.iter().map(|(e, _)| e.clone()).collect();
    let (mut loss_sum, mut tok_sum) = (0.0f64, 0usize);
    let mut hyps = vec![String::new(); n];
    for chunk in order.chunks(64) {
        let b = data::make_batch(&exs, chunk);
        let db = b.to_device(&dev)?;
        ac.new_step();
        let ctx = Ctx::eval(ac);
        let l = model
            .loss(&ctx, &db.src, &db.tgt_in, &db.labels, label_smoothing)?
            .to_scalar::<f32>()? as f64;
        loss_sum += l * b.n_tgt_tokens as f64;
        tok_sum += b.n_tgt_tokens;
        let max_len: Vec<usize> = chunk
            .iter()
            .map(|&i| generation::default_max_len(exs[i].src.len().saturating_sub(2)))
            .collect();
        let srcs: Vec<Vec<u32>> = chunk.iter().map(|&i| exs[i].src.clone()).collect();
        let opts = DecodeOptions {
            ban_unk: unk == UnkPolicy::Ban,
            ..DecodeOptions::default()
        };
        let out = generation::greedy(model, ac, &srcs, &max_len, &opts)?;
        for (k, &i) in chunk.iter().enumerate() {
            hyps[i] = tgt_tok.decode_with(&out[k].tokens, unk == UnkPolicy::Drop);
        }
    }
    let refs: Vec<String> = set.iter().map(|(_, p)| p.tgt.clone()).collect();
    Ok(Evaluation {
        val_loss: if tok_sum > 0 {
            loss_sum / tok_sum as f64
        } else {
            0.0
        },
        bleu: scores::corpus_bleu(&hyps, &refs).score,
        chrf: scores::corpus_chrf(&hyps, &refs),
        cer: scores::cer(&hyps, &refs),
        wer: scores::wer(&hyps, &refs),
        sentences: n,
        hypotheses: hyps,
    })
}
