//! Branch-free f32 helpers the row kernels' inner loops are built from (they vectorise).

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
