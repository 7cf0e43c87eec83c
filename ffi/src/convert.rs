//! Rust errors of the runtime and bundle crates mapped to result codes (one code per failure
//! class; the message keeps the specifics).

use amend_runtime::RuntimeError;

use crate::error::{amend_result as R, FfiError};

impl From<RuntimeError> for FfiError {
    fn from(e: RuntimeError) -> Self {
        let code = match &e {
            RuntimeError::NotFound { .. } | RuntimeError::Io { .. } => R::AMEND_ERR_IO,
            RuntimeError::NotGguf { .. }
            | RuntimeError::Truncated { .. }
            | RuntimeError::InvalidGguf { .. }
            | RuntimeError::UnsupportedArchitecture { .. }
            | RuntimeError::LoadFailed { .. } => R::AMEND_ERR_MODEL_LOAD,
            RuntimeError::ContextCreate { .. } => R::AMEND_ERR_CONTEXT,
            RuntimeError::InvalidOptions(_)
            | RuntimeError::InvalidParams(_)
            | RuntimeError::InvalidToken { .. }
            | RuntimeError::EmptyInput => R::AMEND_ERR_INVALID_ARGUMENT,
            RuntimeError::Tokenize(_) => R::AMEND_ERR_TOKENIZE,
            RuntimeError::ContextFull { .. } => R::AMEND_ERR_CONTEXT_FULL,
            RuntimeError::Aborted => R::AMEND_ERR_CANCELLED,
            RuntimeError::LayerOutOfRange { .. } | RuntimeError::SiteUnavailable { .. } => {
                R::AMEND_ERR_EDIT_INVALID
            }
            // Decode failures, hook failures, KV and logits bookkeeping: evaluation failed.
            _ => R::AMEND_ERR_DECODE,
        };
        FfiError::new(code, e.to_string())
    }
}
