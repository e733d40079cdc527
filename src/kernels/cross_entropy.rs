//! Label-smoothed cross-entropy with an ignore index, fused forward and gradient.

use super::fused::{Arg, Fused2, Fused3, Grads, Op, Out};
use super::plumbing::{dtype_err, ensure_float, f32_slice, par_row_blocks, par_rows, shape_err};
use super::{fast_exp, max_f32, with_float, Elem, KernelError, Rows};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use std::sync::Mutex;

const OP: &str = "cross_entropy_ls";

/// Label-smoothed cross-entropy, as `torch.nn.CrossEntropyLoss(ignore_index=pad_id,
/// label_smoothing=eps)` with mean reduction.
///
/// `logits`: (N, V) in f32/bf16/f16 (log-softmax computed in f32); `targets`: (N) u32. Returns the
/// f32 scalar mean over non-pad rows of `(1-eps) * -logp[y] + eps * mean_c(-logp[c])`, and 0 when
/// every row is pad. The gradient wrt `logits` (in the logits' dtype) is the fused
/// `(softmax - smoothed one-hot) / n_valid` (zero on pad rows).
pub fn cross_entropy_ls(
    logits: &Tensor,
    targets: &Tensor,
    pad_id: u32,
    eps: f64,
) -> Result<Tensor> {
    let (n, v) = logits.dims2().map_err(|_| {
        shape_err(
            OP,
            format!("logits must be (N, V), got {:?}", logits.shape()),
        )
    })?;
    if targets.dims() != [n] {
        return Err(shape_err(
            OP,
            format!(
                "targets {:?} do not match logits {:?}",
                targets.shape(),
                logits.shape()
            ),
        ));
    }
    ensure_float(OP, &[logits.dtype()])?;
    let targets = if targets.dtype() == DType::U32 {
        targets.clone()
    } else {
        targets.to_dtype(DType::U32)?
    };
    if super::has_kernel(logits.device()) && v > 0 {
        let op = CrossEntropy {
            pad_id,
            eps: eps as f32,
            lse: Mutex::new(None),
        };
        let logits = super::cuda_contiguous(logits)?;
        logits.apply_op2(&super::cuda_contiguous(&targets)?, Op(op))
    } else {
        reference(logits, &targets, pad_id, eps)
    }
}

/// The straightforward differentiable composition (used off-CPU and as the test oracle).
pub fn reference(logits: &Tensor, targets: &Tensor, pad_id: u32, eps: f64) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    // The shift by the row max cancels out of log-softmax: no gradient through it.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = diff.broadcast_sub(&lse)?;
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let smooth = logp.mean(D::Minus1)?.neg()?;
    let per_row = ((nll * (1.0 - eps))? + (smooth * eps)?)?;
    let pad = Tensor::full(pad_id, targets.shape(), targets.device())?;
    let valid = targets.ne(&pad)?.to_dtype(DType::F32)?;
    let n_valid = valid.sum_all()?.maximum(1f32)?;
    per_row.mul(&valid)?.sum_all()?.div(&n_valid)
}

struct CrossEntropy {
    pad_id: u32,
    eps: f32,
    /// Per-row log-sum-exp saved by the forward pass for the backward pass.
    lse: Mutex<Option<Saved>>,
}

/// What the forward pass saves: the per-row log-sum-exp (on the CPU), or that and the count of
/// non-pad rows as device buffers (on CUDA, so the backward pass needs no host read).
enum Saved {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(Box<super::cuda::cross_entropy::Saved>),
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [u32]>> {
    let CpuStorage::U32(t) = s else {
        return Err(dtype_err(
            OP,
            candle_core::backend::BackendStorage::dtype(s),
            "u32 targets",
        ));
    };
    Ok(match l.contiguous_offsets() {
        Some((a, b)) => std::borrow::Cow::Borrowed(&t[a..b]),
        None => {
            let rows = Rows::new(l);
            // 1-D: one "row" of n elements with stride `step`.
            std::borrow::Cow::Owned(
                (0..rows.d)
                    .map(|i| t[rows.offset(0) + i * rows.step])
                    .collect(),
            )
        }
    })
}

fn check_targets(targets: &[u32], v: usize, pad_id: u32) -> Result<usize> {
    let mut n_valid = 0;
    for (row, &t) in targets.iter().enumerate() {
        if t == pad_id {
            continue;
        }
        if t as usize >= v {
            return Err(KernelError::TargetOutOfRange {
                op: OP,
                row,
                target: t,
                classes: v,
            }
            .into());
        }
        n_valid += 1;
    }
    Ok(n_valid)
}

fn ce_fwd<T: Elem>(
    x: &[T],
    xl: &Layout,
    targets: &[u32],
    pad_id: u32,
    eps: f32,
) -> (f64, Vec<f32>) {
    let rows = Rows::new(xl);
    let v = rows.d;
    let mut lse = vec![0f32; rows.n_rows];
    let total = par_row_blocks(
        &mut lse,
        1,
        v,
        || vec![0f32; v],
        || 0f64,
        |buf, acc, r, l| {
            let t = targets[r];
            if t == pad_id {
                l[0] = 0.0;
                return;
            }
            rows.load(x, r, buf);
            let mx = max_f32(buf);
            let mut s = [0f32; 8];
            let mut sx = [0f32; 8];
            let chunks = buf.chunks_exact(8);
            let rem = chunks.remainder();
            for c in chunks {
                for i in 0..8 {
                    s[i] += fast_exp(c[i] - mx);
                    sx[i] += c[i];
                }
            }
            let mut se: f32 = s.iter().sum();
            let mut sum_x: f32 = sx.iter().sum();
            for &c in rem {
                se += fast_exp(c - mx);
                sum_x += c;
            }
            let lse_r = mx + se.ln();
            l[0] = lse_r;
            let nll = lse_r - buf[t as usize];
            let smooth = lse_r - sum_x / v as f32;
            *acc += ((1.0 - eps) * nll + eps * smooth) as f64;
        },
        |a, b| a + b,
    );
    (total, lse)
}

impl Fused2 for CrossEntropy {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let targets = u32_slice(s2, l2)?;
        let v = l1.dims()[1];
        let n_valid = check_targets(&targets, v, self.pad_id)?;
        let (total, lse) = with_float!(s1, OP, |x: T| ce_fwd::<T>(
            x,
            l1,
            &targets,
            self.pad_id,
            self.eps
        ));
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(Saved::Cpu(lse));
        }
        let loss = if n_valid == 0 {
            0.0
        } else {
            (total / n_valid as f64) as f32
        };
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: super::fused::CudaArg,
        b: super::fused::CudaArg,
    ) -> super::fused::CudaOut {
        let (loss, saved) = super::cuda::cross_entropy::forward(a, b, self.pad_id, self.eps)?;
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(Saved::Cuda(Box::new(saved)));
        }
        Ok((loss, Shape::from(())))
    }

    fn bwd(&self, [logits, targets]: [&Tensor; 2], _res: &Tensor, grad_res: &Tensor) -> Grads<2> {
        // The upstream gradient stays a tensor (on a GPU: no host read).
        let g = crate::counters::cast(grad_res, DType::F32)?;
        let saved = self.lse.lock().ok().and_then(|mut s| s.take());
        let op = CrossEntropyBwd {
            pad_id: self.pad_id,
            eps: self.eps,
            saved,
        };
        Ok([Some(logits.apply_op3_no_bwd(targets, &g, &Op(op))?), None])
    }
}

/// The gradient over (logits, targets, upstream gradient as an f32 scalar).
struct CrossEntropyBwd {
    pad_id: u32,
    eps: f32,
    saved: Option<Saved>,
}

fn ce_bwd<T: Elem>(
    x: &[T],
    xl: &Layout,
    targets: &[u32],
    op: &CrossEntropyBwd,
    grad: f32,
    n_valid: usize,
) -> Vec<T> {
    let rows = Rows::new(xl);
    let v = rows.d;
    let mut out = vec![T::from_f32(0.0); rows.n_rows * v];
    if n_valid == 0 || v == 0 {
        return out;
    }
    let coef = grad / n_valid as f32;
    let lse_saved = match &op.saved {
        Some(Saved::Cpu(l)) => Some(l),
        _ => None,
    };
    let off = op.eps / v as f32;
    let on = 1.0 - op.eps;
    par_rows(
        &mut out,
        v,
        || vec![0f32; v],
        |buf, r, orow| {
            let t = targets[r];
            if t == op.pad_id {
                return; // already zero
            }
            rows.load(x, r, buf);
            let lse = match lse_saved {
                Some(l) => l[r],
                None => {
                    let mx = max_f32(buf);
                    let se: f32 = buf.iter().map(|&c| fast_exp(c - mx)).sum();
                    mx + se.ln()
                }
            };
            for c in buf.iter_mut() {
                *c = coef * (fast_exp(*c - lse) - off);
            }
            buf[t as usize] -= coef * on;
            T::store(buf, orow);
        },
    );
    out
}

impl Fused3 for CrossEntropyBwd {
    const NAME: &'static str = "cross_entropy_ls_bwd";

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg, (s3, l3): Arg) -> Out {
        let targets = u32_slice(s2, l2)?;
        let v = l1.dims()[1];
        let n_valid = check_targets(&targets, v, self.pad_id)?;
        let g = f32_slice(OP, s3, "an f32 upstream gradient")?[l3.start_offset()];
        let storage = with_float!(s1, OP, |x: T| T::wrap(ce_bwd::<T>(
            x, l1, &targets, self, g, n_valid
        )));
        Ok((storage, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    #[rustfmt::skip]
    fn cuda_fwd(&self, a: super::fused::CudaArg, b: super::fused::CudaArg, c: super::fused::CudaArg) -> super::fused::CudaOut {
        let saved = match &self.saved {
            Some(Saved::Cuda(s)) => Some(&**s),
            _ => None,
        };
        let shape = a.1.shape().clone();
        let dx = super::cuda::cross_entropy::backward(a, b, c, saved, self.pad_id, self.eps)?;
        Ok((dx, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs_diff, randn};
    use candle_core::{Device, Var};

    fn targets(n: usize, v: usize, pad: u32, pad_every: usize) -> Result<Tensor> {
        let t: Vec<u32> = (0..n)
            .map(|i| {
                if pad_every > 0 && i % pad_every == 0 {
                    pad
                } else {
                    ((i * 7919 + 13) % v) as u32
                }
            })
            .collect();
        Tensor::from_vec(t, n, &Device::Cpu)
    }

    fn check(logits: &Tensor, t: &Tensor, pad: u32, eps: f64, dt: DType, tol: f32) -> Result<()> {
        let x = logits.to_dtype(dt)?;
        let va = Var::from_tensor(&x)?;
        let vb = Var::from_tensor(&x)?;
        let la = cross_entropy_ls(&va, t, pad, eps)?;
        let lb = reference(&vb, t, pad, eps)?;
        assert_eq!(la.dtype(), DType::F32);
        assert_eq!(la.rank(), 0);
        let (a, b) = (la.to_scalar::<f32>()?, lb.to_scalar::<f32>()?);
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "loss {a} vs {b} ({dt:?})"
        );
        // Scale the loss so the grad path sees a non-unit upstream gradient (as a loss scaler does).
        let ga = (la * 8.0)?.backward()?;
        let gb = (lb * 8.0)?.backward()?;
        let (ga, gb) = (ga.get(&va).unwrap(), gb.get(&vb).unwrap());
        assert_eq!(ga.dtype(), dt);
        let diff = max_abs_diff(ga, gb)?;
        let n_valid = 8.0 / t.dim(0)? as f32; // per-element grads are O(8 / N)
        assert!(diff <= tol * n_valid, "grad diff {diff} ({dt:?})");
        Ok(())
    }

    #[test]
    fn matches_composition_with_padding_and_smoothing() -> Result<()> {
        let logits = randn(&[37, 101], 31, 3.0)?;
        let t = targets(37, 101, 0, 5)?;
        check(&logits, &t, 0, 0.1, DType::F32, 1e-5)?;
        check(&logits, &t, 0, 0.0, DType::F32, 1e-5)?;
        check(&logits, &t, 0, 0.1, DType::BF16, 1e-2)?;
        check(&logits, &t, 0, 0.1, DType::F16, 2e-3)?;
        // Vocab-sized rows.
        let logits = randn(&[64, 8000], 32, 2.0)?;
        let t = targets(64, 8000, 1, 3)?;
        check(&logits, &t, 1, 0.1, DType::F32, 1e-5)?;
        Ok(())
    }

    #[test]
    fn hand_computed_value() -> Result<()> {
        // Two classes, logits (0, ln 3): p = (1/4, 3/4). Target 1, eps 0.2:
        // 0.8 * -ln(3/4) + 0.2 * mean(-ln(1/4), -ln(3/4)).
        let logits = Tensor::new(&[[0f32, 3f32.ln()], [5.0, 1.0]], &Device::Cpu)?;
        let t = Tensor::new(&[1u32, 7], &Device::Cpu)?; // row 1 is pad (id 7)
        let loss = cross_entropy_ls(&logits, &t, 7, 0.2)?.to_scalar::<f32>()?;
        let want = 0.8 * -(0.75f32.ln()) + 0.2 * 0.5 * (-(0.25f32.ln()) - 0.75f32.ln());
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        Ok(())
    }

    #[test]
    fn all_pad_gives_zero_loss_and_zero_grad() -> Result<()> {
        let logits = Var::from_tensor(&randn(&[6, 11], 33, 1.0)?)?;
        let t = Tensor::full(3u32, 6, &Device::Cpu)?;
        let loss = cross_entropy_ls(&logits, &t, 3, 0.1)?;
        assert_eq!(loss.to_scalar::<f32>()?, 0.0);
        let g = loss.backward()?;
        let g = g.get(&logits).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert!(g.iter().all(|&v| v == 0.0));
        Ok(())
    }

    #[test]
    fn strided_logits_and_bad_target() -> Result<()> {
        let logits = randn(&[13, 20], 34, 2.0)?.t()?; // (20, 13), column-major
        let t = targets(20, 13, 0, 4)?;
        check(&logits, &t, 0, 0.1, DType::F32, 1e-5)?;
        let bad = Tensor::new(&[1u32, 99], &Device::Cpu)?;
        let err = cross_entropy_ls(&randn(&[2, 5], 1, 1.0)?, &bad, 0, 0.1).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        Ok(())
    }
}
