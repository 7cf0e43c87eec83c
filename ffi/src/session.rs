//! Session entry points: activation of bundles, generation, cancellation, scoring, explanation.

use std::ffi::{c_char, c_void};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use amend_edits::keys::TrustStore;
use amend_edits::{AddOptions, EditSet};
use amend_runtime::onnxruntime::OrtSession;
use amend_runtime::{
    Backend, CancelHandle, EvalOptions, Explain, GenerateParams, Logits, Session, SessionOptions,
    StopReason,
};

use crate::amend_result;
use crate::args;
use crate::bundle::{BundleObj, BUNDLE};
use crate::error::{guard, FfiError, FfiResult};
use crate::handle;
use crate::model::{ModelObj, MODEL};
use crate::types::*;

pub(crate) struct SessionState {
    /// llama.cpp or ONNX Runtime, as the model was opened.
    pub session: Box<dyn Backend + Send>,
    /// The session's own edit set, created at the first activation (bundles arrive verified,
    /// so its trust store is empty).
    pub edits: Option<Arc<EditSet>>,
    /// `edits` was created by `amend_session_set_state_file` (for its refusal message).
    pub state_file: bool,
}

pub(crate) struct SessionObj {
    /// The model handle's object: its fingerprint binds the session's edit set.
    model: Arc<ModelObj>,
    /// Reaches the running evaluation from any thread without the state lock.
    cancel: CancelHandle,
    /// The session proper: one call at a time (`try_lock`, so misuse is reported, not a
    /// deadlock when a token callback re-enters).
    state: Mutex<SessionState>,
}

pub(crate) const SESSION: &str = "amend_session";

impl SessionObj {
    fn lock(&self) -> FfiResult<MutexGuard<'_, SessionState>> {
        match self.state.try_lock() {
            Ok(g) => Ok(g),
            // A panic inside a previous call was already reported as AMEND_ERR_PANIC; the
            // runtime keeps the session consistent (each call starts from a cleared cache).
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(FfiError::new(
                amend_result::AMEND_ERR_BUSY,
                "the session is in use by another call (another thread, or its own token \
                 callback); a session is used by one thread at a time",
            )),
        }
    }
}

fn session(ptr: *const amend_session) -> FfiResult<Arc<SessionObj>> {
    handle::get::<SessionObj, _>(ptr, SESSION, "session")
}

/// Defaults for `amend_session_open` (the Rust API's `SessionOptions::default()`).
#[no_mangle]
pub extern "C" fn amend_session_default_params() -> amend_session_params {
    let d = SessionOptions::default();
    amend_session_params {
        n_ctx: d.n_ctx,
        n_ubatch: d.n_ubatch,
        n_threads: d.n_threads.unwrap_or(0) as u32,
        n_threads_batch: d.n_threads_batch.unwrap_or(0) as u32,
    }
}

/// Defaults for `amend_session_generate` (the Rust API's `GenerateParams::default()`):
/// greedy, 128 tokens, stop at end of generation.
#[no_mangle]
pub extern "C" fn amend_generate_default_params() -> amend_generate_params {
    let d = GenerateParams::default();
    amend_generate_params {
        max_tokens: d.max_tokens.min(u32::MAX as usize) as u32,
        temperature: d.temperature,
        top_k: d.top_k.max(0) as u32,
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        repeat_last_n: d.repeat_last_n.max(0) as u32,
        seed: d.seed,
        add_bos: d.add_bos,
        stop_at_eos: !d.ignore_eos,
    }
}

fn generate_params(p: &amend_generate_params) -> FfiResult<GenerateParams> {
    let int = |v: u32, name: &str| {
        i32::try_from(v).map_err(|_| {
            FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                format!("{name} {v} is too large (at most {})", i32::MAX),
            )
        })
    };
    Ok(GenerateParams {
        max_tokens: p.max_tokens as usize,
        temperature: p.temperature,
        top_k: int(p.top_k, "top_k")?,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: int(p.repeat_last_n, "repeat_last_n")?,
        seed: p.seed,
        stop: Vec::new(),
        add_bos: p.add_bos,
        ignore_eos: !p.stop_at_eos,
    })
}

/// Opens a session on `model` with no edits active. `params` may be NULL for the defaults.
/// On failure `*out` is set to NULL.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_INVALID_ARGUMENT`,
/// `AMEND_ERR_CONTEXT`.
#[no_mangle]
pub extern "C" fn amend_session_open(
    model: *const amend_model,
    params: *const amend_session_params,
    out: *mut *mut amend_session,
) -> amend_result {
    guard("amend_session_open", || {
        // SAFETY (all `args` calls): the pointers are NULL or valid as the header documents.
        unsafe { args::clear_out(out, "out")? };
        let m = handle::get::<ModelObj, _>(model, MODEL, "model")?;
        let p = unsafe { args::read_params(params, &[], || amend_session_default_params()) };
        let nonzero = |v: u32| (v > 0).then_some(v as usize);
        let options = SessionOptions {
            n_ctx: p.n_ctx,
            n_ubatch: p.n_ubatch,
            n_threads: nonzero(p.n_threads),
            n_threads_batch: nonzero(p.n_threads_batch),
        };
        let (session, cancel): (Box<dyn Backend + Send>, CancelHandle) = match &m.ort {
            None => {
                let s = Session::new(&m.model, options)?;
                let c = s.cancel_handle();
                (Box::new(s), c)
            }
            Some(o) => {
                // Threads were chosen when the model was opened (one ONNX Runtime session).
                let s = OrtSession::new(o, options.n_ctx as usize)?;
                let c = s.cancel_handle();
                (Box::new(s), c)
            }
        };
        let obj = SessionObj {
            model: m.clone(),
            cancel,
            state: Mutex::new(SessionState {
                session,
                edits: None,
                state_file: false,
            }),
        };
        // SAFETY: checked and cleared above.
        unsafe { args::write_out(out, handle::insert(obj), "out") }
    })
}

/// Frees a session. NULL is a no-op. A call running on the session in another thread finishes
/// safely, but the handle is invalid as soon as this returns.
#[no_mangle]
pub extern "C" fn amend_session_free(session: *mut amend_session) {
    guard("amend_session_free", || {
        drop(handle::remove::<SessionObj, _>(session, SESSION)?);
        Ok(())
    });
}

/// Activates a verified bundle's edits in the session: the next generation or scoring uses
/// them (bundles stack in activation order). A bundle with a newer version on the channel of
/// an active one replaces it. Versions only move forward per channel, even across a rollback:
/// activating the same or an older version again is `AMEND_ERR_BUNDLE_DOWNGRADE` (replay
/// protection).
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_BUSY`,
/// `AMEND_ERR_MODEL_MISMATCH` (bundle for another model), `AMEND_ERR_EDIT_CONFLICT` (another
/// active bundle has the same id), `AMEND_ERR_BUNDLE_EXPIRED`, `AMEND_ERR_BUNDLE_DOWNGRADE`,
/// `AMEND_ERR_EDIT_INVALID` (an edit cannot be applied to this model; on ONNX Runtime also a
/// bundle the graph has no slot for, or one that, with the active bundles, overflows a static
/// slot's capacity: the message names the slot), `AMEND_ERR_SCOPE_MODEL`
/// (its memories route with a scope model and the session has none: see
/// `amend_session_set_scope_model`), `AMEND_ERR_SCOPE_MODEL_MISMATCH` (it was compiled against
/// another scope model), `AMEND_ERR_BUNDLE_UNVERIFIED` (the bundle requires edits verified on
/// the session's backend, and its compiler did not verify them there). On every error nothing of
/// the bundle is applied.
///
/// A bundle that records where its edits were verified, without requiring it, is applied on any
/// backend; on one it was not verified on, `amend_session_explain` reports a warning.
#[no_mangle]
pub extern "C" fn amend_session_activate(
    session: *mut amend_session,
    bundle: *const amend_bundle,
) -> amend_result {
    guard("amend_session_activate", || {
        let s = self::session(session)?;
        let b = handle::get::<BundleObj, _>(bundle, BUNDLE, "bundle")?;
        let mut state = s.lock()?;
        // A bundle whose memories need a scope model the session lacks (or has another one of)
        // is refused whole, before anything of it reaches the edit set.
        amend_runtime::check_scope_model(&b.bundle, state.session.scope_model().map(|m| &**m))?;
        amend_runtime::check_verified(&b.bundle, &state.session.backend_id())?;
        // On ONNX Runtime the graph must have a slot for every edit of the bundle.
        if let Some(o) = &s.model.ort {
            o.check_fits(&b.bundle)?;
        }
        // The session's first edit set is attached only once a bundle is in it: a refused
        // first activation leaves the session without one (a state file may still be set).
        let (set, fresh) = match &state.edits {
            Some(set) => (set.clone(), false),
            None => {
                let binding = s.model.binding()?.clone();
                (Arc::new(EditSet::new(binding, TrustStore::new())), true)
            }
        };
        // With static-capacity slots, the state about to be published must fit them: checked
        // before the swap, so an overflowing bundle changes nothing.
        let scope = state.session.scope_model().cloned();
        set.update_with(|tx| -> FfiResult<()> {
            tx.add(b.bundle.clone(), AddOptions::default())?;
            if let Some(o) = &s.model.ort {
                o.check_capacity(Arc::new(tx.state().clone()), scope.as_deref())?;
            }
            Ok(())
        })?;
        if fresh {
            state.session.set_edit_set(Some(set.clone()))?;
            state.edits = Some(set);
        }
        Ok(())
    })
}

/// Gives `session` the scope model its bundles' memories route with (`scope` NULL: none).
/// Set it before activating a bundle that needs one (serac bundles compiled with a scope
/// model); such a bundle is refused without it (`AMEND_ERR_SCOPE_MODEL`).
///
/// Lifetime: the session keeps its own reference, so `scope` may be freed right after this
/// call; the reference is dropped when the session is freed or given another scope model.
/// The same handle may be given to any number of sessions.
///
/// Replacing or removing it is refused while an active bundle needs it
/// (`AMEND_ERR_SCOPE_MODEL` / `AMEND_ERR_SCOPE_MODEL_MISMATCH`); the session keeps its scope
/// model then. Roll such bundles back first.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT` (`session`), `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_BUSY`,
/// `AMEND_ERR_SCOPE_MODEL`, `AMEND_ERR_SCOPE_MODEL_MISMATCH`.
#[no_mangle]
pub extern "C" fn amend_session_set_scope_model(
    session: *mut amend_session,
    scope: *const amend_scope_model,
) -> amend_result {
    guard("amend_session_set_scope_model", || {
        let s = self::session(session)?;
        let scope = if scope.is_null() {
            None
        } else {
            Some(crate::scope::scope_model(scope)?.scope.clone())
        };
        let mut state = s.lock()?;
        if let Some(set) = &state.edits {
            for ab in &set.snapshot().bundles {
                amend_runtime::check_scope_model(&ab.bundle, scope.as_deref()).map_err(|e| {
                    let mut err = FfiError::from(e);
                    err.message = format!(
                        "the session keeps its scope model: an active bundle needs it ({})",
                        err.message
                    );
                    err
                })?;
            }
        }
        state.session.set_scope_model(scope)?;
        Ok(())
    })
}

/// Shares anti-rollback state with every process using the same file: the version store at
/// `path` (`path_len` bytes, no NUL needed; on unix any bytes). From then on activating a
/// bundle whose version is below its channel's mark in the file, set by this or any other
/// process, is `AMEND_ERR_BUNDLE_DOWNGRADE`, and each activation raises the mark. Call it
/// before the session's first `amend_session_activate`.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_BUSY`,
/// `AMEND_ERR_INVALID_ARGUMENT` (empty path, a bundle was already activated, or the session
/// already has a state file; a refused activation does not count), `AMEND_ERR_IO` (the file
/// cannot be read, locked or is malformed).
#[no_mangle]
pub extern "C" fn amend_session_set_state_file(
    session: *mut amend_session,
    path: *const u8,
    path_len: usize,
) -> amend_result {
    guard("amend_session_set_state_file", || {
        let s = self::session(session)?;
        // SAFETY: `path` is NULL or valid for `path_len` bytes as the header documents.
        let path = unsafe { args::path_bytes(path, path_len, "path")? };
        let mut state = s.lock()?;
        if state.edits.is_some() {
            let why = if state.state_file {
                "the session already has a state file (one per session)"
            } else {
                "set the state file before the first amend_session_activate"
            };
            return Err(FfiError::new(amend_result::AMEND_ERR_INVALID_ARGUMENT, why));
        }
        let store = amend_edits::version_store::VersionStore::open(&path)
            .map_err(|e| FfiError::new(amend_result::AMEND_ERR_IO, e.to_string()))?;
        let binding = s.model.binding()?.clone();
        let set =
            Arc::new(EditSet::new(binding, TrustStore::new()).with_version_store(Arc::new(store)));
        state.session.set_edit_set(Some(set.clone()))?;
        state.edits = Some(set);
        state.state_file = true;
        Ok(())
    })
}

/// Deactivates every edit of the active bundle with id `bundle_id` (NUL-terminated).
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_INVALID_UTF8`,
/// `AMEND_ERR_BUSY`, `AMEND_ERR_NOT_FOUND`.
#[no_mangle]
pub extern "C" fn amend_session_rollback_bundle(
    session: *mut amend_session,
    bundle_id: *const c_char,
) -> amend_result {
    guard("amend_session_rollback_bundle", || {
        let s = self::session(session)?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        let id = unsafe { args::cstr(bundle_id, "bundle_id")? };
        let state = s.lock()?;
        match &state.edits {
            Some(set) => set.remove(id).map(drop).map_err(Into::into),
            None => Err(FfiError::new(
                amend_result::AMEND_ERR_NOT_FOUND,
                format!("no active bundle has id `{id}` (none is active)"),
            )),
        }
    })
}

/// Scales the low-rank (LoRA/ROME/MEMIT) adapters of the active bundle with id `bundle_id`
/// (NUL-terminated UTF-8, read during the call only) by `scale`: 1 applies them as compiled
/// (the default), 0 disables them (the logits are then bitwise those without the bundle's
/// adapters), a negative scale subtracts them. Takes effect at the session's next request and
/// lasts until changed; the bundle's other edits are not affected.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_INVALID_UTF8`,
/// `AMEND_ERR_BUSY`, `AMEND_ERR_INVALID_ARGUMENT` (`scale` NaN, infinite or outside
/// [-100, 100]), `AMEND_ERR_NOT_FOUND` (no active bundle has that id). On any error the
/// scale in use stays as it was.
#[no_mangle]
pub extern "C" fn amend_session_set_lora_scale(
    session: *mut amend_session,
    bundle_id: *const c_char,
    scale: f32,
) -> amend_result {
    guard("amend_session_set_lora_scale", || {
        let s = self::session(session)?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        let id = unsafe { args::cstr(bundle_id, "bundle_id")? };
        let mut state = s.lock()?;
        // An id no active bundle has is the runtime's UnknownBundle: AMEND_ERR_NOT_FOUND.
        state.session.set_lora_scale(id, scale).map_err(Into::into)
    })
}

/// Deactivates the single active edit with id `edit_id` (NUL-terminated); the rest of its
/// bundle stays active.
///
/// Errors: as for `amend_session_rollback_bundle`.
#[no_mangle]
pub extern "C" fn amend_session_rollback_edit(
    session: *mut amend_session,
    edit_id: *const c_char,
) -> amend_result {
    guard("amend_session_rollback_edit", || {
        let s = self::session(session)?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        let id = unsafe { args::cstr(edit_id, "edit_id")? };
        let state = s.lock()?;
        match &state.edits {
            Some(set) => set.rollback_edit(id).map(drop).map_err(Into::into),
            None => Err(FfiError::new(
                amend_result::AMEND_ERR_NOT_FOUND,
                format!("no active edit has id `{id}` (no bundle is active)"),
            )),
        }
    })
}

/// Stores the number of active bundles in `*out`.
#[no_mangle]
pub extern "C" fn amend_session_active_bundle_count(
    session: *const amend_session,
    out: *mut usize,
) -> amend_result {
    guard("amend_session_active_bundle_count", || {
        let s = self::session(session)?;
        let state = s.lock()?;
        let n = state
            .edits
            .as_ref()
            .map_or(0, |set| set.snapshot().bundles.len());
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_out(out, n, "out") }
    })
}

/// Copies the id of active bundle number `index` (in activation order) into `buf`; buffer
/// rules as for `amend_model_description`.
#[no_mangle]
pub extern "C" fn amend_session_active_bundle_id(
    session: *const amend_session,
    index: usize,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> amend_result {
    guard("amend_session_active_bundle_id", || {
        let s = self::session(session)?;
        let state = s.lock()?;
        let snap = state.edits.as_ref().map(|set| set.snapshot());
        let bundles = snap.as_ref().map_or(&[][..], |sn| &sn.bundles[..]);
        let b = bundles.get(index).ok_or_else(|| {
            FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                format!(
                    "index {index} is out of range ({} bundles active)",
                    bundles.len()
                ),
            )
        })?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_str(b.id(), buf, buf_len, out_len) }
    })
}

/// Generates a continuation of `prompt` (`prompt_len` bytes of UTF-8, no NUL needed), calling
/// `callback` (may be NULL) with each token. The session's context is cleared first: each call
/// is independent. `params` may be NULL for the defaults; `out` may be NULL.
///
/// Returns `AMEND_OK` when generation ended normally (see `out->stop_reason`), or
/// `AMEND_ERR_CANCELLED` when `amend_session_cancel` stopped it (tokens already passed to the
/// callback stay valid; `out` is filled in both cases).
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_INVALID_UTF8`,
/// `AMEND_ERR_INVALID_ARGUMENT` (empty prompt, bad parameter), `AMEND_ERR_BUSY`,
/// `AMEND_ERR_TOKENIZE`, `AMEND_ERR_CONTEXT_FULL` (the prompt alone does not fit),
/// `AMEND_ERR_DECODE`, `AMEND_ERR_CANCELLED`.
#[no_mangle]
pub extern "C" fn amend_session_generate(
    session: *mut amend_session,
    prompt: *const c_char,
    prompt_len: usize,
    params: *const amend_generate_params,
    callback: amend_token_callback,
    user_data: *mut c_void,
    out: *mut amend_generation,
) -> amend_result {
    guard("amend_session_generate", || {
        let s = self::session(session)?;
        // SAFETY (all `args` calls): the pointers are NULL or valid as the header documents.
        let prompt = unsafe { args::text(prompt, prompt_len, "prompt")? };
        let params = unsafe {
            args::read_params(
                params,
                &[
                    std::mem::offset_of!(amend_generate_params, add_bos),
                    std::mem::offset_of!(amend_generate_params, stop_at_eos),
                ],
                || amend_generate_default_params(),
            )
        };
        let params = generate_params(&params)?;
        let mut state = s.lock()?;
        let mut text_buf: Vec<u8> = Vec::new();
        let result = state.session.generate_text(prompt, &params, &mut |ev| {
            let Some(cb) = callback else {
                return ControlFlow::Continue(());
            };
            // The callback gets a NUL-terminated copy: C code may treat it as a C string.
            text_buf.clear();
            text_buf.extend_from_slice(ev.text.as_bytes());
            text_buf.push(0);
            // SAFETY: a C function pointer supplied by the caller with this signature; the text
            // pointer is valid for the duration of the call.
            let go_on = unsafe {
                cb(
                    user_data,
                    ev.token,
                    text_buf.as_ptr() as *const c_char,
                    ev.text.len(),
                )
            };
            if go_on {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })?;
        let stop_reason = match result.stop_reason {
            StopReason::MaxTokens => amend_stop_reason::AMEND_STOP_MAX_TOKENS,
            StopReason::Eos => amend_stop_reason::AMEND_STOP_EOS,
            StopReason::Callback => amend_stop_reason::AMEND_STOP_CALLBACK,
            StopReason::ContextFull => amend_stop_reason::AMEND_STOP_CONTEXT_FULL,
            StopReason::Cancelled => amend_stop_reason::AMEND_STOP_CANCELLED,
            // No stop strings are passed through the C API.
            StopReason::StopString(_) => amend_stop_reason::AMEND_STOP_CALLBACK,
        };
        let g = amend_generation {
            n_prompt_tokens: result.n_prompt as u32,
            n_generated: result.n_generated as u32,
            stop_reason,
            prefill_tok_s: result.timings.prefill_tok_s(),
            decode_tok_s: result.timings.decode_tok_s(),
        };
        // SAFETY: `out` is NULL (not wanted) or writable, as documented.
        unsafe { args::write_opt(out, g) };
        if stop_reason == amend_stop_reason::AMEND_STOP_CANCELLED {
            return Err(FfiError::new(
                amend_result::AMEND_ERR_CANCELLED,
                format!(
                    "cancelled by amend_session_cancel after {} generated tokens",
                    result.n_generated
                ),
            ));
        }
        Ok(())
    })
}

/// Asks the session's running generation or scoring to stop within one token. Safe to call
/// from any thread at any time, including from the token callback. A cancel made while nothing
/// runs stops the session's next generation or scoring instead (it is consumed by the call it
/// stops). The stopped call returns `AMEND_ERR_CANCELLED`.
#[no_mangle]
pub extern "C" fn amend_session_cancel(session: *const amend_session) -> amend_result {
    guard("amend_session_cancel", || {
        let s = self::session(session)?;
        s.cancel.cancel();
        Ok(())
    })
}

/// log-softmax of `logits` at `target`, computed in f64 with the max subtracted for stability.
fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Teacher-forced scoring: evaluates `prompt` (with BOS when the model wants it) followed by
/// `target` (each tokenized on its own; both UTF-8 with explicit lengths) with the active
/// edits, and fills `*out` with the log-probability of the target's tokens. This is how an
/// app checks that an edit took effect without sampling. The context is cleared first.
///
/// Errors: as for `amend_session_generate`, and `AMEND_ERR_INVALID_ARGUMENT` for an empty
/// prompt or target.
#[no_mangle]
pub extern "C" fn amend_session_score(
    session: *mut amend_session,
    prompt: *const c_char,
    prompt_len: usize,
    target: *const c_char,
    target_len: usize,
    out: *mut amend_score,
) -> amend_result {
    guard("amend_session_score", || {
        let s = self::session(session)?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        let prompt = unsafe { args::text(prompt, prompt_len, "prompt")? };
        let target = unsafe { args::text(target, target_len, "target")? };
        args::need_out(out, "out")?;
        let mut state = s.lock()?;
        let sess = &mut state.session;
        // Pins the active edits (and routes the prompt through an in-scope memory) exactly as
        // generation does.
        let request = sess.begin_request(prompt)?;
        let p = sess.tokenize(&request.prompt, true)?;
        let t = sess.tokenize(target, false)?;
        if p.is_empty() || t.is_empty() {
            return Err(FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                format!(
                    "{} is empty after tokenization",
                    if p.is_empty() { "prompt" } else { "target" }
                ),
            ));
        }
        let mut all = p.clone();
        all.extend_from_slice(&t);
        sess.kv_clear()?;
        // Logits at index i predict token i+1: from the prompt's last token on.
        let first = p.len() - 1;
        let opts = EvalOptions {
            last_prompt_token: Some(first),
            ..EvalOptions::prefill(Logits::From(first))
        };
        sess.eval(&all, opts)?;
        let mut score = amend_score {
            n_target_tokens: t.len() as u32,
            ..Default::default()
        };
        for (j, &tok) in t.iter().enumerate() {
            let logits = sess.logits(first + j)?;
            score.logprob_sum += log_prob(logits, tok as usize);
            if argmax(logits) == tok as usize {
                score.n_argmax_match += 1;
            }
        }
        score.logprob_mean = score.logprob_sum / t.len() as f64;
        // SAFETY: `out` was checked by `need_out` above and is writable, as documented.
        unsafe { args::write_out(out, score, "out") }
    })
}

/// Reports what the active edits did during the session's last generation or scoring: calls
/// `callback` once per (bundle, edit, family, layer) that was checked or fired, in order, and
/// once (family "unverified", a warning) per active bundle whose verification record does not
/// cover this session's backend; a callback returning false stops the listing. Nothing is reported when no bundle is active.
/// The callback runs after the session is released, so it may call functions on the session.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT` (including a NULL callback), `AMEND_ERR_INVALID_HANDLE`,
/// `AMEND_ERR_BUSY`.
#[no_mangle]
pub extern "C" fn amend_session_explain(
    session: *const amend_session,
    callback: amend_explain_callback,
    user_data: *mut c_void,
) -> amend_result {
    guard("amend_session_explain", || {
        let s = self::session(session)?;
        let cb = callback.ok_or_else(|| FfiError::null("callback"))?;
        let explain = s.lock()?.session.explain();
        // The state lock is released: the callback may call other functions on the session.
        for a in activities(&explain) {
            let bundle_id = cstring(&a.bundle_id);
            let edit_id = cstring(&a.edit_id);
            let family = cstring(a.family);
            let act = amend_edit_activity {
                bundle_id: bundle_id.as_ptr(),
                edit_id: edit_id.as_ptr(),
                family: family.as_ptr(),
                layer: a.layer,
                n_fired: a.n_fired,
                n_checked: a.n_checked,
            };
            // SAFETY: a caller-supplied function with this signature; the struct and its
            // strings live until after the call.
            if !unsafe { cb(user_data, &act) } {
                break;
            }
        }
        Ok(())
    })
}

struct Activity {
    bundle_id: String,
    edit_id: String,
    family: &'static str,
    layer: u32,
    n_fired: u32,
    n_checked: u32,
}

fn cstring(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// The runtime's per-event explanation folded into one record per (bundle, edit, family, layer).
fn activities(e: &Explain) -> Vec<Activity> {
    let mut out: Vec<Activity> = Vec::new();
    let mut add = |bundle: &str,
                   edit: Option<&str>,
                   family: &'static str,
                   layer: u32,
                   fired: u32,
                   checked: u32| {
        let edit = edit.unwrap_or("");
        if let Some(a) = out.iter_mut().find(|a| {
            a.bundle_id == bundle && a.edit_id == edit && a.family == family && a.layer == layer
        }) {
            a.n_fired += fired;
            a.n_checked += checked;
        } else {
            out.push(Activity {
                bundle_id: bundle.to_string(),
                edit_id: edit.to_string(),
                family,
                layer,
                n_fired: fired,
                n_checked: checked,
            });
        }
    };
    for c in &e.codebook {
        add(
            &c.bundle,
            c.edit_id.as_deref(),
            "codebook",
            c.layer,
            c.replaced as u32,
            1,
        );
    }
    for n in &e.neurons {
        let p = n.positions.min(u32::MAX as usize) as u32;
        add(
            &n.bundle,
            n.edit_id.as_deref(),
            "patch_neurons",
            n.layer,
            p,
            0,
        );
    }
    if let Some(m) = &e.memory {
        add(
            &m.bundle,
            m.edit_id.as_deref(),
            "memory",
            0,
            m.in_scope as u32,
            1,
        );
    }
    for l in &e.low_rank {
        add(&l.bundle, None, "low_rank", 0, 1, 1);
    }
    // A warning, not an activity: the bundle's edits were not verified on this backend.
    for u in &e.unverified {
        add(&u.bundle, None, "unverified", 0, 0, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_is_a_normalised_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let total: f64 = (0..3).map(|i| log_prob(&logits, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_prob(&logits, 2) > log_prob(&logits, 0));
        assert_eq!(argmax(&logits), 2);
        // Large logits must not overflow.
        assert!(log_prob(&[1000.0, 0.0], 0).abs() < 1e-9);
    }
}
