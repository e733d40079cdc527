//! Sinusoidal positions and the additive f32 attention masks (PAD keys, causal).

use super::MASK_FILL;
use crate::data::PAD_ID;
use candle_core::{DType, Device, DeviceLocation, Result, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

pub(super) fn sinusoidal(n: usize, d: usize, device: &Device) -> Result<Tensor> {
    let mut data = vec![0f32; n * d];
    for pos in 0..n {
        for i in (0..d).step_by(2) {
            let div = (-(i as f64) * (10000f64.ln() / d as f64)).exp();
            data[pos * d + i] = (pos as f64 * div).sin() as f32;
            if i + 1 < d {
                data[pos * d + i + 1] = (pos as f64 * div).cos() as f32;
            }
        }
    }
    Tensor::from_vec(data, (n, d), device)
}

/// Additive f32 source mask (b, 1, 1, s): 0 for tokens, MASK_FILL for PAD.
pub fn src_mask(src: &Tensor) -> Result<Tensor> {
    let (b, s) = src.dims2()?;
    // eq, cast, scale (the reshape is a view)
    crate::counters::device_ops(3);
    let pad = src.eq(PAD_ID)?.to_dtype(DType::F32)?;
    (pad * MASK_FILL as f64)?.reshape((b, 1, 1, s))
}

/// Additive f32 decoder self-attention mask (b, 1, t, t): causal and no PAD keys.
pub fn tgt_mask(tgt: &Tensor) -> Result<Tensor> {
    let (b, t) = tgt.dims2()?;
    let causal = causal(t, tgt.device())?;
    // eq, cast, scale, broadcast add (the reshape is a view)
    crate::counters::device_ops(4);
    let pad = (tgt.eq(PAD_ID)?.to_dtype(DType::F32)? * MASK_FILL as f64)?.reshape((b, 1, 1, t))?;
    // MASK_FILL + MASK_FILL stays finite in f32 and is still "masked".
    causal.broadcast_add(&pad)
}

thread_local! {
    /// The causal masks this thread has made, per device and length. Per thread, because a CUDA
    /// tensor belongs to the stream of the thread that made it (candle gives each thread its
    /// own): a mask is only ever used by the thread, and so on the stream, that uploaded it.
    static CAUSAL: RefCell<HashMap<(DeviceLocation, usize), Tensor>> = RefCell::new(HashMap::new());
}

/// The additive causal mask (1, 1, t, t): 0 on and below the diagonal, MASK_FILL above. Made
/// (and, on a GPU, uploaded) once per device and length, then shared: a training step uploads
/// nothing for it.
pub(super) fn causal(t: usize, device: &Device) -> Result<Tensor> {
    let key = (device.location(), t);
    if let Some(m) = CAUSAL.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(m);
    }
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { MASK_FILL } else { 0.0 }))
        .collect();
    crate::counters::h2d_bytes((v.len() * 4) as u64);
    let m = Tensor::from_vec(v, (1, 1, t, t), device)?;
    CAUSAL.with(|c| c.borrow_mut().insert(key, m.clone()));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_causal_mask_is_made_once_per_length_and_masks_the_future() -> Result<()> {
        let dev = Device::Cpu;
        let a = causal(5, &dev)?;
        let b = causal(5, &dev)?;
        // the same storage, not a copy
        assert_eq!(a.id(), b.id());
        assert_ne!(causal(6, &dev)?.id(), a.id());
        let v: Vec<Vec<f32>> = a.squeeze(0)?.squeeze(0)?.to_vec2()?;
        for (i, row) in v.iter().enumerate() {
            for (j, &m) in row.iter().enumerate() {
                assert_eq!(m, if j > i { MASK_FILL } else { 0.0 }, "({i}, {j})");
            }
        }
        Ok(())
    }
}
