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

thread_local! {
    static FORCE_REFERENCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(crate) fn use_reference() -> bool {
    static R: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    FORCE_REFERENCE.with(|f| f.get())
        || *R.get_or_init(|| std::env::var("AMPSERVE_REFERENCE_OPS").is_ok_and(|v| v == "1"))
}

/// Declares `out` of a fused kernel (one launch, counted by the kernel) as a graph node whose
/// backward hands gradients to `edges` inputs (`crate::counters`). On devices without fused
/// kernels (neither the CPU nor, with the `cuda` feature, a CUDA device) the kernels run their
/// reference compositions, whose candle nodes are not declared.
fn fused(out: Tensor, edges: u64) -> Result<Tensor> {
    if kernels::has_kernel(out.device()) {
        crate::counters::fused_node(&out, edges);
    }
    Ok(out)
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
    fused(kernels::layer_norm(x, alpha, beta, eps, tutorial, out)?, 3)
}

/// Masked softmax (see `kernels::reference::masked_softmax`), fused.
/// With `drop`, the probabilities are dropped out in the same pass (attention dropout).
pub fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
    out: DType,
    drop: Option<&DropMask>,
) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::masked_softmax(scores, mask, scale, out, drop);
    }
    fused(kernels::masked_softmax(scores, mask, scale, out, drop)?, 1)
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
    fused(kernels::cross_entropy_ls(logits, targets, pad_id, eps)?, 1)
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
    fused(kernels::bias_act(y, b, relu, drop, out_shape)?, 2)
}

/// `table[ids] * scale + positions` (see `kernels::embed`), one node.
pub fn embed(table: &Tensor, ids: &Tensor, positions: &Tensor, scale: f64) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::embed(table, ids, positions, scale);
    }
    kernels::embed(table, ids, positions, scale)
}

/// (b, t, heads * d_k) -> (b, heads, t, d_k) (see `kernels::split_heads`), one node.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    if use_reference() {
        return kernels::heads_reference::split(x, heads);
    }
    kernels::split_heads(x, heads)
}

/// (b, heads, t, d_k) -> (b, t, heads * d_k) (see `kernels::merge_heads`), one node.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    if use_reference() {
        return kernels::heads_reference::merge(x);
    }
    kernels::merge_heads(x)
}

/// Inverted dropout with a counter-based mask (see `kernels::dropout`).
pub fn dropout_with(x: &Tensor, m: &DropMask) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::dropout(x, m);
    }
    fused(kernels::dropout(x, m)?, 1)
}

/// `x + dropout(sub)` into the f32 residual stream (see `kernels::residual_dropout`).
pub fn residual_dropout(x: &Tensor, sub: &Tensor, drop: Option<&DropMask>) -> Result<Tensor> {
    if use_reference() {
        return kernels::reference::residual_dropout(x, sub, drop);
    }
    fused(kernels::residual_dropout(x, sub, drop)?, 2)
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

/// The full 64-bit splitmix64 finaliser: a bijective mix, so distinct inputs give distinct seeds.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout seed of one training step: a function of the run seed and the step alone, so a
/// run resumed at `step` draws the masks the uninterrupted run drew.
pub fn step_seed(run_seed: u64, step: u64) -> u64 {
    mix64(run_seed ^ mix64(step.wrapping_add(0x5EED)))
}

/// The seed of the `site`-th dropout mask of a forward pass (see `model::Ctx`). Hashed, so the
/// masks of different sites are unrelated streams of [`kernels::keep_bits`].
pub fn site_seed(step_seed: u64, site: u64) -> u64 {
    mix64(step_seed ^ mix64(site.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1)))
}
