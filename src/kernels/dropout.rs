//! Inverted dropout with a counter-based mask: `x * mask * scale` as one op, whose backward is
//! the same op on the gradient. [`DropMask`] is shared with the fused epilogues (`bias_act`,
//! `residual_dropout`, `masked_softmax`) that apply a mask in their own pass.
//!
//! The mask is no memory at all: element `i` (the flat row-major index into the op's logical
//! output) is kept when [`keep_bits`]`(seed, i) < threshold`, a pure function of a 64-bit seed.
//! The CUDA kernels compute the same bits (`kernels/cuda/common.cuh`), so a mask is identical on
//! the CPU and the GPU, nothing is uploaded, and a backward pass recomputes it from the seed.

use super::fused::{Arg, Fused1, Grads, Op, Out};
use super::plumbing::{ensure_float, map_rows, shape_err};
use super::{with_float, with_out_dtype, Elem};
use candle_core::{DType, Result, Shape, Tensor};
use rand::Rng;

const OP: &str = "dropout";

/// The 24 random bits of element `i` under `seed`: the splitmix64 finaliser of
/// `seed + i * golden` (the same integer math as `keep_bits` in `kernels/cuda/common.cuh`).
#[inline(always)]
pub fn keep_bits(seed: u64, i: u64) -> u32 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as u32
}

/// An inverted-dropout mask over `len` elements: element `i` is kept (multiplied by `scale` =
/// `1 / (1 - p)`) when `keep_bits(seed, i) < threshold`, `threshold = round((1 - p) * 2^24)`,
/// and zeroed otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropMask {
    seed: u64,
    threshold: u32,
    scale: f32,
    len: usize,
}

impl DropMask {
    /// A mask for `len` elements with drop probability `p` in [0, 1).
    pub fn new(seed: u64, len: usize, p: f64) -> Self {
        let keep_p = (1.0 - p).clamp(0.0, 1.0);
        Self {
            seed,
            threshold: (keep_p * (1u64 << 24) as f64).round() as u32,
            scale: (1.0 / keep_p) as f32,
            len,
        }
    }

    /// A mask whose seed is the next draw of `rng` (so seeded runs replay the same masks).
    pub fn sample(len: usize, p: f64, rng: &mut rand::rngs::StdRng) -> Self {
        Self::new(rng.gen::<u64>(), len, p)
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Element `i` is kept when its 24 random bits are below this.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// The factor kept elements are multiplied by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether element `i` is kept.
    #[inline(always)]
    pub fn keeps(&self, i: usize) -> bool {
        keep_bits(self.seed, i as u64) < self.threshold
    }

    /// `scale` for a kept element, 0 for a dropped one.
    #[inline(always)]
    pub fn factor(&self, i: usize) -> f32 {
        if self.keeps(i) {
            self.scale
        } else {
            0.0
        }
    }

    /// The mask as an f32 tensor of `scale` (kept) and 0 (dropped), for the reference
    /// compositions.
    pub fn to_tensor(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..self.len).map(|i| self.factor(i)).collect();
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
    super::count_cpu_op(x.device());
    super::cuda_contiguous(x)?.apply_op1(Op(Dropout {
        m: *m,
        out: x.dtype(),
    }))
}

/// The mask applied to a tensor outside the graph (a gradient in a backward pass), the result
/// in dtype `out`: one pass, the cast fused in.
pub(crate) fn apply_mask(g: &Tensor, m: &DropMask, out: DType) -> Result<Tensor> {
    super::count_cpu_op(g.device());
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
    use rand::SeedableRng;

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
    fn the_mask_is_a_pure_function_of_seed_and_index() {
        // splitmix64 of seed 0 at index 1 (seed + golden): the published first output
        // 0xE220A8397B1DCDAF, whose top 24 bits are 0xE220A8.
        assert_eq!(keep_bits(0, 1), 0xE2_20A8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let m = DropMask::sample(1000, 0.25, &mut rng);
        let again = DropMask::new(m.seed(), 1000, 0.25);
        assert!((0..1000).all(|i| m.keeps(i) == again.keeps(i)));
        let other = DropMask::new(m.seed() ^ 1, 1000, 0.25);
        assert!((0..1000).any(|i| m.keeps(i) != other.keeps(i)));
        assert_eq!(m.threshold(), 12_582_912);
        assert!((m.scale() - 1.0 / 0.75).abs() < 1e-7);
        assert_eq!(m.factor(0), if m.keeps(0) { m.scale() } else { 0.0 });
    }
}
