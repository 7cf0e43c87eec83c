//! The runtime's error type.

use std::path::PathBuf;

use amend_edits::HookPoint;

/// Everything the runtime can report. Messages are specific enough to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("model file not found: {}", path.display())]
    NotFound { path: PathBuf },
    /// A FIFO, directory or device given as the model, or a file over the size cap.
    #[error(transparent)]
    File(amend_edits::fsutil::FileError),
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the runtime was asked to write (an exported ONNX graph) could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bytes read from the model after open no longer match what was opened (the file was
    /// rewritten in place): refused, never used.
    #[error("{} changed after it was opened: {detail}", path.display())]
    ModelChanged { path: PathBuf, detail: String },
    /// `magic`: the file's first bytes, at most 4 (none for an empty file).
    #[error("{} is not a GGUF file ({})", path.display(), if magic.is_empty() { "it is empty".to_string() } else { format!("bad magic {magic:02x?}") })]
    NotGguf { path: PathBuf, magic: Vec<u8> },
    #[error("{} is truncated: {detail}", path.display())]
    Truncated { path: PathBuf, detail: String },
    #[error("{} is not a valid GGUF file: {detail}", path.display())]
    InvalidGguf { path: PathBuf, detail: String },
    #[error("{} has a hyperparameter llama.cpp must not load: {source}", path.display())]
    InvalidHparams {
        path: PathBuf,
        #[source]
        source: amend_edits::gguf::HparamError,
    },
    #[error("unsupported model architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture { arch: String, supported: String },
    #[error("llama.cpp failed to load {} (run with RUST_LOG=amend_runtime=debug for its log)", path.display())]
    LoadFailed { path: PathBuf },
    #[error("llama.cpp failed to create a context (n_ctx {n_ctx})")]
    ContextCreate { n_ctx: u32 },
    /// A buffer as large as the model (its bytes, its graph) could not be allocated: the
    /// process's address space or memory limit is too small for this backend. Nothing was
    /// opened; smaller buffers than this are not checked (they abort, as any Rust allocation).
    #[error("not enough memory for {what} ({bytes} bytes)")]
    OutOfMemory { what: String, bytes: u64 },
    /// The process is at its thread limit (`RLIMIT_NPROC`, a cgroup's `pids.max`) or out of
    /// address space for the threads' stacks: nothing was created. Fewer threads (1 starts
    /// none) or fewer live threads in the process help.
    #[error("cannot start {wanted} compute thread(s) for the context (the process is at its thread limit or out of memory for their stacks; ask for fewer threads): {source}")]
    Threads {
        wanted: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid session options: {0}")]
    InvalidOptions(String),
    #[error("invalid generation parameters: {0}")]
    InvalidParams(String),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("token id {token} is outside the vocabulary (n_vocab {n_vocab})")]
    InvalidToken { token: i32, n_vocab: u32 },
    #[error("hook point {point}: layer {} is past the last layer (the model has {n_layer} layers, 0..={})", point.layer, n_layer.saturating_sub(1))]
    LayerOutOfRange { point: HookPoint, n_layer: u32 },
    #[error("hook point {point} is not available on {arch}: {reason}")]
    SiteUnavailable {
        point: HookPoint,
        arch: &'static str,
        reason: &'static str,
    },
    #[error("context full: {needed} positions needed, the session has n_ctx {n_ctx}")]
    ContextFull { needed: usize, n_ctx: u32 },
    #[error("nothing to evaluate (empty token list)")]
    EmptyInput,
    #[error("llama_decode failed with status {code}")]
    Decode { code: i32 },
    #[error("evaluation was aborted by cancellation")]
    Aborted,
    #[error("hook at {point} failed: {message}")]
    Hook { point: HookPoint, message: String },
    #[error("hook callback failed on tensor `{node}`: {message}")]
    HookTensor { node: String, message: String },
    #[error("cannot truncate the KV cache to {keep} positions: {reason}")]
    KvTruncate { keep: usize, reason: String },
    #[error("no logits for index {index} of the last evaluation")]
    NoLogits { index: usize },
    /// Generation refuses to sample from such a row: greedy would pick token 0 and llama.cpp's
    /// samplers sort NaN (undefined behaviour in C++).
    #[error("the logits for generated token {index} are not usable: {detail} (a hook, edit or LoRA scale made the hidden states non-finite)")]
    NonFiniteLogits { index: usize, detail: String },
    #[error("edit cannot be applied: {0}")]
    InvalidEdit(String),
    /// No bundle with this id is active in the session's edit set.
    #[error("no active bundle has id {0:?}")]
    UnknownBundle(String),
    #[error("llama.cpp threw {what} in {call}")]
    CppException {
        call: &'static str,
        what: &'static str,
    },
    #[error("ONNX Runtime library {} is not usable: {detail} (scripts/fetch-ort.sh installs it; --ort-lib or $AMEND_ORT_LIB names another)", path.display())]
    OrtLibrary { path: PathBuf, detail: String },
    #[error("execution provider {ep}: {detail}")]
    OrtEp { ep: String, detail: String },
    /// ONNX Runtime refused to create a session for the graph on `ep`: nodes the EP does not
    /// take with CPU fallback off (ONNX Runtime's message says so), or a graph its checker finds
    /// invalid (a damaged named `.onnx` file).
    #[error("ONNX Runtime cannot run the graph on {ep}: {detail}")]
    OrtSession { ep: String, detail: String },
    #[error("ONNX graph {} cannot be used: {detail}", path.display())]
    OrtCache { path: PathBuf, detail: String },
    #[error("cannot build the ONNX graph: {0}")]
    OrtGraph(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    /// An edit the ONNX Runtime graph has no slot for (the graph's slot layout is fixed when it
    /// is built); nothing of the snapshot was applied.
    #[error(
        "no edit slot: {0}; nothing was applied (open the model with a slot layout that covers it)"
    )]
    EditSlot(String),
    /// A capability this backend lacks for an edit; nothing was applied.
    #[error("not supported on this backend: {0}; nothing was applied")]
    Unsupported(String),
    #[error("scope model {} is not usable: {detail}", path.display())]
    ScopeModelInvalid { path: PathBuf, detail: String },
    #[error("bundle {bundle} routes its memories with the scope model {fingerprint} ({model_id}), but no scope model is configured (CLI: --scope-model PATH; C: amend_scope_model_open + amend_session_set_scope_model; Rust: Session::set_scope_model); nothing of the bundle was applied")]
    ScopeModelMissing {
        bundle: String,
        model_id: String,
        fingerprint: String,
    },
    /// The bundle demands verification (`Verification::required`) and was not verified on this
    /// backend.
    #[error("bundle {bundle} must run on a backend its edits were verified on, and {backend} is not one (verified on: {verified}); nothing of the bundle was applied (compile it with --verify-on {backend})")]
    Unverified {
        bundle: String,
        backend: String,
        verified: String,
    },
    #[error("bundle {bundle} was compiled for the scope model {expected} ({model_id}), but the configured one ({}) is {got}; nothing of the bundle was applied", path.display())]
    ScopeModelMismatch {
        bundle: String,
        model_id: String,
        expected: String,
        got: String,
        path: PathBuf,
    },
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
