//! Trust store and bundle entry points.

use std::ffi::c_char;
use std::sync::Arc;

use amend_edits::ed25519_dalek::VerifyingKey;
use amend_edits::editset::check_binding;
use amend_edits::keys::{KeyError, TrustStore, MAX_TRUSTED_KEYS};
use amend_edits::Bundle;

use crate::amend_result;
use crate::args;
use crate::error::{guard, FfiError, FfiResult};
use crate::handle;
use crate::model::{ModelObj, MODEL};
use crate::types::*;

/// Length of an ed25519 public key in bytes.
pub const AMEND_PUBLIC_KEY_LEN: usize = 32;

/// Most keys one trust store holds.
pub const AMEND_MAX_TRUSTED_KEYS: usize = 16;
// A literal above so cbindgen can write it; it must follow amend_edits.
const _: () = assert!(AMEND_MAX_TRUSTED_KEYS == MAX_TRUSTED_KEYS);

pub(crate) struct TrustObj {
    pub trust: TrustStore,
}

pub(crate) struct BundleObj {
    pub bundle: Arc<Bundle>,
}

fn finish_load(model: &ModelObj, bundle: Bundle, out: *mut *mut amend_bundle) -> FfiResult<()> {
    check_binding(model.binding()?, &bundle)?;
    let obj = BundleObj {
        bundle: Arc::new(bundle),
    };
    // SAFETY: `out` was checked and cleared by the entry point (`args::clear_out`).
    unsafe { args::write_out(out, handle::insert(obj), "out") }
}

pub(crate) const TRUST: &str = "amend_trust_store";
pub(crate) const BUNDLE: &str = "amend_bundle";

/// Creates a trust store from `n_keys` ed25519 public keys stored back to back at `keys`
/// (`n_keys * AMEND_PUBLIC_KEY_LEN` bytes). Bundles signed by any of them are accepted.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_ARGUMENT` (`n_keys` 0 or above
/// `AMEND_MAX_TRUSTED_KEYS`, refused before any key is read), `AMEND_ERR_INVALID_KEY` (bytes
/// that are not an ed25519 point). Duplicates count once.
#[no_mangle]
pub extern "C" fn amend_trust_store_new(
    keys: *const u8,
    n_keys: usize,
    out: *mut *mut amend_trust_store,
) -> amend_result {
    guard("amend_trust_store_new", || {
        // SAFETY: `out` is NULL or writable (the documented contract), checked here.
        unsafe { args::clear_out(out, "out")? };
        if n_keys == 0 {
            return Err(FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                "a trust store needs at least one key (n_keys is 0)",
            ));
        }
        // Before any key is read: a huge count (a length mix-up) must not walk past the
        // caller's buffer until a key happens to be invalid.
        if n_keys > AMEND_MAX_TRUSTED_KEYS {
            return Err(FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                format!("n_keys is {n_keys}; give 1 to {AMEND_MAX_TRUSTED_KEYS} keys"),
            ));
        }
        let len = n_keys * AMEND_PUBLIC_KEY_LEN;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        let bytes = unsafe { args::bytes(keys, len, "keys")? };
        let mut trust = TrustStore::new();
        for (i, chunk) in bytes.chunks_exact(AMEND_PUBLIC_KEY_LEN).enumerate() {
            let raw: &[u8; AMEND_PUBLIC_KEY_LEN] = chunk.try_into().expect("exact chunks");
            let key = VerifyingKey::from_bytes(raw).map_err(|_| {
                FfiError::new(
                    amend_result::AMEND_ERR_INVALID_KEY,
                    format!(
                        "key {i} is not a valid ed25519 public key (if it was read from a \
                         secret key file, use the .pub beside it)"
                    ),
                )
            })?;
            trust.add(key).map_err(|e: KeyError| {
                let mut err = FfiError::from(e);
                err.message = format!("key {i}: {}", err.message);
                err
            })?;
        }
        // SAFETY: checked and cleared above.
        unsafe { args::write_out(out, handle::insert(TrustObj { trust }), "out") }
    })
}

/// Frees a trust store. NULL is a no-op. Bundles loaded with it stay valid.
#[no_mangle]
pub extern "C" fn amend_trust_store_free(store: *mut amend_trust_store) {
    guard("amend_trust_store_free", || {
        drop(handle::remove::<TrustObj, _>(store, TRUST)?);
        Ok(())
    });
}

/// Loads a bundle from a file, verifies its signature against `trust` and checks that it was
/// built for `model`. On failure `*out` is set to NULL.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_HANDLE`, `AMEND_ERR_INVALID_UTF8`,
/// `AMEND_ERR_IO`, `AMEND_ERR_BUNDLE_FORMAT`, `AMEND_ERR_BUNDLE_VERSION`,
/// `AMEND_ERR_BUNDLE_INTEGRITY`, `AMEND_ERR_SIGNATURE`, `AMEND_ERR_UNTRUSTED_KEY`,
/// `AMEND_ERR_MODEL_MISMATCH`, `AMEND_ERR_EDIT_INVALID`.
#[no_mangle]
pub extern "C" fn amend_bundle_load_file(
    trust: *const amend_trust_store,
    model: *const amend_model,
    path: *const c_char,
    out: *mut *mut amend_bundle,
) -> amend_result {
    guard("amend_bundle_load_file", || {
        // SAFETY: `out` is NULL or writable (the documented contract), checked here.
        unsafe { args::clear_out(out, "out")? };
        let trust = handle::get::<TrustObj, _>(trust, TRUST, "trust")?;
        let model = handle::get::<ModelObj, _>(model, MODEL, "model")?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        let path = unsafe { args::cstr(path, "path")? };
        let bundle = Bundle::open_file(path, &trust.trust).map_err(|e| {
            let mut err = FfiError::from(e);
            err.message = format!("{path}: {}", err.message);
            err
        })?;
        finish_load(&model, bundle, out)
    })
}

/// Like `amend_bundle_load_file`, with the path given as `path_len` bytes (no NUL needed): on
/// unix a path that is not UTF-8 can be opened. Errors as for `amend_bundle_load_file`, and
/// `AMEND_ERR_INVALID_ARGUMENT` for an empty path or one with a NUL byte.
#[no_mangle]
pub extern "C" fn amend_bundle_load_file_bytes(
    trust: *const amend_trust_store,
    model: *const amend_model,
    path: *const u8,
    path_len: usize,
    out: *mut *mut amend_bundle,
) -> amend_result {
    guard("amend_bundle_load_file_bytes", || {
        // SAFETY (all `args` calls): the pointers are NULL or valid as the header documents.
        unsafe { args::clear_out(out, "out")? };
        let trust = handle::get::<TrustObj, _>(trust, TRUST, "trust")?;
        let model = handle::get::<ModelObj, _>(model, MODEL, "model")?;
        let path = unsafe { args::path_bytes(path, path_len, "path")? };
        let bundle = Bundle::open_file(&path, &trust.trust)?;
        finish_load(&model, bundle, out)
    })
}

/// Like `amend_bundle_load_file`, from `len` bytes at `data`. The bytes are copied: the
/// buffer may be freed as soon as the call returns.
#[no_mangle]
pub extern "C" fn amend_bundle_load_memory(
    trust: *const amend_trust_store,
    model: *const amend_model,
    data: *const u8,
    len: usize,
    out: *mut *mut amend_bundle,
) -> amend_result {
    guard("amend_bundle_load_memory", || {
        // SAFETY: `out` is NULL or writable (the documented contract), checked here.
        unsafe { args::clear_out(out, "out")? };
        let trust = handle::get::<TrustObj, _>(trust, TRUST, "trust")?;
        let model = handle::get::<ModelObj, _>(model, MODEL, "model")?;
        if data.is_null() {
            return Err(FfiError::null("data"));
        }
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        let data = unsafe { args::bytes(data, len, "data")? };
        let bundle = Bundle::from_bytes(data, &trust.trust)?;
        finish_load(&model, bundle, out)
    })
}

/// Frees a bundle handle. NULL is a no-op. Sessions in which it is active keep its edits
/// until they are rolled back or the session is freed.
#[no_mangle]
pub extern "C" fn amend_bundle_free(bundle: *mut amend_bundle) {
    guard("amend_bundle_free", || {
        drop(handle::remove::<BundleObj, _>(bundle, BUNDLE)?);
        Ok(())
    });
}

/// Fills `*out` with facts about a bundle.
#[no_mangle]
pub extern "C" fn amend_bundle_get_info(
    bundle: *const amend_bundle,
    out: *mut amend_bundle_info,
) -> amend_result {
    guard("amend_bundle_get_info", || {
        let b = handle::get::<BundleObj, _>(bundle, BUNDLE, "bundle")?;
        let m = b.bundle.manifest();
        let info = amend_bundle_info {
            n_edits: m.edits.len() as u32,
            version: m.version,
            size_bytes: b.bundle.bytes().len() as u64,
            not_before: m.not_before,
            expires: m.expires,
        };
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_out(out, info, "out") }
    })
}

/// Copies the bundle's channel (NUL-terminated) into `buf`; buffer rules as for
/// `amend_model_description`. Versions increase per channel.
#[no_mangle]
pub extern "C" fn amend_bundle_channel(
    bundle: *const amend_bundle,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> amend_result {
    guard("amend_bundle_channel", || {
        let b = handle::get::<BundleObj, _>(bundle, BUNDLE, "bundle")?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_str(&b.bundle.manifest().channel, buf, buf_len, out_len) }
    })
}

/// Copies the bundle's id (NUL-terminated) into `buf`; buffer rules as for
/// `amend_model_description`.
#[no_mangle]
pub extern "C" fn amend_bundle_id(
    bundle: *const amend_bundle,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> amend_result {
    guard("amend_bundle_id", || {
        let b = handle::get::<BundleObj, _>(bundle, BUNDLE, "bundle")?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_str(b.bundle.id(), buf, buf_len, out_len) }
    })
}

/// Copies the id of edit number `index` (0-based, below `n_edits`) into `buf`; buffer rules as
/// for `amend_model_description`. Errors: `AMEND_ERR_INVALID_ARGUMENT` for an index out of
/// range.
#[no_mangle]
pub extern "C" fn amend_bundle_edit_id(
    bundle: *const amend_bundle,
    index: usize,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> amend_result {
    guard("amend_bundle_edit_id", || {
        let b = handle::get::<BundleObj, _>(bundle, BUNDLE, "bundle")?;
        let edits = &b.bundle.manifest().edits;
        let edit = edits.get(index).ok_or_else(|| {
            FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                format!(
                    "edit index {index} is out of range (the bundle has {} edits)",
                    edits.len()
                ),
            )
        })?;
        // SAFETY: pointer arguments are NULL or valid as the header documents; `args` checks.
        unsafe { args::write_str(&edit.id, buf, buf_len, out_len) }
    })
}
