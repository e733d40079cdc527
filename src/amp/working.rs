//! Compute-dtype working copies of the f32 master weights (mixed precision).
//!
//! A weight a mixed-precision step multiplies by is a copy of its f32 master in the compute
//! dtype. Cast inside the graph (`master.to_dtype(f16)`, as PyTorch's autocast does), every weight
//! costs four launches a step beyond its matmul: the cast, the cast of its gradient back, and
//! candle's zero-fill and add for the extra edge. Here the copy is a leaf of its own (a `Var`),
//! refreshed from the master once per step by one conversion, and its gradient (in the compute
//! dtype, scaled) is what the optimizer reads for the master ([`super::Autocast::grad_of`]). The
//! gradient values are the same: the linear backward writes the weight gradient in the compute
//! dtype either way, and the cast back only widened it.

use candle_core::{
    backend::BackendStorage, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// One master's working copy and the step it was last refreshed for.
#[derive(Debug)]
pub(super) struct Working {
    pub copy: Var,
    pub generation: u64,
}

impl Working {
    /// A new working copy of `master` in `dtype` (outside the graph).
    pub fn new(master: &Tensor, dtype: DType, generation: u64) -> Result<Self> {
        crate::counters::device_ops(1);
        let copy = Var::from_tensor(&master.detach().to_dtype(dtype)?)?;
        Ok(Self { copy, generation })
    }

    /// Rewrites the copy from `master` in place: one conversion pass on the CPU (two launches,
    /// a cast and a copy, elsewhere).
    pub fn refresh(&mut self, master: &Tensor, generation: u64) -> Result<()> {
        let copy = self.copy.as_tensor();
        if master.device().is_cpu() && master.dtype() == DType::F32 && master.is_contiguous() {
            crate::counters::device_ops(1);
            copy.inplace_op2(master, &CastInto)?;
        } else {
            crate::counters::device_ops(2);
            self.copy.set(&master.detach().to_dtype(copy.dtype())?)?;
        }
        self.generation = generation;
        Ok(())
    }
}

/// `dst <- src as dst's dtype` for an f32 `src` and an f16/bf16/f32 `dst`, both contiguous.
struct CastInto;

impl InplaceOp2 for CastInto {
    fn name(&self) -> &'static str {
        "cast_into"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("cast_into: operands must be contiguous");
        };
        let CpuStorage::F32(src) = src else {
            candle_core::bail!("cast_into: source must be f32, got {:?}", src.dtype());
        };
        let src = &src[s0..s1];
        if d1 - d0 != src.len() {
            candle_core::bail!("cast_into: {} elements into {}", src.len(), d1 - d0);
        }
        const CHUNK: usize = 1 << 14;
        match dst {
            CpuStorage::F16(d) => d[d0..d1]
                .par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| {
                    d.iter_mut()
                        .zip(s)
                        .for_each(|(d, s)| *d = f16::from_f32(*s))
                }),
            CpuStorage::BF16(d) => d[d0..d1]
                .par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| {
                    d.iter_mut()
                        .zip(s)
                        .for_each(|(d, s)| *d = bf16::from_f32(*s))
                }),
            CpuStorage::F32(d) => d[d0..d1].copy_from_slice(src),
            other => candle_core::bail!("cast_into: unsupported destination {:?}", other.dtype()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_refresh_rewrites_the_copy_in_place_with_the_masters_new_values() -> Result<()> {
        let master = Var::new(&[1.5f32, -2.25, 3.0e4, 7.0e-3], &Device::Cpu)?;
        for dtype in [DType::F16, DType::BF16] {
            let mut w = Working::new(master.as_tensor(), dtype, 1)?;
            let id = w.copy.as_tensor().id();
            master.set(&Tensor::new(&[0.5f32, 4.0, -1.0e4, 1.0e-2], &Device::Cpu)?)?;
            w.refresh(master.as_tensor(), 2)?;
            assert_eq!(w.copy.as_tensor().id(), id, "the same leaf");
            assert_eq!(w.generation, 2);
            let want = master.as_tensor().to_dtype(dtype)?.to_dtype(DType::F32)?;
            let got = w.copy.as_tensor().to_dtype(DType::F32)?;
            assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?, "{dtype:?}");
        }
        Ok(())
    }
}
