//! The one list of reasons a bundle is refused, shared by the in-memory reader and the
//! streaming verifier. `Copy` and allocation-free so the `no_std` streaming verifier (no
//! allocator) can keep and return it.

use core::fmt;

use super::format::{FORMAT_MAJOR, MAX_ABS_VALUE, SECTION_ALIGN};
use crate::keys::{KeyId, MAX_TRUSTED_KEYS};

/// Why a bundle was refused. Each variant is one distinct failure. A few only the streaming
/// verifier reports (it sees the bytes arrive and holds the manifest in a fixed buffer):
/// [`BundleError::EndedEarly`], [`BundleError::PastDeclaredLength`],
/// [`BundleError::ManifestTooLarge`], [`BundleError::BadTrustedKey`] and
/// [`BundleError::TooManyKeys`]; the reader alone reports [`BundleError::LengthMismatch`] and
/// [`BundleError::MisalignedBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle truncated: need {needed} bytes, have {have}")]
    Truncated { needed: u64, have: u64 },
    /// A stream's `finish` came before the declared length (the stream's [`Self::Truncated`];
    /// C: `AMEND_ERR_BUNDLE_TRUNCATED`, where a short buffer is a format error).
    #[error("stream ended early: need {needed} bytes, got {have}")]
    EndedEarly { needed: u64, have: u64 },
    #[error("stream continues past the declared length of {declared} bytes")]
    PastDeclaredLength { declared: u64 },
    #[error("not an amend bundle (bad magic)")]
    BadMagic,
    #[error("bundle format {major}.{minor} is newer than this reader ({FORMAT_MAJOR}.x)")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("invalid header field: {0}")]
    BadHeader(&'static str),
    #[error("header says {declared} bytes but the buffer has {actual}")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("{what} is {value}, over the cap of {cap}")]
    CapExceeded {
        what: &'static str,
        value: u64,
        cap: u64,
    },
    #[error("manifest is {len} bytes; the streaming verifier holds at most {cap}")]
    ManifestTooLarge { len: u32, cap: u32 },
    #[error("bundle buffer is not 4-byte aligned (copy it into an AlignedBuf)")]
    MisalignedBuffer,
    #[error("bundle is not signed")]
    Unsigned,
    #[error("signed by unknown key {}", Hex(.0))]
    UnknownKeyId(KeyId),
    /// The signer's key id matches no trusted key, but trusted key `index`, read as an ed25519
    /// secret seed, is the signer's key: a secret key file was given where the public key belongs.
    #[error(
        "trusted key {index} is the signer's secret key, not its public key: trust the .pub \
         file, and keep the secret key off devices"
    )]
    SecretKeyTrusted { index: usize },
    #[error("signature does not verify")]
    BadSignature,
    #[error(
        "trusted key {0} is not a valid ed25519 public key (if it is a secret key file, use the \
         .pub beside it)"
    )]
    BadTrustedKey(usize),
    #[error("more than {MAX_TRUSTED_KEYS} trusted keys")]
    TooManyKeys,
    #[error("manifest does not decode: {0}")]
    ManifestDecode(&'static str),
    #[error("manifest has {0} trailing bytes")]
    ManifestTrailingBytes(usize),
    #[error("invalid manifest field: {0}")]
    BadManifest(&'static str),
    #[error("section {index} lies outside the payload area")]
    SectionOutOfBounds { index: usize },
    #[error("section {index} is not {SECTION_ALIGN}-byte aligned")]
    SectionMisaligned { index: usize },
    #[error("sections {a} and {b} overlap")]
    SectionOverlap { a: usize, b: usize },
    #[error("non-zero padding byte at offset {offset}")]
    NonZeroPadding { offset: u64 },
    #[error("section {index} has unknown kind {kind}")]
    UnknownSectionKind { index: usize, kind: u16 },
    #[error("section {index} has unknown dtype {dtype}")]
    UnknownDtype { index: usize, dtype: u8 },
    #[error("section {index}: shape does not match its length")]
    SectionShape { index: usize },
    #[error("section {index}: sha256 mismatch")]
    SectionHash { index: usize },
    #[error("section {index}: NaN or infinity")]
    NonFinite { index: usize },
    #[error("section {index}: a value exceeds the magnitude bound {MAX_ABS_VALUE:e}")]
    ValueOutOfRange { index: usize },
    #[error("section {index} is not referenced by any payload")]
    UnreferencedSection { index: usize },
    #[error("payload {index} has unknown kind {kind}")]
    UnknownPayloadKind { index: usize, kind: u16 },
    #[error("payload {index}: descriptor does not decode")]
    DescriptorDecode { index: usize },
    #[error("payload {payload}: bad reference to section {section}: {reason}")]
    BadSectionRef {
        payload: usize,
        section: u32,
        reason: &'static str,
    },
    #[error("payload {payload}: unknown site code {code}")]
    UnknownSite { payload: usize, code: u8 },
    #[error("payload {payload}: unknown {what} code {code}")]
    UnknownCode {
        payload: usize,
        what: &'static str,
        code: u8,
    },
    #[error("payload {payload}: {what} is {value}, the model has {model}")]
    PayloadDimension {
        payload: usize,
        what: &'static str,
        value: u64,
        model: u64,
    },
    #[error("payload {payload}: {reason}")]
    InvalidPayload {
        payload: usize,
        reason: &'static str,
    },
    #[error("edit {index}: {reason}")]
    BadEdit { index: usize, reason: &'static str },
    /// `index`: the first edit whose id an earlier edit already has.
    #[error("edit {index} repeats an earlier edit's id")]
    DuplicateEditId { index: usize },
}

/// Lowercase hex without an allocator (key ids in messages).
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
