//! The C-visible types: opaque handles, parameter structs and callbacks.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

/// A token id in the model's vocabulary.
pub type amend_token = i32;

/// A loaded model (immutable weights).
///
/// Thread rules: may be shared by any number of threads; every function taking a
/// `const amend_model *` may be called concurrently. Sessions keep the model alive, so
/// `amend_model_free` may be called while sessions of it are still open.
pub struct amend_model {
    _private: [u8; 0],
}

/// The scope model that routes retrieval memories (all-MiniLM-L6-v2 as a `bert` GGUF, see
/// `amend scope-model convert`): serac bundles record its fingerprint and need it to activate.
///
/// Lifetime: created by `amend_scope_model_open` / `amend_scope_model_open_bytes`, freed by
/// `amend_scope_model_free`. Sessions that were given it (`amend_session_set_scope_model`) keep
/// it alive, so it may be freed while they are still open.
///
/// Thread rules: immutable after loading; may be shared by any number of threads and sessions
/// (its encodes are serialized inside).
pub struct amend_scope_model {
    _private: [u8; 0],
}

/// A set of trusted ed25519 public keys that bundles must be signed by.
///
/// Thread rules: immutable after creation; may be shared by any number of threads.
pub struct amend_trust_store {
    _private: [u8; 0],
}

/// A verified patch bundle: its signature was checked against a trust store and it was
/// checked to fit a model. Loading does not activate it; see `amend_session_activate`.
///
/// Thread rules: immutable after loading; may be shared by any number of threads and
/// activated in several sessions at once.
pub struct amend_bundle {
    _private: [u8; 0],
}

/// An inference session: a context window, the active edits, and generation state.
///
/// Thread rules: one thread at a time. A call made while another thread (or the session's
/// own token callback) is inside a call on the same session fails with `AMEND_ERR_BUSY`
/// instead of racing. The one exception is `amend_session_cancel`, which may be called from
/// any thread at any time.
pub struct amend_session {
    _private: [u8; 0],
}

/// Which engine runs a model (`amend_model_params.backend`).
pub type amend_backend = u32;
/// llama.cpp on the CPU (the default).
pub const AMEND_BACKEND_LLAMA_CPP: amend_backend = 0;
/// ONNX Runtime on an execution provider (`amend_model_params.ep`), from a graph built from the
/// GGUF with its exact weights. Bundles' edits go through the graph's edit slots, fixed at open
/// (`amend_model_params.edit_slots`).
pub const AMEND_BACKEND_ONNXRUNTIME: amend_backend = 1;

/// How to load a model. Get defaults from `amend_model_default_params()` and change fields.
///
/// `struct_size` is `sizeof(amend_model_params)` as the caller was compiled (the defaults set
/// it): a caller built against an older, shorter struct keeps working as fields are added.
/// Its `bool` fields, as those of every parameter struct, are read as C flags: any nonzero
/// byte is true.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct amend_model_params {
    /// `sizeof(amend_model_params)` of the caller's header (set by the defaults).
    pub struct_size: usize,
    /// Memory-map the weights (default true; llama.cpp). On Linux what is mapped is a private,
    /// sealed in-memory copy of the file the runtime makes at open, so a process that rewrites
    /// the model file after it was opened changes nothing this model computes
    /// (docs/security.md); elsewhere the file itself.
    pub use_mmap: bool,
    /// Default thread count for this model's sessions, at most 512 (ggml's limit); 0 = the
    /// machine's available parallelism (default 0). Larger values: `AMEND_ERR_INVALID_ARGUMENT`.
    /// On ONNX Runtime: its intra-op threads (0 = its default).
    pub n_threads: u32,
    /// `AMEND_BACKEND_LLAMA_CPP` (default) or `AMEND_BACKEND_ONNXRUNTIME`.
    pub backend: amend_backend,
    /// ONNX Runtime: the execution provider, NUL-terminated: "cpu", "openvino[:CPU|GPU|NPU]",
    /// "qnn", "coreml", "nnapi", "xnnpack". NULL = "cpu". An EP the library lacks is
    /// `AMEND_ERR_MODEL_LOAD`, never a silent CPU fallback. Borrowed for the call only.
    pub ep: *const c_char,
    /// ONNX Runtime: the library to load (NULL = $AMEND_ORT_LIB, else what
    /// scripts/fetch-ort.sh installed under $AMEND_CACHE/ort, by default ~/.cache/amend/ort).
    /// Borrowed for the call only. The first load sets ORT_DISABLE_TELEMETRY=1 in the process
    /// environment unless the variable is set (ONNX Runtime's telemetry; docs/security.md).
    pub ort_library: *const c_char,
    /// ONNX Runtime: the graph's edit slots, e.g. "cb:12:ffn_input:ffn_output;lr:blk.5.ffn_down.weight"
    /// (docs/backends.md; `amend inspect --pubkey` prints a bundle's). NULL or "" = none: the base graph, which
    /// refuses bundles with edits. Borrowed for the call only.
    pub edit_slots: *const c_char,
    /// ONNX Runtime: let nodes the EP does not take run on its CPU EP (default false: such a
    /// graph is an error).
    pub cpu_fallback: bool,
    /// ONNX Runtime, fixed shapes as QNN requires (fields added in the second version of this
    /// struct): a prefill graph of `static_chunk` tokens (1..=512) and a one-token decode graph
    /// over a KV window of `static_window` positions, which bounds the sessions' `n_ctx`
    /// (a larger one is `AMEND_ERR_INVALID_ARGUMENT` at `amend_session_open`). Both 0 (the
    /// default): dynamic shapes. Only one of them 0, values out of range, or either set with
    /// the llama.cpp backend: `AMEND_ERR_INVALID_ARGUMENT`. Edit slots then have a static
    /// capacity (1,024 codebook entries, 256 neurons, rank 64 per slot); a snapshot needing
    /// more is `AMEND_ERR_EDIT_INVALID` naming the slot, and nothing of it applies.
    pub static_chunk: usize,
    pub static_window: usize,
    /// ONNX Runtime: options for the execution provider (field added in the third version of
    /// this struct), NUL-terminated, one `KEY=VALUE` per line (a value may hold `=` and `;`,
    /// not a newline), given to the EP as they are after amend's own (a same key replaces
    /// amend's): e.g. "backend_path=libQnnHtp.so" for QNN's NPU backend. NULL or "" = none.
    /// A line without `=`, or options with the llama.cpp backend or an EP that takes none
    /// (cpu, nnapi): `AMEND_ERR_INVALID_ARGUMENT`; an option the EP refuses:
    /// `AMEND_ERR_MODEL_LOAD` naming the keys. Borrowed for the call only.
    pub ep_options: *const c_char,
    /// llama.cpp backend (field added in the fourth version of this struct): run from a private,
    /// sealed in-memory copy of the model file (default true, Linux), so that a process that
    /// rewrites or truncates the file after this call changes nothing the model computes
    /// (docs/security.md). It costs one copy of the file at open and makes the weights memory
    /// the kernel cannot drop and re-read under pressure; false maps the file itself.
    pub private_copy: bool,
}

/// What a loaded model is. Strings are not included: see `amend_model_description`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct amend_model_info {
    pub n_layer: u32,
    pub n_embd: u32,
    /// FFN hidden size (of layer 0 when it varies per layer).
    pub n_ff: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    /// Beginning-of-sequence token, or -1 if the model has none.
    pub bos: amend_token,
    /// End-of-sequence token, or -1 if the model has none.
    pub eos: amend_token,
    pub n_params: u64,
    /// Bytes of tensor data.
    pub size_bytes: u64,
}

/// How to open a session. Get defaults from `amend_session_default_params()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct amend_session_params {
    /// Context window in tokens (prompt + generated), 1..=1048576, capped at the model's
    /// training context (default 2048).
    pub n_ctx: u32,
    /// Largest batch evaluated at once, >= 1, capped at `n_ctx`; longer prompts are evaluated
    /// in chunks (default 512).
    pub n_ubatch: u32,
    /// Threads for generation, at most 512; 0 = the model's default.
    pub n_threads: u32,
    /// Threads for prompt evaluation, at most 512; 0 = same as `n_threads`.
    pub n_threads_batch: u32,
}

/// How to generate. Get defaults from `amend_generate_default_params()`; the defaults are the
/// Rust API's (`amend_runtime::GenerateParams::default()`), so both give the same tokens.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct amend_generate_params {
    /// Upper bound on generated tokens (default 128).
    pub max_tokens: u32,
    /// Sampling temperature, finite; <= 0 = greedy (default 0); a positive value below 1e-6
    /// is refused (the scaled logits would overflow).
    pub temperature: f32,
    /// Keep only the k most likely tokens before sampling, at most INT32_MAX; 0 = off
    /// (default 40).
    pub top_k: u32,
    /// Nucleus sampling threshold in (0, 1]; 1 = off (default 0.95).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the best one, in [0, 1]; 0 = off (default 0.05).
    pub min_p: f32,
    /// Penalty for repeating recent tokens, finite and > 0; 1 = off (default 1).
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at, at most the session's `n_ctx`
    /// (default 64). Read and checked only while `repeat_penalty` is not 1, so the defaults
    /// work on any context.
    pub repeat_last_n: u32,
    /// Sampling seed: the same seed, prompt, active edits and parameters give the same tokens.
    /// Any value but UINT32_MAX (llama.cpp's "random seed").
    pub seed: u32,
    /// Prepend BOS to the prompt when the model's tokenizer wants it (default true).
    pub add_bos: bool,
    /// Stop at an end-of-generation token (default true; false for benchmarks).
    pub stop_at_eos: bool,
}

/// Why a generation that returned `AMEND_OK` stopped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum amend_stop_reason {
    /// `max_tokens` were generated.
    AMEND_STOP_MAX_TOKENS = 0,
    /// The model produced an end-of-generation token (not passed to the callback).
    AMEND_STOP_EOS = 1,
    /// The token callback returned false.
    AMEND_STOP_CALLBACK = 2,
    /// The session's context window is full (open the session with a larger `n_ctx`).
    AMEND_STOP_CONTEXT_FULL = 3,
    /// Cancelled through `amend_session_cancel` (the call returns `AMEND_ERR_CANCELLED`).
    AMEND_STOP_CANCELLED = 4,
}

/// What a generation did. Filled by `amend_session_generate` when its `out` is not NULL.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct amend_generation {
    /// Tokens in the prompt after tokenization (including BOS when one was added).
    pub n_prompt_tokens: u32,
    /// Tokens generated (each passed to the callback).
    pub n_generated: u32,
    pub stop_reason: amend_stop_reason,
    /// Prompt evaluation speed, tokens per second.
    pub prefill_tok_s: f64,
    /// Generation speed, tokens per second.
    pub decode_tok_s: f64,
}

/// The `token` value of the last callback call of a generation when it only carries text
/// that was held back (see `amend_token_callback`).
pub const AMEND_FLUSH_TOKEN: amend_token = -1;

/// Called once per generated token, on the thread that called `amend_session_generate`.
///
/// `text` is the UTF-8 text that became final with this token (`text_len` bytes, followed by
/// a NUL that is not counted), valid only during the call. It can be empty: bytes of an
/// incomplete multi-byte character are held back until the character is complete. Held-back
/// text left at the end arrives in one last call with `token == AMEND_FLUSH_TOKEN`, whose
/// return value is ignored. Concatenating every `text` gives exactly the generated text.
///
/// Return true to continue, false to stop (the generation then returns `AMEND_OK` with
/// `AMEND_STOP_CALLBACK`). The callback must not call amend functions on the same session
/// (they fail with `AMEND_ERR_BUSY`), except `amend_session_cancel`.
pub type amend_token_callback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        token: amend_token,
        text: *const c_char,
        text_len: usize,
    ) -> bool,
>;

/// Teacher-forced score of a target continuation after a prompt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct amend_score {
    /// Tokens in the target.
    pub n_target_tokens: u32,
    /// Sum over target tokens of ln p(token | everything before it).
    pub logprob_sum: f64,
    /// `logprob_sum / n_target_tokens`.
    pub logprob_mean: f64,
    /// Target tokens that were also the model's most likely token at their position.
    pub n_argmax_match: u32,
}

/// One edit's activity during the session's last generation or scoring, passed to the
/// callback of `amend_session_explain`. Strings are valid only during the callback.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct amend_edit_activity {
    /// The id of the bundle the edit came from (NUL-terminated).
    pub bundle_id: *const c_char,
    /// The edit's id within its bundle (NUL-terminated; "" for a bundle-wide low-rank adapter).
    pub edit_id: *const c_char,
    /// The edit family: "codebook", "patch_neurons", "low_rank" or "memory"; or "unverified",
    /// a warning (edit_id "", counts 0): the bundle records where its edits were verified and
    /// this session's backend is not among them.
    pub family: *const c_char,
    /// The layer the edit acts at.
    pub layer: u32,
    /// How often the edit changed the computation: codebook lookups that replaced a row,
    /// positions a patch neuron fired at, 1 for an in-scope memory or an applied low-rank
    /// adapter.
    pub n_fired: u32,
    /// How often it was checked (codebook lookups, memory scope checks, adapters); 0 when the
    /// family reports only firings (patch neurons).
    pub n_checked: u32,
}

/// Called once per active edit by `amend_session_explain`; return false to stop early.
pub type amend_explain_callback = Option<
    unsafe extern "C" fn(user_data: *mut c_void, activity: *const amend_edit_activity) -> bool,
>;

/// Information about a loaded bundle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct amend_bundle_info {
    /// Number of edits in the bundle.
    pub n_edits: u32,
    /// The bundle's version on its channel (see `amend_bundle_channel`).
    pub version: u64,
    /// Size of the bundle in bytes.
    pub size_bytes: u64,
    /// Unix seconds before which the bundle is not valid.
    pub not_before: u64,
    /// Unix seconds after which the bundle is not valid (UINT64_MAX = never).
    pub expires: u64,
}
