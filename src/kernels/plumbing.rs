//! The plumbing every CPU kernel shares, written once in the spirit of candle's `unary_map` and
//! `Map1`/`Map2`: the dtype checks and their errors, typed slices out of a `CpuStorage`, and the
//! row-parallel drivers (rayon tasks of ~16k elements, one scratch buffer per task). An op file
//! then holds only its math: what happens to one row.

use super::{is_float, Elem, KernelError, Rows};
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// What the float kernels accept.
pub(crate) const FLOAT: &str = "f32, bf16 or f16";

/// The error for a dtype a kernel does not take.
pub(crate) fn dtype_err(
    op: &'static str,
    dtype: DType,
    expected: &'static str,
) -> candle_core::Error {
    KernelError::UnsupportedDType {
        op,
        dtype,
        expected,
    }
    .into()
}

/// The error for operands whose shapes do not fit together.
pub(crate) fn shape_err(op: &'static str, msg: String) -> candle_core::Error {
    KernelError::Shape { op, msg }.into()
}

/// Fails naming the first dtype that is not f32, bf16 or f16.
pub(crate) fn ensure_float(op: &'static str, dtypes: &[DType]) -> Result<()> {
    match dtypes.iter().find(|d| !is_float(**d)) {
        Some(&d) => Err(dtype_err(op, d, FLOAT)),
        None => Ok(()),
    }
}

/// The f32 slice of a storage that must be f32 (`expected` says which operand).
pub(crate) fn f32_slice<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    expected: &'static str,
) -> Result<&'a [f32]> {
    f32::slice(s)
        .ok_or_else(|| dtype_err(op, candle_core::backend::BackendStorage::dtype(s), expected))
}

/// A whole float tensor's storage as contiguous f32 (copied; for small operands such as a bias or
/// layer-norm weights).
pub(crate) fn load_f32(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let r = Rows::new(l);
    let mut out = vec![0f32; r.n_rows * r.d];
    super::with_float!(s, op, |v: T| {
        for (i, row) in out.chunks_mut(r.d.max(1)).enumerate() {
            r.load::<T>(v, i, row);
        }
    });
    Ok(out)
}

/// How many rows one rayon task should take so that a task does at least ~16k elements of work.
#[inline]
pub(crate) fn rows_per_task(d: usize) -> usize {
    (16_384 / d.max(1)).max(1)
}

/// The row-parallel driver: `f(scratch, row_index, out_row)` for every row of `out` (rows of
/// `d`), with one `init()` scratch value per rayon task.
pub(crate) fn par_rows<O: Send, S>(
    out: &mut [O],
    d: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [O]) + Sync,
) {
    if d == 0 {
        return;
    }
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(rows_per_task(d))
        .for_each_init(init, |s, (r, row)| f(s, r, row));
}

/// `unary_map` for rows: loads each row of `src` (any strides, viewed as (rows, d)) as f32, lets
/// `f(row_index, row)` rewrite it in place and stores the rows contiguously as `O`.
pub(crate) fn map_rows<T: Elem, O: Elem>(
    src: &[T],
    l: &Layout,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<O> {
    let r = Rows::new(l);
    let mut out = vec![O::from_f32(0.0); r.n_rows * r.d];
    par_rows(
        &mut out,
        r.d,
        || vec![0f32; r.d],
        |buf, i, orow| {
            r.load(src, i, buf);
            f(i, buf);
            O::store(buf, orow);
        },
    );
    out
}

/// `binary_map` for rows: loads row `i` of `a` and of `b` (same row shape, any strides) as f32;
/// `f(i, a_row, b_row)` leaves the output row in `a_row`, stored contiguously as `O`.
pub(crate) fn map_rows2<A: Elem, B: Elem, O: Elem>(
    a: &[A],
    al: &Layout,
    b: &[B],
    bl: &Layout,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<O> {
    let (ra, rb) = (Rows::new(al), Rows::new(bl));
    let d = ra.d;
    let mut out = vec![O::from_f32(0.0); ra.n_rows * d];
    par_rows(
        &mut out,
        d,
        || (vec![0f32; d], vec![0f32; d]),
        |(av, bv), i, orow| {
            ra.load(a, i, av);
            rb.load(b, i, bv);
            f(i, av, bv);
            O::store(av, orow);
        },
    );
    out
}

/// The row-parallel driver for kernels that also reduce over rows (a bias or layer-norm
/// parameter gradient, a loss): blocks of rows of ~16k elements of work (`work_d` per row) run
/// in parallel, each with one `scratch()` and one `zero()` accumulator that
/// `f(scratch, acc, row_index, out_row)` folds its rows into; the blocks' accumulators are then
/// merged. `out` holds `row_len` elements per row.
pub(crate) fn par_row_blocks<O: Send, S, A: Send>(
    out: &mut [O],
    row_len: usize,
    work_d: usize,
    scratch: impl Fn() -> S + Sync,
    zero: impl Fn() -> A + Sync + Send,
    f: impl Fn(&mut S, &mut A, usize, &mut [O]) + Sync,
    merge: impl Fn(A, A) -> A + Sync + Send,
) -> A {
    if row_len == 0 || out.is_empty() {
        return zero();
    }
    let rpt = rows_per_task(work_d);
    out.par_chunks_mut(rpt * row_len)
        .enumerate()
        .map(|(bi, block)| {
            let mut s = scratch();
            let mut acc = zero();
            for (j, orow) in block.chunks_mut(row_len).enumerate() {
                f(&mut s, &mut acc, bi * rpt + j, orow);
            }
            acc
        })
        .reduce(&zero, merge)
}

/// `a += b`, elementwise (merging per-block column sums).
pub(crate) fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    for (x, y) in a.iter_mut().zip(&b) {
        *x += *y;
    }
    a
}

/// A tensor's storage, checked to be on the CPU (for a backward pass that runs a kernel on the
/// tensors it is given).
pub(crate) struct CpuTensor<'a>(candle_core::StorageRef<'a>, Layout);

impl<'a> CpuTensor<'a> {
    pub fn of(t: &'a Tensor, op: &'static str) -> Result<Self> {
        let (s, l) = t.storage_and_layout();
        let l = l.clone();
        if !matches!(&*s, Storage::Cpu(_)) {
            return Err(dtype_err(op, t.dtype(), "a CPU tensor"));
        }
        Ok(Self(s, l))
    }

    pub fn storage(&self) -> &CpuStorage {
        match &*self.0 {
            Storage::Cpu(c) => c,
            _ => unreachable!("checked in CpuTensor::of"),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.1
    }
}

/// A CPU tensor (no graph) over a kernel's output storage.
pub(crate) fn tensor_from_cpu(
    op: &'static str,
    s: CpuStorage,
    shape: (usize, usize),
) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &dev),
        CpuStorage::BF16(v) => Tensor::from_vec(v, shape, &dev),
        CpuStorage::F16(v) => Tensor::from_vec(v, shape, &dev),
        other => Err(dtype_err(
            op,
            candle_core::backend::BackendStorage::dtype(&other),
            FLOAT,
        )),
    }
}
