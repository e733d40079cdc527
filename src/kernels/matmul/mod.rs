//! bf16 x bf16 -> bf16 matmul with f32 accumulation using AVX512-BF16 (`vdpbf16ps`).
//!
//! Classic packed GEMM: B is packed once per batch into panels of `NR` columns where each u32
//! holds the bf16 pair (B[2p, j], B[2p+1, j]); A is packed per task into micro-blocks of `MR`
//! rows holding the pairs (A[i, 2p], A[i, 2p+1]). One `vdpbf16ps` then does 16 columns x one
//! k-pair for one row. The whole K is accumulated in f32 registers and rounded to bf16 once.
//! Packing reads any strides (fast paths for row- and column-major operands), so transposed
//! views such as a Linear weight's `.t()` or the backward's `Aᵀ` are never copied.
//!
//! CPUs without AVX512-BF16 (such as the AMD EPYC this project is developed on, which has AVX2,
//! FMA and F16C only) get an AVX2+FMA micro-kernel over the same packed B panels (pairs widened
//! to f32 with a shift and a mask); a plain-Rust micro-kernel covers everything else and lets
//! the tests check the packing and edge logic on any machine.
//!
//! The op (dispatch, shapes, backward) is here; `pack` lays the operands out in panels,
//! `micro` holds the micro-kernels (plain Rust, AVX2+FMA, AVX512-BF16) and `gemm` drives them
//! over row chunks in parallel.

mod gemm;
mod micro;
mod pack;
#[cfg(test)]
mod tests;

use super::plumbing::dtype_err;
use super::KernelError;
use crate::kernels::fused::{Arg, Fused2, Grads, Op, Out};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use std::sync::OnceLock;

const OP: &str = "bf16_matmul";
/// Rows of A per micro-block.
const MR: usize = 8;
/// Columns of B per packed panel.
const NR: usize = 32;

/// Whether this CPU has AVX512-BF16 (and the kernels may use it). Set `AMPSERVE_NO_BF16_DOT=1`
/// to force the fallback.
pub fn bf16_dot_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var_os("AMPSERVE_NO_BF16_DOT").is_some_and(|v| v != "0") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `vdpbf16ps`; only valid when [`bf16_dot_available`].
    Avx512Bf16,
    /// Same packed B layout, AVX2 + FMA intrinsics with A expanded to f32 pairs; only valid
    /// when [`avx2_fma_available`].
    Avx2Fma,
    /// Same packed layout, plain Rust f32 FMAs (any CPU).
    Portable,
}

/// Whether the AVX2+FMA micro-kernel can run here.
pub(crate) fn avx2_fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 x bf16 -> bf16 matmul with f32 accumulation, batched like `Tensor::matmul`:
/// (b.., m, k) x (b.., k, n) or (b.., m, k) x (k, n); the rhs may be a transposed view (e.g. a
/// Linear weight's `.t()`). The backward produces bf16 grads with the same kernel
/// (`dA = dC·Bᵀ`, `dB = Aᵀ·dC`, computed as `(dCᵀ·A)ᵀ` when B is column-major so that the
/// weight's grad comes out contiguous) without transposed copies.
/// On a CPU without AVX512-BF16 but with AVX2+FMA the same packed GEMM runs an f32-FMA
/// micro-kernel instead (measured faster than candle's bf16 matmul, which converts to f32, and
/// on par with its f32 matmul). Falls back to `Tensor::matmul` (or `broadcast_matmul` for a
/// rank-2 rhs) when an operand is not bf16, not on the CPU, or the CPU has neither.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let bf16_cpu = a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && a.device().is_cpu()
        && b.device().is_cpu();
    use crate::counters::{candle_node, fused_node, NodeCost};
    if bf16_cpu && (bf16_dot_available() || avx2_fma_available()) {
        let kernel = if bf16_dot_available() {
            Kernel::Avx512Bf16
        } else {
            Kernel::Avx2Fma
        };
        let out = matmul_with(a, b, kernel)?;
        fused_node(&out, 2);
        Ok(out)
    } else if a.rank() == b.rank() {
        let out = a.matmul(b)?;
        candle_node(a, &out, NodeCost::MATMUL);
        Ok(out)
    } else {
        // rank-2 rhs: broadcast over the batch dims (a view node when b is tracked), then GEMM
        let out = a.broadcast_matmul(b)?;
        if b.track_op() {
            crate::counters::candle_node(b, &out, NodeCost::BROADCAST);
        }
        candle_node(a, &out, NodeCost::MATMUL);
        Ok(out)
    }
}

/// The packed bf16 GEMM this CPU runs (`vdpbf16ps`, else AVX2+FMA), or `None` when it has neither.
pub(crate) fn cpu_bf16_kernel() -> Option<Kernel> {
    if bf16_dot_available() {
        Some(Kernel::Avx512Bf16)
    } else if avx2_fma_available() {
        Some(Kernel::Avx2Fma)
    } else {
        None
    }
}

/// The packed bf16 GEMM on two bf16 storages with the layouts given (A (m, k), B (k, n), any
/// strides the GEMM takes), for ops that lay out their own operands (`kernels::linear`).
pub(crate) fn gemm_bf16_storage(
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    kernel: Kernel,
) -> Result<(CpuStorage, Shape)> {
    Bf16Matmul { kernel }.fwd(a, b)
}

/// `a @ b` through the packed bf16 GEMM outside the graph (a backward pass's GEMM).
pub(crate) fn gemm_bf16_no_bwd(a: &Tensor, b: &Tensor, kernel: Kernel) -> Result<Tensor> {
    a.apply_op2_no_bwd(b, &Op(Bf16Matmul { kernel }))
}

/// The same packed GEMM and backward without `vdpbf16ps`: an AVX2+FMA micro-kernel where the
/// CPU has one, plain Rust otherwise (bf16 operands on the CPU only). For CPUs without
/// AVX512-BF16, for benchmarks and for checking the packing logic anywhere.
pub fn matmul_portable(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || !a.device().is_cpu() {
        let dtype = if a.dtype() != DType::BF16 {
            a.dtype()
        } else {
            b.dtype()
        };
        return Err(dtype_err(OP, dtype, "bf16 operands on the CPU"));
    }
    let kernel = if avx2_fma_available() {
        Kernel::Avx2Fma
    } else {
        Kernel::Portable
    };
    matmul_with(a, b, kernel)
}

/// `matmul` with a chosen micro-kernel (inputs must be bf16 on the CPU).
pub(crate) fn matmul_with(a: &Tensor, b: &Tensor, kernel: Kernel) -> Result<Tensor> {
    let shape_err = || KernelError::Shape {
        op: OP,
        msg: format!("cannot multiply {:?} by {:?}", a.shape(), b.shape()),
    };
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || !(rb == 2 || rb == ra) || a.dim(D::Minus1)? != b.dim(D::Minus2)? {
        return Err(shape_err().into());
    }
    if rb == ra && a.dims()[..ra - 2] != b.dims()[..rb - 2] {
        return Err(shape_err().into());
    }
    if rb == 2 && ra > 2 {
        let (m, k) = (a.dim(D::Minus2)?, a.dim(D::Minus1)?);
        let batch: usize = a.dims()[..ra - 2].iter().product();
        if a.is_contiguous() {
            let mut out_dims = a.dims().to_vec();
            out_dims[ra - 1] = b.dim(1)?;
            return a
                .reshape((batch * m, k))?
                .apply_op2(b, Op(Bf16Matmul { kernel }))?
                .reshape(out_dims);
        }
        let mut b_dims = a.dims()[..ra - 2].to_vec();
        b_dims.extend_from_slice(b.dims());
        return a.apply_op2(&b.broadcast_as(b_dims)?, Op(Bf16Matmul { kernel }));
    }
    a.apply_op2(b, Op(Bf16Matmul { kernel }))
}

struct Bf16Matmul {
    kernel: Kernel,
}

fn as_u16(s: &[half::bf16]) -> &[u16] {
    // SAFETY: bf16 is #[repr(transparent)] over u16.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) }
}

impl Fused2 for Bf16Matmul {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let (CpuStorage::BF16(a), CpuStorage::BF16(b)) = (s1, s2) else {
            return Err(dtype_err(
                OP,
                candle_core::backend::BackendStorage::dtype(s1),
                "bf16 x bf16",
            ));
        };
        let (da, db) = (l1.dims(), l2.dims());
        let (m, k, n) = (da[da.len() - 2], da[da.len() - 1], db[db.len() - 1]);
        let out = gemm::gemm(as_u16(a), l1, as_u16(b), l2, (m, k, n), self.kernel);
        let mut dims = da[..da.len() - 2].to_vec();
        dims.extend([m, n]);
        Ok((CpuStorage::BF16(out), Shape::from(dims)))
    }

    fn bwd(&self, [a, b]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let g = crate::counters::cast(grad, DType::BF16)?;
        let op = Op(Bf16Matmul {
            kernel: self.kernel,
        });
        let raw = |x: &Tensor, y: &Tensor| x.apply_op2_no_bwd(y, &op);
        let da = raw(&g, &b.t()?)?;
        let rb = b.rank();
        let (b_rs, b_cs) = (b.stride()[rb - 2], b.stride()[rb - 1]);
        let db = if b_rs == 1 && b_cs != 1 {
            // B is column-major (e.g. weight.t()): (dCᵀ · A)ᵀ has B's layout, contiguous.
            raw(&g.t()?, a)?.t()?
        } else {
            raw(&a.t()?, &g)?
        };
        Ok([Some(da), Some(db)])
    }
}
