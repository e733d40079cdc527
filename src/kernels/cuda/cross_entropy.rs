//! Launchers of `cross_entropy.cu`: the forward (per-row log-sum-exp and loss, then a one-block
//! mean: two launches) and the fused gradient (one launch).

use super::{alloc, func, launch, rows_cfg, sfx, stream, Module, Ptrs};
use crate::kernels::plumbing::{dtype_err, shape_err};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, DType, Layout, Result};

const OP: &str = "cross_entropy_ls";

/// What the forward pass leaves for the backward pass: per-row log-sum-exp (N) and the count of
/// non-pad rows (1), both f32 on the device.
pub(crate) struct Saved {
    pub lse: CudaStorage,
    pub n_valid: CudaStorage,
}

fn check(x: &CudaStorage, xl: &Layout, t: &CudaStorage) -> Result<(usize, i32)> {
    if t.dtype() != DType::U32 {
        return Err(dtype_err(OP, t.dtype(), "u32 targets"));
    }
    let &[n, v] = xl.dims() else {
        return Err(shape_err(
            OP,
            format!("logits {:?} are not (N, V)", xl.dims()),
        ));
    };
    let _ = sfx(OP, x.dtype())?;
    let vi = i32::try_from(v).map_err(|_| shape_err(OP, format!("{v} classes")))?;
    Ok((n, vi))
}

/// The mean loss (an f32 scalar) and what the backward pass needs.
pub(crate) fn forward(
    (x, xl): (&CudaStorage, &Layout),
    (t, tl): (&CudaStorage, &Layout),
    pad: u32,
    eps: f32,
) -> Result<(CudaStorage, Saved)> {
    let dev = &x.device;
    let (n, v) = check(x, xl, t)?;
    let f_rows = func(
        dev,
        Module::CrossEntropy,
        &format!("cross_entropy_rows_{}", sfx(OP, x.dtype())?),
    )?;
    let f_fin = func(dev, Module::CrossEntropy, "cross_entropy_finish")?;
    let lse = alloc(dev, DType::F32, n.max(1))?;
    let rows = alloc(dev, DType::F32, n.max(1))?;
    let loss = alloc(dev, DType::F32, 1)?;
    let n_valid = alloc(dev, DType::F32, 1)?;
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let xp = p.get(OP, "logits", x, xl, false)?;
    let tp = p.get(OP, "targets", t, tl, false)?;
    let lp = p.get(OP, "lse", &lse, &Layout::contiguous(n.max(1)), false)?;
    let rp = p.get(
        OP,
        "row losses",
        &rows,
        &Layout::contiguous(n.max(1)),
        false,
    )?;
    let op_ = p.get(OP, "loss", &loss, &Layout::contiguous(1), false)?;
    let nvp = p.get(OP, "n_valid", &n_valid, &Layout::contiguous(1), false)?;
    if n > 0 {
        let mut lb = st.launch_builder(&f_rows);
        lb.arg(&xp)
            .arg(&tp)
            .arg(&lp)
            .arg(&rp)
            .arg(&v)
            .arg(&pad)
            .arg(&eps);
        // SAFETY: matches `cross_entropy_rows_*`; logits hold n * v elements, targets, lse and
        // row losses n.
        unsafe { launch(lb, rows_cfg(OP, n, v as usize)?)? };
    }
    let n64 = n as u64;
    let mut lb = st.launch_builder(&f_fin);
    lb.arg(&rp).arg(&tp).arg(&n64).arg(&pad).arg(&op_).arg(&nvp);
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `cross_entropy_finish`; reads n row losses and targets (none when n = 0),
    // writes one loss and one count.
    unsafe { launch(lb, one_block)? };
    drop(p);
    Ok((loss, Saved { lse, n_valid }))
}

/// dlogits in the logits' dtype, from the saved statistics (recomputed when absent) and the
/// upstream gradient `grad` (an f32 scalar on the device: no host read).
pub(crate) fn backward(
    (x, xl): (&CudaStorage, &Layout),
    (t, tl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    saved: Option<&Saved>,
    pad: u32,
    eps: f32,
) -> Result<CudaStorage> {
    if g.dtype() != DType::F32 {
        return Err(dtype_err(OP, g.dtype(), "an f32 upstream gradient"));
    }
    let fresh;
    let saved = match saved {
        Some(s) => s,
        None => {
            fresh = forward((x, xl), (t, tl), pad, eps)?.1;
            &fresh
        }
    };
    let dev = &x.device;
    let (n, v) = check(x, xl, t)?;
    let f = func(
        dev,
        Module::CrossEntropy,
        &format!("cross_entropy_bwd_{}", sfx(OP, x.dtype())?),
    )?;
    let len = n * v as usize;
    let dx = alloc(dev, x.dtype(), len)?;
    let st = stream(dev);
    let mut p = Ptrs::new(&st);
    let xp = p.get(OP, "logits", x, xl, false)?;
    let tp = p.get(OP, "targets", t, tl, false)?;
    let lp = p.get(OP, "lse", &saved.lse, &Layout::contiguous(n.max(1)), false)?;
    let nvp = p.get(OP, "n_valid", &saved.n_valid, &Layout::contiguous(1), false)?;
    let gp = p.get(OP, "gradient", g, gl, true)?;
    let dp = p.get(OP, "dlogits", &dx, &Layout::contiguous(len), false)?;
    if n > 0 {
        let mut lb = st.launch_builder(&f);
        lb.arg(&xp)
            .arg(&tp)
            .arg(&lp)
            .arg(&nvp)
            .arg(&gp)
            .arg(&dp)
            .arg(&v)
            .arg(&pad)
            .arg(&eps);
        // SAFETY: matches `cross_entropy_bwd_*`; logits and dlogits hold n * v elements,
        // targets and lse n, n_valid and the gradient one.
        unsafe { launch(lb, rows_cfg(OP, n, v as usize)?)? };
    }
    drop(p);
    Ok(dx)
}
