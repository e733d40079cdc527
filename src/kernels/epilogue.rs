//! Linear-layer epilogues and inverted dropout with a byte mask, fused forward and backward.
//!
//! * [`bias_act`]: `dropout(act(y + b))` for a linear output `y` (rows, n) and a bias (n), with
//!   `act` ReLU or identity, reshaped to the layer's output shape, as one op. The backward
//!   computes `dy` and the bias gradient (a column sum of `dy`) in the same pass over the rows.
//! * [`dropout`]: `x * mask * scale`.
//! * [`residual_dropout`]: `x + dropout(sub)` with `x` the f32 residual stream and `sub` in any
//!   float dtype, the output f32 (the cast, the mask and the add in one pass).
//!
//! Each replaces three to five candle ops (and as many zero-initialised gradient buffers and
//! accumulation adds in candle's backward pass) with one.

use super::{rows_per_task, with_float, Elem, KernelError, Rows};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor,
};
use rand::Rng;
use rayon::prelude::*;
use std::sync::Arc;

const OP_BIAS: &str = "bias_act";
const OP_DROP: &str = "dropout";
const OP_RES: &str = "residual_dropout";

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
    fn factor(&self, i: usize) -> f32 {
        if self.keep[i] != 0 {
            self.scale
        } else {
            0.0
        }
    }

    fn check(&self, op: &'static str, n: usize) -> Result<()> {
        if self.len() != n {
            return Err(KernelError::Shape {
                op,
                msg: format!("dropout mask has {} elements, tensor has {n}", self.len()),
            }
            .into());
        }
        Ok(())
    }
}

/// The straightforward differentiable compositions (used off-CPU and as the test oracles).
pub mod reference {
    use super::DropMask;
    use candle_core::{DType, Result, Tensor};

    /// `dropout(act(y + b))` reshaped to `out_shape`.
    pub fn bias_act(
        y: &Tensor,
        b: &Tensor,
        relu: bool,
        drop: Option<&DropMask>,
        out_shape: &[usize],
    ) -> Result<Tensor> {
        let z = y.broadcast_add(b)?;
        let z = if relu { z.relu()? } else { z };
        let z = match drop {
            Some(m) => dropout(&z, m)?,
            None => z,
        };
        z.reshape(out_shape)
    }

    /// `x * mask * scale` with the f32 mask cast to `x`'s dtype.
    pub fn dropout(x: &Tensor, m: &DropMask) -> Result<Tensor> {
        let mt = m.to_tensor(x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mt)
    }

    /// `x + dropout(sub as f32)`.
    pub fn residual_dropout(x: &Tensor, sub: &Tensor, drop: Option<&DropMask>) -> Result<Tensor> {
        let s = sub.to_dtype(DType::F32)?;
        let s = match drop {
            Some(m) => dropout(&s, m)?,
            None => s,
        };
        x + s
    }
}

fn shape_err(op: &'static str, msg: String) -> candle_core::Error {
    KernelError::Shape { op, msg }.into()
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
            OP_BIAS,
            format!("bias {:?} for output {:?}", b.dims(), y.dims()),
        ));
    }
    if out_shape.iter().product::<usize>() != rows * n || out_shape.last() != Some(&n) {
        return Err(shape_err(
            OP_BIAS,
            format!("output shape {out_shape:?} for {:?}", y.dims()),
        ));
    }
    if let Some(m) = drop {
        m.check(OP_BIAS, rows * n)?;
    }
    if !super::is_float(y.dtype()) || b.dtype() != y.dtype() {
        return Err(KernelError::UnsupportedDType {
            op: OP_BIAS,
            dtype: if super::is_float(y.dtype()) {
                b.dtype()
            } else {
                y.dtype()
            },
            expected: "f32, bf16 or f16, bias in the output's dtype",
        }
        .into());
    }
    if !y.device().is_cpu() {
        return reference::bias_act(y, b, relu, drop, out_shape);
    }
    y.apply_op2(
        b,
        BiasAct {
            relu,
            drop: drop.cloned(),
            out_shape: Shape::from(out_shape.to_vec()),
        },
    )
}

/// Inverted dropout `x * mask * scale` in `x`'s dtype; the gradient is `grad * mask * scale`.
pub fn dropout(x: &Tensor, m: &DropMask) -> Result<Tensor> {
    m.check(OP_DROP, x.elem_count())?;
    if !super::is_float(x.dtype()) {
        return Err(KernelError::UnsupportedDType {
            op: OP_DROP,
            dtype: x.dtype(),
            expected: "f32, bf16 or f16",
        }
        .into());
    }
    if !x.device().is_cpu() {
        return reference::dropout(x, m);
    }
    x.apply_op1(Dropout { m: m.clone() })
}

/// `x + dropout(sub)` in f32: `x` is the f32 residual stream, `sub` a sublayer output of the same
/// shape in any float dtype. Gradients: `grad` to `x`, `grad * mask * scale` (in `sub`'s dtype)
/// to `sub`.
pub fn residual_dropout(x: &Tensor, sub: &Tensor, drop: Option<&DropMask>) -> Result<Tensor> {
    if x.dims() != sub.dims() {
        return Err(shape_err(
            OP_RES,
            format!("residual {:?} and sublayer {:?}", x.dims(), sub.dims()),
        ));
    }
    if let Some(m) = drop {
        m.check(OP_RES, x.elem_count())?;
    }
    if x.dtype() != DType::F32 || !super::is_float(sub.dtype()) {
        return Err(KernelError::UnsupportedDType {
            op: OP_RES,
            dtype: if x.dtype() != DType::F32 {
                x.dtype()
            } else {
                sub.dtype()
            },
            expected: "an f32 residual and an f32, bf16 or f16 sublayer output",
        }
        .into());
    }
    if !x.device().is_cpu() {
        return reference::residual_dropout(x, sub, drop);
    }
    x.apply_op2(
        sub,
        ResidualDropout {
            drop: drop.cloned(),
        },
    )
}

/// A float tensor's CPU storage as f32 (copied; for small operands such as a bias).
fn to_f32_vec(s: &CpuStorage, l: &Layout, op: &'static str) -> Result<Vec<f32>> {
    let r = Rows::new(l);
    let mut out = vec![0f32; r.n_rows * r.d];
    with_float!(s, op, |v: T| {
        for (i, row) in out.chunks_mut(r.d.max(1)).enumerate() {
            r.load::<T>(v, i, row);
        }
    });
    Ok(out)
}

/// Applies `f(row_index, row_as_f32)` to every row of `src` (viewed as (rows, d)) in parallel
/// and stores the rows contiguously as `O`.
fn map_rows<T: Elem, O: Elem>(
    src: &[T],
    l: &Layout,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<O> {
    let r = Rows::new(l);
    let d = r.d;
    let mut out = vec![O::from_f32(0.0); r.n_rows * d];
    if d == 0 {
        return out;
    }
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(rows_per_task(d))
        .for_each_init(
            || vec![0f32; d],
            |buf, (i, orow)| {
                r.load(src, i, buf);
                f(i, buf);
                O::store(buf, orow);
            },
        );
    out
}

fn cpu_storage<'a>(t: &'a Tensor, op: &'static str) -> Result<(CpuStorageGuard<'a>, Layout)> {
    let (s, l) = t.storage_and_layout();
    let l = l.clone();
    if !matches!(&*s, Storage::Cpu(_)) {
        return Err(KernelError::UnsupportedDType {
            op,
            dtype: t.dtype(),
            expected: "a CPU tensor",
        }
        .into());
    }
    Ok((CpuStorageGuard(s), l))
}

struct CpuStorageGuard<'a>(candle_core::StorageRef<'a>);

impl CpuStorageGuard<'_> {
    fn cpu(&self) -> &CpuStorage {
        match &*self.0 {
            Storage::Cpu(c) => c,
            _ => unreachable!("checked in cpu_storage"),
        }
    }
}

struct BiasAct {
    relu: bool,
    drop: Option<DropMask>,
    out_shape: Shape,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        OP_BIAS
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = to_f32_vec(s2, l2, OP_BIAS)?;
        let n = b.len();
        let relu = self.relu;
        let drop = self.drop.as_ref();
        let storage = with_float!(s1, OP_BIAS, |y: T| {
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
                    let keep = &m.keep()[r * n..(r + 1) * n];
                    for (zi, &k) in z.iter_mut().zip(keep) {
                        *zi *= if k != 0 { m.scale } else { 0.0 };
                    }
                }
            }))
        });
        Ok((storage, self.out_shape.clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = y.dim(candle_core::D::Minus1)?;
        let rows = y.elem_count() / n.max(1);
        let g = grad_res.to_dtype(y.dtype())?;
        let (gs, gl) = cpu_storage(&g, OP_BIAS)?;
        let (rs, rl) = cpu_storage(res, OP_BIAS)?;
        let relu = self.relu;
        let drop = self.drop.as_ref();
        let (dy, db) = with_float!(gs.cpu(), OP_BIAS, |gv: T| {
            let res_v: &[T] = match rs.cpu() {
                s if relu => T::slice(s).ok_or_else(|| {
                    shape_err(OP_BIAS, "output and gradient dtypes differ".into())
                })?,
                _ => &[],
            };
            let (dy, db) = bias_act_bwd::<T>(&gv[..], &gl, res_v, &rl, relu, drop, rows, n);
            (T::wrap(dy), db)
        });
        let dy = tensor_from_cpu(dy, (rows, n))?.reshape(y.shape())?;
        let db = Tensor::from_vec(db, n, y.device())?.to_dtype(b.dtype())?;
        Ok((Some(dy), Some(db)))
    }
}

/// Typed views of a `CpuStorage`.
trait SliceOf: Elem {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

impl SliceOf for f32 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl SliceOf for half::bf16 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}

impl SliceOf for half::f16 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
}

/// A CPU tensor (no graph) over a kernel's output storage.
fn tensor_from_cpu(s: CpuStorage, shape: (usize, usize)) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &dev),
        CpuStorage::BF16(v) => Tensor::from_vec(v, shape, &dev),
        CpuStorage::F16(v) => Tensor::from_vec(v, shape, &dev),
        other => Err(KernelError::UnsupportedDType {
            op: OP_BIAS,
            dtype: candle_core::backend::BackendStorage::dtype(&other),
            expected: "f32, bf16 or f16",
        }
        .into()),
    }
}

/// dy = grad * act'(.) * mask * scale (rows, n), and db = the column sums of dy in f32, in one
/// parallel pass over row blocks.
#[allow(clippy::too_many_arguments)]
fn bias_act_bwd<T: Elem>(
    g: &[T],
    gl: &Layout,
    res: &[T],
    rl: &Layout,
    relu: bool,
    drop: Option<&DropMask>,
    rows: usize,
    n: usize,
) -> (Vec<T>, Vec<f32>) {
    let rg = Rows::new(gl);
    let rr = Rows::new(rl);
    let mut dy = vec![T::from_f32(0.0); rows * n];
    if n == 0 || rows == 0 {
        return (dy, vec![0f32; n]);
    }
    let block = rows_per_task(n);
    let db = dy
        .par_chunks_mut(block * n)
        .enumerate()
        .map(|(bi, out)| {
            let mut acc = vec![0f32; n];
            let mut gv = vec![0f32; n];
            let mut rv = vec![0f32; if relu { n } else { 0 }];
            for (j, orow) in out.chunks_mut(n).enumerate() {
                let r = bi * block + j;
                rg.load(g, r, &mut gv);
                if relu {
                    // res > 0 exactly where the unit was active and (with dropout) kept; there
                    // the factor is the dropout scale (or 1). relu'(0) = 0 as in PyTorch.
                    rr.load(res, r, &mut rv);
                    let s = drop.map_or(1.0, |m| m.scale);
                    for (gi, ri) in gv.iter_mut().zip(&rv) {
                        *gi *= if *ri > 0.0 { s } else { 0.0 };
                    }
                } else if let Some(m) = drop {
                    for (i, gi) in gv.iter_mut().enumerate() {
                        *gi *= m.factor(r * n + i);
                    }
                }
                for (a, gi) in acc.iter_mut().zip(&gv) {
                    *a += *gi;
                }
                T::store(&gv, orow);
            }
            acc
        })
        .reduce(
            || vec![0f32; n],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += *y;
                }
                a
            },
        );
    (dy, db)
}

struct Dropout {
    m: DropMask,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        OP_DROP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1);
        let m = &self.m;
        let storage = with_float!(s, OP_DROP, |x: T| {
            T::wrap(map_rows::<T, T>(x, l, |r, z| {
                for (i, zi) in z.iter_mut().enumerate() {
                    *zi *= m.factor(r * d + i);
                }
            }))
        });
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(arg.dtype())?;
        Ok(Some(g.apply_op1_no_bwd(&Dropout { m: self.m.clone() })?))
    }
}

struct ResidualDropout {
    drop: Option<DropMask>,
}

impl CustomOp2 for ResidualDropout {
    fn name(&self) -> &'static str {
        OP_RES
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s1 else {
            return Err(KernelError::UnsupportedDType {
                op: OP_RES,
                dtype: candle_core::backend::BackendStorage::dtype(s1),
                expected: "an f32 residual",
            }
            .into());
        };
        let rx = Rows::new(l1);
        let d = rx.d;
        let drop = self.drop.as_ref();
        let out = with_float!(s2, OP_RES, |s: T| {
            let rs = Rows::new(l2);
            let mut out = vec![0f32; rx.n_rows * d];
            if d > 0 {
                out.par_chunks_mut(d)
                    .enumerate()
                    .with_min_len(rows_per_task(d))
                    .for_each_init(
                        || vec![0f32; d],
                        |buf, (r, orow)| {
                            rs.load::<T>(s, r, buf);
                            rx.load(x, r, orow);
                            match drop {
                                Some(m) => {
                                    let keep = &m.keep()[r * d..(r + 1) * d];
                                    for ((o, v), &k) in orow.iter_mut().zip(buf.iter()).zip(keep) {
                                        *o += if k != 0 { *v * m.scale } else { 0.0 };
                                    }
                                }
                                None => {
                                    for (o, v) in orow.iter_mut().zip(buf.iter()) {
                                        *o += *v;
                                    }
                                }
                            }
                        },
                    );
            }
            out
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        sub: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dsub = match &self.drop {
            Some(m) => grad_res
                .to_dtype(sub.dtype())?
                .apply_op1_no_bwd(&Dropout { m: m.clone() })?,
            None => grad_res.to_dtype(sub.dtype())?,
        };
        Ok((Some(grad_res.clone()), Some(dsub)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
    use candle_core::Var;
    use rand::SeedableRng;

    fn mask(n: usize, p: f64, seed: u64) -> DropMask {
        DropMask::sample(n, p, &mut rand::rngs::StdRng::seed_from_u64(seed))
    }

    /// Forward values and the gradients of `sum(out * w)` w.r.t. every input, fused vs reference.
    fn grads(
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        w: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts)?;
        let gs = out.to_dtype(DType::F32)?.mul(w)?.sum_all()?.backward()?;
        let g = ts
            .iter()
            .map(|t| gs.get(t).expect("gradient").to_dtype(DType::F32))
            .collect::<Result<_>>()?;
        Ok((out, g))
    }

    fn compare(
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        refc: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        tol: f32,
    ) -> Result<()> {
        let w = randn(fused(inputs)?.dims(), 77, 1.0)?;
        let (yf, gf) = grads(&fused, inputs, &w)?;
        let (yr, gr) = grads(&refc, inputs, &w)?;
        assert_eq!(yf.dims(), yr.dims());
        assert_eq!(yf.dtype(), yr.dtype());
        let d = max_abs_diff(&yf, &yr)?;
        assert!(d <= tol * max_abs(&yr)?.max(1.0), "forward differs by {d}");
        for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
            assert_eq!(a.dims(), b.dims(), "gradient {i} shape");
            let d = max_abs_diff(a, b)?;
            let s = max_abs(b)?.max(1e-3);
            assert!(d <= tol * s, "gradient {i} differs by {d} (max {s})");
            assert!(
                s > 1e-3,
                "gradient {i} is all zero: the test checks nothing"
            );
        }
        Ok(())
    }

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
                        |t| reference::bias_act(&t[0], &t[1], relu, drop, &shape),
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
            |t| reference::bias_act(&t[0], &t[1], true, Some(&m), &[3, 4, 20]),
            &[y.clone(), b.clone()],
            1e-5,
        )?;
        let short = mask(10, 0.5, 6);
        assert!(bias_act(&y, &b, true, Some(&short), &[12, 20]).is_err());
        assert!(bias_act(&y, &b.narrow(0, 0, 10)?, true, None, &[12, 20]).is_err());
        assert!(bias_act(&y, &b, true, None, &[12, 21]).is_err());
        Ok(())
    }

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
            compare(
                |t| dropout(&t[0], &m),
                |t| reference::dropout(&t[0], &m),
                &[x],
                tol,
            )?;
        }
        Ok(())
    }

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
                    |t| reference::residual_dropout(&t[0], &t[1], drop),
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
