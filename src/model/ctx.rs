//! Per-forward state: autocast, train/eval, the dropout seeds, and the optional f16 overflow
//! trace of the activations.

use crate::amp::Autocast;
use crate::ops;
use candle_core::{Result, Tensor};
use std::cell::{Cell, RefCell};

/// Per-forward state: autocast, train/eval, and the dropout seeds.
///
/// Dropout masks are counter-based ([`ops::DropMask`]): the `k`-th dropout site of a forward
/// pass (in forward order) gets the seed `ops::site_seed(step_seed, k)`, and the mask of each
/// element is a hash of that seed and its index. Nothing is drawn on the host or uploaded, the
/// CPU and CUDA kernels compute the same masks, and a resumed run replays the masks of the
/// uninterrupted one (the step seed is a function of the run seed and the step alone).
pub struct Ctx<'a> {
    pub ac: &'a Autocast,
    pub train: bool,
    pub dropout: f64,
    /// `ops::step_seed(run_seed, step)`.
    pub(super) seed: u64,
    /// The next dropout site's number in this forward pass.
    pub(super) site: Cell<u64>,
    /// `amp.trace_overflow`: Some once tracing is on; holds the first activation (name, largest
    /// magnitude) that left the f16 range in this forward pass.
    pub(super) trace: Option<RefCell<Option<(String, f64)>>>,
}

impl<'a> Ctx<'a> {
    /// `seed`: the step's seed, `ops::step_seed(run_seed, step)`.
    pub fn new(ac: &'a Autocast, train: bool, dropout: f64, seed: u64) -> Self {
        Self {
            ac,
            train,
            dropout,
            seed,
            site: Cell::new(0),
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
        Self::new(ac, false, 0.0, 0)
    }

    /// The next dropout site's mask for `n` elements, or `None` outside training or with p = 0.
    pub(super) fn mask(&self, n: usize) -> Option<ops::DropMask> {
        if !(self.train && self.dropout > 0.0) {
            return None;
        }
        let k = self.site.get();
        self.site.set(k + 1);
        Some(ops::DropMask::new(
            ops::site_seed(self.seed, k),
            n,
            self.dropout,
        ))
    }

    /// Inverted dropout with the next site's mask (identity outside training).
    pub(super) fn drop(&self, x: &Tensor) -> Result<Tensor> {
        match self.mask(x.elem_count()) {
            Some(m) => ops::dropout_with(x, &m),
            None => Ok(x.clone()),
        }
    }
}
