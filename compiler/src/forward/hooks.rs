//! Hook sites of the differentiable forward: what an edit (or a capture) does at a site.

use crate::error::Result;
use amend_edits::HookPoint;
use candle_core::Tensor;
use std::collections::HashMap;

/// The linear projections of a block (for weight deltas: LoRA, ROME/MEMIT rank-one updates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// The GGUF tensor stem (`blk.N.<stem>.weight`).
    pub fn stem(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    pub fn from_stem(stem: &str) -> Option<Proj> {
        [
            Proj::Q,
            Proj::K,
            Proj::V,
            Proj::O,
            Proj::Gate,
            Proj::Up,
            Proj::Down,
        ]
        .into_iter()
        .find(|p| p.stem() == stem)
    }

    /// The full GGUF weight name at `layer`.
    pub fn weight_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.stem())
    }
}

/// What an edit does during a forward. Both methods default to "nothing".
pub trait Hooks {
    /// Called with the tensor at `point` (`[T, n_embd]`); `Some(y)` replaces it downstream.
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        let _ = (point, x);
        Ok(None)
    }

    /// Called with the input `x` (`[T, in]`) of projection `proj` of `layer`; `Some(d)`
    /// (`[T, out]`) is added to the projection's output (a low-rank weight delta).
    fn linear_delta(&mut self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let _ = (layer, proj, x);
        Ok(None)
    }
}

/// No hooks: the plain model.
impl Hooks for () {}

/// Several hooks applied in order (each sees the previous one's replacement).
pub struct HookList<'a>(pub Vec<&'a mut dyn Hooks>);

impl Hooks for HookList<'_> {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for h in self.0.iter_mut() {
            let input = cur.as_ref().unwrap_or(x);
            if let Some(y) = h.at(point, input)? {
                cur = Some(y);
            }
        }
        Ok(cur)
    }

    fn linear_delta(&mut self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for h in self.0.iter_mut() {
            if let Some(d) = h.linear_delta(layer, proj, x)? {
                sum = Some(match sum {
                    Some(s) => (s + d)?,
                    None => d,
                });
            }
        }
        Ok(sum)
    }
}

/// Records (detached) the tensors at some sites and the inputs of some projections.
#[derive(Default)]
pub struct Capture {
    pub points: Vec<HookPoint>,
    pub inputs: Vec<(usize, Proj)>,
    pub at: HashMap<HookPoint, Tensor>,
    pub input_of: HashMap<(usize, Proj), Tensor>,
}

impl Capture {
    pub fn sites(points: &[HookPoint]) -> Self {
        Capture {
            points: points.to_vec(),
            ..Default::default()
        }
    }

    pub fn projection_inputs(inputs: &[(usize, Proj)]) -> Self {
        Capture {
            inputs: inputs.to_vec(),
            ..Default::default()
        }
    }
}

impl Hooks for Capture {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        if self.points.contains(&point) {
            self.at.insert(point, x.detach());
        }
        Ok(None)
    }

    fn linear_delta(&mut self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        if self.inputs.contains(&(layer, proj)) {
            self.input_of.insert((layer, proj), x.detach());
        }
        Ok(None)
    }
}

/// Replaces row `pos` at `point` by `row` (`[n_embd]`; a `Var` to train it).
pub struct ReplaceRow {
    pub point: HookPoint,
    pub pos: usize,
    pub row: Tensor,
}

impl Hooks for ReplaceRow {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        if point != self.point {
            return Ok(None);
        }
        Ok(Some(super::replace_row(x, self.pos, &self.row)?))
    }
}

/// Adds `delta` (`[T, n_embd]` or broadcastable `[1, n_embd]`) at `point`.
pub struct AddAt {
    pub point: HookPoint,
    pub delta: Tensor,
}

impl Hooks for AddAt {
    fn at(&mut self, point: HookPoint, x: &Tensor) -> Result<Option<Tensor>> {
        if point != self.point {
            return Ok(None);
        }
        Ok(Some(x.broadcast_add(&self.delta)?))
    }
}
