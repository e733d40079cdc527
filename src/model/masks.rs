//! Sinusoidal positions and the additive f32 attention masks (PAD keys, causal).

use super::MASK_FILL;
use crate::data::PAD_ID;
use candle_core::{DType, Device, Result, Tensor};

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
    let pad = src.eq(PAD_ID)?.to_dtype(DType::F32)?;
    (pad * MASK_FILL as f64)?.reshape((b, 1, 1, s))
}

/// Additive f32 decoder self-attention mask (b, 1, t, t): causal and no PAD keys.
pub fn tgt_mask(tgt: &Tensor) -> Result<Tensor> {
    let (b, t) = tgt.dims2()?;
    let causal: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { MASK_FILL } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), tgt.device())?;
    let pad = (tgt.eq(PAD_ID)?.to_dtype(DType::F32)? * MASK_FILL as f64)?.reshape((b, 1, 1, t))?;
    // MASK_FILL + MASK_FILL stays finite in f32 and is still "masked".
    causal.broadcast_add(&pad)
}
