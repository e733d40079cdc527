//! The GEMM micro-kernels: one `MR x NR` tile of `A_blk * B_panel` over the packed layout, in
//! plain Rust (any CPU), AVX2+FMA and AVX512-BF16 (`vdpbf16ps`).

use super::{avx2_fma_available, bf16_dot_available, Kernel, MR, NR};

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

#[inline]
pub(super) fn run_kernel(
    kernel: Kernel,
    k2: usize,
    a: &[u32],
    b: &[u32],
    tile: &mut [f32; MR * NR],
) {
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
pub(super) fn run_kernel_avx2(k2: usize, af: &[f32], b: &[u32], tile: &mut [f32; MR * NR]) {
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
