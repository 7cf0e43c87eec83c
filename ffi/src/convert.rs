//! Rust errors of the runtime and bundle crates mapped to result codes (one code per failure
//! class; the message keeps the specifics).

use amend_runtime::RuntimeError;

use crate::error::{amend_result as R, FfiError};

impl From<RuntimeError> for FfiError {
    fn from(e: RuntimeError) -> Self {
        let code = match &e {
            RuntimeError::NotFound { .. }
            | RuntimeError::Io { .. }
            | RuntimeError::Write { .. }
            | RuntimeError::File(_)
            | RuntimeError::ModelChanged { .. } => R::AMEND_ERR_IO,
            RuntimeError::NotGguf { .. }
            | RuntimeError::Truncated { .. }
            | RuntimeError::InvalidGguf { .. }
            | RuntimeError::InvalidHparams { .. }
            | RuntimeError::UnsupportedArchitecture { .. }
            | RuntimeError::LoadFailed { .. }
            | RuntimeError::OrtLibrary { .. }
            | RuntimeError::OrtEp { .. }
            | RuntimeError::OrtSession { .. }
            | RuntimeError::OrtCache { .. }
            | RuntimeError::OrtGraph(_)
            | RuntimeError::OutOfMemory { .. } => R::AMEND_ERR_MODEL_LOAD,
            RuntimeError::ContextCreate { .. } | RuntimeError::Threads { .. } => {
                R::AMEND_ERR_CONTEXT
            }
            RuntimeError::InvalidOptions(_)
            | RuntimeError::InvalidParams(_)
            | RuntimeError::InvalidToken { .. }
            | RuntimeError::EmptyInput => R::AMEND_ERR_INVALID_ARGUMENT,
            RuntimeError::Tokenize(_) => R::AMEND_ERR_TOKENIZE,
            RuntimeError::ContextFull { .. } => R::AMEND_ERR_CONTEXT_FULL,
            RuntimeError::Aborted => R::AMEND_ERR_CANCELLED,
            RuntimeError::LayerOutOfRange { .. }
            | RuntimeError::SiteUnavailable { .. }
            | RuntimeError::InvalidEdit(_)
            | RuntimeError::EditSlot(_)
            | RuntimeError::Unsupported(_) => R::AMEND_ERR_EDIT_INVALID,
            RuntimeError::ScopeModelInvalid { .. } => R::AMEND_ERR_SCOPE_MODEL,
            RuntimeError::UnknownBundle(_) => R::AMEND_ERR_NOT_FOUND,
            // The runtime's message names its Rust/CLI knobs; C callers get theirs.
            RuntimeError::ScopeModelMissing {
                bundle,
                model_id,
                fingerprint,
            } => {
                return FfiError::new(
                    R::AMEND_ERR_SCOPE_MODEL,
                    format!(
                        "bundle {bundle} routes its memories with the scope model {fingerprint} \
                         ({model_id}), but the session has none (open it with \
                         amend_scope_model_open, give it with amend_session_set_scope_model); \
                         nothing of the bundle was applied"
                    ),
                )
            }
            RuntimeError::ScopeModelMismatch { .. } => R::AMEND_ERR_SCOPE_MODEL_MISMATCH,
            RuntimeError::Unverified { .. } => R::AMEND_ERR_BUNDLE_UNVERIFIED,
            // Decode failures, hook failures, KV and logits bookkeeping: evaluation failed.
            _ => R::AMEND_ERR_DECODE,
        };
        FfiError::new(code, e.to_string())
    }
}

use amend_edits::bundle::OpenError;
use amend_edits::fingerprint::FingerprintError;
use amend_edits::keys::KeyError;
use amend_edits::{BundleError, EditSetError};

/// The one mapping of bundle refusals to codes, for the in-memory loaders and the streaming
/// verifier alike. Exhaustive on purpose: a new refusal must choose its code here.
impl From<BundleError> for FfiError {
    fn from(e: BundleError) -> Self {
        use BundleError as B;
        let code = match e {
            // A short buffer is malformed; a stream that stops early has its own code.
            B::Truncated { .. } => R::AMEND_ERR_BUNDLE_FORMAT,
            B::EndedEarly { .. } => R::AMEND_ERR_BUNDLE_TRUNCATED,
            B::PastDeclaredLength { .. } => R::AMEND_ERR_BUNDLE_TOO_LONG,
            B::UnsupportedVersion { .. } => R::AMEND_ERR_BUNDLE_VERSION,
            B::SectionHash { .. } | B::NonFinite { .. } | B::ValueOutOfRange { .. } => {
                R::AMEND_ERR_BUNDLE_INTEGRITY
            }
            B::Unsigned | B::BadSignature => R::AMEND_ERR_SIGNATURE,
            B::UnknownKeyId(_) | B::SecretKeyTrusted { .. } => R::AMEND_ERR_UNTRUSTED_KEY,
            B::BadTrustedKey(_) => R::AMEND_ERR_INVALID_KEY,
            B::TooManyKeys => R::AMEND_ERR_INVALID_ARGUMENT,
            B::PayloadDimension { .. }
            | B::InvalidPayload { .. }
            | B::BadEdit { .. }
            | B::DuplicateEditId { .. } => R::AMEND_ERR_EDIT_INVALID,
            // A malformed byte stream: magic, header, manifest, sections (a manifest over the
            // streaming verifier's cap included).
            B::BadMagic
            | B::BadHeader(_)
            | B::LengthMismatch { .. }
            | B::CapExceeded { .. }
            | B::ManifestTooLarge { .. }
            | B::MisalignedBuffer
            | B::ManifestDecode(_)
            | B::ManifestTrailingBytes(_)
            | B::BadManifest(_)
            | B::SectionOutOfBounds { .. }
            | B::SectionMisaligned { .. }
            | B::SectionOverlap { .. }
            | B::NonZeroPadding { .. }
            | B::UnknownSectionKind { .. }
            | B::UnknownDtype { .. }
            | B::SectionShape { .. }
            | B::UnreferencedSection { .. }
            | B::UnknownPayloadKind { .. }
            | B::DescriptorDecode { .. }
            | B::BadSectionRef { .. }
            | B::UnknownSite { .. }
            | B::UnknownCode { .. } => R::AMEND_ERR_BUNDLE_FORMAT,
        };
        // The trusted keys are at fault, not the bundle.
        let message = match e {
            B::BadTrustedKey(_) | B::TooManyKeys | B::SecretKeyTrusted { .. } => e.to_string(),
            _ => format!("invalid bundle: {e}"),
        };
        FfiError::new(code, message)
    }
}

impl From<OpenError> for FfiError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::File(f) => {
                FfiError::new(R::AMEND_ERR_IO, format!("cannot read bundle: {f}"))
            }
            OpenError::Bundle(b) => b.into(),
        }
    }
}

impl From<EditSetError> for FfiError {
    fn from(e: EditSetError) -> Self {
        use EditSetError as E;
        let code = match &e {
            E::Bundle(b) => return (*b).into(),
            E::Expired { .. } | E::NotYetValid { .. } => R::AMEND_ERR_BUNDLE_EXPIRED,
            E::Replay { .. } | E::Downgrade { .. } => R::AMEND_ERR_BUNDLE_DOWNGRADE,
            E::VersionStore(_) => R::AMEND_ERR_IO,
            E::WrongModel | E::ArchMismatch { .. } | E::DimensionMismatch { .. } => {
                R::AMEND_ERR_MODEL_MISMATCH
            }
            E::DuplicateBundle(_) | E::AlreadyRolledBack(_) | E::NotRolledBack(_) => {
                R::AMEND_ERR_EDIT_CONFLICT
            }
            E::UnknownBundle(_) | E::UnknownEdit(_) | E::NoHistory => R::AMEND_ERR_NOT_FOUND,
        };
        FfiError::new(code, e.to_string())
    }
}

impl From<KeyError> for FfiError {
    fn from(e: KeyError) -> Self {
        let code = match e {
            KeyError::BadEncoding | KeyError::BadPublicKey | KeyError::WeakPublicKey => {
                R::AMEND_ERR_INVALID_KEY
            }
            KeyError::TrustStoreFull => R::AMEND_ERR_INVALID_ARGUMENT,
        };
        FfiError::new(code, e.to_string())
    }
}

impl From<FingerprintError> for FfiError {
    fn from(e: FingerprintError) -> Self {
        let code = match e {
            FingerprintError::Io(_) => R::AMEND_ERR_IO,
            _ => R::AMEND_ERR_MODEL_LOAD,
        };
        FfiError::new(code, format!("cannot fingerprint the model: {e}"))
    }
}
