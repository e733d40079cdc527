//! Adam / AdamW over f32 master weights with f32 moments, PyTorch's update formulas, learning
//! rate schedules, global-norm clipping, and state that saves and loads (candle's AdamW cannot).

use crate::config::{OptimizerKind, Schedule, TrainSection};
use candle_core::{DType, Result, Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (decoupled weight decay) instead of Adam's L2 term.
    pub decoupled: bool,
}

impl AdamConfig {
    pub fn from_spec(t: &TrainSection) -> Self {
        Self {
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            decoupled: t.optimizer == OptimizerKind::Adamw,
        }
    }
}

/// Learning rate at a 1-based optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub base_lr: f64,
    pub warmup: usize,
}

impl LrSchedule {
    pub fn from_spec(t: &TrainSection) -> Self {
        Self {
            kind: t.schedule,
            base_lr: t.lr,
            warmup: t.warmup_steps,
        }
    }

    /// `constant`: base_lr. `noam`: linear warmup to base_lr over `warmup` steps, then
    /// base_lr * sqrt(warmup / step) (the inverse-sqrt decay of "Attention is all you need",
    /// normalised so the peak is base_lr). `linear`: warmup as noam's (none at 0), times
    /// `1 - progress`, where `progress` is the share of the run's budget used before this step
    /// (0 at the start, 1 when it runs out; the other schedules ignore it).
    pub fn lr(&self, step: u64, progress: f64) -> f64 {
        let s = step.max(1) as f64;
        match self.kind {
            Schedule::Constant => self.base_lr,
            Schedule::Noam => {
                let w = self.warmup.max(1) as f64;
                self.base_lr * (s / w).min((w / s).sqrt())
            }
            Schedule::Linear => {
                let warm = if self.warmup == 0 {
                    1.0
                } else {
                    (s / self.warmup as f64).min(1.0)
                };
                self.base_lr * warm * (1.0 - progress).clamp(0.0, 1.0)
            }
        }
    }
}

pub struct Adam {
    pub cfg: AdamConfig,
    /// Steps actually applied (skipped steps do not count, as in PyTorch).
    pub t: u64,
    params: Vec<(String, Var)>,
    m: Vec<Var>,
    v: Vec<Var>,
    /// The device buffers of the fused CUDA step (made on its first use).
    #[cfg(feature = "cuda")]
    fused: Option<crate::kernels::cuda::FusedAdam>,
}

/// What a step done entirely on the device reports (its one host read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceStep {
    pub loss: f64,
    /// Sum of squares of the still-scaled gradients.
    pub sum_squares: f64,
    /// The update was skipped on the device (inf/NaN gradients or loss).
    pub found_inf: bool,
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for (_, p) in &params {
            m.push(Var::zeros(p.shape(), DType::F32, p.device())?);
            v.push(Var::zeros(p.shape(), DType::F32, p.device())?);
        }
        Ok(Self {
            cfg,
            t: 0,
            params,
            m,
            v,
            #[cfg(feature = "cuda")]
            fused: None,
        })
    }

    fn hp(&self, lr: f64) -> crate::kernels::AdamHp {
        let c = &self.cfg;
        crate::kernels::AdamHp {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            decoupled: c.decoupled,
        }
    }

    /// The whole optimizer step on a CUDA device, in two launches and one host read: the global
    /// sum of squares + found_inf (from the gradients and `loss`) + clip factor on the device,
    /// then one multi-tensor Adam launch over all parameters that multiplies the gradients by
    /// `inv_scale * clip_coef(norm, max_norm)` and skips the update on the device when the step
    /// overflowed. `t` advances only when the update was applied. `Ok(None)` off CUDA, without
    /// the `cuda` feature, or with `AMPSERVE_REFERENCE_OPS=1`: the caller then takes the host
    /// path ([`sum_squares`], the host's overflow decision, [`Adam::step`]), which is also this
    /// step's CPU twin (there the skip is decided on the host).
    pub fn fused_step(
        &mut self,
        grads: &[Tensor],
        loss: &Tensor,
        lr: f64,
        inv_scale: f64,
        max_norm: f64,
    ) -> Result<Option<DeviceStep>> {
        #[cfg(feature = "cuda")]
        {
            let Some((_, p0)) = self.params.first() else {
                return Ok(None);
            };
            if !p0.device().is_cuda() || crate::ops::use_reference() {
                return Ok(None);
            }
            if self.fused.is_none() {
                self.fused = crate::kernels::cuda::FusedAdam::new(p0.device())?;
            }
            let hp = self.hp(lr);
            let t = self.t + 1;
            let params: Vec<&Var> = self.params.iter().map(|(_, p)| p).collect();
            let Some(fused) = self.fused.as_mut() else {
                return Ok(None);
            };
            let o = fused.step(
                &params, grads, &self.m, &self.v, loss, &hp, t, inv_scale, max_norm,
            )?;
            if !o.found_inf {
                self.t = t;
            }
            Ok(Some(DeviceStep {
                loss: o.loss,
                sum_squares: o.sum_squares,
                found_inf: o.found_inf,
            }))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (grads, loss, lr, inv_scale, max_norm);
            Ok(None)
        }
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update. `grads[i]` is the gradient of `params[i]` (any float dtype; cast to f32),
    /// multiplied by `grad_scale` first (unscale and clipping coefficient fused in).
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let hp = self.hp(lr);
        let t = self.t;
        let update = |i: usize| {
            crate::kernels::adam_update(
                &self.params[i].1,
                &grads[i],
                &self.m[i],
                &self.v[i],
                &hp,
                t,
                grad_scale,
            )
        };
        if self.params.iter().all(|(_, p)| p.device().is_cpu()) {
            // The CPU twin of the multi-tensor CUDA kernel, counted as its one launch: the tensors
            // one after another, each update a parallel pass of its own (each converts its
            // gradient to f32 as it goes). Not a parallel iterator over the tensors: rayon nested
            // in rayon halved the tiny step's speed (1,980 -> 970 tok/s, measured).
            crate::counters::device_ops(1);
            return (0..self.params.len()).try_for_each(update);
        }
        for (i, g) in grads.iter().enumerate().take(self.params.len()) {
            // off the CPU (the reference ops): one update per tensor, after a cast of a
            // non-f32 gradient
            crate::counters::device_ops(1 + u64::from(g.dtype() != DType::F32));
            update(i)?;
        }
        Ok(())
    }

    /// Moments by name: `adam.m.<param>`, `adam.v.<param>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (n, _)) in self.params.iter().enumerate() {
            out.push((format!("adam.m.{n}"), self.m[i].as_tensor().clone()));
            out.push((format!("adam.v.{n}"), self.v[i].as_tensor().clone()));
        }
        out
    }

    pub fn load_state(&mut self, t: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (n, p)) in self.params.iter().enumerate() {
            for (kind, var) in [("m", &self.m[i]), ("v", &self.v[i])] {
                let key = format!("adam.{kind}.{n}");
                let src = tensors
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks `{key}`")))?;
                if src.dims() != p.dims() {
                    candle_core::bail!(
                        "`{key}` has shape {:?}, expected {:?}",
                        src.dims(),
                        p.dims()
                    );
                }
                var.set(&src.to_dtype(DType::F32)?.to_device(p.device())?)?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Sum of squares of all gradients (any float dtype in, f64 out). On the CPU one parallel pass
/// over all tensors (counted as one launch, the twin of the fused CUDA reduction) whose result is
/// already in host memory: no read-back, no sync. Elsewhere one reduction per tensor and one host
/// sync to read the total.
pub fn sum_squares(grads: &[Tensor]) -> Result<f64> {
    let refs: Vec<&Tensor> = grads.iter().collect();
    let on_cpu = grads.iter().all(|g| g.device().is_cpu());
    crate::counters::device_ops(if on_cpu { 1 } else { grads.len() as u64 });
    if !on_cpu {
        crate::counters::host_sync();
    }
    crate::kernels::sum_squares(&refs)
}

/// Clipping coefficient for global-norm clipping (PyTorch's clip_grad_norm_: max_norm / (norm + 1e-6),
/// capped at 1). 1.0 when clipping is off.
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 || !norm.is_finite() {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg() -> AdamConfig {
        AdamConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }

    #[test]
    fn one_adam_step_matches_hand_computed_values() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::from_vec(vec![1.0f32, -2.0, 0.5], 3, &dev)?;
        let mut opt = Adam::new(vec![("w".into(), p.clone())], cfg())?;
        // grads scaled by 4 and unscaled by grad_scale 0.25
        let g = Tensor::new(&[0.4f32, -0.8, 2.0], &dev)?;
        opt.step(&[g], 0.1, 0.25)?;
        // step 1: m = 0.1 g, v = 0.001 g^2; mhat = g, vhat = g^2 -> update = lr * g / (|g| + eps)
        let got: Vec<f32> = p.as_tensor().to_vec1()?;
        let gs = [0.1f64, -0.2, 0.5];
        let p0 = [1.0f64, -2.0, 0.5];
        for i in 0..3 {
            let m = 0.1 * gs[i];
            let v = 0.001 * gs[i] * gs[i];
            let denom = v.sqrt() / (1.0f64 - 0.999).sqrt() + 1e-8;
            let want = p0[i] - 0.1 / (1.0 - 0.9) * m / denom;
            assert!(
                (got[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                got[i]
            );
        }
        // second step with a different gradient, by hand
        let g2 = [0.3f64, 0.1, -0.2];
        opt.step(&[Tensor::new(&[0.3f32, 0.1, -0.2], &dev)?], 0.1, 1.0)?;
        let got2: Vec<f32> = p.as_tensor().to_vec1()?;
        for i in 0..3 {
            let m1 = 0.1 * gs[i];
            let v1 = 0.001 * gs[i] * gs[i];
            let m2 = 0.9 * m1 + 0.1 * g2[i];
            let v2 = 0.999 * v1 + 0.001 * g2[i] * g2[i];
            let bc1 = 1.0 - 0.9f64.powi(2);
            let bc2 = 1.0 - 0.999f64.powi(2);
            let denom = v2.sqrt() / bc2.sqrt() + 1e-8;
            let want = got[i] as f64 - 0.1 / bc1 * m2 / denom;
            assert!(
                (got2[i] as f64 - want).abs() < 1e-5,
                "{i}: {} vs {want}",
                got2[i]
            );
        }
        Ok(())
    }

    #[test]
    fn adamw_decays_decoupled_and_adam_adds_l2() -> Result<()> {
        let dev = Device::Cpu;
        let zero = Tensor::zeros(1, DType::F32, &dev)?;
        let p = Var::from_vec(vec![2.0f32], 1, &dev)?;
        let mut w = Adam::new(
            vec![("p".into(), p.clone())],
            AdamConfig {
                weight_decay: 0.5,
                decoupled: true,
                ..cfg()
            },
        )?;
        w.step(std::slice::from_ref(&zero), 0.1, 1.0)?;
        // zero grad: only the decay acts: 2 * (1 - 0.1*0.5)
        assert!((p.as_tensor().to_vec1::<f32>()?[0] - 1.9).abs() < 1e-6);
        let q = Var::from_vec(vec![2.0f32], 1, &dev)?;
        let mut a = Adam::new(
            vec![("q".into(), q.clone())],
            AdamConfig {
                weight_decay: 0.5,
                ..cfg()
            },
        )?;
        a.step(&[zero], 0.1, 1.0)?;
        // L2: g = 1.0 -> first Adam step moves by ~lr
        assert!((q.as_tensor().to_vec1::<f32>()?[0] - 1.9).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn state_save_load_resumes_identically() -> Result<()> {
        let dev = Device::Cpu;
        let mk = || Var::from_vec(vec![0.5f32, -0.5, 1.5, 0.0], (2, 2), &dev);
        let (pa, pb) = (mk()?, mk()?);
        let mut a = Adam::new(vec![("x".into(), pa.clone())], cfg())?;
        let grads: Vec<Tensor> = (0..5)
            .map(|k| Tensor::new(&[[0.1f32 * k as f32, -0.3], [0.2, 0.05 * k as f32]], &dev))
            .collect::<Result<_>>()?;
        a.step(&[grads[0].clone()], 0.01, 1.0)?;
        a.step(&[grads[1].clone()], 0.01, 1.0)?;
        // b: same params, state loaded from a
        pb.set(pa.as_tensor())?;
        let mut b = Adam::new(vec![("x".into(), pb.clone())], cfg())?;
        let st: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
        b.load_state(a.t, &st)?;
        for g in &grads[2..] {
            a.step(std::slice::from_ref(g), 0.01, 1.0)?;
            b.step(std::slice::from_ref(g), 0.01, 1.0)?;
        }
        let (x, y): (Vec<f32>, Vec<f32>) = (
            pa.as_tensor().flatten_all()?.to_vec1()?,
            pb.as_tensor().flatten_all()?.to_vec1()?,
        );
        assert_eq!(x, y);
        Ok(())
    }

    #[test]
    fn schedules_and_clipping() {
        let c = LrSchedule {
            kind: Schedule::Constant,
            base_lr: 1e-4,
            warmup: 10,
        };
        assert_eq!(c.lr(1, 0.9), 1e-4);
        let n = LrSchedule {
            kind: Schedule::Noam,
            base_lr: 1e-3,
            warmup: 100,
        };
        assert!((n.lr(50, 0.0) - 5e-4).abs() < 1e-12);
        assert!((n.lr(100, 0.0) - 1e-3).abs() < 1e-12);
        assert!((n.lr(400, 0.5) - 5e-4).abs() < 1e-12);
        // linear: warm-up, then down to zero with the budget's share used, whatever the step
        let l = LrSchedule {
            kind: Schedule::Linear,
            base_lr: 1e-3,
            warmup: 100,
        };
        assert!((l.lr(50, 0.0) - 5e-4).abs() < 1e-12);
        assert!((l.lr(100, 0.0) - 1e-3).abs() < 1e-12);
        assert!((l.lr(5000, 0.25) - 7.5e-4).abs() < 1e-12);
        assert!((l.lr(50, 0.5) - 2.5e-4).abs() < 1e-12);
        assert_eq!(l.lr(9000, 1.0), 0.0);
        assert_eq!(l.lr(9000, 1.2), 0.0);
        let l0 = LrSchedule { warmup: 0, ..l };
        assert_eq!(l0.lr(1, 0.0), 1e-3);
        assert_eq!(clip_coef(10.0, 0.0), 1.0);
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
        assert!((clip_coef(4.0, 1.0) - 0.25).abs() < 1e-6);
    }
}
