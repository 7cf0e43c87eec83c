//! Model entry points.

use std::ffi::c_char;
use std::sync::{Arc, OnceLock};

use amend_edits::ModelBinding;
use amend_runtime::onnxruntime::{Ep, OrtModel, OrtOptions, SlotLayout};
use amend_runtime::{Model, ModelOptions};

use crate::amend_result;
use crate::args;
use crate::error::{guard, FfiError, FfiResult};
use crate::handle;
use crate::types::*;

pub(crate) struct ModelObj {
    /// llama.cpp's model (vocabulary-only when `ort` runs the weights).
    pub model: Arc<Model>,
    /// The model on ONNX Runtime (`AMEND_BACKEND_ONNXRUNTIME`).
    pub ort: Option<Arc<OrtModel>>,
    /// The fingerprint bundles are bound to, computed on first use (hashes the weights once;
    /// cached next to the model file by amend_edits).
    binding: OnceLock<ModelBinding>,
}

impl ModelObj {
    pub fn binding(&self) -> FfiResult<&ModelBinding> {
        if let Some(b) = self.binding.get() {
            return Ok(b);
        }
        let b = match &self.ort {
            // The fingerprint of the very bytes the graph was built from.
            Some(o) => o.binding().clone(),
            None => self.model.binding()?,
        };
        Ok(self.binding.get_or_init(|| b))
    }
}

pub(crate) const MODEL: &str = "amend_model";

/// Defaults for `amend_model_open`.
#[no_mangle]
pub extern "C" fn amend_model_default_params() -> amend_model_params {
    amend_model_params {
        struct_size: std::mem::size_of::<amend_model_params>(),
        use_mmap: true,
        n_threads: 0,
        backend: AMEND_BACKEND_LLAMA_CPP,
        ep: std::ptr::null(),
        ort_library: std::ptr::null(),
        edit_slots: std::ptr::null(),
        cpu_fallback: false,
        static_chunk: 0,
        static_window: 0,
        ep_options: std::ptr::null(),
        private_copy: true,
    }
}

/// The size of `amend_model_params` in its first version (struct_size, use_mmap, n_threads,
/// backend, ep, ort_library, edit_slots, cpu_fallback): the second version's fields are
/// pointer-sized, so they start where the first version's padded struct ended.
const MODEL_PARAMS_V1: usize = std::mem::offset_of!(amend_model_params, static_chunk);
/// ... and in its second (`static_chunk`, `static_window`), before `ep_options`.
const MODEL_PARAMS_V2: usize = std::mem::offset_of!(amend_model_params, ep_options);
/// ... and in its third (`ep_options`), before `private_copy` (the end of the pointer).
const MODEL_PARAMS_V3: usize = std::mem::offset_of!(amend_model_params, private_copy);

/// Loads a GGUF model from `path` (NUL-terminated UTF-8). `params` may be NULL for the
/// defaults. On success `*out` receives a handle to free with `amend_model_free`; on failure
/// `*out` is set to NULL.
///
/// With `backend` `AMEND_BACKEND_ONNXRUNTIME` the model runs on ONNX Runtime (`ep`,
/// `ort_library`, `edit_slots`, `cpu_fallback`, `static_chunk`, `static_window`,
/// `ep_options`); tokenization
/// stays llama.cpp's.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_UTF8`, `AMEND_ERR_INVALID_ARGUMENT`
/// (`n_threads` above 512, a `struct_size` this library does not know, an unknown backend, EP
/// or slot, bad static shapes), `AMEND_ERR_IO` (missing or unreadable file), `AMEND_ERR_MODEL_LOAD` (not GGUF,
/// truncated, unsupported architecture, a hyperparameter llama.cpp would abort on: the message
/// names the GGUF key; ONNX Runtime library missing or unusable, EP absent, a graph the EP does
/// not take).
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
        let params = unsafe {
            args::read_sized_params(
                params,
                &[
                    MODEL_PARAMS_V1,
                    MODEL_PARAMS_V2,
                    MODEL_PARAMS_V3,
                    std::mem::size_of::<amend_model_params>(),
                ],
                &[
                    std::mem::offset_of!(amend_model_params, use_mmap),
                    std::mem::offset_of!(amend_model_params, cpu_fallback),
                    std::mem::offset_of!(amend_model_params, private_copy),
                ],
                || amend_model_default_params(),
                "params",
            )?
        };
        let n_threads = (params.n_threads > 0).then_some(params.n_threads as usize);
        let invalid = |m: String| FfiError::new(amend_result::AMEND_ERR_INVALID_ARGUMENT, m);
        let static_shapes = match (params.static_chunk, params.static_window) {
            (0, 0) => None,
            (chunk, window) if params.backend == AMEND_BACKEND_ONNXRUNTIME => Some(
                amend_runtime::onnxruntime::StaticShapes::new(chunk, window, Default::default())
                    .map_err(|e| invalid(format!("params.static_chunk/static_window: {e}")))?,
            ),
            _ => {
                return Err(invalid(
                    "params.static_chunk/static_window: fixed shapes are an ONNX Runtime option"
                        .into(),
                ))
            }
        };
        let ep_options = unsafe { args::opt_cstr(params.ep_options, "params.ep_options")? }
            .unwrap_or("")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| invalid(format!("params.ep_options: `{l}` is not KEY=VALUE")))
            })
            .collect::<FfiResult<Vec<_>>>()?;
        if !ep_options.is_empty() && params.backend != AMEND_BACKEND_ONNXRUNTIME {
            return Err(invalid(
                "params.ep_options: provider options are an ONNX Runtime option".into(),
            ));
        }
        let obj = match params.backend {
            AMEND_BACKEND_LLAMA_CPP => ModelObj {
                model: Model::open(
                    path,
                    ModelOptions {
                        use_mmap: params.use_mmap,
                        n_threads,
                        private_copy: params.private_copy,
                        ..Default::default()
                    },
                )?,
                ort: None,
                binding: OnceLock::new(),
            },
            AMEND_BACKEND_ONNXRUNTIME => {
                let ep = unsafe { args::opt_cstr(params.ep, "params.ep")? }.unwrap_or("cpu");
                let library = unsafe { args::opt_cstr(params.ort_library, "params.ort_library")? };
                let slots = unsafe { args::opt_cstr(params.edit_slots, "params.edit_slots")? };
                let options = OrtOptions {
                    ep: Ep::parse(ep).map_err(|e| invalid(e.to_string()))?,
                    library: library.map(Into::into),
                    n_threads,
                    cpu_fallback: params.cpu_fallback,
                    slots: SlotLayout::parse(slots.unwrap_or(""))
                        .map_err(|e| invalid(format!("params.edit_slots: {e}")))?,
                    static_shapes,
                    ep_options,
                    ..Default::default()
                };
                let ort = OrtModel::open(path, options)?;
                ModelObj {
                    model: ort.vocab().clone(),
                    ort: Some(ort),
                    binding: OnceLock::new(),
                }
            }
            other => {
                return Err(FfiError::new(
                    amend_result::AMEND_ERR_INVALID_ARGUMENT,
                    format!("params.backend {other}: expected AMEND_BACKEND_LLAMA_CPP (0) or AMEND_BACKEND_ONNXRUNTIME (1)"),
                ))
            }
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
