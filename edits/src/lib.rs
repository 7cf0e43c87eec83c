//! amend patch bundles and the inference-time math of the edit families.
//!
//! The core (format, verification, views, math) is `no_std` + `alloc`; the `std` feature adds
//! files and mmap. Without `alloc` (`--no-default-features`) what remains needs no allocator
//! at all: the format constants, the trust store, the streaming verifier
//! ([`bundle::StreamVerifier`]) for firmware and its error ([`BundleError`]).
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod families;
#[cfg(feature = "alloc")]
pub mod gguf;
pub mod site;

#[cfg(feature = "alloc")]
pub mod bundle;
/// Without `alloc`: the bundle layout and the streaming verifier only.
#[cfg(not(feature = "alloc"))]
pub mod bundle {
    pub mod error;
    pub mod format;
    pub mod stream;
    pub use error::BundleError;
    pub use format::*;
    pub use stream::{StreamVerified, StreamVerifier, STREAM_MAX_MANIFEST_LEN, STREAM_SIGNED_CAP};
}
#[cfg(feature = "std")]
pub mod editset;
#[cfg(feature = "std")]
pub mod fingerprint;
#[cfg(feature = "std")]
pub mod fsutil;
pub mod keys;
#[cfg(feature = "std")]
pub mod version_store;

pub use bundle::BundleError;
#[cfg(feature = "alloc")]
pub use bundle::{Bundle, BundleBuilder, BundleMeta, Manifest, ModelBinding};
/// Re-exported so callers name the same key types as the bundle code.
pub use ed25519_dalek;
#[cfg(feature = "std")]
pub use editset::{ActiveSet, AddOptions, EditSet, EditSetError};
pub use keys::TrustStore;
pub use site::{HookPoint, Site};
