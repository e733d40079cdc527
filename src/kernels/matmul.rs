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

use super::KernelError;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

const OP: &str = "bf16_matmul";
const MR: usize = 8;
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
    if bf16_cpu && bf16_dot_available() {
        matmul_with(a, b, Kernel::Avx512Bf16)
    } else if bf16_cpu && avx2_fma_available() {
        matmul_with(a, b, Kernel::Avx2Fma)
    } else if a.rank() == b.rank() {
        a.matmul(b)
    } else {
        a.broadcast_matmul(b)
    }
}

/// The same packed GEMM and backward without `vdpbf16ps`: an AVX2+FMA micro-kernel where the
/// CPU has one, plain Rust otherwise (bf16 operands on the CPU only). For CPUs without
/// AVX512-BF16, for benchmarks and for checking the packing logic anywhere.
pub fn matmul_portable(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || !a.device().is_cpu() {
        return Err(KernelError::UnsupportedDType {
            op: OP,
            dtype: if a.dtype() != DType::BF16 {
                a.dtype()
            } else {
                b.dtype()
            },
            expected: "bf16 operands on the CPU",
        }
        .into());
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
                .apply_op2(b, Bf16Matmul { kernel })?
                .reshape(out_dims);
        }
        let mut b_dims = a.dims()[..ra - 2].to_vec();
        b_dims.extend_from_slice(b.dims());
        return a.apply_op2(&b.broadcast_as(b_dims)?, Bf16Matmul { kernel });
    }
    a.apply_op2(b, Bf16Matmul { kernel })
}

struct Bf16Matmul {
    kernel: Kernel,
}

/// Offsets of each batch matrix (leading dims unravelled row-major).
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let nb = dims.len() - 2;
    let count: usize = dims[..nb].iter().product();
    (0..count)
        .map(|mut bi| {
            let mut off = l.start_offset();
            for d in (0..nb).rev() {
                off += (bi % dims[d]) * strides[d];
                bi /= dims[d];
            }
            off
        })
        .collect()
}

/// A strided matrix view: element (i, j) at `off + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
struct Mat {
    off: usize,
    rs: usize,
    cs: usize,
}

#[inline(always)]
fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Packs the (k, n) matrix B into panels of NR columns: `[panel][p][NR]` u32 pairs.
fn pack_b(data: &[u16], b: Mat, k: usize, n: usize) -> Vec<u32> {
    let k2 = k.div_ceil(2);
    let np = n.div_ceil(NR);
    let mut out = vec![0u32; np * k2 * NR];
    if k2 == 0 {
        return out;
    }
    out.par_chunks_mut(k2 * NR)
        .enumerate()
        .for_each(|(pi, panel)| {
            let j0 = pi * NR;
            let nj = NR.min(n - j0);
            let at = |p: usize, j: usize| data[b.off + p * b.rs + (j0 + j) * b.cs];
            if b.cs == 1 {
                for p in 0..k2 {
                    let r0 = b.off + 2 * p * b.rs + j0;
                    let row = &mut panel[p * NR..p * NR + nj];
                    let lo = &data[r0..r0 + nj];
                    if 2 * p + 1 < k {
                        let hi = &data[r0 + b.rs..r0 + b.rs + nj];
                        for j in 0..nj {
                            row[j] = pair(lo[j], hi[j]);
                        }
                    } else {
                        for j in 0..nj {
                            row[j] = lo[j] as u32;
                        }
                    }
                }
            } else if b.rs == 1 {
                for j in 0..nj {
                    let c0 = b.off + (j0 + j) * b.cs;
                    let col = &data[c0..c0 + k];
                    for p in 0..k / 2 {
                        panel[p * NR + j] = pair(col[2 * p], col[2 * p + 1]);
                    }
                    if k % 2 == 1 {
                        panel[(k2 - 1) * NR + j] = col[k - 1] as u32;
                    }
                }
            } else {
                for p in 0..k2 {
                    for j in 0..nj {
                        let hi = if 2 * p + 1 < k { at(2 * p + 1, j) } else { 0 };
                        panel[p * NR + j] = pair(at(2 * p, j), hi);
                    }
                }
            }
        });
    out
}

/// Packs rows [i0, i0 + rows) of the (m, k) matrix A into micro-blocks `[block][p][MR]`.
fn pack_a(data: &[u16], a: Mat, i0: usize, rows: usize, k: usize, out: &mut Vec<u32>) {
    let k2 = k.div_ceil(2);
    let nb = rows.div_ceil(MR);
    out.clear();
    out.resize(nb * k2 * MR, 0);
    for blk in 0..nb {
        let buf = &mut out[blk * k2 * MR..(blk + 1) * k2 * MR];
        let r_valid = MR.min(rows - blk * MR);
        let ib = i0 + blk * MR;
        if a.cs == 1 {
            for r in 0..r_valid {
                let s = a.off + (ib + r) * a.rs;
                let row = &data[s..s + k];
                for p in 0..k / 2 {
                    buf[p * MR + r] = pair(row[2 * p], row[2 * p + 1]);
                }
                if k % 2 == 1 {
                    buf[(k2 - 1) * MR + r] = row[k - 1] as u32;
                }
            }
        } else if a.rs == 1 {
            for p in 0..k2 {
                let s0 = a.off + 2 * p * a.cs + ib;
                let lo = &data[s0..s0 + r_valid];
                let dst = &mut buf[p * MR..p * MR + r_valid];
                if 2 * p + 1 < k {
                    let hi = &data[s0 + a.cs..s0 + a.cs + r_valid];
                    for r in 0..r_valid {
                        dst[r] = pair(lo[r], hi[r]);
                    }
                } else {
                    for r in 0..r_valid {
                        dst[r] = lo[r] as u32;
                    }
                }
            }
        } else {
            for r in 0..r_valid {
                for p in 0..k2 {
                    let at = |kk: usize| data[a.off + (ib + r) * a.rs + kk * a.cs];
                    let hi = if 2 * p + 1 < k { at(2 * p + 1) } else { 0 };
                    buf[p * MR + r] = pair(at(2 * p), hi);
                }
            }
        }
    }
}

/// f32 FMA micro-kernel over the packed layout: tile = A_blk (MR x K) * B_panel (K x NR).
fn kernel_portable(k2: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    const RH: usize = 4;
    const CH: usize = 16;
    for rh in 0..MR / RH {
        for ch in 0..NR / CH {
            let mut acc = [[0f32; CH]; RH];
            for p in 0..k2 {
                let bp = &b[p * NR + ch * CH..p * NR + ch * CH + CH];
                let mut b0 = [0f32; CH];
                let mut b1 = [0f32; CH];
                for j in 0..CH {
                    b0[j] = f32::from_bits(bp[j] << 16);
                    b1[j] = f32::from_bits(bp[j] & 0xffff_0000);
                }
                for (r, accr) in acc.iter_mut().enumerate() {
                    let ap = a[p * MR + rh * RH + r];
                    let a0 = f32::from_bits(ap << 16);
                    let a1 = f32::from_bits(ap & 0xffff_0000);
                    for j in 0..CH {
                        accr[j] = a1.mul_add(b1[j], a0.mul_add(b0[j], accr[j]));
                    }
                }
            }
            for (r, accr) in acc.iter().enumerate() {
                let o = (rh * RH + r) * NR + ch * CH;
                tile[o..o + CH].copy_from_slice(accr);
            }
        }
    }
}

/// `vdpbf16ps` micro-kernel over the packed layout.
///
/// # Safety
/// The CPU must support avx512f, avx512bw and avx512bf16; `a` holds `k2 * MR` and `b`
/// `k2 * NR` u32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel_avx512bf16(k2: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= k2 * MR && b.len() >= k2 * NR);
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = [_mm512_setzero_ps(); MR];
    let mut acc1 = [_mm512_setzero_ps(); MR];
    for p in 0..k2 {
        // SAFETY: p < k2 and the slices hold k2 * NR (resp. MR) elements.
        let (b0, b1, arow) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(p * NR) as *const _
                )),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(p * NR + 16) as *const _
                )),
                ap.add(p * MR),
            )
        };
        for r in 0..MR {
            // SAFETY: r < MR.
            let av =
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    unsafe { *arow.add(r) } as i32,
                ));
            acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
        }
    }
    let tp = tile.as_mut_ptr();
    for r in 0..MR {
        // SAFETY: the tile holds MR * NR f32.
        unsafe {
            _mm512_storeu_ps(tp.add(r * NR), acc0[r]);
            _mm512_storeu_ps(tp.add(r * NR + 16), acc1[r]);
        }
    }
}

/// AVX2+FMA micro-kernel: B from the packed bf16-pair panel (widened with a shift and a mask),
/// A from `af`, the micro-block expanded to f32 pairs `[p][MR][2]` (broadcast loads, no ALU work).
///
/// # Safety
/// The CPU must support avx2 and fma; `af` holds `k2 * MR * 2` f32 and `b` `k2 * NR` u32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2fma(k2: usize, af: &[f32], b: &[u32], tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    const RH: usize = 4;
    const CH: usize = 16;
    let (ap, bp, tp) = (af.as_ptr(), b.as_ptr(), tile.as_mut_ptr());
    let hi_mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
    for rh in 0..MR / RH {
        for ch in 0..NR / CH {
            let mut acc = [[_mm256_setzero_ps(); 2]; RH];
            for p in 0..k2 {
                // SAFETY: p < k2; offsets stay within k2 * NR (b) and k2 * MR * 2 (af).
                unsafe {
                    let bq = bp.add(p * NR + ch * CH);
                    let v0 = _mm256_loadu_si256(bq as *const __m256i);
                    let v1 = _mm256_loadu_si256(bq.add(8) as *const __m256i);
                    let b0lo = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
                    let b0hi = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
                    let b1lo = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
                    let b1hi = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
                    let aq = ap.add((p * MR + rh * RH) * 2);
                    for (r, accr) in acc.iter_mut().enumerate() {
                        let a0 = _mm256_broadcast_ss(&*aq.add(2 * r));
                        let a1 = _mm256_broadcast_ss(&*aq.add(2 * r + 1));
                        accr[0] = _mm256_fmadd_ps(a0, b0lo, accr[0]);
                        accr[1] = _mm256_fmadd_ps(a0, b1lo, accr[1]);
                        accr[0] = _mm256_fmadd_ps(a1, b0hi, accr[0]);
                        accr[1] = _mm256_fmadd_ps(a1, b1hi, accr[1]);
                    }
                }
            }
            for (r, accr) in acc.iter().enumerate() {
                // SAFETY: the tile holds MR * NR f32.
                unsafe {
                    let o = tp.add((rh * RH + r) * NR + ch * CH);
                    _mm256_storeu_ps(o, accr[0]);
                    _mm256_storeu_ps(o.add(8), accr[1]);
                }
            }
        }
    }
}

/// Expands a packed A micro-block of bf16 pairs into f32 pairs for the AVX2 kernel.
fn widen_a(a: &[u32], out: &mut Vec<f32>) {
    out.clear();
    out.reserve(a.len() * 2);
    for &v in a {
        out.push(f32::from_bits(v << 16));
        out.push(f32::from_bits(v & 0xffff_0000));
    }
}

#[inline]
fn run_kernel(kernel: Kernel, k2: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => {
            assert!(
                bf16_dot_available(),
                "AVX512-BF16 kernel on a CPU without it"
            );
            assert!(a.len() >= k2 * MR && b.len() >= k2 * NR);
            // SAFETY: feature presence checked above; slice lengths checked above.
            unsafe { kernel_avx512bf16(k2, a, b, tile) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => {
            unreachable!("the AVX2 kernel takes widened A (run_kernel_avx2)")
        }
        _ => kernel_portable(k2, a, b, tile),
    }
}

#[inline]
fn run_kernel_avx2(k2: usize, af: &[f32], b: &[u32], tile: &mut [f32; MR * NR]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(avx2_fma_available(), "AVX2 kernel on a CPU without it");
        assert!(af.len() >= k2 * MR * 2 && b.len() >= k2 * NR);
        // SAFETY: feature presence and slice lengths checked above.
        unsafe { kernel_avx2fma(k2, af, b, tile) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k2, af, b, tile);
        unreachable!("Kernel::Avx2Fma is never chosen off x86_64")
    }
}

/// Rows per parallel task: keep the packed A chunk around 128 KiB (L2-resident).
fn rows_per_chunk(k: usize, m: usize) -> usize {
    let per_row = k.div_ceil(2).max(1) * 4;
    let mc = (131_072 / per_row / MR).clamp(1, 16) * MR;
    mc.min(m.div_ceil(MR) * MR).max(MR)
}

#[allow(clippy::too_many_arguments)]
fn gemm(
    a: &[u16],
    al: &Layout,
    b: &[u16],
    bl: &Layout,
    m: usize,
    k: usize,
    n: usize,
    kernel: Kernel,
) -> Vec<bf16> {
    let ra = al.dims().len();
    let rb = bl.dims().len();
    let a_offs = batch_offsets(al);
    let b_offs = batch_offsets(bl);
    let batch = a_offs.len();
    let mut out = vec![bf16::ZERO; batch * m * n];
    if out.is_empty() {
        return out;
    }
    let (a_rs, a_cs) = (al.stride()[ra - 2], al.stride()[ra - 1]);
    let (b_rs, b_cs) = (bl.stride()[rb - 2], bl.stride()[rb - 1]);
    let shared_b = b_offs.iter().all(|&o| o == b_offs[0]);
    let mk_b = |off: usize| Mat {
        off,
        rs: b_rs,
        cs: b_cs,
    };
    let packed: Vec<Vec<u32>> = if shared_b {
        vec![pack_b(b, mk_b(b_offs[0]), k, n)]
    } else {
        b_offs
            .par_iter()
            .map(|&o| pack_b(b, mk_b(o), k, n))
            .collect()
    };
    let k2 = k.div_ceil(2);
    let np = n.div_ceil(NR);
    let mc = rows_per_chunk(k, m);
    out.par_chunks_mut(m * n).enumerate().for_each(|(bi, cb)| {
        let pb = &packed[if shared_b { 0 } else { bi }];
        let am = Mat {
            off: a_offs[bi],
            rs: a_rs,
            cs: a_cs,
        };
        cb.par_chunks_mut(mc * n).enumerate().for_each_init(
            || (Vec::new(), Vec::new(), Box::new([0f32; MR * NR])),
            |(apack, awide, tile), (ci, cc)| {
                let i0 = ci * mc;
                let rows = cc.len() / n;
                pack_a(a, am, i0, rows, k, apack);
                if kernel == Kernel::Avx2Fma {
                    widen_a(apack, awide);
                }
                let nblk = rows.div_ceil(MR);
                for pi in 0..np {
                    let bpanel = &pb[pi * k2 * NR..(pi + 1) * k2 * NR];
                    let j0 = pi * NR;
                    let nj = NR.min(n - j0);
                    for blk in 0..nblk {
                        if kernel == Kernel::Avx2Fma {
                            let ablk = &awide[blk * k2 * MR * 2..(blk + 1) * k2 * MR * 2];
                            run_kernel_avx2(k2, ablk, bpanel, tile);
                        } else {
                            let ablk = &apack[blk * k2 * MR..(blk + 1) * k2 * MR];
                            run_kernel(kernel, k2, ablk, bpanel, tile);
                        }
                        let r_valid = MR.min(rows - blk * MR);
                        for r in 0..r_valid {
                            let o = (blk * MR + r) * n + j0;
                            store_row(&tile[r * NR..r * NR + nj], &mut cc[o..o + nj]);
                        }
                    }
                }
            },
        );
    });
    out
}

/// f32 -> bf16 (round to nearest even), vectorisable (NaN stays NaN).
#[inline]
fn store_row(src: &[f32], dst: &mut [bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        let bits = s.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        let nan = (bits >> 16) | 0x40;
        let v = if s.is_nan() { nan } else { rounded };
        *d = bf16::from_bits(v as u16);
    }
}

fn as_u16(s: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is #[repr(transparent)] over u16.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) }
}

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(a), CpuStorage::BF16(b)) = (s1, s2) else {
            return Err(KernelError::UnsupportedDType {
                op: OP,
                dtype: candle_core::backend::BackendStorage::dtype(s1),
                expected: "bf16 x bf16",
            }
            .into());
        };
        let (da, db) = (l1.dims(), l2.dims());
        let (m, k, n) = (da[da.len() - 2], da[da.len() - 1], db[db.len() - 1]);
        let out = gemm(as_u16(a), l1, as_u16(b), l2, m, k, n, self.kernel);
        let mut dims = da[..da.len() - 2].to_vec();
        dims.extend([m, n]);
        Ok((CpuStorage::BF16(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::BF16)?;
        let raw = |x: &Tensor, y: &Tensor| x.apply_op2_no_bwd(y, self);
        let da = raw(&g, &b.t()?)?;
        let rb = b.rank();
        let (b_rs, b_cs) = (b.stride()[rb - 2], b.stride()[rb - 1]);
        let db = if b_rs == 1 && b_cs != 1 {
            // B is column-major (e.g. weight.t()): (dCᵀ · A)ᵀ has B's layout, contiguous.
            raw(&g.t()?, a)?.t()?
        } else {
            raw(&a.t()?, &g)?
        };
        Ok((Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
    use candle_core::Var;

    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Portable];
        if avx2_fma_available() {
            k.push(Kernel::Avx2Fma);
        }
        if bf16_dot_available() {
            k.push(Kernel::Avx512Bf16);
        }
        k
    }

    /// bf16 result vs the f32 matmul of the same bf16 values: only accumulation order and the
    /// final bf16 rounding differ.
    fn assert_close(got: &Tensor, want_f32: &Tensor, k: usize, what: &str) -> Result<()> {
        assert_eq!(got.dtype(), DType::BF16, "{what}");
        assert_eq!(got.dims(), want_f32.dims(), "{what}");
        let diff = max_abs_diff(got, want_f32)?;
        let scale = max_abs(want_f32)?.max(1e-3);
        // bf16 rounding is 2^-9 relative; allow accumulation differences on top.
        let tol = scale * 2f32.powi(-8) + 1e-4 * (k as f32).sqrt();
        assert!(
            diff <= tol,
            "{what}: diff {diff} > tol {tol} (scale {scale})"
        );
        Ok(())
    }

    fn bf(shape: &[usize], seed: u64) -> Result<Tensor> {
        randn(shape, seed, 1.0)?.to_dtype(DType::BF16)
    }

    fn f32_ref(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        if a.rank() == b.rank() {
            a.matmul(&b)
        } else {
            a.broadcast_matmul(&b)
        }
    }

    #[test]
    fn forward_many_shapes_odd_sizes_batched_and_transposed() -> Result<()> {
        for kernel in kernels() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (3, 5, 7),
                (8, 32, 32),
                (9, 33, 31),
                (17, 2, 65),
                (64, 128, 96),
                (130, 257, 40),
            ] {
                let a = bf(&[m, k], (m * 31 + k) as u64)?;
                let b = bf(&[k, n], (k * 17 + n) as u64)?;
                let w = bf(&[n, k], (n * 7 + k) as u64)?; // Linear weight; rhs = w.t()
                let what = format!("{kernel:?} {m}x{k}x{n}");
                assert_close(&matmul_with(&a, &b, kernel)?, &f32_ref(&a, &b)?, k, &what)?;
                assert_close(
                    &matmul_with(&a, &w.t()?, kernel)?,
                    &f32_ref(&a, &w.t()?)?,
                    k,
                    &format!("{what} rhs=w.t()"),
                )?;
                // Transposed lhs view too.
                let at = bf(&[k, m], 5)?.t()?;
                assert_close(
                    &matmul_with(&at, &b, kernel)?,
                    &f32_ref(&at, &b)?,
                    k,
                    &format!("{what} lhs=t"),
                )?;
            }
            // Batched (attention-like) with a transposed rhs per batch: (B,H,T,dk) x (B,H,dk,T).
            let q = bf(&[2, 3, 13, 8], 1)?;
            let kk = bf(&[2, 3, 13, 8], 2)?;
            let kt = kk.transpose(2, 3)?;
            assert_close(
                &matmul_with(&q, &kt, kernel)?,
                &f32_ref(&q, &kt)?,
                8,
                "batched qk",
            )?;
            // Rank-3 lhs with a shared rank-2 rhs (the Linear case), contiguous and not.
            let x = bf(&[4, 11, 24], 3)?;
            let w = bf(&[40, 24], 4)?;
            assert_close(
                &matmul_with(&x, &w.t()?, kernel)?,
                &f32_ref(&x, &w.t()?)?,
                24,
                "linear",
            )?;
            let xt = bf(&[11, 4, 24], 5)?.transpose(0, 1)?;
            assert_close(
                &matmul_with(&xt, &w.t()?, kernel)?,
                &f32_ref(&xt, &w.t()?)?,
                24,
                "linear nc",
            )?;
        }
        Ok(())
    }

    fn check_grads(a: &Tensor, b: &Tensor, kernel: Kernel, what: &str) -> Result<()> {
        // The weight is a Var stored (n, k) and used as w.t() when `b` is transposed.
        let av = Var::from_tensor(a)?;
        let bv = Var::from_tensor(b)?;
        let (av2, bv2) = (
            Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            Var::from_tensor(&b.to_dtype(DType::F32)?)?,
        );
        let out_shape = f32_ref(a, b)?.dims().to_vec();
        let w = randn(&out_shape, 77, 1.0)?.to_dtype(DType::BF16)?;
        let y = matmul_with(&av, &bv, kernel)?;
        let ga = y.mul(&w)?.sum_all()?.backward()?;
        let y2 = f32_ref(&av2, &bv2)?;
        let gb = y2.mul(&w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        let k_a = out_shape[out_shape.len() - 1];
        let k_b: usize = out_shape[..out_shape.len() - 1].iter().product();
        assert_close(
            ga.get(&av).unwrap(),
            gb.get(&av2).unwrap(),
            k_a,
            &format!("{what} dA"),
        )?;
        assert_close(
            ga.get(&bv).unwrap(),
            gb.get(&bv2).unwrap(),
            k_b,
            &format!("{what} dB"),
        )?;
        Ok(())
    }

    #[test]
    fn backward_matches_f32_for_linear_and_batched_layouts() -> Result<()> {
        for kernel in kernels() {
            // Plain 2-D.
            check_grads(&bf(&[19, 33], 1)?, &bf(&[33, 21], 2)?, kernel, "2d")?;
            // Linear: rank-3 input times a shared (k, n) weight, as a row-major (k, n) Var.
            check_grads(
                &bf(&[3, 7, 16], 3)?,
                &bf(&[16, 35], 4)?,
                kernel,
                "linear kn",
            )?;
            // Batched attention-style matmuls.
            check_grads(
                &bf(&[2, 2, 9, 8], 5)?,
                &bf(&[2, 2, 8, 9], 6)?,
                kernel,
                "batched",
            )?;
        }
        Ok(())
    }

    #[test]
    fn backward_through_transposed_weight() -> Result<()> {
        for kernel in kernels() {
            let x = Var::from_tensor(&bf(&[2, 10, 24], 8)?)?;
            let w = Var::from_tensor(&bf(&[40, 24], 9)?)?; // (out, in)
            let y = matmul_with(&x, &w.t()?, kernel)?;
            let g = y.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
            let gw = g.get(&w).unwrap();
            assert_eq!(gw.dims(), &[40, 24]);
            assert_eq!(gw.dtype(), DType::BF16);
            // Oracle in f32.
            let (x2, w2) = (
                Var::from_tensor(&x.to_dtype(DType::F32)?)?,
                Var::from_tensor(&w.to_dtype(DType::F32)?)?,
            );
            // d/dy sum(y²) = 2y with y rounded to bf16 as in the bf16 graph.
            let y2 = x2.broadcast_matmul(&w2.t()?)?;
            let yb = y.to_dtype(DType::F32)?;
            let g2 = y2.mul(&(yb * 2.0)?)?.sum_all()?.backward()?;
            assert_close(gw, g2.get(&w2).unwrap(), 20, "dW")?;
            assert_close(g.get(&x).unwrap(), g2.get(&x2).unwrap(), 40, "dX")?;
        }
        Ok(())
    }

    #[test]
    fn public_matmul_falls_back_for_f32_and_rejects_bad_shapes() -> Result<()> {
        let a = randn(&[3, 4], 1, 1.0)?;
        let b = randn(&[4, 5], 2, 1.0)?;
        let y = matmul(&a, &b)?;
        assert_eq!(y.dtype(), DType::F32);
        // bf16 goes through the packed GEMM wherever a micro-kernel exists, and agrees with f32.
        let (ab, bb) = (bf(&[5, 40], 3)?, bf(&[40, 7], 4)?);
        assert_close(&matmul(&ab, &bb)?, &f32_ref(&ab, &bb)?, 40, "public bf16")?;
        assert!(max_abs_diff(&y, &a.matmul(&b)?)? == 0.0);
        let err = matmul_with(&bf(&[3, 4], 1)?, &bf(&[5, 6], 2)?, Kernel::Portable).unwrap_err();
        assert!(err.to_string().contains("cannot multiply"), "{err}");
        Ok(())
    }
}
