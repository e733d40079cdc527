//! Device-open settings of a training job on a CUDA device (issue 11 item 2): cheap launches.
//!
//! * **cudarc's event tracking off.** With it on, every buffer carries a read and a write event
//!   and every use of a buffer as a kernel argument waits on one and records the other: a few
//!   driver calls per operand of every launch. The events exist to order uses of one buffer
//!   across streams. A training job's tensors all live on the one stream of its `CudaDevice`
//!   (candle enqueues every kernel, copy and allocation of a device on that device's stream), the
//!   job creates and drops its tensors on its own training thread, and the host reads results
//!   only through synchronous copies on that stream, so stream order alone already orders every
//!   use of every buffer: the events add nothing. The switch is per `CudaContext` object, i.e.
//!   per opened device (`Device::new_cuda` makes a new one each call): devices the server opens
//!   for inference keep their tracking. It affects tensors created after the call, so call it
//!   right after opening the device, before the model is built.
//! * **The memory pool keeps its memory.** candle allocates with `cuMemAllocAsync` from the
//!   device's default pool, whose release threshold is 0: at every synchronisation the pool
//!   returns its free memory to the driver, and the next step allocates it again. A threshold of
//!   `u64::MAX` keeps it (what PyTorch's caching allocator does).
//! * **Kernels are looked up once** (`kernels::cuda::func` keeps the handles).

use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Device, Result};

/// Applies the settings above to a CUDA `dev` (a no-op on other devices). Returns what was set,
/// for the log.
pub fn tune_for_training(dev: &Device) -> Result<Option<String>> {
    let Device::Cuda(cuda) = dev else {
        return Ok(None);
    };
    // SAFETY: see the module doc: a training job uses its device from one thread and one stream.
    unsafe { cuda.disable_event_tracking() };
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    // SAFETY: cu_device is the device of a live context; the pool is the device's default pool,
    // owned by the driver; the attribute takes a u64 (cuuint64_t) value.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).w()?;
        let mut threshold: u64 = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute_enum::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .w()?;
    }
    Ok(Some(format!(
        "cuda:{}: event tracking off, memory pool release threshold u64::MAX",
        ctx.ordinal()
    )))
}
