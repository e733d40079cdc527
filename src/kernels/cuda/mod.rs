//! The CUDA halves of the fused kernels: launchers for the PTX that `build.rs` compiles from
//! `src/kernels/cuda/*.cu` (sm_90 by default), and the device-open settings of a training job.
//!
//! Conventions every launcher follows:
//! * one launch per forward and per backward where possible, each counted with
//!   `counters::device_ops(1)`;
//! * inputs contiguous (the op entry points call `.contiguous()` on CUDA; a launcher that still
//!   gets a strided operand fails with [`KernelError::NotContiguous`] naming it), except the
//!   softmax mask, which is read through its broadcast strides;
//! * f32/f16/bf16 storage with f32 math; the kernel name carries the dtypes (`_f32_bf16`);
//! * row kernels: one block per row, a multiple of 32 threads (at most 1024) looping over the
//!   row, reductions by warp shuffles and shared memory (`common.cuh`).
//!
//! Functions are looked up once per device and name and kept ([`func`]); candle's
//! `get_or_load_custom_func` caches the module but asks the driver for the function on every call.

pub(crate) mod cross_entropy;
pub mod device;
pub(crate) mod epilogue;
pub(crate) mod layer_norm;
pub(crate) mod optim;
pub(crate) mod softmax;

use super::plumbing::{dtype_err, FLOAT};
use super::{counters, KernelError};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One PTX module per `.cu` file.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Module {
    CrossEntropy,
    Epilogue,
    LayerNorm,
    Optim,
    Softmax,
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::CrossEntropy => "ampserve_cross_entropy",
            Module::Epilogue => "ampserve_epilogue",
            Module::LayerNorm => "ampserve_layer_norm",
            Module::Optim => "ampserve_optim",
            Module::Softmax => "ampserve_softmax",
        }
    }

    fn ptx(self) -> &'static str {
        match self {
            Module::CrossEntropy => include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx")),
            Module::Epilogue => include_str!(concat!(env!("OUT_DIR"), "/epilogue.ptx")),
            Module::LayerNorm => include_str!(concat!(env!("OUT_DIR"), "/layer_norm.ptx")),
            Module::Optim => include_str!(concat!(env!("OUT_DIR"), "/optim.ptx")),
            Module::Softmax => include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")),
        }
    }
}

type FuncCache = Mutex<HashMap<(DeviceId, String), CudaFunction>>;

/// The kernel `name` of module `m` on `dev`: the module is loaded once per device (through
/// candle's module cache) and the function handle is kept here, so a launch costs no driver
/// lookup.
pub(crate) fn func(dev: &CudaDevice, m: Module, name: &str) -> Result<CudaFunction> {
    static CACHE: OnceLock<FuncCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (dev.id(), name.to_string());
    if let Some(f) = cache.lock().map_err(poisoned)?.get(&key) {
        return Ok(f.clone());
    }
    let f: CudaFunction = (*dev.get_or_load_custom_func(name, m.name(), m.ptx())?).clone();
    cache.lock().map_err(poisoned)?.insert(key, f.clone());
    Ok(f)
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("ampserve CUDA function cache: poisoned lock".into())
}

/// The dtype suffix of a kernel name.
pub(crate) fn sfx(op: &'static str, d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => return Err(dtype_err(op, other, FLOAT)),
    })
}

/// The dropout mask as kernel parameters (`DropParams` in common.cuh); no mask = keep all with
/// scale 1.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropParams {
    seed: u64,
    threshold: u32,
    scale: f32,
}

// SAFETY: a plain #[repr(C)] struct of scalars, laid out as `DropParams` in common.cuh
// (u64, u32, f32: 16 bytes, 8-aligned).
unsafe impl DeviceRepr for DropParams {}

impl DropParams {
    pub fn of(m: Option<&super::DropMask>) -> Self {
        match m {
            Some(m) => Self {
                seed: m.seed(),
                threshold: m.threshold(),
                scale: m.scale(),
            },
            None => Self {
                seed: 0,
                threshold: 1 << 24,
                scale: 1.0,
            },
        }
    }
}

/// Device pointers of the operands of one launch, holding cudarc's read/write-event guards
/// until the launch is enqueued (they must drop after it, see `DevicePtr::device_ptr`).
pub(crate) struct Ptrs<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Ptrs<'a> {
    pub fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            guards: Vec::new(),
        }
    }

    /// The address of element `l.start_offset()` of `s`; `what` names the operand in errors.
    /// Fails unless the layout is contiguous (`contiguous_ok = false` skips that check for an
    /// operand read through explicit strides).
    pub fn get(
        &mut self,
        op: &'static str,
        what: &'static str,
        s: &'a CudaStorage,
        l: &Layout,
        contiguous_ok: bool,
    ) -> Result<u64> {
        if !contiguous_ok && !l.is_contiguous() {
            return Err(KernelError::NotContiguous { op, what }.into());
        }
        let (base, size) = match &s.slice {
            CudaStorageSlice::F32(x) => self.keep(x.device_ptr(self.stream), 4),
            CudaStorageSlice::F16(x) => self.keep(x.device_ptr(self.stream), 2),
            CudaStorageSlice::BF16(x) => self.keep(x.device_ptr(self.stream), 2),
            CudaStorageSlice::U32(x) => self.keep(x.device_ptr(self.stream), 4),
            CudaStorageSlice::F64(x) => self.keep(x.device_ptr(self.stream), 8),
            _ => {
                let d = candle_core::backend::BackendStorage::dtype(s);
                return Err(dtype_err(op, d, "f32, f16, bf16, u32 or f64"));
            }
        };
        Ok(base + (l.start_offset() * size) as u64)
    }

    fn keep(&mut self, (p, g): (u64, SyncOnDrop<'a>), size: usize) -> (u64, usize) {
        self.guards.push(g);
        (p, size)
    }
}

/// A fresh (uninitialised) device buffer of `n` elements of `dtype`; every launcher writes all
/// of its output.
pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    // SAFETY (all arms): the launcher that asked for the buffer writes every element before
    // anything reads it.
    let slice = match dtype {
        DType::F32 => CudaStorageSlice::F32(unsafe { dev.alloc::<f32>(n)? }),
        DType::F16 => CudaStorageSlice::F16(unsafe { dev.alloc::<half::f16>(n)? }),
        DType::BF16 => CudaStorageSlice::BF16(unsafe { dev.alloc::<half::bf16>(n)? }),
        DType::U32 => CudaStorageSlice::U32(unsafe { dev.alloc::<u32>(n)? }),
        DType::F64 => CudaStorageSlice::F64(unsafe { dev.alloc::<f64>(n)? }),
        other => return Err(dtype_err("alloc", other, "f32, f16, bf16, u32 or f64")),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

/// A graph-less tensor over a launcher's output (a gradient built inside a backward pass).
pub(crate) fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        candle_core::Storage::Cuda(s),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// The launch configuration of a row kernel: one block per row, threads a multiple of 32 that
/// covers the row (at most 1024; longer rows loop).
pub(crate) fn rows_cfg(op: &'static str, rows: usize, d: usize) -> Result<LaunchConfig> {
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&r| r < (1 << 31))
        .ok_or_else(|| super::plumbing::shape_err(op, format!("{rows} rows exceed one grid")))?;
    let threads = d.div_ceil(32).clamp(1, 32) as u32 * 32;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Grid-stride elementwise kernels: 256 threads, at most 65,536 blocks.
pub(crate) fn elem_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Column reductions (`column_sum` in common.cuh): blocks of (32, 32) over 32 columns each.
pub(crate) fn cols_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(32).max(1) as u32, 1, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    }
}

/// Enqueues a built launch on its stream and counts it.
///
/// # Safety
/// The arguments pushed on `b` must match the kernel's parameters in number, order and type,
/// and the buffers behind its pointers must hold what `cfg` makes the kernel touch.
pub(crate) unsafe fn launch(mut b: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { b.launch(cfg) }.w()?;
    counters::device_ops(1);
    Ok(())
}

/// The stream every launch of `dev` goes to (candle's stream of that device).
pub(crate) fn stream(dev: &CudaDevice) -> Arc<CudaStream> {
    dev.cuda_stream()
}

/// Runs `f` on the CUDA storage and layout of `t` (a backward pass launching kernels on the
/// tensors it is given).
pub(crate) fn with_storage<R>(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(c) => f(c, l),
        _ => Err(dtype_err(op, t.dtype(), "a CUDA tensor")),
    }
}

pub use optim::{FusedAdam, FusedStepOut};
