//! Evaluation on the deployed model: the KnowEdit metrics measured on the runtime (the quantized
//! GGUF on llama.cpp), for the base model and any number of edited variants side by side.
//!
//! Per record and variant:
//! - Edit Succ: teacher-forced token accuracy of `target_new` after the prompt;
//! - Generalization: the same on each rephrase prompt (mean over rephrases);
//! - Portability: accuracy on portability prompts against their ground truth;
//! - Locality: agreement of this variant's argmax tokens with the *base model's* at the answer
//!   positions of each locality prompt + ground truth;
//! - Fluency: KnowEdit n-gram entropy of the prompt plus [`EvalConfig::gen_tokens`] greedily
//!   generated tokens (EasyEdit scores the generated string including its prefix);
//! - gen_exact / gen_contains: the same greedy generation checked for the target (see
//!   [`crate::metrics::exact_match`], [`crate::metrics::contains_target`]).
//!
//! Applying edits is the job of a [`Variant`]: it builds the session the variant runs in (the
//! base variant a plain session; an edited variant one with its bundle installed). Each variant
//! gets a fresh session so nothing leaks from one to the next.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use amend_runtime::{
    Backend, EvalOptions, GenerateParams, Logits, Model, Phase, RuntimeError, Session,
    SessionOptions, Token,
};
use serde::{Deserialize, Serialize};

use crate::dataset::EditRecord;
use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("record `{id}`: {what}: {reason}")]
    Record {
        id: String,
        what: String,
        reason: String,
    },
    #[error("variant `{name}`: {reason}")]
    Variant { name: String, reason: String },
    #[error("no records to evaluate")]
    NoRecords,
}

/// Evaluation settings.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// Greedy tokens generated on each edit prompt (fluency and generation metrics). KnowEdit: 100.
    pub gen_tokens: usize,
    /// Context size of the evaluation sessions.
    pub n_ctx: u32,
    /// Threads (`None`: the runtime's default).
    pub n_threads: Option<usize>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            gen_tokens: 100,
            n_ctx: 512,
            n_threads: None,
        }
    }
}

impl EvalConfig {
    /// Session options for a variant's session.
    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            n_ctx: self.n_ctx,
            n_threads: self.n_threads,
            n_threads_batch: self.n_threads,
            ..Default::default()
        }
    }
}

type SessionFactory =
    Box<dyn FnMut(&Arc<Model>, &SessionOptions) -> Result<Box<dyn Backend>, EvalError> + Send>;
type RecordHook = Box<dyn FnMut(&EditRecord) -> Result<(), EvalError> + Send>;

/// A model configuration to evaluate: the base model or the base model with edits applied.
pub struct Variant {
    pub name: String,
    make_session: SessionFactory,
    before_record: Option<RecordHook>,
}

impl Variant {
    /// The unedited model.
    pub fn base() -> Variant {
        Variant::new("base", |model, opts| Ok(Session::new(model, opts.clone())?))
    }

    /// A variant whose sessions are built by `make` (which installs its edits), on any
    /// backend (a llama.cpp [`Session`] or an ONNX Runtime session).
    pub fn new<B: Backend + 'static>(
        name: impl Into<String>,
        mut make: impl FnMut(&Arc<Model>, &SessionOptions) -> Result<B, EvalError> + Send + 'static,
    ) -> Variant {
        Variant {
            name: name.into(),
            make_session: Box::new(move |m, o| Ok(Box::new(make(m, o)?) as Box<dyn Backend>)),
            before_record: None,
        }
    }

    /// Runs `f` before each record is scored, e.g. to leave only that record's own edits
    /// active (KnowEdit's single-edit protocol) in an edit set the sessions follow.
    pub fn before_each_record(
        mut self,
        f: impl FnMut(&EditRecord) -> Result<(), EvalError> + Send + 'static,
    ) -> Variant {
        self.before_record = Some(Box::new(f));
        self
    }

    /// A fresh session for this variant.
    pub fn session(
        &mut self,
        model: &Arc<Model>,
        opts: &SessionOptions,
    ) -> Result<Box<dyn Backend>, EvalError> {
        (self.make_session)(model, opts)
    }
}

/// Per-record scores of one variant. Accuracies are fractions in 0..=1; fluency is in bits
/// (not x100). Optional metrics are `None` when the record has nothing to score.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordResult {
    pub id: String,
    pub variant: String,
    pub prompt: String,
    pub target_new: String,
    pub edit_succ: f64,
    pub generalization: Option<f64>,
    pub rephrase_acc: Vec<f64>,
    pub portability: Option<f64>,
    pub locality: Option<f64>,
    /// Locality per probe kind (`Relation_Specificity`, `Subject_Specificity`, ...): the
    /// same-subject, different-relation probes are reported on their own.
    #[serde(default)]
    pub locality_by_kind: BTreeMap<String, f64>,
    pub fluency: f64,
    /// Greedy continuation of the prompt (without the prompt).
    pub gen_text: String,
    pub gen_exact: bool,
    pub gen_contains: bool,
}

/// Averages over records, as KnowEdit reports them: percentages 0-100, fluency x100.
/// A metric no record has (e.g. no portability probes) is `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub edit_succ: f64,
    pub generalization: Option<f64>,
    pub portability: Option<f64>,
    pub locality: Option<f64>,
    /// Locality per probe kind, over the records that have that kind.
    #[serde(default)]
    pub locality_by_kind: BTreeMap<String, f64>,
    pub fluency: f64,
    pub gen_exact: f64,
    pub gen_contains: f64,
}

impl Summary {
    pub fn from_results(results: &[RecordResult]) -> Summary {
        let pct = |v: Option<f64>| v.map(|x| x * 100.0);
        let rate = |f: fn(&RecordResult) -> bool| {
            metrics::mean(results.iter().map(|r| f(r) as u8 as f64)).unwrap_or(0.0) * 100.0
        };
        Summary {
            n: results.len(),
            edit_succ: pct(metrics::mean(results.iter().map(|r| r.edit_succ))).unwrap_or(0.0),
            generalization: pct(metrics::mean(
                results.iter().filter_map(|r| r.generalization),
            )),
            portability: pct(metrics::mean(results.iter().filter_map(|r| r.portability))),
            locality: pct(metrics::mean(results.iter().filter_map(|r| r.locality))),
            locality_by_kind: {
                let kinds: std::collections::BTreeSet<&String> = results
                    .iter()
                    .flat_map(|r| r.locality_by_kind.keys())
                    .collect();
                kinds
                    .into_iter()
                    .map(|k| {
                        let v = metrics::mean(
                            results
                                .iter()
                                .filter_map(|r| r.locality_by_kind.get(k).copied()),
                        );
                        (k.clone(), v.unwrap_or(0.0) * 100.0)
                    })
                    .collect()
            },
            fluency: metrics::mean(results.iter().map(|r| r.fluency)).unwrap_or(0.0)
                * metrics::FLUENCY_SCALE,
            gen_exact: rate(|r| r.gen_exact),
            gen_contains: rate(|r| r.gen_contains),
        }
    }
}

/// All results of one variant.
#[derive(Clone, Debug)]
pub struct VariantReport {
    pub name: String,
    pub records: Vec<RecordResult>,
    pub summary: Summary,
}

/// Progress of an evaluation (for a progress bar).
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    pub variant: &'a str,
    /// Records finished over all variants.
    pub done: usize,
    pub total: usize,
}

pub use amend_runtime::prompt_answer_tokens;

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> Token {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as Token
}

/// Teacher forcing: evaluates prompt + answer in one batch (the last prompt token marked for
/// edits that act there) and returns, for each answer token, the model's argmax at the position
/// that predicts it.
pub fn teacher_forced_argmax<B: Backend + ?Sized>(
    session: &mut B,
    prompt: &[Token],
    answer: &[Token],
) -> Result<Vec<Token>, RuntimeError> {
    if prompt.is_empty() || answer.is_empty() {
        return Err(RuntimeError::EmptyInput);
    }
    let mut tokens = Vec::with_capacity(prompt.len() + answer.len());
    tokens.extend_from_slice(prompt);
    tokens.extend_from_slice(answer);
    let first = prompt.len() - 1;
    session.kv_clear()?;
    session.eval(
        &tokens[..tokens.len() - 1],
        EvalOptions {
            logits: Logits::From(first),
            phase: Phase::Prefill,
            last_prompt_token: Some(first),
        },
    )?;
    (0..answer.len())
        .map(|i| session.logits(first + i).map(argmax))
        .collect()
}

/// On any backend with the edits in place: (teacher-forced argmax == answer, greedy generation
/// == answer).
pub fn answer_check(
    s: &mut dyn amend_runtime::Backend,
    p: &[Token],
    a: &[Token],
) -> std::result::Result<(bool, bool), amend_runtime::RuntimeError> {
    let tf = teacher_forced_argmax(s, p, a)? == a;
    s.kv_clear()?;
    s.eval(p, amend_runtime::EvalOptions::prefill(Logits::Last))?;
    let mut greedy = true;
    for (i, &want) in a.iter().enumerate() {
        let got = argmax(s.last_logits()?);
        if got != want {
            greedy = false;
            break;
        }
        if i + 1 < a.len() {
            s.eval(&[got], amend_runtime::EvalOptions::decode())?;
        }
    }
    Ok((tf, greedy))
}

/// Evaluates `records` on every variant; the first variant must be the base model (its
/// argmax tokens are the reference for locality). `progress` is called after each record.
pub fn evaluate(
    model: &Arc<Model>,
    records: &[EditRecord],
    variants: &mut [Variant],
    config: &EvalConfig,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Vec<VariantReport>, EvalError> {
    if records.is_empty() {
        return Err(EvalError::NoRecords);
    }
    let opts = config.session_options();
    let prepared = records
        .iter()
        .map(|r| Prepared::new(model, r))
        .collect::<Result<Vec<_>, _>>()?;
    let total = records.len() * variants.len();
    let mut done = 0;
    let mut reference: Vec<Vec<Vec<Token>>> = Vec::new();
    let mut reports = Vec::new();
    for (vi, variant) in variants.iter_mut().enumerate() {
        let mut session = variant.session(model, &opts)?;
        let mut results = Vec::with_capacity(records.len());
        for (ri, (record, prep)) in records.iter().zip(&prepared).enumerate() {
            if let Some(f) = variant.before_record.as_mut() {
                f(record)?;
            }
            let (result, loc_tokens) = eval_record(
                &mut *session,
                record,
                prep,
                &variant.name,
                config,
                reference.get(ri),
            )?;
            if vi == 0 {
                reference.push(loc_tokens);
            }
            results.push(result);
            done += 1;
            progress(Progress {
                variant: &variant.name,
                done,
                total,
            });
        }
        let summary = Summary::from_results(&results);
        reports.push(VariantReport {
            name: variant.name.clone(),
            records: results,
            summary,
        });
    }
    Ok(reports)
}

/// One scored (prompt, answer) pair: its texts and their tokens, computed once for all variants.
struct Pair {
    prompt: String,
    answer: String,
    tokens: (Vec<Token>, Vec<Token>),
}

/// A record's pairs.
struct Prepared {
    edit: Pair,
    rephrases: Vec<Pair>,
    portability: Vec<Pair>,
    locality: Vec<Pair>,
    /// The kind of each locality probe (`Probe::kind`).
    locality_kinds: Vec<String>,
}

impl Prepared {
    fn new(model: &Model, r: &EditRecord) -> Result<Prepared, EvalError> {
        let pair = |what: &str, prompt: &str, answer: &str| {
            let (p, a) = prompt_answer_tokens(model, prompt, answer)?;
            if a.is_empty() {
                return Err(EvalError::Record {
                    id: r.id.clone(),
                    what: what.to_string(),
                    reason: format!("answer `{answer}` tokenizes to nothing"),
                });
            }
            Ok(Pair {
                prompt: prompt.to_string(),
                answer: answer.to_string(),
                tokens: (p, a),
            })
        };
        Ok(Prepared {
            edit: pair("target_new", &r.prompt, &r.target_new)?,
            rephrases: r
                .rephrase_prompts
                .iter()
                .map(|p| pair("rephrase", p, &r.target_new))
                .collect::<Result<_, _>>()?,
            portability: r
                .portability
                .iter()
                .map(|p| pair("portability", &p.prompt, &p.ground_truth))
                .collect::<Result<_, _>>()?,
            locality: r
                .locality
                .iter()
                .map(|p| pair("locality", &p.prompt, &p.ground_truth))
                .collect::<Result<_, _>>()?,
            locality_kinds: r.locality.iter().map(|p| p.kind.clone()).collect(),
        })
    }
}

/// Teacher-forced argmax and answer tokens of one pair as a request: the session's edit set is
/// pinned for it, and a memory edit in scope routes the prompt (then the routed prompt is scored).
fn score(session: &mut dyn Backend, pair: &Pair) -> Result<(Vec<Token>, Vec<Token>), EvalError> {
    let request = session.begin_request(&pair.prompt)?;
    let routed;
    let (p, a) = if request.prompt == pair.prompt {
        (&pair.tokens.0, &pair.tokens.1)
    } else {
        routed = prompt_answer_tokens(session.vocab(), &request.prompt, &pair.answer)?;
        (&routed.0, &routed.1)
    };
    let pred = teacher_forced_argmax(session, p, a)?;
    Ok((pred, a.clone()))
}

fn accuracy(session: &mut dyn Backend, pair: &Pair) -> Result<f64, EvalError> {
    let (pred, answer) = score(session, pair)?;
    // Lengths match by construction.
    Ok(metrics::token_accuracy(&pred, &answer).unwrap_or(0.0))
}

/// Scores one record in `session`. Returns the result and this variant's argmax tokens on the
/// locality probes (the reference when this is the base variant).
fn eval_record(
    session: &mut dyn Backend,
    record: &EditRecord,
    prep: &Prepared,
    variant: &str,
    config: &EvalConfig,
    reference: Option<&Vec<Vec<Token>>>,
) -> Result<(RecordResult, Vec<Vec<Token>>), EvalError> {
    let edit_succ = accuracy(session, &prep.edit)?;
    let rephrase_acc = prep
        .rephrases
        .iter()
        .map(|p| accuracy(session, p))
        .collect::<Result<Vec<_>, _>>()?;
    let portability = metrics::mean(
        prep.portability
            .iter()
            .map(|p| accuracy(session, p))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let loc_tokens = prep
        .locality
        .iter()
        .map(|pair| score(session, pair).map(|(pred, _)| pred))
        .collect::<Result<Vec<_>, _>>()?;
    let per_probe: Vec<f64> = match reference {
        // The base variant agrees with itself by definition.
        None => loc_tokens.iter().map(|_| 1.0).collect(),
        Some(reference) => reference
            .iter()
            .zip(&loc_tokens)
            .map(|(pre, post)| agreement(pre, post))
            .collect(),
    };
    let locality = metrics::mean(per_probe.iter().copied());
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (k, v) in prep.locality_kinds.iter().zip(&per_probe) {
        by_kind.entry(k.clone()).or_default().push(*v);
    }
    let locality_by_kind = by_kind
        .into_iter()
        .filter_map(|(k, v)| Some((k, metrics::mean(v)?)))
        .collect();

    let params = GenerateParams {
        add_bos: session.vocab().info().add_bos,
        ..GenerateParams::greedy(config.gen_tokens)
    };
    // The text entry point: it pins the edit set and lets a memory edit route the prompt.
    let out = session.generate_text(&record.prompt, &params, &mut |_| ControlFlow::Continue(()))?;
    let fluency = metrics::fluency(&format!("{}{}", record.prompt, out.text));
    let result = RecordResult {
        id: record.id.clone(),
        variant: variant.to_string(),
        prompt: record.prompt.clone(),
        target_new: record.target_new.clone(),
        edit_succ,
        generalization: metrics::mean(rephrase_acc.iter().copied()),
        rephrase_acc,
        portability,
        locality,
        locality_by_kind,
        fluency,
        gen_exact: metrics::exact_match(&out.text, &record.target_new),
        gen_contains: metrics::contains_target(&out.text, &record.target_new),
        gen_text: out.text,
    };
    Ok((result, loc_tokens))
}

/// Locality of one pair: argmax agreement with the base model's (a routed prompt can tokenize
/// the answer differently: the overlap is compared).
fn agreement(pre: &[Token], post: &[Token]) -> f64 {
    let n = pre.len().min(post.len());
    metrics::locality_agreement(&pre[..n], &post[..n]).unwrap_or(0.0)
}

/// The fixed drift probes (`data/drift-probes.txt`): ordinary prompts unrelated to edits, one a
/// line. `amend compile` measures how far a new bundle moves the model on them.
pub const DRIFT_PROBES: &str = include_str!("../../data/drift-probes.txt");

/// The drift probes that are about none of `records` (a probe containing an edit's subject or
/// equal to its prompt, ignoring case, is the edit's business, not drift).
pub fn drift_probes(records: &[EditRecord]) -> Vec<&'static str> {
    let about: Vec<String> = records
        .iter()
        .flat_map(|r| [r.subject.clone().unwrap_or_default(), r.prompt.clone()])
        .map(|t| t.trim().to_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    DRIFT_PROBES
        .lines()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let l = p.to_lowercase();
            !about.iter().any(|a| l.contains(a.as_str()) || a == &l)
        })
        .collect()
}

/// How far a variant drifts from the base model on prompts no edit is about.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeLocality {
    /// Mean over the probes of [`metrics::locality_agreement`] (0..=1), the same figure as
    /// the Locality metric, on each probe's base greedy continuation.
    pub agreement: f64,
    /// Probes scored (those whose base continuation is not empty).
    pub probes: usize,
    /// The probes that disagree, worst first (at most 5): prompt and agreement.
    pub worst: Vec<(String, f64)>,
}

/// Drift of `variant` from the base model on `prompts`: each prompt's greedy continuation of
/// `tokens` tokens on the base model is the answer; the base's and the variant's teacher-forced
/// argmax tokens on it are compared as the Locality metric compares them (the variant's
/// request routing included). With `tokens == 1` (next-token agreement, what `amend compile`
/// uses) that is two prompt batches per probe; more tokens add a decode each and a third batch.
pub fn probe_locality(
    model: &Arc<Model>,
    prompts: &[&str],
    variant: &mut Variant,
    config: &EvalConfig,
    tokens: usize,
) -> Result<ProbeLocality, EvalError> {
    let opts = config.session_options();
    let mut base = Session::new(model, opts.clone())?;
    let mut edited = variant.session(model, &opts)?;
    let add_bos = model.info().add_bos;
    let params = GenerateParams {
        add_bos,
        ..GenerateParams::greedy(tokens)
    };
    let mut scores = Vec::with_capacity(prompts.len());
    for &prompt in prompts {
        let out = base.generate(prompt, &params, |_| ControlFlow::Continue(()))?;
        if out.tokens.is_empty() {
            continue;
        }
        let pair = Pair {
            prompt: prompt.to_string(),
            answer: out.text,
            tokens: (model.tokenize(prompt, add_bos)?, out.tokens),
        };
        // One greedy token is the argmax of the one batch teacher forcing would evaluate
        // again: it is the reference as it is (one prefill saved per probe).
        let pre = if pair.tokens.1.len() == 1 {
            pair.tokens.1.clone()
        } else {
            score(&mut base, &pair)?.0
        };
        let (post, _) = score(&mut *edited, &pair)?;
        scores.push((prompt.to_string(), agreement(&pre, &post)));
    }
    let agreement = metrics::mean(scores.iter().map(|s| s.1)).unwrap_or(1.0);
    let probes = scores.len();
    scores.retain(|s| s.1 < 1.0);
    scores.sort_by(|a, b| a.1.total_cmp(&b.1));
    scores.truncate(5);
    Ok(ProbeLocality {
        agreement,
        probes,
        worst: scores,
    })
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"))
}

/// A markdown table with one row per variant (several bundles side by side).
pub fn markdown_table(reports: &[(String, Summary)]) -> String {
    let mut s = String::from(
        "| Variant | N | Edit Succ | Generalization | Portability | Locality | Fluency | Gen exact | Gen contains |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, m) in reports {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            name.replace('|', "\\|"),
            m.n,
            m.edit_succ,
            fmt_pct(m.generalization),
            fmt_pct(m.portability),
            fmt_pct(m.locality),
            m.fluency,
            m.gen_exact,
            m.gen_contains
        ));
    }
    // Locality per probe kind, when the data names kinds (same-subject probes on their own).
    let kinds: std::collections::BTreeSet<&String> = reports
        .iter()
        .flat_map(|(_, m)| m.locality_by_kind.keys())
        .collect();
    if !kinds.is_empty() {
        s.push_str("\n| Variant | ");
        s.push_str(
            &kinds
                .iter()
                .map(|k| format!("Locality: {k}"))
                .collect::<Vec<_>>()
                .join(" | "),
        );
        s.push_str(" |\n|---|");
        s.push_str(&"---:|".repeat(kinds.len()));
        s.push('\n');
        for (name, m) in reports {
            s.push_str(&format!("| {} |", name.replace('|', "\\|")));
            for k in &kinds {
                s.push_str(&format!(
                    " {} |",
                    fmt_pct(m.locality_by_kind.get(*k).copied())
                ));
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn result(edit: f64, gen: Option<f64>, loc: Option<f64>, exact: bool) -> RecordResult {
        RecordResult {
            id: "x".into(),
            variant: "v".into(),
            prompt: "p".into(),
            target_new: "t".into(),
            edit_succ: edit,
            generalization: gen,
            rephrase_acc: gen.into_iter().collect(),
            portability: None,
            locality: loc,
            locality_by_kind: loc
                .map(|l| [("Subject_Specificity".to_string(), l)].into())
                .unwrap_or_default(),
            fluency: 5.0,
            gen_text: String::new(),
            gen_exact: exact,
            gen_contains: exact,
        }
    }

    #[test]
    fn summary_averages_and_scales() {
        let s = Summary::from_results(&[
            result(1.0, Some(0.5), Some(1.0), true),
            result(0.5, None, Some(0.5), false),
        ]);
        assert_eq!(s.n, 2);
        assert_eq!(s.edit_succ, 75.0);
        assert_eq!(s.generalization, Some(50.0));
        assert_eq!(s.portability, None);
        assert_eq!(s.locality, Some(75.0));
        assert_eq!(s.locality_by_kind["Subject_Specificity"], 75.0);
        assert!(markdown_table(&[("v".into(), s.clone())])
            .contains("| Locality: Subject_Specificity |"));
        assert_eq!(s.fluency, 500.0);
        assert_eq!(s.gen_exact, 50.0);
        let json = serde_json::to_value(&s).unwrap();
        let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "edit_succ",
                "fluency",
                "gen_contains",
                "gen_exact",
                "generalization",
                "locality",
                "locality_by_kind",
                "n",
                "portability"
            ]
        );
        let table = markdown_table(&[("base".into(), s.clone()), ("grace|x".into(), s)]);
        // The main table, then the per-kind locality table after a blank line.
        assert_eq!(table.lines().take_while(|l| !l.is_empty()).count(), 4);
        assert_eq!(table.lines().count(), 9);
        assert!(table.contains("| base | 2 | 75.0 | 50.0 | - | 75.0 | 500.0 | 50.0 | 50.0 |"));
        assert!(table.contains("grace\\|x"));
    }

    #[test]
    fn argmax_first_on_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[3.0]), 0);
    }

    /// The real model, or `None` (test skipped) when it is missing and not required.
    pub(crate) fn real_model() -> Option<Arc<Model>> {
        let path = real_model_path()?;
        Some(Model::open(&path, Default::default()).expect("model loads"))
    }

    /// The real model's path, or `None` (test skipped) when it is missing and not required.
    pub(crate) fn real_model_path() -> Option<std::path::PathBuf> {
        let path = std::env::var_os("AMEND_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                amend_edits::fsutil::cache_dir()
                    .unwrap_or_default()
                    .join("gemma3-270m-q4_k_m.gguf")
            });
        if !path.exists() {
            if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
                panic!(
                    "AMEND_REQUIRE_MODEL=1 but the model {} is missing",
                    path.display()
                );
            }
            eprintln!("skipped: real model {} not found", path.display());
            return None;
        }
        Some(path)
    }

    fn is_gemma(model: &Model) -> bool {
        model.architecture().name() == "gemma3"
    }

    /// The answer positions line up: the model's known fact scores 1.0 under teacher forcing,
    /// a wrong answer less.
    #[test]
    fn real_teacher_forcing_alignment() {
        let Some(model) = real_model() else { return };
        if !is_gemma(&model) {
            return eprintln!("skipped: not gemma3");
        }
        let mut s = Session::new(&model, EvalConfig::default().session_options()).unwrap();
        let (p, a) =
            prompt_answer_tokens(&model, "Water is made of hydrogen and", "oxygen").unwrap();
        assert_eq!(a.len(), 1, "` oxygen` is one token");
        let pred = teacher_forced_argmax(&mut s, &p, &a).unwrap();
        assert_eq!(pred, a);
        let (p, a) =
            prompt_answer_tokens(&model, "Water is made of hydrogen and", "nitrogen").unwrap();
        let pred = teacher_forced_argmax(&mut s, &p, &a).unwrap();
        assert_ne!(pred, a);
    }

    /// Base-only and a deliberately damaged variant on two dev records: the base agrees with
    /// itself, rarely predicts the counterfactual targets, and the damaged variant loses locality.
    #[test]
    fn real_evaluate_base_and_damaged_variant() {
        let Some(model) = real_model() else { return };
        let records =
            crate::dataset::parse_knowedit(include_str!("../../data/dev-edits.json")).unwrap();
        let records = &records[..2];
        let damaged = Variant::new("damaged", |m, o| {
            let mut s = Session::new(m, o.clone())?;
            let point = amend_runtime::HookPoint::new(2, amend_runtime::Site::ResidualOut);
            s.add_hook(Box::new(amend_runtime::FnHook::new(
                vec![point],
                |_, rows| {
                    for x in rows.data_mut() {
                        *x = -*x;
                    }
                },
            )))?;
            Ok(s)
        });
        let mut variants = vec![Variant::base(), Variant::base(), damaged];
        let config = EvalConfig {
            gen_tokens: 16,
            ..Default::default()
        };
        let mut calls = 0;
        let reports = evaluate(&model, records, &mut variants, &config, |p| {
            calls += 1;
            assert_eq!(p.total, 6);
        })
        .unwrap();
        assert_eq!(calls, 6);
        let (base, again, damaged) = (&reports[0], &reports[1], &reports[2]);
        assert_eq!(base.summary.locality, Some(100.0));
        // A second base session reproduces the base exactly (deterministic, nothing leaks).
        assert_eq!(again.summary, base.summary);
        assert_eq!(again.records[0].gen_text, base.records[0].gen_text);
        assert!(base.summary.edit_succ < 50.0, "{:?}", base.summary);
        assert!(base.summary.fluency > 0.0);
        assert!(
            damaged.summary.locality.unwrap() < 90.0,
            "{:?}",
            damaged.summary
        );
        for r in &base.records {
            assert!(!r.gen_text.is_empty());
            assert_eq!(
                r.rephrase_acc.len(),
                records
                    .iter()
                    .find(|x| x.id == r.id)
                    .unwrap()
                    .rephrase_prompts
                    .len()
            );
        }
    }
}
