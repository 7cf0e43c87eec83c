//! Adam on a few trainable tensors (candle-core has no optimizers; candle-nn is not needed
//! for this much).

use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

pub struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
    pub lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Adam {
    pub fn new(vars: Vec<Var>, lr: f64) -> Result<Adam> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<_, _>>()?;
        let s = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<_, _>>()?;
        Ok(Adam {
            vars,
            m,
            v: s,
            t: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// One step from the gradients of a loss (`loss.backward()`); variables without a
    /// gradient are left as they are.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t);
        let bc2 = 1.0 - self.beta2.powi(self.t);
        for i in 0..self.vars.len() {
            let Some(g) = grads.get(self.vars[i].as_tensor()) else {
                continue;
            };
            // A gradient keeps its step's graph alive through its op; the moments built from it
            // would chain every step's graph together (scope-head training grew past 20 GB).
            let g = &g.detach();
            self.m[i] = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mhat = (&self.m[i] / bc1)?;
            let vhat = (&self.v[i] / bc2)?;
            let upd = (mhat / (vhat.sqrt()? + self.eps)?)?;
            let new = (self.vars[i].as_tensor() - (upd * self.lr)?)?;
            self.vars[i].set(&new)?;
        }
        Ok(())
    }
}
