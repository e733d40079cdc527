//! The tutorial's encoder-decoder Transformer in candle.
//!
//! d_model / layers / heads / d_ff / dropout from `Config`; sinusoidal positions; embeddings
//! scaled by sqrt(d_model); separate source and target embeddings; pre-norm residuals
//! `x + dropout(sublayer(norm(x)))`; a final norm on both stacks; bias-free Q/K/V/O; ReLU FFN;
//! xavier-uniform init of every matrix; an untied output projection with bias. With
//! `tie_embeddings` (one joint vocabulary) a single matrix `shared_embed.weight` is the source
//! embedding, the target embedding and the output projection's weight (Press & Wolf 2017; what
//! Marian and fairseq do for joint subword vocabularies); the projection keeps its own bias.
//!
//! Mixed precision: linears and attention matmuls go through `Autocast` (compute dtype); the
//! embeddings, layer norms, softmax, the residual stream and the loss are f32.

mod ctx;
mod layers;
mod masks;
mod params;

pub use ctx::Ctx;
pub use layers::{DecoderCache, KvCache};
pub use masks::{src_mask, tgt_mask};
pub use params::Params;

use crate::data::PAD_ID;
use crate::ops;
use candle_core::{DType, Device, Result, Tensor, Var};
use layers::{residual, Attention, DecoderLayer, EncoderLayer, FeedForward, LayerNorm};
use masks::sinusoidal;
use serde::{Deserialize, Serialize};

/// The one weight of a model with tied embeddings: (vocab, d_model).
pub const SHARED_EMBED: &str = "shared_embed.weight";

/// A fill for masked attention scores. Applied after the scores are upcast to f32, so it is
/// representable (the tutorial's -1e9 fill in f16 overflows); finite, so a fully masked row is
/// uniform rather than NaN.
pub const MASK_FILL: f32 = -1e9;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub dropout: f64,
    pub tutorial_layer_norm: bool,
    pub norm_eps: f64,
    /// Rows of the sinusoidal table (longest sequence the model accepts).
    pub max_positions: usize,
    /// One matrix for both embeddings and the output projection (needs src_vocab == tgt_vocab).
    #[serde(default)]
    pub tie_embeddings: bool,
}

impl Config {
    pub fn from_spec(
        m: &crate::config::ModelSpec,
        src_vocab: usize,
        tgt_vocab: usize,
        max_len: usize,
    ) -> Self {
        Self {
            src_vocab,
            tgt_vocab,
            d_model: m.d_model,
            layers: m.layers,
            heads: m.heads,
            d_ff: m.d_ff,
            dropout: m.dropout,
            tutorial_layer_norm: m.tutorial_layer_norm,
            norm_eps: m.norm_eps,
            max_positions: max_len.max(8) + 8,
            tie_embeddings: m.tie_embeddings,
        }
    }
}

pub struct Transformer {
    pub cfg: Config,
    src_emb: Tensor,
    tgt_emb: Tensor,
    pe: Tensor,
    enc: Vec<EncoderLayer>,
    enc_norm: LayerNorm,
    dec: Vec<DecoderLayer>,
    dec_norm: LayerNorm,
    proj_w: Tensor,
    proj_b: Tensor,
    pub params: Vec<(String, Var)>,
}

impl Transformer {
    pub fn new(cfg: &Config, seed: u64, device: &Device) -> Result<Self> {
        let mut p = Params::new(seed, device);
        let d = cfg.d_model;
        if cfg.tie_embeddings && cfg.src_vocab != cfg.tgt_vocab {
            candle_core::bail!(
                "tied embeddings need one vocabulary; got source {} and target {}",
                cfg.src_vocab,
                cfg.tgt_vocab
            );
        }
        let (src_emb, tgt_emb) = if cfg.tie_embeddings {
            let e = p.xavier(SHARED_EMBED.into(), cfg.tgt_vocab, d)?;
            (e.clone(), e)
        } else {
            (
                p.xavier("src_embed.weight".into(), cfg.src_vocab, d)?,
                p.xavier("tgt_embed.weight".into(), cfg.tgt_vocab, d)?,
            )
        };
        let mut enc = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let n = format!("encoder.layers.{i}");
            enc.push(EncoderLayer {
                norm1: LayerNorm::new(&mut p, &format!("{n}.norm1"), d, cfg)?,
                attn: Attention::new(&mut p, &format!("{n}.self_attn"), cfg)?,
                norm2: LayerNorm::new(&mut p, &format!("{n}.norm2"), d, cfg)?,
                ffn: FeedForward::new(&mut p, &format!("{n}.ffn"), cfg)?,
            });
        }
        let enc_norm = LayerNorm::new(&mut p, "encoder.norm", d, cfg)?;
        let mut dec = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let n = format!("decoder.layers.{i}");
            dec.push(DecoderLayer {
                norm1: LayerNorm::new(&mut p, &format!("{n}.norm1"), d, cfg)?,
                self_attn: Attention::new(&mut p, &format!("{n}.self_attn"), cfg)?,
                norm2: LayerNorm::new(&mut p, &format!("{n}.norm2"), d, cfg)?,
                cross_attn: Attention::new(&mut p, &format!("{n}.cross_attn"), cfg)?,
                norm3: LayerNorm::new(&mut p, &format!("{n}.norm3"), d, cfg)?,
                ffn: FeedForward::new(&mut p, &format!("{n}.ffn"), cfg)?,
            });
        }
        let dec_norm = LayerNorm::new(&mut p, "decoder.norm", d, cfg)?;
        let proj_w = if cfg.tie_embeddings {
            tgt_emb.clone()
        } else {
            p.xavier("projection.weight".into(), cfg.tgt_vocab, d)?
        };
        let proj_b = p.bias("projection.bias".into(), cfg.tgt_vocab, d)?;
        let pe = sinusoidal(cfg.max_positions, d, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            src_emb,
            tgt_emb,
            pe,
            enc,
            enc_norm,
            dec,
            dec_norm,
            proj_w,
            proj_b,
            params: p.vars,
        })
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn device(&self) -> &Device {
        self.src_emb.device()
    }

    /// Token embeddings (f32) * sqrt(d_model) + positions from `offset`, then dropout.
    fn embed(&self, ctx: &Ctx, emb: &Tensor, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if offset + t > self.cfg.max_positions {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                offset + t,
                self.cfg.max_positions
            );
        }
        let x = ops::embed(
            emb,
            ids,
            &self.pe.narrow(0, offset, t)?,
            (self.cfg.d_model as f64).sqrt(),
        )?;
        ctx.drop(&x)
    }

    /// Encoder: src (b, s) u32 -> memory (b, s, d) f32.
    pub fn encode(&self, ctx: &Ctx, src: &Tensor, src_mask: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(ctx, &self.src_emb, src, 0)?;
        ctx.watch(|| "encoder.embed".into(), &x)?;
        for (i, l) in self.enc.iter().enumerate() {
            let h = l.norm1.forward_as(&x, ctx.ac.compute_dtype())?;
            let a = l.attn.forward(ctx, &h, &h, src_mask)?;
            ctx.watch(|| format!("encoder.layers.{i}.self_attn"), &a)?;
            x = residual(ctx, &x, &a)?;
            let h = l.norm2.forward_as(&x, ctx.ac.compute_dtype())?;
            let f = l.ffn.forward(ctx, &h)?;
            ctx.watch(|| format!("encoder.layers.{i}.ffn"), &f)?;
            x = residual(ctx, &x, &f)?;
            ctx.watch(|| format!("encoder.layers.{i}.residual"), &x)?;
        }
        self.enc_norm.forward(&x)
    }

    /// Decoder over a whole target prefix (training / reference decoding): (b, t, d) f32.
    pub fn decode(
        &self,
        ctx: &Ctx,
        memory: &Tensor,
        src_mask: &Tensor,
        tgt: &Tensor,
        tgt_mask: &Tensor,
    ) -> Result<Tensor> {
        // the memory feeds only the cross-attention projections: cast it once, not per layer
        let memory = &ctx.ac.act(memory)?;
        let mut x = self.embed(ctx, &self.tgt_emb, tgt, 0)?;
        ctx.watch(|| "decoder.embed".into(), &x)?;
        for (i, l) in self.dec.iter().enumerate() {
            let h = l.norm1.forward_as(&x, ctx.ac.compute_dtype())?;
            let a = l.self_attn.forward(ctx, &h, &h, tgt_mask)?;
            ctx.watch(|| format!("decoder.layers.{i}.self_attn"), &a)?;
            x = residual(ctx, &x, &a)?;
            let h = l.norm2.forward_as(&x, ctx.ac.compute_dtype())?;
            let c = l.cross_attn.forward(ctx, &h, memory, src_mask)?;
            ctx.watch(|| format!("decoder.layers.{i}.cross_attn"), &c)?;
            x = residual(ctx, &x, &c)?;
            let h = l.norm3.forward_as(&x, ctx.ac.compute_dtype())?;
            let f = l.ffn.forward(ctx, &h)?;
            ctx.watch(|| format!("decoder.layers.{i}.ffn"), &f)?;
            x = residual(ctx, &x, &f)?;
            ctx.watch(|| format!("decoder.layers.{i}.residual"), &x)?;
        }
        self.dec_norm.forward(&x)
    }

    /// Logits in the compute dtype: (..., tgt_vocab).
    pub fn project(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let logits = ctx.ac.linear(x, &self.proj_w, Some(&self.proj_b))?;
        ctx.watch(|| "decoder.proj".into(), &logits)?;
        Ok(logits)
    }

    /// Full forward: logits (b, t, V) in the compute dtype.
    pub fn forward_t(&self, ctx: &Ctx, src: &Tensor, tgt_in: &Tensor) -> Result<Tensor> {
        let sm = src_mask(src)?;
        let tm = tgt_mask(tgt_in)?;
        let memory = self.encode(ctx, src, &sm)?;
        let h = self.decode(ctx, &memory, &sm, tgt_in, &tm)?;
        self.project(ctx, &h)
    }

    /// Label-smoothed cross-entropy (f32 scalar) of a batch over its non-PAD labels. Only the
    /// decoder rows that have a label are projected and scored: the output projection is the
    /// largest matmul of a small model, and PAD rows would add nothing to the loss or the
    /// gradients.
    pub fn loss(
        &self,
        ctx: &Ctx,
        src: &Tensor,
        tgt_in: &Tensor,
        labels: &crate::data::Labels,
        label_smoothing: f64,
    ) -> Result<Tensor> {
        let sm = src_mask(src)?;
        let tm = tgt_mask(tgt_in)?;
        let memory = self.encode(ctx, src, &sm)?;
        let h = self.decode(ctx, &memory, &sm, tgt_in, &tm)?;
        let flat = h.reshape(((), self.cfg.d_model))?;
        crate::counters::candle_node(&h, &flat, crate::counters::NodeCost::VIEW);
        let rows = flat.index_select(&labels.rows, 0)?;
        crate::counters::candle_node(&flat, &rows, crate::counters::NodeCost::GATHER);
        let logits = self.project(ctx, &rows)?;
        ops::cross_entropy_ls(&logits, &labels.ids, PAD_ID, label_smoothing)
    }

    /// Start incremental decoding: cross-attention keys/values computed once per layer.
    pub fn start_decoding(&self, ctx: &Ctx, memory: &Tensor) -> Result<DecoderCache> {
        let cross_kv = self
            .dec
            .iter()
            .map(|l| l.cross_attn.project_kv(ctx, memory))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderCache {
            self_kv: vec![None; self.dec.len()],
            cross_kv,
            len: 0,
        })
    }

    /// One incremental step: the newest tokens (b, 1) -> log-probs (b, V) f32. Keys/values of
    /// earlier positions come from the cache (no re-run of the prefix).
    pub fn decode_step(
        &self,
        ctx: &Ctx,
        cache: &mut DecoderCache,
        tokens: &Tensor,
        src_mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, _) = tokens.dims2()?;
        let mut x = self.embed(ctx, &self.tgt_emb, tokens, cache.len)?;
        let self_mask = Tensor::zeros((b, 1, 1, cache.len + 1), DType::F32, x.device())?;
        for (i, l) in self.dec.iter().enumerate() {
            let h = l.norm1.forward_as(&x, ctx.ac.compute_dtype())?;
            let new = l.self_attn.project_kv(ctx, &h)?;
            let kv = match &cache.self_kv[i] {
                Some(old) => KvCache {
                    k: Tensor::cat(&[&old.k, &new.k], 2)?,
                    v: Tensor::cat(&[&old.v, &new.v], 2)?,
                },
                None => new,
            };
            let a = l.self_attn.forward_kv(ctx, &h, &kv, &self_mask)?;
            cache.self_kv[i] = Some(kv);
            x = residual(ctx, &x, &a)?;
            let h = l.norm2.forward_as(&x, ctx.ac.compute_dtype())?;
            x = residual(
                ctx,
                &x,
                &l.cross_attn
                    .forward_kv(ctx, &h, &cache.cross_kv[i], src_mask)?,
            )?;
            let h = l.norm3.forward_as(&x, ctx.ac.compute_dtype())?;
            x = residual(ctx, &x, &l.ffn.forward(ctx, &h)?)?;
        }
        cache.len += 1;
        let h = self.dec_norm.forward(&x)?;
        let logits = self.project(ctx, &h.squeeze(1)?)?;
        ops::log_softmax(&logits)
    }

    /// Map of master weights by name (for checkpoints and export).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Overwrite the master weights from a name -> tensor map (shapes must match).
    pub fn load_named(&self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        for (n, v) in &self.params {
            let t =
                get(n).ok_or_else(|| candle_core::Error::Msg(format!("missing weight `{n}`")))?;
            if t.dims() != v.dims() {
                candle_core::bail!(
                    "weight `{n}`: shape {:?}, expected {:?}",
                    t.dims(),
                    v.dims()
                );
            }
            v.set(&t.to_dtype(DType::F32)?.to_device(v.device())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amp::Autocast;
    use crate::config::Precision;
    use candle_core::D;

    fn tiny() -> Config {
        Config {
            src_vocab: 50,
            tgt_vocab: 40,
            d_model: 16,
            layers: 2,
            heads: 2,
            d_ff: 32,
            dropout: 0.1,
            tutorial_layer_norm: true,
            norm_eps: 1e-6,
            max_positions: 32,
            tie_embeddings: false,
        }
    }

    fn batch(dev: &Device) -> (Tensor, Tensor, crate::data::Labels) {
        // second sentence padded; PAD = 1
        let src = Tensor::new(&[[2u32, 5, 6, 7, 3], [2, 8, 3, 1, 1]], dev).unwrap();
        let tin = Tensor::new(&[[2u32, 9, 10, 11], [2, 12, 1, 1]], dev).unwrap();
        // labels [[9, 10, 11, 3], [12, 3, PAD, PAD]] without their padding
        let labels = crate::data::Labels {
            rows: Tensor::new(&[0u32, 1, 2, 3, 4, 5], dev).unwrap(),
            ids: Tensor::new(&[9u32, 10, 11, 3, 12, 3], dev).unwrap(),
        };
        (src, tin, labels)
    }

    #[test]
    fn the_loss_on_the_labelled_rows_equals_the_padded_loss_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for p in [Precision::Fp32, Precision::Bf16] {
            let m = Transformer::new(&tiny(), 3, &dev)?;
            let ac = Autocast::new(p);
            let (src, tin, labels) = batch(&dev);
            let run = |loss: &dyn Fn(&Ctx) -> Result<Tensor>| -> Result<(f32, Vec<Tensor>)> {
                let ctx = Ctx::new(&ac, true, 0.1, ops::step_seed(5, 2));
                let l = loss(&ctx)?;
                let g = l.backward()?;
                let grads = m
                    .params
                    .iter()
                    .map(|(_, v)| ac.grad_of(v, &g).map(|g| g.unwrap()))
                    .collect::<Result<Vec<_>>>()?;
                Ok((l.to_scalar::<f32>()?, grads))
            };
            let (gathered, g1) = run(&|ctx| m.loss(ctx, &src, &tin, &labels, 0.1))?;
            // every position projected, PAD labels ignored by the cross-entropy
            let tout = Tensor::new(&[[9u32, 10, 11, 3], [12, 3, 1, 1]], &dev)?;
            let (padded, g2) = run(&|ctx| {
                let out = m.forward_t(ctx, &src, &tin)?;
                let v = out.dim(D::Minus1)?;
                ops::cross_entropy_ls(&out.reshape(((), v))?, &tout.flatten_all()?, PAD_ID, 0.1)
            })?;
            assert!(
                (gathered - padded).abs() < 1e-6,
                "{p:?}: {gathered} vs {padded}"
            );
            for ((n, _), (a, b)) in m.params.iter().zip(g1.iter().zip(&g2)) {
                let a = a.to_dtype(DType::F32)?;
                let b = b.to_dtype(DType::F32)?;
                let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                assert!(
                    diff <= 1e-5 * scale,
                    "{p:?} {n}: gradients differ by {diff} (max {scale})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn every_parameter_gets_a_finite_gradient_in_every_precision() -> Result<()> {
        let dev = Device::Cpu;
        for p in [Precision::Fp32, Precision::F16, Precision::Bf16] {
            let m = Transformer::new(&tiny(), 1, &dev)?;
            let ac = Autocast::new(p);
            let ctx = Ctx::new(&ac, true, 0.1, ops::step_seed(1, 1));
            let (src, tin, labels) = batch(&dev);
            let loss = m.loss(&ctx, &src, &tin, &labels, 0.1)?;
            assert_eq!(loss.dtype(), DType::F32);
            let grads = loss.backward()?;
            for (n, v) in &m.params {
                let g = ac
                    .grad_of(v, &grads)?
                    .unwrap_or_else(|| panic!("{p}: no gradient for {n}"));
                let g = &g;
                // f32 for what runs in f32 (embeddings, norms); a matmul weight's gradient in the
                // compute dtype, from its working copy
                assert!(
                    g.dtype() == DType::F32 || g.dtype() == ac.compute_dtype(),
                    "{p}: grad of {n} is {:?}",
                    g.dtype()
                );
                let s = g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                assert!(s.is_finite(), "{p}: {n} grad not finite");
                if !n.contains("embed") {
                    assert!(s > 0.0, "{p}: {n} grad is zero");
                }
            }
            // each master weight cast once per step, not once per use
            if p != Precision::Fp32 {
                let weights = m.params.len();
                assert!(
                    ac.weight_casts() <= weights,
                    "{} casts for {weights} weights",
                    ac.weight_casts()
                );
            }
        }
        Ok(())
    }

    /// The fused kernels give the same loss and gradients as the plain candle compositions.
    #[test]
    fn fused_ops_match_reference_ops_end_to_end() -> Result<()> {
        let dev = Device::Cpu;
        for (p, tol) in [
            (Precision::Fp32, 1e-4f32),
            (Precision::Bf16, 3e-2),
            (Precision::F16, 1e-2),
        ] {
            let m = Transformer::new(&tiny(), 5, &dev)?;
            let run = || -> Result<(f32, Vec<Tensor>)> {
                let ac = Autocast::new(p);
                let ctx = Ctx::new(&ac, true, 0.1, ops::step_seed(3, 9));
                let (src, tin, labels) = batch(&dev);
                let loss = m.loss(&ctx, &src, &tin, &labels, 0.1)?;
                let g = loss.backward()?;
                let grads = m
                    .params
                    .iter()
                    .map(|(_, v)| {
                        ac.grad_of(v, &g)
                            .unwrap()
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap()
                    })
                    .collect();
                Ok((loss.to_scalar::<f32>()?, grads))
            };
            let (lf, gf) = run()?;
            let (lr, gr) = ops::with_reference_ops(run)?;
            assert!((lf - lr).abs() < tol * lr.abs(), "{p}: loss {lf} vs {lr}");
            for ((n, _), (a, b)) in m.params.iter().zip(gf.iter().zip(&gr)) {
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= tol * 10.0 * scale,
                    "{p}: grad of {n} differs by {diff} (max {scale})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn autocast_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        let m = Transformer::new(&tiny(), 1, &dev)?;
        for (p, dt) in [
            (Precision::F16, DType::F16),
            (Precision::Bf16, DType::BF16),
            (Precision::Fp32, DType::F32),
        ] {
            let ac = Autocast::new(p);
            let ctx = Ctx::eval(&ac);
            let (src, tin, _) = batch(&dev);
            let logits = m.forward_t(&ctx, &src, &tin)?;
            assert_eq!(logits.dtype(), dt, "linear outputs carry the compute dtype");
            // the normalised stacks are f32
            let sm = src_mask(&src)?;
            assert_eq!(m.encode(&ctx, &src, &sm)?.dtype(), DType::F32);
            let probs = ops::masked_softmax(
                &logits.reshape((2, 1, 4, 40))?,
                &Tensor::zeros((1, 1, 1, 40), DType::F32, &dev)?,
                1.0,
                DType::F32,
                None,
            )?;
            assert_eq!(probs.dtype(), DType::F32);
            for (_, v) in &m.params {
                assert_eq!(v.dtype(), DType::F32, "master weights stay f32");
            }
        }
        Ok(())
    }

    #[test]
    fn f16_mask_does_not_overflow_and_fully_padded_rows_are_finite() -> Result<()> {
        let dev = Device::Cpu;
        let m = Transformer::new(&tiny(), 3, &dev)?;
        let ac = Autocast::new(Precision::F16);
        let ctx = Ctx::eval(&ac);
        // an all-PAD source row: every key masked
        let src = Tensor::new(&[[2u32, 5, 3], [1, 1, 1]], &dev)?;
        let tin = Tensor::new(&[[2u32, 9], [1, 1]], &dev)?;
        let logits = m.forward_t(&ctx, &src, &tin)?.to_dtype(DType::F32)?;
        let s = logits.sum_all()?.to_scalar::<f32>()?;
        assert!(s.is_finite(), "NaN/inf from masked rows");
        Ok(())
    }

    #[test]
    fn kv_cached_decoding_matches_full_prefix_decoding() -> Result<()> {
        let dev = Device::Cpu;
        let m = Transformer::new(&tiny(), 7, &dev)?;
        let ac = Autocast::new(Precision::Fp32);
        let ctx = Ctx::eval(&ac);
        let (src, _, _) = batch(&dev);
        let sm = src_mask(&src)?;
        let memory = m.encode(&ctx, &src, &sm)?;
        let mut cache = m.start_decoding(&ctx, &memory)?;
        let toks = [[2u32, 2], [9, 12], [10, 4], [11, 5]];
        for (t, row) in toks.iter().enumerate() {
            let tok = Tensor::new(&[[row[0]], [row[1]]], &dev)?;
            let cached = m.decode_step(&ctx, &mut cache, &tok, &sm)?;
            let prefix: Vec<Vec<u32>> = (0..2)
                .map(|b| toks[..=t].iter().map(|r| r[b]).collect())
                .collect();
            let prefix = Tensor::new(prefix, &dev)?;
            let full = m.decode(&ctx, &memory, &sm, &prefix, &tgt_mask(&prefix)?)?;
            let last = full.narrow(1, t, 1)?.squeeze(1)?;
            let want = ops::log_softmax(&m.project(&ctx, &last)?)?;
            let diff = (cached - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "step {t}: {diff}");
        }
        Ok(())
    }
}
