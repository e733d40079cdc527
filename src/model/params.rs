//! The model's named f32 master weights and their seeded initialisation (xavier-uniform
//! matrices, nn.Linear-style biases, constants): candle's CPU RNG cannot be seeded, so the init
//! draws from a `StdRng` here.

use candle_core::{Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Named f32 master weights, created with a seeded RNG (candle's CPU RNG cannot be seeded).
pub struct Params {
    pub vars: Vec<(String, Var)>,
    pub(super) rng: StdRng,
    pub(super) device: Device,
}

impl Params {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            vars: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    pub(super) fn add(&mut self, name: String, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::from_vec(data, shape, &self.device)?;
        let v = Var::from_tensor(&t)?;
        let t = v.as_tensor().clone();
        self.vars.push((name, v));
        Ok(t)
    }

    /// xavier_uniform_: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
    pub(super) fn xavier(&mut self, name: String, rows: usize, cols: usize) -> Result<Tensor> {
        let a = (6.0 / (rows + cols) as f64).sqrt();
        let data = (0..rows * cols)
            .map(|_| self.rng.gen_range(-a..a) as f32)
            .collect();
        self.add(name, data, &[rows, cols])
    }

    /// nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub(super) fn bias(&mut self, name: String, n: usize, fan_in: usize) -> Result<Tensor> {
        let a = 1.0 / (fan_in as f64).sqrt();
        let data = (0..n).map(|_| self.rng.gen_range(-a..a) as f32).collect();
        self.add(name, data, &[n])
    }

    pub(super) fn constant(&mut self, name: String, n: usize, v: f32) -> Result<Tensor> {
        self.add(name, vec![v; n], &[n])
    }

    pub fn count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}
