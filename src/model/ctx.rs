//! Per-forward state: autocast, train/eval, the dropout RNG (and its GPU seeding), and the
//! optional f16 overflow trace of the activations.

use crate::amp::Autocast;
use crate::ops;
use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::cell::RefCell;

/// Per-forward state: autocast, train/eval, and the dropout RNG.
pub struct Ctx<'a> {
    pub ac: &'a Autocast,
    pub train: bool,
    pub dropout: f64,
    pub(super) rng: RefCell<StdRng>,
    /// Whether a GPU's generator was seeded from `rng` in this forward pass (once per pass).
    pub(super) device_seeded: std::cell::Cell<bool>,
    /// `amp.trace_overflow`: Some once tracing is on; holds the first activation (name, largest
    /// magnitude) that left the f16 range in this forward pass.
    pub(super) trace: Option<RefCell<Option<(String, f64)>>>,
}

impl<'a> Ctx<'a> {
    pub fn new(ac: &'a Autocast, train: bool, dropout: f64, rng: StdRng) -> Self {
        Self {
            ac,
            train,
            dropout,
            rng: RefCell::new(rng),
            device_seeded: std::cell::Cell::new(false),
            trace: None,
        }
    }

    /// Watch the forward activations for the first one beyond the f16 range (see
    /// [`Self::first_overflow`]).
    pub fn with_overflow_trace(mut self) -> Self {
        self.trace = Some(RefCell::new(None));
        self
    }

    /// The first watched activation (in forward order) whose largest magnitude exceeded f16's
    /// 65504 or was not finite, with that magnitude (inf/NaN as infinity).
    pub fn first_overflow(&self) -> Option<(String, f64)> {
        self.trace.as_ref().and_then(|t| t.borrow().clone())
    }

    /// Two reductions (max and sum) on `x` while tracing and nothing has overflowed yet; a no-op otherwise.
    pub(super) fn watch(&self, name: impl FnOnce() -> String, x: &Tensor) -> Result<()> {
        let Some(t) = &self.trace else {
            return Ok(());
        };
        if t.borrow().is_some() {
            return Ok(());
        }
        // max ignores NaN, so the sum says whether anything was not finite
        let a = x.abs()?.to_dtype(candle_core::DType::F32)?.flatten_all()?;
        let m = a.max(0)?.to_scalar::<f32>()? as f64;
        let sum = a.sum_all()?.to_scalar::<f32>()? as f64;
        if !sum.is_finite() || m > 65504.0 {
            let m = if sum.is_finite() { m } else { f64::INFINITY };
            *t.borrow_mut() = Some((name(), m));
        }
        Ok(())
    }

    pub fn eval(ac: &'a Autocast) -> Self {
        Self::new(ac, false, 0.0, StdRng::seed_from_u64(0))
    }

    /// A dropout mask for `n` elements, or `None` outside training or with p = 0.
    pub(super) fn mask(&self, n: usize) -> Option<ops::DropMask> {
        (self.train && self.dropout > 0.0)
            .then(|| ops::DropMask::sample(n, self.dropout, &mut self.rng.borrow_mut()))
    }

    pub(super) fn drop(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            // on a GPU the mask is drawn on the device (seeded once per forward pass)
            if !(self.train && self.dropout > 0.0) {
                return Ok(x.clone());
            }
            let mut rng = self.rng.borrow_mut();
            if !self.device_seeded.get() {
                ops::seed_device(x.device(), &mut rng)?;
                self.device_seeded.set(true);
            }
            return ops::dropout(x, self.dropout, &mut rng);
        }
        match self.mask(x.elem_count()) {
            Some(m) => ops::dropout_with(x, &m),
            None => Ok(x.clone()),
        }
    }
}
