//! Model entry points.

use std::ffi::c_char;
use std::sync::{Arc, OnceLock};

use amend_edits::ModelBinding;
use amend_runtime::{Model, ModelOptions};

use crate::amend_result;
use crate::args;
use crate::error::{guard, FfiResult};
use crate::handle;
use crate::types::*;

pub(crate) struct ModelObj {
    pub model: Arc<Model>,
    /// The fingerprint bundles are bound to, computed on first use (hashes the weights once;
    /// cached next to the model file by amend_edits).
    binding: OnceLock<ModelBinding>,
}

impl ModelObj {
    pub fn binding(&self) -> FfiResult<&ModelBinding> {
        if let Some(b) = self.binding.get() {
            return Ok(b);
        }
        let b = self.model.binding()?;
        Ok(self.binding.get_or_init(|| b))
    }
}

pub(crate) const MODEL: &str = "amend_model";

/// Defaults for `amend_model_open`.
#[no_mangle]
pub extern "C" fn amend_model_default_params() -> amend_model_params {
    amend_model_params {
        use_mmap: true,
        n_threads: 0,
    }
}

/// Loads a GGUF model from `path` (NUL-terminated UTF-8). `params` may be NULL for the
/// defaults. On success `*out` receives a handle to free with `amend_model_free`; on failure
/// `*out` is set to NULL.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_UTF8`, `AMEND_ERR_INVALID_ARGUMENT`
/// (`n_threads` above 512), `AMEND_ERR_IO` (missing or unreadable file), `AMEND_ERR_MODEL_LOAD`
/// (not GGUF, truncated, unsupported architecture, a hyperparameter llama.cpp would abort on:
/// the message names the GGUF key).
#[no_mangle]
pub extern "C" fn amend_model_open(
    path: *const c_char,
    params: *const amend_model_params,
    out: *mut *mut amend_model,
) -> amend_result {
    guard("amend_model_open", || {
        // SAFETY (all `args` calls): the pointers are NULL or valid as the header documents.
        unsafe { args::clear_out(out, "out")? };
        let path = unsafe { args::cstr(path, "path")? };
        let params = unsafe { args::read_params(params, || amend_model_default_params()) };
        let options = ModelOptions {
            use_mmap: params.use_mmap,
            n_threads: (params.n_threads > 0).then_some(params.n_threads as usize),
            vocab_only: false,
        };
        let model = Model::open(path, options)?;
        let obj = ModelObj {
            model,
            binding: OnceLock::new(),
        };
        // SAFETY: checked and cleared above.
        unsafe { args::write_out(out, handle::insert(obj), "out") }
    })
}

/// Frees a model handle. NULL is a no-op. Open sessions keep the weights alive until they are
/// freed too.
#[no_mangle]
pub extern "C" fn amend_model_free(model: *mut amend_model) {
    guard("amend_model_free", || {
        drop(handle::remove::<ModelObj, _>(model, MODEL)?);
        Ok(())
    });
}

/// Fills `*out` with the model's dimensions.
#[no_mangle]
pub extern "C" fn amend_model_get_info(
    model: *const amend_model,
    out: *mut amend_model_info,
) -> amend_result {
    guard("amend_model_get_info", || {
        let m = handle::get::<ModelObj, _>(model, MODEL, "model")?;
        let i = m.model.info();
        let info = amend_model_info {
            n_layer: i.n_layer,
            n_embd: i.n_embd,
            n_ff: i.n_ff,
            n_head: i.n_head,
            n_head_kv: i.n_head_kv,
            n_vocab: i.n_vocab,
            n_ctx_train: i.n_ctx_train,
            bos: i.bos.unwrap_or(-1),
            eos: i.eos.unwrap_or(-1),
            n_params: i.n_params,
            size_bytes: i.size_bytes,
        };
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_out(out, info, "out") }
    })
}

/// Copies llama.cpp's description of the model (e.g. "gemma3 270M Q4_K - Medium") into `buf`
/// as a NUL-terminated string. `*out_len` (if not NULL) receives its length without the NUL;
/// a `buf_len` too small gives `AMEND_ERR_BUFFER_TOO_SMALL` (query with `buf` NULL, `buf_len`
/// 0).
#[no_mangle]
pub extern "C" fn amend_model_description(
    model: *const amend_model,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> amend_result {
    guard("amend_model_description", || {
        let m = handle::get::<ModelObj, _>(model, MODEL, "model")?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_str(&m.model.info().description, buf, buf_len, out_len) }
    })
}
