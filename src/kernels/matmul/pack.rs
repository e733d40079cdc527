//! Packing for the bf16 GEMM: B into panels of `NR` columns of bf16 pairs along k, A into
//! micro-blocks of `MR` rows, from any strides (fast paths for row- and column-major operands, so
//! a transposed view is never copied).

use super::{MR, NR};
use candle_core::Layout;
use rayon::prelude::*;

/// Offsets of each batch matrix (leading dims unravelled row-major).
pub(super) fn batch_offsets(l: &Layout) -> Vec<usize> {
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
pub(super) struct Mat {
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

#[inline(always)]
pub(super) fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Packs the (k, n) matrix B into panels of NR columns: `[panel][p][NR]` u32 pairs.
pub(super) fn pack_b(data: &[u16], b: Mat, k: usize, n: usize) -> Vec<u32> {
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
pub(super) fn pack_a(data: &[u16], a: Mat, i0: usize, rows: usize, k: usize, out: &mut Vec<u32>) {
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

/// Expands a packed A micro-block of bf16 pairs into f32 pairs for the AVX2 kernel.
pub(super) fn widen_a(a: &[u32], out: &mut Vec<f32>) {
    out.clear();
    out.reserve(a.len() * 2);
    for &v in a {
        out.push(f32::from_bits(v << 16));
        out.push(f32::from_bits(v & 0xffff_0000));
    }
}
