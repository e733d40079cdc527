//! Decoding (generation), kept apart from the model and from its two users, validation in
//! `train` and serving in `infer`, as candle-transformers keeps `generation/`; it needs only
//! `amp`, `data`, `model` and `ops`.
//!
//! Decoding with the per-layer key/value cache: the encoder runs once, every step feeds only
//! the newest token. Batched greedy and batched beam search, with per-sentence stopping
//! (finished sentences leave the batch: their cache rows are dropped).
//!
//! Sources are token ids as the training data has them: `[SOS] words [EOS]`. Results are the
//! generated ids without `[SOS]` / `[EOS]`. `[PAD]`, `[SOS]` and (by default) `[UNK]` are never
//! emitted: a word-level model with a small vocabulary otherwise fills its output with `[UNK]`.
//! `[EOS]` is not allowed as the first token, so a translation is never empty.

use crate::amp::Autocast;
use crate::data::{EOS_ID, PAD_ID, SOS_ID, UNK_ID};
use crate::model::{self, Ctx, Transformer};
use candle_core::{DType, Device, Result, Tensor, D};

/// One decoded sentence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hypothesis {
    /// Generated ids, without `[SOS]` and `[EOS]`.
    pub tokens: Vec<u32>,
    /// Model score: the sum of the log-probabilities of the emitted tokens (`[EOS]` included
    /// when it was emitted).
    pub score: f64,
    /// `score / length_penalty(len, alpha)`: what beam search ranks finished hypotheses by.
    pub norm_score: f64,
    /// Ended with `[EOS]` (false: stopped at the length limit).
    pub finished: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// 1 = greedy.
    pub beam_size: usize,
    /// Length normalisation exponent (GNMT: `((5 + len) / 6) ^ alpha`); 0 ranks by raw score.
    pub alpha: f64,
    /// Never emit `[UNK]`.
    pub ban_unk: bool,
    /// Never emit `[EOS]`: every sentence runs to its length limit (fixed work, for benchmarks).
    pub ignore_eos: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            beam_size: 1,
            alpha: 0.6,
            ban_unk: true,
            ignore_eos: false,
        }
    }
}

/// GNMT length penalty `((5 + len) / 6) ^ alpha`.
pub fn length_penalty(len: usize, alpha: f64) -> f64 {
    ((5.0 + len as f64) / 6.0).powf(alpha)
}

/// Default length limit for a source of `src_words` words (specials excluded): `1.5 * n + 10`.
pub fn default_max_len(src_words: usize) -> usize {
    (src_words as f64 * 1.5) as usize + 10
}

/// Sources padded to the longest: (b, s) u32.
pub fn pad_sources(src: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let s = src.iter().map(|v| v.len()).max().unwrap_or(0).max(1);
    let mut data = vec![PAD_ID; src.len() * s];
    for (i, v) in src.iter().enumerate() {
        data[i * s..i * s + v.len()].copy_from_slice(v);
    }
    Tensor::from_vec(data, (src.len(), s), dev)
}

/// Host-side additive bias over the vocabulary: 0, or -inf for banned ids.
fn ban_list(v: usize, opts: &DecodeOptions) -> Vec<f32> {
    let mut bias = vec![0f32; v];
    let mut ban = vec![PAD_ID, SOS_ID];
    if opts.ban_unk {
        ban.push(UNK_ID);
    }
    if opts.ignore_eos {
        ban.push(EOS_ID);
    }
    for id in ban {
        if (id as usize) < v {
            bias[id as usize] = f32::NEG_INFINITY;
        }
    }
    bias
}

/// The first token is never `[EOS]`: an empty translation is never the answer.
fn ban_list_first(v: usize, opts: &DecodeOptions) -> Vec<f32> {
    let mut bias = ban_list(v, opts);
    if (EOS_ID as usize) < v {
        bias[EOS_ID as usize] = f32::NEG_INFINITY;
    }
    bias
}

fn row_index(rows: &[usize], dev: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Tensor::from_vec(idx, rows.len(), dev)
}

/// Per-sentence length limits, clamped to what the model's positions allow (at least 1).
fn clamp_limits(model: &Transformer, max_len: &[usize]) -> Vec<usize> {
    let cap = model.cfg.max_positions.saturating_sub(1).max(1);
    max_len.iter().map(|&m| m.clamp(1, cap)).collect()
}

/// Decode with `opts.beam_size` (1 = greedy).
pub fn decode(
    model: &Transformer,
    ac: &Autocast,
    src: &[Vec<u32>],
    max_len: &[usize],
    opts: &DecodeOptions,
) -> Result<Vec<Hypothesis>> {
    if opts.beam_size <= 1 {
        greedy(model, ac, src, max_len, opts)
    } else {
        beam_search(model, ac, src, max_len, opts)
    }
}

/// Batched greedy decoding with the KV cache.
pub fn greedy(
    model: &Transformer,
    ac: &Autocast,
    src: &[Vec<u32>],
    max_len: &[usize],
    opts: &DecodeOptions,
) -> Result<Vec<Hypothesis>> {
    step_by_step(model, ac, src, max_len, opts, |logp, _| {
        let next_t = logp.argmax_keepdim(D::Minus1)?;
        let lp: Vec<f32> = logp.gather(&next_t, 1)?.flatten_all()?.to_vec1()?;
        Ok((next_t.flatten_all()?.to_vec1()?, lp))
    })
}

/// The token-at-a-time loop with the KV cache that greedy decoding and sampling share (same
/// banned ids, no `[EOS]` first, per-sentence limits). `pick` is what differs: given the step's
/// log-probabilities (one row per live sentence, banned ids at -inf) and the live sentences'
/// indices into `src`, it returns their next tokens and those tokens' log-probabilities.
pub fn step_by_step(
    model: &Transformer,
    ac: &Autocast,
    src: &[Vec<u32>],
    max_len: &[usize],
    opts: &DecodeOptions,
    mut pick: impl FnMut(&Tensor, &[usize]) -> Result<(Vec<u32>, Vec<f32>)>,
) -> Result<Vec<Hypothesis>> {
    let b = src.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let dev = model.device().clone();
    let limits = clamp_limits(model, max_len);
    let ctx = Ctx::eval(ac);
    let src_t = pad_sources(src, &dev)?;
    let mut sm = model::src_mask(&src_t)?;
    let memory = model.encode(&ctx, &src_t, &sm)?;
    let mut cache = model.start_decoding(&ctx, &memory)?;
    let v = model.cfg.tgt_vocab;
    let bias = Tensor::from_vec(ban_list(v, opts), (1, v), &dev)?;
    let bias_first = Tensor::from_vec(ban_list_first(v, opts), (1, v), &dev)?;
    let mut first = true;
    let mut hyps = vec![Hypothesis::default(); b];
    let mut alive: Vec<usize> = (0..b).collect();
    let mut cur = vec![SOS_ID; b];
    loop {
        let n = alive.len();
        let tok = Tensor::from_vec(cur.clone(), (n, 1), &dev)?;
        let logp = model
            .decode_step(&ctx, &mut cache, &tok, &sm)?
            .broadcast_add(if first { &bias_first } else { &bias })?;
        first = false;
        let (next, lp) = pick(&logp, &alive)?;
        let mut keep = Vec::with_capacity(n);
        for (r, &i) in alive.iter().enumerate() {
            let h = &mut hyps[i];
            h.score += lp[r] as f64;
            if next[r] == EOS_ID {
                h.finished = true;
                continue;
            }
            h.tokens.push(next[r]);
            if h.tokens.len() < limits[i] {
                keep.push(r);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < n {
            let idx = row_index(&keep, &dev)?;
            cache.select(&idx)?;
            sm = sm.index_select(&idx, 0)?;
        }
        cur = keep.iter().map(|&r| next[r]).collect();
        alive = keep.iter().map(|&r| alive[r]).collect();
    }
    for h in &mut hyps {
        h.norm_score = h.score / length_penalty(h.tokens.len() + h.finished as usize, opts.alpha);
    }
    Ok(hyps)
}

/// Reference greedy decoding WITHOUT the cache (the tutorial's way: the decoder re-runs the
/// whole prefix every step). For tests of the cached paths.
pub fn greedy_uncached(
    model: &Transformer,
    ac: &Autocast,
    src: &[u32],
    max_len: usize,
    opts: &DecodeOptions,
) -> Result<Hypothesis> {
    let dev = model.device().clone();
    let limit = clamp_limits(model, &[max_len])[0];
    let ctx = Ctx::eval(ac);
    let src_t = pad_sources(&[src.to_vec()], &dev)?;
    let sm = model::src_mask(&src_t)?;
    let memory = model.encode(&ctx, &src_t, &sm)?;
    let (bias, bias_first) = (
        ban_list(model.cfg.tgt_vocab, opts),
        ban_list_first(model.cfg.tgt_vocab, opts),
    );
    let mut prefix = vec![SOS_ID];
    let mut h = Hypothesis::default();
    loop {
        let t = prefix.len();
        let tgt = Tensor::from_vec(prefix.clone(), (1, t), &dev)?;
        let x = model.decode(&ctx, &memory, &sm, &tgt, &model::tgt_mask(&tgt)?)?;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let logp: Vec<f32> = crate::ops::log_softmax(&model.project(&ctx, &last)?)?
            .squeeze(0)?
            .to_vec1()?;
        let ban = if t == 1 { &bias_first } else { &bias };
        let (best, lp) = logp.iter().zip(ban).map(|(a, b)| a + b).enumerate().fold(
            (0usize, f32::NEG_INFINITY),
            |acc, (i, v)| {
                if v > acc.1 {
                    (i, v)
                } else {
                    acc
                }
            },
        );
        h.score += lp as f64;
        if best as u32 == EOS_ID {
            h.finished = true;
            break;
        }
        h.tokens.push(best as u32);
        prefix.push(best as u32);
        if h.tokens.len() >= limit {
            break;
        }
    }
    h.norm_score = h.score / length_penalty(h.tokens.len() + h.finished as usize, opts.alpha);
    Ok(h)
}

#[derive(Clone)]
struct Live {
    tokens: Vec<u32>,
    score: f64,
}

struct SentenceBeam {
    /// Alive hypotheses (exactly `k` rows in the batch while the sentence is not done; rows
    /// beyond the real candidates have score -inf).
    live: Vec<Live>,
    finished: Vec<Hypothesis>,
    done: bool,
}

/// The `n` best (value, index) of `row` (descending), ignoring -inf.
fn top_n(row: &[f32], n: usize) -> Vec<(f32, usize)> {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(n + 1);
    for (i, &v) in row.iter().enumerate() {
        if v == f32::NEG_INFINITY || v.is_nan() {
            continue;
        }
        if best.len() == n && v <= best[n - 1].0 {
            continue;
        }
        let pos = best.partition_point(|&(b, _)| b >= v);
        best.insert(pos, (v, i));
        if best.len() > n {
            best.pop();
        }
    }
    best
}

/// Batched beam search with the KV cache. Each sentence keeps `k` alive hypotheses; a candidate
/// that ends in `[EOS]` among the top `k` moves to the finished list (the `k` best are kept until
/// the sentence is done). A sentence is done when it has `k` finished hypotheses and the best
/// alive one cannot beat the worst of them, or at its length limit (where the alive ones
/// compete too). The best finished hypothesis by `norm_score` wins.
pub fn beam_search(
    model: &Transformer,
    ac: &Autocast,
    src: &[Vec<u32>],
    max_len: &[usize],
    opts: &DecodeOptions,
) -> Result<Vec<Hypothesis>> {
    let b = src.len();
    let k = opts.beam_size.max(1);
    if b == 0 {
        return Ok(Vec::new());
    }
    let dev = model.device().clone();
    let limits = clamp_limits(model, max_len);
    let ctx = Ctx::eval(ac);
    let src_t = pad_sources(src, &dev)?;
    let sm1 = model::src_mask(&src_t)?;
    let memory = model.encode(&ctx, &src_t, &sm1)?;
    let mut cache = model.start_decoding(&ctx, &memory)?;
    // k rows per sentence; the cross-attention keys/values are projected once per sentence
    let expand: Vec<usize> = (0..b).flat_map(|i| std::iter::repeat_n(i, k)).collect();
    let idx = row_index(&expand, &dev)?;
    cache.select(&idx)?;
    let mut sm = sm1.index_select(&idx, 0)?;
    let bias = ban_list(model.cfg.tgt_vocab, opts);
    let bias_first = ban_list_first(model.cfg.tgt_vocab, opts);
    let mut beams: Vec<SentenceBeam> = (0..b)
        .map(|_| SentenceBeam {
            live: (0..k)
                .map(|j| Live {
                    tokens: Vec::new(),
                    score: if j == 0 { 0.0 } else { f64::NEG_INFINITY },
                })
                .collect(),
            finished: Vec::new(),
            done: false,
        })
        .collect();
    // sentences with rows in the batch, in row order (k rows each)
    let mut alive: Vec<usize> = (0..b).collect();
    loop {
        let cur: Vec<u32> = alive
            .iter()
            .flat_map(|&s| {
                beams[s]
                    .live
                    .iter()
                    .map(|l| l.tokens.last().copied().unwrap_or(SOS_ID))
            })
            .collect();
        let rows = cur.len();
        let tok = Tensor::from_vec(cur, (rows, 1), &dev)?;
        let logp = model.decode_step(&ctx, &mut cache, &tok, &sm)?;
        let logp: Vec<Vec<f32>> = logp.to_dtype(DType::F32)?.to_vec2()?;
        let mut parents: Vec<usize> = Vec::with_capacity(rows);
        let mut next_alive = Vec::with_capacity(alive.len());
        for (a, &s) in alive.iter().enumerate() {
            let beam = &mut beams[s];
            // candidates over the k rows: (total score, row j, token)
            let mut cands: Vec<(f64, usize, u32)> = Vec::with_capacity(2 * k * k);
            for (j, l) in beam.live.iter().enumerate() {
                if l.score == f64::NEG_INFINITY {
                    continue;
                }
                let ban = if l.tokens.is_empty() {
                    &bias_first
                } else {
                    &bias
                };
                let row: Vec<f32> = logp[a * k + j]
                    .iter()
                    .zip(ban)
                    .map(|(x, y)| x + y)
                    .collect();
                for (v, t) in top_n(&row, 2 * k) {
                    cands.push((l.score + v as f64, j, t as u32));
                }
            }
            cands.sort_by(|x, y| y.0.total_cmp(&x.0));
            cands.truncate(2 * k);
            let mut next: Vec<(usize, Live)> = Vec::with_capacity(k);
            for (rank, &(score, j, t)) in cands.iter().enumerate() {
                if t == EOS_ID {
                    if rank < k {
                        let tokens = beam.live[j].tokens.clone();
                        let norm = score / length_penalty(tokens.len() + 1, opts.alpha);
                        beam.finished.push(Hypothesis {
                            tokens,
                            score,
                            norm_score: norm,
                            finished: true,
                        });
                    }
                    continue;
                }
                let mut tokens = beam.live[j].tokens.clone();
                tokens.push(t);
                next.push((j, Live { tokens, score }));
                if next.len() == k {
                    break;
                }
            }
            let at_limit = next
                .first()
                .is_some_and(|(_, l)| l.tokens.len() >= limits[s]);
            // keep the k best finished; done when no alive hypothesis can still enter them.
            // With alpha = 0 the bound is exact (log-probs only lower a score); with alpha > 0
            // it uses the current length (the usual heuristic).
            beam.finished
                .sort_by(|x, y| y.norm_score.total_cmp(&x.norm_score));
            beam.finished.truncate(k);
            let settled = beam.finished.len() >= k
                && next.first().is_none_or(|(_, l)| {
                    let best_possible = l.score / length_penalty(l.tokens.len(), opts.alpha);
                    best_possible < beam.finished[k - 1].norm_score
                });
            if settled || next.is_empty() || at_limit {
                if at_limit {
                    for (_, l) in &next {
                        beam.finished.push(Hypothesis {
                            tokens: l.tokens.clone(),
                            score: l.score,
                            norm_score: l.score / length_penalty(l.tokens.len(), opts.alpha),
                            finished: false,
                        });
                    }
                }
                beam.done = true;
                beam.live.clear();
                continue;
            }
            // fill up to k rows (only when the vocabulary leaves fewer candidates)
            while next.len() < k {
                let (j, mut l) = next[next.len() - 1].clone();
                l.score = f64::NEG_INFINITY;
                next.push((j, l));
            }
            for (j, _) in &next {
                parents.push(a * k + j);
            }
            beam.live = next.into_iter().map(|(_, l)| l).collect();
            next_alive.push(s);
        }
        if next_alive.is_empty() {
            break;
        }
        let idx = row_index(&parents, &dev)?;
        cache.select(&idx)?;
        sm = sm.index_select(&idx, 0)?;
        alive = next_alive;
    }
    Ok(beams
        .into_iter()
        .map(|beam| {
            beam.finished
                .into_iter()
                .max_by(|x, y| x.norm_score.total_cmp(&y.norm_score))
                .unwrap_or_default()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_is_sorted_and_skips_banned() {
        let row = [0.1f32, f32::NEG_INFINITY, 0.5, 0.3, 0.5, -1.0];
        let t = top_n(&row, 3);
        assert_eq!(t.iter().map(|x| x.1).collect::<Vec<_>>(), vec![2, 4, 3]);
        assert_eq!(top_n(&row, 10).len(), 5);
    }

    #[test]
    fn length_penalty_is_gnmt() {
        assert_eq!(length_penalty(1, 0.0), 1.0);
        assert!((length_penalty(7, 1.0) - 2.0).abs() < 1e-12);
        assert!(length_penalty(20, 0.6) > length_penalty(10, 0.6));
    }
}
