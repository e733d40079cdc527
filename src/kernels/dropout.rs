//! Inverted dropout with a byte mask: `x * mask * scale` as one op, whose backward is the same
//! op on the gradient. [`DropMask`] is shared with the fused epilogues (`bias_act`,
//! `residual_dropout`) that apply a mask in their own pass.

use super::fused::{Arg, Fused1, Grads, Op, Out};
use super::plumbing::{ensure_float, map_rows, shape_err};
use super::{with_float, Elem};
use candle_core::{Result, Shape, Tensor};
use rand::Rng;
use std::sync::Arc;

const OP: &str = "dropout";

/// An inverted-dropout mask: one byte per element (1 keep, 0 drop) and the `1 / (1 - p)` scale
/// kept elements are multiplied by.
#[derive(Clone, Debug)]
pub struct DropMask {
    keep: Arc<Vec<u8>>,
    scale: f32,
}

impl DropMask {
    /// Draws a mask for `n` elements with drop probability `p` in (0, 1): element `i` is kept when
    /// the `i`-th `rng.gen::<f64>()` is below `1 - p` (the same draws, in the same order, as the
    /// f32-mask dropout this replaces, so seeded runs replay the same masks).
    pub fn sample(n: usize, p: f64, rng: &mut rand::rngs::StdRng) -> Self {
        let keep_p = 1.0 - p;
        let keep = (0..n)
            .map(|_| u8::from(rng.gen::<f64>() < keep_p))
            .collect();
        Self {
            keep: Arc::new(keep),
            scale: (1.0 / keep_p) as f32,
        }
    }

    /// A mask from explicit keep flags (for tests).
    pub fn from_keep(keep: Vec<bool>, p: f64) -> Self {
        Self {
            keep: Arc::new(keep.into_iter().map(u8::from).collect()),
            scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    pub fn len(&self) -> usize {
        self.keep.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keep.is_empty()
    }

    /// The factor kept elements are multiplied by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The keep flags, one byte per element in row-major order.
    pub fn keep(&self) -> &[u8] {
        &self.keep
    }

    /// The mask as an f32 tensor of `scale` (kept) and 0 (dropped), for the reference
    /// compositions.
    pub fn to_tensor(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        let v: Vec<f32> = self
            .keep
            .iter()
            .map(|&k| if k != 0 { self.scale } else { 0.0 })
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    #[inline(always)]
    pub(crate) fn factor(&self, i: usize) -> f32 {
        if self.keep[i] != 0 {
            self.scale
        } else {
            0.0
        }
    }

    /// Fails unless the mask covers exactly `n` elements.
    pub(crate) fn check(&self, op: &'static str, n: usize) -> Result<()> {
        if self.len() != n {
            return Err(shape_err(
                op,
                format!("dropout mask has {} elements, tensor has {n}", self.len()),
            ));
        }
        Ok(())
    }
}

/// `x * mask * scale` with the f32 mask cast to `x`'s dtype (used off-CPU and as the test oracle).
pub fn reference(x: &Tensor, m: &DropMask) -> Result<Tensor> {
    let mt = m.to_tensor(x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mt)
}

/// Inverted dropout `x * mask * scale` in `x`'s dtype; the gradient is `grad * mask * scale`.
pub fn dropout(x: &Tensor, m: &DropMask) -> Result<Tensor> {
    m.check(OP, x.elem_count())?;
    ensure_float(OP, &[x.dtype()])?;
    if !x.device().is_cpu() {
        return reference(x, m);
    }
    x.apply_op1(Op(Dropout { m: m.clone() }))
}

/// The mask applied to a tensor outside the graph (a gradient in a backward pass).
pub(crate) fn apply_mask(g: &Tensor, m: &DropMask) -> Result<Tensor> {
    g.apply_op1_no_bwd(&Op(Dropout { m: m.clone() }))
}

struct Dropout {
    m: DropMask,
}

impl Fused1 for Dropout {
    const NAME: &'static str = OP;

    fn fwd(&self, (s, l): Arg) -> Out {
        let d = l.dims().last().copied().unwrap_or(1);
        let m = &self.m;
        let storage = with_float!(s, OP, |x: T| {
            T::wrap(map_rows::<T, T>(x, l, |r, z| {
                for (i, zi) in z.iter_mut().enumerate() {
                    *zi *= m.factor(r * d + i);
                }
            }))
        });
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, [arg]: [&Tensor; 1], _res: &Tensor, grad_res: &Tensor) -> Grads<1> {
        let g = grad_res.to_dtype(arg.dtype())?;
        Ok([Some(apply_mask(&g, &self.m)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{compare, mask, randn};
    use candle_core::DType;
    use rand::SeedableRng;

    #[test]
    fn dropout_matches_composition_and_keeps_the_expected_share() -> Result<()> {
        let m = mask(4 * 9 * 33, 0.1, 8);
        let kept = m.keep().iter().filter(|&&k| k != 0).count() as f64 / m.len() as f64;
        assert!((kept - 0.9).abs() < 0.03, "kept share {kept}");
        for (dt, tol) in [
            (DType::F32, 1e-6f32),
            (DType::BF16, 1e-2),
            (DType::F16, 2e-3),
        ] {
            let x = randn(&[4, 9, 33], 9, 1.0)?.to_dtype(dt)?;
            compare(|t| dropout(&t[0], &m), |t| reference(&t[0], &m), &[x], tol)?;
        }
        Ok(())
    }

    #[test]
    fn mask_sampling_replays_the_f32_mask_draws() {
        // The byte mask keeps exactly where the old f32 mask had `scale`.
        let mut a = rand::rngs::StdRng::seed_from_u64(42);
        let mut b = rand::rngs::StdRng::seed_from_u64(42);
        let m = DropMask::sample(1000, 0.25, &mut a);
        for &k in m.keep() {
            let old = b.gen::<f64>() < 0.75;
            assert_eq!(k != 0, old);
        }
        assert!((m.scale() - 1.0 / 0.75).abs() < 1e-7);
    }
}
