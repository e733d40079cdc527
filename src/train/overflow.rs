//! Overflow forensics: on a step whose gradients were not finite, which parameter gradients
//! were to blame (how many values, the largest finite magnitude left in each) and, with
//! `amp.trace_overflow`, which forward activation first left the f16 range; on sampled steps,
//! how much of the scaled gradient underflows f16. A clean step pays nothing here: the per-tensor
//! pass runs only after the one global reduction said the step overflowed.

use crate::config::InjectInf;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// f16's smallest subnormal: a scaled gradient value below it in magnitude becomes 0 in f16.
pub const F16_MIN_SUBNORMAL: f64 = 5.960_464_477_539_063e-8;

/// One parameter gradient that held inf/NaN values on an overflowing step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorOverflow {
    pub name: String,
    /// inf/NaN values in the (scaled) gradient.
    pub non_finite: u64,
    pub numel: u64,
    /// Largest finite magnitude of the scaled gradient (None: no finite value at all).
    pub max_finite: Option<f64>,
}

/// What one overflowing step looked like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverflowRecord {
    pub step: u64,
    pub epoch: u64,
    /// The loss scale the step's backward ran at.
    pub loss_scale: f64,
    /// false when the loss itself was inf/NaN (the forward overflowed, not only the backward).
    pub loss_finite: bool,
    /// The non-finite parameter gradients, in parameter order.
    pub tensors: Vec<TensorOverflow>,
    /// With `amp.trace_overflow`: the first forward activation beyond the f16 range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_max: Option<f64>,
}

/// f16 underflow of the scaled gradients on a sampled step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnderflowRecord {
    pub step: u64,
    pub loss_scale: f64,
    /// Gradient values looked at (all parameters).
    pub values: u64,
    /// Share of values that are exactly 0 (f16 matmul gradients that already underflowed show
    /// up here, together with structural zeros such as unused embedding rows).
    pub zero_share: f64,
    /// Share of values that are non-zero but below f16's smallest subnormal: they would flush
    /// to 0 if stored in f16 at this scale.
    pub underflow_share: f64,
}

/// The non-finite gradients among `grads` (named like `names`): one sum-of-squares reduction
/// per tensor; only the tensors it flags are read back to count their values.
pub fn inspect(names: &[&str], grads: &[Tensor]) -> Result<Vec<TensorOverflow>> {
    let mut out = Vec::new();
    for (name, g) in names.iter().zip(grads) {
        let ss = crate::optim::sum_squares(std::slice::from_ref(g))?;
        if ss.is_finite() {
            continue;
        }
        let v = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let non_finite = v.iter().filter(|x| !x.is_finite()).count() as u64;
        let max_finite = v
            .iter()
            .filter(|x| x.is_finite())
            .map(|x| x.abs() as f64)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        out.push(TensorOverflow {
            name: name.to_string(),
            non_finite,
            numel: v.len() as u64,
            max_finite,
        });
    }
    Ok(out)
}

/// Zero and f16-underflow shares of the scaled gradients `grads` (on the device: three
/// reductions per tensor).
pub fn underflow(step: u64, loss_scale: f64, grads: &[Tensor]) -> Result<UnderflowRecord> {
    let (mut n, mut zeros, mut under) = (0u64, 0f64, 0f64);
    for g in grads {
        let a = g.to_dtype(DType::F32)?.abs()?;
        n += a.elem_count() as u64;
        let z = a.eq(0f64)?.to_dtype(DType::F32)?.sum_all()?;
        let below = a.lt(F16_MIN_SUBNORMAL)?.to_dtype(DType::F32)?.sum_all()?;
        let z = z.to_scalar::<f32>()? as f64;
        zeros += z;
        under += below.to_scalar::<f32>()? as f64 - z;
    }
    let share = |x: f64| if n > 0 { x / n as f64 } else { 0.0 };
    Ok(UnderflowRecord {
        step,
        loss_scale,
        values: n,
        zero_share: share(zeros),
        underflow_share: share(under),
    })
}

/// The test-only gradient injection of `amp.test_inject_inf`, with its own count of what it has
/// injected (a rollback replays step numbers; the count does not start over).
#[derive(Debug, Clone)]
pub struct Injector {
    pub spec: InjectInf,
    /// Index of the parameter in the model's parameter list.
    pub index: usize,
    pub done: u64,
}

impl Injector {
    /// None when not configured; an error naming the field when the tensor does not exist.
    pub fn new(
        spec: Option<&InjectInf>,
        names: &[&str],
    ) -> std::result::Result<Option<Self>, crate::config::SpecError> {
        let Some(spec) = spec else { return Ok(None) };
        match names.iter().position(|n| *n == spec.tensor) {
            Some(index) => Ok(Some(Self {
                spec: spec.clone(),
                index,
                done: 0,
            })),
            None => Err(crate::config::SpecError::new(
                "amp.test_inject_inf.tensor",
                format!(
                    "no parameter named `{}`; the first ones are {}",
                    spec.tensor,
                    names.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// Put an inf into the first element of `grads[index]` when this step is due.
    pub fn apply(&mut self, step: u64, grads: &mut [Tensor]) -> Result<bool> {
        if step < self.spec.from_step || self.done >= self.spec.count {
            return Ok(false);
        }
        self.done += 1;
        let g = &grads[self.index];
        let mut bump = vec![0f32; g.elem_count()];
        bump[0] = f32::INFINITY;
        let bump = Tensor::from_vec(bump, g.shape(), g.device())?.to_dtype(g.dtype())?;
        grads[self.index] = (g + bump)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn inspect_names_only_the_non_finite_gradients_with_counts_and_largest_finite_value() {
        let d = Device::Cpu;
        let clean = Tensor::new(&[1f32, -2.0, 3.0], &d).unwrap();
        let bad = Tensor::new(&[f32::INFINITY, -5.0, f32::NAN, 0.5], &d).unwrap();
        let r = inspect(&["a", "b"], &[clean, bad]).unwrap();
        assert_eq!(
            r,
            [TensorOverflow {
                name: "b".into(),
                non_finite: 2,
                numel: 4,
                max_finite: Some(5.0),
            }]
        );
    }

    #[test]
    fn underflow_counts_zeros_and_values_below_the_f16_subnormal_apart() {
        let d = Device::Cpu;
        let g = Tensor::new(&[0f32, 1e-9, -1e-8, 1e-3, 0.0, 2.0, 1e-7, 0.0], &d).unwrap();
        let r = underflow(7, 1024.0, &[g]).unwrap();
        assert_eq!(r.values, 8);
        assert_eq!(r.zero_share, 3.0 / 8.0);
        assert_eq!(r.underflow_share, 2.0 / 8.0);
    }
}

#[cfg(test)]
mod trace_tests {
    use crate::amp::Autocast;
    use crate::config::{Precision, TrainSpec};
    use crate::model::{self, Ctx, Transformer};
    use candle_core::{Device, Tensor};

    #[test]
    fn the_trace_names_the_first_activation_beyond_f16() {
        let spec = TrainSpec::default();
        let mut m = spec.model.clone();
        (m.d_model, m.layers, m.heads, m.d_ff) = (16, 1, 2, 32);
        let cfg = model::Config::from_spec(&m, 20, 20, 16);
        let dev = Device::Cpu;
        let model = Transformer::new(&cfg, 1, &dev).unwrap();
        // blow up the decoder's FFN weights (each still fits f16): its output leaves f16,
        // nothing before it does
        for (n, w) in &model.params {
            if n.starts_with("decoder.layers.0.ffn.linear_") && n.ends_with(".weight") {
                w.set(&(w.as_tensor() * 300.0).unwrap()).unwrap();
            }
        }
        let ac = Autocast::new(Precision::F16);
        let src = Tensor::new(&[[1u32, 5, 6, 2]], &dev).unwrap();
        let tgt = Tensor::new(&[[1u32, 7, 8]], &dev).unwrap();
        let ctx = Ctx::eval(&ac).with_overflow_trace();
        model.forward_t(&ctx, &src, &tgt).unwrap();
        let (name, max) = ctx.first_overflow().expect("an activation overflowed");
        assert_eq!(name, "decoder.layers.0.ffn");
        assert!(max > 65504.0);
        // without the blow-up nothing is named, and without tracing nothing is looked at
        let clean = Transformer::new(&cfg, 1, &dev).unwrap();
        let ctx = Ctx::eval(&ac).with_overflow_trace();
        clean.forward_t(&ctx, &src, &tgt).unwrap();
        assert_eq!(ctx.first_overflow(), None);
        let ctx = Ctx::eval(&ac);
        model.forward_t(&ctx, &src, &tgt).unwrap();
        assert_eq!(ctx.first_overflow(), None);
    }
}
