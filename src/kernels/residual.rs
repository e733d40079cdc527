//! `x + dropout(sub)` into the f32 residual stream as one op: `sub` (a sublayer output in any
//! float dtype) is upcast, masked and added in one pass, the output f32.

use super::dropout::{apply_mask, DropMask};
use super::fused::{Arg, Fused2, Grads, Op, Out};
use super::plumbing::{dtype_err, f32_slice, map_rows2, shape_err};
use super::{is_float, with_float};
use candle_core::{CpuStorage, DType, Result, Tensor};

const OP: &str = "residual_dropout";
const EXPECTED: &str = "an f32 residual and an f32, bf16 or f16 sublayer output";

/// `x + dropout(sub as f32)` (used off-CPU and as the test oracle).
pub fn reference(x: &Tensor, sub: &Tensor, drop: Option<&DropMask>) -> Result<Tensor> {
    let s = sub.to_dtype(DType::F32)?;
    let s = match drop {
        Some(m) => super::dropout::reference(&s, m)?,
        None => s,
    };
    x + s
}

/// `x + dropout(sub)` in f32: `x` is the f32 residual stream, `sub` a sublayer output of the same
/// shape in any float dtype. Gradients: `grad` to `x`, `grad * mask * scale` (in `sub`'s dtype)
/// to `sub`.
pub fn residual_dropout(x: &Tensor, sub: &Tensor, drop: Option<&DropMask>) -> Result<Tensor> {
    if x.dims() != sub.dims() {
        return Err(shape_err(
            OP,
            format!("residual {:?} and sublayer {:?}", x.dims(), sub.dims()),
        ));
    }
    if let Some(m) = drop {
        m.check(OP, x.elem_count())?;
    }
    if x.dtype() != DType::F32 {
        return Err(dtype_err(OP, x.dtype(), EXPECTED));
    }
    if !is_float(sub.dtype()) {
        return Err(dtype_err(OP, sub.dtype(), EXPECTED));
    }
    if !super::has_kernel(x.device()) {
        return reference(x, sub, drop);
    }
    let op = ResidualDropout {
        drop: drop.copied(),
    };
    super::cuda_contiguous(x)?.apply_op2(&super::cuda_contiguous(sub)?, Op(op))
}

struct ResidualDropout {
    drop: Option<DropMask>,
}

impl Fused2 for ResidualDropout {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let x = f32_slice(OP, s1, "an f32 residual")?;
        let d = l1.dims().last().copied().unwrap_or(1);
        let drop = self.drop.as_ref();
        let out = with_float!(s2, OP, |s: T| {
            map_rows2::<f32, T, f32>(x, l1, s, l2, |r, o, v| match drop {
                Some(m) => {
                    for (i, (o, v)) in o.iter_mut().zip(v.iter()).enumerate() {
                        *o += *v * m.factor(r * d + i);
                    }
                }
                None => {
                    for (o, v) in o.iter_mut().zip(v.iter()) {
                        *o += *v;
                    }
                }
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: super::fused::CudaArg,
        b: super::fused::CudaArg,
    ) -> super::fused::CudaOut {
        let out = super::cuda::epilogue::residual_fwd(a, b, self.drop.as_ref())?;
        Ok((out, a.1.shape().clone()))
    }

    fn bwd(&self, [_x, sub]: [&Tensor; 2], _res: &Tensor, grad_res: &Tensor) -> Grads<2> {
        // The mask and the cast to the sublayer's dtype in one pass (one launch on a GPU).
        let dsub = match &self.drop {
            Some(m) => apply_mask(grad_res, m, sub.dtype())?,
            None => crate::counters::cast(grad_res, sub.dtype())?,
        };
        Ok([Some(grad_res.clone()), Some(dsub)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{compare, mask, randn};
    use candle_core::DType;

    #[test]
    fn residual_dropout_matches_composition() -> Result<()> {
        let m = mask(3 * 5 * 24, 0.2, 10);
        for (dt, tol) in [
            (DType::F32, 1e-6f32),
            (DType::BF16, 1e-2),
            (DType::F16, 2e-3),
        ] {
            let x = randn(&[3, 5, 24], 11, 1.0)?;
            let s = randn(&[3, 5, 24], 12, 1.0)?.to_dtype(dt)?;
            for drop in [None, Some(&m)] {
                compare(
                    |t| residual_dropout(&t[0], &t[1], drop),
                    |t| reference(&t[0], &t[1], drop),
                    &[x.clone(), s.clone()],
                    tol,
                )?;
            }
        }
        let x = randn(&[3, 5, 24], 11, 1.0)?;
        assert!(residual_dropout(&x.to_dtype(DType::BF16)?, &x, None).is_err());
        assert!(residual_dropout(&x, &x.narrow(2, 0, 20)?, None).is_err());
        Ok(())
    }
}
