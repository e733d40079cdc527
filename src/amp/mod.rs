//! Automatic mixed precision: the autocast policy (which dtype each op class runs in, with a
//! per-step weight-cast cache) and the dynamic loss scaler.
//!
//! Policy (the PyTorch autocast lists, reduced to what the Transformer uses):
//! - linear layers, matmuls and attention scores run in the compute dtype (f16/bf16);
//! - embeddings are gathered in f32; layer norm, softmax, log-softmax, the loss and reductions
//!   run in f32; the residual stream stays f32;
//! - every f32 master weight has a working copy in the compute dtype, refreshed once per step
//!   (`working`): the copy is a leaf of the graph, its gradient is the master's
//!   ([`Autocast::grad_of`]).

pub mod scaler;
mod working;

pub use scaler::{GradScaler, ScalerConfig, ScalerError, ScalerState, StepOutcome};

use crate::config::Precision;
use candle_core::{backprop::GradStore, DType, Result, Tensor, TensorId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

pub fn dtype_of(p: Precision) -> DType {
    match p {
        Precision::Fp32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}

/// The autocast context of a run. Call `new_step` once per step so the working copies follow
/// the updated master weights.
#[derive(Debug)]
pub struct Autocast {
    precision: Precision,
    dtype: DType,
    /// Casts of weights that are not `Var`s (constants), per step.
    cache: RefCell<HashMap<TensorId, Tensor>>,
    /// Working copies of the `Var` master weights, by master.
    working: RefCell<HashMap<TensorId, working::Working>>,
    generation: Cell<u64>,
    casts: RefCell<usize>,
}

impl Autocast {
    pub fn new(precision: Precision) -> Self {
        Self {
            precision,
            dtype: dtype_of(precision),
            cache: RefCell::new(HashMap::new()),
            working: RefCell::new(HashMap::new()),
            generation: Cell::new(0),
            casts: RefCell::new(0),
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The dtype matmuls and linear layers run in.
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    pub fn is_mixed(&self) -> bool {
        self.dtype != DType::F32
    }

    /// A new step: the master weights may have changed, so each working copy is refreshed at
    /// its first use from now on.
    pub fn new_step(&self) {
        self.cache.borrow_mut().clear();
        self.generation.set(self.generation.get() + 1);
        *self.casts.borrow_mut() = 0;
    }

    /// Number of weight casts (working-copy refreshes) since the last `new_step` (for tests:
    /// once per weight).
    pub fn weight_casts(&self) -> usize {
        *self.casts.borrow()
    }

    /// A weight in the compute dtype: for a `Var` master its working copy (refreshed at most
    /// once per step, a leaf whose gradient [`Self::grad_of`] returns), for a constant a cast
    /// cached for the step.
    pub fn weight(&self, w: &Tensor) -> Result<Tensor> {
        if w.dtype() == self.dtype {
            return Ok(w.clone());
        }
        if w.is_variable() {
            let generation = self.generation.get();
            let mut map = self.working.borrow_mut();
            let copy = match map.get_mut(&w.id()) {
                Some(wk) if wk.generation == generation => return Ok(wk.copy.as_tensor().clone()),
                Some(wk) => {
                    wk.refresh(w, generation)?;
                    wk.copy.as_tensor().clone()
                }
                None => {
                    let wk = working::Working::new(w, self.dtype, generation)?;
                    let t = wk.copy.as_tensor().clone();
                    map.insert(w.id(), wk);
                    t
                }
            };
            *self.casts.borrow_mut() += 1;
            return Ok(copy);
        }
        if let Some(t) = self.cache.borrow().get(&w.id()) {
            return Ok(t.clone());
        }
        let t = w.to_dtype(self.dtype)?;
        crate::counters::candle_node(w, &t, crate::counters::NodeCost::CAST);
        *self.casts.borrow_mut() += 1;
        self.cache.borrow_mut().insert(w.id(), t.clone());
        Ok(t)
    }

    /// The gradient of master weight `master` in `grads`: its working copy's (in the compute
    /// dtype) and its own (a tied embedding gets both: their sum, in f32), or `None` when it took
    /// no part in the loss.
    pub fn grad_of(&self, master: &Tensor, grads: &GradStore) -> Result<Option<Tensor>> {
        let own = grads.get(master).cloned();
        let copy = self
            .working
            .borrow()
            .get(&master.id())
            .and_then(|wk| grads.get(wk.copy.as_tensor()).cloned());
        Ok(match (own, copy) {
            (Some(a), Some(b)) => {
                crate::counters::device_ops(2);
                Some(a.add(&b.to_dtype(a.dtype())?)?)
            }
            (a, b) => a.or(b),
        })
    }

    /// An activation in the compute dtype (no-op when it already is).
    pub fn act(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == self.dtype {
            Ok(x.clone())
        } else {
            let t = x.to_dtype(self.dtype)?;
            crate::counters::candle_node(x, &t, crate::counters::NodeCost::CAST);
            Ok(t)
        }
    }

    /// `x @ w.T + b` in the compute dtype. x: (..., in), w: (out, in), b: (out). Output (..., out)
    /// in the compute dtype.
    pub fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.linear_act(x, w, b, false, None)
    }

    /// `dropout(act(x @ w.T + b))` in the compute dtype, `act` ReLU when `relu`. With a bias the
    /// bias, the activation and the dropout run as one fused op after the matmul
    /// (`ops::bias_act`); without one, ReLU and dropout are applied separately.
    pub fn linear_act(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        relu: bool,
        drop: Option<&crate::ops::DropMask>,
    ) -> Result<Tensor> {
        let x = self.act(x)?;
        let w = self.weight(w)?;
        // (..., out) in the compute dtype
        let y = crate::ops::linear(&x, &w)?;
        match b {
            Some(b) => {
                let shape = y.dims().to_vec();
                crate::ops::bias_act(&y, &self.weight(b)?, relu, drop, &shape)
            }
            None => {
                let y = if relu {
                    let r = y.relu()?;
                    crate::counters::candle_node(&y, &r, crate::counters::NodeCost::RELU);
                    r
                } else {
                    y
                };
                match drop {
                    Some(m) => crate::ops::dropout_with(&y, m),
                    None => Ok(y),
                }
            }
        }
    }

    /// Batched matmul in the compute dtype.
    pub fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        crate::ops::matmul(&self.act(a)?, &self.act(b)?)
    }
}
