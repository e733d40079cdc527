//! Sampled decoding (temperature, top-p) for every model kind, through candle-transformers'
//! `generation::LogitsProcessor`, so ampserve models and pretrained Marian models sample the
//! same way. Deterministic decoding (greedy / beam) stays in `decode`; this file only adds the
//! sampled variant of greedy: one token per step drawn from the (temperature-scaled, top-p
//! truncated) distribution, one seeded generator per sentence so a sentence's output depends on
//! its seed and the model only, not on which other requests shared its batch.

use crate::amp::Autocast;
use crate::data::{EOS_ID, PAD_ID, SOS_ID, UNK_ID};
use crate::generation::{length_penalty, DecodeOptions, Hypothesis};
use crate::model::{self, Ctx, Transformer};
use candle_core::{DType, Result, Tensor};
use candle_transformers::generation::LogitsProcessor;

/// Largest temperature a request may ask for.
pub const MAX_TEMPERATURE: f64 = 10.0;

/// Sampling settings of one sentence (a request's seed is offset by the sentence's index, so
/// the sentences of one request do not share a random stream).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// > 0 (0 means deterministic decoding and is never stored here).
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to `top_p`
    /// (`None`: the whole distribution).
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    /// The settings of the `index`-th sentence of a request.
    pub fn for_sentence(&self, index: usize) -> Self {
        Self {
            seed: self.seed.wrapping_add(index as u64),
            ..*self
        }
    }

    /// Requests whose sentences may share one decode call (same distribution shaping).
    pub fn same_shape(a: Option<&Self>, b: Option<&Self>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.temperature.to_bits() == b.temperature.to_bits()
                    && a.top_p.map(f64::to_bits) == b.top_p.map(f64::to_bits)
            }
            _ => false,
        }
    }

    pub fn processor(&self) -> LogitsProcessor {
        LogitsProcessor::new(self.seed, Some(self.temperature), self.top_p)
    }
}

/// Draw one token from a row of logits (or log-probabilities: the softmax is the same).
pub fn draw(p: &mut LogitsProcessor, row: &Tensor) -> Result<u32> {
    p.sample(&row.to_dtype(DType::F32)?)
}

/// Batched sampled decoding of an ampserve [`Transformer`] with the KV cache: like
/// [`crate::generation::greedy`] (same banned ids, no `[EOS]` first, per-sentence limits), but each
/// sentence draws its next token with its own [`LogitsProcessor`]. `src` are framed sources
/// (`[SOS] words [EOS]`); `score` is the model's log-probability of the drawn tokens (at
/// temperature 1).
pub fn sample_transformer(
    model: &Transformer,
    ac: &Autocast,
    src: &[Vec<u32>],
    max_len: &[usize],
    opts: &DecodeOptions,
    sampling: &[Sampling],
) -> Result<Vec<Hypothesis>> {
    let b = src.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let dev = model.device().clone();
    let cap = model.cfg.max_positions.saturating_sub(1).max(1);
    let limits: Vec<usize> = max_len.iter().map(|&m| m.clamp(1, cap)).collect();
    let mut procs: Vec<LogitsProcessor> = sampling.iter().map(Sampling::processor).collect();
    let ctx = Ctx::eval(ac);
    let src_t = crate::generation::pad_sources(src, &dev)?;
    let mut sm = model::src_mask(&src_t)?;
    let memory = model.encode(&ctx, &src_t, &sm)?;
    let mut cache = model.start_decoding(&ctx, &memory)?;
    let v = model.cfg.tgt_vocab;
    let bias = Tensor::from_vec(banned(v, opts, false), (1, v), &dev)?;
    let bias_first = Tensor::from_vec(banned(v, opts, true), (1, v), &dev)?;
    let mut first = true;
    let mut hyps = vec![Hypothesis::default(); b];
    let mut alive: Vec<usize> = (0..b).collect();
    let mut cur = vec![SOS_ID; b];
    loop {
        let n = alive.len();
        let tok = Tensor::from_vec(cur.clone(), (n, 1), &dev)?;
        let logp = model
            .decode_step(&ctx, &mut cache, &tok, &sm)?
            .broadcast_add(if first { &bias_first } else { &bias })?
            .to_dtype(DType::F32)?;
        first = false;
        let mut keep = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        for (r, &i) in alive.iter().enumerate() {
            let row = logp.get(r)?;
            let t = draw(&mut procs[i], &row)?;
            next.push(t);
            let h = &mut hyps[i];
            h.score += row.get(t as usize)?.to_scalar::<f32>()? as f64;
            if t == EOS_ID {
                h.finished = true;
                continue;
            }
            h.tokens.push(t);
            if h.tokens.len() < limits[i] {
                keep.push(r);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < n {
            let idx: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
            let idx = Tensor::from_vec(idx, keep.len(), &dev)?;
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

/// Additive bias over the vocabulary: -inf for the ids deterministic decoding never emits
/// either (`[PAD]`, `[SOS]`, `[UNK]` unless allowed, `[EOS]` first or when ignored).
fn banned(v: usize, opts: &DecodeOptions, first: bool) -> Vec<f32> {
    let mut bias = vec![0f32; v];
    let mut ban = vec![PAD_ID, SOS_ID];
    if opts.ban_unk {
        ban.push(UNK_ID);
    }
    if opts.ignore_eos || first {
        ban.push(EOS_ID);
    }
    for id in ban {
        if (id as usize) < v {
            bias[id as usize] = f32::NEG_INFINITY;
        }
    }
    bias
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentence_seed_is_the_request_seed_offset_by_its_index() {
        let s = Sampling {
            temperature: 0.8,
            top_p: Some(0.9),
            seed: u64::MAX,
        };
        assert_eq!(s.for_sentence(0).seed, u64::MAX);
        assert_eq!(s.for_sentence(2).seed, 1);
        assert_eq!(s.for_sentence(2).temperature, 0.8);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_top_p_keeps_the_likeliest() {
        let logits = Tensor::new(&[0.0f32, 3.0, 1.0, 2.5], &candle_core::Device::Cpu).unwrap();
        let s = Sampling {
            temperature: 1.0,
            top_p: None,
            seed: 7,
        };
        let draws = |s: Sampling| {
            let mut p = s.processor();
            (0..32)
                .map(|_| draw(&mut p, &logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(s), draws(s));
        // a nucleus of 0.5 holds the single likeliest token (p ≈ 0.55)
        let only = draws(Sampling {
            top_p: Some(0.5),
            ..s
        });
        assert!(only.iter().all(|&t| t == 1), "{only:?}");
    }

    fn tiny_model() -> Transformer {
        let cfg = crate::model::Config {
            src_vocab: 24,
            tgt_vocab: 24,
            d_model: 16,
            layers: 1,
            heads: 2,
            d_ff: 32,
            dropout: 0.0,
            tutorial_layer_norm: true,
            norm_eps: 1e-6,
            max_positions: 32,
            tie_embeddings: false,
        };
        Transformer::new(&cfg, 3, &candle_core::Device::Cpu).unwrap()
    }

    fn sources() -> Vec<Vec<u32>> {
        vec![
            vec![SOS_ID, 5, 9, 11, EOS_ID],
            vec![SOS_ID, 7, 8, EOS_ID],
            vec![SOS_ID, 12, 13, 14, 15, 16, EOS_ID],
        ]
    }

    #[test]
    fn a_vanishing_nucleus_decodes_exactly_as_batched_greedy() {
        let model = tiny_model();
        let ac = Autocast::new(crate::config::Precision::Fp32);
        let opts = DecodeOptions::default();
        let limits = [8, 8, 8];
        let greedy = crate::generation::greedy(&model, &ac, &sources(), &limits, &opts).unwrap();
        let s: Vec<Sampling> = (0..3)
            .map(|i| Sampling {
                temperature: 1.0,
                top_p: Some(1e-6),
                seed: i,
            })
            .collect();
        let sampled = sample_transformer(&model, &ac, &sources(), &limits, &opts, &s).unwrap();
        for (g, h) in greedy.iter().zip(&sampled) {
            assert_eq!(g.tokens, h.tokens);
            assert!(
                (g.score - h.score).abs() < 1e-4,
                "{} vs {}",
                g.score,
                h.score
            );
        }
    }

    #[test]
    fn a_sampled_sentence_depends_on_its_seed_not_on_its_batch() {
        let model = tiny_model();
        let ac = Autocast::new(crate::config::Precision::Fp32);
        let opts = DecodeOptions::default();
        let s = |seed| Sampling {
            temperature: 1.5,
            top_p: None,
            seed,
        };
        let batch = sample_transformer(
            &model,
            &ac,
            &sources(),
            &[10; 3],
            &opts,
            &[s(1), s(2), s(3)],
        )
        .unwrap();
        let alone =
            sample_transformer(&model, &ac, &sources()[1..2], &[10], &opts, &[s(2)]).unwrap();
        assert_eq!(batch[1].tokens, alone[0].tokens);
        let again = sample_transformer(
            &model,
            &ac,
            &sources(),
            &[10; 3],
            &opts,
            &[s(1), s(2), s(3)],
        )
        .unwrap();
        assert_eq!(batch, again);
    }
}
