//! amend patch bundles and the inference-time math of the edit families.
//!
//! The core (format, verification, views, math) is `no_std` + `alloc`; the `std` feature adds
//! files and mmap.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod families;
pub mod gguf;
pub mod site;

pub use site::{HookPoint, Site};
