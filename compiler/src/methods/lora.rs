//! FT-L style baseline: a small LoRA (`ΔW = B A`, rank `lora.rank`) on one FFN down projection
//! (`blk.L.ffn_down.weight`), trained per edit with Adam on the target NLL under teacher
//! forcing, the delta applied at every position (as llama.cpp applies it). A starts small and
//! deterministic-random, B at zero (LoRA's initialisation: the edit starts as the base model).
//! Edits are sequential (earlier ones in place) and each is its own low-rank payload.

use super::rome::{base_deltas, entry, write_low_rank, LowRankDeltas, OwnedDelta};
use super::{argmax_hits_all, edit_progress, Adam, Compiler, EditReport, Progress};
use crate::checkpoint::Done;
use crate::dataset::EditRecord;
use crate::error::Result;
use crate::forward::{nll, Hooks, Proj};
use crate::hparams::LoraParams;
use amend_edits::bundle::BundleBuilder;
use amend_edits::Bundle;
use candle_core::{Tensor, Var};
use std::time::Instant;

/// The trainable adapter of one edit plus the earlier deltas.
struct Trainable<'a> {
    layer: usize,
    a: Tensor,
    b: Tensor,
    scale: f64,
    base: &'a mut LowRankDeltas,
}

impl Hooks for Trainable<'_> {
    fn linear_delta(&mut self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let prev = self.base.linear_delta(layer, proj, x)?;
        if layer != self.layer || proj != Proj::Down {
            return Ok(prev);
        }
        let d = (x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale)?;
        Ok(Some(super::add_to(prev, d)?))
    }
}

/// Deterministic values in [-1, 1) (xorshift), so compilation is reproducible.
fn init_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub(crate) fn compile(
    c: &mut Compiler,
    records: &[EditRecord],
    hp: &LoraParams,
    layer: Option<usize>,
    base: Option<&Bundle>,
    builder: &mut BundleBuilder,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Vec<EditReport>, Vec<u8>)> {
    let layer = c.resolve_layer(layer, hp.layer)?;
    let mut deltas = base_deltas(c, base)?;
    let name = Proj::Down.weight_name(layer);
    let (n_ff, n_embd, r) = (c.fwd.cfg.n_ff, c.fwd.cfg.n_embd, hp.rank);
    let dev = c.fwd.device.clone();
    let mut reports = Vec::with_capacity(records.len());
    let mut written = Vec::with_capacity(records.len());
    for (i, rec) in records.iter().enumerate() {
        let t0 = Instant::now();
        let mut report = edit_progress(progress, i, records.len(), &rec.id);
        if let Some(d) = c.resumed(i, &rec.id) {
            // Resuming: the edit's trained factors from the checkpoint.
            let v = d.vecs_of(&[r * n_ff, n_embd * r])?;
            let od = OwnedDelta {
                name: name.clone(),
                rank: r,
                n_in: n_ff,
                n_out: n_embd,
                a: v[0].clone(),
                b: v[1].clone(),
                alpha: hp.alpha,
            };
            deltas.push(
                layer,
                Proj::Down,
                Tensor::from_slice(&od.a, (r, n_ff), &dev)?,
                Tensor::from_slice(&od.b, (n_embd, r), &dev)?,
                hp.alpha / r as f32,
            );
            report(d.steps as usize, d.loss, true);
            reports.push(d.report(t0.elapsed().as_secs_f64()));
            written.push((rec, layer, vec![od]));
            continue;
        }
        let (p, ans) = c.tokens(&rec.prompt, &rec.target_new)?;
        let last = p.len() - 1;
        let mut input = p.clone();
        input.extend_from_slice(&ans[..ans.len() - 1]);
        let at: Vec<usize> = (last..last + ans.len()).collect();
        let x_in = entry(c, &input, layer, &mut deltas)?;
        let targets = Tensor::new(ans.as_slice(), &dev)?;

        let a0 = init_values(r * n_ff, 0x9E37_79B9 ^ (i as u64 + 1));
        let a =
            Var::from_tensor(&(Tensor::from_vec(a0, (r, n_ff), &dev)? / (n_ff as f64).sqrt())?)?;
        let b = Var::from_tensor(&Tensor::zeros((n_embd, r), candle_core::DType::F32, &dev)?)?;
        let mut opt = Adam::new(vec![a.clone(), b.clone()], hp.lr)?;
        let scale = hp.alpha as f64 / r as f64;
        let mut best = (f32::INFINITY, Vec::new(), Vec::new(), false);
        let mut steps = 0;
        for step in 0..hp.steps {
            let mut hook = Trainable {
                layer,
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale,
                base: &mut deltas,
            };
            let h = c.fwd.run_layers(layer, x_in.clone(), &mut hook)?;
            let logits = c.fwd.logits(&h, &at)?;
            let loss = nll(&logits, &ans)?;
            let l = loss.to_scalar::<f32>()?;
            let success = argmax_hits_all(&logits, &targets)?;
            if l < best.0 || (success && !best.3) {
                best = (
                    l,
                    a.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                    b.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                    success,
                );
            }
            report(step, l, false);
            steps = step + 1;
            if success && l < hp.stop_loss {
                break;
            }
            let grads = loss.backward()?;
            opt.step(&grads)?;
        }
        super::ensure_finite(best.1.iter().chain(&best.2), "lora")?;
        let d = OwnedDelta {
            name: name.clone(),
            rank: r,
            n_in: n_ff,
            n_out: n_embd,
            a: best.1,
            b: best.2,
            alpha: hp.alpha,
        };
        deltas.push(
            layer,
            Proj::Down,
            Tensor::from_slice(&d.a, (r, n_ff), &dev)?,
            Tensor::from_slice(&d.b, (n_embd, r), &dev)?,
            hp.alpha / r as f32,
        );
        report(steps, best.0, true);
        let rep = EditReport {
            id: rec.id.clone(),
            loss: best.0,
            steps,
            seconds: t0.elapsed().as_secs_f64(),
            success: best.3,
            action: format!("rank-{r} LoRA on {name}"),
        };
        c.finished(i, || Done::of(&rep, vec![d.a.clone(), d.b.clone()]))?;
        reports.push(rep);
        written.push((rec, layer, vec![d]));
    }
    let gguf = write_low_rank(builder, c.fwd.cfg.arch.name(), base, &written)?;
    Ok((reports, gguf))
}
