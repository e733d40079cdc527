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

use crate::amp::Autocast;
use crate::data::PAD_ID;
use crate::ops;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

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

/// Named f32 master weights, created with a seeded RNG (candle's CPU RNG cannot be seeded).
pub struct Params {
    pub vars: Vec<(String, Var)>,
    rng: StdRng,
    device: Device,
}

impl Params {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            vars: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    fn add(&mut self, name: String, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::from_vec(data, shape, &self.device)?;
        let v = Var::from_tensor(&t)?;
        let t = v.as_tensor().clone();
        self.vars.push((name, v));
        Ok(t)
    }

    /// xavier_uniform_: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
    fn xavier(&mut self, name: String, rows: usize, cols: usize) -> Result<Tensor> {
        let a = (6.0 / (rows + cols) as f64).sqrt();
        let data = (0..rows * cols)
            .map(|_| self.rng.gen_range(-a..a) as f32)
            .collect();
        self.add(name, data, &[rows, cols])
    }

    /// nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    fn bias(&mut self, name: String, n: usize, fan_in: usize) -> Result<Tensor> {
        let a = 1.0 / (fan_in as f64).sqrt();
        let data = (0..n).map(|_| self.rng.gen_range(-a..a) as f32).collect();
        self.add(name, data, &[n])
    }

    fn constant(&mut self, name: String, n: usize, v: f32) -> Result<Tensor> {
        self.add(name, vec![v; n], &[n])
    }

    pub fn count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

struct LayerNorm {
    alpha: Tensor,
    beta: Tensor,
    eps: f64,
    tutorial: bool,
}

impl LayerNorm {
    fn new(p: &mut Params, name: &str, d: usize, cfg: &Config) -> Result<Self> {
        Ok(Self {
            alpha: p.constant(format!("{name}.alpha"), d, 1.0)?,
            beta: p.constant(format!("{name}.bias"), d, 0.0)?,
            eps: cfg.norm_eps,
            tutorial: cfg.tutorial_layer_norm,
        })
    }

    /// f32 in, f32 out (the next linear casts once).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(
            x,
            &self.alpha,
            &self.beta,
            self.eps,
            self.tutorial,
            DType::F32,
        )
    }
}

/// Per-forward state: autocast, train/eval, and the dropout RNG.
pub struct Ctx<'a> {
    pub ac: &'a Autocast,
    pub train: bool,
    pub dropout: f64,
    rng: RefCell<StdRng>,
    /// Whether a GPU's generator was seeded from `rng` in this forward pass (once per pass).
    device_seeded: std::cell::Cell<bool>,
    /// `amp.trace_overflow`: Some once tracing is on; holds the first activation (name, largest
    /// magnitude) that left the f16 range in this forward pass.
    trace: Option<RefCell<Option<(String, f64)>>>,
}

impl<'a> Ctx<'a> {
    pub fn new(ac: &'a Autocast, train: bool, dropout: f64, rng: StdRng) -> Self {
        Self {
            ac,
            train,
            dropout,
            rng: RefCell::new(rng),
            device_seeded: std::cell::Cell::new(false),
            trace: None,
        }
    }

    /// Watch the forward activations for the first one beyond the f16 range (see
    /// [`Self::first_overflow`]).
    pub fn with_overflow_trace(mut self) -> Self {
        self.trace = Some(RefCell::new(None));
        self
    }

    /// The first watched activation (in forward order) whose largest magnitude exceeded f16's
    /// 65504 or was not finite, with that magnitude (inf/NaN as infinity).
    pub fn first_overflow(&self) -> Option<(String, f64)> {
        self.trace.as_ref().and_then(|t| t.borrow().clone())
    }

    /// Two reductions (max and sum) on `x` while tracing and nothing has overflowed yet; a no-op otherwise.
    fn watch(&self, name: impl FnOnce() -> String, x: &Tensor) -> Result<()> {
        let Some(t) = &self.trace else {
            return Ok(());
        };
        if t.borrow().is_some() {
            return Ok(());
        }
        // max ignores NaN, so the sum says whether anything was not finite
        let a = x.abs()?.to_dtype(candle_core::DType::F32)?.flatten_all()?;
        let m = a.max(0)?.to_scalar::<f32>()? as f64;
        let sum = a.sum_all()?.to_scalar::<f32>()? as f64;
        if !sum.is_finite() || m > 65504.0 {
            let m = if sum.is_finite() { m } else { f64::INFINITY };
            *t.borrow_mut() = Some((name(), m));
        }
        Ok(())
    }

    pub fn eval(ac: &'a Autocast) -> Self {
        Self::new(ac, false, 0.0, StdRng::seed_from_u64(0))
    }

    /// A dropout mask for `n` elements, or `None` outside training or with p = 0.
    fn mask(&self, n: usize) -> Option<ops::DropMask> {
        (self.train && self.dropout > 0.0)
            .then(|| ops::DropMask::sample(n, self.dropout, &mut self.rng.borrow_mut()))
    }

    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            // on a GPU the mask is drawn on the device (seeded once per forward pass)
            if !(self.train && self.dropout > 0.0) {
                return Ok(x.clone());
            }
            let mut rng = self.rng.borrow_mut();
            if !self.device_seeded.get() {
                ops::seed_device(x.device(), &mut rng)?;
                self.device_seeded.set(true);
            }
            return ops::dropout(x, self.dropout, &mut rng);
        }
        match self.mask(x.elem_count()) {
            Some(m) => ops::dropout_with(x, &m),
            None => Ok(x.clone()),
        }
    }
}

struct Attention {
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    heads: usize,
    d_k: usize,
}

/// Cached keys and values of one attention layer: (batch, heads, len, d_k).
#[derive(Clone)]
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
}

impl Attention {
    fn new(p: &mut Params, name: &str, cfg: &Config) -> Result<Self> {
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
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.d_k))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn project_kv(&self, ctx: &Ctx, kv: &Tensor) -> Result<KvCache> {
        Ok(KvCache {
            k: self.split(&ctx.ac.linear(kv, &self.wk, None)?)?,
            v: self.split(&ctx.ac.linear(kv, &self.wv, None)?)?,
        })
    }

    /// q_in: (b, tq, d) f32; keys/values from `kv`; mask additive f32 (b, 1, 1|tq, tk).
    /// Returns (b, tq, d) in the compute dtype.
    fn forward_kv(&self, ctx: &Ctx, q_in: &Tensor, kv: &KvCache, mask: &Tensor) -> Result<Tensor> {
        let (b, tq, _) = q_in.dims3()?;
        let q = self.split(&ctx.ac.linear(q_in, &self.wq, None)?)?;
        // (b, h, tq, tk) in the compute dtype
        let scores = ctx.ac.matmul(&q, &kv.k.t()?)?;
        let probs = ops::masked_softmax(
            &scores,
            mask,
            1.0 / (self.d_k as f64).sqrt(),
            ctx.ac.compute_dtype(),
        )?;
        let probs = ctx.drop(&probs)?;
        // (b, h, tq, d_k)
        let out = ctx.ac.matmul(&probs, &kv.v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, tq, self.heads * self.d_k))?;
        ctx.ac.linear(&out, &self.wo, None)
    }

    fn forward(&self, ctx: &Ctx, q_in: &Tensor, kv_in: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let kv = self.project_kv(ctx, kv_in)?;
        self.forward_kv(ctx, q_in, &kv, mask)
    }
}

struct FeedForward {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl FeedForward {
    fn new(p: &mut Params, name: &str, cfg: &Config) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(Self {
            w1: p.xavier(format!("{name}.linear_1.weight"), f, d)?,
            b1: p.bias(format!("{name}.linear_1.bias"), f, d)?,
            w2: p.xavier(format!("{name}.linear_2.weight"), d, f)?,
            b2: p.bias(format!("{name}.linear_2.bias"), d, f)?,
        })
    }

    fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
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
fn residual(ctx: &Ctx, x: &Tensor, sub: &Tensor) -> Result<Tensor> {
    ops::residual_dropout(x, sub, ctx.mask(sub.elem_count()).as_ref())
}

struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    ffn: FeedForward,
}

struct DecoderLayer {
    norm1: LayerNorm,
    self_attn: Attention,
    norm2: LayerNorm,
    cross_attn: Attention,
    norm3: LayerNorm,
    ffn: FeedForward,
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

fn sinusoidal(n: usize, d: usize, device: &Device) -> Result<Tensor> {
    let mut data = vec![0f32; n * d];
    for pos in 0..n {
        for i in (0..d).step_by(2) {
            let div = (-(i as f64) * (10000f64.ln() / d as f64)).exp();
            data[pos * d + i] = (pos as f64 * div).sin() as f32;
            if i + 1 < d {
                data[pos * d + i + 1] = (pos as f64 * div).cos() as f32;
            }
        }
    }
    Tensor::from_vec(data, (n, d), device)
}

/// Additive f32 source mask (b, 1, 1, s): 0 for tokens, MASK_FILL for PAD.
pub fn src_mask(src: &Tensor) -> Result<Tensor> {
    let (b, s) = src.dims2()?;
    let pad = src.eq(PAD_ID)?.to_dtype(DType::F32)?;
    (pad * MASK_FILL as f64)?.reshape((b, 1, 1, s))
}

/// Additive f32 decoder self-attention mask (b, 1, t, t): causal and no PAD keys.
pub fn tgt_mask(tgt: &Tensor) -> Result<Tensor> {
    let (b, t) = tgt.dims2()?;
    let causal: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { MASK_FILL } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), tgt.device())?;
    let pad = (tgt.eq(PAD_ID)?.to_dtype(DType::F32)? * MASK_FILL as f64)?.reshape((b, 1, 1, t))?;
    // MASK_FILL + MASK_FILL stays finite in f32 and is still "masked".
    causal.broadcast_add(&pad)
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
        let (b, t) = ids.dims2()?;
        if offset + t > self.cfg.max_positions {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                offset + t,
                self.cfg.max_positions
            );
        }
        let x = emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.d_model))?;
        let x = (x * (self.cfg.d_model as f64).sqrt())?;
        let x = x.broadcast_add(&self.pe.narrow(0, offset, t)?)?;
        ctx.drop(&x)
    }

    /// Encoder: src (b, s) u32 -> memory (b, s, d) f32.
    pub fn encode(&self, ctx: &Ctx, src: &Tensor, src_mask: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(ctx, &self.src_emb, src, 0)?;
        ctx.watch(|| "encoder.embed".into(), &x)?;
        for (i, l) in self.enc.iter().enumerate() {
            let h = l.norm1.forward(&x)?;
            let a = l.attn.forward(ctx, &h, &h, src_mask)?;
            ctx.watch(|| format!("encoder.layers.{i}.self_attn"), &a)?;
            x = residual(ctx, &x, &a)?;
            let h = l.norm2.forward(&x)?;
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
        let mut x = self.embed(ctx, &self.tgt_emb, tgt, 0)?;
        ctx.watch(|| "decoder.embed".into(), &x)?;
        for (i, l) in self.dec.iter().enumerate() {
            let h = l.norm1.forward(&x)?;
            let a = l.self_attn.forward(ctx, &h, &h, tgt_mask)?;
            ctx.watch(|| format!("decoder.layers.{i}.self_attn"), &a)?;
            x = residual(ctx, &x, &a)?;
            let h = l.norm2.forward(&x)?;
            let c = l.cross_attn.forward(ctx, &h, memory, src_mask)?;
            ctx.watch(|| format!("decoder.layers.{i}.cross_attn"), &c)?;
            x = residual(ctx, &x, &c)?;
            let h = l.norm3.forward(&x)?;
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

    /// Label-smoothed cross-entropy (f32 scalar) of a batch, ignoring PAD labels.
    pub fn loss(
        &self,
        ctx: &Ctx,
        src: &Tensor,
        tgt_in: &Tensor,
        tgt_out: &Tensor,
        label_smoothing: f64,
    ) -> Result<Tensor> {
        let logits = self.forward_t(ctx, src, tgt_in)?;
        let v = logits.dim(D::Minus1)?;
        let logits = logits.reshape(((), v))?;
        ops::cross_entropy_ls(&logits, &tgt_out.flatten_all()?, PAD_ID, label_smoothing)
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
            let h = l.norm1.forward(&x)?;
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
            let h = l.norm2.forward(&x)?;
            x = residual(
                ctx,
                &x,
                &l.cross_attn
                    .forward_kv(ctx, &h, &cache.cross_kv[i], src_mask)?,
            )?;
            let h = l.norm3.forward(&x)?;
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
    use crate::config::Precision;

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

    fn batch(dev: &Device) -> (Tensor, Tensor, Tensor) {
        // second sentence padded; PAD = 1
        let src = Tensor::new(&[[2u32, 5, 6, 7, 3], [2, 8, 3, 1, 1]], dev).unwrap();
        let tin = Tensor::new(&[[2u32, 9, 10, 11], [2, 12, 1, 1]], dev).unwrap();
        let tout = Tensor::new(&[[9u32, 10, 11, 3], [12, 3, 1, 1]], dev).unwrap();
        (src, tin, tout)
    }

    #[test]
    fn every_parameter_gets_a_finite_gradient_in_every_precision() -> Result<()> {
        let dev = Device::Cpu;
        for p in [Precision::Fp32, Precision::F16, Precision::Bf16] {
            let m = Transformer::new(&tiny(), 1, &dev)?;
            let ac = Autocast::new(p);
            let ctx = Ctx::new(&ac, true, 0.1, ops::step_rng(1, 1));
            let (src, tin, tout) = batch(&dev);
            let loss = m.loss(&ctx, &src, &tin, &tout, 0.1)?;
            assert_eq!(loss.dtype(), DType::F32);
            let grads = loss.backward()?;
            for (n, v) in &m.params {
                let g = grads
                    .get(v)
                    .unwrap_or_else(|| panic!("{p}: no gradient for {n}"));
                assert_eq!(g.dtype(), DType::F32, "{p}: master grad of {n} must be f32");
                let s = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
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
                let ctx = Ctx::new(&ac, true, 0.1, ops::step_rng(3, 9));
                let (src, tin, tout) = batch(&dev);
                let loss = m.loss(&ctx, &src, &tin, &tout, 0.1)?;
                let g = loss.backward()?;
                let grads = m
                    .params
                    .iter()
                    .map(|(_, v)| g.get(v).unwrap().clone())
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
