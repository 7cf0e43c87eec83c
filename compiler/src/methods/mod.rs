//! The editing methods: each turns edit records into a bundle payload, training in candle on the
//! dequantized model and capturing keys through the runtime's hooks.
//!
//! [`Compiler`] holds the two views of one GGUF (the candle forward and the llama.cpp runtime)
//! and dispatches to a method module; the result is a [`BundleBuilder`] ready to be signed.

pub mod corpus;
pub mod grace;
pub mod lora;
pub mod memit;
pub(crate) mod optim;
pub mod relation_groups;
pub mod rome;
pub mod scope_head;
pub mod scope_routing;
pub mod serac;
pub mod tpatcher;

pub use optim::Adam;

use crate::checkpoint::{Checkpoint, Done};
use crate::dataset::EditRecord;
use crate::error::{CompileError, Result};
use crate::forward;
use crate::hparams::Hparams;
use amend_edits::bundle::{BundleBuilder, BundleMeta};
use amend_edits::{Bundle, HookPoint, ModelBinding};
use amend_runtime::{FnHook, Logits, Session, SessionOptions, Token};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An editing method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Grace,
    TPatcher,
    Rome,
    Memit,
    Lora,
    Serac,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Grace,
        Method::TPatcher,
        Method::Rome,
        Method::Memit,
        Method::Lora,
        Method::Serac,
    ];

    /// How a compile with this method resumes from its checkpoint (`amend compile --help`):
    /// `None` when it keeps none.
    pub fn checkpoints(self) -> Option<&'static str> {
        match self {
            Method::Grace | Method::TPatcher | Method::Rome | Method::Lora => Some("per edit"),
            Method::Memit => Some("per batch of memit.batch edits"),
            // One embedding per edit and no training: redoing them costs less than keeping them.
            Method::Serac => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Grace => "grace",
            Method::TPatcher => "tpatcher",
            Method::Rome => "rome",
            Method::Memit => "memit",
            Method::Lora => "lora",
            Method::Serac => "serac",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = CompileError;
    fn from_str(s: &str) -> Result<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                CompileError::Hparams(format!(
                    "--method {s:?}: unknown method (grace, tpatcher, rome, memit, lora, serac)"
                ))
            })
    }
}

/// How one edit went.
#[derive(Clone, Debug, PartialEq)]
pub struct EditReport {
    pub id: String,
    /// Mean target NLL after training.
    pub loss: f32,
    pub steps: usize,
    pub seconds: f64,
    /// Every target token is the argmax under teacher forcing (in the candle forward).
    pub success: bool,
    /// What the codebook did (GRACE: added, split, expanded).
    pub action: String,
}

/// Progress of the running compilation, for progress bars.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    pub index: usize,
    pub total: usize,
    pub id: &'a str,
    pub step: usize,
    pub loss: f32,
    /// This edit is finished.
    pub done: bool,
}

/// The per-step reporter of edit `index` of `total` (`id`): each `(step, loss, done)` goes to
/// `progress`.
pub(crate) fn edit_progress<'a>(
    progress: &'a mut dyn FnMut(&Progress),
    index: usize,
    total: usize,
    id: &'a str,
) -> impl FnMut(usize, f32, bool) + 'a {
    move |step, loss, done| {
        progress(&Progress {
            index,
            total,
            id,
            step,
            loss,
            done,
        })
    }
}

/// Refuses trained values that are not all finite, naming the hyperparameter section whose
/// learning rate to lower.
pub(crate) fn ensure_finite<'a>(
    values: impl IntoIterator<Item = &'a f32>,
    section: &str,
) -> Result<()> {
    if values.into_iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    Err(CompileError::Hparams(format!(
        "{section}: training diverged (non-finite values); lower {section}.lr"
    )))
}

/// `prev + d`, or `d` when there is nothing before it (summing hook deltas).
pub(crate) fn add_to(
    prev: Option<candle_core::Tensor>,
    d: candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    Ok(match prev {
        Some(p) => (p + d)?,
        None => d,
    })
}

/// Whether every row's argmax of `logits` `[n, vocab]` is its token in `targets` `[n]`.
pub(crate) fn argmax_hits_all(
    logits: &candle_core::Tensor,
    targets: &candle_core::Tensor,
) -> Result<bool> {
    Ok(logits
        .argmax(candle_core::D::Minus1)?
        .eq(targets)?
        .min(0)?
        .to_scalar::<u8>()?
        == 1)
}

/// Identity of the bundle to write. `version`: `None` = 1, or the base bundle's version + 1.
#[derive(Clone, Debug)]
pub struct BundleIdentity {
    pub bundle_id: String,
    pub channel: String,
    pub version: Option<u64>,
    /// Unix seconds; `u64::MAX` = never.
    pub expires: u64,
    /// The manifest's `created` (Unix seconds); `None` = now. Pinned for reproducible output
    /// (`SOURCE_DATE_EPOCH`) and by a resumed compile (the interrupted run's).
    pub created: Option<u64>,
}

impl Default for BundleIdentity {
    fn default() -> Self {
        BundleIdentity {
            bundle_id: "amend-edits".into(),
            channel: "default".into(),
            version: None,
            expires: u64::MAX,
            created: None,
        }
    }
}

/// What a compilation produced.
pub struct CompileOutput {
    pub builder: BundleBuilder,
    pub reports: Vec<EditReport>,
    /// For low-rank methods: a llama.cpp GGUF-LoRA file with the same delta.
    pub gguf_lora: Option<Vec<u8>>,
    /// For SERAC: the calibrated scope threshold and how it separates the calibration prompts.
    pub calibration: Option<serac::Calibration>,
}

/// One model seen twice: the differentiable candle forward and the runtime.
pub struct Compiler {
    pub fwd: forward::Model,
    pub runtime: Arc<amend_runtime::Model>,
    session: Session,
    pub binding: ModelBinding,
    pub model_path: PathBuf,
    /// The scope model serac's default memories route with (`amend compile --scope-model`).
    pub scope_model: Option<Arc<amend_runtime::ScopeModel>>,
    /// Finished edits to resume from and keep (`amend compile` writes `OUT.ckpt`); see
    /// [`crate::checkpoint`] and, per method, [`Method::checkpoints`].
    pub checkpoint: Option<Checkpoint>,
    /// Also key and check edits on ONNX Runtime with each of these options (`amend compile
    /// --verify-ort cpu,openvino`): T-Patcher's neurons then fire on, and GRACE's codebook rows
    /// cover, every backend's hidden states. All of them run on one ONNX Runtime library (one
    /// per process).
    pub verify_ort: Vec<amend_runtime::onnxruntime::OrtOptions>,
}

impl Compiler {
    /// Loads `model_path` in both views. Fails with [`CompileError::UnsupportedArchitecture`]
    /// before loading anything large when there is no forward for the architecture.
    pub fn open(model_path: &Path) -> Result<Compiler> {
        // Validates the header and the architecture before loading anything large.
        let fwd = forward::Model::from_weights(forward::Weights::open(model_path)?)?;
        let runtime = amend_runtime::Model::open(model_path, Default::default())
            .map_err(|e| CompileError::Runtime(e.to_string()))?;
        let session = Session::new(
            &runtime,
            SessionOptions {
                n_ctx: 1024,
                ..Default::default()
            },
        )
        .map_err(|e| CompileError::Runtime(e.to_string()))?;
        let binding = runtime
            .binding()
            .map_err(|e| CompileError::Runtime(format!("fingerprint: {e}")))?;
        Ok(Compiler {
            fwd,
            runtime,
            session,
            binding,
            model_path: model_path.to_path_buf(),
            scope_model: None,
            checkpoint: None,
            verify_ort: Vec::new(),
        })
    }

    /// Edit `index` (`id`)'s stored result when this compile resumes a checkpoint.
    pub(crate) fn resumed(&self, index: usize, id: &str) -> Option<Done> {
        self.checkpoint.as_ref()?.get(index, id).cloned()
    }

    /// Keeps finished edit `index` in the checkpoint (`done` is built only when there is one).
    pub(crate) fn finished(&mut self, index: usize, done: impl FnOnce() -> Done) -> Result<()> {
        match self.checkpoint.as_mut() {
            Some(c) => c.put(index, done()),
            None => Ok(()),
        }
    }

    /// Checks every record before any work, so a bad record fails the whole compilation and
    /// nothing is written.
    pub fn validate(&self, records: &[EditRecord]) -> Result<()> {
        if records.is_empty() {
            return Err(CompileError::BadRecord {
                index: 0,
                id: None,
                message: "no edit records".into(),
            });
        }
        for (i, r) in records.iter().enumerate() {
            let bad = |m: &str| CompileError::BadRecord {
                index: i,
                id: Some(r.id.clone()),
                message: m.to_string(),
            };
            if r.prompt.trim().is_empty() {
                return Err(bad("empty prompt"));
            }
            if r.target_new.trim().is_empty() {
                return Err(bad("empty target"));
            }
            let (p, a) = self
                .tokens(&r.prompt, &r.target_new)
                .map_err(|e| bad(&e.to_string()))?;
            if p.len() + a.len() > 512 {
                return Err(bad("prompt + target longer than 512 tokens"));
            }
        }
        Ok(())
    }

    /// Prompt tokens (with BOS where the model wants it) and target tokens, joined the
    /// KnowEdit way (the same split the evaluation uses).
    pub fn tokens(&self, prompt: &str, target: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let (p, a) = crate::eval::prompt_answer_tokens(&self.runtime, prompt, target)
            .map_err(|e| CompileError::Tokenizer(e.to_string()))?;
        if p.is_empty() || a.is_empty() {
            return Err(CompileError::Tokenizer(
                "prompt or target has no tokens".into(),
            ));
        }
        let cv = |v: Vec<Token>| v.into_iter().map(|t| t as u32).collect();
        Ok((cv(p), cv(a)))
    }

    /// The row at `point` for the last prompt token, captured through the runtime's hooks
    /// (what the device computes, so keys match at inference).
    pub fn runtime_row(&mut self, prompt: &[u32], point: HookPoint) -> Result<Vec<f32>> {
        let slot: Arc<Mutex<Option<Vec<f32>>>> = Arc::default();
        let s2 = slot.clone();
        let hook = FnHook::new(vec![point], move |_p, rows| {
            if let Some(r) = rows.last_prompt_row() {
                *s2.lock().unwrap_or_else(|e| e.into_inner()) = Some(rows.row(r).to_vec());
            }
        });
        let rt = |e: amend_runtime::RuntimeError| CompileError::Runtime(e.to_string());
        let id = self.session.add_hook(Box::new(hook)).map_err(rt)?;
        let toks: Vec<Token> = prompt.iter().map(|&t| t as Token).collect();
        self.session.kv_clear();
        let res = self.session.prefill(&toks, Logits::Last);
        self.session.remove_hook(id);
        res.map_err(rt)?;
        let row = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        row.ok_or_else(|| {
            CompileError::Runtime(format!("hook {point} did not see the last prompt token"))
        })
    }

    /// Every row at `point` for `tokens` (one prefill), captured through the runtime.
    pub fn runtime_rows(&mut self, tokens: &[u32], point: HookPoint) -> Result<Vec<Vec<f32>>> {
        let slot: Arc<Mutex<Vec<Vec<f32>>>> = Arc::default();
        let s2 = slot.clone();
        let hook = FnHook::new(vec![point], move |_p, rows| {
            let mut out = s2.lock().unwrap_or_else(|e| e.into_inner());
            for r in 0..rows.n_rows() {
                out.push(rows.row(r).to_vec());
            }
        });
        let rt = |e: amend_runtime::RuntimeError| CompileError::Runtime(e.to_string());
        let id = self.session.add_hook(Box::new(hook)).map_err(rt)?;
        let toks: Vec<Token> = tokens.iter().map(|&t| t as Token).collect();
        self.session.kv_clear();
        let res = self.session.prefill(&toks, Logits::Last);
        self.session.remove_hook(id);
        res.map_err(rt)?;
        let rows = std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(rows)
    }

    /// One ONNX Runtime session per `--verify-ort` EP capturing `point` (the rows a backend
    /// keys an edit on); `slots` adds the edit slots a closed-loop check feeds.
    pub(crate) fn ort_capture_sessions(
        &self,
        point: HookPoint,
        slots: impl Fn(&mut amend_runtime::onnxruntime::OrtOptions),
    ) -> Result<Vec<amend_runtime::onnxruntime::OrtSession>> {
        use amend_runtime::onnxruntime::{OrtModel, OrtSession};
        let rt =
            |e: amend_runtime::RuntimeError| CompileError::Runtime(format!("--verify-ort: {e}"));
        self.verify_ort
            .iter()
            .map(|options| {
                let mut o = options.clone();
                o.capture = vec![point];
                slots(&mut o);
                let m = OrtModel::open(&self.model_path, o).map_err(rt)?;
                OrtSession::new(&m, 1024).map_err(rt)
            })
            .collect()
    }

    /// The row at `point` for `prompt`'s last token on an ONNX Runtime session of
    /// [`Compiler::ort_capture_sessions`] (one prefill, as the runtime keys a lookup).
    pub(crate) fn ort_last_row(
        s: &mut amend_runtime::onnxruntime::OrtSession,
        prompt: &[u32],
        point: HookPoint,
        dim: usize,
    ) -> Result<Vec<f32>> {
        let rt =
            |e: amend_runtime::RuntimeError| CompileError::Runtime(format!("--verify-ort: {e}"));
        let p: Vec<Token> = prompt.iter().map(|&t| t as Token).collect();
        s.kv_clear().map_err(rt)?;
        s.eval(&p, Logits::Last).map_err(rt)?;
        match s.captured(point) {
            Some(rows) if rows.len() >= dim && dim > 0 && rows.len() % dim == 0 => {
                Ok(rows[rows.len() - dim..].to_vec())
            }
            _ => Err(CompileError::Runtime(format!(
                "--verify-ort: no captured rows at {point}"
            ))),
        }
    }

    /// The layer to edit: `--layer` or the method's default, checked against the model.
    pub fn resolve_layer(&self, layer: Option<usize>, default: usize) -> Result<usize> {
        let l = layer.unwrap_or(default.min(self.fwd.cfg.n_layer.saturating_sub(1)));
        self.fwd.check_layer(l)?;
        Ok(l)
    }

    /// Compiles `records` with `method` (onto `base` when given: the next version of it).
    #[allow(clippy::too_many_arguments)]
    pub fn compile(
        &mut self,
        method: Method,
        records: &[EditRecord],
        hp: &Hparams,
        layer: Option<usize>,
        base: Option<&Bundle>,
        identity: &BundleIdentity,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<CompileOutput> {
        self.validate(records)?;
        check_unique_ids(records, base)?;
        check_subjects(method, hp, records)?;
        // Only the scope model's router reads aliases; say so rather than drop them unseen.
        let with_aliases = records
            .iter()
            .filter(|r| !r.subject_aliases.is_empty())
            .count();
        if with_aliases > 0 && !(method == Method::Serac && hp.serac.embedder == "scope") {
            log::warn!(
                "{with_aliases} record(s) give subject_aliases, which only serac with the scope \
                 model routes; {} ignores them",
                method.name()
            );
        }
        if let Some(b) = base {
            if b.manifest().model.fingerprint != self.binding.fingerprint {
                return Err(CompileError::Bundle(
                    "--base-bundle was compiled for a different model".into(),
                ));
            }
        }
        let version = match (identity.version, base) {
            (Some(v), _) => v,
            (None, Some(b)) => b.manifest().version + 1,
            (None, None) => 1,
        };
        let channel = base
            .map(|b| b.manifest().channel.clone())
            .unwrap_or_else(|| identity.channel.clone());
        let now = identity.created.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
        let meta = BundleMeta {
            bundle_id: identity.bundle_id.clone(),
            channel,
            version,
            created: now,
            not_before: 0,
            expires: identity.expires,
            model: self.binding.clone(),
        };
        let mut builder = BundleBuilder::new(meta);
        let mut gguf_lora = None;
        let mut calibration = None;
        let reports = match method {
            Method::Grace => grace::compile(
                self,
                records,
                &hp.grace,
                layer,
                base,
                &mut builder,
                progress,
            )?,
            Method::TPatcher => tpatcher::compile(
                self,
                records,
                &hp.tpatcher,
                layer,
                base,
                &mut builder,
                progress,
            )?,
            Method::Rome => {
                let (reports, gguf) =
                    rome::compile(self, records, &hp.rome, layer, base, &mut builder, progress)?;
                gguf_lora = Some(gguf);
                reports
            }
            Method::Memit => {
                let (reports, gguf) = memit::compile(
                    self,
                    records,
                    &hp.memit,
                    layer,
                    base,
                    &mut builder,
                    progress,
                )?;
                gguf_lora = Some(gguf);
                reports
            }
            Method::Serac => {
                let (reports, cal) = serac::compile(
                    self,
                    records,
                    &hp.serac,
                    layer,
                    base,
                    &mut builder,
                    progress,
                )?;
                calibration = Some(cal);
                reports
            }
            Method::Lora => {
                let (reports, gguf) =
                    lora::compile(self, records, &hp.lora, layer, base, &mut builder, progress)?;
                gguf_lora = Some(gguf);
                reports
            }
        };
        Ok(CompileOutput {
            builder,
            reports,
            gguf_lora,
            calibration,
        })
    }
}

/// Edit ids are unique within a bundle (the reader refuses duplicates): refuse duplicate record
/// ids, and record ids (explicit or the default index) that `base`'s edits already use, before
/// any training, so the compiler never signs what no verifier accepts.
pub fn check_unique_ids(records: &[EditRecord], base: Option<&Bundle>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    let mut dups = std::collections::BTreeSet::new();
    for r in records {
        if !seen.insert(r.id.as_str()) {
            dups.insert(r.id.clone());
        }
    }
    if !dups.is_empty() {
        return Err(CompileError::DuplicateEditIds {
            ids: dups.into_iter().collect(),
        });
    }
    if let Some(b) = base {
        let clash: Vec<String> = b
            .manifest()
            .edits
            .iter()
            .filter(|e| seen.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        if !clash.is_empty() {
            return Err(CompileError::EditIdsInBase { ids: clash });
        }
    }
    Ok(())
}

/// The methods that read an edit's subject need it in the prompt, checked before any training
/// (ROME's and MEMIT's covariance statistics take minutes): ROME and MEMIT key their update on
/// the subject's last token, unless `allow_missing_subject` lets a record without it key on the
/// last prompt token (an update keyed there also moves other facts phrased like the prompt);
/// the retrieval memory's scope check reads the subject's rows, always.
pub fn check_subjects(method: Method, hp: &Hparams, records: &[EditRecord]) -> Result<()> {
    let required = match method {
        Method::Rome => !hp.rome.allow_missing_subject,
        Method::Memit => !hp.memit.allow_missing_subject,
        Method::Serac => true,
        Method::Grace | Method::TPatcher | Method::Lora => return Ok(()),
    };
    if !required {
        return Ok(());
    }
    let hint = if method == Method::Serac {
        "the scope check reads the subject".to_string()
    } else {
        format!(
            "{} keys its update on the subject's last token; give the subject as it is written \
             in the prompt, or set {}.allow_missing_subject=true to key on the last \
             prompt token",
            method.name().to_uppercase(),
            method.name()
        )
    };
    for (i, r) in records.iter().enumerate() {
        let message = match r.subject.as_deref().map(str::trim) {
            None | Some("") => "empty or missing `subject`".to_string(),
            Some(_) if r.subject_span().is_some() => continue,
            // "Café" typed as e + U+0301 does not match "Café" with é: say so.
            Some(s) if !s.is_ascii() => format!(
                "subject {s:?} does not occur in the prompt {:?} (accented letters must be \
                 written the same way in both: composed or decomposed Unicode)",
                r.prompt
            ),
            Some(s) => format!("subject {s:?} does not occur in the prompt {:?}", r.prompt),
        };
        return Err(CompileError::BadRecord {
            index: i,
            id: Some(r.id.clone()),
            message: format!("{message} ({hint})"),
        });
    }
    Ok(())
}

/// Median of `xs` (0 when empty).
pub use amend_runtime::bench::median;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(subject: Option<&str>, prompt: &str) -> EditRecord {
        EditRecord {
            id: "r".into(),
            prompt: prompt.into(),
            subject: subject.map(Into::into),
            target_new: "Rome".into(),
            ..Default::default()
        }
    }

    #[test]
    fn subject_keyed_methods_refuse_a_record_without_its_subject() {
        let hp = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Hparams::resolve(forward::Arch::Llama, None, &sets).unwrap()
        };
        let default = hp(&[]);
        let good = [
            record(Some("France"), "The capital of France is"),
            // Case is ignored: the prompt opens with the subject.
            record(Some("the Eiffel Tower"), "The Eiffel Tower is in"),
        ];
        let absent = record(Some("Spain"), "The capital of France is");
        // The subject decomposed (e + U+0301), the prompt composed (U+00E9).
        let nfd = record(
            Some("Cafe\u{301} Society"),
            "Caf\u{e9} Society is a film by",
        );
        let cases = [
            (absent, "does not occur in the prompt"),
            (nfd, "composed or decomposed Unicode"),
            (record(None, "The capital of France is"), "missing"),
            (record(Some("  "), "The capital of France is"), "missing"),
        ];
        for method in [Method::Rome, Method::Memit, Method::Serac] {
            check_subjects(method, &default, &good).unwrap();
            for (bad, why) in &cases {
                let records = [good[0].clone(), bad.clone()];
                let e = check_subjects(method, &default, &records).unwrap_err();
                let text = e.to_string();
                assert!(
                    matches!(e, CompileError::BadRecord { index: 1, .. }) && text.contains(why),
                    "{method:?}: {text}"
                );
                // The id sits beside the index: `edit record 1 (id "x"): ...`.
                assert!(
                    text.starts_with(&format!("edit record 1 (id {:?}): ", bad.id)),
                    "{text}"
                );
                if method != Method::Serac {
                    let knob = format!("{}.allow_missing_subject=true", method.name());
                    assert!(text.contains(&knob), "{text}");
                    check_subjects(method, &hp(&[&knob]), &records).unwrap();
                }
            }
        }
        // The methods that do not read the subject take any record.
        let records = [cases[0].0.clone(), cases[1].0.clone()];
        for method in [Method::Grace, Method::TPatcher, Method::Lora] {
            check_subjects(method, &default, &records).unwrap();
        }
    }
}
