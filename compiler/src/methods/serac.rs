//! SERAC (Mitchell et al. 2022) as an edit memory: one record per edit (the prompt, the target
//! and the edit as a statement), an embedding per record from the base model
//! ([`Session::embed`](amend_runtime::Session::embed): pooled hidden state at one layer/site,
//! BOS excluded, L2-normalized; the runtime embeds queries the same way), and a cosine
//! threshold calibrated on the edits' rephrases (must be in scope) versus their locality
//! prompts (must not be). In scope, the runtime applies the template: an in-context one
//! ("{edit}\n{prompt}": the base model with the edit in context) or, by default, an answering
//! one ("{prompt}{answer}": the record's target is said first; docs/methods.md). The default
//! embedder is the scope model (`compile_scope`, calibrated on synthesized negatives).
//!
//! Calibration: scores are the best cosine over all memories. When every rephrase scores above
//! every locality prompt the threshold is the midpoint; otherwise it is the threshold with the
//! fewest misrouted prompts (ties: the midpoint of the best interval). With neither rephrases
//! nor locality prompts, `serac.threshold` is used.

use super::{Compiler, EditReport, Progress};
use crate::dataset::{continuation, EditRecord};
use crate::error::{CompileError, Result};
use crate::hparams::SeracParams;
use amend_edits::bundle::{BundleBuilder, EmbedderDesc, MemoryRecordDesc, Payload};
use amend_edits::families::Pooling;
use amend_edits::{Bundle, Site};
use std::time::Instant;

/// The threshold chosen and how well it separates the calibration prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    pub threshold: f32,
    /// Rephrases scoring >= threshold, of all rephrases.
    pub rephrases_in: (usize, usize),
    /// Locality prompts scoring < threshold, of all locality prompts.
    pub locality_out: (usize, usize),
    /// Every rephrase scored above every locality prompt.
    pub separable: bool,
    /// Scope-model memories: the subject and relation thresholds (then `threshold` is the floor
    /// on the pooled cosine, and `locality_out` counts the synthesized negatives rejected).
    pub scope: Option<super::scope_routing::ScopeCalibration>,
}

/// Chooses the threshold from in-scope and out-of-scope scores (see the module docs).
pub fn calibrate(in_scores: &[f32], out_scores: &[f32], fallback: f32) -> Calibration {
    let count = |t: f32| {
        (
            in_scores.iter().filter(|&&s| s >= t).count(),
            out_scores.iter().filter(|&&s| s < t).count(),
        )
    };
    let threshold = if in_scores.is_empty() && out_scores.is_empty() {
        fallback
    } else if in_scores.is_empty() {
        out_scores.iter().copied().fold(f32::MIN, f32::max) + 1e-4
    } else if out_scores.is_empty() {
        in_scores.iter().copied().fold(f32::MAX, f32::min) - 1e-4
    } else {
        // Candidate cut points: between consecutive sorted scores; the best by accuracy.
        let mut all: Vec<f32> = in_scores.iter().chain(out_scores).copied().collect();
        all.sort_by(|a, b| a.total_cmp(b));
        let mut best = (0usize, 0f32);
        let mut cands = vec![all[0] - 1e-4];
        cands.extend(all.windows(2).map(|w| (w[0] + w[1]) / 2.0));
        cands.push(all[all.len() - 1] + 1e-4);
        for t in cands {
            let (a, b) = count(t);
            if a + b > best.0 {
                best = (a + b, t);
            }
        }
        best.1
    };
    let (a, b) = count(threshold);
    let min_in = in_scores.iter().copied().fold(f32::MAX, f32::min);
    let max_out = out_scores.iter().copied().fold(f32::MIN, f32::max);
    Calibration {
        threshold: threshold.clamp(-1.0, 1.0),
        rephrases_in: (a, in_scores.len()),
        locality_out: (b, out_scores.len()),
        separable: min_in > max_out,
        scope: None,
    }
}

fn pooling(name: &str) -> Result<Pooling> {
    match name {
        "last" => Ok(Pooling::Last),
        "mean" => Ok(Pooling::Mean),
        other => Err(CompileError::Hparams(format!(
            "serac.pooling {other:?}: expected \"last\" or \"mean\""
        ))),
    }
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn compile(
    c: &mut Compiler,
    records: &[EditRecord],
    hp: &SeracParams,
    layer: Option<usize>,
    base: Option<&Bundle>,
    builder: &mut BundleBuilder,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Vec<EditReport>, Calibration)> {
    if hp.embedder == "scope" {
        return compile_scope(c, records, hp, base, builder, progress);
    }
    let layer = c.resolve_layer(layer, hp.layer)?;
    let site = Site::from_name(&hp.site).ok_or_else(|| {
        CompileError::Hparams(format!("serac.site {:?}: unknown hook site", hp.site))
    })?;
    let pool = pooling(&hp.pooling)?;
    if !hp.template.contains("{prompt}") {
        return Err(CompileError::Hparams(
            "serac.template must contain {prompt}".into(),
        ));
    }
    let rt = |e: amend_runtime::RuntimeError| CompileError::Runtime(e.to_string());
    let embed = |c: &mut Compiler, text: &str| -> Result<Vec<f32>> {
        c.session.embed(text, layer as u32, site, pool).map_err(rt)
    };

    // Records of the base bundle first (sequential editing keeps them).
    let mut recs: Vec<MemoryRecordDesc> = Vec::new();
    if let Some(b) = base {
        if let Some(other) = b
            .payloads()
            .iter()
            .find(|pl| !matches!(pl, Payload::Memory(_)))
        {
            return Err(CompileError::Bundle(format!(
                "--base-bundle has a {} payload; serac can only extend a memory bundle",
                other.kind().name()
            )));
        }
        for e in &b.manifest().edits {
            recs.push(MemoryRecordDesc {
                edit_id: e.id.clone(),
                prompt: e.prompt.clone(),
                target: e.target.clone(),
                text: format!("{}{}", e.prompt, continuation(&e.prompt, &e.target)),
            });
        }
    }
    let mut embeddings: Vec<Vec<f32>> = Vec::new();
    for r in &recs {
        embeddings.push(embed(c, &r.prompt)?);
    }
    let mut reports = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let t0 = Instant::now();
        embeddings.push(embed(c, &r.prompt)?);
        recs.push(MemoryRecordDesc {
            edit_id: r.id.clone(),
            prompt: r.prompt.clone(),
            target: r.target_new.clone(),
            text: format!("{}{}", r.prompt, r.continuation()),
        });
        progress(&Progress {
            index: i,
            total: records.len(),
            id: &r.id,
            step: 0,
            loss: 0.0,
            done: true,
        });
        reports.push(EditReport {
            id: r.id.clone(),
            loss: 0.0,
            steps: 0,
            seconds: t0.elapsed().as_secs_f64(),
            success: true,
            action: "memory record".into(),
        });
    }

    // Calibration on this compilation's records.
    let best = |q: &[f32]| {
        embeddings
            .iter()
            .map(|e| cos(e, q))
            .fold(f32::NEG_INFINITY, f32::max)
    };
    let (mut ins, mut outs) = (Vec::new(), Vec::new());
    for r in records {
        for q in &r.rephrase_prompts {
            let e = embed(c, q)?;
            ins.push(best(&e));
        }
        for p in &r.locality {
            let e = embed(c, &p.prompt)?;
            outs.push(best(&e));
        }
    }
    let cal = calibrate(&ins, &outs, hp.threshold);
    let dim = embeddings.first().map_or(0, |e| e.len());
    let flat: Vec<f32> = embeddings.into_iter().flatten().collect();
    let ids: Vec<(String, String, String)> = recs
        .iter()
        .map(|r| (r.edit_id.clone(), r.prompt.clone(), r.target.clone()))
        .collect();
    let p = builder.add_memory(
        dim,
        &flat,
        cal.threshold,
        &hp.template,
        EmbedderDesc::BaseModel {
            layer: layer as u32,
            site: site.code(),
            pooling: pool.code(),
        },
        recs,
    );
    for (row, (id, prompt, target)) in ids.iter().enumerate() {
        builder.add_edit(id, layer as u32, site, prompt, target, p, row as u32, 1);
    }
    Ok((reports, cal))
}

/// The name bundles record for the scope model.
pub const SCOPE_MODEL_ID: &str = "all-MiniLM-L6-v2";

/// The memory routed by the scope model (see `scope_routing`).
fn compile_scope(
    c: &mut Compiler,
    records: &[EditRecord],
    hp: &SeracParams,
    base: Option<&Bundle>,
    builder: &mut BundleBuilder,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Vec<EditReport>, Calibration)> {
    use super::scope_routing::{self as sr, RecordRouting};
    if !hp.template.contains("{prompt}") {
        return Err(CompileError::Hparams(
            "serac.template must contain {prompt}".into(),
        ));
    }
    let scope = c.scope_model.clone().ok_or_else(|| {
        CompileError::Hparams(
            "serac routes with the scope model: give --scope-model PATH (scripts/fetch-scope-model.sh makes it), or --set serac.embedder=\"base\"".into(),
        )
    })?;
    let fingerprint = scope.fingerprint();
    let head = super::scope_head::load(&hp.scope_head, fingerprint, scope.n_embd())?;
    // (edit id, prompt, subject, target) of the base bundle's routing rows, then of the new
    // records: each record's own row, then one per alias of its subject (its prompt with the
    // alias in the subject's place), all under the record's edit.
    let mut all: Vec<(String, String, String, String)> = Vec::new();
    // For each row, the new record it belongs to and whether it is that record's own row.
    let mut row_record: Vec<Option<(usize, bool)>> = Vec::new();
    if let Some(b) = base {
        for pl in b.payloads() {
            match pl {
                Payload::Memory(d) => {
                    let Some(r) = d.embedder.scope_routing() else {
                        return Err(CompileError::Bundle(
                            "--base-bundle's memory was not routed by the scope model; recompile it from its edits".into(),
                        ));
                    };
                    if r.fingerprint != fingerprint {
                        return Err(CompileError::Bundle(
                            "--base-bundle was compiled with another scope model".into(),
                        ));
                    }
                }
                other => {
                    return Err(CompileError::Bundle(format!(
                        "--base-bundle has a {} payload; serac can only extend a memory bundle",
                        other.kind().name()
                    )))
                }
            }
        }
        // Every routing row of every edit (an edit with aliases owns several).
        // The reader checked every range; a row missing here is refused, never dropped.
        let missing = |id: &str| {
            CompileError::Bundle(format!(
                "--base-bundle: edit {id:?} has no scope-model memory row to keep"
            ))
        };
        for e in &b.manifest().edits {
            let Some(Payload::Memory(d)) = b.payloads().get(e.payload as usize) else {
                return Err(missing(&e.id));
            };
            let subjects = d.embedder.scope_routing().map(|r| &r.subjects);
            for row in e.first as usize..(e.first + e.count) as usize {
                let (Some(rec), Some(subject)) =
                    (d.records.get(row), subjects.and_then(|s| s.get(row)))
                else {
                    return Err(missing(&e.id));
                };
                all.push((
                    e.id.clone(),
                    rec.prompt.clone(),
                    subject.clone(),
                    rec.target.clone(),
                ));
                row_record.push(None);
            }
        }
    }
    for (i, r) in records.iter().enumerate() {
        // Every record has its subject in the prompt (`check_subjects`).
        let subject = r.subject.clone().unwrap_or_default();
        all.push((
            r.id.clone(),
            r.prompt.clone(),
            subject.clone(),
            r.target_new.clone(),
        ));
        row_record.push(Some((i, true)));
        let span = r.subject_span();
        for alias in &r.subject_aliases {
            let Some(span) = span.clone() else { break };
            let prompt = format!(
                "{}{alias}{}",
                &r.prompt[..span.start],
                &r.prompt[span.end..]
            );
            all.push((r.id.clone(), prompt, alias.clone(), r.target_new.clone()));
            row_record.push(Some((i, false)));
        }
    }
    let subjects: Vec<&str> = all.iter().map(|a| a.2.as_str()).collect();
    let mut routing: Vec<RecordRouting> = Vec::with_capacity(all.len());
    let mut negs = Vec::new();
    let mut reports = Vec::with_capacity(records.len());
    // Thresholds are global: calibrating on an evenly spaced sample of records keeps a large
    // compile at about one encode per edit.
    let stride = all.len().div_ceil(hp.calibration_records.max(1));
    for (k, (id, prompt, subject, _)) in all.iter().enumerate() {
        let t0 = Instant::now();
        let r = sr::encode_record(&scope, prompt, subject)?;
        // The user's locality prompts calibrate against the record's own row.
        let own = match row_record[k] {
            Some((i, true)) => Some(i),
            _ => None,
        };
        let given: Vec<String> = match own {
            Some(i) => records[i]
                .locality
                .iter()
                .map(|p| p.prompt.clone())
                .collect(),
            None => Vec::new(),
        };
        if k % stride == 0 {
            negs.extend(sr::negatives(
                &scope, k, &r, prompt, subject, &subjects, &given,
            )?);
        } else if !given.is_empty() {
            // Locality prompts the user handed over are always calibrated on.
            for g in given {
                let (pooled, subject, relation) = sr::terms(&scope, &r, &g)?;
                negs.push(sr::Negative {
                    record: k,
                    kind: sr::NegativeKind::Given,
                    prompt: g,
                    pooled,
                    subject,
                    relation,
                });
            }
        }
        routing.push(r);
        if let Some(i) = own {
            progress(&Progress {
                index: i,
                total: records.len(),
                id,
                step: 0,
                loss: 0.0,
                done: true,
            });
            reports.push(EditReport {
                id: id.clone(),
                loss: 0.0,
                steps: 0,
                seconds: t0.elapsed().as_secs_f64(),
                success: true,
                action: "memory record (scope model)".into(),
            });
        }
    }
    let cal = sr::calibrate(
        &negs,
        hp.pooled_threshold,
        hp.margin,
        hp.max_subject_threshold,
        hp.max_relation_threshold,
    );
    if std::env::var_os("AMEND_SCOPE_DEBUG").is_some() {
        for n in &negs {
            eprintln!(
                "neg {:?} rec {} pooled {:.3} subj {:.3} rel {:.3} {:?}",
                n.kind, n.record, n.pooled, n.subject, n.relation, n.prompt
            );
        }
    }
    let dim = scope.n_embd();
    let mut pooled = Vec::with_capacity(all.len() * dim);
    let mut relation = Vec::with_capacity(all.len() * dim);
    let mut subject_rows = Vec::new();
    let mut counts = Vec::with_capacity(all.len());
    for r in &routing {
        pooled.extend_from_slice(&r.pooled);
        relation.extend_from_slice(&r.relation);
        subject_rows.extend_from_slice(&r.subject_rows);
        counts.push((r.subject_rows.len() / dim) as u32);
    }
    // Relation groups: the lexicon's templates and each record's group (one encode each).
    let groups = match super::relation_groups::Lexicon::load(&hp.relation_groups)? {
        Some(lex) => {
            let templates = lex.encode(&scope)?;
            let pairs: Vec<(&str, &str)> =
                all.iter().map(|a| (a.1.as_str(), a.2.as_str())).collect();
            let desc = super::relation_groups::record_groups(
                &scope,
                &lex,
                &templates,
                hp.relation_min_score,
                &pairs,
            )?;
            Some((desc, templates))
        }
        None => None,
    };
    let recs: Vec<MemoryRecordDesc> = all
        .iter()
        .map(|(id, prompt, _, target)| MemoryRecordDesc {
            edit_id: id.clone(),
            prompt: prompt.clone(),
            target: target.clone(),
            text: format!("{prompt}{}", continuation(prompt, target)),
        })
        .collect();
    let p = builder.add_scope_memory(
        dim,
        &pooled,
        &relation,
        &subject_rows,
        hp.pooled_threshold,
        &hp.template,
        amend_edits::bundle::ScopeRoutingDesc {
            model_id: SCOPE_MODEL_ID.into(),
            fingerprint,
            relation: 0,
            subject_rows: 0,
            subject_counts: counts,
            subject_threshold: cal.subject_threshold,
            relation_threshold: cal.relation_threshold,
            subjects: all.iter().map(|a| a.2.clone()).collect(),
        },
        head.as_ref().map(|h| {
            (
                amend_edits::bundle::ScopeHeadDesc {
                    members: h.members as u32,
                    hidden: h.hidden as u32,
                    weights: 0,
                    out_bias: h.out_bias.clone(),
                    threshold: h.threshold,
                },
                h.weights.as_slice(),
            )
        }),
        groups.as_ref().map(|(g, t)| (g.clone(), t.as_slice())),
        hp.relation_margin,
        (hp.relation_rule == "vote").then_some(hp.relation_vote_weight),
        recs,
    );
    // One edit per run of rows with its id: a record's own row first, then its aliases'.
    let mut row = 0;
    while row < all.len() {
        let (id, prompt, _, target) = &all[row];
        let n = all[row..].iter().take_while(|a| a.0 == *id).count();
        builder.add_edit(
            id,
            0,
            Site::ResidualOut,
            prompt,
            target,
            p,
            row as u32,
            n as u32,
        );
        row += n;
    }
    let calibration = Calibration {
        threshold: hp.pooled_threshold,
        rephrases_in: (0, 0),
        locality_out: cal.rejected,
        separable: !cal.capped,
        scope: Some(cal),
    };
    Ok((reports, calibration))
}

#[cfg(test)]
mod tests {
    use super::calibrate;

    #[test]
    fn separable_scores_give_the_midpoint() {
        let c = calibrate(&[0.9, 0.95], &[0.5, 0.7], 0.8);
        assert!((c.threshold - 0.8).abs() < 1e-6, "{c:?}");
        assert!(c.separable);
        assert_eq!(c.rephrases_in, (2, 2));
        assert_eq!(c.locality_out, (2, 2));
    }

    #[test]
    fn overlapping_scores_maximize_accuracy() {
        let c = calibrate(&[0.9, 0.6, 0.95], &[0.5, 0.7, 0.4], 0.8);
        assert!(!c.separable);
        assert_eq!(c.rephrases_in.0 + c.locality_out.0, 5, "{c:?}");
    }

    #[test]
    fn no_calibration_data_uses_the_fallback() {
        assert_eq!(calibrate(&[], &[], 0.85).threshold, 0.85);
    }
}
