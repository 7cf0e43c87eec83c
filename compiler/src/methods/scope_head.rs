//! The trained scope head: a small ensemble of perceptrons that decides whether a query is about
//! a memory record, from the scope model's features of the pair
//! ([`amend_edits::families::ScopeHead`]). The cosine thresholds alone cannot tell a rephrase
//! ("When did the PlayStation first come out?") from the same subject under another relation
//! ("Which company makes the PlayStation?"); a head trained on labelled pairs separates them
//! better (docs/eval.md).
//!
//! Training (`amend scope-model train-head`) is offline, on a labelled data set that is *not*
//! what the head is evaluated on: positives are each record's prompt and rephrases against the
//! record, negatives every other (probe, candidate) pair the router would examine, locality
//! probes included. The decision threshold is chosen on out-of-fold scores (records split into
//! folds), never on the training fit. The head is a file (safetensors) bound to the scope
//! model's fingerprint; `amend compile --method serac` copies it into the bundle.

use std::collections::BTreeMap;

use amend_edits::families::{dot, subject_relation_rest, ScopeHead};
use amend_runtime::ScopeModel;
use candle_core::{DType, Device, Tensor, Var};

use super::optim::Adam;
use super::scope_routing::{encode_record, RecordRouting};
use crate::dataset::synthetic::Rng;
use crate::dataset::EditRecord;
use crate::error::{CompileError, Result};

/// The head the project ships: trained by the command its `trained_with` metadata holds (the
/// data files' sha256 beside it, [`HeadFile::provenance`]) against the default scope model (the
/// tuned all-MiniLM-L6-v2 Q8_0).
pub const BUILTIN: &[u8] = include_bytes!("../../../data/scope-head.safetensors");

/// A head as stored: weights `[members * hidden, features + 2]` (input weights, bias, output
/// weight per hidden unit, standardization folded in), output biases, threshold, and the
/// fingerprint of the scope model its features come from.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadFile {
    pub embed_dim: usize,
    pub members: usize,
    pub hidden: usize,
    pub weights: Vec<f32>,
    pub out_bias: Vec<f32>,
    pub threshold: f32,
    pub scope_fingerprint: [u8; 32],
    /// How the head was made, as `amend scope-model train-head` records it (`trained_with`: the
    /// command; `data_sha256` and `calibrate_sha256`: `sha256  file name` lines), so a shipped
    /// head can be traced to its recipe and rebuilt. Not read by routing, not copied into
    /// bundles.
    pub provenance: BTreeMap<String, String>,
}

/// Metadata keys a head file holds for routing; any other key is [`HeadFile::provenance`].
const ROUTING_KEYS: [&str; 4] = ["embed_dim", "members", "hidden", "scope_fingerprint"];

/// Longest provenance value kept (a command line, a few dozen hash lines).
pub const MAX_PROVENANCE_LEN: usize = 64 << 10;

/// The head `serac.scope_head` names: "builtin" (the shipped head), "none" (the cosine
/// thresholds alone), or a path. A head trained on another scope model is refused.
pub fn load(
    which: &str,
    scope_fingerprint: [u8; 32],
    embed_dim: usize,
) -> Result<Option<HeadFile>> {
    let h = match which {
        "none" => return Ok(None),
        "builtin" => HeadFile::parse(BUILTIN)?,
        path => {
            let bytes = amend_edits::fsutil::read_regular(std::path::Path::new(path), 64 << 20)
                .map_err(|e| bad(format!("serac.scope_head {path}: {e}")))?;
            HeadFile::parse(&bytes)?
        }
    };
    if h.scope_fingerprint != scope_fingerprint || h.embed_dim != embed_dim {
        return Err(bad(format!(
            "serac.scope_head {which:?} was trained on scope model {} but this compile uses {}; retrain it (amend scope-model train-head) or set serac.scope_head = \"none\"",
            amend_edits::keys::to_hex(&h.scope_fingerprint),
            amend_edits::keys::to_hex(&scope_fingerprint)
        )));
    }
    Ok(Some(h))
}

fn bad(what: impl Into<String>) -> CompileError {
    CompileError::Hparams(format!("scope head: {}", what.into()))
}

impl HeadFile {
    /// Parse and validate (shapes, finiteness, bounds: the checks the bundle readers make).
    pub fn parse(bytes: &[u8]) -> Result<HeadFile> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| bad(format!("metadata {k} missing")))
        };
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse()
                .map_err(|_| bad(format!("metadata {k} not a number")))
        };
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("tensor {name} missing")))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("tensor {name} is not f32")));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let fp_hex = get("scope_fingerprint")?;
        // 64 hex characters (a 32-byte text would pass as raw bytes: refuse it first).
        if fp_hex.len() != 64 {
            return Err(bad("scope_fingerprint is not 64 hex characters"));
        }
        let fp = amend_edits::keys::decode_key_bytes(fp_hex.as_bytes())
            .map_err(|_| bad("scope_fingerprint is not 64 hex characters"))?;
        let threshold = f32s("threshold")?;
        let h = HeadFile {
            embed_dim: num("embed_dim")?,
            members: num("members")?,
            hidden: num("hidden")?,
            weights: f32s("weights")?,
            out_bias: f32s("out_bias")?,
            threshold: *threshold.first().ok_or_else(|| bad("threshold is empty"))?,
            scope_fingerprint: fp,
            provenance: md
                .iter()
                .filter(|(k, _)| !ROUTING_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        if let Some((k, v)) = h
            .provenance
            .iter()
            .find(|(_, v)| v.len() > MAX_PROVENANCE_LEN)
        {
            return Err(bad(format!(
                "metadata {k:?} is {} bytes, at most {MAX_PROVENANCE_LEN}",
                v.len()
            )));
        }
        h.family().map_err(|e| bad(e.0))?;
        Ok(h)
    }

    /// The family view (validates).
    pub fn family(
        &self,
    ) -> std::result::Result<ScopeHead<'_>, amend_edits::families::InvalidPayload> {
        ScopeHead::new(
            self.embed_dim,
            self.members,
            self.hidden,
            &self.weights,
            &self.out_bias,
            self.threshold,
        )
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (w, b, t) = (le(&self.weights), le(&self.out_bias), le(&[self.threshold]));
        let f = ScopeHead::n_features(self.embed_dim) + 2;
        fn view(shape: Vec<usize>, data: &[u8]) -> Result<safetensors::tensor::TensorView<'_>> {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, data)
                .map_err(|e| bad(e.to_string()))
        }
        let tensors = vec![
            ("weights", view(vec![self.members * self.hidden, f], &w)?),
            ("out_bias", view(vec![self.members], &b)?),
            ("threshold", view(vec![1], &t)?),
        ];
        if let Some(k) = self
            .provenance
            .keys()
            .find(|k| ROUTING_KEYS.contains(&k.as_str()))
        {
            return Err(bad(format!("provenance key {k:?} is a routing key")));
        }
        let mut md: BTreeMap<String, String> = self.provenance.clone();
        md.extend([
            ("embed_dim".to_string(), self.embed_dim.to_string()),
            ("members".to_string(), self.members.to_string()),
            ("hidden".to_string(), self.hidden.to_string()),
            (
                "scope_fingerprint".to_string(),
                amend_edits::keys::to_hex(&self.scope_fingerprint),
            ),
        ]);
        let tensors = tensors
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        crate::artifact::serialize(tensors, md).map_err(bad)
    }
}

/// Labelled pairs: features `[n, n_features]`, label, which probe each pair belongs to, and per
/// probe its kind ("edit", "rephrase" or a locality kind) and whether the pair is the record's own.
pub struct Pairs {
    pub n_features: usize,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub probe: Vec<usize>,
    pub own: Vec<bool>,
    pub probe_kind: Vec<String>,
    pub probe_record: Vec<usize>,
}

/// Every (probe, candidate) pair the router examines: for each record's prompt, rephrases and
/// locality prompts, the [`amend_edits::families::Memory::ROUTE_CANDIDATES`] records nearest by
/// pooled cosine, plus the probe's own record. Positive: a prompt or rephrase against its own
/// record. Records need a subject that occurs in the prompt.
pub fn pairs(scope: &ScopeModel, records: &[EditRecord]) -> Result<Pairs> {
    let d = scope.n_embd();
    let rr: Vec<RecordRouting> = records
        .iter()
        .map(|r| {
            let s = r.subject.as_deref().unwrap_or_default();
            encode_record(scope, &r.prompt, s)
        })
        .collect::<Result<_>>()?;
    let nf = ScopeHead::n_features(d);
    let mut p = Pairs {
        n_features: nf,
        x: Vec::new(),
        y: Vec::new(),
        probe: Vec::new(),
        own: Vec::new(),
        probe_kind: Vec::new(),
        probe_record: Vec::new(),
    };
    let (mut rest, mut feat) = (Vec::new(), Vec::new());
    for (ri, r) in records.iter().enumerate() {
        let mut probes: Vec<(&str, &str)> = vec![("edit", &r.prompt)];
        probes.extend(r.rephrase_prompts.iter().map(|q| ("rephrase", q.as_str())));
        probes.extend(
            r.locality
                .iter()
                .map(|l| (l.kind.as_str(), l.prompt.as_str())),
        );
        for (kind, prompt) in probes {
            let q = scope
                .encode(prompt)
                .map_err(|e| CompileError::Runtime(e.to_string()))?;
            let mut cands: Vec<(f32, usize)> = rr
                .iter()
                .enumerate()
                .map(|(i, c)| (dot(&c.pooled, &q.pooled), i))
                .collect();
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            cands.truncate(amend_edits::families::Memory::ROUTE_CANDIDATES);
            if !cands.iter().any(|c| c.1 == ri) {
                cands.push((dot(&rr[ri].pooled, &q.pooled), ri));
            }
            let pi = p.probe_kind.len();
            p.probe_kind.push(kind.to_string());
            p.probe_record.push(ri);
            for (pooled, ci) in cands {
                let c = &rr[ci];
                let (subject, relation) =
                    subject_relation_rest(&c.subject_rows, &c.relation, &q.rows, d, &mut rest);
                ScopeHead::features(
                    pooled,
                    subject,
                    relation,
                    &rest,
                    &c.relation,
                    &q.pooled,
                    &c.pooled,
                    &mut feat,
                );
                p.x.extend_from_slice(&feat);
                let positive = ci == ri && matches!(kind, "edit" | "rephrase");
                p.y.push(positive as u8 as f32);
                p.probe.push(pi);
                p.own.push(ci == ri);
            }
        }
    }
    Ok(p)
}

/// Most epochs a head trains (the default is 60, a few minutes): more is a typo that would run
/// for days, not a choice.
pub const MAX_EPOCHS: usize = 10_000;

/// Training options. The defaults are what the shipped head was trained with.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub members: usize,
    pub hidden: usize,
    /// L2 penalty on the weights (per pair, as scikit-learn's `alpha / n`).
    pub l2: f64,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Folds (by record) for the out-of-fold scores the threshold is chosen on.
    pub folds: usize,
    /// The threshold is the lowest whose out-of-fold locality (probes routed nowhere) reaches
    /// this percentage.
    pub target_locality: f64,
    pub seed: u64,
}

impl TrainOptions {
    /// Checks the options before any work. Errors name the CLI's flags and their ranges.
    pub fn check(&self) -> Result<()> {
        let out = |f: &str, v: &dyn std::fmt::Display, range: &str| {
            Err(bad(format!("--{f} {v} is outside {range}")))
        };
        if self.members == 0 || self.members > ScopeHead::MAX_MEMBERS {
            return out(
                "members",
                &self.members,
                &format!("1..={}", ScopeHead::MAX_MEMBERS),
            );
        }
        if self.hidden == 0 || self.hidden > ScopeHead::MAX_HIDDEN {
            return out(
                "hidden",
                &self.hidden,
                &format!("1..={}", ScopeHead::MAX_HIDDEN),
            );
        }
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            return out("epochs", &self.epochs, &format!("1..={MAX_EPOCHS}"));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return out("l2", &self.l2, "finite numbers >= 0");
        }
        // A percentage of locality probes routed nowhere: 0 or less accepts every threshold
        // (everything in scope), above 100 none.
        if !(self.target_locality > 0.0 && self.target_locality <= 100.0) {
            return out(
                "target-locality",
                &self.target_locality,
                "(0, 100] (percent)",
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) || self.batch == 0 {
            return Err(bad("lr must be finite and positive, batch positive"));
        }
        Ok(())
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            members: 4,
            hidden: 32,
            l2: 0.3,
            epochs: 60,
            batch: 256,
            lr: 1e-3,
            folds: 5,
            target_locality: 98.5,
            seed: 1,
        }
    }
}

/// What training reports: the out-of-fold figures at the chosen threshold.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub pairs: usize,
    pub positives: usize,
    pub threshold: f32,
    /// Whether the threshold was chosen on calibration records (the two rates below are
    /// theirs) rather than out of fold.
    pub calibrated: bool,
    /// Out of fold (or on the calibration records): rephrases routed to their own record, locality probes routed nowhere (%).
    pub oof_rephrase: f64,
    pub oof_locality: f64,
    pub seconds: f64,
}

/// One member: returns its rows (`[hidden, nf + 2]`, on standardized inputs) and output bias.
fn train_member(
    x: &[f32],
    y: &[f32],
    nf: usize,
    o: &TrainOptions,
    seed: u64,
) -> Result<(Vec<f32>, f32)> {
    let dev = Device::Cpu;
    let n = y.len();
    let h = o.hidden;
    let mut rng = Rng::from_state(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // Glorot-uniform initialization, as scikit-learn's MLP.
    let a1 = (6.0 / (nf + h) as f32).sqrt();
    let a2 = (6.0 / (h + 1) as f32).sqrt();
    let w1: Vec<f32> = (0..h * nf).map(|_| rng.sym() * a1).collect();
    let w2: Vec<f32> = (0..h).map(|_| rng.sym() * a2).collect();
    let w1 = Var::from_tensor(&Tensor::from_vec(w1, (nf, h), &dev)?)?;
    let b1 = Var::from_tensor(&Tensor::zeros(h, DType::F32, &dev)?)?;
    let w2 = Var::from_tensor(&Tensor::from_vec(w2, (h, 1), &dev)?)?;
    let b2 = Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?;
    let mut opt = Adam::new(vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()], o.lr)?;
    // Balanced classes: a positive weighs as much as all negatives over all positives.
    let pos = y.iter().filter(|&&v| v > 0.5).count().max(1);
    let wpos = (n - pos) as f32 / pos as f32;
    let mut order: Vec<usize> = (0..n).collect();
    for _ in 0..o.epochs {
        for i in (1..n).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        for chunk in order.chunks(o.batch) {
            let m = chunk.len();
            let mut xb = Vec::with_capacity(m * nf);
            let (mut yb, mut wb) = (Vec::with_capacity(m), Vec::with_capacity(m));
            for &i in chunk {
                xb.extend_from_slice(&x[i * nf..(i + 1) * nf]);
                yb.push(y[i]);
                wb.push(if y[i] > 0.5 { wpos } else { 1.0 });
            }
            let xb = Tensor::from_vec(xb, (m, nf), &dev)?;
            let yb = Tensor::from_vec(yb, (m, 1), &dev)?;
            let wb = Tensor::from_vec(wb, (m, 1), &dev)?;
            let hid = xb
                .matmul(w1.as_tensor())?
                .broadcast_add(b1.as_tensor())?
                .relu()?;
            let z = hid.matmul(w2.as_tensor())?.broadcast_add(b2.as_tensor())?;
            // BCE with logits: softplus(z) - y z, computed stably.
            let sp = (z.abs()?.neg()?.exp()? + 1.0)?.log()?.add(&z.relu()?)?;
            let bce = ((sp - (&yb * &z)?)? * &wb)?.mean_all()?;
            let reg = ((w1.as_tensor().sqr()?.sum_all()? + w2.as_tensor().sqr()?.sum_all()?)?
                * (0.5 * o.l2 / n as f64))?;
            let loss = (bce + reg)?;
            opt.step(&loss.backward()?)?;
        }
    }
    let w1: Vec<Vec<f32>> = w1.as_tensor().t()?.contiguous()?.to_vec2()?;
    let b1: Vec<f32> = b1.as_tensor().to_vec1()?;
    let w2: Vec<f32> = w2.as_tensor().flatten_all()?.to_vec1()?;
    let b2 = b2.as_tensor().to_vec1::<f32>()?[0];
    let mut rows = Vec::with_capacity(h * (nf + 2));
    for j in 0..h {
        rows.extend_from_slice(&w1[j]);
        rows.push(b1[j]);
        rows.push(w2[j]);
    }
    Ok((rows, b2))
}

/// An ensemble trained on `rows` of the pairs, with the standardization folded in.
fn train_ensemble(
    p: &Pairs,
    rows: &[usize],
    o: &TrainOptions,
    embed_dim: usize,
) -> Result<HeadFile> {
    let nf = p.n_features;
    let n = rows.len();
    let mut mu = vec![0f64; nf];
    let mut sd = vec![0f64; nf];
    for &i in rows {
        for (k, v) in p.x[i * nf..(i + 1) * nf].iter().enumerate() {
            mu[k] += *v as f64;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    for &i in rows {
        for (k, v) in p.x[i * nf..(i + 1) * nf].iter().enumerate() {
            sd[k] += (*v as f64 - mu[k]).powi(2);
        }
    }
    let sd: Vec<f64> = sd.iter().map(|s| (s / n as f64).sqrt() + 1e-6).collect();
    let mut x = Vec::with_capacity(n * nf);
    let mut y = Vec::with_capacity(n);
    for &i in rows {
        x.extend(
            p.x[i * nf..(i + 1) * nf]
                .iter()
                .enumerate()
                .map(|(k, v)| ((*v as f64 - mu[k]) / sd[k]) as f32),
        );
        y.push(p.y[i]);
    }
    let mut weights = Vec::with_capacity(o.members * o.hidden * (nf + 2));
    let mut out_bias = Vec::with_capacity(o.members);
    for m in 0..o.members {
        let (mut r, b2) = train_member(&x, &y, nf, o, o.seed.wrapping_add(m as u64))?;
        // Fold (x - mu) / sd into each hidden unit: w' = w / sd, b' = b - sum(w mu / sd).
        for row in r.chunks_exact_mut(nf + 2) {
            let mut shift = 0f64;
            for k in 0..nf {
                let w = row[k] as f64 / sd[k];
                shift += w * mu[k];
                row[k] = w as f32;
            }
            row[nf] = (row[nf] as f64 - shift) as f32;
        }
        weights.extend_from_slice(&r);
        out_bias.push(b2);
    }
    Ok(HeadFile {
        embed_dim,
        members: o.members,
        hidden: o.hidden,
        weights,
        out_bias,
        threshold: 0.0,
        scope_fingerprint: [0; 32],
        provenance: BTreeMap::new(),
    })
}

/// Route every probe with per-pair scores at `threshold` (the best in-scope pair wins): the
/// rephrases reaching their own record and the locality probes routed nowhere, in percent.
pub fn route_rates(p: &Pairs, scores: &[f32], threshold: f32) -> (f64, f64) {
    let n_probes = p.probe_kind.len();
    let mut best: Vec<Option<(f32, bool)>> = vec![None; n_probes];
    for (i, &s) in scores.iter().enumerate() {
        if s >= threshold {
            let b = &mut best[p.probe[i]];
            if b.is_none_or(|(bs, _)| s > bs) {
                *b = Some((s, p.own[i]));
            }
        }
    }
    let (mut reph, mut reph_ok, mut loc, mut loc_ok) = (0, 0, 0, 0);
    for (pi, kind) in p.probe_kind.iter().enumerate() {
        match kind.as_str() {
            "edit" => {}
            "rephrase" => {
                reph += 1;
                reph_ok += matches!(best[pi], Some((_, true))) as usize;
            }
            _ => {
                loc += 1;
                loc_ok += best[pi].is_none() as usize;
            }
        }
    }
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    (pct(reph_ok, reph), pct(loc_ok, loc))
}

/// Scores of `rows` of the pairs under a head.
fn scores(
    head: &HeadFile,
    p: &Pairs,
    rows: impl Iterator<Item = usize>,
) -> Result<Vec<(usize, f32)>> {
    let fam = head.family().map_err(|e| bad(e.0))?;
    let nf = p.n_features;
    Ok(rows
        .map(|i| (i, fam.logit(&p.x[i * nf..(i + 1) * nf])))
        .collect())
}

/// The head's logit for every pair, in order.
pub fn score_pairs(head: &HeadFile, p: &Pairs) -> Result<Vec<f32>> {
    Ok(scores(head, p, 0..p.y.len())?
        .into_iter()
        .map(|x| x.1)
        .collect())
}

/// The lowest threshold at which `scores` route locality probes nowhere at least `target`% of
/// the time.
pub fn lowest_threshold(p: &Pairs, scores: &[f32], target: f64) -> Result<f32> {
    let mut cands: Vec<f32> = scores.to_vec();
    cands.sort_by(|a, b| a.total_cmp(b));
    cands.dedup();
    let (mut lo, mut hi) = (0usize, cands.len().saturating_sub(1));
    if cands.is_empty() || route_rates(p, scores, cands[hi]).1 < target {
        return Err(bad("no threshold reaches the target locality"));
    }
    // Locality rises with the threshold: bisect for the first candidate that meets the target.
    while lo < hi {
        let mid = (lo + hi) / 2;
        if route_rates(p, scores, cands[mid]).1 >= target {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(cands[lo])
}

/// Train the head on `records`. The threshold is chosen on `calibration` records when there are
/// any (routed among themselves, scored by the trained head): records neither the head nor the
/// scope model's tune saw, so the threshold is not set on a fit. Without them it is chosen on
/// out-of-fold scores (records in `folds` groups), which is optimistic when the scope model
/// was tuned on the same records.
pub fn train(
    scope: &ScopeModel,
    records: &[EditRecord],
    calibration: &[EditRecord],
    o: &TrainOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<(HeadFile, TrainReport)> {
    o.check()?;
    // Folds serve only the out-of-fold threshold: with calibration records they are unused.
    if calibration.is_empty() && (o.folds < 2 || records.len() < o.folds) {
        return Err(bad("need at least 2 folds and a record per fold"));
    }
    let t0 = std::time::Instant::now();
    let p = pairs(scope, records)?;
    let positives = p.y.iter().filter(|&&v| v > 0.5).count();
    if positives == 0 || positives == p.y.len() {
        return Err(bad("the data gives no positive or no negative pair (it needs rephrases and locality prompts)"));
    }
    progress(&format!(
        "{} pairs ({positives} positive) from {} records",
        p.y.len(),
        records.len()
    ));
    let all: Vec<usize> = (0..p.y.len()).collect();
    let d = scope.n_embd();
    if !calibration.is_empty() {
        let mut head = train_ensemble(&p, &all, o, d)?;
        let c = pairs(scope, calibration)?;
        let s = score_pairs(&head, &c)?;
        let threshold = lowest_threshold(&c, &s, o.target_locality)
            .map_err(|e| bad(format!("calibration records: {e}")))?;
        let (cal_rephrase, cal_locality) = route_rates(&c, &s, threshold);
        head.threshold = threshold;
        head.scope_fingerprint = scope.fingerprint();
        return Ok((
            head,
            TrainReport {
                pairs: p.y.len(),
                positives,
                threshold,
                calibrated: true,
                oof_rephrase: cal_rephrase,
                oof_locality: cal_locality,
                seconds: t0.elapsed().as_secs_f64(),
            },
        ));
    }
    let fold_of = |i: usize| p.probe_record[p.probe[i]] % o.folds;
    let mut oof = vec![0f32; p.y.len()];
    for k in 0..o.folds {
        let train_rows: Vec<usize> = (0..p.y.len()).filter(|&i| fold_of(i) != k).collect();
        let h = train_ensemble(&p, &train_rows, o, d)?;
        for (i, s) in scores(&h, &p, (0..p.y.len()).filter(|&i| fold_of(i) == k))? {
            oof[i] = s;
        }
        progress(&format!(
            "fold {}/{} trained ({:.0} s)",
            k + 1,
            o.folds,
            t0.elapsed().as_secs_f64()
        ));
    }
    let threshold = lowest_threshold(&p, &oof, o.target_locality)
        .map_err(|e| bad(format!("out of fold: {e}")))?;
    let (oof_rephrase, oof_locality) = route_rates(&p, &oof, threshold);
    let mut head = train_ensemble(&p, &all, o, d)?;
    head.threshold = threshold;
    head.scope_fingerprint = scope.fingerprint();
    Ok((
        head,
        TrainReport {
            pairs: p.y.len(),
            positives,
            threshold,
            calibrated: false,
            oof_rephrase,
            oof_locality,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid head with provenance.
    fn small_head() -> HeadFile {
        let (embed_dim, members, hidden) = (4, 2, 3);
        let nf = ScopeHead::n_features(embed_dim) + 2;
        HeadFile {
            embed_dim,
            members,
            hidden,
            weights: (0..members * hidden * nf)
                .map(|i| (i as f32 * 0.37).sin())
                .collect(),
            out_bias: vec![0.1, -0.2],
            threshold: 1.5,
            scope_fingerprint: [7; 32],
            provenance: [
                ("trained_with", "amend scope-model train-head --data a.json"),
                ("data_sha256", "00ff  a.json"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }

    /// The same head is the same bytes, whatever order safetensors' hash maps take (each call
    /// builds new ones with new random keys), and its provenance comes back; a provenance key
    /// that is a routing key is refused.
    #[test]
    fn head_bytes_are_deterministic_and_keep_provenance() {
        let h = small_head();
        let first = h.to_bytes().unwrap();
        for _ in 0..32 {
            assert_eq!(h.to_bytes().unwrap(), first);
        }
        let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
        let at = |k: &str| header.find(k).unwrap();
        assert!(at("data_sha256") < at("embed_dim") && at("embed_dim") < at("trained_with"));
        assert!(at("out_bias") < at("threshold") && at("threshold") < at("weights"));
        let back = HeadFile::parse(&first).unwrap();
        assert_eq!(back, h);
        let mut bad_key = small_head();
        bad_key.provenance.insert("members".into(), "9".into());
        assert!(bad_key
            .to_bytes()
            .unwrap_err()
            .to_string()
            .contains("routing key"));
        let mut long = small_head();
        long.provenance
            .insert("note".into(), "x".repeat(MAX_PROVENANCE_LEN + 1));
        let e = HeadFile::parse(&long.to_bytes().unwrap()).unwrap_err();
        assert!(e.to_string().contains("\"note\" is"), "{e}");
    }

    /// Bad options are refused before any training, naming the flag and its range.
    #[test]
    fn options_checked_up_front() {
        TrainOptions::default().check().unwrap();
        let e = |f: &dyn Fn(&mut TrainOptions)| {
            let mut o = TrainOptions::default();
            f(&mut o);
            o.check().unwrap_err().to_string()
        };
        assert!(e(&|o| o.members = 0).contains("--members 0 is outside 1..=16"));
        assert!(e(&|o| o.hidden = 0).contains("--hidden 0 is outside 1..=1024"));
        assert!(e(&|o| o.epochs = 0).contains("--epochs 0"));
        assert!(
            e(&|o| o.epochs = 99999999999).contains("--epochs 99999999999 is outside 1..=10000")
        );
        assert!(e(&|o| o.l2 = f64::NAN).contains("--l2 NaN"));
        for t in [f64::NAN, -1.0, 0.0, 150.0] {
            assert!(e(&|o| o.target_locality = t).contains("--target-locality"));
        }
        TrainOptions {
            target_locality: 100.0,
            ..Default::default()
        }
        .check()
        .unwrap();
    }
}
