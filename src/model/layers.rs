//! The Transformer's building blocks: layer norm, multi-head attention with its KV cache,
//! the ReLU feed-forward, the residual, the encoder and decoder layers, the decoder caches.
//! Shapes in comments: (batch, heads, len, d_k).

use super::ctx::Ctx;
use super::params::Params;
use super::Config;
use crate::ops;
use candle_core::{DType, Result, Tensor, D};

pub(super) struct LayerNorm {
    pub(super) alpha: Tensor,
    pub(super) beta: Tensor,
    pub(super) eps: f64,
    pub(super) tutorial: bool,
}

impl LayerNorm {
    pub(super) fn new(p: &mut Params, name: &str, d: usize, cfg: &Config) -> Result<Self> {
        Ok(Self {
            alpha: p.constant(format!("{name}.alpha"), d, 1.0)?,
            beta: p.constant(format!("{name}.bias"), d, 0.0)?,
            eps: cfg.norm_eps,
            tutorial: cfg.tutorial_layer_norm,
        })
    }

    /// f32 in (the residual stream), f32 out (the final norms).
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, DType::F32)
    }

    /// f32 in, `out` out: a sublayer's input is normalised straight into the compute dtype, so
    /// its Q/K/V (or FFN) projections need no cast of their own (the same values as an f32 norm
    /// cast afterwards, without three cast nodes per attention).
    pub(super) fn forward_as(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        ops::layer_norm(x, &self.alpha, &self.beta, self.eps, self.tutorial, out)
    }
}

pub(super) struct Attention {
    pub(super) wq: Tensor,
    pub(super) wk: Tensor,
    pub(super) wv: Tensor,
    pub(super) wo: Tensor,
    pub(super) heads: usize,
    pub(super) d_k: usize,
}

/// Cached keys and values of one attention layer: (batch, heads, len, d_k).
#[derive(Clone)]
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
}

impl Attention {
    pub(super) fn new(p: &mut Params, name: &str, cfg: &Config) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            wq: p.xavier(format!("{name}.w_q"), d, d)?,
            wk: p.xavier(format!("{name}.w_k"), d, d)?,
            wv: p.xavier(format!("{name}.w_v"), d, d)?,
            wo: p.xavier(format!("{name}.w_o"), d, d)?,
            heads: cfg.heads,
            d_k: d / cfg.heads,
        })
    }

    /// (b, t, d) -> (b, h, t, d_k)
    pub(super) fn split(&self, x: &Tensor) -> Result<Tensor> {
        ops::split_heads(x, self.heads)
    }

    pub(super) fn project_kv(&self, ctx: &Ctx, kv: &Tensor) -> Result<KvCache> {
        Ok(KvCache {
            k: self.split(&ctx.ac.linear(kv, &self.wk, None)?)?,
            v: self.split(&ctx.ac.linear(kv, &self.wv, None)?)?,
        })
    }

    /// q_in: (b, tq, d) f32; keys/values from `kv`; mask additive f32 (b, 1, 1|tq, tk).
    /// Returns (b, tq, d) in the compute dtype.
    pub(super) fn forward_kv(
        &self,
        ctx: &Ctx,
        q_in: &Tensor,
        kv: &KvCache,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let q = self.split(&ctx.ac.linear(q_in, &self.wq, None)?)?;
        // (b, h, tq, tk) in the compute dtype
        let kt = kv.k.t()?;
        crate::counters::candle_node(&kv.k, &kt, crate::counters::NodeCost::VIEW);
        let scores = ctx.ac.matmul(&q, &kt)?;
        // softmax and attention dropout in one pass
        let m = ctx.mask(scores.elem_count());
        let probs = ops::masked_softmax(
            &scores,
            mask,
            1.0 / (self.d_k as f64).sqrt(),
            ctx.ac.compute_dtype(),
            m.as_ref(),
        )?;
        // (b, h, tq, d_k)
        let out = ctx.ac.matmul(&probs, &kv.v)?;
        // (b, tq, d)
        let merged = ops::merge_heads(&out)?;
        ctx.ac.linear(&merged, &self.wo, None)
    }

    pub(super) fn forward(
        &self,
        ctx: &Ctx,
        q_in: &Tensor,
        kv_in: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let kv = self.project_kv(ctx, kv_in)?;
        self.forward_kv(ctx, q_in, &kv, mask)
    }
}

pub(super) struct FeedForward {
    pub(super) w1: Tensor,
    pub(super) b1: Tensor,
    pub(super) w2: Tensor,
    pub(super) b2: Tensor,
}

impl FeedForward {
    pub(super) fn new(p: &mut Params, name: &str, cfg: &Config) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(Self {
            w1: p.xavier(format!("{name}.linear_1.weight"), f, d)?,
            b1: p.bias(format!("{name}.linear_1.bias"), f, d)?,
            w2: p.xavier(format!("{name}.linear_2.weight"), d, f)?,
            b2: p.bias(format!("{name}.linear_2.bias"), d, f)?,
        })
    }

    pub(super) fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        // dropout(relu(x @ w1.T + b1)) as one fused epilogue after the matmul
        let n = x.elem_count() / x.dim(D::Minus1)? * self.w1.dim(0)?;
        let m = ctx.mask(n);
        let h = ctx
            .ac
            .linear_act(x, &self.w1, Some(&self.b1), true, m.as_ref())?;
        ctx.ac.linear(&h, &self.w2, Some(&self.b2))
    }
}

/// `x + dropout(sublayer_out)` with the residual stream kept in f32 (one fused op).
pub(super) fn residual(ctx: &Ctx, x: &Tensor, sub: &Tensor) -> Result<Tensor> {
    ops::residual_dropout(x, sub, ctx.mask(sub.elem_count()).as_ref())
}

pub(super) struct EncoderLayer {
    pub(super) norm1: LayerNorm,
    pub(super) attn: Attention,
    pub(super) norm2: LayerNorm,
    pub(super) ffn: FeedForward,
}

pub(super) struct DecoderLayer {
    pub(super) norm1: LayerNorm,
    pub(super) self_attn: Attention,
    pub(super) norm2: LayerNorm,
    pub(super) cross_attn: Attention,
    pub(super) norm3: LayerNorm,
    pub(super) ffn: FeedForward,
}

/// Per-layer decoder caches for incremental decoding.
pub struct DecoderCache {
    /// Self-attention keys/values of the tokens decoded so far, per layer.
    pub self_kv: Vec<Option<KvCache>>,
    /// Cross-attention keys/values of the encoder output, per layer (computed once).
    pub cross_kv: Vec<KvCache>,
    pub len: usize,
}

impl DecoderCache {
    /// Keep and reorder rows (batch entries) of every cached tensor: row `i` of the result is
    /// row `idx[i]` of the cache. Beam search reorders hypotheses with it; batched decoding
    /// drops finished sentences with it.
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        for kv in self.self_kv.iter_mut().flatten() {
            kv.k = kv.k.index_select(idx, 0)?;
            kv.v = kv.v.index_select(idx, 0)?;
        }
        for kv in &mut self.cross_kv {
            kv.k = kv.k.index_select(idx, 0)?;
            kv.v = kv.v.index_select(idx, 0)?;
        }
        Ok(())
    }
}
