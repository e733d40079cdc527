//! `softmax(scores * scale + mask)` over the last dim, fused forward and backward.

use super::fused::{Arg, Fused2, Grads, Op, Out};
use super::plumbing::{ensure_float, f32_slice, map_rows2, shape_err};
use super::{fast_exp, max_f32, with_float, with_out_dtype, Elem};
use candle_core::{DType, Layout, Result, Tensor};

const OP: &str = "masked_softmax";

/// A row whose mask entries are all at or below this value is "fully masked": its output is the
/// uniform distribution (as with PyTorch's `masked_fill(-1e9)` + softmax), never NaN.
pub const FULLY_MASKED: f32 = -1.0e4;

/// softmax(scores * scale + mask) over the last dim, computed in f32.
///
/// `scores`: (B, H, Tq, Tk) in f32/bf16/f16 (any rank >= 1 works, any strides); `mask`: additive,
/// broadcastable to `scores` (typically (B, 1, 1|Tq, Tk)), 0 or a large negative finite number such
/// as -1e9. A row whose mask is entirely <= -1e4 gives a uniform row. The output has dtype `out`.
/// The gradient flows to `scores` only: `scale * y * (dy - sum(y * dy))`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64, out: DType) -> Result<Tensor> {
    ensure_float(OP, &[out, scores.dtype()])?;
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
    if scores.device().is_cpu() && scores.rank() >= 1 {
        let op = MaskedSoftmax {
            scale: scale as f32,
            out,
        };
        scores.apply_op2(&mask, Op(op))
    } else {
        reference(scores, &mask, scale, out)
    }
}

/// The straightforward differentiable composition (used off-CPU and as the test oracle).
pub fn reference(scores: &Tensor, mask: &Tensor, scale: f64, out: DType) -> Result<Tensor> {
    let z = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(mask)?;
    // The shift by the row max cancels out of softmax: no gradient through it.
    let max = z.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = z.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(candle_core::D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(out)
}

struct MaskedSoftmax {
    scale: f32,
    out: DType,
}

fn softmax_fwd<T: Elem, O: Elem>(
    scores: &[T],
    sl: &Layout,
    mask: &[f32],
    ml: &Layout,
    scale: f32,
) -> Vec<O> {
    map_rows2(scores, sl, mask, ml, |_, z, m| {
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
    })
}

impl Fused2 for MaskedSoftmax {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let mask = f32_slice(OP, s2, "f32 mask")?;
        let storage = with_float!(s1, OP, |s: T| with_out_dtype!(self.out, OP, |O| {
            O::wrap(softmax_fwd::<T, O>(s, l1, mask, l2, self.scale))
        }));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(&self, [scores, _mask]: [&Tensor; 2], res: &Tensor, grad_res: &Tensor) -> Grads<2> {
        let op = SoftmaxBwd {
            scale: self.scale,
            out: scores.dtype(),
        };
        let g = res.apply_op2_no_bwd(grad_res, &Op(op))?;
        Ok([Some(g), None])
    }
}

/// dscores = scale * y * (dy - sum(y * dy)), in the scores' dtype.
struct SoftmaxBwd {
    scale: f32,
    out: DType,
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
        let s = scores.to_dtype(dt)?;
        let var_a = Var::from_tensor(&s)?;
        let var_b = Var::from_tensor(&s)?;
        let ya = masked_softmax(var_a.as_tensor(), mask, scale, out)?;
        let yb = reference(var_b.as_tensor(), mask, scale, out)?;
        assert_eq!(ya.dtype(), out);
        assert_eq!(ya.dims(), scores.dims());
        let diff = max_abs_diff(&ya, &yb)?;
        assert!(diff <= tol, "forward diff {diff} ({dt:?} -> {out:?})");
        // Rows sum to one.
        let sums = ya.to_dtype(DType::F32)?.sum(candle_core::D::Minus1)?;
        let sd = max_abs_diff(&sums, &sums.ones_like()?)?;
        assert!(sd < 2e-2, "row sums off by {sd}");
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
        let y = masked_softmax(&scores, &m, 1.0, DType::F32)?;
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
        let y = masked_softmax(var.as_tensor(), &m, 1.0, DType::F32)?;
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
}
