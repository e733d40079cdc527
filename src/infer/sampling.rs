//! Sampled decoding (temperature, top-p) for every model kind, through candle-transformers'
//! `generation::LogitsProcessor`, so ampserve models and pretrained Marian models sample the
//! same way. Deterministic decoding (greedy / beam) stays in `crate::generation`, whose
//! token-at-a-time loop this file reuses for the sampled variant of greedy: one token per step
//! drawn from the (temperature-scaled, top-p truncated) distribution, one seeded generator per
//! sentence so a sentence's output depends on its seed and the model only, not on which other
//! requests shared its batch.

use crate::amp::Autocast;
use crate::generation::{DecodeOptions, Hypothesis};
use crate::model::Transformer;
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
    let mut procs: Vec<LogitsProcessor> = sampling.iter().map(Sampling::processor).collect();
    crate::generation::step_by_step(model, ac, src, max_len, opts, |logp, alive| {
        let logp = logp.to_dtype(DType::F32)?;
        let mut next = Vec::with_capacity(alive.len());
        let mut lp = Vec::with_capacity(alive.len());
        for (r, &i) in alive.iter().enumerate() {
            let row = logp.get(r)?;
            let t = draw(&mut procs[i], &row)?;
            next.push(t);
            lp.push(row.get(t as usize)?.to_scalar::<f32>()?);
        }
        Ok((next, lp))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{EOS_ID, SOS_ID};

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
