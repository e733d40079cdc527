//! Launchers of `softmax.cu`: masked softmax (+ dropout) forward, and its two backward passes.

use super::{alloc, func, launch, rows_cfg, sfx, stream, DropParams, Module, Ptrs};
use crate::kernels::fused::{CudaArg, CudaOut};
use crate::kernels::plumbing::{dtype_err, shape_err};
use crate::kernels::softmax::{MaskedSoftmax, SoftmaxBwd, SoftmaxDropBwd};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::{Layout, Result};

const OP: &str = "masked_softmax";
const MAX_LEAD: usize = 6;

/// The mask's addressing (`Bcast` in softmax.cu): the scores' leading dims and the mask's
/// strides over them (0 where broadcast), its last-dim stride. Dims of size 1 are left out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Bcast {
    nd: u32,
    dims: [u32; MAX_LEAD],
    strides: [u32; MAX_LEAD],
    last: u32,
    start: u32,
}

// SAFETY: #[repr(C)] of u32 only, laid out as `Bcast` in softmax.cu (60 bytes, 4-aligned).
unsafe impl DeviceRepr for Bcast {}

fn bcast(ml: &Layout) -> Result<Bcast> {
    let dims = ml.dims();
    let strides = ml.stride();
    let mut b = Bcast::default();
    let Some((&last, lead)) = strides.split_last() else {
        return Ok(b);
    };
    b.last = small(last)?;
    for (&d, &s) in dims[..lead.len()].iter().zip(lead) {
        if d == 1 {
            continue;
        }
        if b.nd as usize == MAX_LEAD {
            return Err(shape_err(
                OP,
                format!("the mask of {dims:?} has more than {MAX_LEAD} leading dims above 1"),
            ));
        }
        b.dims[b.nd as usize] = small(d)?;
        b.strides[b.nd as usize] = small(s)?;
        b.nd += 1;
    }
    Ok(b)
}

fn small(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| shape_err(OP, format!("mask extent {v} exceeds u32")))
}

fn row_len(l: &Layout) -> Result<(usize, usize, i32)> {
    let d = l.dims().last().copied().unwrap_or(1);
    let n = l.shape().elem_count();
    let di = i32::try_from(d).map_err(|_| shape_err(OP, format!("row of {d} elements")))?;
    Ok((n, n / d.max(1), di))
}

/// `dropout(softmax(scores * scale + mask))`: one launch.
pub(in crate::kernels) fn forward(
    op: &MaskedSoftmax,
    (s, sl): CudaArg,
    (m, ml): CudaArg,
) -> CudaOut {
    let dev = &s.device;
    let (n, rows, d) = row_len(sl)?;
    let name = format!(
        "masked_softmax_fwd_{}_{}",
        sfx(OP, s.dtype())?,
        sfx(OP, op.out)?
    );
    let f = func(dev, Module::Softmax, &name)?;
    let out = alloc(dev, op.out, n)?;
    let b = bcast(ml)?;
    let dp = DropParams::of(op.drop.as_ref());
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let sp = p.get(OP, "scores", s, sl, false)?;
    let mp = p.get(OP, "mask", m, ml, true)?;
    let yp = p.get(OP, "output", &out, &Layout::contiguous(n), false)?;
    if rows > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&sp)
            .arg(&mp)
            .arg(&b)
            .arg(&yp)
            .arg(&d)
            .arg(&op.scale)
            .arg(&dp);
        // SAFETY: the arguments match `masked_softmax_fwd_*` in softmax.cu; scores and output
        // hold rows * d elements, the mask is read through its own layout.
        unsafe { launch(lb, rows_cfg(OP, rows, d as usize)?)? };
    }
    drop(p);
    Ok((out, sl.shape().clone()))
}

/// Without dropout: `scale * y * (dy - sum(y * dy))` from the saved output; one launch.
pub(in crate::kernels) fn backward(op: &SoftmaxBwd, (y, yl): CudaArg, (g, gl): CudaArg) -> CudaOut {
    let dev = &y.device;
    if g.dtype() != y.dtype() {
        return Err(dtype_err(OP, g.dtype(), "a gradient in the output's dtype"));
    }
    let (n, rows, d) = row_len(yl)?;
    let name = format!(
        "masked_softmax_bwd_{}_{}",
        sfx(OP, y.dtype())?,
        sfx(OP, op.out)?
    );
    let f = func(dev, Module::Softmax, &name)?;
    let out = alloc(dev, op.out, n)?;
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let yp = p.get(OP, "probabilities", y, yl, false)?;
    let gp = p.get(OP, "gradient", g, gl, false)?;
    let op_ = p.get(OP, "output", &out, &Layout::contiguous(n), false)?;
    if rows > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&yp).arg(&gp).arg(&op_).arg(&d).arg(&op.scale);
        // SAFETY: matches `masked_softmax_bwd_*`; all three buffers hold rows * d elements.
        unsafe { launch(lb, rows_cfg(OP, rows, d as usize)?)? };
    }
    drop(p);
    Ok((out, yl.shape().clone()))
}

/// With dropout: recomputes the probabilities from the scores; one launch.
pub(in crate::kernels) fn dropout_backward(
    op: &SoftmaxDropBwd,
    (s, sl): CudaArg,
    (m, ml): CudaArg,
    (g, gl): CudaArg,
) -> CudaOut {
    let dev = &s.device;
    let (n, rows, d) = row_len(sl)?;
    let name = format!(
        "masked_softmax_drop_bwd_{}_{}",
        sfx(OP, s.dtype())?,
        sfx(OP, g.dtype())?
    );
    let f = func(dev, Module::Softmax, &name)?;
    let out = alloc(dev, s.dtype(), n)?;
    let b = bcast(ml)?;
    let dp = DropParams::of(Some(&op.drop));
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let sp = p.get(OP, "scores", s, sl, false)?;
    let mp = p.get(OP, "mask", m, ml, true)?;
    let gp = p.get(OP, "gradient", g, gl, false)?;
    let op_ = p.get(OP, "output", &out, &Layout::contiguous(n), false)?;
    if rows > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&sp)
            .arg(&mp)
            .arg(&b)
            .arg(&gp)
            .arg(&op_)
            .arg(&d)
            .arg(&op.scale)
            .arg(&dp);
        // SAFETY: matches `masked_softmax_drop_bwd_*`; scores, gradient and output hold
        // rows * d elements, the mask is read through its own layout.
        unsafe { launch(lb, rows_cfg(OP, rows, d as usize)?)? };
    }
    drop(p);
    Ok((out, sl.shape().clone()))
}
