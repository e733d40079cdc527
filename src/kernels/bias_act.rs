//! The linear-layer epilogue `dropout(act(y + b))` for a linear output `y` (rows, n) and a bias
//! (n), with `act` ReLU or identity, reshaped to the layer's output shape, as one op. The
//! backward computes `dy` and the bias gradient (a column sum of `dy`) in the same pass over the
//! rows. It replaces three to five candle ops (and as many zero-initialised gradient buffers and
//! accumulation adds in candle's backward pass).

use super::dropout::DropMask;
use super::fused::{Arg, Fused2, Grads, Op, Out};
use super::plumbing::{
    add_into, dtype_err, ensure_float, load_f32, map_rows, par_row_blocks, shape_err,
    tensor_from_cpu, CpuTensor,
};
use super::{with_float, Elem, Rows};
use candle_core::{Layout, Result, Shape, Tensor};

const OP: &str = "bias_act";

/// `dropout(act(y + b))` reshaped to `out_shape` (used off-CPU and as the test oracle).
pub fn reference(
    y: &Tensor,
    b: &Tensor,
    relu: bool,
    drop: Option<&DropMask>,
    out_shape: &[usize],
) -> Result<Tensor> {
    let z = y.broadcast_add(b)?;
    let z = if relu { z.relu()? } else { z };
    let z = match drop {
        Some(m) => super::dropout::reference(&z, m)?,
        None => z,
    };
    z.reshape(out_shape)
}

/// `dropout(act(y + b))` for a linear output `y` (..., n) and bias `b` (n) of the same float
/// dtype, returned with shape `out_shape` (same element count, last dim n) in `y`'s dtype.
/// Gradients flow to `y` and `b`.
pub fn bias_act(
    y: &Tensor,
    b: &Tensor,
    relu: bool,
    drop: Option<&DropMask>,
    out_shape: &[usize],
) -> Result<Tensor> {
    let n = y.dim(candle_core::D::Minus1)?;
    let rows = y.elem_count() / n.max(1);
    if b.dims() != [n] {
        return Err(shape_err(
            OP,
            format!("bias {:?} for output {:?}", b.dims(), y.dims()),
        ));
    }
    if out_shape.iter().product::<usize>() != rows * n || out_shape.last() != Some(&n) {
        return Err(shape_err(
            OP,
            format!("output shape {out_shape:?} for {:?}", y.dims()),
        ));
    }
    if let Some(m) = drop {
        m.check(OP, rows * n)?;
    }
    ensure_float(OP, &[y.dtype()])?;
    if b.dtype() != y.dtype() {
        return Err(dtype_err(OP, b.dtype(), "a bias in the output's dtype"));
    }
    if !super::has_kernel(y.device()) {
        return reference(y, b, relu, drop, out_shape);
    }
    let op = BiasAct {
        relu,
        drop: drop.copied(),
        out_shape: Shape::from(out_shape.to_vec()),
    };
    super::cuda_contiguous(y)?.apply_op2(&super::cuda_contiguous(b)?, Op(op))
}

struct BiasAct {
    relu: bool,
    drop: Option<DropMask>,
    out_shape: Shape,
}

impl Fused2 for BiasAct {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let b = load_f32(OP, s2, l2)?;
        let n = b.len();
        let relu = self.relu;
        let drop = self.drop.as_ref();
        let storage = with_float!(s1, OP, |y: T| {
            T::wrap(map_rows::<T, T>(y, l1, |r, z| {
                for (zi, bi) in z.iter_mut().zip(&b) {
                    *zi += *bi;
                }
                if relu {
                    for zi in z.iter_mut() {
                        *zi = zi.max(0.0);
                    }
                }
                if let Some(m) = drop {
                    for (i, zi) in z.iter_mut().enumerate() {
                        *zi *= m.factor(r * n + i);
                    }
                }
            }))
        });
        Ok((storage, self.out_shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: super::fused::CudaArg,
        b: super::fused::CudaArg,
    ) -> super::fused::CudaOut {
        let out = super::cuda::epilogue::bias_act_fwd(a, b, self.relu, self.drop.as_ref())?;
        Ok((out, self.out_shape.clone()))
    }

    fn bwd(&self, [y, b]: [&Tensor; 2], res: &Tensor, grad_res: &Tensor) -> Grads<2> {
        let n = y.dim(candle_core::D::Minus1)?;
        let rows = y.elem_count() / n.max(1);
        let g = crate::counters::cast(grad_res, y.dtype())?;
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            let g = super::cuda_contiguous(&g)?;
            let res = super::cuda_contiguous(res)?;
            let (dy, db) = super::cuda::with_storage(OP, &g, |gs, gl| {
                super::cuda::with_storage(OP, &res, |rs, rl| {
                    super::cuda::epilogue::bias_act_bwd(
                        (gs, gl),
                        (rs, rl),
                        self.relu,
                        self.drop.as_ref(),
                    )
                })
            })?;
            let dy = super::cuda::tensor(dy, y.shape());
            let db = super::cuda::tensor(db, n).to_dtype(b.dtype())?;
            return Ok([Some(dy), Some(db)]);
        }
        // dy and db in one pass
        crate::counters::device_ops(1);
        let (g, res) = (CpuTensor::of(&g, OP)?, CpuTensor::of(res, OP)?);
        let (dy, db) = with_float!(g.storage(), OP, |gv: T| {
            let res_v: &[T] = match res.storage() {
                s if self.relu => T::slice(s)
                    .ok_or_else(|| shape_err(OP, "output and gradient dtypes differ".into()))?,
                _ => &[],
            };
            let (dy, db) = self.backward::<T>(gv, g.layout(), res_v, res.layout());
            (T::wrap(dy), db)
        });
        let dy = tensor_from_cpu(OP, dy, (rows, n))?.reshape(y.shape())?;
        let db = Tensor::from_vec(db, n, y.device())?.to_dtype(b.dtype())?;
        Ok([Some(dy), Some(db)])
    }
}

impl BiasAct {
    /// dy = grad * act'(.) * mask * scale (rows, n), and db = the column sums of dy in f32, in one
    /// parallel pass over row blocks.
    fn backward<T: Elem>(
        &self,
        g: &[T],
        gl: &Layout,
        res: &[T],
        rl: &Layout,
    ) -> (Vec<T>, Vec<f32>) {
        let (rg, rr) = (Rows::new(gl), Rows::new(rl));
        let (rows, n) = (rg.n_rows, rg.d);
        let (relu, drop) = (self.relu, self.drop.as_ref());
        let mut dy = vec![T::from_f32(0.0); rows * n];
        let db = par_row_blocks(
            &mut dy,
            n,
            n,
            || (vec![0f32; n], vec![0f32; if relu { n } else { 0 }]),
            || vec![0f32; n],
            |(gv, rv), acc, r, orow| {
                rg.load(g, r, gv);
                if relu {
                    // res > 0 exactly where the unit was active and (with dropout) kept; there
                    // the factor is the dropout scale (or 1). relu'(0) = 0 as in PyTorch.
                    rr.load(res, r, rv);
                    let s = drop.map_or(1.0, |m| m.scale());
                    for (gi, ri) in gv.iter_mut().zip(rv.iter()) {
                        *gi *= if *ri > 0.0 { s } else { 0.0 };
                    }
                } else if let Some(m) = drop {
                    for (i, gi) in gv.iter_mut().enumerate() {
                        *gi *= m.factor(r * n + i);
                    }
                }
                for (a, gi) in acc.iter_mut().zip(gv.iter()) {
                    *a += *gi;
                }
                T::store(gv, orow);
            },
            add_into,
        );
        (dy, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{compare, mask, randn};
    use candle_core::DType;

    #[test]
    fn bias_act_matches_composition_forward_and_backward() -> Result<()> {
        let (rows, n) = (37, 70);
        for (dt, tol) in [
            (DType::F32, 1e-5f32),
            (DType::BF16, 2e-2),
            (DType::F16, 3e-3),
        ] {
            let y = randn(&[rows, n], 1, 1.0)?.to_dtype(dt)?;
            let b = randn(&[n], 2, 0.5)?.to_dtype(dt)?;
            // In bf16 some y + b are exactly 0, where candle's relu backward takes slope 1 and
            // ours (PyTorch's) slope 0: move those away from the kink.
            let at_zero = y.broadcast_add(&b)?.eq(0.0)?.to_dtype(dt)?;
            let y = (y + (at_zero * 0.25)?)?;
            let m = mask(rows * n, 0.3, 3);
            for relu in [false, true] {
                for drop in [None, Some(&m)] {
                    let shape = [rows, 1, n];
                    compare(
                        |t| bias_act(&t[0], &t[1], relu, drop, &shape),
                        |t| reference(&t[0], &t[1], relu, drop, &shape),
                        &[y.clone(), b.clone()],
                        tol,
                    )?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bias_act_on_a_strided_input_and_shape_errors() -> Result<()> {
        let y = randn(&[20, 12], 4, 1.0)?.t()?; // (12, 20), non-contiguous
        assert!(!y.is_contiguous());
        let b = randn(&[20], 5, 1.0)?;
        let m = mask(240, 0.5, 6);
        compare(
            |t| bias_act(&t[0], &t[1], true, Some(&m), &[3, 4, 20]),
            |t| reference(&t[0], &t[1], true, Some(&m), &[3, 4, 20]),
            &[y.clone(), b.clone()],
            1e-5,
        )?;
        let short = mask(10, 0.5, 6);
        assert!(bias_act(&y, &b, true, Some(&short), &[12, 20]).is_err());
        assert!(bias_act(&y, &b.narrow(0, 0, 10)?, true, None, &[12, 20]).is_err());
        assert!(bias_act(&y, &b, true, None, &[12, 21]).is_err());
        Ok(())
    }
}
