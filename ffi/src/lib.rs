//! amend C ABI: the only job of this crate.
//!
//! Every `extern "C"` function here runs inside [`error::guard`] (no panic unwinds into C),
//! checks every pointer and length through [`args`], and reaches objects only through the
//! handle registry ([`handle`]), so NULL, freed and wrong-kind handles are reported, never
//! dereferenced. `include/amend.h` is generated from this crate by cbindgen
//! (`tests/header.rs` fails when it is stale). See `docs/c-api.md`.

#![allow(non_camel_case_types)]
// The C ABI takes raw pointers by design; each entry point validates them before use.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod args;
pub mod error;
pub mod handle;
pub mod types;

mod bundle;
mod convert;
mod model;
mod scope;
mod session;
mod verify_stream;

use std::ffi::c_char;

pub use bundle::*;
pub use error::amend_result;
pub use model::*;
pub use scope::*;
pub use session::*;
pub use types::*;
pub use verify_stream::*;

/// The crate version as a NUL-terminated string (same as the Rust crate's).
const VERSION: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
) {
    Ok(s) => s,
    Err(_) => panic!("version string has an interior NUL"),
};

/// The library version, e.g. "0.1.0". Static storage; never NULL.
#[no_mangle]
pub extern "C" fn amend_version() -> *const c_char {
    VERSION.as_ptr()
}

/// The ABI version of this header and library. It changes when a signature or struct layout
/// changes incompatibly; compare it with `AMEND_ABI_VERSION` from the header you compiled
/// against.
#[no_mangle]
pub extern "C" fn amend_abi_version() -> u32 {
    AMEND_ABI_VERSION
}

/// The ABI version this header describes (see `amend_abi_version`).
pub const AMEND_ABI_VERSION: u32 = 2;

/// The name of a result code, e.g. "AMEND_ERR_NULL_ARGUMENT"; "AMEND_UNKNOWN_RESULT" for a
/// value that is not a code. Static storage; never NULL.
#[no_mangle]
pub extern "C" fn amend_result_name(code: i32) -> *const c_char {
    match amend_result::from_raw(code as i64) {
        Some(c) => c.name_cstr().as_ptr(),
        None => c"AMEND_UNKNOWN_RESULT".as_ptr(),
    }
}

/// The code of the last amend call made on this thread (`AMEND_OK` if it succeeded). Every
/// call, successful or not, replaces it.
#[no_mangle]
pub extern "C" fn amend_last_error_code() -> amend_result {
    error::last_error_code()
}

/// A message describing why the last amend call made on this thread failed ("" if it
/// succeeded). Never NULL. The string belongs to amend and stays valid until the next amend
/// call on this thread: copy it to keep it. Every amend function may also be called from a
/// thread-exit destructor (a pthread key destructor, a C++ `thread_local`'s); a failure there
/// keeps its code, and its message may be a fixed text saying it is unavailable.
#[no_mangle]
pub extern "C" fn amend_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// How many handles (of every kind) are live: opened and not yet freed. For leak checks in
/// tests and bindings; 0 once everything has been freed.
#[no_mangle]
pub extern "C" fn amend_live_handles() -> usize {
    handle::live_count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn version_and_names() {
        let v = unsafe { CStr::from_ptr(amend_version()) }.to_str().unwrap();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        let n = unsafe { CStr::from_ptr(amend_result_name(305)) };
        assert_eq!(n.to_str().unwrap(), "AMEND_ERR_MODEL_MISMATCH");
        let n = unsafe { CStr::from_ptr(amend_result_name(-4)) };
        assert_eq!(n.to_str().unwrap(), "AMEND_UNKNOWN_RESULT");
        assert_eq!(amend_abi_version(), AMEND_ABI_VERSION);
    }
}
