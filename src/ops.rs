//! The differentiable building blocks the model trains with, in one place so fast fused kernels
//! can replace the straightforward candle compositions without touching the model.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward, so training
//! never uses them. The public functions dispatch to the fused CPU kernels in `crate::kernels`
//! (each a candle `CustomOp` with its own backward; they fall back to candle compositions off the
//! CPU); `kernels::reference` holds the straightforward compositions they are tested against. Set
//! `AMPSERVE_REFERENCE_OPS=1` to train with the reference ops (for comparisons).

use crate::kernels;
use candle_core::{DType, Result, Tensor};
use rand::SeedableRng;

thread_local! {
    static FORCE_REFERENCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(crate) fn use_reference() -> bool {
    static R: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    FORCE_REFERENCE.with(|f| f.get())
        || *R.get_or_init(|| std::env::var("AMPSERVE_REFERENCE_OPS").is_ok_and(|v| v == "1"))
}

/// Run `f` on this thread with the reference compositions instead of the fused kernels.
pub fn with_reference_ops<T>(f: impl FnOnce() -> T) -> T {
    FORCE_REFERENCE.with(|c| c.set(true));
    let out = f();
    FORCE_REFERENCE.with(|c| c.set(false));
    out
}

/// Batched matmul (both operands already in the compute dtype). bf16 on the CPU goes through the
/// packed bf16 GEMM (AVX512-BF16 `vdpbf16ps` where present, else AVX2+FMA); everything else
/// through candle.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if use_reference() {
        return reference::matmul(a, b);
    }
    kernels::matmul(a, b)
}

/// Layer norm (see `kernels::reference::layer_norm`), fused.
pub fn layer_norm(
    x: &Tensor,
    alpha: &Tensor,
    beta: &Tensor,
    eps: f64,
    tutorial: bool,
    out: DType,
) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::layer_norm(x, alpha, beta, eps, tutorial, out);
    }
    kernels::layer_norm(x, alpha, beta, eps, tutorial, out)
}

/// Masked softmax (see `kernels::reference::masked_softmax`), fused.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64, out: DType) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::masked_softmax(scores, mask, scale, out, None);
    }
    kernels::masked_softmax(scores, mask, scale, out, None)
}

/// Label-smoothed cross-entropy (see `kernels::reference::cross_entropy_ls`), fused with its
/// gradient.
pub fn cross_entropy_ls(
    logits: &Tensor,
    targets: &Tensor,
    pad_id: u32,
    eps: f64,
) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::cross_entropy_ls(logits, targets, pad_id, eps);
    }
    kernels::cross_entropy_ls(logits, targets, pad_id, eps)
}

pub use crate::kernels::DropMask;
pub use reference::log_softmax;

/// `x @ w.T` for a linear layer: x (..., in), w (out, in) -> (..., out), as one graph node
/// (see `kernels::linear`).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::linear(x, w, reference::matmul);
    }
    kernels::linear(x, w)
}

/// `dropout(act(y + b))` for a linear output `y` (..., n) and bias `b` (n), reshaped to
/// `out_shape` (see `kernels::bias_act`), fused with the bias gradient.
pub fn bias_act(
    y: &Tensor,
    b: &Tensor,
    relu: bool,
    drop: Option<&DropMask>,
    out_shape: &[usize],
) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::bias_act(y, b, relu, drop, out_shape);
    }
    kernels::bias_act(y, b, relu, drop, out_shape)
}

/// Inverted dropout with a byte mask (see `kernels::dropout`).
pub fn dropout_with(x: &Tensor, m: &DropMask) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::dropout(x, m);
    }
    kernels::dropout(x, m)
}

/// `x + dropout(sub)` into the f32 residual stream (see `kernels::residual_dropout`).
pub fn residual_dropout(x: &Tensor, sub: &Tensor, drop: Option<&DropMask>) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::residual_dropout(x, sub, drop);
    }
    kernels::residual_dropout(x, sub, drop)
}

/// The plain candle compositions of the ops that have no fused kernel of their own here
/// (matmul, log-softmax). The fused kernels' compositions are `kernels::reference`.
pub mod reference {
    use candle_core::{DType, Result, Tensor, D};

    /// Batched matmul through candle.
    pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if a.rank() == b.rank() {
            a.matmul(b)
        } else {
            a.broadcast_matmul(b)
        }
    }

    /// `log_softmax` over the last dim in f32.
    pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let max = x.max_keepdim(D::Minus1)?.detach();
        let xs = x.broadcast_sub(&max)?;
        let lse = xs.exp()?.sum_keepdim(D::Minus1)?.log()?;
        xs.broadcast_sub(&lse)
    }
}

/// Inverted dropout with a caller-owned, seeded RNG (candle's CPU RNG cannot be seeded, and
/// resumed runs must replay the same masks). On a GPU the mask is drawn on the device by its own
/// generator (cuRAND) instead: a host-made mask would cost a host RNG pass and an upload per
/// call, which dominates a GPU step. Seed that generator once per forward pass with
/// [`seed_device`] to make GPU masks a function of the run seed and step too.
pub fn dropout(x: &Tensor, p: f64, rng: &mut rand::rngs::StdRng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() {
        // u in [0, 1): P(u >= p) = 1 - p.
        let keep = 1.0 - p;
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        let mask = u.ge(p)?.to_dtype(x.dtype())?;
        return x.mul(&mask)?.affine(1.0 / keep, 0.0);
    }
    dropout_with(x, &DropMask::sample(x.elem_count(), p, rng))
}

/// Seed a GPU's random generator from `rng` (a no-op on the CPU, whose dropout masks come from
/// `rng` directly).
pub fn seed_device(dev: &candle_core::Device, rng: &mut rand::rngs::StdRng) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    dev.set_seed(rand::Rng::gen::<u64>(rng))
}

/// A small deterministic RNG for one forward pass: a function of the run seed and the step.
pub fn step_rng(seed: u64, step: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
