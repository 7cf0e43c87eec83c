//! Errors of the edit compiler. Every variant names what was wrong (the record, the option, the
//! tensor) so a user can fix the input; nothing is written when one is returned.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model {path}: not a readable GGUF file: {message}")]
    BadGguf { path: PathBuf, message: String },
    #[error(
        "model: architecture `{arch}` has no differentiable forward yet (supported: {supported})"
    )]
    UnsupportedArchitecture { arch: String, supported: String },
    #[error("model: {0}")]
    UnsupportedModel(String),
    #[error("model: missing metadata key `{0}`")]
    MissingMetadata(String),
    #[error("model: missing tensor `{0}`")]
    MissingTensor(String),
    #[error("option --layer: layer {layer} is out of range (the model has {n_layer} layers, 0..={max})", max = n_layer.saturating_sub(1))]
    LayerOutOfRange { layer: usize, n_layer: usize },
    #[error("edit record {index}{}: {message}", id.as_ref().map(|i| format!(" (id {i:?})")).unwrap_or_default())]
    BadRecord {
        index: usize,
        /// The record's id, when it has one to name.
        id: Option<String>,
        message: String,
    },
    #[error("edit ids must be unique: {ids:?} appear more than once among the edit records")]
    DuplicateEditIds { ids: Vec<String> },
    #[error("edit ids {ids:?} of the new records are already used by --base-bundle (give the records explicit, new ids)")]
    EditIdsInBase { ids: Vec<String> },
    #[error("hyperparameters: {0}")]
    Hparams(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("stopped after {done} of {total} edits; the finished ones are kept in {} (run the same command again to resume)", .path.display())]
    Interrupted {
        done: usize,
        total: usize,
        path: PathBuf,
    },
    #[error("tensor computation failed: {0}")]
    Candle(String),
    #[error("numerics: {0}")]
    Numeric(String),
    #[error("covariance corpus: {0}")]
    Corpus(String),
}

impl From<candle_core::Error> for CompileError {
    fn from(e: candle_core::Error) -> Self {
        CompileError::Candle(candle_message(&e))
    }
}

/// A candle error's message without the backtrace candle attaches (under RUST_BACKTRACE).
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

pub type Result<T, E = CompileError> = std::result::Result<T, E>;
