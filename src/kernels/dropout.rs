//! Inverted dropout with a counter-based mask: `x * mask * scale` as one op, whose backward is
//! the same op on the gradient. [`DropMask`] is shared with the fused epilogues (`bias_act`,
//! `residual_dropout`, `masked_softmax`) that apply a mask in their own pass.
//!
//! The mask is not stored anywhere: element `i` is kept when [`keep_bits`]`(seed, i)` is below a
//! threshold, a pure function of a 64-bit seed and the element's flat index. The CPU kernels and
//! the CUDA kernels compute the same bits, so a mask costs nothing to draw or upload on either
//! device, the backward recomputes it from the seed, and a run resumed at step `t` replays the
//! masks of the uninterrupted run (the seeds are a function of the run seed, the step and the
//! dropout site, see `model::Ctx`).

use super::fused::{Arg, Fused1, Grads, Op, Out};
use super::plumbing::{ensure_float, map_rows, shape_err};
use super::{with_float, with_out_dtype, Elem};
use candle_core::{DType, Result, Shape, Tensor};

const OP: &str = "dropout";

/// 24 pseudo-random bits for element `i` of the mask with seed `seed`: the splitmix64 finaliser
/// of `seed + i * golden`. The CUDA kernels compute exactly this (`kernels/cuda`).
#[inline(always)]
pub fn keep_bits(seed: u64, i: u64) -> u32 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as u32
}

/// An inverted-dropout mask over `len` elements: element `i` is kept (and multiplied by
/// `scale = 1 / (1 - p)`) when `keep_bits(seed, i) < threshold`, `threshold = round((1 - p) * 2^24)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropMask {
    seed: u64,
    threshold: u32,
    scale: f32,
    len: usize,
}

impl DropMask {
    /// The mask with seed `seed` for `len` elements and drop probability `p` in (0, 1).
    pub fn new(seed: u64, len: usize, p: f64) -> Self {
        let keep_p = (1.0 - p).clamp(0.0, 1.0);
        Self {
            seed,
            threshold: (keep_p * (1u32 << 24) as f64).round() as u32,
            scale: if keep_p > 0.0 {
                (1.0 / keep_p) as f32
            } else {
                0.0
            },
            len,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Elements whose [`keep_bits`] are below this are kept.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The factor kept elements are multiplied by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether element `i` (flat row-major index) is kept.
    #[inline(always)]
    pub fn keeps(&self, i: usize) -> bool {
        keep_bits(self.seed, i as u64) < self.threshold
    }

    /// `scale` where element `i` is kept, 0 where it is dropped.
    #[inline(always)]
    pub fn factor(&self, i: usize) -> f32 {
        if self.keeps(i) {
            self.scale
        } else {
            0.0
        }
    }

    /// The mask as an f32 tensor of `scale` (kept) and 0 (dropped), for the reference
    /// compositions (which upload it: they are the oracle, not the training path).
    pub fn to_tensor(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..self.len).map(|i| self.factor(i)).collect();
        crate::counters::h2d_bytes((v.len() * 4) as u64);
        Tensor::from_vec(v, shape, device)
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
    if !super::has_kernel(x.device()) {
        return reference(x, m);
    }
    super::cuda_contiguous(x)?.apply_op1(Op(Dropout {
        m: *m,
        out: x.dtype(),
    }))
}

/// The mask applied to a tensor outside the graph (a gradient in a backward pass), the result
/// in dtype `out`: one pass (one launch), the cast fused in.
pub(crate) fn apply_mask(g: &Tensor, m: &DropMask, out: DType) -> Result<Tensor> {
    super::cuda_contiguous(g)?.apply_op1_no_bwd(&Op(Dropout { m: *m, out }))
}

struct Dropout {
    m: DropMask,
    /// The output dtype.
    out: DType,
}

impl Fused1 for Dropout {
    const NAME: &'static str = OP;

    fn fwd(&self, (s, l): Arg) -> Out {
        let d = l.dims().last().copied().unwrap_or(1);
        let m = &self.m;
        let storage = with_float!(s, OP, |x: T| with_out_dtype!(self.out, OP, |O| {
            O::wrap(map_rows::<T, O>(x, l, |r, z| {
                for (i, zi) in z.iter_mut().enumerate() {
                    *zi *= m.factor(r * d + i);
                }
            }))
        }));
        Ok((storage, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, (s, l): super::fused::CudaArg) -> super::fused::CudaOut {
        let y = super::cuda::epilogue::dropout((s, l), &self.m, self.out)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, [arg]: [&Tensor; 1], _res: &Tensor, grad_res: &Tensor) -> Grads<1> {
        Ok([Some(apply_mask(grad_res, &self.m, arg.dtype())?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{compare, mask, randn};
    use candle_core::DType;

    #[test]
    fn dropout_matches_composition_and_keeps_the_expected_share() -> Result<()> {
        let m = mask(4 * 9 * 33, 0.1, 8);
        let kept = (0..m.len()).filter(|&i| m.keeps(i)).count() as f64 / m.len() as f64;
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
    fn masks_keep_the_share_asked_for_and_differ_between_seeds() {
        for p in [0.1, 0.3, 0.5] {
            let n = 200_000;
            let a = DropMask::new(1, n, p);
            let kept = (0..n).filter(|&i| a.keeps(i)).count() as f64 / n as f64;
            // binomial sd at n = 2e5 is ~0.001
            assert!((kept - (1.0 - p)).abs() < 0.005, "p {p}: kept share {kept}");
            // neighbouring seeds (what consecutive dropout sites get) are uncorrelated
            let b = DropMask::new(2, n, p);
            let both = (0..n).filter(|&i| a.keeps(i) && b.keeps(i)).count() as f64 / n as f64;
            let want = (1.0 - p) * (1.0 - p);
            assert!(
                (both - want).abs() < 0.005,
                "p {p}: joint keep {both}, independent {want}"
            );
            // and neighbouring elements too
            let pairs = (0..n - 1).filter(|&i| a.keeps(i) && a.keeps(i + 1)).count() as f64;
            assert!((pairs / (n - 1) as f64 - want).abs() < 0.005);
        }
        assert_eq!(DropMask::new(5, 10, 0.1).threshold(), 15_099_494);
        assert!((DropMask::new(5, 10, 0.25).scale() - 1.0 / 0.75).abs() < 1e-7);
    }

    #[test]
    fn keep_bits_is_the_splitmix64_finaliser() {
        // splitmix64's published first output for state 0 after one increment
        // (0x9E3779B97F4A7C15) is 0xE220A8397B1DCDAF: keep_bits(0, 1) is its top 24 bits.
        assert_eq!(keep_bits(0, 1), 0xE220A8);
        assert_eq!(keep_bits(0x9E37_79B9_7F4A_7C15, 0), 0xE220A8);
    }
}
