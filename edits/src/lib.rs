//! amend patch bundles and the inference-time math of the edit families.
//!
//! The core (format, verification, views, math) is `no_std` + `alloc`; the `std` feature adds
//! files and mmap.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod families;
pub mod gguf;
pub mod site;

pub mod bundle;
#[cfg(feature = "std")]
pub mod editset;
#[cfg(feature = "std")]
pub mod fingerprint;
#[cfg(feature = "std")]
pub mod fsutil;
pub mod keys;
#[cfg(feature = "std")]
pub mod version_store;

pub use bundle::{Bundle, BundleBuilder, BundleError, BundleMeta, Manifest, ModelBinding};
/// Re-exported so callers name the same key types as the bundle code.
pub use ed25519_dalek;
#[cfg(feature = "std")]
pub use editset::{ActiveSet, AddOptions, EditSet, EditSetError};
pub use keys::TrustStore;
pub use site::{HookPoint, Site};
