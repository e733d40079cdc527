//! Launchers of `epilogue.cu`: bias + ReLU + dropout (forward one launch; backward dy and the
//! bias gradient's column sums: two launches), plain dropout and the residual dropout-add (one
//! launch each). The dropout mask is never memory: each kernel recomputes it from the seed.

use super::{alloc, cols_cfg, elem_cfg, func, launch, sfx, stream, DropParams, Module, Ptrs};
use crate::kernels::dropout::DropMask;
use crate::kernels::plumbing::dtype_err;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, DType, Layout, Result};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// `dropout(act(y + b))`, y (rows, n) and b (n) in one dtype, output in that dtype.
pub(crate) fn bias_act_fwd(
    (y, yl): Arg,
    (b, bl): Arg,
    relu: bool,
    mask: Option<&DropMask>,
) -> Result<CudaStorage> {
    const OP: &str = "bias_act";
    if b.dtype() != y.dtype() {
        return Err(dtype_err(OP, b.dtype(), "a bias in the output's dtype"));
    }
    let dev = &y.device;
    let len = yl.shape().elem_count();
    let n = yl.dims().last().copied().unwrap_or(1).max(1) as u64;
    let f = func(
        dev,
        Module::Epilogue,
        &format!("bias_act_fwd_{}", sfx(OP, y.dtype())?),
    )?;
    let out = alloc(dev, y.dtype(), len)?;
    let (dp, relu, len64) = (DropParams::of(mask), i32::from(relu), len as u64);
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let yp = p.get(OP, "linear output", y, yl, false)?;
    let bp = p.get(OP, "bias", b, bl, false)?;
    let op_ = p.get(OP, "output", &out, &Layout::contiguous(len), false)?;
    if len > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&yp)
            .arg(&bp)
            .arg(&op_)
            .arg(&len64)
            .arg(&n)
            .arg(&relu)
            .arg(&dp);
        // SAFETY: matches `bias_act_fwd_*`; y and out hold len elements, b holds n.
        unsafe { launch(lb, elem_cfg(len))? };
    }
    drop(p);
    Ok(out)
}

/// dy = g * act'(.) * factor (rows, n) in g's dtype, and db = the column sums of dy (n) in the
/// same dtype (f32 accumulation).
pub(crate) fn bias_act_bwd(
    (g, gl): Arg,
    (res, rl): Arg,
    relu: bool,
    mask: Option<&DropMask>,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "bias_act";
    if relu && res.dtype() != g.dtype() {
        return Err(dtype_err(
            OP,
            res.dtype(),
            "an output in the gradient's dtype",
        ));
    }
    let dev = &g.device;
    let len = gl.shape().elem_count();
    let n = gl.dims().last().copied().unwrap_or(1).max(1);
    let rows = len / n;
    let ty = sfx(OP, g.dtype())?;
    let f_dy = func(dev, Module::Epilogue, &format!("bias_act_bwd_{ty}"))?;
    let f_col = func(dev, Module::Epilogue, &format!("col_sum_{ty}"))?;
    let dy = alloc(dev, g.dtype(), len)?;
    let db = alloc(dev, g.dtype(), n)?;
    let (dp, relu_i, len64, rows64, n64) = (
        DropParams::of(mask),
        i32::from(relu),
        len as u64,
        rows as u64,
        n as u64,
    );
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let gp = p.get(OP, "gradient", g, gl, false)?;
    // Without ReLU the kernel never reads the output: pass the gradient's address.
    let rp = if relu {
        p.get(OP, "output", res, rl, false)?
    } else {
        gp
    };
    let dyp = p.get(OP, "dy", &dy, &Layout::contiguous(len), false)?;
    let dbp = p.get(OP, "dbias", &db, &Layout::contiguous(n), false)?;
    if len > 0 {
        let mut lb = st.launch_builder(&f_dy);
        lb.arg(&gp)
            .arg(&rp)
            .arg(&dyp)
            .arg(&len64)
            .arg(&relu_i)
            .arg(&dp);
        // SAFETY: matches `bias_act_bwd_*`; g, res and dy hold len elements.
        unsafe { launch(lb, elem_cfg(len))? };
    }
    let mut lb = st.launch_builder(&f_col);
    lb.arg(&dyp).arg(&dbp).arg(&rows64).arg(&n64);
    // SAFETY: matches `col_sum_*`; dy (written above, same stream) holds rows * n, db n.
    unsafe { launch(lb, cols_cfg(n))? };
    drop(p);
    Ok((dy, db))
}

/// `x * factor` in dtype `out` (the plain dropout, its backward, and the residual's sublayer
/// gradient).
pub(crate) fn dropout((x, xl): Arg, mask: &DropMask, out: DType) -> Result<CudaStorage> {
    const OP: &str = "dropout";
    let dev = &x.device;
    let len = xl.shape().elem_count();
    let name = format!("dropout_{}_{}", sfx(OP, x.dtype())?, sfx(OP, out)?);
    let f = func(dev, Module::Epilogue, &name)?;
    let y = alloc(dev, out, len)?;
    let (dp, len64) = (DropParams::of(Some(mask)), len as u64);
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let xp = p.get(OP, "input", x, xl, false)?;
    let yp = p.get(OP, "output", &y, &Layout::contiguous(len), false)?;
    if len > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&xp).arg(&yp).arg(&len64).arg(&dp);
        // SAFETY: matches `dropout_*`; x and y hold len elements.
        unsafe { launch(lb, elem_cfg(len))? };
    }
    drop(p);
    Ok(y)
}

/// `x + sub * factor` into the f32 residual stream.
pub(crate) fn residual_fwd(
    (x, xl): Arg,
    (s, sl): Arg,
    mask: Option<&DropMask>,
) -> Result<CudaStorage> {
    const OP: &str = "residual_dropout";
    if x.dtype() != DType::F32 {
        return Err(dtype_err(OP, x.dtype(), "an f32 residual"));
    }
    let dev = &x.device;
    let len = xl.shape().elem_count();
    let name = format!("residual_fwd_{}", sfx(OP, s.dtype())?);
    let f = func(dev, Module::Epilogue, &name)?;
    let out = alloc(dev, DType::F32, len)?;
    let (dp, len64) = (DropParams::of(mask), len as u64);
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let xp = p.get(OP, "residual", x, xl, false)?;
    let sp = p.get(OP, "sublayer output", s, sl, false)?;
    let op_ = p.get(OP, "output", &out, &Layout::contiguous(len), false)?;
    if len > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&xp).arg(&sp).arg(&op_).arg(&len64).arg(&dp);
        // SAFETY: matches `residual_fwd_*`; all three buffers hold len elements.
        unsafe { launch(lb, elem_cfg(len))? };
    }
    drop(p);
    Ok(out)
}
