//! Token embedding as one graph node: `table[ids] * scale + positions`.
//!
//! Through tensor ops this is a gather, a reshape, a scale and a broadcast add: four nodes, and
//! candle's backward zero-fills and adds for each (and hands the constant position table a
//! gradient it throws away). Here the forward is one pass and the backward one scatter-add of the
//! scaled gradient into the table's rows.

use super::fused::{Arg, Fused2, Grads, Op, Out};
use super::plumbing::{dtype_err, shape_err};
use candle_core::{CpuStorage, DType, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

const OP: &str = "embed";

/// `table[ids] * scale + positions`: table (vocab, d) f32, ids (b, t) u32, positions (t, d) f32
/// (a constant: no gradient); returns (b, t, d) f32. The gradient flows to the table.
pub fn embed(table: &Tensor, ids: &Tensor, positions: &Tensor, scale: f64) -> Result<Tensor> {
    let (vocab, d) = table.dims2()?;
    let (b, t) = ids.dims2()?;
    if positions.dims() != [t, d] {
        return Err(shape_err(
            OP,
            format!(
                "positions {:?} for ids {:?} and width {d}",
                positions.dims(),
                ids.dims()
            ),
        ));
    }
    if table.dtype() != DType::F32 || positions.dtype() != DType::F32 {
        return Err(dtype_err(OP, table.dtype(), "an f32 table and positions"));
    }
    if ids.dtype() != DType::U32 {
        return Err(dtype_err(OP, ids.dtype(), "u32 token ids"));
    }
    if !table.device().is_cpu() {
        return reference(table, ids, positions, scale);
    }
    let positions = positions.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let out = table.contiguous()?.apply_op2(
        &ids.contiguous()?,
        Op(Embed {
            positions,
            scale: scale as f32,
            shape: (b, t, d),
            vocab,
        }),
    )?;
    crate::counters::fused_node(&out, 1);
    Ok(out)
}

/// The composition (off the CPU, and the test oracle).
pub fn reference(table: &Tensor, ids: &Tensor, positions: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let d = table.dim(1)?;
    let x = table
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, d))?;
    (x * scale)?.broadcast_add(positions)
}

struct Embed {
    positions: Vec<f32>,
    scale: f32,
    shape: (usize, usize, usize),
    vocab: usize,
}

impl Embed {
    fn ids<'a>(&self, s: &'a CpuStorage, l: &candle_core::Layout) -> Result<&'a [u32]> {
        let CpuStorage::U32(v) = s else {
            return Err(dtype_err(
                OP,
                candle_core::backend::BackendStorage::dtype(s),
                "u32 token ids",
            ));
        };
        let (a, z) = l
            .contiguous_offsets()
            .ok_or_else(|| shape_err(OP, "ids must be contiguous".into()))?;
        let ids = &v[a..z];
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab) {
            return Err(shape_err(
                OP,
                format!("token id {bad} outside the vocabulary of {}", self.vocab),
            ));
        }
        Ok(ids)
    }
}

impl Fused2 for Embed {
    const NAME: &'static str = OP;

    fn fwd(&self, (s1, l1): Arg, (s2, l2): Arg) -> Out {
        let (b, t, d) = self.shape;
        let CpuStorage::F32(table) = s1 else {
            return Err(dtype_err(
                OP,
                candle_core::backend::BackendStorage::dtype(s1),
                "an f32 table",
            ));
        };
        let (a, _) = l1
            .contiguous_offsets()
            .ok_or_else(|| shape_err(OP, "the table must be contiguous".into()))?;
        let table = &table[a..];
        let ids = self.ids(s2, l2)?;
        let mut out = vec![0f32; b * t * d];
        out.par_chunks_mut(d.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let src = &table[ids[r] as usize * d..(ids[r] as usize + 1) * d];
                let pos = &self.positions[(r % t) * d..(r % t + 1) * d];
                for ((o, e), p) in row.iter_mut().zip(src).zip(pos) {
                    *o = e * self.scale + p;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, t, d))))
    }

    fn bwd(&self, [table, ids]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        // one scatter-add of the scaled gradient rows into a zeroed table gradient
        crate::counters::device_ops(1);
        let d = self.shape.2;
        let g = grad
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (ids_s, ids_l) = ids.storage_and_layout();
        let Storage::Cpu(ids_c) = &*ids_s else {
            return Err(dtype_err(OP, ids.dtype(), "ids on the CPU"));
        };
        let ids = self.ids(ids_c, ids_l)?;
        let mut dt = vec![0f32; self.vocab * d];
        for (r, &id) in ids.iter().enumerate() {
            let row = &mut dt[id as usize * d..(id as usize + 1) * d];
            for (a, gi) in row.iter_mut().zip(&g[r * d..(r + 1) * d]) {
                *a += gi * self.scale;
            }
        }
        let dt = Tensor::from_vec(dt, table.shape(), table.device())?;
        Ok([Some(dt), None])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, randn};
    use candle_core::{Device, Var};

    #[test]
    fn embed_matches_gather_scale_and_add_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let table = Var::from_tensor(&randn(&[11, 6], 1, 1.0)?)?;
        // repeated ids: their gradients add up in the same table row
        let ids = Tensor::new(&[[3u32, 0, 3, 10], [7, 7, 1, 3]], &dev)?;
        let pos = randn(&[4, 6], 2, 1.0)?;
        let w = randn(&[2, 4, 6], 3, 1.0)?;
        let run = |f: &dyn Fn() -> Result<Tensor>| -> Result<(Tensor, Tensor)> {
            let y = f()?;
            let g = y.mul(&w)?.sum_all()?.backward()?;
            Ok((y, g.get(table.as_tensor()).unwrap().clone()))
        };
        let (yf, gf) = run(&|| embed(table.as_tensor(), &ids, &pos, 2.5))?;
        let (yr, gr) = run(&|| reference(table.as_tensor(), &ids, &pos, 2.5))?;
        assert!(max_abs_diff(&yf, &yr)? < 1e-5);
        assert!(max_abs(&gr)? > 0.1);
        assert!(max_abs_diff(&gf, &gr)? < 1e-5);
        Ok(())
    }

    #[test]
    fn an_id_outside_the_vocabulary_is_an_error_naming_it() {
        let dev = Device::Cpu;
        let table = Tensor::zeros((5, 2), DType::F32, &dev).unwrap();
        let ids = Tensor::new(&[[1u32, 9]], &dev).unwrap();
        let pos = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        let e = embed(&table, &ids, &pos, 1.0).unwrap_err().to_string();
        assert!(e.contains("token id 9"), "{e}");
    }
}
