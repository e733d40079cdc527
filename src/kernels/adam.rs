//! One-pass Adam/AdamW update over f32 master weights, and the global sum of squares.

use super::plumbing::dtype_err;
use super::KernelError;
use candle_core::{
    backend::BackendStorage, CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage,
    Tensor, Var,
};
use rayon::prelude::*;
use std::cell::RefCell;

const OP: &str = "adam_update";

/// Adam/AdamW hyper-parameters (PyTorch names and meaning).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamHp {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (decoupled weight decay) when true, Adam with L2 penalty in the gradient otherwise.
    pub decoupled: bool,
}

impl Default for AdamHp {
    fn default() -> Self {
        AdamHp {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

/// Scalars of one step, precomputed once.
#[derive(Clone, Copy)]
pub(crate) struct Coefs {
    gs: f32,
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    wd: f32,
    decoupled: bool,
    /// 1 - lr * wd (AdamW).
    decay: f32,
    /// lr / (1 - b1^t).
    step_size: f32,
    /// 1 / sqrt(1 - b2^t).
    inv_sqrt_bc2: f32,
}

impl Coefs {
    fn new(hp: &AdamHp, t: u64, grad_scale: f64) -> Self {
        let t = t.max(1) as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        Coefs {
            gs: grad_scale as f32,
            b1: hp.beta1 as f32,
            b2: hp.beta2 as f32,
            c1: (1.0 - hp.beta1) as f32,
            c2: (1.0 - hp.beta2) as f32,
            eps: hp.eps as f32,
            wd: hp.weight_decay as f32,
            decoupled: hp.decoupled,
            decay: (1.0 - hp.lr * hp.weight_decay) as f32,
            step_size: (hp.lr / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        }
    }

    /// The step's scalars for the multi-tensor CUDA kernel (`AdamCoefs` in optim.cu, in that
    /// order): b1, b2, c1, c2, eps, l2, decay, step_size, inv_sqrt_bc2.
    #[cfg(feature = "cuda")]
    pub(crate) fn device(hp: &AdamHp, t: u64) -> [f32; 9] {
        let c = Self::new(hp, t, 1.0);
        let l2 = if c.decoupled { 0.0 } else { c.wd };
        let decay = if c.decoupled { c.decay } else { 1.0 };
        [
            c.b1,
            c.b2,
            c.c1,
            c.c2,
            c.eps,
            l2,
            decay,
            c.step_size,
            c.inv_sqrt_bc2,
        ]
    }

    #[inline(always)]
    fn step(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2) = (self.b1, self.b2);
        let (c1, c2) = (self.c1, self.c2);
        let l2 = if self.decoupled { 0.0 } else { self.wd };
        let decay = if self.decoupled { self.decay } else { 1.0 };
        for i in 0..p.len() {
            let pi = p[i];
            let gi = g[i] * self.gs + l2 * pi;
            let mi = b1 * m[i] + c1 * gi;
            let vi = b2 * v[i] + c2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() * self.inv_sqrt_bc2 + self.eps;
            p[i] = pi * decay - self.step_size * mi / denom;
        }
    }
}

/// In-place Adam/AdamW update of the f32 parameter `p` from its gradient `g`, with the PyTorch
/// formulas: `g *= grad_scale`; Adam with weight decay: `g += wd * p`; `m = b1 m + (1-b1) g`;
/// `v = b2 v + (1-b2) g²`; `denom = sqrt(v) / sqrt(1-b2^t) + eps`; AdamW: `p *= 1 - lr wd`;
/// `p -= lr / (1-b1^t) * m / denom`. `t` is the 1-based step count. `m` and `v` are f32 and
/// updated in place. On CPU this is one rayon pass over the four slices.
pub fn adam_update(
    p: &Var,
    g: &Tensor,
    m: &Var,
    v: &Var,
    hp: &AdamHp,
    t: u64,
    grad_scale: f64,
) -> Result<()> {
    for (what, x) in [
        ("param", p.as_tensor()),
        ("m", m.as_tensor()),
        ("v", v.as_tensor()),
    ] {
        if x.dtype() != DType::F32 {
            return Err(dtype_err(OP, x.dtype(), "f32 param and moments"));
        }
        if x.shape() != p.shape() {
            return Err(KernelError::Shape {
                op: OP,
                msg: format!("{what} {:?} vs param {:?}", x.shape(), p.shape()),
            }
            .into());
        }
    }
    if g.shape() != p.shape() {
        return Err(KernelError::Shape {
            op: OP,
            msg: format!("grad {:?} vs param {:?}", g.shape(), p.shape()),
        }
        .into());
    }
    let c = Coefs::new(hp, t, grad_scale);
    let all_cpu = [p.device(), g.device(), m.device(), v.device()]
        .iter()
        .all(|d| d.is_cpu());
    if !all_cpu {
        return reference(p, g, m, v, hp, t, grad_scale);
    }
    let g = if g.dtype() == DType::F32 && g.is_contiguous() {
        g.clone()
    } else {
        g.to_dtype(DType::F32)?.contiguous()?
    };
    // Lock m, then v, then p (+ read g), each through candle's in-place op API.
    let outer = WithSlice {
        what: "m",
        f: RefCell::new(Some(|ms: &mut [f32]| -> Result<()> {
            let inner = WithSlice {
                what: "v",
                f: RefCell::new(Some(|vs: &mut [f32]| -> Result<()> {
                    p.inplace_op2(
                        &g,
                        &Apply {
                            c,
                            m: RefCell::new(Some(ms)),
                            v: RefCell::new(Some(vs)),
                        },
                    )
                })),
            };
            v.inplace_op1(&inner)
        })),
    };
    m.inplace_op1(&outer)
}

/// The same update with candle ops (off-CPU, and the test oracle).
pub fn reference(
    p: &Var,
    g: &Tensor,
    m: &Var,
    v: &Var,
    hp: &AdamHp,
    t: u64,
    grad_scale: f64,
) -> Result<()> {
    let t = t.max(1) as i32;
    let mut g = (g.to_dtype(DType::F32)? * grad_scale)?;
    let mut pv = p.as_tensor().clone();
    if hp.weight_decay != 0.0 {
        if hp.decoupled {
            pv = (pv * (1.0 - hp.lr * hp.weight_decay))?;
        } else {
            g = (g + (p.as_tensor() * hp.weight_decay)?)?;
        }
    }
    let m_new = ((m.as_tensor() * hp.beta1)? + (&g * (1.0 - hp.beta1))?)?;
    let v_new = ((v.as_tensor() * hp.beta2)? + (g.sqr()? * (1.0 - hp.beta2))?)?;
    let bc1 = 1.0 - hp.beta1.powi(t);
    let bc2 = 1.0 - hp.beta2.powi(t);
    let denom = ((v_new.sqrt()? / bc2.sqrt())? + hp.eps)?;
    let p_new = (pv - (m_new.div(&denom)? * (hp.lr / bc1))?)?;
    m.set(&m_new)?;
    v.set(&v_new)?;
    p.set(&p_new)
}

fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &'static str) -> Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or(KernelError::NotContiguous { op: OP, what })?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        other => Err(dtype_err(OP, other.dtype(), "f32")),
    }
}

/// Hands the mutable f32 slice of a tensor to a closure (used to hold several write locks).
struct WithSlice<F> {
    what: &'static str,
    f: RefCell<Option<F>>,
}

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for WithSlice<F> {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let slice = f32_mut(s, l, self.what)?;
        let f = self
            .f
            .borrow_mut()
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: closure called twice")))?;
        f(slice)
    }
}

struct Apply<'a> {
    c: Coefs,
    m: RefCell<Option<&'a mut [f32]>>,
    v: RefCell<Option<&'a mut [f32]>>,
}

impl InplaceOp2 for Apply<'_> {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let p = f32_mut(s1, l1, "param")?;
        let g = match (s2, l2.contiguous_offsets()) {
            (CpuStorage::F32(g), Some((a, b))) => &g[a..b],
            _ => {
                return Err(KernelError::NotContiguous {
                    op: OP,
                    what: "grad",
                }
                .into())
            }
        };
        let m = self
            .m
            .borrow_mut()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("m taken".into()))?;
        let v = self
            .v
            .borrow_mut()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("v taken".into()))?;
        const CHUNK: usize = 8192;
        let c = self.c;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| c.step(p, g, m, v));
        Ok(())
    }
}

fn cpu_sum_squares(t: &Tensor) -> Result<f64> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or(KernelError::NotContiguous {
            op: "sum_squares",
            what: "tensor",
        })?;
    let Storage::Cpu(cpu) = &*storage else {
        unreachable!("the caller checked is_cpu")
    };
    Ok(match cpu {
        CpuStorage::F32(v) => sumsq(&v[a..b], |x| x),
        CpuStorage::BF16(v) => sumsq(&v[a..b], |x| x.to_f32()),
        CpuStorage::F16(v) => sumsq(&v[a..b], |x| x.to_f32()),
        CpuStorage::F64(v) => v[a..b].par_iter().map(|x| x * x).sum::<f64>(),
        other => return Err(dtype_err("sum_squares", other.dtype(), "a float dtype")),
    })
}

/// Sum of squares of all elements of all tensors, accumulated in f64 (for the global grad norm
/// and the inf/NaN check: the result is inf or NaN when any element is). One pass per tensor.
/// Off the CPU every tensor is reduced on its device (squares in f64, so a large scaled
/// gradient cannot overflow them) and the partial sums come back in one host sync.
pub fn sum_squares(ts: &[&Tensor]) -> Result<f64> {
    let mut on_device: Vec<Tensor> = Vec::new();
    let mut on_cpu: Vec<&Tensor> = Vec::new();
    for t in ts {
        if t.device().is_cpu() {
            on_cpu.push(t);
            continue;
        }
        if !super::is_float(t.dtype()) && t.dtype() != DType::F64 {
            return Err(dtype_err("sum_squares", t.dtype(), "a float dtype"));
        }
        on_device.push(t.to_dtype(DType::F64)?.sqr()?.sum_all()?);
    }
    // The CPU tensors in one parallel pass over all of them (the CPU twin of the one fused
    // reduction on a GPU); the per-tensor sums are added in order, so the total is deterministic.
    let sums: Vec<f64> = on_cpu
        .par_iter()
        .map(|t| cpu_sum_squares(t))
        .collect::<Result<_>>()?;
    let mut total: f64 = sums.iter().sum();
    // One stack per device (the GPU's partial sums), one copy back.
    while let Some(first) = on_device.first() {
        let dev = first.device().clone();
        let (same, rest): (Vec<Tensor>, Vec<Tensor>) = on_device
            .into_iter()
            .partition(|t| t.device().same_device(&dev));
        total += Tensor::stack(&same, 0)?.sum_all()?.to_scalar::<f64>()?;
        on_device = rest;
    }
    Ok(total)
}

fn sumsq<T: Copy + Sync>(xs: &[T], f: impl Fn(T) -> f32 + Sync) -> f64 {
    xs.par_chunks(16_384)
        .map(|c| {
            let mut acc = [0f64; 8];
            let chunks = c.chunks_exact(8);
            let rem = chunks.remainder();
            for ch in chunks {
                for i in 0..8 {
                    let x = f(ch[i]) as f64;
                    acc[i] += x * x;
                }
            }
            let mut s: f64 = acc.iter().sum();
            for &x in rem {
                let x = f(x) as f64;
                s += x * x;
            }
            s
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs_diff, randn};
    use candle_core::Device;

    fn vars(n: usize, seed: u64) -> Result<(Var, Var, Var)> {
        Ok((
            Var::from_tensor(&randn(&[n], seed, 1.0)?)?,
            Var::from_tensor(&(randn(&[n], seed + 1, 0.1)?))?,
            Var::from_tensor(&randn(&[n], seed + 2, 0.1)?.sqr()?)?,
        ))
    }

    #[test]
    fn matches_candle_ops_for_adam_and_adamw_over_steps() -> Result<()> {
        for (decoupled, wd) in [(false, 0.0), (false, 0.01), (true, 0.1)] {
            let hp = AdamHp {
                lr: 3e-3,
                weight_decay: wd,
                decoupled,
                ..Default::default()
            };
            let n = 50_001; // odd size, several rayon chunks
            let (p1, m1, v1) = vars(n, 41)?;
            let (p2, m2, v2) = vars(n, 41)?;
            for t in 1..=5u64 {
                let g = randn(&[n], 100 + t, 512.0)?;
                adam_update(&p1, &g, &m1, &v1, &hp, t, 1.0 / 512.0)?;
                reference(&p2, &g, &m2, &v2, &hp, t, 1.0 / 512.0)?;
            }
            for (a, b) in [(&p1, &p2), (&m1, &m2), (&v1, &v2)] {
                let d = max_abs_diff(a, b)?;
                let scale = crate::kernels::test_util::max_abs(b)?;
                assert!(
                    d < 2e-6 * scale,
                    "diff {d} scale {scale} (decoupled {decoupled}, wd {wd})"
                );
            }
            // And the parameters actually moved.
            assert!(max_abs_diff(&p1, &vars(n, 41)?.0)? > 1e-3);
        }
        Ok(())
    }

    #[test]
    fn first_step_hand_computed() -> Result<()> {
        // t = 1, m = v = 0: m̂ = g, v̂ = g², so p -= lr * g / (|g| + eps) = lr * sign(g).
        let p = Var::from_tensor(&Tensor::new(&[1f32, -2.0, 0.5], &Device::Cpu)?)?;
        let m = Var::zeros(3, DType::F32, &Device::Cpu)?;
        let v = Var::zeros(3, DType::F32, &Device::Cpu)?;
        let g = Tensor::new(&[4f32, -8.0, 0.0], &Device::Cpu)?; // scaled by 4
        let hp = AdamHp {
            lr: 0.1,
            eps: 1e-8,
            ..Default::default()
        };
        adam_update(&p, &g, &m, &v, &hp, 1, 0.25)?;
        let got = p.as_tensor().to_vec1::<f32>()?;
        let want = [0.9f32, -1.9, 0.5];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
        let m = m.as_tensor().to_vec1::<f32>()?;
        for (a, b) in m.iter().zip([0.1f32, -0.2, 0.0]) {
            assert!((a - b).abs() < 1e-7, "{m:?}");
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes() -> Result<()> {
        let (p, m, v) = vars(10, 1)?;
        let g = randn(&[11], 1, 1.0)?;
        let err = adam_update(&p, &g, &m, &v, &AdamHp::default(), 1, 1.0).unwrap_err();
        assert!(err.to_string().contains("grad"), "{err}");
        Ok(())
    }

    #[test]
    fn sum_squares_matches_and_flags_non_finite() -> Result<()> {
        let a = randn(&[1000, 3], 51, 1.0)?;
        let b = randn(&[77], 52, 2.0)?.to_dtype(DType::BF16)?;
        let c = randn(&[5, 9], 53, 1.0)?.t()?; // non-contiguous
        let got = sum_squares(&[&a, &b, &c])?;
        let want: f64 = [&a, &b, &c]
            .iter()
            .map(|t| {
                t.to_dtype(DType::F64)
                    .and_then(|t| t.sqr()?.sum_all()?.to_scalar::<f64>())
                    .unwrap()
            })
            .sum();
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        let bad = Tensor::new(&[1f32, f32::INFINITY], &Device::Cpu)?;
        assert!(!sum_squares(&[&a, &bad])?.is_finite());
        let nan = Tensor::new(&[f32::NAN], &Device::Cpu)?;
        assert!(sum_squares(&[&nan, &a])?.is_nan());
        assert_eq!(sum_squares(&[])?, 0.0);
        Ok(())
    }
}
