//! Launchers of `layer_norm.cu`: the forward (one launch) and the backward (dx and the row
//! statistics, then dalpha/dbeta as a deterministic column reduction: two launches).

use super::{alloc, cols_cfg, func, launch, rows_cfg, sfx, stream, Module, Ptrs};
use crate::kernels::fused::{CudaArg, CudaOut};
use crate::kernels::plumbing::{dtype_err, shape_err};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, DType, Layout, Result};

const OP: &str = "layer_norm";

fn dims(l: &Layout) -> Result<(usize, usize, i32)> {
    let d = l.dims().last().copied().unwrap_or(1);
    let n = l.shape().elem_count();
    let di = i32::try_from(d).map_err(|_| shape_err(OP, format!("row of {d} elements")))?;
    Ok((n, n / d.max(1), di))
}

fn ensure_f32(what: &'static str, s: &CudaStorage) -> Result<()> {
    if s.dtype() != DType::F32 {
        return Err(dtype_err(OP, s.dtype(), what));
    }
    Ok(())
}

/// y = alpha * (x - mean) / den + beta in dtype `out`; alpha, beta f32 (d).
pub(crate) fn forward(
    (x, xl): CudaArg,
    (a, al): CudaArg,
    (b, bl): CudaArg,
    eps: f32,
    tutorial: bool,
    out: DType,
) -> CudaOut {
    ensure_f32("f32 alpha on CUDA", a)?;
    ensure_f32("f32 beta on CUDA", b)?;
    let dev = &x.device;
    let (n, rows, d) = dims(xl)?;
    let name = format!("layer_norm_fwd_{}_{}", sfx(OP, x.dtype())?, sfx(OP, out)?);
    let f = func(dev, Module::LayerNorm, &name)?;
    let y = alloc(dev, out, n)?;
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let xp = p.get(OP, "x", x, xl, false)?;
    let ap = p.get(OP, "alpha", a, al, false)?;
    let bp = p.get(OP, "beta", b, bl, false)?;
    let yp = p.get(OP, "output", &y, &Layout::contiguous(n), false)?;
    let tut = i32::from(tutorial);
    if rows > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&xp)
            .arg(&ap)
            .arg(&bp)
            .arg(&yp)
            .arg(&d)
            .arg(&eps)
            .arg(&tut);
        // SAFETY: matches `layer_norm_fwd_*`; x and y hold rows * d elements, alpha/beta d.
        unsafe { launch(lb, rows_cfg(OP, rows, d as usize)?)? };
    }
    drop(p);
    Ok((y, xl.shape().clone()))
}

/// dx in x's dtype, and dalpha, dbeta as f32 (d) device buffers.
pub(crate) fn backward(
    (x, xl): CudaArg,
    (a, al): CudaArg,
    (g, gl): CudaArg,
    eps: f32,
    tutorial: bool,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    ensure_f32("f32 alpha on CUDA", a)?;
    let dev = &x.device;
    let (n, rows, d) = dims(xl)?;
    let ty = format!("{}_{}", sfx(OP, x.dtype())?, sfx(OP, g.dtype())?);
    let f_dx = func(dev, Module::LayerNorm, &format!("layer_norm_bwd_{ty}"))?;
    let f_pg = func(
        dev,
        Module::LayerNorm,
        &format!("layer_norm_param_grads_{ty}"),
    )?;
    let dx = alloc(dev, x.dtype(), n)?;
    let stats = alloc(dev, DType::F32, 2 * rows.max(1))?;
    let da = alloc(dev, DType::F32, d as usize)?;
    let db = alloc(dev, DType::F32, d as usize)?;
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let xp = p.get(OP, "x", x, xl, false)?;
    let ap = p.get(OP, "alpha", a, al, false)?;
    let gp = p.get(OP, "gradient", g, gl, false)?;
    let dxp = p.get(OP, "dx", &dx, &Layout::contiguous(n), false)?;
    let sp = p.get(
        OP,
        "stats",
        &stats,
        &Layout::contiguous(2 * rows.max(1)),
        false,
    )?;
    let dap = p.get(OP, "dalpha", &da, &Layout::contiguous(d as usize), false)?;
    let dbp = p.get(OP, "dbeta", &db, &Layout::contiguous(d as usize), false)?;
    let tut = i32::from(tutorial);
    let rows64 = rows as u64;
    if d > 0 {
        if rows > 0 {
            let mut lb = st.launch_builder(&f_dx);
            lb.arg(&xp)
                .arg(&ap)
                .arg(&gp)
                .arg(&dxp)
                .arg(&sp)
                .arg(&d)
                .arg(&eps)
                .arg(&tut);
            // SAFETY: matches `layer_norm_bwd_*`; x, dy, dx hold rows * d elements, stats
            // 2 * rows, alpha d.
            unsafe { launch(lb, rows_cfg(OP, rows, d as usize)?)? };
        }
        // With no rows the column sums are written as zeros.
        let mut lb = st.launch_builder(&f_pg);
        lb.arg(&xp)
            .arg(&gp)
            .arg(&sp)
            .arg(&dap)
            .arg(&dbp)
            .arg(&rows64)
            .arg(&d);
        // SAFETY: matches `layer_norm_param_grads_*`; stats were written by the launch above
        // on the same stream; dalpha/dbeta hold d elements.
        unsafe { launch(lb, cols_cfg(d as usize))? };
    }
    drop(p);
    Ok((dx, da, db))
}
