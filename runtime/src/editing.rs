//! Applying the active [`EditSet`] in a session, above the backend seam: the request path
//! ([`begin`]: expiry, pinning, the per-snapshot [`EditPlan`], memory routing, the routed answer,
//! explain) is written once over [`EditHost`]. On llama.cpp codebooks and patch neurons run as
//! hooks and low-rank deltas as LoRA adapters (this file); on ONNX Runtime all of them are fed
//! into the graph's edit slots (`onnxruntime::slots`). Memories are a scope check on the host
//! that routes the prompt, on both.
//!
//! A session pins one [`ActiveSet`] snapshot per request ([`Session::begin_request`]): a hot swap
//! published while a request runs takes effect at the next request, never in the middle of one.
//! The plan built from a snapshot is cached by the snapshot's identity, so an unchanged set costs
//! one atomic load per request.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use amend_edits::bundle::Payload;
use amend_edits::families::{self, Codebook, Embedder, Memory, PatchNeurons, Pooling};
use amend_edits::{ActiveSet, EditSet, HookPoint, Site};
use llama_cpp_sys_2 as sys;

use crate::error::RuntimeError;
use crate::hooks::{FnHook, Hook, HookId, HookRows, Phase};
use crate::model::Model;
use crate::scope::ScopeModel;
use crate::session::{EvalOptions, Logits, Session};

/// The `llama-cpp-sys-2` release this runtime links, once for both constants below.
macro_rules! llama_cpp_sys_version {
    () => {
        "0.1.161"
    };
}

/// The `llama-cpp-sys-2` release this runtime links. It pins llama.cpp's source, so its kernels
/// and roundings: the numbers an edit was verified against. A test holds it to the workspace's pin.
pub const LLAMA_CPP_SYS_VERSION: &str = llama_cpp_sys_version!();

/// The backend id of llama.cpp in a bundle's verification record: `llama.cpp-`, the
/// [`LLAMA_CPP_SYS_VERSION`] and the device (the CPU, the only one this build runs on). A bundle
/// verified on another build of llama.cpp names another id, so it warns here (or is refused when
/// it requires verification) instead of counting as verified. ONNX Runtime's:
/// `onnxruntime::OrtOptions::backend_id`, e.g. `onnxruntime-1.24.1:openvino:CPU/g7-cpu`.
pub const LLAMA_CPP_BACKEND_ID: &str = concat!("llama.cpp-", llama_cpp_sys_version!(), ":cpu");

/// Checks `bundle`'s verification record against the backend it is about to run on (`backend`:
/// [`crate::Backend::backend_id`]). `Ok(None)`: verified there, or the bundle has no record
/// (v1.1, nothing to compare). `Ok(Some(event))`: not verified there, a warning for `explain`.
/// `Err(Unverified)`: the bundle requires verification and lacks it; nothing of it is applied.
pub fn check_verified(
    bundle: &amend_edits::Bundle,
    backend: &str,
) -> Result<Option<UnverifiedEvent>, RuntimeError> {
    let Some(v) = &bundle.manifest().verification else {
        return Ok(None);
    };
    if v.covers(backend) {
        return Ok(None);
    }
    if v.required {
        return Err(RuntimeError::Unverified {
            bundle: bundle.id().to_string(),
            backend: backend.to_string(),
            verified: v.describe(),
        });
    }
    Ok(Some(UnverifiedEvent {
        bundle: bundle.id().to_string(),
        backend: backend.to_string(),
        verified: v.describe(),
    }))
}

/// Checks that every scope-model memory of `bundle` can be routed by `scope`: the bundle pins a
/// fingerprint and the configured scope model has it. Errors: `ScopeModelMissing`,
/// `ScopeModelMismatch`, `InvalidEdit` (a v1.0 payload naming an external model without a
/// fingerprint).
pub fn check_scope_model(
    bundle: &amend_edits::Bundle,
    scope: Option<&ScopeModel>,
) -> Result<(), RuntimeError> {
    for p in bundle.payloads() {
        let Payload::Memory(d) = p else { continue };
        match &d.embedder {
            amend_edits::bundle::EmbedderDesc::BaseModel { .. } => {}
            amend_edits::bundle::EmbedderDesc::External { model_id } => {
                return Err(RuntimeError::InvalidEdit(format!(
                    "bundle {}: its memory names the embedding model {model_id:?} without a fingerprint; recompile it",
                    bundle.id()
                )))
            }
            amend_edits::bundle::EmbedderDesc::ScopeModel(sr)
            | amend_edits::bundle::EmbedderDesc::ScopeModelHead(sr, _)
            | amend_edits::bundle::EmbedderDesc::ScopeModelGroups(sr, _, _)
            | amend_edits::bundle::EmbedderDesc::ScopeModelGroupsMargin(sr, _, _, _)
            | amend_edits::bundle::EmbedderDesc::ScopeModelGroupsVote(sr, _, _, _, _) => {
                let hex = amend_edits::keys::to_hex(&sr.fingerprint);
                let Some(m) = scope else {
                    return Err(RuntimeError::ScopeModelMissing {
                        bundle: bundle.id().to_string(),
                        model_id: sr.model_id.clone(),
                        fingerprint: hex,
                    });
                };
                if m.fingerprint() != sr.fingerprint {
                    return Err(RuntimeError::ScopeModelMismatch {
                        bundle: bundle.id().to_string(),
                        model_id: sr.model_id.clone(),
                        expected: hex,
                        got: amend_edits::keys::to_hex(&m.fingerprint()),
                        path: m.path().to_path_buf(),
                    });
                }
                if d.embed_dim as usize != m.n_embd() {
                    return Err(RuntimeError::InvalidEdit(format!(
                        "bundle {}: memory embed_dim {} but the scope model has {}",
                        bundle.id(),
                        d.embed_dim,
                        m.n_embd()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// What fired during the last request (`amend run --explain`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Explain {
    /// Snapshot generation the request pinned (`None`: no edit set attached).
    pub generation: Option<u64>,
    pub codebook: Vec<CodebookEvent>,
    pub neurons: Vec<NeuronEvent>,
    pub memory: Option<MemoryEvent>,
    pub low_rank: Vec<LowRankEvent>,
    /// Bundles that had expired by this request and were removed from the set before it
    /// (expiry is enforced per request, not only at activation).
    pub expired: Vec<ExpiredEvent>,
    /// Active bundles whose verification record does not cover this backend: a warning (their
    /// edits were checked elsewhere, and numerics differ a little between backends).
    pub unverified: Vec<UnverifiedEvent>,
}

/// A bundle applied on a backend its compiler did not verify every edit on.
#[derive(Clone, Debug, PartialEq)]
pub struct UnverifiedEvent {
    pub bundle: String,
    /// This session's backend id.
    pub backend: String,
    /// Where it was verified: `llama.cpp 34/34, onnxruntime-1.32.0:cpu/g7-cpu 33/34`.
    pub verified: String,
}

/// A bundle removed at the start of a request because its `expires` time had passed.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpiredEvent {
    pub bundle: String,
    pub expires: u64,
    pub now: u64,
}

/// A codebook lookup: the nearest entry, its distance and whether it replaced the row.
#[derive(Clone, Debug, PartialEq)]
pub struct CodebookEvent {
    pub bundle: String,
    pub edit_id: Option<String>,
    pub layer: u32,
    pub entry: usize,
    pub pos: i32,
    pub distance: f32,
    pub radius: f32,
    pub replaced: bool,
}

/// A patch neuron that fired (positive activation), with its largest activation and how many
/// positions it fired at.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronEvent {
    pub bundle: String,
    pub edit_id: Option<String>,
    pub layer: u32,
    pub neuron: usize,
    pub max_activation: f32,
    pub positions: usize,
}

/// The scope check of the request's prompt against the active memories.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEvent {
    pub bundle: String,
    pub edit_id: Option<String>,
    pub record: usize,
    /// What decided "in scope" against `threshold`: the cosine (base-model or scope-model
    /// pooled), or a scope head's mean logit.
    pub score: f32,
    pub threshold: f32,
    pub in_scope: bool,
    /// The prompt the model was given (the counterfactual prompt when in scope).
    pub routed_prompt: String,
    /// In scope with an `{answer}` template: the text the model was made to say first.
    pub answer: Option<String>,
    /// Scope-model memories: the subject (MaxSim) and relation terms of the chosen record, and
    /// how many examined records were in scope (several: the best one was used).
    pub scope_terms: Option<ScopeTerms>,
}

/// The token-level terms of a scope-model routing decision (see `Memory::route`).
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeTerms {
    pub pooled: f32,
    pub subject: f32,
    pub relation: f32,
    pub subject_threshold: f32,
    pub relation_threshold: f32,
    /// With a trained scope head that decided (not where relation groups did): its mean logit
    /// for the chosen record and the threshold it must reach (also the event's `score` and
    /// `threshold`).
    pub head: Option<(f32, f32)>,
    pub n_in_scope: usize,
    /// Where relation groups decided (format 1.4) or voted (1.6): the record's group and the
    /// query's (`None`: no template was close enough), by name.
    pub groups: Option<(String, Option<String>)>,
    /// Where the groups voted with the head (format 1.6): what they added to its logit
    /// (included in `head`'s logit).
    pub vote: Option<f32>,
}

/// A low-rank adapter applied to the request.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRankEvent {
    pub bundle: String,
    pub scale: f32,
    /// Base tensors the adapter changes.
    pub tensors: usize,
    /// The largest rank over those tensors: a bundle's active deltas on one weight are merged,
    /// so N rank-one edits on one weight show as rank N.
    pub rank: usize,
}

/// The edit of `unit` (a row, neuron, record or tensor) of payload `p` of a bundle.
pub(crate) fn edit_of(set: &ActiveSet, bundle: usize, p: usize, unit: usize) -> Option<String> {
    let b = &set.bundles.get(bundle)?.bundle;
    b.manifest()
        .edits
        .iter()
        .find(|e| {
            e.payload as usize == p
                && (e.first as usize..(e.first + e.count) as usize).contains(&unit)
        })
        .map(|e| e.id.clone())
}

pub(crate) struct PlannedCodebook {
    pub(crate) bundle: usize,
    pub(crate) payload: usize,
    pub(crate) rows: Range<usize>,
    pub(crate) cb: Codebook<'static>,
}

pub(crate) struct PlannedNeurons {
    pub(crate) bundle: usize,
    pub(crate) payload: usize,
    pub(crate) rows: Range<usize>,
    pub(crate) pn: PatchNeurons<'static>,
}

pub(crate) struct PlannedMemory {
    pub(crate) bundle: usize,
    pub(crate) payload: usize,
    pub(crate) rows: Range<usize>,
    pub(crate) mem: Memory<'static>,
}

/// One bundle's low-rank deltas: its explicit deltas merged into one set of tensors, or a
/// GGUF-LoRA payload as delivered. Each backend applies them its own way (llama.cpp: an adapter;
/// ONNX Runtime: slot inputs).
pub(crate) struct PlannedLowRank {
    pub(crate) bundle: usize,
    /// The user's scale for the bundle ([`Session::set_lora_scale`]).
    pub(crate) scale: f32,
    pub(crate) source: LowRankSource,
    /// Base tensors changed and the largest rank (explain).
    pub(crate) tensors: usize,
    pub(crate) rank: usize,
}

pub(crate) enum LowRankSource {
    Merged(families::LowRankMerger),
    Gguf(&'static [u8]),
}

/// A llama.cpp LoRA adapter built from one [`PlannedLowRank`] (freed on drop).
struct Adapter {
    ptr: NonNull<sys::llama_adapter_lora>,
    scale: f32,
}

// SAFETY: the adapter is only read by llama.cpp through a context the owning session drives
// with &mut self.
unsafe impl Send for Adapter {}
unsafe impl Sync for Adapter {}

impl Drop for Adapter {
    fn drop(&mut self) {
        // SAFETY: created by llama_adapter_lora_init_from_file_ptr; the owning session detaches
        // it from its context before dropping it (`unpin`).
        unsafe { sys::llama_adapter_lora_free(self.ptr.as_ptr()) };
    }
}

impl Adapter {
    fn load(model: &Model, lr: &PlannedLowRank, arch: &str) -> Result<Adapter, RuntimeError> {
        // Any tensor type (F32, F16, BF16, quantized) is handed to llama.cpp as it is, after the
        // structural check of `EditPlan::build`; llama.cpp then checks each tensor against the
        // model's.
        let ptr = match &lr.source {
            LowRankSource::Gguf(blob) => load_adapter(model, blob)?,
            LowRankSource::Merged(m) => {
                let low = m
                    .to_low_rank()
                    .map_err(|e| RuntimeError::InvalidEdit(e.to_string()))?;
                load_adapter(model, &low.to_gguf_lora(arch))?
            }
        };
        Ok(Adapter {
            ptr,
            scale: lr.scale,
        })
    }
}

/// What a plan needs of the model it is built for.
pub(crate) trait PlanTarget {
    /// The model (or graph) has this hook point.
    fn check_point(&self, p: HookPoint) -> Result<(), RuntimeError>;
    /// A low-rank delta `[n_in] -> [n_out]` on the tensor `name` fits the model.
    fn check_low_rank(&self, name: &str, n_in: u64, n_out: u64) -> Result<(), RuntimeError>;
    /// The id bundles' verification records name this backend by.
    fn backend_id(&self) -> String;
}

impl PlanTarget for Model {
    fn check_point(&self, p: HookPoint) -> Result<(), RuntimeError> {
        self.node_name(p).map(|_| ())
    }
    fn check_low_rank(&self, name: &str, n_in: u64, n_out: u64) -> Result<(), RuntimeError> {
        Model::check_low_rank(self, name, n_in, n_out)
    }
    fn backend_id(&self) -> String {
        LLAMA_CPP_BACKEND_ID.into()
    }
}

/// Everything one snapshot needs at inference, with the views borrowed from the snapshot. The
/// same plan serves every backend.
pub(crate) struct EditPlan {
    pub(crate) codebooks: Vec<PlannedCodebook>,
    pub(crate) neurons: Vec<PlannedNeurons>,
    pub(crate) memories: Vec<PlannedMemory>,
    pub(crate) low_rank: Vec<PlannedLowRank>,
    /// Bundles not verified on this backend (see [`check_verified`]).
    pub(crate) unverified: Vec<UnverifiedEvent>,
    /// Owns the bundle bytes every `'static` view above borrows; declared last so it drops last.
    pub(crate) set: Arc<ActiveSet>,
}

/// Extends a view's lifetime to the plan's. SAFETY (callers): the data lives in a bundle owned by
/// `EditPlan::set` (heap or mmap, never moved or mutated while shared), which outlives the view.
unsafe fn extend<T>(v: T) -> T::Static
where
    T: Reborrow,
{
    unsafe { v.into_static() }
}

trait Reborrow {
    type Static;
    unsafe fn into_static(self) -> Self::Static;
}

macro_rules! reborrow {
    ($t:ident) => {
        impl<'a> Reborrow for $t<'a> {
            type Static = $t<'static>;
            unsafe fn into_static(self) -> $t<'static> {
                unsafe { std::mem::transmute::<$t<'a>, $t<'static>>(self) }
            }
        }
    };
}
reborrow!(Codebook);
reborrow!(PatchNeurons);
reborrow!(Memory);

impl EditPlan {
    pub(crate) fn build(
        model: &dyn PlanTarget,
        scope: Option<&ScopeModel>,
        set: Arc<ActiveSet>,
        lora_scales: &BTreeMap<String, f32>,
    ) -> Result<EditPlan, RuntimeError> {
        let mut plan = EditPlan {
            codebooks: Vec::new(),
            neurons: Vec::new(),
            memories: Vec::new(),
            low_rank: Vec::new(),
            unverified: Vec::new(),
            set: set.clone(),
        };
        let backend = model.backend_id();
        let bad = |what: String| RuntimeError::InvalidEdit(what);
        for (bi, ab) in set.bundles.iter().enumerate() {
            let b = &ab.bundle;
            // Before anything of the bundle is planned: all of it or none.
            check_scope_model(b, scope)?;
            if let Some(w) = check_verified(b, &backend)? {
                plan.unverified.push(w);
            }
            let scale = lora_scales.get(b.id()).copied().unwrap_or(1.0);
            // A bundle's explicit low-rank deltas become one adapter (see `LowRankMerger`: with
            // one adapter per edit llama.cpp's sum order, and so the output, varied per run).
            let mut merger = families::LowRankMerger::default();
            for (p, payload) in b.payloads().iter().enumerate() {
                let runs = ab.active_runs(p);
                match payload {
                    Payload::Codebook(_) => {
                        for r in runs {
                            let Some(v) = b.codebook(p, r.clone()) else {
                                continue;
                            };
                            let cb = v.to_family().map_err(|e| bad(format!("{}: {e}", b.id())))?;
                            check_point(model, cb.layer(), cb.key_site())?;
                            check_point(model, cb.layer(), cb.replace_site())?;
                            // SAFETY: see `extend`; `plan.set` keeps the bundle alive.
                            let cb = unsafe { extend(cb) };
                            plan.codebooks.push(PlannedCodebook {
                                bundle: bi,
                                payload: p,
                                rows: r,
                                cb,
                            });
                        }
                    }
                    Payload::PatchNeurons(_) => {
                        for r in runs {
                            let Some(v) = b.patch_neurons(p, r.clone()) else {
                                continue;
                            };
                            let pn = v.to_family().map_err(|e| bad(format!("{}: {e}", b.id())))?;
                            check_point(model, pn.layer(), pn.read_site())?;
                            check_point(model, pn.layer(), pn.write_site())?;
                            let pn = unsafe { extend(pn) };
                            plan.neurons.push(PlannedNeurons {
                                bundle: bi,
                                payload: p,
                                rows: r,
                                pn,
                            });
                        }
                    }
                    Payload::Memory(_) => {
                        for r in runs {
                            let Some(v) = b.memory(p, r.clone()) else {
                                continue;
                            };
                            let mem = v.to_family().map_err(|e| bad(format!("{}: {e}", b.id())))?;
                            if let Embedder::BaseModel { layer, site, .. } = mem.embedder() {
                                check_point(model, layer, site)?;
                            }
                            // The half-size first pass keeps the scope check under 1 ms at 10k memories.
                            let mem = unsafe { extend(mem.with_f16_index()) };
                            plan.memories.push(PlannedMemory {
                                bundle: bi,
                                payload: p,
                                rows: r,
                                mem,
                            });
                        }
                    }
                    Payload::LowRank(_) => {
                        if runs.is_empty() {
                            continue;
                        }
                        let Some(views) = b.low_rank(p, |i| runs.iter().any(|r| r.contains(&i)))
                        else {
                            continue;
                        };
                        if views.is_empty() {
                            continue;
                        }
                        let lr = amend_edits::bundle::LowRankTensorView::to_family(&views)
                            .map_err(|e| bad(format!("{}: {e}", b.id())))?;
                        for t in lr.tensors() {
                            model.check_low_rank(t.name, t.n_in as u64, t.n_out as u64)?;
                            merger.add(t).map_err(|e| bad(format!("{}: {e}", b.id())))?;
                        }
                    }
                    Payload::LowRankGguf(_) => {
                        if runs.is_empty() {
                            continue;
                        }
                        if let Some(blob) = b.gguf_lora(p) {
                            let info = families::inspect_gguf_lora(blob)
                                .map_err(|e| bad(format!("GGUF-LoRA of bundle {}: {e}", b.id())))?;
                            for t in &info.tensors {
                                model.check_low_rank(&t.name, t.n_in, t.n_out)?;
                            }
                            // SAFETY: see `extend`; `plan.set` keeps the bundle alive.
                            let blob: &'static [u8] = unsafe { std::mem::transmute(blob) };
                            plan.low_rank.push(PlannedLowRank {
                                bundle: bi,
                                scale,
                                source: LowRankSource::Gguf(blob),
                                tensors: info.tensors.len(),
                                rank: info
                                    .tensors
                                    .iter()
                                    .map(|t| t.rank as usize)
                                    .max()
                                    .unwrap_or(0),
                            });
                        }
                    }
                }
            }
            if !merger.is_empty() {
                let lr = merger
                    .to_low_rank()
                    .map_err(|e| bad(format!("{}: {e}", b.id())))?;
                let (tensors, rank) = (
                    lr.tensors().len(),
                    lr.tensors().iter().map(|t| t.rank).max().unwrap_or(0),
                );
                plan.low_rank.push(PlannedLowRank {
                    bundle: bi,
                    scale,
                    source: LowRankSource::Merged(merger),
                    tensors,
                    rank,
                });
            }
        }
        Ok(plan)
    }

    fn is_empty_of_hooks(&self) -> bool {
        self.codebooks.is_empty() && self.neurons.is_empty()
    }

    /// The explain entries of the plan's low-rank deltas.
    pub(crate) fn low_rank_events(&self) -> Vec<LowRankEvent> {
        self.low_rank
            .iter()
            .map(|l| LowRankEvent {
                bundle: self.bundle_id(l.bundle),
                scale: l.scale,
                tensors: l.tensors,
                rank: l.rank,
            })
            .collect()
    }

    pub(crate) fn bundle_id(&self, bi: usize) -> String {
        self.set
            .bundles
            .get(bi)
            .map(|b| b.id().to_string())
            .unwrap_or_default()
    }
}

fn check_point(model: &dyn PlanTarget, layer: u32, site: Site) -> Result<(), RuntimeError> {
    model.check_point(HookPoint::new(layer, site))
}

/// Loads a GGUF-LoRA from memory: llama.cpp reads adapters from a `FILE*`, which `fmemopen`
/// gives us over the bytes without touching the file system.
fn load_adapter(
    model: &Model,
    blob: &[u8],
) -> Result<NonNull<sys::llama_adapter_lora>, RuntimeError> {
    let mode = CString::new("rb").expect("static");
    // SAFETY: fmemopen reads `blob` (alive until fclose below); llama.cpp copies what it keeps.
    unsafe {
        let f = libc::fmemopen(
            blob.as_ptr() as *mut libc::c_void,
            blob.len(),
            mode.as_ptr(),
        );
        if f.is_null() {
            return Err(RuntimeError::InvalidEdit(
                "cannot open the adapter bytes (fmemopen)".into(),
            ));
        }
        let p = sys::llama_adapter_lora_init_from_file_ptr(model.as_ptr(), f as *mut _);
        libc::fclose(f);
        NonNull::new(p).ok_or_else(|| {
            RuntimeError::InvalidEdit(
                "llama.cpp refused the low-rank adapter (architecture or tensor shapes do not match the model)"
                    .into(),
            )
        })
    }
}

/// Codebook hits found at a key site, waiting for the replace site of the same ubatch.
struct PendingReplace {
    codebook: usize,
    pos: i32,
    entry: usize,
}

/// Neuron contributions computed at the read site, waiting for the write site.
struct PendingAdd {
    neurons: usize,
    pos: i32,
    delta: Vec<f32>,
}

/// The hook that applies one plan's codebooks and neurons.
struct EditHook {
    plan: Arc<EditPlan>,
    explain: Arc<Mutex<Explain>>,
    replaces: Vec<PendingReplace>,
    adds: Vec<PendingAdd>,
    acts: Vec<f32>,
    delta: Vec<f32>,
}

impl EditHook {
    fn record_neurons(&self, ni: usize, acts: &[f32]) {
        let pl = &self.plan.neurons[ni];
        let mut ex = self.explain.lock().unwrap_or_else(|e| e.into_inner());
        for (j, &a) in acts.iter().enumerate() {
            if a <= 0.0 {
                continue;
            }
            let unit = pl.rows.start + j;
            if let Some(e) = ex.neurons.iter_mut().find(|e| {
                e.layer == pl.pn.layer()
                    && e.neuron == unit
                    && e.bundle == self.plan.bundle_id(pl.bundle)
            }) {
                e.max_activation = e.max_activation.max(a);
                e.positions += 1;
            } else {
                ex.neurons.push(NeuronEvent {
                    bundle: self.plan.bundle_id(pl.bundle),
                    edit_id: edit_of(&self.plan.set, pl.bundle, pl.payload, unit),
                    layer: pl.pn.layer(),
                    neuron: unit,
                    max_activation: a,
                    positions: 1,
                });
            }
        }
    }
}

impl Hook for EditHook {
    fn points(&self) -> Vec<HookPoint> {
        let mut pts: Vec<HookPoint> = Vec::new();
        for c in &self.plan.codebooks {
            pts.push(HookPoint::new(c.cb.layer(), c.cb.key_site()));
            pts.push(HookPoint::new(c.cb.layer(), c.cb.replace_site()));
        }
        for n in &self.plan.neurons {
            pts.push(HookPoint::new(n.pn.layer(), n.pn.read_site()));
            pts.push(HookPoint::new(n.pn.layer(), n.pn.write_site()));
        }
        pts.sort();
        pts.dedup();
        pts
    }

    fn on_tensor(&mut self, point: HookPoint, rows: &mut HookRows<'_>) {
        let plan = self.plan.clone();
        let n = rows.n_rows();
        // Reads first (a read and a write at the same point see the unmodified row).
        for (ci, c) in plan.codebooks.iter().enumerate() {
            if HookPoint::new(c.cb.layer(), c.cb.key_site()) != point {
                continue;
            }
            self.replaces.retain(|r| r.codebook != ci);
            for i in 0..n {
                let info = rows.info(i);
                let wanted = if c.cb.all_positions() {
                    true
                } else {
                    rows.phase() == Phase::Prefill && info.is_last_prompt_token
                };
                if !wanted {
                    continue;
                }
                let Some(hit) = c.cb.nearest(rows.row(i), None) else {
                    continue;
                };
                if hit.within_radius {
                    self.replaces.push(PendingReplace {
                        codebook: ci,
                        pos: info.pos,
                        entry: hit.index,
                    });
                }
                let mut ex = self.explain.lock().unwrap_or_else(|e| e.into_inner());
                ex.codebook.push(CodebookEvent {
                    bundle: plan.bundle_id(c.bundle),
                    edit_id: edit_of(&plan.set, c.bundle, c.payload, c.rows.start + hit.index),
                    layer: c.cb.layer(),
                    entry: c.rows.start + hit.index,
                    pos: info.pos,
                    distance: hit.distance,
                    radius: c.cb.radius(hit.index),
                    replaced: hit.within_radius,
                });
            }
        }
        for (ni, pl) in plan.neurons.iter().enumerate() {
            if HookPoint::new(pl.pn.layer(), pl.pn.read_site()) != point {
                continue;
            }
            self.adds.retain(|a| a.neurons != ni);
            self.acts.resize(pl.pn.len(), 0.0);
            // Scratch buffers are reused: rows where nothing fires (the usual case) allocate nothing.
            let mut acts = std::mem::take(&mut self.acts);
            let mut delta = std::mem::take(&mut self.delta);
            for i in 0..n {
                delta.clear();
                delta.resize(rows.n_embd(), 0.0);
                let fired = pl.pn.apply(rows.row(i), &mut delta, Some(&mut acts));
                if fired > 0 {
                    self.record_neurons(ni, &acts);
                    self.adds.push(PendingAdd {
                        neurons: ni,
                        pos: rows.info(i).pos,
                        delta: delta.clone(),
                    });
                }
            }
            self.acts = acts;
            self.delta = delta;
        }
        // Then writes, matched to the reads by token position (row order can differ on the
        // last layer, which keeps only output rows).
        for (ci, c) in plan.codebooks.iter().enumerate() {
            if HookPoint::new(c.cb.layer(), c.cb.replace_site()) != point {
                continue;
            }
            let mut k = 0;
            while k < self.replaces.len() {
                if self.replaces[k].codebook != ci {
                    k += 1;
                    continue;
                }
                let r = self.replaces.swap_remove(k);
                if let Some(i) = (0..n).find(|&i| rows.info(i).pos == r.pos) {
                    rows.row_mut(i).copy_from_slice(c.cb.value(r.entry));
                }
            }
        }
        for (ni, pl) in plan.neurons.iter().enumerate() {
            if HookPoint::new(pl.pn.layer(), pl.pn.write_site()) != point {
                continue;
            }
            let mut k = 0;
            while k < self.adds.len() {
                if self.adds[k].neurons != ni {
                    k += 1;
                    continue;
                }
                let a = self.adds.swap_remove(k);
                if let Some(i) = (0..n).find(|&i| rows.info(i).pos == a.pos) {
                    for (o, d) in rows.row_mut(i).iter_mut().zip(&a.delta) {
                        *o += d;
                    }
                }
            }
        }
    }
}

/// Per-session edit state: the live set, the plan of the last pinned snapshot and what fired.
/// The llama.cpp session also keeps its edit hook and adapters here (they are released with the
/// plan); ONNX Runtime keeps its slot feeds in its session.
#[derive(Default)]
pub(crate) struct SessionEdits {
    set: Option<Arc<EditSet>>,
    plan: Option<Arc<EditPlan>>,
    /// llama.cpp: the installed edit hook.
    hook: Option<HookId>,
    lora_scales: BTreeMap<String, f32>,
    pub(crate) explain: Arc<Mutex<Explain>>,
    /// Routes scope-model memories (shared by the process's sessions).
    scope: Option<Arc<ScopeModel>>,
    /// llama.cpp: the adapters built from `plan`'s low-rank deltas.
    adapters: Vec<Adapter>,
}

impl SessionEdits {
    /// Drops the plan and what was built from it. The caller detached it from its backend first.
    pub(crate) fn release(&mut self) {
        self.adapters.clear();
        self.plan = None;
    }

    pub(crate) fn plan(&self) -> Option<&Arc<EditPlan>> {
        self.plan.as_ref()
    }

    pub(crate) fn scope(&self) -> Option<&Arc<ScopeModel>> {
        self.scope.as_ref()
    }

    pub(crate) fn explain_snapshot(&self) -> Explain {
        self.explain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn with_explain(&self, f: impl FnOnce(&mut Explain)) {
        f(&mut self.explain.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The result of [`Session::begin_request`].
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The prompt to evaluate: the user's, or the counterfactual prompt of an in-scope memory.
    pub prompt: String,
    /// Generation of the pinned snapshot (`None`: no edit set attached).
    pub generation: Option<u64>,
    /// The routed memory's answer: the logits after `prompt` put it first (see `answer`).
    pub answer: Option<String>,
}

/// What the edit layer needs of a backend session. The request logic (expiry, snapshot pinning,
/// plan caching, memory routing, the answer plan, explain) is written once, in [`begin`], over
/// this trait.
pub(crate) trait EditHost {
    fn edits(&self) -> &SessionEdits;
    fn edits_mut(&mut self) -> &mut SessionEdits;
    fn plan_target(&self) -> &dyn PlanTarget;
    /// The tokenizer.
    fn vocab_model(&self) -> &Model;
    /// Builds the backend's state for a new plan (before it is pinned); an error leaves the
    /// previous state released and nothing applied.
    fn prepare(&mut self, plan: &Arc<EditPlan>) -> Result<(), RuntimeError>;
    /// Applies the pinned plan to the evaluations that follow.
    fn install(&mut self, plan: &Arc<EditPlan>) -> Result<(), RuntimeError>;
    /// Stops applying edits (the plan stays cached): the base model.
    fn uninstall(&mut self) -> Result<(), RuntimeError>;
    /// A memory's base-model embedding of `text` (see [`Session::embed`]).
    fn embed(
        &mut self,
        text: &str,
        layer: u32,
        site: Site,
        pooling: Pooling,
    ) -> Result<Vec<f32>, RuntimeError>;
    fn set_answer(&mut self, plan: Option<crate::answer::AnswerPlan>);
}

/// Uninstalls and forgets the plan (the next request rebuilds it).
pub(crate) fn unpin<H: EditHost + ?Sized>(h: &mut H) -> Result<(), RuntimeError> {
    h.uninstall()?;
    h.edits_mut().release();
    Ok(())
}

pub(crate) fn set_edit_set<H: EditHost + ?Sized>(
    h: &mut H,
    set: Option<Arc<EditSet>>,
) -> Result<(), RuntimeError> {
    h.edits_mut().set = set;
    unpin(h)
}

pub(crate) fn set_scope_model<H: EditHost + ?Sized>(
    h: &mut H,
    scope: Option<Arc<ScopeModel>>,
) -> Result<(), RuntimeError> {
    h.edits_mut().scope = scope;
    unpin(h)
}

/// The largest |scale| [`Session::set_lora_scale`] accepts. Useful scales are about 0..2
/// (0 off, 1 as compiled; a negative one subtracts the adapter, which undoes a merged one);
/// 100 leaves room for experiments while refusing what only overflows: adapter values may be
/// up to 1e6 (`MAX_ABS_VALUE`), and 1e30 gave non-finite logits, refused only at generation.
pub(crate) const MAX_LORA_SCALE: f32 = 100.0;

pub(crate) fn set_lora_scale<H: EditHost + ?Sized>(
    h: &mut H,
    bundle_id: &str,
    scale: f32,
) -> Result<(), RuntimeError> {
    // NaN is outside the range too. Checked before anything changes.
    if !(-MAX_LORA_SCALE..=MAX_LORA_SCALE).contains(&scale) {
        return Err(RuntimeError::InvalidOptions(format!(
            "LoRA scale {scale} for bundle {bundle_id:?} is outside \
             [-{MAX_LORA_SCALE}, {MAX_LORA_SCALE}] (1 applies the adapter as compiled, 0 \
             disables it, a negative scale subtracts it)"
        )));
    }
    // A scale belongs to an active bundle: an id no active bundle has is the caller's mistake
    // (a typo would otherwise be kept silently and scale nothing).
    let active = h
        .edits()
        .set
        .as_ref()
        .is_some_and(|set| set.snapshot().bundles.iter().any(|b| b.id() == bundle_id));
    if !active {
        return Err(RuntimeError::UnknownBundle(bundle_id.to_string()));
    }
    h.edits_mut()
        .lora_scales
        .insert(bundle_id.to_string(), scale);
    // Force a rebuild so the new scale is used.
    unpin(h)
}

/// Starts a request: pins the attached set's current snapshot (building the plan only when it
/// changed), routes `prompt` through the memories with the base model, and installs the plan.
pub(crate) fn begin<H: EditHost + ?Sized>(
    h: &mut H,
    prompt: Option<&str>,
) -> Result<Request, RuntimeError> {
    h.edits().with_explain(|e| *e = Explain::default());
    h.set_answer(None);
    let Some(set) = h.edits().set.clone() else {
        return Ok(Request {
            prompt: prompt.unwrap_or_default().to_string(),
            generation: None,
            answer: None,
        });
    };
    // Expiry per request: a bundle whose time has passed is removed (one swap, seen by every
    // session of the set) before this request pins its snapshot.
    let now = set.now();
    let expiring: Vec<ExpiredEvent> = set
        .snapshot()
        .bundles
        .iter()
        .filter(|b| now >= b.bundle.manifest().expires)
        .map(|b| ExpiredEvent {
            bundle: b.id().to_string(),
            expires: b.bundle.manifest().expires,
            now,
        })
        .collect();
    if !expiring.is_empty() {
        set.drop_expired()
            .map_err(|e| RuntimeError::InvalidEdit(format!("removing expired bundles: {e}")))?;
        for e in &expiring {
            log::warn!(
                "bundle {} expired at {} (now {}): no longer applied",
                e.bundle,
                e.expires,
                e.now
            );
        }
        h.edits().with_explain(|ex| ex.expired = expiring);
    }
    let snap = set.snapshot();
    let generation = snap.generation;
    let same = h
        .edits()
        .plan
        .as_ref()
        .is_some_and(|p| Arc::ptr_eq(&p.set, &snap));
    if !same {
        unpin(h)?;
        // The scales of bundles that left the set go with them: a bundle added again (or
        // another one under that id) starts as compiled, at 1.
        h.edits_mut()
            .lora_scales
            .retain(|id, _| snap.bundles.iter().any(|b| b.id() == id));
        let scales = h.edits().lora_scales.clone();
        let scope = h.edits().scope.clone();
        let plan = Arc::new(EditPlan::build(
            h.plan_target(),
            scope.as_deref(),
            snap,
            &scales,
        )?);
        if let Err(e) = h.prepare(&plan) {
            h.edits_mut().release();
            return Err(e);
        }
        h.edits_mut().plan = Some(plan);
    }
    let plan = h.edits().plan.clone().expect("set above");
    // The scope check sees the base model: edits off.
    let (routed, answer) = match prompt {
        Some(p) if !plan.memories.is_empty() => {
            h.uninstall()?;
            route(h, &plan, p)?
        }
        p => (p.unwrap_or_default().to_string(), None),
    };
    if let Some(a) = &answer {
        let (_, tokens) = crate::answer::prompt_answer_tokens(h.vocab_model(), &routed, a)?;
        h.set_answer(Some(crate::answer::AnswerPlan::new(tokens)));
    }
    h.install(&plan)?;
    let low_rank = plan.low_rank_events();
    h.edits().with_explain(|ex| {
        ex.generation = Some(generation);
        ex.low_rank = low_rank;
        ex.unverified = plan.unverified.clone();
    });
    Ok(Request {
        prompt: routed,
        generation: Some(generation),
        answer,
    })
}

/// The scope check: the prompt to evaluate and, with an `{answer}` template, the answer.
pub(crate) fn route<H: EditHost + ?Sized>(
    h: &mut H,
    plan: &EditPlan,
    prompt: &str,
) -> Result<(String, Option<String>), RuntimeError> {
    // (memory, hit, token terms); compared by (in scope, score).
    let mut best: Option<(usize, families::MemoryHit, Option<ScopeTerms>)> = None;
    let mut cache: Vec<((u32, Site, Pooling), Vec<f32>)> = Vec::new();
    let mut encoded: Option<(Arc<ScopeModel>, crate::scope::RouteQuery<'_>)> = None;
    for (mi, m) in plan.memories.iter().enumerate() {
        let (hit, terms) = match m.mem.embedder() {
            Embedder::BaseModel {
                layer,
                site,
                pooling,
            } => {
                let key = (layer, site, pooling);
                let q = match cache.iter().find(|(k, _)| *k == key) {
                    Some((_, q)) => q.clone(),
                    None => {
                        let q = h.embed(prompt, layer, site, pooling)?;
                        cache.push((key, q.clone()));
                        q
                    }
                };
                (m.mem.nearest(&q, None), None)
            }
            Embedder::External { .. } => {
                if encoded.is_none() {
                    // The plan was built only after check_scope_model passed.
                    let scope = h.edits().scope.clone().ok_or_else(|| {
                        RuntimeError::InvalidEdit("no scope model configured".into())
                    })?;
                    let q = scope.query(prompt)?;
                    encoded = Some((scope, q));
                }
                let (scope, q) = encoded.as_ref().expect("set above");
                let Some(r) = scope.route(&m.mem, q) else {
                    continue;
                };
                let routing = m.mem.routing().expect("route returned a hit");
                let hit = families::MemoryHit {
                    index: r.index,
                    score: r.pooled,
                    in_scope: r.in_scope,
                };
                let terms = ScopeTerms {
                    pooled: r.pooled,
                    subject: r.subject,
                    relation: r.relation,
                    subject_threshold: routing.subject_threshold(),
                    relation_threshold: routing.relation_threshold(),
                    // Where relation groups decided, the head did not; where they voted, it did.
                    head: routing
                        .head()
                        .filter(|_| r.groups.is_none() || r.vote.is_some())
                        .map(|h| (r.score, h.threshold())),
                    vote: r.vote,
                    n_in_scope: r.n_in_scope,
                    groups: r.groups.and_then(|(rg, qg)| {
                        let g = routing.groups()?;
                        Some((g.name(rg).to_string(), qg.map(|q| g.name(q).to_string())))
                    }),
                };
                (Some(hit), Some(terms))
            }
        };
        if let Some(hit) = hit {
            let better = best
                .as_ref()
                .is_none_or(|(_, b, _)| (hit.in_scope, hit.score) > (b.in_scope, b.score));
            if better {
                best = Some((mi, hit, terms));
            }
        }
    }
    let Some((mi, hit, terms)) = best else {
        return Ok((prompt.to_string(), None));
    };
    let m = &plan.memories[mi];
    let routed = if hit.in_scope {
        m.mem
            .render(hit.index, prompt)
            .unwrap_or_else(|| prompt.to_string())
    } else {
        prompt.to_string()
    };
    let answer = hit
        .in_scope
        .then(|| m.mem.answer(hit.index).map(str::to_string))
        .flatten();
    let head = terms.as_ref().and_then(|t| t.head);
    let mut ex = h.edits().explain.lock().unwrap_or_else(|e| e.into_inner());
    ex.memory = Some(MemoryEvent {
        bundle: plan.bundle_id(m.bundle),
        edit_id: edit_of(&plan.set, m.bundle, m.payload, m.rows.start + hit.index),
        record: m.rows.start + hit.index,
        // What decided: the scope head's logit and threshold when the memory has one.
        score: head.map_or(hit.score, |h| h.0),
        threshold: head.map_or(m.mem.threshold(), |h| h.1),
        in_scope: hit.in_scope,
        routed_prompt: routed.clone(),
        answer: answer.clone(),
        scope_terms: terms,
    });
    Ok((routed, answer))
}

impl Session {
    /// Attaches a live edit set: each later request pins its current snapshot. `None` detaches
    /// (the base model, bitwise).
    pub fn set_edit_set(&mut self, set: Option<Arc<EditSet>>) -> Result<(), RuntimeError> {
        set_edit_set(self, set)
    }

    /// The scope model that routes scope-model memories (`None`: bundles that need one fail
    /// with `ScopeModelMissing`). Takes effect at the next request.
    pub fn set_scope_model(&mut self, scope: Option<Arc<ScopeModel>>) -> Result<(), RuntimeError> {
        set_scope_model(self, scope)
    }

    pub fn scope_model(&self) -> Option<&Arc<ScopeModel>> {
        self.edits_ref().scope.as_ref()
    }

    /// The attached edit set.
    pub fn edit_set(&self) -> Option<&Arc<EditSet>> {
        self.edits_ref().set.as_ref()
    }

    /// Scales the low-rank adapters of bundle `bundle_id` (default 1.0; 0.0 disables them, which
    /// gives back bitwise the logits without the adapter; negative subtracts them). Takes effect
    /// at the next request. A scale outside [-100, 100] (or NaN) is refused with
    /// `InvalidOptions` naming it, and the scale in use stays as it was.
    pub fn set_lora_scale(&mut self, bundle_id: &str, scale: f32) -> Result<(), RuntimeError> {
        set_lora_scale(self, bundle_id, scale)
    }

    /// What fired during the last request.
    pub fn explain(&self) -> Explain {
        self.edits_ref().explain_snapshot()
    }

    /// Starts a request: pins the attached set's current snapshot (rebuilding hooks and adapters
    /// only when it changed), runs the memory scope check on `prompt` with the base model, and
    /// installs the codebook/neuron hooks and LoRA adapters for the evaluations that follow.
    /// Generation calls this itself; call it before [`Session::eval`] when scoring with edits
    /// (then evaluate `Request::prompt`).
    pub fn begin_request(&mut self, prompt: &str) -> Result<Request, RuntimeError> {
        begin(self, Some(prompt))
    }

    /// Pins the attached set without a text prompt (memories are not consulted).
    pub fn pin_edits(&mut self) -> Result<Option<u64>, RuntimeError> {
        Ok(begin(self, None)?.generation)
    }

    /// Embeds `text` as a memory's base-model embedder does: hidden rows at `layer`/`site` over
    /// the text's tokens (BOS added), pooled and L2-normalized. Runs the base model (no edits);
    /// clears the KV cache. The compiler uses this so stored embeddings match the device's.
    pub fn embed(
        &mut self,
        text: &str,
        layer: u32,
        site: Site,
        pooling: Pooling,
    ) -> Result<Vec<f32>, RuntimeError> {
        // The base model: no edit hook, no adapters (the next request re-installs them).
        EditHost::uninstall(self)?;
        let tokens = self.tokenize(text, true)?;
        let point = HookPoint::new(layer, site);
        let rows: Arc<Mutex<Vec<f32>>> = Arc::default();
        let sink = rows.clone();
        // BOS is not part of the text, and its residual row is huge on gemma3 (it would
        // dominate a mean and make every prompt look alike): pool the text's tokens only.
        let skip_bos = tokens.len() > 1 && self.model().info().bos == Some(tokens[0]);
        let id = self.add_hook(Box::new(FnHook::new(
            vec![point],
            move |_, r: &mut HookRows<'_>| {
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                for i in 0..r.n_rows() {
                    if skip_bos && r.info(i).pos == 0 {
                        continue;
                    }
                    s.extend_from_slice(r.row(i));
                }
            },
        )))?;
        self.kv_clear();
        let res = self.eval(&tokens, EvalOptions::prefill(Logits::Last));
        self.remove_hook(id);
        self.kv_clear();
        res?;
        let rows = std::mem::take(&mut *rows.lock().unwrap_or_else(|e| e.into_inner()));
        let n_embd = self.model().info().n_embd as usize;
        let mut v = families::pooled(&rows, n_embd, pooling)
            .map_err(|e| RuntimeError::InvalidEdit(format!("embedding: {e}")))?;
        if !families::l2_normalize(&mut v) {
            return Err(RuntimeError::InvalidEdit(
                "embedding has no direction (zero or non-finite)".into(),
            ));
        }
        Ok(v)
    }

    fn set_adapters(
        &mut self,
        ptrs: &mut [*mut sys::llama_adapter_lora],
        scales: &mut [f32],
    ) -> Result<(), RuntimeError> {
        // SAFETY: live context; the adapters belong to this session's plan and this model.
        let rc = unsafe {
            sys::llama_set_adapters_lora(
                self.as_ptr(),
                ptrs.as_mut_ptr(),
                ptrs.len(),
                scales.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(RuntimeError::InvalidEdit(format!(
                "llama.cpp refused the LoRA adapters (code {rc})"
            )));
        }
        Ok(())
    }
}

impl EditHost for Session {
    fn edits(&self) -> &SessionEdits {
        self.edits_ref()
    }
    fn edits_mut(&mut self) -> &mut SessionEdits {
        Session::edits_mut(self)
    }
    fn plan_target(&self) -> &dyn PlanTarget {
        &**self.model()
    }
    fn vocab_model(&self) -> &Model {
        self.model()
    }
    fn prepare(&mut self, plan: &Arc<EditPlan>) -> Result<(), RuntimeError> {
        let arch = self.model().info().architecture.name();
        let adapters = plan
            .low_rank
            .iter()
            .map(|l| Adapter::load(self.model(), l, arch))
            .collect::<Result<Vec<_>, _>>()?;
        Session::edits_mut(self).adapters = adapters;
        Ok(())
    }
    fn install(&mut self, plan: &Arc<EditPlan>) -> Result<(), RuntimeError> {
        if self.edits_ref().hook.is_none() && !plan.is_empty_of_hooks() {
            let hook = EditHook {
                plan: plan.clone(),
                explain: self.edits_ref().explain.clone(),
                replaces: Vec::new(),
                adds: Vec::new(),
                acts: Vec::new(),
                delta: Vec::new(),
            };
            let id = self.add_hook(Box::new(hook))?;
            Session::edits_mut(self).hook = Some(id);
        }
        let mut ptrs: Vec<*mut sys::llama_adapter_lora> = self
            .edits_ref()
            .adapters
            .iter()
            .map(|a| a.ptr.as_ptr())
            .collect();
        let mut scales: Vec<f32> = self.edits_ref().adapters.iter().map(|a| a.scale).collect();
        self.set_adapters(&mut ptrs, &mut scales)
    }
    fn uninstall(&mut self) -> Result<(), RuntimeError> {
        if let Some(id) = Session::edits_mut(self).hook.take() {
            self.remove_hook(id);
        }
        self.set_adapters(&mut [], &mut [])
    }
    fn embed(
        &mut self,
        text: &str,
        layer: u32,
        site: Site,
        pooling: Pooling,
    ) -> Result<Vec<f32>, RuntimeError> {
        Session::embed(self, text, layer, site, pooling)
    }
    fn set_answer(&mut self, plan: Option<crate::answer::AnswerPlan>) {
        Session::set_answer(self, plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id names the llama.cpp the workspace pins: a bump of `llama-cpp-sys-2` without this
    /// constant would let bundles verified on the old build count as verified on the new one.
    #[test]
    fn llama_cpp_backend_id_names_the_pinned_build() {
        let manifest = include_str!("../../Cargo.toml");
        let line = manifest
            .lines()
            .find(|l| l.trim_start().starts_with("llama-cpp-sys-2 "))
            .expect("the workspace pins llama-cpp-sys-2");
        let pin = line
            .split("version = \"=")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("an exact version pin (=X.Y.Z)");
        assert_eq!(pin, LLAMA_CPP_SYS_VERSION, "{line}");
        assert_eq!(LLAMA_CPP_BACKEND_ID, format!("llama.cpp-{pin}:cpu"));
        assert!(LLAMA_CPP_BACKEND_ID.len() <= 64);
    }
}
