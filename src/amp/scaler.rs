//! Dynamic loss scaling with PyTorch's `GradScaler` semantics and defaults, plus what PyTorch
//! lacks: a minimum scale with a clear failure, optional hysteresis, and a per-step record.

use crate::config::AmpSpec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerConfig {
    pub enabled: bool,
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    pub min_scale: f64,
    pub max_consecutive_skips: u64,
    pub hysteresis: u64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self::from_spec(&AmpSpec::default(), true)
    }
}

impl ScalerConfig {
    pub fn from_spec(a: &AmpSpec, enabled: bool) -> Self {
        Self {
            enabled,
            init_scale: a.init_scale,
            growth_factor: a.growth_factor,
            backoff_factor: a.backoff_factor,
            growth_interval: a.growth_interval,
            min_scale: a.min_scale,
            max_consecutive_skips: a.max_consecutive_skips,
            hysteresis: a.hysteresis.max(1),
        }
    }
}

/// Everything needed to continue scaling exactly where a run stopped (saved in checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    pub growth_tracker: u64,
    pub hysteresis_tracker: u64,
    pub skipped_total: u64,
    /// Consecutive overflowing steps at `min_scale` (any non-finite step when disabled).
    pub consecutive_skips: u64,
    pub steps: u64,
}

/// The scaler gave up: `steps` overflowing steps in a row with nothing left to back off to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScalerError {
    /// The scale sat at `amp.min_scale` and the gradients kept overflowing.
    #[error(
        "training diverged: the loss scale reached amp.min_scale ({min_scale}) and gradients \
         still overflowed for {steps} consecutive steps. Try a lower train.lr, gradient clipping \
         (train.clip_grad_norm = 1.0), precision \"bf16\" or \"fp32\", or a lower amp.min_scale"
    )]
    AtMinScale { min_scale: f64, steps: u64 },
    /// Loss scaling is off and the gradients kept being non-finite.
    #[error(
        "training diverged: gradients were not finite (loss scaling is disabled) for {steps} \
         consecutive steps. Try a lower train.lr, gradient clipping (train.clip_grad_norm = 1.0), \
         precision \"bf16\" or \"fp32\", or a lower amp.min_scale"
    )]
    NotFinite { steps: u64 },
}

/// What `update` decided for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The scale that was used for this step's backward.
    pub scale_used: f64,
    pub found_inf: bool,
    /// The optimizer step was skipped (found_inf).
    pub skipped: bool,
    /// The scale for the next step.
    pub next_scale: f64,
}

/// Dynamic loss scaler. Per step: `scale()` multiplies the loss, backward, then
/// `inv_scale()` unscales the gradients (fused into the global-norm pass / optimizer),
/// `found_inf` is the one host-side check, and `update(found_inf)` decides skip/grow/backoff.
///
/// When disabled (fp32, bf16 by default) the scale is 1 and never changes, but a step whose
/// gradients are not finite is still skipped (and counted), so one bad batch cannot poison the
/// master weights.
#[derive(Debug, Clone)]
pub struct GradScaler {
    cfg: ScalerConfig,
    st: ScalerState,
}

impl GradScaler {
    pub fn new(cfg: ScalerConfig) -> Self {
        let scale = if cfg.enabled { cfg.init_scale } else { 1.0 };
        let st = ScalerState {
            scale,
            growth_tracker: 0,
            hysteresis_tracker: cfg.hysteresis,
            skipped_total: 0,
            consecutive_skips: 0,
            steps: 0,
        };
        Self { cfg, st }
    }

    pub fn is_enabled(&self) -> bool {
        self.cfg.enabled
    }

    pub fn config(&self) -> &ScalerConfig {
        &self.cfg
    }

    /// Current loss scale (1.0 when disabled).
    pub fn scale(&self) -> f64 {
        self.st.scale
    }

    /// Factor that unscales gradients of a scaled loss.
    pub fn inv_scale(&self) -> f64 {
        1.0 / self.st.scale
    }

    /// `loss * scale` (a no-op when disabled).
    pub fn scale_loss(
        &self,
        loss: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        if self.cfg.enabled {
            let t = loss.affine(self.st.scale, 0.0)?;
            crate::counters::candle_node(loss, &t, crate::counters::NodeCost::AFFINE);
            Ok(t)
        } else {
            Ok(loss.clone())
        }
    }

    /// Overflow test on the sum of squares of the (scaled) gradients: one number per step.
    pub fn found_inf(sum_squares: f64) -> bool {
        !sum_squares.is_finite()
    }

    pub fn skipped_total(&self) -> u64 {
        self.st.skipped_total
    }

    /// Record the step's outcome and move the scale: PyTorch's `_amp_update_scale_`
    /// (backoff on inf and reset the growth counter; grow after exactly `growth_interval` clean
    /// steps), with hysteresis (back off only after `hysteresis` overflows since the last
    /// growth) and a floor at `min_scale`. Errors when the run keeps overflowing at the floor.
    pub fn update(&mut self, found_inf: bool) -> Result<StepOutcome, ScalerError> {
        let used = self.st.scale;
        self.st.steps += 1;
        if found_inf {
            self.st.skipped_total += 1;
            let at_floor = !self.cfg.enabled || used <= self.cfg.min_scale;
            if at_floor {
                self.st.consecutive_skips += 1;
            } else {
                self.st.consecutive_skips = 0;
            }
            if self.cfg.enabled {
                self.st.growth_tracker = 0;
                self.st.hysteresis_tracker = self.st.hysteresis_tracker.saturating_sub(1);
                if self.st.hysteresis_tracker == 0 {
                    self.st.scale =
                        (self.st.scale * self.cfg.backoff_factor).max(self.cfg.min_scale);
                    self.st.hysteresis_tracker = self.cfg.hysteresis;
                }
            }
            if at_floor && self.st.consecutive_skips >= self.cfg.max_consecutive_skips {
                let steps = self.st.consecutive_skips;
                return Err(if self.cfg.enabled {
                    ScalerError::AtMinScale {
                        min_scale: self.cfg.min_scale,
                        steps,
                    }
                } else {
                    ScalerError::NotFinite { steps }
                });
            }
        } else {
            self.st.consecutive_skips = 0;
            if self.cfg.enabled {
                self.st.growth_tracker += 1;
                if self.st.growth_tracker >= self.cfg.growth_interval {
                    let grown = self.st.scale * self.cfg.growth_factor;
                    if grown.is_finite() {
                        self.st.scale = grown;
                    }
                    self.st.growth_tracker = 0;
                    self.st.hysteresis_tracker = self.cfg.hysteresis;
                }
            }
        }
        Ok(StepOutcome {
            scale_used: used,
            found_inf,
            skipped: found_inf,
            next_scale: self.st.scale,
        })
    }

    pub fn state(&self) -> ScalerState {
        self.st.clone()
    }

    pub fn load_state(&mut self, st: ScalerState) {
        self.st = st;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(interval: u64) -> ScalerConfig {
        ScalerConfig {
            growth_interval: interval,
            ..ScalerConfig::default()
        }
    }

    #[test]
    fn pytorch_defaults() {
        let c = ScalerConfig::default();
        assert_eq!(c.init_scale, 65536.0);
        assert_eq!(c.growth_factor, 2.0);
        assert_eq!(c.backoff_factor, 0.5);
        assert_eq!(c.growth_interval, 2000);
        assert!(c.enabled);
        assert_eq!(GradScaler::new(c).scale(), 65536.0);
    }

    #[test]
    fn backoff_on_inf_and_growth_after_exactly_interval_clean_steps() {
        let mut s = GradScaler::new(cfg(3));
        let o = s.update(true).unwrap();
        assert!(o.skipped && o.found_inf);
        assert_eq!(o.scale_used, 65536.0);
        assert_eq!(s.scale(), 32768.0);
        // two clean steps: no growth yet
        s.update(false).unwrap();
        s.update(false).unwrap();
        assert_eq!(s.scale(), 32768.0);
        // the third clean step grows
        let o = s.update(false).unwrap();
        assert!(!o.skipped);
        assert_eq!(o.next_scale, 65536.0);
        // counter reset by an overflow in the middle of a clean run
        s.update(false).unwrap();
        s.update(false).unwrap();
        s.update(true).unwrap();
        assert_eq!(s.scale(), 32768.0);
        s.update(false).unwrap();
        s.update(false).unwrap();
        assert_eq!(
            s.scale(),
            32768.0,
            "growth counter must restart after an overflow"
        );
        s.update(false).unwrap();
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.skipped_total(), 2);
    }

    #[test]
    fn min_scale_floor_then_failure_with_advice() {
        let mut s = GradScaler::new(ScalerConfig {
            init_scale: 4.0,
            min_scale: 1.0,
            max_consecutive_skips: 3,
            ..ScalerConfig::default()
        });
        s.update(true).unwrap(); // 4 -> 2
        s.update(true).unwrap(); // 2 -> 1
        assert_eq!(s.scale(), 1.0);
        s.update(true).unwrap(); // 1st overflow at the floor
        s.update(true).unwrap(); // 2nd
        assert_eq!(s.scale(), 1.0, "never below min_scale");
        let err = s.update(true).unwrap_err();
        assert_eq!(
            err,
            ScalerError::AtMinScale {
                min_scale: 1.0,
                steps: 3
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("min_scale") && msg.contains("clip_grad_norm"),
            "{msg}"
        );
    }

    #[test]
    fn hysteresis_delays_backoff() {
        let mut s = GradScaler::new(ScalerConfig {
            hysteresis: 2,
            ..cfg(2000)
        });
        s.update(true).unwrap();
        assert_eq!(s.scale(), 65536.0, "first overflow tolerated");
        s.update(true).unwrap();
        assert_eq!(s.scale(), 32768.0);
    }

    #[test]
    fn disabled_keeps_scale_one_but_skips_non_finite() {
        let mut s = GradScaler::new(ScalerConfig {
            enabled: false,
            max_consecutive_skips: 2,
            ..ScalerConfig::default()
        });
        assert_eq!(s.scale(), 1.0);
        for _ in 0..2500 {
            s.update(false).unwrap();
        }
        assert_eq!(s.scale(), 1.0);
        assert!(s.update(true).unwrap().skipped);
        assert!(s.update(true).is_err());
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let mut a = GradScaler::new(cfg(4));
        for f in [false, true, false, false] {
            a.update(f).unwrap();
        }
        let json = serde_json::to_string(&a.state()).unwrap();
        let mut b = GradScaler::new(cfg(4));
        b.load_state(serde_json::from_str(&json).unwrap());
        for f in [false, false, true, false, false, false, false] {
            assert_eq!(a.update(f).unwrap(), b.update(f).unwrap());
        }
        assert_eq!(a.state(), b.state());
    }

    #[test]
    fn growth_never_makes_scale_infinite() {
        let mut s = GradScaler::new(ScalerConfig {
            init_scale: f64::MAX / 1.5,
            growth_interval: 1,
            ..ScalerConfig::default()
        });
        s.update(false).unwrap();
        assert!(s.scale().is_finite());
    }
}
