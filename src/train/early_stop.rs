//! Early stopping, apart from the loop so its rule is unit-tested: a run that has stopped
//! improving on validation wastes the rest of its budget (and, with checkpoint averaging,
//! dilutes the good checkpoints with worse ones).

use crate::config::{EarlyStopping, StopMetric};

/// Counts validations in a row that do not strictly improve on the best so far.
#[derive(Debug, Clone)]
pub struct EarlyStop {
    cfg: EarlyStopping,
    best: Option<f64>,
    bad: usize,
}

impl EarlyStop {
    pub fn new(cfg: EarlyStopping) -> Self {
        Self {
            cfg,
            best: None,
            bad: 0,
        }
    }

    /// Record one validation; true when the run should stop now.
    pub fn observe(&mut self, bleu: f64, val_loss: f64) -> bool {
        let (v, better) = match self.cfg.metric {
            StopMetric::Bleu => (bleu, self.best.is_none_or(|b| bleu > b)),
            StopMetric::ValidLoss => (val_loss, self.best.is_none_or(|b| val_loss < b)),
        };
        if better && v.is_finite() {
            self.best = Some(v);
            self.bad = 0;
        } else {
            self.bad += 1;
        }
        self.bad >= self.cfg.patience
    }

    /// Non-improving validations since the best.
    pub fn bad_validations(&self) -> usize {
        self.bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn es(metric: StopMetric, patience: usize) -> EarlyStop {
        EarlyStop::new(EarlyStopping { metric, patience })
    }

    #[test]
    fn bleu_stops_after_patience_validations_without_a_new_best() {
        let mut e = es(StopMetric::Bleu, 2);
        assert!(!e.observe(10.0, 3.0));
        assert!(!e.observe(12.0, 3.0));
        assert!(!e.observe(12.0, 2.0)); // equal is not better
        assert!(!e.observe(13.0, 2.0)); // new best resets the count
        assert!(!e.observe(11.0, 2.0));
        assert!(e.observe(12.5, 2.0));
        assert_eq!(e.bad_validations(), 2);
    }

    #[test]
    fn valid_loss_wants_lower_values() {
        let mut e = es(StopMetric::ValidLoss, 1);
        assert!(!e.observe(0.0, 3.0));
        assert!(!e.observe(0.0, 2.5));
        assert!(e.observe(50.0, 2.6));
        // a NaN loss is never an improvement
        let mut e = es(StopMetric::ValidLoss, 1);
        assert!(e.observe(0.0, f64::NAN));
    }
}
