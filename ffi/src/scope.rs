//! Scope-model entry points: the encoder that routes retrieval memories (serac bundles).

use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

use amend_runtime::{RuntimeError, ScopeModel, DEFAULT_SCOPE_THREADS, MAX_THREADS};

use crate::amend_result;
use crate::args;
use crate::error::{guard, FfiError, FfiResult};
use crate::handle;
use crate::types::*;

pub(crate) struct ScopeModelObj {
    pub scope: Arc<ScopeModel>,
}

pub(crate) const SCOPE_MODEL: &str = "amend_scope_model";

/// The scope-model handle behind `ptr` (kind-checked).
pub(crate) fn scope_model(ptr: *const amend_scope_model) -> FfiResult<Arc<ScopeModelObj>> {
    handle::get::<ScopeModelObj, _>(ptr, SCOPE_MODEL, "scope")
}

/// Validates `n_threads`: 0 = the runtime's default (`DEFAULT_SCOPE_THREADS`, one thread),
/// otherwise 1..=512.
fn threads(n_threads: u32) -> FfiResult<usize> {
    let n = n_threads as usize;
    if n > MAX_THREADS {
        return Err(FfiError::new(
            amend_result::AMEND_ERR_INVALID_ARGUMENT,
            format!("n_threads {n} is outside 0..={MAX_THREADS}"),
        ));
    }
    if n > 0 {
        return Ok(n);
    }
    Ok(DEFAULT_SCOPE_THREADS)
}

/// Opens the scope model at `path` and writes its handle through `out` (already checked and
/// cleared). Every reason the file cannot serve as a scope model (missing, a FIFO or directory,
/// unreadable, corrupt, not a `bert` encoder, llama.cpp refusing it) is one code,
/// `AMEND_ERR_SCOPE_MODEL`; the message tells which.
fn open(path: &Path, n_threads: u32, out: *mut *mut amend_scope_model) -> FfiResult<()> {
    let n = threads(n_threads)?;
    let scope = ScopeModel::open(path, Some(n)).map_err(|e| {
        let code = match &e {
            RuntimeError::ContextCreate { .. } | RuntimeError::Threads { .. } => {
                amend_result::AMEND_ERR_CONTEXT
            }
            _ => amend_result::AMEND_ERR_SCOPE_MODEL,
        };
        let detail = match &e {
            RuntimeError::NotFound { .. } => "file not found".to_string(),
            other => other.to_string(),
        };
        FfiError::new(code, format!("scope model {}: {detail}", path.display()))
    })?;
    // SAFETY: `out` was checked non-NULL and cleared by the caller; it is writable per the
    // header's contract.
    unsafe { args::write_out(out, handle::insert(ScopeModelObj { scope }), "out") }
}

/// Opens the scope model that routes retrieval memories: a `bert` GGUF such as
/// `$AMEND_CACHE/all-minilm-l6-v2-q8_0.gguf` (`~/.cache/amend` by default;
/// `scripts/fetch-scope-model.sh`, `amend scope-model convert`). `path` is NUL-terminated
/// UTF-8 (see `amend_scope_model_open_bytes` for other paths). `n_threads` are the encoder's
/// threads, at most 512; 0 = one thread (a short encode gains little from more, and on cores
/// other work keeps busy ggml's spinning workers make two threads many times slower than one:
/// docs/runtime.md).
///
/// Lifetime: on success `*out` receives a new handle that the caller owns and frees with
/// `amend_scope_model_free` (once; any time). Sessions that were given it
/// (`amend_session_set_scope_model`) keep the model alive after it is freed. On failure `*out`
/// is set to NULL. Thread rules: see `amend_scope_model`.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_UTF8`, `AMEND_ERR_INVALID_ARGUMENT`
/// (`n_threads` above 512), `AMEND_ERR_SCOPE_MODEL` (the file is missing, not a regular file,
/// unreadable, corrupt or not a `bert` encoder: the message says which), `AMEND_ERR_CONTEXT`.
#[no_mangle]
pub extern "C" fn amend_scope_model_open(
    path: *const c_char,
    n_threads: u32,
    out: *mut *mut amend_scope_model,
) -> amend_result {
    guard("amend_scope_model_open", || {
        // SAFETY (all `args` calls): the pointers are NULL or valid as the header documents.
        unsafe { args::clear_out(out, "out")? };
        let path = unsafe { args::cstr(path, "path")? };
        open(Path::new(path), n_threads, out)
    })
}

/// Like `amend_scope_model_open`, with the path given as `path_len` bytes (no NUL needed): on
/// unix a path that is not UTF-8 can be opened. Lifetime as for `amend_scope_model_open`.
/// Errors as for `amend_scope_model_open`, and `AMEND_ERR_INVALID_ARGUMENT` for an empty path
/// or one with a NUL byte.
#[no_mangle]
pub extern "C" fn amend_scope_model_open_bytes(
    path: *const u8,
    path_len: usize,
    n_threads: u32,
    out: *mut *mut amend_scope_model,
) -> amend_result {
    guard("amend_scope_model_open_bytes", || {
        // SAFETY (all `args` calls): the pointers are NULL or valid as the header documents.
        unsafe { args::clear_out(out, "out")? };
        let path = unsafe { args::path_bytes(path, path_len, "path")? };
        open(&path, n_threads, out)
    })
}

/// Frees a scope-model handle. NULL is a no-op; a freed or wrong-kind handle is reported
/// through `amend_last_error_code` (`AMEND_ERR_INVALID_HANDLE`) and otherwise ignored.
/// Lifetime: the handle is invalid once this returns; sessions that were given it keep the
/// model alive until they are freed or given another one.
#[no_mangle]
pub extern "C" fn amend_scope_model_free(scope: *mut amend_scope_model) {
    guard("amend_scope_model_free", || {
        drop(handle::remove::<ScopeModelObj, _>(scope, SCOPE_MODEL)?);
        Ok(())
    });
}
