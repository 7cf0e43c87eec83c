//! ROME (Meng et al. 2022): a rank-one update of one FFN down projection
//! (`blk.L.ffn_down.weight`, `[n_embd, n_ff]`).
//!
//! - Key `k*`: the down projection's INPUT (the gated activation, `n_ff` wide) at the subject's
//!   last token, averaged over the prompt and a few short context prefixes (ROME's context
//!   templates; fixed texts here, so compilation is deterministic).
//! - Value: a trainable `delta` added to the down projection's output at the subject's last
//!   token, optimised with Adam so the target follows the prompt (teacher forcing), plus a KL
//!   term on the essence prompt "{subject} is a" (keeps what the subject is), a weight decay on
//!   `‖delta‖² / ‖v0‖²` and a clamp `‖delta‖ <= clamp_norm_factor · ‖v0‖` (`v0 = W k`).
//! - Update: identity covariance (`C = I`, as EasyEdit uses for llama; no corpus statistics),
//!   `ΔW = delta · k*ᵀ / (k*ᵀ k)` with `k` the key of the edit prompt itself, so that
//!   `ΔW k = delta = v* − W k` exactly on the edit prompt. `W` is the dequantized weight the
//!   runtime multiplies by (llama.cpp adds the LoRA delta to the same matmul).
//!
//! Edits are sequential: each edit is trained with the earlier ones (and the base bundle's
//! low-rank deltas) in place. Every edit is its own low-rank payload (one tensor, rank one), so
//! edits roll back one by one; the GGUF-LoRA file concatenates them into one rank-n tensor.

use super::corpus::{second_moments_of, Corpus, NullSpace, SecondMoment};
use super::{argmax_hits_all, edit_progress, Adam, Compiler, EditReport, Progress};
use crate::checkpoint::Done;
use crate::dataset::EditRecord;
use crate::error::{CompileError, Result};
use crate::forward::{log_softmax_last, nll, Capture, HookList, Hooks, Proj};
use crate::hparams::{RomeParams, VStarParams};
use crate::linalg::Cholesky;
use amend_edits::bundle::{BundleBuilder, LowRankTensorView, Payload};
use amend_edits::families::{LowRank, LowRankMerger, LowRankTensor};
use amend_edits::{Bundle, Site};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::time::Instant;

/// Context prefixes for averaging the key (ROME samples ~20 short model generations; fixed
/// neutral openings keep compilation reproducible). The first is "no prefix".
pub const CONTEXT_PREFIXES: [&str; 6] = [
    "",
    "The following is true. ",
    "Here is a short fact. ",
    "I read this yesterday. ",
    "According to the encyclopedia, ",
    "As everyone knows, ",
];

/// The key second moment `C = w·(E[k kᵀ] + λ·mean_diag·I)` of the down projection's inputs over
/// the covariance corpus ([`super::corpus`]), held as its Cholesky factor; earlier edits' keys
/// are added as rank-one updates so a later edit barely moves them (ROME's `C⁻¹k` direction,
/// made sequential).
#[derive(Clone)]
pub(crate) struct Covariance(Cholesky);

impl Covariance {
    /// From the corpus moment `m`, scaled by `weight`, with the ridge `lambda` relative to its
    /// mean diagonal.
    pub(crate) fn from_moment(m: &SecondMoment, weight: f64, lambda: f64) -> Result<Covariance> {
        let n = m.n;
        let mean_diag = (0..n).map(|i| m.mean[i * n + i]).sum::<f64>() / n.max(1) as f64;
        let reg = lambda * mean_diag.max(1e-12);
        let mut a: Vec<f64> = m.mean.iter().map(|x| x * weight).collect();
        for i in 0..n {
            a[i * n + i] += reg * weight;
        }
        Cholesky::new(a, n).map(Covariance).ok_or_else(|| {
            CompileError::Hparams(
                "key covariance is not positive definite; raise cov_lambda (rome/memit)".into(),
            )
        })
    }

    /// `C⁻¹ k`.
    pub(crate) fn solve(&self, k: &[f32]) -> Vec<f32> {
        let k: Vec<f64> = k.iter().map(|&x| x as f64).collect();
        self.0.solve(&k).into_iter().map(|x| x as f32).collect()
    }

    /// `C += w k kᵀ`.
    pub(crate) fn add(&mut self, k: &[f32], w: f64) {
        let x: Vec<f64> = k.iter().map(|&v| v as f64 * w.sqrt()).collect();
        self.0.add(&x);
    }
}

/// The covariances of `layers` from `corpus` (its first `tokens` tokens).
pub(crate) fn corpus_covariances(
    c: &Compiler,
    corpus: &Corpus,
    tokens: usize,
    layers: &[usize],
    weight: f64,
    lambda: f64,
) -> Result<(Vec<Covariance>, Vec<SecondMoment>)> {
    let moments = second_moments_of(c, corpus, tokens, layers)?;
    let covs = moments
        .iter()
        .map(|m| Covariance::from_moment(m, weight, lambda))
        .collect::<Result<Vec<_>>>()?;
    Ok((covs, moments))
}

/// Down-projection inputs of `layer` on every token (BOS skipped) of each text: `[rows, n_ff]`,
/// `None` when no text has a token besides BOS.
fn text_keys<'t>(
    c: &Compiler,
    texts: impl Iterator<Item = &'t str>,
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Option<Tensor>> {
    let mut rows = Vec::new();
    for text in texts {
        let toks = tokenize(c, text)?;
        if toks.len() < 2 {
            continue;
        }
        let x = entry(c, &toks, layer, deltas)?;
        let mut cap = Capture::projection_inputs(&[(layer, Proj::Down)]);
        c.fwd.run_one(layer, x, &mut cap)?;
        if let Some(k) = cap.input_of.remove(&(layer, Proj::Down)) {
            // Skip BOS: its activations are outliers no prompt shares.
            rows.push(k.narrow(0, 1, toks.len() - 1)?);
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::cat(&rows, 0)?))
}

/// The keys of the base bundle's edit prompts at `layer` (every token: the subject's key is among
/// them, and the manifest does not keep the subject).
pub(crate) fn base_prompt_keys(
    c: &Compiler,
    base: Option<&Bundle>,
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Vec<Vec<f64>>> {
    let Some(b) = base else {
        return Ok(Vec::new());
    };
    let prompts = b.manifest().edits.iter().map(|e| e.prompt.as_str());
    Ok(match text_keys(c, prompts, layer, deltas)? {
        Some(keys) => keys
            .to_vec2::<f32>()?
            .into_iter()
            .map(|k| k.into_iter().map(f64::from).collect())
            .collect(),
        None => Vec::new(),
    })
}

/// A layer's AlphaEdit null space and the projected keys its updates must keep.
pub(crate) type NullKept = (NullSpace, Vec<Vec<f64>>);

/// AlphaEdit's null space of `m` (refused when empty) and the projected keys of the base
/// bundle's prompts, which the updates must keep.
pub(crate) fn null_space_kept(
    c: &Compiler,
    base: Option<&Bundle>,
    m: &SecondMoment,
    threshold: f64,
    section: &str,
    deltas: &mut LowRankDeltas,
) -> Result<NullKept> {
    let ns = NullSpace::of(m, threshold)?;
    log::info!(
        "{section} layer {}: null space of {} of {} dimensions (threshold {threshold})",
        m.layer,
        ns.dim,
        ns.n
    );
    if ns.dim == 0 {
        return Err(CompileError::Hparams(format!(
            "{section}.null_space_threshold {threshold}: layer {}'s null space is empty; raise it",
            m.layer
        )));
    }
    let kept = base_prompt_keys(c, base, m.layer, deltas)?
        .iter()
        .map(|k| ns.project(k))
        .collect();
    Ok((ns, kept))
}

/// Adds [`base_prompt_keys`] to `cov` with weight `w`, so the new edits' updates leave the
/// earlier edits alone, as the earlier edits of the same compilation are.
pub(crate) fn preserve_base_prompts(
    c: &Compiler,
    base: Option<&Bundle>,
    layer: usize,
    deltas: &mut LowRankDeltas,
    cov: &mut Covariance,
    w: f64,
) -> Result<()> {
    for k in base_prompt_keys(c, base, layer, deltas)? {
        cov.0
            .add(&k.iter().map(|x| x * w.sqrt()).collect::<Vec<_>>());
    }
    Ok(())
}

/// One low-rank term: A `[r, in]`, B `[out, r]`, scale.
type LowRankTerm = (Tensor, Tensor, f32);

/// Accumulated low-rank deltas applied in the candle forward: `y += (x Aᵀ) Bᵀ · scale`.
#[derive(Default, Clone)]
pub(crate) struct LowRankDeltas {
    terms: HashMap<(usize, Proj), Vec<LowRankTerm>>,
}

impl LowRankDeltas {
    pub(crate) fn push(&mut self, layer: usize, proj: Proj, a: Tensor, b: Tensor, scale: f32) {
        self.terms
            .entry((layer, proj))
            .or_default()
            .push((a, b, scale));
    }

    /// Adds a family low-rank tensor (from a base bundle) when its name is a known projection.
    pub(crate) fn push_tensor(
        &mut self,
        t: &LowRankTensor<'_>,
        dev: &candle_core::Device,
    ) -> Result<()> {
        let (layer, proj) = parse_tensor_name(t.name).ok_or_else(|| {
            CompileError::Bundle(format!(
                "--base-bundle: low-rank tensor `{}` is not a block projection weight",
                t.name
            ))
        })?;
        let a = Tensor::from_slice(t.a, (t.rank, t.n_in), dev)?;
        let b = Tensor::from_slice(t.b, (t.n_out, t.rank), dev)?;
        self.push(layer, proj, a, b, t.scale());
        Ok(())
    }
}

impl Hooks for LowRankDeltas {
    fn linear_delta(&mut self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(terms) = self.terms.get(&(layer, proj)) else {
            return Ok(None);
        };
        let mut sum: Option<Tensor> = None;
        for (a, b, s) in terms {
            let d = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * *s as f64)?;
            sum = Some(super::add_to(sum, d)?);
        }
        Ok(sum)
    }
}

/// `blk.N.<stem>.weight` -> (N, proj).
pub(crate) fn parse_tensor_name(name: &str) -> Option<(usize, Proj)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let stem = rest.strip_suffix(".weight")?;
    Some((n.parse().ok()?, Proj::from_stem(stem)?))
}

/// The base bundle's low-rank deltas (sequential editing on top of it).
pub(crate) fn base_deltas(c: &Compiler, base: Option<&Bundle>) -> Result<LowRankDeltas> {
    let mut deltas = LowRankDeltas::default();
    let Some(b) = base else {
        return Ok(deltas);
    };
    for (p, payload) in b.payloads().iter().enumerate() {
        let Payload::LowRank(_) = payload else {
            return Err(CompileError::Bundle(format!(
                "--base-bundle has a {} payload; rome/memit/lora can only extend a low-rank bundle",
                payload.kind().name()
            )));
        };
        let views = b
            .low_rank(p, |_| true)
            .ok_or_else(|| CompileError::Bundle("--base-bundle: unreadable low-rank".into()))?;
        let lr = LowRankTensorView::to_family(&views)
            .map_err(|e| CompileError::Bundle(format!("--base-bundle: {e}")))?;
        for t in lr.tensors() {
            deltas.push_tensor(t, &c.fwd.device)?;
        }
    }
    Ok(deltas)
}

/// One rank-one (or rank-r) delta of one edit, owned.
#[derive(Clone, Debug)]
pub(crate) struct OwnedDelta {
    pub name: String,
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    /// `[rank, n_in]`
    pub a: Vec<f32>,
    /// `[n_out, rank]`
    pub b: Vec<f32>,
    pub alpha: f32,
}

impl OwnedDelta {
    pub(crate) fn view(&self) -> LowRankTensor<'_> {
        LowRankTensor {
            name: &self.name,
            n_in: self.n_in,
            n_out: self.n_out,
            rank: self.rank,
            a: &self.a,
            b: &self.b,
            alpha: self.alpha,
        }
    }
}

/// The base bundle's edits with their low-rank deltas, so that the next version carries every
/// earlier edit (an edit set replaces a bundle by its next version).
fn carried_edits(base: Option<&Bundle>) -> Result<Vec<(EditRecord, usize, Vec<OwnedDelta>)>> {
    let Some(b) = base else {
        return Ok(Vec::new());
    };
    let unreadable = || CompileError::Bundle("--base-bundle: unreadable low-rank payload".into());
    let mut out = Vec::with_capacity(b.manifest().edits.len());
    for e in &b.manifest().edits {
        let views = b
            .low_rank(e.payload as usize, |_| true)
            .ok_or_else(unreadable)?;
        let lr = LowRankTensorView::to_family(&views)
            .map_err(|err| CompileError::Bundle(format!("--base-bundle: {err}")))?;
        let deltas = lr
            .tensors()
            .iter()
            .skip(e.first as usize)
            .take(e.count as usize)
            .map(|t| OwnedDelta {
                name: t.name.to_string(),
                rank: t.rank,
                n_in: t.n_in,
                n_out: t.n_out,
                a: t.a.to_vec(),
                b: t.b.to_vec(),
                alpha: t.alpha,
            })
            .collect();
        let record = EditRecord {
            id: e.id.clone(),
            prompt: e.prompt.clone(),
            target_new: e.target.clone(),
            ..EditRecord::default()
        };
        out.push((record, e.layer as usize, deltas));
    }
    Ok(out)
}

/// Writes the base bundle's edits again, then one low-rank payload per new edit, and returns
/// the GGUF-LoRA file of all of them (deltas on the same tensor concatenated along the rank,
/// scales folded into B).
pub(crate) fn write_low_rank(
    builder: &mut BundleBuilder,
    arch: &str,
    base: Option<&Bundle>,
    new_edits: &[(&EditRecord, usize, Vec<OwnedDelta>)],
) -> Result<Vec<u8>> {
    let carried = carried_edits(base)?;
    if let Some((r, _, _)) = new_edits
        .iter()
        .find(|(r, _, _)| carried.iter().any(|(c, _, _)| c.id == r.id))
    {
        return Err(CompileError::Bundle(format!(
            "edit id {:?} is already in --base-bundle; give the new record another id",
            r.id
        )));
    }
    let edits = carried
        .iter()
        .map(|(r, l, d)| (r, *l, d.clone()))
        .chain(new_edits.iter().map(|(r, l, d)| (*r, *l, d.clone())));
    // The GGUF-LoRA file: one tensor per base weight, as the runtime merges a bundle.
    let mut merged = LowRankMerger::default();
    for (r, layer, deltas) in edits {
        let views: Vec<LowRankTensor<'_>> = deltas.iter().map(|d| d.view()).collect();
        // Validates shapes and finiteness before anything is written.
        LowRank::new(views.clone())
            .map_err(|e| CompileError::Bundle(format!("edit {:?}: {e}", r.id)))?;
        let p = builder.add_low_rank(&views);
        builder.add_edit(
            &r.id,
            layer as u32,
            Site::FfnOutput,
            &r.prompt,
            &r.target_new,
            p,
            0,
            views.len() as u32,
        );
        for v in &views {
            merged
                .add(v)
                .map_err(|e| CompileError::Bundle(format!("edit {:?}: {e}", r.id)))?;
        }
    }
    let lr = merged
        .to_low_rank()
        .map_err(|e| CompileError::Bundle(format!("low-rank: {e}")))?;
    Ok(lr.to_gguf_lora(arch))
}

/// The rank-one down-projection delta `b aᵀ` of `layer` (`a`: `[n_ff]`, `b`: `[n_embd]`),
/// applied to `deltas` (later computations see it) and returned as a payload tensor.
pub(crate) fn push_rank_one(
    c: &Compiler,
    deltas: &mut LowRankDeltas,
    layer: usize,
    a: Vec<f32>,
    b: Vec<f32>,
) -> Result<OwnedDelta> {
    let (n_ff, n_embd) = (c.fwd.cfg.n_ff, c.fwd.cfg.n_embd);
    deltas.push(
        layer,
        Proj::Down,
        Tensor::from_slice(&a, (1, n_ff), &c.fwd.device)?,
        Tensor::from_slice(&b, (n_embd, 1), &c.fwd.device)?,
        1.0,
    );
    Ok(OwnedDelta {
        name: Proj::Down.weight_name(layer),
        rank: 1,
        n_in: n_ff,
        n_out: n_embd,
        a,
        b,
        alpha: 1.0,
    })
}

/// The down-projection output of `layer` at `pos` of `tokens` (`[n_embd]`), deltas included.
pub(crate) fn down_output(
    c: &Compiler,
    tokens: &[u32],
    pos: usize,
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Tensor> {
    let k = down_key(c, tokens, pos, layer, deltas)?.unsqueeze(0)?;
    let mut y = k.matmul(&c.fwd.layers[layer].w_down.t()?)?;
    if let Some(d) = deltas.linear_delta(layer, Proj::Down, &k)? {
        y = (y + d)?;
    }
    Ok(y.squeeze(0)?)
}

/// How an edit stands after a solve (teacher-forced, with `deltas`).
#[derive(Clone, Copy)]
pub(crate) struct Check {
    /// Mean target NLL.
    pub loss: f32,
    /// Every target token the argmax.
    pub success: bool,
    /// The largest NLL of one target token: below ln 2, every token has probability above 1/2.
    pub worst: f32,
}

impl Check {
    /// Every target token the argmax, each with an NLL of at most `margin`.
    pub(crate) fn holds(&self, margin: f32) -> bool {
        self.success && self.worst <= margin
    }
}

pub(crate) fn check(
    c: &Compiler,
    prompt: &[u32],
    answer: &[u32],
    deltas: &mut dyn Hooks,
) -> Result<Check> {
    let mut input = prompt.to_vec();
    input.extend_from_slice(&answer[..answer.len() - 1]);
    let at: Vec<usize> = (prompt.len() - 1..input.len()).collect();
    let logits = c.fwd.forward(&input, deltas, &at)?;
    let targets = Tensor::new(answer, &c.fwd.device)?;
    let success = argmax_hits_all(&logits, &targets)?;
    // Each target token's NLL (as `nll` computes them), once for the mean and the worst.
    let token_nll = log_softmax_last(&logits)?
        .gather(&targets.unsqueeze(1)?, 1)?
        .neg()?;
    let loss = token_nll.mean_all()?.to_scalar::<f32>()?;
    let worst = token_nll.max_all()?.to_scalar::<f32>()?;
    Ok(Check {
        loss,
        success,
        worst,
    })
}

/// Index of the subject's last token in `prompt_tokens` (tokenizing the prompt up to the end
/// of the subject), or the last prompt token when the subject is unknown or absent.
pub(crate) fn subject_last(c: &Compiler, r: &EditRecord, prompt_tokens: &[u32]) -> Result<usize> {
    let last = prompt_tokens.len() - 1;
    let Some(span) = r.subject_span() else {
        return Ok(last);
    };
    let toks = tokenize(c, &r.prompt[..span.end])?;
    if toks.is_empty()
        || toks.len() > prompt_tokens.len()
        || toks[..] != prompt_tokens[..toks.len()]
    {
        // The subject's end is not a token boundary of the prompt: key on the last token that
        // still lies inside it.
        let n = toks
            .iter()
            .zip(prompt_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        return Ok(n.saturating_sub(1).min(last));
    }
    Ok(toks.len() - 1)
}

/// `text` tokenized as the compiler tokenizes prompts (BOS when the model wants it).
pub(crate) fn tokenize(c: &Compiler, text: &str) -> Result<Vec<u32>> {
    let add_bos = c.runtime.info().add_bos;
    let t = c
        .runtime
        .tokenize(text, add_bos)
        .map_err(|e| CompileError::Tokenizer(e.to_string()))?;
    Ok(t.into_iter().map(|t| t as u32).collect())
}

/// The residual stream entering `layer` for `tokens` (constant during training), with `deltas`
/// applied in the layers before it.
pub(crate) fn entry(
    c: &Compiler,
    tokens: &[u32],
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Tensor> {
    let mut h = c.fwd.embed(tokens, deltas)?;
    for il in 0..layer {
        h = c.fwd.run_one(il, h, deltas)?;
    }
    Ok(h.detach())
}

/// The down-projection input of `layer` at row `pos` of `tokens`: `[n_ff]`.
pub(crate) fn down_key(
    c: &Compiler,
    tokens: &[u32],
    pos: usize,
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Tensor> {
    let x = entry(c, tokens, layer, deltas)?;
    let mut cap = Capture::projection_inputs(&[(layer, Proj::Down)]);
    c.fwd.run_one(layer, x, &mut cap)?;
    let k = cap
        .input_of
        .get(&(layer, Proj::Down))
        .ok_or_else(|| CompileError::Candle("down-projection input not captured".into()))?;
    Ok(k.get(pos)?)
}

/// The down-projection inputs of `layer` at the last token of each of `prompts` (`[n_ff]`
/// each), the prompts run as one packed stream with `deltas` applied.
pub(crate) fn last_token_keys(
    c: &Compiler,
    prompts: &[Vec<u32>],
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Vec<Vec<f32>>> {
    let starts: Vec<usize> = prompts.iter().map(|p| p.len().saturating_sub(1)).collect();
    keys_from(c, prompts, &starts, layer, deltas)
}

/// The down-projection inputs of `layer` at every position from `starts[i]` on of each of
/// `prompts` (`[n_ff]` each, in order), the prompts run as one packed stream with `deltas`.
pub(crate) fn keys_from(
    c: &Compiler,
    prompts: &[Vec<u32>],
    starts: &[usize],
    layer: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Vec<Vec<f32>>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let xs = prompts
        .iter()
        .map(|p| c.fwd.embed(p, &mut *deltas))
        .collect::<Result<Vec<_>>>()?;
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut cap = Capture::projection_inputs(&[(layer, Proj::Down)]);
    let mut hooks = HookList(vec![&mut *deltas, &mut cap]);
    c.fwd
        .run_packed(0..layer + 1, Tensor::cat(&xs, 0)?, &lens, &mut hooks)?;
    let k = cap
        .input_of
        .get(&(layer, Proj::Down))
        .ok_or_else(|| CompileError::Candle("down-projection input not captured".into()))?;
    let mut out = Vec::with_capacity(prompts.len());
    let mut begin = 0;
    for (n, &from) in lens.into_iter().zip(starts) {
        for pos in from.min(n.saturating_sub(1))..n {
            out.push(k.get(begin + pos)?.to_vec1()?);
        }
        begin += n;
    }
    Ok(out)
}

/// The other subjects an edit's template neighbours use: `count` of `entities` (from `start`,
/// cyclically, skipping the subject itself). With `pool > count`, the `pool` next candidates
/// are ranked by the cosine of their key at `layer` (the prompt up to the subject, the
/// candidate in the subject's place) to the subject's own key, and the `count` closest kept:
/// the update leaks most into keys like the subject's ("Vietnam" for an edit about "Nepal"),
/// which a random pick of WordNet names rarely contains.
#[allow(clippy::too_many_arguments)]
pub(crate) fn neighbour_subjects(
    c: &Compiler,
    r: &EditRecord,
    layer: usize,
    entities: &[String],
    start: usize,
    count: usize,
    pool: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Vec<String>> {
    let Some(span) = r.subject_span() else {
        return Ok(Vec::new());
    };
    if entities.is_empty() || count == 0 {
        return Ok(Vec::new());
    }
    let subject = &r.prompt[span.clone()];
    let want = pool.max(count);
    let mut names = Vec::with_capacity(want);
    for j in 0..entities.len() {
        if names.len() == want {
            break;
        }
        let e = &entities[(start + j) % entities.len()];
        if !e.eq_ignore_ascii_case(subject) {
            names.push(e.clone());
        }
    }
    if names.len() <= count {
        return Ok(names);
    }
    let prefix = &r.prompt[..span.start];
    let mut prompts = vec![tokenize(c, &r.prompt[..span.end])?];
    for e in &names {
        prompts.push(tokenize(c, &format!("{prefix}{e}"))?);
    }
    let keys = last_token_keys(c, &prompts, layer, deltas)?;
    let norm = |v: &[f32]| {
        v.iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12)
    };
    let own = &keys[0];
    let mut ranked: Vec<(f64, usize)> = keys[1..]
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let dot: f64 = k.iter().zip(own).map(|(a, b)| *a as f64 * *b as f64).sum();
            (dot / (norm(k) * norm(own)), i)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(ranked[..count]
        .iter()
        .map(|&(_, i)| names[i].clone())
        .collect())
}

/// Keys an edit must leave alone: its prompt up to the subject with each of `subjects` (from
/// [`neighbour_subjects`]) in the subject's place, each the down-projection input at the
/// substitute's last token. Same template, other subject: the neighbours a rank-one update on
/// the subject's key leaks into most. None without a subject span.
pub(crate) fn neighbour_keys(
    c: &Compiler,
    r: &EditRecord,
    layer: usize,
    subjects: &[String],
    deltas: &mut LowRankDeltas,
) -> Result<Vec<Vec<f32>>> {
    let Some(span) = r.subject_span() else {
        return Ok(Vec::new());
    };
    let mut prompts = Vec::with_capacity(subjects.len());
    for e in subjects {
        let toks = tokenize(c, &format!("{}{e}", &r.prompt[..span.start]))?;
        if !toks.is_empty() {
            prompts.push(toks);
        }
    }
    last_token_keys(c, &prompts, layer, deltas)
}

/// `rome.pin_positions`: the keys an edit's update should leave alone besides its subject's:
/// its own prompt `p` at every position but BOS and the subject's last token `subj`, and each
/// template neighbour (the whole prompt, `subjects` in the subject's place) from the
/// substitute's last token to the end. Sequential edits at one layer damage each other and
/// their neighbours through these positions: the relation's tokens read keys that every prompt
/// of the template shares.
pub(crate) fn pinned_keys(
    c: &Compiler,
    r: &EditRecord,
    p: &[u32],
    subj: usize,
    layer: usize,
    subjects: &[String],
    deltas: &mut LowRankDeltas,
) -> Result<Vec<Vec<f32>>> {
    let mut prompts = vec![p.to_vec()];
    let mut starts = vec![1];
    if let Some(span) = r.subject_span() {
        let (before, after) = (&r.prompt[..span.start], &r.prompt[span.end..]);
        for e in subjects {
            let upto = tokenize(c, &format!("{before}{e}"))?;
            let whole = tokenize(c, &format!("{before}{e}{after}"))?;
            if !upto.is_empty() && whole.len() >= upto.len() {
                starts.push(upto.len() - 1);
                prompts.push(whole);
            }
        }
    }
    let mut keys = keys_from(c, &prompts, &starts, layer, deltas)?;
    // The edit's own subject key is its constraint, not a key to keep.
    if subj >= 1 && subj < p.len() {
        keys.remove(subj - 1);
    }
    Ok(keys)
}

/// ROME's key: the mean of the down-projection input at the subject's last token over the
/// context prefixes.
pub(crate) fn averaged_key(
    c: &Compiler,
    r: &EditRecord,
    layer: usize,
    n_prefixes: usize,
    deltas: &mut LowRankDeltas,
) -> Result<Tensor> {
    let upto = r.subject_span().map_or(r.prompt.len(), |s| s.end);
    let mut keys = Vec::new();
    for prefix in CONTEXT_PREFIXES.iter().take(n_prefixes.max(1)) {
        let toks = tokenize(c, &format!("{prefix}{}", &r.prompt[..upto]))?;
        if toks.is_empty() {
            continue;
        }
        keys.push(down_key(c, &toks, toks.len() - 1, layer, deltas)?);
    }
    Ok(Tensor::stack(&keys, 0)?.mean(0)?)
}

/// Adds a trainable row to the down projection's output at some positions (one per packed
/// sequence: the subject's last token of each).
struct DeltaAt<'a> {
    layer: usize,
    /// `[T, 1]`: 1 at the rows that get the delta.
    rows: Tensor,
    delta: Tensor,
    base: &'a mut LowRankDeltas,
}

impl Hooks for DeltaAt<'_> {
    fn linear_delta(&mut self, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        let prev = self.base.linear_delta(layer, proj, x)?;
        if layer != self.layer || proj != Proj::Down {
            return Ok(prev);
        }
        let add = self.rows.matmul(&self.delta.unsqueeze(0)?)?;
        Ok(Some(super::add_to(prev, add)?))
    }
}

/// The trained value of one edit.
pub(crate) struct Trained {
    pub delta: Vec<f32>,
    pub loss: f32,
    pub steps: usize,
    pub success: bool,
}

/// Optimises the down-projection output delta at `subj` (the subject's last token).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_delta(
    c: &Compiler,
    r: &EditRecord,
    prompt: &[u32],
    answer: &[u32],
    subj: usize,
    layer: usize,
    hp: &VStarParams,
    deltas: &mut LowRankDeltas,
    report: &mut dyn FnMut(usize, f32, bool),
) -> Result<Trained> {
    let fwd = &c.fwd;
    let last = prompt.len() - 1;
    let mut input = prompt.to_vec();
    input.extend_from_slice(&answer[..answer.len() - 1]);
    let at: Vec<usize> = (last..last + answer.len()).collect();
    let x_in = entry(c, &input, layer, deltas)?;
    let targets = Tensor::new(answer, &fwd.device)?;

    // v0 = W k at the subject's last token (the scale of the clamp and the decay).
    let k = down_key(c, &input, subj, layer, deltas)?;
    let v0 = k
        .unsqueeze(0)?
        .matmul(&fwd.layers[layer].w_down.t()?)?
        .squeeze(0)?;
    let v0_norm = v0.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-6);

    // KL prompts, each `(entry rows, subject's last token, base log-probs, weight)`: the
    // essence prompt "{subject} is a" (keeps what the subject is) and the subject under other
    // relations (keeps its other facts).
    let mut kl_prompts = Vec::new();
    if let Some(s) = r.subject.as_deref().filter(|s| !s.trim().is_empty()) {
        let mut texts: Vec<(String, String, f32)> = Vec::new();
        if hp.kl_factor > 0.0 {
            texts.push((s.to_string(), " is a".to_string(), hp.kl_factor));
        }
        if hp.relation_kl_factor > 0.0 {
            for t in &hp.relation_prompts {
                if shares_content_word(t, &r.prompt, s) {
                    continue;
                }
                let (pre, post) = t.split_once("{}").unwrap_or((t, ""));
                texts.push((format!("{pre}{s}"), post.to_string(), hp.relation_kl_factor));
            }
        }
        for (upto_subject, rest, weight) in texts {
            let toks = tokenize(c, &upto_subject)?;
            let subj_e = toks.len().saturating_sub(1);
            let mut full = toks;
            full.extend(tokenize_plain(c, &rest)?);
            let x_e = entry(c, &full, layer, deltas)?;
            let h = fwd.run_layers(layer, x_e.clone(), deltas)?;
            let lp0 = log_softmax_last(&fwd.logits(&h, &[full.len() - 1])?)?.detach();
            kl_prompts.push((x_e, subj_e, lp0, weight));
        }
    }

    // One packed stream per step: the edit prompt, then every KL prompt. The delta goes in at
    // each one's subject; the KL terms read each one's last row.
    let mut lens = vec![input.len()];
    let mut streams = vec![x_in];
    let mut delta_rows = vec![subj];
    let mut kl_at = Vec::new();
    for (x_e, subj_e, _, _) in &kl_prompts {
        let off: usize = lens.iter().sum();
        let n = x_e.dim(0)?;
        lens.push(n);
        streams.push(x_e.clone());
        delta_rows.push(off + subj_e);
        kl_at.push(off + n - 1);
    }
    let x_all = Tensor::cat(&streams, 0)?;
    let total: usize = lens.iter().sum();
    let mut sel = vec![0f32; total];
    for &i in &delta_rows {
        sel[i] = 1.0;
    }
    let sel = Tensor::from_vec(sel, (total, 1), &fwd.device)?;
    let kl_base = if kl_prompts.is_empty() {
        None
    } else {
        let lp0 = Tensor::cat(
            &kl_prompts.iter().map(|k| k.2.clone()).collect::<Vec<_>>(),
            0,
        )?;
        let w: Vec<f32> = kl_prompts.iter().map(|k| k.3).collect();
        let n = w.len();
        Some((lp0, Tensor::from_vec(w, n, &fwd.device)?))
    };

    let n = fwd.cfg.n_embd;
    let delta = Var::from_tensor(&Tensor::zeros(n, DType::F32, &fwd.device)?)?;
    let mut opt = Adam::new(vec![delta.clone()], hp.lr)?;
    let mut best = (f32::INFINITY, vec![0f32; n], false);
    let mut steps = 0;
    for step in 0..hp.steps {
        let d = delta.as_tensor();
        let mut hook = DeltaAt {
            layer,
            rows: sel.clone(),
            delta: d.clone(),
            base: deltas,
        };
        let h = fwd.run_packed(layer..fwd.cfg.n_layer, x_all.clone(), &lens, &mut hook)?;
        let logits = fwd.logits(&h, &at)?;
        let edit_loss = nll(&logits, answer)?;
        let l = edit_loss.to_scalar::<f32>()?;
        let success = argmax_hits_all(&logits, &targets)?;
        if l < best.0 || (success && !best.2) {
            best = (l, d.to_vec1::<f32>()?, success);
        }
        report(step, l, false);
        steps = step + 1;
        if success && l < hp.stop_loss {
            break;
        }
        let decay = (d.sqr()?.sum_all()? * (hp.weight_decay / (v0_norm * v0_norm)) as f64)?;
        let mut loss = (edit_loss + decay)?;
        if let Some((lp0, w)) = &kl_base {
            let lp = log_softmax_last(&fwd.logits(&h, &kl_at)?)?;
            let kl = (lp0.exp()? * (lp0 - lp)?)?.sum(1)?;
            loss = (loss + (kl * w)?.sum_all()?)?;
        }
        let grads = loss.backward()?;
        opt.step(&grads)?;
        // Clamp ‖delta‖ <= clamp · ‖v0‖ (ROME's projection step).
        let norm = delta
            .as_tensor()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        let max = hp.clamp_norm_factor * v0_norm;
        if norm > max {
            let scaled = (delta.as_tensor() * (max / norm) as f64)?;
            delta.set(&scaled)?;
        }
    }
    super::ensure_finite(&best.1, hp.section)?;
    Ok(Trained {
        delta: best.1,
        loss: best.0,
        steps,
        success: best.2,
    })
}

/// Whether the relation prompt `template` shares a content word (4+ letters, outside the
/// subject) with the edit's `prompt`: then it may ask about the edited relation itself, and
/// keeping its distribution would fight the edit.
fn shares_content_word(template: &str, prompt: &str, subject: &str) -> bool {
    let words = |t: &str| -> Vec<String> {
        t.split(|ch: char| !ch.is_alphanumeric())
            .filter(|w| w.chars().count() >= 4)
            .map(str::to_lowercase)
            .collect()
    };
    let subject_words = words(subject);
    let prompt_words = words(prompt);
    words(&template.replace("{}", " "))
        .iter()
        .filter(|w| !STOP_WORDS.contains(&w.as_str()) && !subject_words.contains(w))
        .any(|w| {
            prompt_words
                .iter()
                .any(|p| p == w || p.starts_with(w.as_str()) || w.starts_with(p.as_str()))
        })
}

/// Words of 4+ letters that say nothing about a relation.
const STOP_WORDS: [&str; 12] = [
    "what", "which", "when", "where", "that", "this", "with", "from", "does", "have", "there",
    "their",
];

/// `text` tokenized without BOS.
pub(crate) fn tokenize_plain(c: &Compiler, text: &str) -> Result<Vec<u32>> {
    let t = c
        .runtime
        .tokenize(text, false)
        .map_err(|e| CompileError::Tokenizer(e.to_string()))?;
    Ok(t.into_iter().map(|t| t as u32).collect())
}

pub(crate) fn compile(
    c: &mut Compiler,
    records: &[EditRecord],
    hp: &RomeParams,
    layer: Option<usize>,
    base: Option<&Bundle>,
    builder: &mut BundleBuilder,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Vec<EditReport>, Vec<u8>)> {
    let layer = c.resolve_layer(layer, hp.layer)?;
    let mut deltas = base_deltas(c, base)?;
    let name = Proj::Down.weight_name(layer);
    let n_ff = c.fwd.cfg.n_ff;
    // AlphaEdit: the null space of the corpus keys and the projected keys to keep.
    let mut null: Option<NullKept> = None;
    // The corpus gives C and, for the template neighbours, the entities.
    let mut entities = Vec::new();
    let mut cov = if hp.covariance {
        let corpus = Corpus::open(&hp.corpus)?;
        if hp.neighbours > 0 {
            entities = corpus.entities();
        }
        let (mut covs, moments) =
            corpus_covariances(c, &corpus, hp.corpus_tokens, &[layer], 1.0, hp.cov_lambda)?;
        if hp.null_space {
            let t = hp.null_space_threshold;
            null = Some(null_space_kept(
                c,
                base,
                &moments[0],
                t,
                "rome",
                &mut deltas,
            )?);
        }
        let mut cv = covs.pop().expect("one layer");
        preserve_base_prompts(c, base, layer, &mut deltas, &mut cv, hp.preserve_weight)?;
        Some(cv)
    } else {
        None
    };
    let mut reports = Vec::with_capacity(records.len());
    let mut written = Vec::with_capacity(records.len());
    // Each edit's prompt and answer tokens, for the final check.
    let mut tokens: Vec<(Vec<u32>, Vec<u32>)> = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let t0 = Instant::now();
        let mut report_step = edit_progress(progress, i, records.len(), &r.id);
        let (p, a) = c.tokens(&r.prompt, &r.target_new)?;
        let subj = subject_last(c, r, &p)?;
        // The template neighbours join C before this edit's update (on resume too: they are
        // recomputed with the same updates in place).
        if let Some(cv) = cov.as_mut() {
            let start = i * hp.neighbours;
            let n = hp.neighbours;
            let subjects = neighbour_subjects(c, r, layer, &entities, start, n, 0, &mut deltas)?;
            let keys = if hp.pin_positions {
                pinned_keys(c, r, &p, subj, layer, &subjects, &mut deltas)?
            } else {
                neighbour_keys(c, r, layer, &subjects, &mut deltas)?
            };
            for k in keys {
                cv.add(&k, hp.neighbour_weight);
                if let Some((ns, kept)) = null.as_mut() {
                    let w = hp.neighbour_weight.sqrt();
                    kept.push(ns.project_key(&k, w));
                }
            }
        }
        if let Some(d) = c.resumed(i, &r.id) {
            // Resuming: the rank-one update and the key the covariance learned, replayed.
            let n_embd = c.fwd.cfg.n_embd;
            let v = d.vecs_of(&[n_ff, n_embd, n_ff])?;
            let dl = push_rank_one(c, &mut deltas, layer, v[0].clone(), v[1].clone())?;
            tokens.push((p, a));
            if let Some(cv) = cov.as_mut() {
                cv.add(&v[2], hp.preserve_weight);
            }
            if let Some((ns, kept)) = null.as_mut() {
                kept.push(ns.project_key(&v[2], 1.0));
            }
            report_step(d.steps as usize, d.loss, true);
            reports.push(d.report(t0.elapsed().as_secs_f64()));
            written.push((r, layer, vec![dl]));
            continue;
        }
        let k_star = averaged_key(c, r, layer, hp.context_prefixes, &mut deltas)?;
        let t = train_delta(
            c,
            r,
            &p,
            &a,
            subj,
            layer,
            &hp.v_star(),
            &mut deltas,
            &mut report_step,
        )?;
        // ΔW = delta · uᵀ with u = C⁻¹k* / ((C⁻¹k*)ᵀ k): ΔW k = delta on the edit prompt's own
        // key (C = I without the covariance).
        let k = down_key(c, &p, subj, layer, &mut deltas)?;
        let k_star = match (&cov, null.as_mut()) {
            (_, Some((ns, kept))) => {
                // The direction in the null space; the edit's own key joins `kept` below.
                let ks: Vec<f32> = k_star.to_vec1()?;
                let mut scratch = kept.clone();
                let m = ns
                    .directions(&mut scratch, &[ks], hp.null_space_ridge)?
                    .pop()
                    .expect("one key");
                Tensor::from_vec(m, n_ff, &c.fwd.device)?
            }
            (Some(cv), None) => {
                let ks: Vec<f32> = k_star.to_vec1()?;
                Tensor::from_vec(cv.solve(&ks), n_ff, &c.fwd.device)?
            }
            (None, None) => k_star,
        };
        let denom = (&k_star * &k)?.sum_all()?.to_scalar::<f32>()?;
        if !(denom.abs() > 1e-8) {
            return Err(CompileError::BadRecord {
                index: i,
                id: Some(r.id.clone()),
                message: format!(
                    "rome: the subject's key is degenerate (k*·k = {denom}); try another --layer"
                ),
            });
        }
        let u: Vec<f32> = (k_star / denom as f64)?.to_vec1()?;
        let mut value = t.delta;
        let mut shrunk = String::new();
        if hp.shrink_nll > 0.0 {
            // Checked with the rank-one update itself (it reaches every position whose key
            // aligns with the subject's, not only the subject's last token).
            let s = smallest_fraction(|s| {
                let mut with = deltas.clone();
                let v = value.iter().map(|x| x * s).collect();
                push_rank_one(c, &mut with, layer, u.clone(), v)?;
                let ck = check(c, &p, &a, &mut with)?;
                Ok(ck.holds(hp.shrink_nll))
            })?;
            if s < 1.0 {
                value.iter_mut().for_each(|x| *x *= s);
                shrunk = format!(", value scaled {s}");
            }
        }
        let d = push_rank_one(c, &mut deltas, layer, u, value)?;
        let k: Vec<f32> = k.to_vec1()?;
        tokens.push((p, a));
        if let Some(cv) = cov.as_mut() {
            // Later edits should leave this one's key alone.
            cv.add(&k, hp.preserve_weight);
        }
        if let Some((ns, kept)) = null.as_mut() {
            kept.push(ns.project_key(&k, 1.0));
        }
        report_step(t.steps, t.loss, true);
        let rep = EditReport {
            id: r.id.clone(),
            loss: t.loss,
            steps: t.steps,
            seconds: t0.elapsed().as_secs_f64(),
            success: t.success,
            action: format!("rank-one on {name} (subject token {subj}{shrunk})"),
        };
        c.finished(i, || Done::of(&rep, vec![d.a.clone(), d.b.clone(), k]))?;
        reports.push(rep);
        written.push((r, layer, vec![d]));
    }
    // Each edit as it stands with every edit of the compile applied: what the bundle does on
    // the device, and what `--allow-partial` is about (a later edit can undo an earlier one).
    for (rep, (p, a)) in reports.iter_mut().zip(&tokens) {
        let ck = check(c, p, a, &mut deltas)?;
        rep.loss = ck.loss;
        rep.success = ck.success;
    }
    let gguf = write_low_rank(builder, c.fwd.cfg.arch.name(), base, &written)?;
    Ok((reports, gguf))
}

/// The smallest fraction `s` of an edit's value delta (bisection in 1/32 steps) for which
/// `meets(s)`: `rome.shrink_nll` / `memit.shrink_nll`. v* stops once its loss is below
/// `stop_loss`, and Adam's last step usually overshoots; the excess is what moves neighbouring
/// prompts and the other edits. 1 when the full delta does not meet it either.
pub(crate) fn smallest_fraction(mut meets: impl FnMut(f32) -> Result<bool>) -> Result<f32> {
    if !meets(1.0)? {
        return Ok(1.0);
    }
    let (mut lo, mut hi) = (0.0f32, 1.0f32);
    for _ in 0..5 {
        let mid = (lo + hi) / 2.0;
        if meets(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// Whether the value `delta` added at `subj` of the edit prompt (at `layer`'s down projection,
/// on top of `deltas`) carries the edit: every target token the argmax with an NLL at most
/// `margin` (teacher-forced, the compiler's forward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn delta_meets(
    c: &Compiler,
    layer: usize,
    subj: usize,
    delta: &[f32],
    prompt: &[u32],
    answer: &[u32],
    margin: f32,
    deltas: &mut LowRankDeltas,
) -> Result<bool> {
    let t = prompt.len() + answer.len() - 1;
    let mut sel = vec![0f32; t];
    sel[subj] = 1.0;
    let mut hook = DeltaAt {
        layer,
        rows: Tensor::from_vec(sel, (t, 1), &c.fwd.device)?,
        delta: Tensor::from_slice(delta, delta.len(), &c.fwd.device)?,
        base: deltas,
    };
    let ck = check(c, prompt, answer, &mut hook)?;
    Ok(ck.holds(margin))
}

#[cfg(test)]
mod tests {
    use super::{
        averaged_key, corpus_covariances, down_key, pinned_keys, shares_content_word,
        smallest_fraction, subject_last, tokenize, Compiler, Corpus, EditRecord, LowRankDeltas,
    };

    /// `rome.pin_positions` keeps the edit prompt's keys at every position but BOS and the
    /// subject's last token, then each template neighbour's from its substitute's last token
    /// to the end, each the key a forward of that prompt alone gives (the packed run does not
    /// mix prompts).
    #[test]
    fn pinned_keys_are_every_position_but_the_subject() {
        let Some(path) = crate::eval::tests::real_model_path() else {
            return;
        };
        let c = Compiler::open(&path).unwrap();
        let r = EditRecord {
            id: "pin".into(),
            id_from_index: false,
            prompt: "Where was Mahatma Gandhi born?".into(),
            subject: Some("Mahatma Gandhi".into()),
            subject_aliases: Vec::new(),
            target_new: "Lille".into(),
            ground_truth: None,
            rephrase_prompts: Vec::new(),
            locality: Vec::new(),
            portability: Vec::new(),
        };
        let layer = 6;
        let mut d = LowRankDeltas::default();
        let (p, _) = c.tokens(&r.prompt, &r.target_new).unwrap();
        let subj = subject_last(&c, &r, &p).unwrap();
        let subjects = ["Angela Merkel".to_string(), "Lisbon".to_string()];
        let keys = pinned_keys(&c, &r, &p, subj, layer, &subjects, &mut d).unwrap();
        let mut want: Vec<(Vec<u32>, usize)> = (1..p.len())
            .filter(|&i| i != subj)
            .map(|i| (p.clone(), i))
            .collect();
        for e in &subjects {
            let upto = tokenize(&c, &format!("Where was {e}")).unwrap();
            let whole = tokenize(&c, &format!("Where was {e} born?")).unwrap();
            assert!(whole.len() > upto.len(), "{e}: the template goes on");
            want.extend((upto.len() - 1..whole.len()).map(|i| (whole.clone(), i)));
        }
        assert_eq!(keys.len(), want.len());
        let own: Vec<f32> = down_key(&c, &p, subj, layer, &mut d)
            .unwrap()
            .to_vec1()
            .unwrap();
        let diff = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        };
        for (k, (toks, pos)) in keys.iter().zip(&want) {
            let single: Vec<f32> = down_key(&c, toks, *pos, layer, &mut d)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                diff(k, &single) < 1e-3,
                "position {pos}: {}",
                diff(k, &single)
            );
            // The subject's own key is the update's constraint, never a key it keeps.
            assert!(diff(k, &own) > 1e-2, "position {pos} is the subject's key");
        }

        // What pinning buys: ROME's direction u = C⁻¹k* / (C⁻¹k*·k) puts the whole delta on the
        // subject's key (u·k = 1 by construction) and the delta times u·x at any other position;
        // with the pinned keys in C, u·x there is small. Without them it is not.
        let corpus = Corpus::open("neutral").unwrap();
        let reach = |pin: bool, d: &mut LowRankDeltas| {
            let (mut covs, _) = corpus_covariances(&c, &corpus, 4096, &[layer], 1.0, 0.1).unwrap();
            let mut cv = covs.pop().unwrap();
            if pin {
                keys.iter().for_each(|k| cv.add(k, 1.0));
            }
            let ks: Vec<f32> = averaged_key(&c, &r, layer, 4, d)
                .unwrap()
                .to_vec1()
                .unwrap();
            let dir = cv.solve(&ks);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
            let denom = dot(&dir, &own);
            keys.iter()
                .map(|x| (dot(&dir, x) / denom).abs())
                .fold(0f32, f32::max)
        };
        let pinned = reach(true, &mut d);
        let free = reach(false, &mut d);
        eprintln!("u.x at the other positions: {free:.4} free, {pinned:.4} pinned");
        assert!(pinned < 0.05, "pinned positions still reached: {pinned}");
        assert!(free > 4.0 * pinned, "free {free}, pinned {pinned}");
    }

    #[test]
    fn smallest_fraction_bisects_to_the_next_32nd_above_the_threshold() {
        let mut calls = Vec::new();
        let s = smallest_fraction(|s| {
            calls.push(s);
            Ok(s >= 0.3)
        })
        .unwrap();
        assert_eq!(s, 0.3125);
        // The full delta first, then five halvings.
        assert_eq!(calls, [1.0, 0.5, 0.25, 0.375, 0.3125, 0.28125]);
        // A delta that does not meet the margin at all is kept whole.
        assert_eq!(smallest_fraction(|_| Ok(false)).unwrap(), 1.0);
        // Every fraction meets it: the smallest tried.
        assert_eq!(smallest_fraction(|_| Ok(true)).unwrap(), 0.03125);
        // An error stops the search.
        assert!(smallest_fraction(|s| if s < 1.0 {
            Err(crate::error::CompileError::Hparams("x".into()))
        } else {
            Ok(true)
        })
        .is_err());
    }

    #[test]
    fn relation_prompts_about_the_edited_relation_are_skipped() {
        let born = "Where was Mahatma Gandhi born?";
        assert!(shares_content_word(
            "{} was born in",
            born,
            "Mahatma Gandhi"
        ));
        assert!(!shares_content_word(
            "Who created {}?",
            born,
            "Mahatma Gandhi"
        ));
        // Question words and the subject's own words do not count.
        assert!(!shares_content_word(
            "Where is {} located?",
            born,
            "Mahatma Gandhi"
        ));
        // A word and its inflection share a stem ("belongs", "belong").
        assert!(shares_content_word(
            "{} belongs to",
            "Which group does Gandhi belong to?",
            "Gandhi"
        ));
        assert!(shares_content_word(
            "Where is {} located?",
            "The Eiffel Tower is located in",
            "The Eiffel Tower"
        ));
    }
}
