//! Layer normalisation (tutorial or standard form), fused forward and one-pass backward.

use super::fused::{Arg, Fused3, Grads, Op, Out};
use super::plumbing::{add_into, ensure_float, load_f32, map_rows, par_row_blocks, shape_err};
use super::{sum_f32, with_float, with_out_dtype, Elem, Rows};
use candle_core::{DType, Layout, Result, Tensor, D};
use std::sync::Mutex;

const OP: &str = "layer_norm";

/// Layer norm over the last dim of `x` (..., D), computed in f32.
///
/// `tutorial = true`: `alpha * (x - mean) / (std_unbiased + eps) + beta` (the tutorial
/// Transformer's form); `tutorial = false`: `alpha * (x - mean) / sqrt(var_biased + eps) + beta`
/// (torch.nn.LayerNorm). `alpha`, `beta`: (D) in any float dtype. The output has dtype `out`.
/// Gradients flow to `x`, `alpha` and `beta`, computed in one fused pass. As in PyTorch, the
/// unbiased std of a single element (D = 1, tutorial form) is NaN.
pub fn layer_norm(
    x: &Tensor,
    alpha: &Tensor,
    beta: &Tensor,
    eps: f64,
    tutorial: bool,
    out: DType,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    for (what, t) in [("alpha", alpha), ("beta", beta)] {
        if t.elem_count() != d || t.rank() != 1 {
            return Err(shape_err(
                OP,
                format!("{what} has shape {:?}, expected ({d})", t.shape()),
            ));
        }
        ensure_float(OP, &[t.dtype()])?;
    }
    ensure_float(OP, &[out, x.dtype()])?;
    if super::has_kernel(x.device()) {
        let op = LayerNorm {
            eps: eps as f32,
            tutorial,
            out,
        };
        if x.device().is_cpu() {
            return x.apply_op3(alpha, beta, Op(op));
        }
        // The CUDA kernels take contiguous rows and f32 parameters.
        let f32c = |t: &Tensor| super::cuda_contiguous(&t.to_dtype(DType::F32)?);
        super::cuda_contiguous(x)?.apply_op3(&f32c(alpha)?, &f32c(beta)?, Op(op))
    } else {
        reference(x, alpha, beta, eps, tutorial, out)
    }
}

/// The straightforward differentiable composition (used off-CPU and as the test oracle).
pub fn reference(
    x: &Tensor,
    alpha: &Tensor,
    beta: &Tensor,
    eps: f64,
    tutorial: bool,
    out: DType,
) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let d = x.dim(D::Minus1)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let c = x.broadcast_sub(&mean)?;
    let ss = c.sqr()?.sum_keepdim(D::Minus1)?;
    let xhat = if tutorial {
        let std = (ss / (d as f64 - 1.0))?.sqrt()?;
        c.broadcast_div(&(std + eps)?)?
    } else {
        let var = (ss / d as f64)?;
        c.broadcast_div(&(var + eps)?.sqrt()?)?
    };
    xhat.broadcast_mul(&alpha.to_dtype(DType::F32)?)?
        .broadcast_add(&beta.to_dtype(DType::F32)?)?
        .to_dtype(out)
}

/// Per-row (mean, inverse denominator, std) for the chosen form; `c` receives `x - mean`.
#[inline]
fn row_stats(c: &mut [f32], eps: f32, tutorial: bool) -> (f32, f32) {
    let d = c.len();
    let mean = sum_f32(c) / d as f32;
    for v in c.iter_mut() {
        *v -= mean;
    }
    let ss = super::dot_f32(c, c);
    if tutorial {
        let std = (ss / (d as f32 - 1.0)).sqrt();
        (1.0 / (std + eps), std)
    } else {
        (1.0 / (ss / d as f32 + eps).sqrt(), 0.0)
    }
}

struct LayerNorm {
    eps: f32,
    tutorial: bool,
    out: DType,
}

fn ln_fwd<T: Elem, O: Elem>(
    x: &[T],
    xl: &Layout,
    alpha: &[f32],
    beta: &[f32],
    eps: f32,
    tutorial: bool,
) -> Vec<O> {
    map_rows(x, xl, |_, c| {
        let (inv, _) = row_stats(c, eps, tutorial);
        for ((v, a), b) in c.iter_mut().zip(alpha).zip(beta) {
            *v = *v * inv * a + b;
        }
    })
}

impl Fused3 for LayerNorm {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg, (s3, l3): Arg) -> Out {
        let alpha = load_f32(OP, s2, l2)?;
        let beta = load_f32(OP, s3, l3)?;
        let storage = with_float!(s1, OP, |x: T| with_out_dtype!(self.out, OP, |O| {
            O::wrap(ln_fwd::<T, O>(
                x,
                l1,
                &alpha,
                &beta,
                self.eps,
                self.tutorial,
            ))
        }));
        Ok((storage, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    #[rustfmt::skip]
    fn cuda_fwd(&self, a: super::fused::CudaArg, b: super::fused::CudaArg, c: super::fused::CudaArg) -> super::fused::CudaOut {
        super::cuda::layer_norm::forward(a, b, c, self.eps, self.tutorial, self.out)
    }

    fn bwd(&self, [x, alpha, beta]: [&Tensor; 3], _res: &Tensor, grad_res: &Tensor) -> Grads<3> {
        let grad_res = &super::cuda_contiguous(grad_res)?;
        let op = Op(LayerNormBwd {
            eps: self.eps,
            tutorial: self.tutorial,
            out: x.dtype(),
            param_grads: Mutex::new(None),
        });
        let dx = x.apply_op3_no_bwd(alpha, grad_res, &op)?;
        let grads = op
            .0
            .param_grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("layer_norm_bwd: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("layer_norm_bwd: no parameter grads".into()))?;
        let dev = x.device();
        let (da, db) = match grads {
            ParamGrads::Cpu(da, db) => (
                Tensor::from_vec(da, alpha.shape(), dev)?,
                Tensor::from_vec(db, beta.shape(), dev)?,
            ),
            #[cfg(feature = "cuda")]
            ParamGrads::Cuda(g) => (
                super::cuda::tensor(g.0, alpha.shape()),
                super::cuda::tensor(g.1, beta.shape()),
            ),
        };
        let da = da.to_dtype(alpha.dtype())?;
        let db = db.to_dtype(beta.dtype())?;
        Ok([Some(dx), Some(da), Some(db)])
    }
}

/// Computes dx (output) and, as a side result, dalpha and dbeta in the same pass.
struct LayerNormBwd {
    eps: f32,
    tutorial: bool,
    out: DType,
    param_grads: Mutex<Option<ParamGrads>>,
}

/// dalpha and dbeta (f32), the backward pass's side result.
enum ParamGrads {
    Cpu(Vec<f32>, Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(Box<(candle_core::CudaStorage, candle_core::CudaStorage)>),
}

fn ln_bwd<T: Elem, G: Elem, O: Elem>(
    x: &[T],
    xl: &Layout,
    alpha: &[f32],
    g: &[G],
    gl: &Layout,
    eps: f32,
    tutorial: bool,
) -> (Vec<O>, (Vec<f32>, Vec<f32>)) {
    let (rx, rg) = (Rows::new(xl), Rows::new(gl));
    let d = rx.d;
    let nf = d as f32;
    let mut dx = vec![O::from_f32(0.0); rx.n_rows * d];
    let grads = par_row_blocks(
        &mut dx,
        d,
        d,
        || (vec![0f32; d], vec![0f32; d], vec![0f32; d]),
        || (vec![0f32; d], vec![0f32; d]),
        |(c, dy, ga), (da, db), r, orow| {
            rx.load(x, r, c);
            rg.load(g, r, dy);
            let (inv, std) = row_stats(c, eps, tutorial);
            // Parameter grads and g = dy * alpha.
            for i in 0..d {
                da[i] += dy[i] * c[i] * inv;
                db[i] += dy[i];
                ga[i] = dy[i] * alpha[i];
            }
            let mean_g = sum_f32(ga) / nf;
            let gc = super::dot_f32(ga, c);
            if tutorial {
                // dx = (g - mean(g)) / den - c * <g, c> / (den^2 (D - 1) std)
                let k2 = if std > 0.0 {
                    gc * inv * inv / ((nf - 1.0) * std)
                } else {
                    0.0
                };
                for i in 0..d {
                    ga[i] = (ga[i] - mean_g) * inv - c[i] * k2;
                }
            } else {
                // xhat = c * inv; dx = inv * (g - mean(g) - xhat * mean(g * xhat))
                let k2 = gc * inv * inv / nf;
                for i in 0..d {
                    ga[i] = inv * (ga[i] - mean_g - c[i] * k2);
                }
            }
            O::store(ga, orow);
        },
        |(a1, b1), (a2, b2)| (add_into(a1, a2), add_into(b1, b2)),
    );
    (dx, grads)
}

impl Fused3 for LayerNormBwd {
    const NAME: &'static str = "layer_norm_bwd";

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg, (s3, l3): Arg) -> Out {
        let alpha = load_f32(OP, s2, l2)?;
        let (storage, grads) = with_float!(s1, OP, |x: T| with_float!(s3, OP, |g: G| {
            with_out_dtype!(self.out, OP, |O| {
                let (dx, grads) = ln_bwd::<T, G, O>(x, l1, &alpha, g, l3, self.eps, self.tutorial);
                (O::wrap(dx), grads)
            })
        }));
        self.keep(ParamGrads::Cpu(grads.0, grads.1))?;
        Ok((storage, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    #[rustfmt::skip]
    fn cuda_fwd(&self, a: super::fused::CudaArg, b: super::fused::CudaArg, c: super::fused::CudaArg) -> super::fused::CudaOut {
        let shape = a.1.shape().clone();
        let (dx, da, db) = super::cuda::layer_norm::backward(a, b, c, self.eps, self.tutorial)?;
        self.keep(ParamGrads::Cuda(Box::new((da, db))))?;
        Ok((dx, shape))
    }
}

impl LayerNormBwd {
    fn keep(&self, g: ParamGrads) -> Result<()> {
        *self
            .param_grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("layer_norm_bwd: poisoned lock".into()))? =
            Some(g);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
    use candle_core::Var;

    fn check(x: &Tensor, dt: DType, out: DType, tutorial: bool, tol: f32) -> Result<()> {
        let d = x.dim(D::Minus1)?;
        let alpha = (randn(&[d], 11, 0.3)? + 1.0)?;
        let beta = randn(&[d], 12, 0.3)?;
        let xs = x.to_dtype(dt)?;
        let (xa, aa, ba) = (
            Var::from_tensor(&xs)?,
            Var::from_tensor(&alpha)?,
            Var::from_tensor(&beta)?,
        );
        let (xb, ab, bb) = (
            Var::from_tensor(&xs)?,
            Var::from_tensor(&alpha)?,
            Var::from_tensor(&beta)?,
        );
        let ya = layer_norm(&xa, &aa, &ba, 1e-6, tutorial, out)?;
        let yb = reference(&xb, &ab, &bb, 1e-6, tutorial, out)?;
        assert_eq!(ya.dtype(), out);
        let diff = max_abs_diff(&ya, &yb)?;
        assert!(
            diff <= tol * 4.0,
            "forward diff {diff} ({dt:?}->{out:?}, tutorial {tutorial})"
        );
        let w = randn(x.dims(), 13, 1.0)?;
        let ga = ya.to_dtype(DType::F32)?.mul(&w)?.sum_all()?.backward()?;
        let gb = yb.to_dtype(DType::F32)?.mul(&w)?.sum_all()?.backward()?;
        for (name, va, vb) in [("x", &xa, &xb), ("alpha", &aa, &ab), ("beta", &ba, &bb)] {
            let a = ga.get(va).unwrap();
            let b = gb.get(vb).unwrap();
            assert_eq!(a.dtype(), va.dtype());
            assert_eq!(a.dims(), va.dims());
            let diff = max_abs_diff(a, b)?;
            let scale = max_abs(b)?.max(1.0);
            assert!(
                diff <= tol * scale,
                "grad {name} diff {diff} scale {scale} ({dt:?}, tutorial {tutorial})"
            );
        }
        Ok(())
    }

    #[test]
    fn matches_composition_both_forms_f32_bf16_f16() -> Result<()> {
        let x = (randn(&[4, 7, 37], 21, 2.0)? + 0.5)?;
        for tutorial in [true, false] {
            check(&x, DType::F32, DType::F32, tutorial, 2e-5)?;
            check(&x, DType::BF16, DType::F32, tutorial, 2e-5)?;
            check(&x, DType::BF16, DType::BF16, tutorial, 8e-3)?;
            check(&x, DType::F16, DType::F16, tutorial, 2e-3)?;
        }
        // A model-sized row count (many rayon tasks) with d_model 128.
        let x = randn(&[32, 64, 128], 22, 1.0)?;
        check(&x, DType::F32, DType::F32, true, 2e-5)?;
        Ok(())
    }

    #[test]
    fn strided_input_and_constant_rows() -> Result<()> {
        // Transposed view: last dim has stride != 1.
        let x = randn(&[16, 3, 10], 23, 1.0)?.transpose(0, 2)?; // (10, 3, 16)
        assert!(!x.is_contiguous());
        check(&x, DType::F32, DType::F32, true, 2e-5)?;
        check(&x, DType::F32, DType::F32, false, 2e-5)?;
        // Constant rows: finite output equal to beta, finite gradients.
        let x = Tensor::full(3.0f32, (2, 8), &candle_core::Device::Cpu)?;
        let xv = Var::from_tensor(&x)?;
        let alpha = Tensor::ones(8, DType::F32, &candle_core::Device::Cpu)?;
        let beta = Tensor::arange(0f32, 8., &candle_core::Device::Cpu)?;
        let y = layer_norm(&xv, &alpha, &beta, 1e-6, true, DType::F32)?;
        assert_eq!(y.to_vec2::<f32>()?[1], beta.to_vec1::<f32>()?);
        let g = y.sum_all()?.backward()?;
        let gx = g.get(&xv).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert!(gx.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn rejects_wrong_parameter_shape() -> Result<()> {
        let x = randn(&[2, 6], 1, 1.0)?;
        let a = randn(&[5], 1, 1.0)?;
        let err = layer_norm(&x, &a, &a, 1e-6, true, DType::F32).unwrap_err();
        assert!(err.to_string().contains("alpha"), "{err}");
        Ok(())
    }
}
