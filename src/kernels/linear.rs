//! `x @ w.T` for a linear layer as one graph node.
//!
//! Through plain tensor ops a linear layer is `reshape -> transpose(w) -> matmul -> reshape`: four
//! nodes, and candle's backward allocates a zeroed gradient buffer and runs an accumulation add
//! for each of them. This op runs the same candle CPU GEMM on the storage directly (the reshape
//! and the transpose are only layouts) and has its own backward (two GEMMs).

use super::fused::{Arg, Fused2, Grads, Op, Out};
use super::KernelError;
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, Result, Shape, Tensor, D};

const OP: &str = "linear";

/// `x @ w.T`: x (..., in), w (out, in), same float dtype; returns (..., out), one node: f32 and
/// f16 through candle's CPU GEMM, bf16 through the packed bf16 GEMM (`kernels::matmul`) where
/// the CPU has one, otherwise (and off the CPU) as a composition.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if x.dim(D::Minus1)? != inp || x.dtype() != w.dtype() {
        return Err(KernelError::Shape {
            op: OP,
            msg: format!(
                "input {:?} {:?} and weight {:?} {:?}",
                x.dims(),
                x.dtype(),
                w.dims(),
                w.dtype()
            ),
        }
        .into());
    }
    let bf16 = match x.dtype() {
        DType::BF16 => super::matmul::cpu_bf16_kernel(),
        _ => None,
    };
    let fused =
        x.device().is_cpu() && (matches!(x.dtype(), DType::F32 | DType::F16) || bf16.is_some());
    if !fused {
        return reference(x, w, super::matmul);
    }
    let _ = out;
    let xc = x.contiguous()?;
    crate::counters::candle_node(x, &xc, crate::counters::NodeCost::COPY);
    let y = xc.apply_op2(w, Op(Linear { bf16 }))?;
    crate::counters::fused_node(&y, 2);
    Ok(y)
}

/// The composition: reshape to 2-D, matmul with `w.t()` through `mm`, reshape back.
pub fn reference(
    x: &Tensor,
    w: &Tensor,
    mm: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&1);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    use crate::counters::{candle_node, NodeCost};
    let x2 = x.reshape((rows, inp))?;
    candle_node(x, &x2, NodeCost::VIEW);
    let wt = w.t()?;
    candle_node(w, &wt, NodeCost::VIEW);
    // `mm` declares its own node (kernels::matmul does)
    let y = mm(&x2, &wt)?;
    let mut out = dims;
    if let Some(l) = out.last_mut() {
        *l = w.dim(0)?;
    }
    let o = y.reshape(out)?;
    candle_node(&y, &o, NodeCost::VIEW);
    Ok(o)
}

/// `bf16`: the packed GEMM kernel for bf16 operands (`None`: candle's GEMM, f32/f16).
struct Linear {
    bf16: Option<super::matmul::Kernel>,
}

impl Fused2 for Linear {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let dims = l1.dims();
        let inp = *dims.last().unwrap_or(&1);
        let rows = l1.shape().elem_count() / inp.max(1);
        let (out, _) = l2.shape().dims2()?;
        if !l1.is_contiguous() {
            return Err(KernelError::NotContiguous {
                op: OP,
                what: "the input",
            }
            .into());
        }
        let lhs = Layout::contiguous_with_offset((rows, inp), l1.start_offset());
        let rhs = l2.transpose(0, 1)?; // (in, out) view of w
        let y = match self.bf16 {
            Some(k) => super::matmul::gemm_bf16_storage((s1, &lhs), (s2, &rhs), k)?.0,
            None => s1.matmul(s2, (1, rows, out, inp), &lhs, &rhs)?,
        };
        let mut shape = dims.to_vec();
        if let Some(l) = shape.last_mut() {
            *l = out;
        }
        Ok((y, Shape::from(shape)))
    }

    fn bwd(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp.max(1);
        let g = crate::counters::cast(grad, x.dtype())?.reshape((rows, out))?;
        let x2 = x.detach().reshape((rows, inp))?;
        if let Some(k) = self.bf16 {
            // two packed GEMMs (each counts itself); dw = (gᵀ x) through the transposed view
            let dx = super::matmul::gemm_bf16_no_bwd(&g, &w.detach(), k)?.reshape(x.shape())?;
            let dw = super::matmul::gemm_bf16_no_bwd(&g.t()?, &x2, k)?;
            return Ok([Some(dx), Some(dw)]);
        }
        // dx and dw: two GEMMs
        crate::counters::device_ops(2);
        let dx = g.matmul(&w.detach())?.reshape(x.shape())?;
        let dw = g.t()?.matmul(&x2)?;
        Ok([Some(dx), Some(dw)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
    use candle_core::Var;

    fn run(
        f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (xv, wv) = (Var::from_tensor(x)?, Var::from_tensor(w)?);
        let y = f(xv.as_tensor(), wv.as_tensor())?;
        let g = y.to_dtype(DType::F32)?.mul(r)?.sum_all()?.backward()?;
        Ok((
            y,
            g.get(xv.as_tensor()).unwrap().clone(),
            g.get(wv.as_tensor()).unwrap().clone(),
        ))
    }

    #[test]
    fn matches_reshape_transpose_matmul_forward_and_backward() -> Result<()> {
        for (dt, tol) in [
            (DType::F32, 1e-5f32),
            (DType::F16, 3e-3),
            (DType::BF16, 2e-2),
        ] {
            let x = randn(&[3, 7, 24], 1, 1.0)?.to_dtype(dt)?;
            let w = randn(&[40, 24], 2, 0.3)?.to_dtype(dt)?;
            let r = randn(&[3, 7, 40], 3, 1.0)?;
            let (yf, dxf, dwf) = run(linear, &x, &w, &r)?;
            let (yr, dxr, dwr) = run(|x, w| reference(x, w, |a, b| a.matmul(b)), &x, &w, &r)?;
            assert_eq!(yf.dims(), &[3, 7, 40]);
            assert_eq!(yf.dtype(), dt);
            for (name, a, b) in [("y", &yf, &yr), ("dx", &dxf, &dxr), ("dw", &dwf, &dwr)] {
                assert_eq!(a.dims(), b.dims(), "{dt:?} {name}");
                assert_eq!(a.dtype(), b.dtype(), "{dt:?} {name}");
                let d = max_abs_diff(a, b)?;
                let s = max_abs(b)?;
                assert!(s > 0.1, "{dt:?} {name}: all zero");
                assert!(d <= tol * s, "{dt:?} {name}: differs by {d} (max {s})");
            }
        }
        Ok(())
    }

    #[test]
    fn strided_input_and_mismatched_shapes() -> Result<()> {
        let x = randn(&[24, 5], 4, 1.0)?.t()?; // (5, 24), non-contiguous
        let w = randn(&[8, 24], 5, 1.0)?;
        let want = x.matmul(&w.t()?)?;
        assert!(max_abs_diff(&linear(&x, &w)?, &want)? < 1e-5);
        assert!(linear(&x, &randn(&[8, 23], 5, 1.0)?).is_err());
        assert!(linear(&x, &w.to_dtype(DType::F16)?).is_err());
        Ok(())
    }
}
