//! Fused CPU kernels with their own backward pass for mixed-precision training.
//!
//! Every op here is a candle `CustomOp` on CPU (rayon over rows, f32 math whatever the storage
//! dtype) and, with the `cuda` feature, on CUDA devices too ([`cuda`]: PTX kernels compiled by
//! `build.rs`, the same math and the same counter-based dropout bits); on other devices it falls
//! back to an equivalent differentiable composition of candle ops. The fused ops exist because candle's own fused `softmax_last_dim` / `layer_norm` have
//! no backward, and because a small Transformer on a CPU is bound by elementwise work: one pass
//! over a row instead of five or six materialised intermediates.
//!
//! * [`layer_norm`]: tutorial (`alpha * (x - mean) / (std_unbiased + eps) + beta`) or standard form.
//! * [`masked_softmax`]: `softmax(scores * scale + mask)` with a broadcast additive mask.
//! * [`cross_entropy_ls`]: label-smoothed cross-entropy with an ignore index, fused gradient.
//! * [`matmul`]: packed bf16 GEMM (AVX512-BF16 `vdpbf16ps`, or an AVX2+FMA micro-kernel on CPUs
//!   without it), with a backward through the same kernel.
//! * [`bias_act`] / [`dropout`] / [`residual_dropout`]: linear epilogues (bias, ReLU, dropout with a
//!   byte mask) and the residual add, with the bias gradient as a column sum in the same pass.
//! * [`linear`]: `x @ w.T` for a linear layer as one graph node (no reshape/transpose nodes).
//! * [`embed`]: `table[ids] * scale + positions` as one node (a scatter-add backward).
//! * [`split_heads`] / [`merge_heads`]: the attention heads' permuting copies, one node each.
//! * [`adam_update`] / [`sum_squares`]: one-pass optimizer update and global squared norm.
//!
//! The plumbing is written once and each op file holds only its math: `elem` (the storage
//! element types and the dtype dispatch `with_float!` / `with_out_dtype!`), `rows` (row
//! addressing over any strides), `math` (vectorising f32 helpers) and `plumbing` (dtype checks
//! and errors, typed slices, and the row-parallel drivers `par_rows`, `map_rows`, `map_rows2`,
//! `par_row_blocks`, in the spirit of candle's `unary_map` and `Map1`/`Map2`).

mod adam;
mod bias_act;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dropout;
mod elem;
mod embed;
mod fused;
mod heads;
mod layer_norm;
mod linear;
mod math;
mod matmul;
pub(crate) mod plumbing;
mod residual;
mod rows;
mod softmax;

pub use adam::{adam_update, sum_squares, AdamHp};
pub use bias_act::bias_act;
pub use cross_entropy::cross_entropy_ls;
pub use dropout::{dropout, keep_bits, DropMask};
pub use embed::embed;
pub use heads::{merge_heads, split_heads};

/// The head split/merge compositions (see [`reference`] for the other ops').
pub mod heads_reference {
    pub use super::heads::reference_merge as merge;
    pub use super::heads::reference_split as split;
}
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use matmul::{bf16_dot_available, matmul, matmul_portable};
pub use residual::residual_dropout;
pub use softmax::masked_softmax;

/// The straightforward differentiable compositions of candle ops the fused kernels replace: the
/// off-CPU fallbacks, the test oracles and the benchmark baselines.
pub mod reference {
    pub use super::adam::reference as adam_update;
    pub use super::bias_act::reference as bias_act;
    pub use super::cross_entropy::reference as cross_entropy_ls;
    pub use super::dropout::reference as dropout;
    pub use super::embed::reference as embed;
    pub use super::layer_norm::reference as layer_norm;
    pub use super::linear::reference as linear;
    pub use super::residual::reference as residual_dropout;
    pub use super::softmax::reference as masked_softmax;
}

pub(crate) use elem::{is_float, with_float, with_out_dtype, Elem};
pub(crate) use math::{dot_f32, fast_exp, max_f32, sum_f32};
pub(crate) use rows::Rows;

use candle_core::{DType, Device, Result, Tensor};

pub(crate) use crate::counters;

/// Whether the fused kernels run on `dev`: the CPU always, a CUDA device with the `cuda`
/// feature; elsewhere the ops use their reference compositions.
pub(crate) fn has_kernel(dev: &Device) -> bool {
    dev.is_cpu() || (cfg!(feature = "cuda") && dev.is_cuda())
}

/// `t` itself, or (on a CUDA device, whose kernels take contiguous operands) a contiguous copy
/// of a strided `t`. The CPU kernels read any strides.
pub(crate) fn cuda_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() || t.is_contiguous() {
        return Ok(t.clone());
    }
    counters::device_ops(1);
    t.contiguous()
}

/// Errors raised by the kernels (wrapped into `candle_core::Error` at the API boundary, since
/// every kernel is called from inside candle's graph machinery).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: unsupported dtype {dtype:?} (expected {expected})")]
    UnsupportedDType {
        op: &'static str,
        dtype: DType,
        expected: &'static str,
    },
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: target {target} at row {row} is out of range for {classes} classes")]
    TargetOutOfRange {
        op: &'static str,
        row: usize,
        target: u32,
        classes: usize,
    },
    #[error("{op}: {what} must be contiguous and start-aligned for an in-place update")]
    NotContiguous {
        op: &'static str,
        what: &'static str,
    },
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// A seeded dropout mask of `n` elements with drop probability `p`.
    pub fn mask(n: usize, p: f64, seed: u64) -> crate::kernels::DropMask {
        crate::kernels::DropMask::new(seed, n, p)
    }

    /// Forward values and the gradients of `sum(out * w)` w.r.t. every input, fused vs reference.
    pub fn grads(
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        w: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts)?;
        let gs = out.to_dtype(DType::F32)?.mul(w)?.sum_all()?.backward()?;
        let g = ts
            .iter()
            .map(|t| gs.get(t).expect("gradient").to_dtype(DType::F32))
            .collect::<Result<_>>()?;
        Ok((out, g))
    }

    /// Asserts the fused op and its reference agree, forward and every gradient, within `tol`
    /// (relative), and that no gradient is all zero.
    pub fn compare(
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        refc: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        tol: f32,
    ) -> Result<()> {
        let w = randn(fused(inputs)?.dims(), 77, 1.0)?;
        let (yf, gf) = grads(&fused, inputs, &w)?;
        let (yr, gr) = grads(&refc, inputs, &w)?;
        assert_eq!(yf.dims(), yr.dims());
        assert_eq!(yf.dtype(), yr.dtype());
        let d = max_abs_diff(&yf, &yr)?;
        assert!(d <= tol * max_abs(&yr)?.max(1.0), "forward differs by {d}");
        for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
            assert_eq!(a.dims(), b.dims(), "gradient {i} shape");
            let d = max_abs_diff(a, b)?;
            let s = max_abs(b)?.max(1e-3);
            assert!(d <= tol * s, "gradient {i} differs by {d} (max {s})");
            assert!(
                s > 1e-3,
                "gradient {i} is all zero: the test checks nothing"
            );
        }
        Ok(())
    }

    /// Deterministic pseudo-random tensor (normal-ish, via a sum of uniforms) for tests.
    pub fn randn(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let v: Vec<f32> = (0..n)
            .map(|_| (next() + next() + next() + next() - 2.0) * 1.7 * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let a = a.to_dtype(DType::F32)?.flatten_all()?;
        let b = b.to_dtype(DType::F32)?.flatten_all()?;
        a.sub(&b)?.abs()?.max(0)?.to_scalar::<f32>()
    }

    pub fn max_abs(a: &Tensor) -> Result<f32> {
        a.to_dtype(DType::F32)?
            .flatten_all()?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()
    }

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 87.9 {
            let rel = (super::fast_exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(super::fast_exp(-1e9), 0.0);
        assert!(super::fast_exp(1e9).is_finite());
        assert!(super::fast_exp(f32::NAN).is_nan());
    }
}
