//! Splitting a projection into attention heads and merging them back, each as one graph node.
//!
//! Through tensor ops a split is `reshape -> transpose -> contiguous` (three nodes, and candle's
//! backward zero-fills and adds for each) and a merge `transpose -> reshape` (two). Here each is
//! one permuting copy whose backward is the other one.

use super::fused::{Arg, Fused1, Grads, Op, Out};
use super::plumbing::{ensure_float, shape_err};
use super::{with_float, Elem, KernelError};
use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

const SPLIT: &str = "split_heads";
const MERGE: &str = "merge_heads";

/// (b, t, heads * d_k) -> (b, heads, t, d_k), contiguous; the gradient is merged back.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    if heads == 0 || d % heads != 0 {
        return Err(shape_err(SPLIT, format!("{d} features into {heads} heads")));
    }
    ensure_float(SPLIT, &[x.dtype()])?;
    if !x.device().is_cpu() {
        return reference_split(x, heads);
    }
    let xc = contiguous(x)?;
    let out = xc.apply_op1(Op(Heads {
        split: true,
        b,
        t,
        heads,
        dk: d / heads,
    }))?;
    crate::counters::fused_node(&out, 1);
    Ok(out)
}

/// (b, heads, t, d_k) -> (b, t, heads * d_k), contiguous; the gradient is split again.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, t, dk) = x.dims4()?;
    ensure_float(MERGE, &[x.dtype()])?;
    if !x.device().is_cpu() {
        return reference_merge(x);
    }
    let xc = contiguous(x)?;
    let out = xc.apply_op1(Op(Heads {
        split: false,
        b,
        t,
        heads,
        dk,
    }))?;
    crate::counters::fused_node(&out, 1);
    Ok(out)
}

/// The compositions (off the CPU, and the test oracle).
pub fn reference_split(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    x.reshape((b, t, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()
}

pub fn reference_merge(x: &Tensor) -> Result<Tensor> {
    let (b, heads, t, dk) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, heads * dk))
}

fn contiguous(x: &Tensor) -> Result<Tensor> {
    let c = x.contiguous()?;
    crate::counters::candle_node(x, &c, crate::counters::NodeCost::COPY);
    Ok(c)
}

#[derive(Clone, Copy)]
struct Heads {
    /// split (b, t, h, dk) -> (b, h, t, dk), or merge the other way
    split: bool,
    b: usize,
    t: usize,
    heads: usize,
    dk: usize,
}

impl Heads {
    /// The permuting copy: output row `r` (of `dk` elements) comes from input row `src_row(r)`.
    fn permute<T: Elem>(&self, x: &[T]) -> Vec<T> {
        let (t, h, dk) = (self.t, self.heads, self.dk);
        let mut out = vec![T::from_f32(0.0); self.b * t * h * dk];
        if dk == 0 {
            return out;
        }
        // output rows in blocks of one (batch, head) for a split, one (batch, position) for a merge
        let per_block = if self.split { t } else { h };
        out.par_chunks_mut(per_block * dk)
            .enumerate()
            .for_each(|(blk, o)| {
                for (j, row) in o.chunks_mut(dk).enumerate() {
                    let src = if self.split {
                        // blk = bi * h + hi, j = ti: from (bi, ti, hi)
                        let (bi, hi) = (blk / h, blk % h);
                        (bi * t + j) * h + hi
                    } else {
                        // blk = bi * t + ti, j = hi: from (bi, hi, ti)
                        let (bi, ti) = (blk / t, blk % t);
                        (bi * h + j) * t + ti
                    };
                    row.copy_from_slice(&x[src * dk..(src + 1) * dk]);
                }
            });
        out
    }

    fn out_shape(&self) -> Shape {
        if self.split {
            Shape::from((self.b, self.heads, self.t, self.dk))
        } else {
            Shape::from((self.b, self.t, self.heads * self.dk))
        }
    }
}

impl Fused1 for Heads {
    const NAME: &'static str = "heads";

    fn fwd(&self, (s, l): Arg) -> Out {
        let Some((a, z)) = l.contiguous_offsets() else {
            return Err(KernelError::NotContiguous {
                op: if self.split { SPLIT } else { MERGE },
                what: "the input",
            }
            .into());
        };
        let storage = with_float!(s, SPLIT, |x: T| T::wrap(self.permute::<T>(&x[a..z])));
        Ok((storage, self.out_shape()))
    }

    fn bwd(&self, [_x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Grads<1> {
        let inverse = Heads {
            split: !self.split,
            ..*self
        };
        let g = grad.contiguous()?;
        Ok([Some(g.apply_op1_no_bwd(&Op(inverse))?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{compare, randn};
    use candle_core::DType;

    #[test]
    fn split_and_merge_match_their_compositions_forward_and_backward() -> Result<()> {
        for (dt, tol) in [(DType::F32, 0f32), (DType::BF16, 0.0), (DType::F16, 0.0)] {
            for (b, t, h, dk) in [(2, 5, 3, 4), (1, 1, 1, 7), (3, 9, 8, 1)] {
                let x = randn(&[b, t, h * dk], 3, 1.0)?.to_dtype(dt)?;
                compare(
                    |a| split_heads(&a[0], h),
                    |a| reference_split(&a[0], h),
                    std::slice::from_ref(&x),
                    tol,
                )?;
                let y = randn(&[b, h, t, dk], 4, 1.0)?.to_dtype(dt)?;
                compare(
                    |a| merge_heads(&a[0]),
                    |a| reference_merge(&a[0]),
                    &[y],
                    tol,
                )?;
                // and they undo each other
                let back = merge_heads(&split_heads(&x, h)?)?;
                assert_eq!(crate::kernels::test_util::max_abs_diff(&back, &x)?, 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn a_split_into_heads_that_do_not_divide_the_width_is_a_shape_error() {
        let x = Tensor::zeros((1, 2, 6), DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = split_heads(&x, 4).unwrap_err().to_string();
        assert!(e.contains("6 features into 4 heads"), "{e}");
    }
}
