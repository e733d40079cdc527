//! Fused CPU kernels with their own backward pass for mixed-precision training.
//!
//! Every op here is a candle `CustomOp` on CPU (rayon over rows, f32 math whatever the storage
//! dtype) and falls back to an equivalent differentiable composition of candle ops on other
//! devices. The fused ops exist because candle's own fused `softmax_last_dim` / `layer_norm` have
//! no backward, and because a small Transformer on a CPU is bound by elementwise work: one pass
//! over a row instead of five or six materialised intermediates.
//!
//! * [`layer_norm`]: tutorial (`alpha * (x - mean) / (std_unbiased + eps) + beta`) or standard form.
//! * [`masked_softmax`]: `softmax(scores * scale + mask)` with a broadcast additive mask.
//! * [`cross_entropy_ls`]: label-smoothed cross-entropy with an ignore index, fused gradient.
//! * [`matmul`]: packed bf16 GEMM (AVX512-BF16 `vdpbf16ps`, or an AVX2+FMA micro-kernel on CPUs
//!   without it), with a backward through the same kernel.
//! * [`bias_act`] / [`dropout`] / [`residual_dropout`]: linear epilogues (bias, ReLU, dropout with a
//!   byte mask) and the residual add, with the bias gradient as a column sum in the same pass.
//! * [`linear`]: `x @ w.T` for a linear layer as one graph node (no reshape/transpose nodes).
//! * [`adam_update`] / [`sum_squares`]: one-pass optimizer update and global squared norm.

mod adam;
mod cross_entropy;
mod epilogue;
mod layer_norm;
mod linear;
mod matmul;
mod softmax;

pub use adam::{adam_update, sum_squares, AdamHp};
pub use cross_entropy::cross_entropy_ls;
pub use epilogue::{bias_act, dropout, residual_dropout, DropMask};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use matmul::{bf16_dot_available, matmul, matmul_portable};
pub use softmax::masked_softmax;

/// The straightforward differentiable compositions of candle ops the fused kernels replace: the
/// off-CPU fallbacks, the test oracles and the benchmark baselines.
pub mod reference {
    pub use super::adam::reference as adam_update;
    pub use super::cross_entropy::reference as cross_entropy_ls;
    pub use super::epilogue::reference::{bias_act, dropout, residual_dropout};
    pub use super::layer_norm::reference as layer_norm;
    pub use super::linear::reference as linear;
    pub use super::softmax::reference as masked_softmax;
}

use candle_core::{CpuStorage, DType, Layout};
use half::{bf16, f16};

/// Errors raised by the kernels (wrapped into `candle_core::Error` at the API boundary, since
/// every kernel is called from inside candle's graph machinery).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: unsupported dtype {dtype:?} (expected {expected})")]
    UnsupportedDType {
        op: &'static str,
        dtype: DType,
        expected: &'static str,
    },
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: target {target} at row {row} is out of range for {classes} classes")]
    TargetOutOfRange {
        op: &'static str,
        row: usize,
        target: u32,
        classes: usize,
    },
    #[error("{op}: {what} must be contiguous and start-aligned for an in-place update")]
    NotContiguous {
        op: &'static str,
        what: &'static str,
    },
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// A storage element type the kernels read and write; all math happens in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    /// Converts a contiguous slice into f32.
    #[inline]
    fn load(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// Converts f32 values into a contiguous slice.
    #[inline]
    fn store(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    #[inline]
    fn load(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(v)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F16(v)
    }
    #[inline]
    fn load(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst)
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src)
    }
}

/// Dispatches `$body` with `$T` bound to the element type of a float `CpuStorage`
/// (`$s` becomes the typed slice).
macro_rules! with_float {
    ($storage:expr, $op:expr, |$s:ident : $T:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32($s) => {
                type $T = f32;
                $body
            }
            candle_core::CpuStorage::BF16($s) => {
                type $T = half::bf16;
                $body
            }
            candle_core::CpuStorage::F16($s) => {
                type $T = half::f16;
                $body
            }
            other => {
                return Err($crate::kernels::KernelError::UnsupportedDType {
                    op: $op,
                    dtype: candle_core::backend::BackendStorage::dtype(other),
                    expected: "f32, bf16 or f16",
                }
                .into())
            }
        }
    };
}
pub(crate) use with_float;

/// Dispatches `$body` with `$T` bound to the Rust type of a float `DType`.
macro_rules! with_out_dtype {
    ($dtype:expr, $op:expr, |$T:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => {
                return Err($crate::kernels::KernelError::UnsupportedDType {
                    op: $op,
                    dtype: other,
                    expected: "f32, bf16 or f16",
                }
                .into())
            }
        }
    };
}
pub(crate) use with_out_dtype;

pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Row addressing over a strided layout viewed as (rows, d) with d the last dim.
#[derive(Clone, Debug)]
pub(crate) struct Rows {
    pub n_rows: usize,
    pub d: usize,
    /// Stride of the last dim.
    pub step: usize,
    start: usize,
    /// Leading dims and their strides (innermost last); empty when rows are evenly spaced.
    lead: Vec<(usize, usize)>,
    /// Distance between consecutive rows when `lead` is empty.
    row_stride: usize,
}

impl Rows {
    pub fn new(layout: &Layout) -> Self {
        let dims = layout.dims();
        let strides = layout.stride();
        let (d, step) = match dims.last() {
            Some(&d) => (d, strides[dims.len() - 1]),
            None => (1, 1),
        };
        let lead_dims = &dims[..dims.len().saturating_sub(1)];
        let lead_strides = &strides[..dims.len().saturating_sub(1)];
        let n_rows: usize = lead_dims.iter().product();
        // Collapse the leading dims when they form one evenly spaced sequence.
        let mut row_stride = None;
        let mut expected: Option<usize> = None;
        let mut evenly = true;
        for (&dim, &st) in lead_dims.iter().zip(lead_strides).rev() {
            if dim == 1 {
                continue;
            }
            match expected {
                None => {
                    row_stride = Some(st);
                    expected = Some(st * dim);
                }
                Some(e) if e == st => expected = Some(st * dim),
                Some(_) => {
                    evenly = false;
                    break;
                }
            }
        }
        let lead = if evenly {
            Vec::new()
        } else {
            lead_dims
                .iter()
                .copied()
                .zip(lead_strides.iter().copied())
                .collect()
        };
        Rows {
            n_rows,
            d,
            step,
            start: layout.start_offset(),
            lead,
            row_stride: row_stride.unwrap_or(0),
        }
    }

    #[inline]
    pub fn offset(&self, r: usize) -> usize {
        if self.lead.is_empty() {
            return self.start + r * self.row_stride;
        }
        let mut off = self.start;
        let mut r = r;
        for &(dim, st) in self.lead.iter().rev() {
            off += (r % dim) * st;
            r /= dim;
        }
        off
    }

    /// Loads row `r` of `src` into `dst` (len d) as f32.
    #[inline]
    pub fn load<T: Elem>(&self, src: &[T], r: usize, dst: &mut [f32]) {
        let off = self.offset(r);
        if self.step == 1 {
            T::load(&src[off..off + self.d], dst);
        } else {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = src[off + i * self.step].to_f32();
            }
        }
    }
}

/// exp(x) for f32, vectorisable (no branches, no calls): Cody-Waite range reduction and a
/// degree-6 polynomial; relative error about 2 ulp on [-87, 88], saturates to 0 below -87.3
/// and to exp(88) (finite) above 88. NaN in gives NaN out.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.0);
    // Keep NaN as NaN (clamp keeps NaN, the polynomial propagates it).
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2^n from the integer sitting in the low mantissa bits of t.
    let bits = (t.to_bits() as i32)
        .wrapping_sub(0x4b40_0000)
        .wrapping_add(127)
        << 23;
    let scale = f32::from_bits(bits as u32);
    let y = p * scale;
    if xc <= -87.3 {
        0.0
    } else {
        y
    }
}

/// Sum of a slice with 8 independent accumulators (vectorises).
#[inline]
pub(crate) fn sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for &v in rem {
        s += v;
    }
    s
}

/// Dot product with 8 independent accumulators (vectorises).
#[inline]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Max of a slice (vectorises); `-inf` for an empty slice.
#[inline]
pub(crate) fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in rem {
        m = m.max(v);
    }
    m
}

/// How many rows one rayon task should take so that a task does at least ~16k elements of work.
#[inline]
pub(crate) fn rows_per_task(d: usize) -> usize {
    (16_384 / d.max(1)).max(1)
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Device, Result, Tensor};

    /// Deterministic pseudo-random tensor (normal-ish, via a sum of uniforms) for tests.
    pub fn randn(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let v: Vec<f32> = (0..n)
            .map(|_| (next() + next() + next() + next() - 2.0) * 1.7 * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let a = a.to_dtype(DType::F32)?.flatten_all()?;
        let b = b.to_dtype(DType::F32)?.flatten_all()?;
        a.sub(&b)?.abs()?.max(0)?.to_scalar::<f32>()
    }

    pub fn max_abs(a: &Tensor) -> Result<f32> {
        a.to_dtype(DType::F32)?
            .flatten_all()?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()
    }

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 87.9 {
            let rel = (super::fast_exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(super::fast_exp(-1e9), 0.0);
        assert!(super::fast_exp(1e9).is_finite());
        assert!(super::fast_exp(f32::NAN).is_nan());
    }
}
