//! The multi-tensor optimizer step on a CUDA device (`optim.cu`): ONE launch of `grad_stats`
//! over all gradients (global sum of squares in f64, found_inf from it and from the loss, the
//! clip factor) writing a small device buffer, then ONE launch of `adam_multi` over all
//! parameter tensors that reads that buffer and skips the update on the device when the step
//! overflowed. The host then reads the buffer once: the step's only host sync.

use super::{func, launch, stream, Module};
use crate::kernels::adam::Coefs;
use crate::kernels::plumbing::{dtype_err, shape_err};
use crate::kernels::{counters, AdamHp, KernelError};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor, Var};

const OP: &str = "adam_multi";
/// Elements per block (`CHUNK` in optim.cu).
const CHUNK: usize = 65_536;
const THREADS: u32 = 512;
/// Slots of the state buffer (`ST_*` in optim.cu).
const ST_SUMSQ: usize = 0;
const ST_LOSS: usize = 1;
const ST_FOUND_INF: usize = 2;
const ST_LEN: usize = 4;

/// A device pointer with its guard, element size and dtype code (for the pointer table).
fn with((p, s): (u64, SyncOnDrop<'_>), size: u64, code: u64) -> (u64, SyncOnDrop<'_>, u64, u64) {
    (p, s, size, code)
}

/// `AdamCoefs` in optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamCoefs([f32; 9]);

// SAFETY: nine f32 in a row, laid out as the struct of nine floats `AdamCoefs` in optim.cu.
unsafe impl DeviceRepr for AdamCoefs {}

/// What the host learns from a fused step (its one read of the device).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedStepOut {
    /// The loss value of the step.
    pub loss: f64,
    /// The sum of squares of the (still scaled) gradients.
    pub sum_squares: f64,
    /// The sum or the loss was inf/NaN: the device skipped the update.
    pub found_inf: bool,
}

/// The device buffers a fused step reuses from step to step (allocated once, grown when more
/// chunks are needed).
pub struct FusedAdam {
    dev: CudaDevice,
    state: CudaSlice<f64>,
    partials: CudaSlice<f64>,
    counter: CudaSlice<u32>,
}

impl FusedAdam {
    /// The buffers on `dev`, or `None` when `dev` is not a CUDA device.
    pub fn new(dev: &Device) -> Result<Option<Self>> {
        let Device::Cuda(dev) = dev else {
            return Ok(None);
        };
        let st = stream(dev);
        Ok(Some(Self {
            dev: dev.clone(),
            state: st.alloc_zeros::<f64>(ST_LEN).w()?,
            partials: st.alloc_zeros::<f64>(1).w()?,
            counter: st.alloc_zeros::<u32>(1).w()?,
        }))
    }

    /// One Adam/AdamW step over all `params` (f32 master weights with f32 moments `m`, `v`)
    /// from `grads` (f32, f16 or bf16, read as they are), with `t` the 1-based step it would be and
    /// `inv_scale` the loss scaler's 1 / scale. The gradients are multiplied by
    /// `inv_scale * clip_coef(norm, max_norm)` inside the kernel; nothing changes when the
    /// gradients or `loss` are not finite. Two launches, one upload of the pointer table, one
    /// host read.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        params: &[&Var],
        grads: &[Tensor],
        m: &[Var],
        v: &[Var],
        loss: &Tensor,
        hp: &AdamHp,
        t: u64,
        inv_scale: f64,
        max_norm: f64,
    ) -> Result<FusedStepOut> {
        let k = params.len();
        if grads.len() != k || m.len() != k || v.len() != k {
            return Err(shape_err(
                OP,
                format!(
                    "{k} params, {} grads, {} m, {} v",
                    grads.len(),
                    m.len(),
                    v.len()
                ),
            ));
        }
        if loss.dtype() != DType::F32 || loss.elem_count() != 1 {
            return Err(dtype_err(OP, loss.dtype(), "an f32 scalar loss"));
        }
        // f32, f16 and bf16 gradients are read as they are; only a strided one is copied.
        let grads: Vec<Tensor> = grads
            .iter()
            .map(|g| {
                if g.is_contiguous() {
                    Ok(g.clone())
                } else {
                    counters::device_ops(1);
                    g.contiguous()
                }
            })
            .collect::<Result<_>>()?;
        let st = stream(&self.dev);
        // Pointer table: p, g, m, v pointers, lengths and gradient dtypes of every tensor, then
        // the chunks (see optim.cu).
        let mut table = vec![0u64; 6 * k];
        let mut chunks = Vec::new();
        // Read guards over every storage (held until both launches are enqueued).
        let tensors: Vec<[&Tensor; 4]> = (0..k)
            .map(|i| {
                [
                    params[i].as_tensor(),
                    &grads[i],
                    m[i].as_tensor(),
                    v[i].as_tensor(),
                ]
            })
            .collect();
        let guards: Vec<Vec<_>> = tensors
            .iter()
            .map(|ts| ts.iter().map(|t| t.storage_and_layout()).collect())
            .collect();
        let mut syncs = Vec::with_capacity(4 * k);
        for (i, g4) in guards.iter().enumerate() {
            let len = tensors[i][0].elem_count();
            for (j, (what, (s, l))) in ["param", "grad", "m", "v"].iter().zip(g4).enumerate() {
                if tensors[i][j].elem_count() != len {
                    return Err(shape_err(
                        OP,
                        format!(
                            "{what} {:?} vs param {:?} (tensor {i})",
                            tensors[i][j].dims(),
                            tensors[i][0].dims()
                        ),
                    ));
                }
                if !l.is_contiguous() {
                    return Err(KernelError::NotContiguous { op: OP, what }.into());
                }
                let Storage::Cuda(cs) = &**s else {
                    return Err(dtype_err(OP, tensors[i][j].dtype(), "a CUDA tensor"));
                };
                if cs.device.id() != self.dev.id() {
                    return Err(shape_err(OP, format!("{what} {i} is on another GPU")));
                }
                let (ptr, sync, size, code) = match &cs.slice {
                    CudaStorageSlice::F32(x) => with(x.device_ptr(&st), 4, 0),
                    CudaStorageSlice::F16(x) if j == 1 => with(x.device_ptr(&st), 2, 1),
                    CudaStorageSlice::BF16(x) if j == 1 => with(x.device_ptr(&st), 2, 2),
                    _ => {
                        let want = if j == 1 {
                            "an f32, f16 or bf16 gradient"
                        } else {
                            "f32"
                        };
                        return Err(dtype_err(OP, tensors[i][j].dtype(), want));
                    }
                };
                syncs.push(sync);
                table[j * k + i] = ptr + size * l.start_offset() as u64;
                if j == 1 {
                    table[5 * k + i] = code;
                }
            }
            table[4 * k + i] = len as u64;
            for c in 0..len.div_ceil(CHUNK) {
                chunks.push(((i as u64) << 32) | c as u64);
            }
        }
        let n_chunks = chunks.len();
        if n_chunks == 0 {
            // No parameter elements: nothing to update; the loss is the only thing to read.
            counters::host_sync();
            let lv = loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
            return Ok(FusedStepOut {
                loss: lv,
                sum_squares: 0.0,
                found_inf: !lv.is_finite(),
            });
        }
        table.extend(chunks);
        let table_dev = st.clone_htod(&table).w()?;
        counters::h2d_bytes((table.len() * 8) as u64);
        if self.partials.len() < n_chunks {
            self.partials = st.alloc_zeros::<f64>(n_chunks).w()?;
            counters::device_ops(1);
        }
        let (ls, ll) = loss.storage_and_layout();
        let Storage::Cuda(lcs) = &*ls else {
            return Err(dtype_err(OP, loss.dtype(), "a CUDA loss"));
        };
        let CudaStorageSlice::F32(lslice) = &lcs.slice else {
            return Err(dtype_err(OP, loss.dtype(), "an f32 loss"));
        };
        let (lp, lsync) = lslice.device_ptr(&st);
        let lp = lp + 4 * ll.start_offset() as u64;
        let (ki, ci) = (
            i32::try_from(k).map_err(|_| shape_err(OP, format!("{k} tensors")))?,
            i32::try_from(n_chunks).map_err(|_| shape_err(OP, format!("{n_chunks} chunks")))?,
        );
        let cfg = LaunchConfig {
            grid_dim: (ci as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f_stats = func(&self.dev, Module::Optim, "grad_stats")?;
        let f_adam = func(&self.dev, Module::Optim, "adam_multi")?;
        let mut lb = st.launch_builder(&f_stats);
        lb.arg(&table_dev)
            .arg(&ki)
            .arg(&ci)
            .arg(&lp)
            .arg(&mut self.partials)
            .arg(&mut self.counter)
            .arg(&mut self.state)
            .arg(&inv_scale)
            .arg(&max_norm);
        // SAFETY: matches `grad_stats`; the table holds 6k + n_chunks entries whose pointers
        // are the live f32 buffers guarded above; partials holds >= n_chunks doubles, the
        // counter is 0 (zeroed at allocation, reset by the last block of every launch).
        unsafe { launch(lb, cfg)? };
        let coefs = AdamCoefs(Coefs::device(hp, t));
        let mut lb = st.launch_builder(&f_adam);
        lb.arg(&table_dev).arg(&ki).arg(&self.state).arg(&coefs);
        // SAFETY: matches `adam_multi`; same table; the state was written by `grad_stats` on
        // the same stream. p, m, v are written through the table's pointers: they are this
        // optimizer's own tensors, no other op runs on them meanwhile.
        unsafe { launch(lb, cfg)? };
        drop(syncs);
        drop(lsync);
        drop(ls);
        drop(guards);
        let state = st.clone_dtoh(&self.state).w()?;
        counters::host_sync();
        Ok(FusedStepOut {
            loss: state[ST_LOSS],
            sum_squares: state[ST_SUMSQ],
            found_inf: state[ST_FOUND_INF] != 0.0,
        })
    }
}
