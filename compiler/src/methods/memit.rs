//! MEMIT (Meng et al. 2023): many edits written into the down projections of a window of
//! layers (`blk.L.ffn_down.weight` for each `L` in `memit.layers`).
//!
//! For a batch of edits:
//! - Target: ROME's value optimisation ([`rome::train_delta`]) at the top layer `T` of the
//!   window gives each edit a down-projection output delta at the subject's last token; the
//!   residual stream after block `T` with that delta in place is the edit's target `z`.
//! - Spreading, lowest layer first: the keys `K_l` (`[n_ff, N]`, the down projection's input at
//!   the subject's last token averaged over ROME's context prefixes) are computed with the lower
//!   layers' updates already applied; the residual each layer must add is
//!   `R_l = (z − h_T) / (layers left)`, `h_T` the current residual after block `T` on the edit
//!   prompt; the update is `ΔW_l = R'_l K_lᵀ (w·C_l + K_l K_lᵀ)⁻¹` with `C_l` the key second
//!   moment of the neutral corpus (the ridge as in ROME) and `w` = `memit.mom2_weight`.
//! - Gemma's post-FFN RMSNorm sits between the down projection and the residual stream:
//!   `R'_l` is `R_l` mapped back through the norm's diagonal Jacobian at the current output
//!   (`rms(y) · R / g`, the division regularised where the gain `g` is small); on the llama
//!   family `R'_l = R_l`.
//!
//! Each edit is its own payload: `ΔW_l = Σ_i r_i m_iᵀ` with `m_i = (w·C + KKᵀ)⁻¹ k_i`, one
//! rank-one tensor per layer per edit, so edits roll back one by one; the GGUF-LoRA file merges
//! them into one rank-N tensor per layer. Batches larger than `memit.batch` are compiled chunk
//! by chunk, each chunk on top of the previous ones (whose keys stay in the covariance, so later
//! chunks keep them), and on top of `--base-bundle`'s low-rank deltas.

use super::corpus::Corpus;
use super::rome::{
    averaged_key, base_deltas, check, corpus_covariances, delta_meets, down_key, down_output,
    entry, neighbour_keys, neighbour_subjects, null_space_kept, preserve_base_prompts,
    push_rank_one, smallest_fraction, subject_last, train_delta, write_low_rank, Check,
    LowRankDeltas, NullKept, OwnedDelta,
};
use super::{edit_progress, Compiler, EditReport, Progress};
use crate::checkpoint::Done;
use crate::dataset::EditRecord;
use crate::error::{CompileError, Result};
use crate::forward::{rms_norm, Proj};
use crate::hparams::MemitParams;
use amend_edits::bundle::BundleBuilder;
use amend_edits::Bundle;
use candle_core::Tensor;
use std::cmp::Ordering::Equal;
use std::time::Instant;

/// The edited layers: `memit.layers`, shifted so that the top one is `top` when given.
pub(crate) fn window(c: &Compiler, hp: &MemitParams, top: Option<usize>) -> Result<Vec<usize>> {
    let hi = *hp
        .layers
        .last()
        .ok_or_else(|| CompileError::Hparams("memit.layers is empty".into()))?;
    let layers: Vec<usize> = match top {
        Some(t) => {
            let lo = hp.layers[0];
            if t < hi - lo {
                return Err(CompileError::Hparams(format!(
                    "--layer {t}: memit's window {:?} does not fit below it",
                    hp.layers
                )));
            }
            hp.layers.iter().map(|&l| l + t - hi).collect()
        }
        None => hp.layers.clone(),
    };
    for &l in &layers {
        c.fwd.check_layer(l)?;
    }
    Ok(layers)
}

/// The FFN's contribution to the residual stream for the down-projection output `y` (`[n_embd]`):
/// `y` itself, or gemma's post-FFN norm of it.
fn ffn_out(c: &Compiler, layer: usize, y: &Tensor) -> Result<Tensor> {
    match &c.fwd.layers[layer].ffn_post_norm {
        Some(g) => Ok(rms_norm(&y.unsqueeze(0)?, g, c.fwd.cfg.rms_eps)?.squeeze(0)?),
        None => Ok(y.clone()),
    }
}

/// The down-projection output change that adds about `r` to the residual stream, where the
/// current down-projection output is `y`: through the post-FFN norm's diagonal Jacobian
/// `g / rms(y)`, the division by `g` regularised below 5% of its RMS.
fn down_change(c: &Compiler, layer: usize, y: &Tensor, r: &Tensor) -> Result<Tensor> {
    let Some(g) = &c.fwd.layers[layer].ffn_post_norm else {
        return Ok(r.clone());
    };
    let rms = (y.sqr()?.mean_all()? + c.fwd.cfg.rms_eps)?.sqrt()?;
    let g2 = g.sqr()?;
    let eps2 = (g2.mean_all()?.to_scalar::<f32>()? * 0.05f32.powi(2)) as f64;
    let ginv = (g / (g2 + eps2)?)?;
    Ok((r * ginv)?.broadcast_mul(&rms)?)
}

/// The residual stream after block `layer` at `pos` of `tokens` (`[n_embd]`).
fn residual_after(
    c: &Compiler,
    tokens: &[u32],
    pos: usize,
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Tensor> {
    Ok(entry(c, tokens, layer + 1, deltas)?.get(pos)?)
}

/// One edit of the batch being solved.
struct Pending<'r> {
    record: &'r EditRecord,
    prompt: Vec<u32>,
    answer: Vec<u32>,
    subj: usize,
    /// Target residual after the top layer at the subject's last token.
    z: Tensor,
    /// The fraction of v*'s delta kept (`memit.shrink_nll`).
    fraction: f32,
    steps: usize,
    seconds: f64,
    deltas: Vec<OwnedDelta>,
    /// Per layer of the window: the key, the update's direction and value (what a resumed
    /// compile replays, see `crate::checkpoint`).
    kept: Vec<Vec<f32>>,
}

pub(crate) fn compile(
    c: &mut Compiler,
    records: &[EditRecord],
    hp: &MemitParams,
    layer: Option<usize>,
    base: Option<&Bundle>,
    builder: &mut BundleBuilder,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Vec<EditReport>, Vec<u8>)> {
    let layers = window(c, hp, layer)?;
    let top = *layers.last().expect("window is non-empty");
    let mut deltas = base_deltas(c, base)?;
    let vstar = hp.v_star();
    // w·C_l per layer (the corpus on the unedited model), with the base bundle's prompts' keys;
    // the edits' keys are added as they are solved and stay (later chunks keep earlier edits).
    let corpus = Corpus::open(&hp.corpus)?;
    let (mut covs, moments) = corpus_covariances(
        c,
        &corpus,
        hp.corpus_tokens,
        &layers,
        hp.mom2_weight,
        hp.cov_lambda,
    )?;
    for (cov, &l) in covs.iter_mut().zip(&layers) {
        preserve_base_prompts(c, base, l, &mut deltas, cov, 1.0)?;
    }
    // AlphaEdit: per layer, the null space of the corpus keys and the projected keys of the
    // edits to keep (the base bundle's prompts, earlier chunks).
    let mut null: Option<Vec<NullKept>> = None;
    if hp.null_space {
        let mut per_layer = Vec::with_capacity(layers.len());
        for m in &moments {
            let t = hp.null_space_threshold;
            per_layer.push(null_space_kept(c, base, m, t, "memit", &mut deltas)?);
        }
        null = Some(per_layer);
    }
    drop(moments);
    let entities = if hp.neighbours > 0 {
        corpus.entities()
    } else {
        Vec::new()
    };
    drop(corpus);
    // Template neighbours of edit `i` at layer `l` (with the updates so far applied) join what
    // layer `l` keeps: `C` with `neighbour_weight`, and the null space's kept keys. Their
    // subjects are chosen once per edit, at the window's first layer.
    let mut subjects: std::collections::HashMap<usize, Vec<String>> = Default::default();
    let mut keep_neighbours = |c: &Compiler,
                               r: &EditRecord,
                               i: usize,
                               li: usize,
                               l: usize,
                               deltas: &mut LowRankDeltas,
                               covs: &mut [super::rome::Covariance],
                               null: &mut Option<Vec<NullKept>>|
     -> Result<()> {
        let chosen = match subjects.get(&i) {
            Some(s) => s.clone(),
            None => {
                let (n, pool) = (hp.neighbours, hp.neighbour_pool);
                let s = neighbour_subjects(c, r, l, &entities, i * n, n, pool, deltas)?;
                subjects.insert(i, s.clone());
                s
            }
        };
        let keys = neighbour_keys(c, r, l, &chosen, deltas)?;
        for k in keys {
            covs[li].add(&k, hp.neighbour_weight);
            if let Some(n) = null.as_mut() {
                let pk = n[li].0.project_key(&k, hp.neighbour_weight.sqrt());
                n[li].1.push(pk);
            }
        }
        Ok(())
    };
    let names: Vec<String> = layers.iter().map(|&l| Proj::Down.weight_name(l)).collect();
    let mut reports = Vec::with_capacity(records.len());
    let mut written: Vec<(&EditRecord, usize, Vec<OwnedDelta>)> = Vec::new();
    let total = records.len();
    for (chunk_no, chunk) in records.chunks(hp.batch).enumerate() {
        let first = chunk_no * hp.batch;
        // Resuming: a batch whose edits are all in the checkpoint is replayed (the keys the
        // covariances learned, then the updates, layer by layer as below); batches are solved
        // together, so a batch is kept only once all of it is done.
        let stored: Option<Vec<_>> = chunk
            .iter()
            .enumerate()
            .map(|(j, r)| c.resumed(first + j, &r.id))
            .collect();
        if let Some(stored) = stored {
            let (n_ff, n_embd) = (c.fwd.cfg.n_ff, c.fwd.cfg.n_embd);
            let lens: Vec<usize> = layers.iter().flat_map(|_| [n_ff, n_ff, n_embd]).collect();
            let vecs = stored
                .iter()
                .map(|d| d.vecs_of(&lens))
                .collect::<Result<Vec<_>>>()?;
            let mut made: Vec<Vec<OwnedDelta>> = vec![Vec::new(); stored.len()];
            for (li, &l) in layers.iter().enumerate() {
                // In the order a fresh compile adds them (the factor's rank-one updates and the
                // kept keys' order both change the floating-point result): each edit's
                // neighbours then its key into C; the edits' projected keys after all neighbours.
                for ((j, r), v) in chunk.iter().enumerate().zip(&vecs) {
                    keep_neighbours(c, r, first + j, li, l, &mut deltas, &mut covs, &mut null)?;
                    covs[li].add(&v[3 * li], 1.0);
                }
                if let Some(n) = null.as_mut() {
                    for v in &vecs {
                        let pk = n[li].0.project_key(&v[3 * li], 1.0);
                        n[li].1.push(pk);
                    }
                }
                for (v, m) in vecs.iter().zip(made.iter_mut()) {
                    let (dir, val) = (v[3 * li + 1].clone(), v[3 * li + 2].clone());
                    m.push(push_rank_one(c, &mut deltas, l, dir, val)?);
                }
            }
            for ((j, (r, d)), m) in chunk.iter().zip(&stored).enumerate().zip(made) {
                edit_progress(progress, first + j, total, &r.id)(d.steps as usize, d.loss, true);
                reports.push(d.report(0.0));
                written.push((r, top, m));
            }
            continue;
        }
        // 1. Each edit's target residual at the top layer (v*, with the earlier chunks applied).
        let mut pending = Vec::with_capacity(chunk.len());
        for (j, r) in chunk.iter().enumerate() {
            let t0 = Instant::now();
            let mut report_step = edit_progress(progress, first + j, total, &r.id);
            let (p, a) = c.tokens(&r.prompt, &r.target_new)?;
            let subj = subject_last(c, r, &p)?;
            let t = train_delta(
                c,
                r,
                &p,
                &a,
                subj,
                top,
                &vstar,
                &mut deltas,
                &mut report_step,
            )?;
            let mut value = t.delta;
            let fraction = if hp.shrink_nll > 0.0 {
                let m = hp.shrink_nll;
                smallest_fraction(|s| {
                    let v: Vec<f32> = value.iter().map(|x| x * s).collect();
                    delta_meets(c, top, subj, &v, &p, &a, m, &mut deltas)
                })?
            } else {
                1.0
            };
            value.iter_mut().for_each(|x| *x *= fraction);
            let y = down_output(c, &p, subj, top, &mut deltas)?;
            let v = Tensor::from_slice(&value, y.dims1()?, &c.fwd.device)?;
            let gain = (ffn_out(c, top, &(&y + v)?)? - ffn_out(c, top, &y)?)?;
            let z = (residual_after(c, &p, subj, top, &mut deltas)? + gain)?;
            pending.push(Pending {
                record: r,
                prompt: p,
                answer: a,
                subj,
                z,
                fraction,
                steps: t.steps,
                seconds: t0.elapsed().as_secs_f64(),
                deltas: Vec::with_capacity(layers.len()),
                kept: Vec::with_capacity(3 * layers.len()),
            });
        }
        // 2. Spread the residuals over the window, lowest layer first. Then the margin loop: an
        // edit that misses its target after the batch's solve, or one of whose target tokens
        // has an NLL above `memit.margin_nll`, has its key and value weighted up (weighted least
        // squares, `ΔW = R W Kᵀ (w·C + K W Kᵀ)⁻¹`) and the batch is solved again from the same
        // state, up to `memit.margin_rounds` times: a target the compiler's forward only just
        // reaches is one the quantized model misses.
        let t_spread = Instant::now();
        let (deltas0, covs0) = (deltas.clone(), covs.clone());
        let kept0: Option<Vec<usize>> =
            null.as_ref().map(|n| n.iter().map(|k| k.1.len()).collect());
        let mut weights = vec![1.0f64; pending.len()];
        let mut checks;
        let mut round = 0;
        // Per round: (edits short, their summed excess NLL) and the weights solved with. Weighting
        // some edits up can push others out; the round with the fewest short edits is the one
        // kept (solved once more when it was not the last), so the loop never ships a solve
        // worse than the unweighted one.
        let mut rounds: Vec<((usize, f32), Vec<f64>)> = Vec::new();
        let mut replay = false;
        loop {
            for (li, &l) in layers.iter().enumerate() {
                let left = (layers.len() - li) as f64;
                let mut keys = Vec::with_capacity(pending.len());
                let mut values = Vec::with_capacity(pending.len());
                for (j, e) in pending.iter().enumerate() {
                    keep_neighbours(
                        c,
                        e.record,
                        first + j,
                        li,
                        l,
                        &mut deltas,
                        &mut covs,
                        &mut null,
                    )?;
                    // Weight w: key and value scaled by √w (unweighted edits untouched, so a
                    // compile without margin rounds is bitwise what it was).
                    let s = weights[j].sqrt();
                    let scaled = |t: Tensor| if s == 1.0 { Ok(t) } else { t * s };
                    // A weighted edit is short on its own prompt: with `margin_own_key` the
                    // solve meets that prompt's key instead of the average over the context
                    // prefixes (an update on the average need not carry the prompt itself).
                    let k = if weights[j] > 1.0 && hp.margin_own_key {
                        down_key(c, &e.prompt, e.subj, l, &mut deltas)?
                    } else {
                        averaged_key(c, e.record, l, hp.context_prefixes, &mut deltas)?
                    };
                    let k: Vec<f32> = scaled(k)?.to_vec1()?;
                    let h = residual_after(c, &e.prompt, e.subj, top, &mut deltas)?;
                    let r = scaled(((&e.z - h)? / left)?)?;
                    let y = down_output(c, &e.prompt, e.subj, l, &mut deltas)?;
                    values.push(down_change(c, l, &y, &r)?.to_vec1::<f32>()?);
                    covs[li].add(&k, 1.0);
                    keys.push(k);
                }
                // Solve against the whole batch's keys before applying any of the updates.
                let dirs: Vec<Vec<f32>> = match null.as_mut() {
                    Some(n) => {
                        let (ns, kept) = &mut n[li];
                        ns.directions(kept, &keys, hp.null_space_ridge)?
                    }
                    None => keys.iter().map(|k| covs[li].solve(k)).collect(),
                };
                for (((e, m), r), k) in pending.iter_mut().zip(dirs).zip(values).zip(keys) {
                    if !m.iter().chain(&r).all(|x| x.is_finite()) {
                        return Err(CompileError::Hparams(format!(
                            "memit: non-finite update for {:?} at layer {l}; raise memit.cov_lambda",
                            e.record.id
                        )));
                    }
                    if c.checkpoint.is_some() {
                        e.kept.extend([k, m.clone(), r.clone()]);
                    }
                    e.deltas.push(push_rank_one(c, &mut deltas, l, m, r)?);
                }
            }
            checks = Vec::with_capacity(pending.len());
            for e in &pending {
                checks.push(check(c, &e.prompt, &e.answer, &mut deltas)?);
            }
            let short: Vec<usize> = (0..pending.len())
                .filter(|&j| !checks[j].holds(hp.margin_nll))
                .collect();
            if replay || short.is_empty() {
                break;
            }
            let excess = short
                .iter()
                .map(|&j| (checks[j].worst - hp.margin_nll).max(0.0))
                .sum::<f32>();
            rounds.push(((short.len(), excess), weights.clone()));
            if round == hp.margin_rounds {
                let best = (0..rounds.len())
                    .min_by(|&a, &b| rounds[a].0.partial_cmp(&rounds[b].0).unwrap_or(Equal))
                    .unwrap_or(round);
                if best == round {
                    break;
                }
                weights = rounds[best].1.clone();
                replay = true;
            } else {
                round += 1;
                for j in short {
                    weights[j] *= hp.margin_factor;
                }
            }
            deltas = deltas0.clone();
            covs = covs0.clone();
            if let (Some(n), Some(k0)) = (null.as_mut(), &kept0) {
                for (layer, &len) in n.iter_mut().zip(k0) {
                    layer.1.truncate(len);
                }
            }
            for e in pending.iter_mut() {
                e.deltas.clear();
                e.kept.clear();
            }
        }
        let spread = t_spread.elapsed().as_secs_f64() / pending.len() as f64;
        for (j, e) in pending.into_iter().enumerate() {
            let Check { loss, success, .. } = checks[j];
            edit_progress(progress, first + j, total, &e.record.id)(e.steps, loss, true);
            let mut weighted = match weights[j] {
                w if w > 1.0 => format!(", weighted {w}x"),
                _ => String::new(),
            };
            if e.fraction < 1.0 {
                weighted.push_str(&format!(", v* scaled {}", e.fraction));
            }
            let rep = EditReport {
                id: e.record.id.clone(),
                loss,
                steps: e.steps,
                seconds: e.seconds + spread,
                success,
                action: format!(
                    "rank-one on each of {} (subject token {}, batch of {}{weighted})",
                    names.join(", "),
                    e.subj,
                    chunk.len()
                ),
            };
            let kept = e.kept;
            c.finished(first + j, || Done::of(&rep, kept))?;
            reports.push(rep);
            written.push((e.record, top, e.deltas));
        }
    }
    let gguf = write_low_rank(builder, c.fwd.cfg.arch.name(), base, &written)?;
    Ok((reports, gguf))
}
