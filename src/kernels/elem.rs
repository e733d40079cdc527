//! The storage element types the kernels read and write (f32, bf16, f16; all math in f32) and
//! the dtype dispatch over them, written once: [`with_float!`] binds a `CpuStorage`'s typed
//! slice, [`with_out_dtype!`] an output `DType`'s Rust type, [`Elem::slice`] a typed view.

use candle_core::{CpuStorage, DType};
use half::{bf16, f16};

/// A storage element type the kernels read and write; all math happens in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    /// The typed slice of a storage of this element type (`None` for another dtype).
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
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
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
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
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
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
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
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
                return Err($crate::kernels::plumbing::dtype_err(
                    $op,
                    other,
                    $crate::kernels::plumbing::FLOAT,
                ))
            }
        }
    };
}
pub(crate) use with_out_dtype;

/// Dispatches `$body` with `$T` bound to the element type of a float `CpuStorage` and `$s` to
/// its typed slice (the dispatch of [`with_out_dtype!`] over the storage's dtype).
macro_rules! with_float {
    ($storage:expr, $op:expr, |$s:ident : $T:ident| $body:expr) => {{
        let storage: &candle_core::CpuStorage = $storage;
        $crate::kernels::with_out_dtype!(
            candle_core::backend::BackendStorage::dtype(storage),
            $op,
            |$T| {
                let Some($s) = <$T as $crate::kernels::Elem>::slice(storage) else {
                    unreachable!("the storage holds the dtype just matched")
                };
                $body
            }
        )
    }};
}
pub(crate) use with_float;

pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}
