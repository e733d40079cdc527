//! `softmax(scores * scale + mask)` over the last dim, with an optional fused dropout on the
//! output (attention dropout), fused forward and backward.
//!
//! With dropout the backward pass recomputes the undropped probabilities from the scores rather
//! than saving them: the scores are the op's argument, so candle keeps them alive until the
//! backward pass anyway, while saved probabilities would keep one more (B, H, Tq, Tk) tensor per
//! attention layer alive; the recomputation is two extra reads of a row that is in cache.

use super::dropout::DropMask;
use super::fused::{Arg, Fused2, Fused3, Grads, Op, Out};
use super::plumbing::{ensure_float, f32_slice, map_rows2, shape_err};
use super::{fast_exp, max_f32, with_float, with_out_dtype, Elem, Rows};
use candle_core::{DType, Layout, Result, Tensor};

const OP: &str = "masked_softmax";

/// A row whose mask entries are all at or below this value is "fully masked": its output is the
/// uniform distribution (as with PyTorch's `masked_fill(-1e9)` + softmax), never NaN.
pub const FULLY_MASKED: f32 = -1.0e4;

/// `dropout(softmax(scores * scale + mask))` over the last dim, computed in f32.
///
/// `scores`: (B, H, Tq, Tk) in f32/bf16/f16 (any rank >= 1 works, any strides); `mask`: additive,
/// broadcastable to `scores` (typically (B, 1, 1|Tq, Tk)), 0 or a large negative finite number such
/// as -1e9. A row whose mask is entirely <= -1e4 gives a uniform row. `drop`: an optional
/// dropout mask over the output's elements (row-major). The output has dtype `out`. The gradient
/// flows to `scores` only: `scale * y * (g - sum(y * g))` with `g = dy * mask * 1/(1-p)`.
pub fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
    out: DType,
    drop: Option<&DropMask>,
) -> Result<Tensor> {
    ensure_float(OP, &[out, scores.dtype()])?;
    if let Some(m) = drop {
        m.check(OP, scores.elem_count())?;
    }
    let mask = mask.to_dtype(DType::F32)?;
    let mask = mask.broadcast_as(scores.shape()).map_err(|e| {
        shape_err(
            OP,
            format!(
                "mask {:?} does not broadcast to scores {:?}: {e}",
                mask.shape(),
                scores.shape()
            ),
        )
    })?;
    if super::has_kernel(scores.device()) && scores.rank() >= 1 {
        let op = MaskedSoftmax {
            scale: scale as f32,
            out,
            drop: drop.copied(),
        };
        super::cuda_contiguous(scores)?.apply_op2(&mask, Op(op))
    } else {
        reference(scores, &mask, scale, out, drop)
    }
}

/// The straightforward differentiable composition: reference softmax, then reference dropout
/// (used off-CPU and as the test oracle).
pub fn reference(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
    out: DType,
    drop: Option<&DropMask>,
) -> Result<Tensor> {
    let z = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(mask)?;
    // The shift by the row max cancels out of softmax: no gradient through it.
    let max = z.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = z.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(candle_core::D::Minus1)?;
    let y = e.broadcast_div(&s)?.to_dtype(out)?;
    match drop {
        Some(m) => super::dropout::reference(&y, m),
        None => Ok(y),
    }
}

pub(super) struct MaskedSoftmax {
    pub scale: f32,
    pub out: DType,
    pub drop: Option<DropMask>,
}

/// One row of `softmax(z * scale + m)` in place (`z` holds the scores on entry).
#[inline]
fn softmax_row(z: &mut [f32], m: &[f32], scale: f32) {
    let d = z.len();
    if max_f32(m) <= FULLY_MASKED {
        z.fill(1.0 / d as f32);
        return;
    }
    for (zi, mi) in z.iter_mut().zip(m.iter()) {
        *zi = *zi * scale + *mi;
    }
    let mx = max_f32(z);
    let mut acc = [0f32; 8];
    let mut chunks = z.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = fast_exp(c[i] - mx);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - mx);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in z.iter_mut() {
        *v *= inv;
    }
}

fn softmax_fwd<T: Elem, O: Elem>(
    scores: &[T],
    sl: &Layout,
    mask: &[f32],
    ml: &Layout,
    scale: f32,
    drop: Option<&DropMask>,
) -> Vec<O> {
    let d = sl.dims().last().copied().unwrap_or(1);
    map_rows2(scores, sl, mask, ml, |r, z, m| {
        softmax_row(z, m, scale);
        if let Some(dm) = drop {
            for (j, v) in z.iter_mut().enumerate() {
                *v *= dm.factor(r * d + j);
            }
        }
    })
}

impl Fused2 for MaskedSoftmax {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let mask = f32_slice(OP, s2, "f32 mask")?;
        let drop = self.drop.as_ref();
        let storage = with_float!(s1, OP, |s: T| with_out_dtype!(self.out, OP, |O| {
            O::wrap(softmax_fwd::<T, O>(s, l1, mask, l2, self.scale, drop))
        }));
        Ok((storage, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: super::fused::CudaArg,
        b: super::fused::CudaArg,
    ) -> super::fused::CudaOut {
        super::cuda::softmax::forward(self, a, b)
    }

    fn bwd(&self, [scores, mask]: [&Tensor; 2], res: &Tensor, grad_res: &Tensor) -> Grads<2> {
        let g = match self.drop {
            None => {
                let op = SoftmaxBwd {
                    scale: self.scale,
                    out: scores.dtype(),
                };
                if res.device().is_cpu() {
                    res.apply_op2_no_bwd(grad_res, &Op(op))?
                } else {
                    // The CUDA kernel takes the gradient in the output's dtype, contiguous.
                    let g = super::cuda_contiguous(&grad_res.to_dtype(res.dtype())?)?;
                    super::cuda_contiguous(res)?.apply_op2_no_bwd(&g, &Op(op))?
                }
            }
            Some(drop) => {
                let op = SoftmaxDropBwd {
                    scale: self.scale,
                    drop,
                };
                let grad = super::cuda_contiguous(grad_res)?;
                scores.apply_op3_no_bwd(mask, &grad, &Op(op))?
            }
        };
        Ok([Some(g), None])
    }
}

/// dscores = scale * y * (dy - sum(y * dy)), in the scores' dtype.
pub(super) struct SoftmaxBwd {
    pub scale: f32,
    pub out: DType,
}

fn softmax_bwd<Y: Elem, G: Elem, O: Elem>(
    y: &[Y],
    yl: &Layout,
    g: &[G],
    gl: &Layout,
    scale: f32,
) -> Vec<O> {
    map_rows2(g, gl, y, yl, |_, gv, yv| {
        let dot = super::dot_f32(yv, gv);
        for (gi, yi) in gv.iter_mut().zip(yv.iter()) {
            *gi = scale * *yi * (*gi - dot);
        }
    })
}

impl Fused2 for SoftmaxBwd {
    const NAME: &'static str = "masked_softmax_bwd";

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let storage = with_float!(s1, OP, |y: Y| with_float!(s2, OP, |g: G| {
            with_out_dtype!(self.out, OP, |O| O::wrap(softmax_bwd::<Y, G, O>(
                y, l1, g, l2, self.scale
            )))
        }));
        Ok((storage, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: super::fused::CudaArg,
        b: super::fused::CudaArg,
    ) -> super::fused::CudaOut {
        super::cuda::softmax::backward(self, a, b)
    }
}

/// The backward pass of softmax + dropout over (scores, mask, dy): recomputes the undropped
/// probabilities `y` of each row from the scores, then `g = dy * factor` and
/// `dscores = scale * y * (g - sum(y * g))`, in the scores' dtype.
pub(super) struct SoftmaxDropBwd {
    pub scale: f32,
    pub drop: DropMask,
}

#[allow(clippy::too_many_arguments)]
fn softmax_drop_bwd<S: Elem, G: Elem>(
    s: &[S],
    sl: &Layout,
    mask: &[f32],
    ml: &Layout,
    g: &[G],
    gl: &Layout,
    scale: f32,
    drop: &DropMask,
) -> Vec<S> {
    let rg = Rows::new(gl);
    let d = rg.d;
    map_rows2(s, sl, mask, ml, |r, y, m| {
        softmax_row(y, m, scale);
        // m is no longer needed: reuse it for the row of g.
        rg.load(g, r, m);
        for (j, gj) in m.iter_mut().enumerate() {
            *gj *= drop.factor(r * d + j);
        }
        let dot = super::dot_f32(y, m);
        for (yj, gj) in y.iter_mut().zip(m.iter()) {
            *yj = scale * *yj * (*gj - dot);
        }
    })
}

impl Fused3 for SoftmaxDropBwd {
    const NAME: &'static str = "masked_softmax_dropout_bwd";

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg, (s3, l3): Arg) -> Out {
        let mask = f32_slice(OP, s2, "f32 mask")?;
        let storage = with_float!(s1, OP, |s: S| with_float!(s3, OP, |g: G| {
            S::wrap(softmax_drop_bwd::<S, G>(
                s, l1, mask, l2, g, l3, self.scale, &self.drop,
            ))
        }));
        Ok((storage, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    #[rustfmt::skip]
    fn cuda_fwd(&self, a: super::fused::CudaArg, b: super::fused::CudaArg, c: super::fused::CudaArg) -> super::fused::CudaOut {
        super::cuda::softmax::dropout_backward(self, a, b, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
    use candle_core::{Device, Var};

    /// Padding mask (B, 1, 1, Tk) with the given valid lengths (0 = fully masked).
    fn pad_mask(lens: &[usize], tk: usize) -> Result<Tensor> {
        let mut v = Vec::new();
        for &l in lens {
            for j in 0..tk {
                v.push(if j < l { 0f32 } else { -1e9 });
            }
        }
        Tensor::from_vec(v, (lens.len(), 1, 1, tk), &Device::Cpu)
    }

    fn causal_pad_mask(lens: &[usize], t: usize) -> Result<Tensor> {
        let mut v = Vec::new();
        for &l in lens {
            for q in 0..t {
                for k in 0..t {
                    v.push(if k <= q && k < l { 0f32 } else { -1e9 });
                }
            }
        }
        Tensor::from_vec(v, (lens.len(), 1, t, t), &Device::Cpu)
    }

    fn check(
        scores: &Tensor,
        mask: &Tensor,
        scale: f64,
        dt: DType,
        out: DType,
        tol: f32,
    ) -> Result<()> {
        check_drop(scores, mask, scale, dt, out, tol, None)
    }

    fn check_drop(
        scores: &Tensor,
        mask: &Tensor,
        scale: f64,
        dt: DType,
        out: DType,
        tol: f32,
        drop: Option<&DropMask>,
    ) -> Result<()> {
        let s = scores.to_dtype(dt)?;
        let var_a = Var::from_tensor(&s)?;
        let var_b = Var::from_tensor(&s)?;
        let ya = masked_softmax(var_a.as_tensor(), mask, scale, out, drop)?;
        let yb = reference(var_b.as_tensor(), mask, scale, out, drop)?;
        assert_eq!(ya.dtype(), out);
        assert_eq!(ya.dims(), scores.dims());
        let diff = max_abs_diff(&ya, &yb)?;
        assert!(diff <= tol, "forward diff {diff} ({dt:?} -> {out:?})");
        // Rows sum to one (without dropout).
        if drop.is_none() {
            let sums = ya.to_dtype(DType::F32)?.sum(candle_core::D::Minus1)?;
            let sd = max_abs_diff(&sums, &sums.ones_like()?)?;
            assert!(sd < 2e-2, "row sums off by {sd}");
        }
        // Arbitrary upstream gradient: weights w, loss = sum(y * w).
        let w = randn(scores.dims(), 99, 1.0)?;
        let la = ya.to_dtype(DType::F32)?.mul(&w)?.sum_all()?;
        let lb = yb.to_dtype(DType::F32)?.mul(&w)?.sum_all()?;
        let ga = la.backward()?.get(var_a.as_tensor()).unwrap().clone();
        let gb = lb.backward()?.get(var_b.as_tensor()).unwrap().clone();
        assert_eq!(ga.dtype(), dt);
        let gdiff = max_abs_diff(&ga, &gb)?;
        let gscale = max_abs(&gb)?.max(1e-3);
        assert!(
            gdiff <= tol * gscale.max(1.0),
            "grad diff {gdiff} (scale {gscale}, {dt:?})"
        );
        assert!(ga
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn matches_composition_f32_and_bf16_with_pad_and_causal_masks() -> Result<()> {
        let scores = randn(&[3, 2, 5, 19], 1, 2.0)?;
        let m = pad_mask(&[19, 7, 1], 19)?;
        check(&scores, &m, 0.35, DType::F32, DType::F32, 1e-5)?;
        check(&scores, &m, 0.35, DType::BF16, DType::F32, 1e-5)?;
        check(&scores, &m, 0.35, DType::BF16, DType::BF16, 8e-3)?;
        check(&scores, &m, 0.35, DType::F16, DType::F16, 2e-3)?;
        let scores = randn(&[2, 4, 33, 33], 2, 3.0)?;
        let m = causal_pad_mask(&[33, 20], 33)?;
        check(
            &scores,
            &m,
            1.0 / 32f64.sqrt(),
            DType::F32,
            DType::F32,
            1e-5,
        )?;
        check(
            &scores,
            &m,
            1.0 / 32f64.sqrt(),
            DType::BF16,
            DType::BF16,
            8e-3,
        )?;
        Ok(())
    }

    #[test]
    fn fully_masked_rows_are_uniform_not_nan() -> Result<()> {
        let scores = randn(&[2, 3, 4, 10], 3, 50.0)?;
        let m = pad_mask(&[0, 4], 10)?;
        let y = masked_softmax(&scores, &m, 1.0, DType::F32, None)?;
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|x| x.is_finite()));
        // Batch 0 is fully masked: every entry 1/10 even with huge scores.
        for x in &v[..3 * 4 * 10] {
            assert!((x - 0.1).abs() < 1e-6, "{x}");
        }
        // Batch 1: zero beyond position 4.
        for row in v[3 * 4 * 10..].chunks(10) {
            assert!(row[4..].iter().all(|&x| x == 0.0));
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // The gradient exists and is finite.
        let var = Var::from_tensor(&scores)?;
        let y = masked_softmax(var.as_tensor(), &m, 1.0, DType::F32, None)?;
        let g = y
            .mul(&randn(&[2, 3, 4, 10], 4, 1.0)?)?
            .sum_all()?
            .backward()?;
        let g = g.get(var.as_tensor()).unwrap();
        assert!(g
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite()));
        Ok(())
    }

    #[test]
    fn strided_scores_and_broadcast_mask() -> Result<()> {
        // scores as a transposed view (B, H, Tk, Tq).t(): non-contiguous last dim.
        let base = randn(&[2, 2, 9, 6], 5, 1.5)?;
        let scores = base.transpose(2, 3)?; // (2, 2, 6, 9), last-dim stride 6
        assert!(!scores.is_contiguous());
        let m = pad_mask(&[9, 5], 9)?;
        check(&scores, &m, 0.5, DType::F32, DType::F32, 1e-5)?;
        // 2-D mask (Tq, Tk) broadcast over batch and heads.
        let causal = causal_pad_mask(&[9], 9)?
            .squeeze(0)?
            .squeeze(0)?
            .narrow(0, 0, 6)?;
        check(&scores, &causal, 0.5, DType::F32, DType::F32, 1e-5)?;
        Ok(())
    }

    #[test]
    fn fused_dropout_matches_softmax_then_dropout_forward_and_backward() -> Result<()> {
        let scores = randn(&[3, 2, 5, 19], 6, 2.0)?;
        let m = pad_mask(&[19, 7, 0], 19)?;
        let drop = crate::kernels::test_util::mask(scores.elem_count(), 0.3, 7);
        for (dt, out, tol) in [
            (DType::F32, DType::F32, 1e-5f32),
            (DType::BF16, DType::F32, 1e-5),
            (DType::BF16, DType::BF16, 1.5e-2),
            (DType::F16, DType::F16, 3e-3),
        ] {
            check_drop(&scores, &m, 0.35, dt, out, tol, Some(&drop))?;
        }
        // A causal mask, rows longer than a SIMD chunk, and a strided view.
        let scores = randn(&[2, 2, 40, 40], 8, 3.0)?.transpose(2, 3)?;
        let m = causal_pad_mask(&[40, 23], 40)?;
        let drop = crate::kernels::test_util::mask(scores.elem_count(), 0.1, 9);
        check_drop(&scores, &m, 0.2, DType::F32, DType::F32, 1e-5, Some(&drop))?;
        Ok(())
    }

    #[test]
    fn fused_dropout_zeroes_exactly_the_dropped_elements_and_scales_the_rest() -> Result<()> {
        let scores = randn(&[4, 33], 10, 1.0)?;
        let m = Tensor::zeros(33, DType::F32, &Device::Cpu)?;
        let drop = crate::kernels::test_util::mask(4 * 33, 0.5, 11);
        let plain = masked_softmax(&scores, &m, 1.0, DType::F32, None)?;
        let dropped = masked_softmax(&scores, &m, 1.0, DType::F32, Some(&drop))?;
        let (p, d) = (
            plain.flatten_all()?.to_vec1::<f32>()?,
            dropped.flatten_all()?.to_vec1::<f32>()?,
        );
        for i in 0..p.len() {
            let want = if drop.keeps(i) { p[i] * 2.0 } else { 0.0 };
            assert!((d[i] - want).abs() < 1e-6, "{i}: {} vs {want}", d[i]);
        }
        let short = crate::kernels::test_util::mask(10, 0.5, 11);
        assert!(masked_softmax(&scores, &m, 1.0, DType::F32, Some(&short)).is_err());
        Ok(())
    }
}
