//! The GEMM driver: packs B once per batch (once when shared), then packs A per row chunk and
//! runs the micro-kernel over every (panel, micro-block) pair, row chunks in parallel.

use super::micro::{run_kernel, run_kernel_avx2};
use super::pack::{batch_offsets, pack_a, pack_b, widen_a, Mat};
use super::{Kernel, MR, NR};
use candle_core::Layout;
use half::bf16;
use rayon::prelude::*;

/// Rows per parallel task: keep the packed A chunk around 128 KiB (L2-resident).
fn rows_per_chunk(k: usize, m: usize) -> usize {
    let per_row = k.div_ceil(2).max(1) * 4;
    let mc = (131_072 / per_row / MR).clamp(1, 16) * MR;
    mc.min(m.div_ceil(MR) * MR).max(MR)
}

/// `C = A · B` for bf16 bit patterns `a` (b.., m, k) and `b` (b.., k, n) with any strides,
/// `(m, k, n)` the matrix sizes; returns C contiguous.
pub(super) fn gemm(
    a: &[u16],
    al: &Layout,
    b: &[u16],
    bl: &Layout,
    (m, k, n): (usize, usize, usize),
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
