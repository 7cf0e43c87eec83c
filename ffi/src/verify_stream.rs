//! Streaming bundle verification in caller-provided memory (`amend_verify_stream_*`): an update
//! agent feeds a bundle as it downloads it, in chunks of any size, and learns whether it is
//! authentic and intact without holding it. The state is plain bytes the caller owns (a
//! static, a stack buffer): amend allocates nothing for it. See docs/targets.md.

use std::mem::{align_of, size_of, MaybeUninit};

use amend_edits::bundle::{StreamError, StreamVerifier};
use amend_edits::keys::MAX_TRUSTED_KEYS;

use crate::amend_result;
use crate::args;
use crate::bundle::AMEND_PUBLIC_KEY_LEN;
use crate::error::{guard, FfiError, FfiResult};

/// `sizeof(amend_verify_stream_state)`: pass it as `state_size` to
/// `amend_verify_stream_init` so a header and a library that disagree are caught.
pub const AMEND_VERIFY_STREAM_STATE_SIZE: usize = 6400;

/// Caller-owned memory for one streaming verification. Opaque: only
/// `amend_verify_stream_init` may fill it. It holds no pointers, so it may be copied, kept in
/// a static, or dropped at any time without a call to amend.
#[repr(C)]
pub struct amend_verify_stream_state {
    pub opaque: [u64; 800],
}

/// What the opaque bytes hold.
#[repr(C)]
struct State {
    /// [`MAGIC`] once initialised: an uninitialised or foreign buffer is refused, not read.
    magic: u64,
    verifier: StreamVerifier,
}

const MAGIC: u64 = u64::from_le_bytes(*b"amndVST1");

const _: () = assert!(size_of::<amend_verify_stream_state>() == AMEND_VERIFY_STREAM_STATE_SIZE);
const _: () = assert!(size_of::<State>() <= AMEND_VERIFY_STREAM_STATE_SIZE);
const _: () = assert!(align_of::<State>() <= align_of::<amend_verify_stream_state>());

impl From<StreamError> for FfiError {
    fn from(e: StreamError) -> Self {
        use amend_result as R;
        use StreamError as S;
        let code = match &e {
            S::Truncated { .. } => R::AMEND_ERR_BUNDLE_TRUNCATED,
            S::PastDeclaredLength { .. } => R::AMEND_ERR_BUNDLE_TOO_LONG,
            S::UnsupportedVersion { .. } => R::AMEND_ERR_BUNDLE_VERSION,
            S::SectionHash { .. } | S::NonFinite { .. } => R::AMEND_ERR_BUNDLE_INTEGRITY,
            S::Unsigned | S::BadSignature => R::AMEND_ERR_SIGNATURE,
            S::UnknownKeyId(_) => R::AMEND_ERR_UNTRUSTED_KEY,
            S::BadTrustedKey(_) => R::AMEND_ERR_INVALID_KEY,
            S::TooManyKeys => R::AMEND_ERR_INVALID_ARGUMENT,
            S::PayloadDimension { .. }
            | S::InvalidPayload { .. }
            | S::BadEdit { .. }
            | S::DuplicateEditId { .. } => R::AMEND_ERR_EDIT_INVALID,
            // Everything else is a malformed byte stream (as for amend_bundle_load_*), including
            // a manifest over the streaming verifier's cap.
            _ => R::AMEND_ERR_BUNDLE_FORMAT,
        };
        FfiError::new(code, format!("invalid bundle stream: {e}"))
    }
}

/// The initialised state behind `state` (NULL, misaligned and uninitialised are refused).
fn state<'a>(p: *mut amend_verify_stream_state) -> FfiResult<&'a mut StreamVerifier> {
    if p.is_null() {
        return Err(FfiError::null("state"));
    }
    if !(p as usize).is_multiple_of(align_of::<amend_verify_stream_state>()) {
        return Err(FfiError::new(
            amend_result::AMEND_ERR_INVALID_ARGUMENT,
            "`state` is not 8-byte aligned (declare an amend_verify_stream_state)",
        ));
    }
    let s = p as *mut State;
    // SAFETY: non-NULL, aligned, and the caller passes a whole amend_verify_stream_state
    // (which is at least size_of::<State>()); the magic is an integer, any bits are valid.
    if unsafe { (*s).magic } != MAGIC {
        return Err(FfiError::new(
            amend_result::AMEND_ERR_INVALID_ARGUMENT,
            "`state` was not initialised by amend_verify_stream_init",
        ));
    }
    // SAFETY: the magic is only written by amend_verify_stream_init after the verifier.
    Ok(unsafe { &mut (*s).verifier })
}

/// Starts a streaming verification in `state` (`state_size` = `sizeof *state`), trusting
/// `n_keys` ed25519 public keys stored back to back at `keys` (`n_keys *
/// AMEND_PUBLIC_KEY_LEN` bytes, at most `AMEND_MAX_TRUSTED_KEYS`). Any earlier verification in
/// the same state is forgotten.
///
/// Memory: the state only (`AMEND_VERIFY_STREAM_STATE_SIZE` bytes); the bundle's header and
/// manifest are buffered in it, so manifests over 5,056 bytes are refused
/// (`AMEND_ERR_BUNDLE_FORMAT`); sections of any size stream through.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_STATE_SIZE` (`state_size` is not
/// `AMEND_VERIFY_STREAM_STATE_SIZE`: header and library disagree), `AMEND_ERR_INVALID_ARGUMENT`
/// (misaligned state, no keys, too many keys), `AMEND_ERR_INVALID_KEY`.
#[no_mangle]
pub extern "C" fn amend_verify_stream_init(
    state: *mut amend_verify_stream_state,
    state_size: usize,
    keys: *const u8,
    n_keys: usize,
) -> amend_result {
    guard("amend_verify_stream_init", || {
        if state.is_null() {
            return Err(FfiError::null("state"));
        }
        if state_size != AMEND_VERIFY_STREAM_STATE_SIZE {
            return Err(FfiError::new(
                amend_result::AMEND_ERR_STATE_SIZE,
                format!(
                    "state_size is {state_size}, this library's amend_verify_stream_state is \
                     {AMEND_VERIFY_STREAM_STATE_SIZE} bytes (header and library differ?)"
                ),
            ));
        }
        if !(state as usize).is_multiple_of(align_of::<amend_verify_stream_state>()) {
            return Err(FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                "`state` is not 8-byte aligned (declare an amend_verify_stream_state)",
            ));
        }
        if n_keys == 0 || n_keys > MAX_TRUSTED_KEYS {
            return Err(FfiError::new(
                amend_result::AMEND_ERR_INVALID_ARGUMENT,
                format!("n_keys is {n_keys}; give 1 to {MAX_TRUSTED_KEYS} keys"),
            ));
        }
        let bytes = unsafe { args::bytes(keys, n_keys * AMEND_PUBLIC_KEY_LEN, "keys")? };
        let mut raw = [[0u8; 32]; MAX_TRUSTED_KEYS];
        for (r, k) in raw.iter_mut().zip(bytes.chunks_exact(AMEND_PUBLIC_KEY_LEN)) {
            r.copy_from_slice(k);
        }
        let s = state as *mut State;
        // SAFETY: `state` is non-NULL, aligned and `state_size` bytes long (checked above), which
        // holds a State. The magic is cleared first so a failed init leaves no usable state.
        unsafe {
            std::ptr::addr_of_mut!((*s).magic).write(0);
            let slot =
                &mut *(std::ptr::addr_of_mut!((*s).verifier) as *mut MaybeUninit<StreamVerifier>);
            StreamVerifier::init(slot, &raw[..n_keys])?;
            std::ptr::addr_of_mut!((*s).magic).write(MAGIC);
        }
        Ok(())
    })
}

/// Feeds the next `len` bytes of the bundle (any chunk size; `chunk` may be NULL when `len` is
/// 0). Refusals are reported as soon as the bytes that prove them arrive: a bad header after 64
/// bytes, a bad signature or manifest when the signature block is complete, a section's hash at
/// its last byte, `AMEND_ERR_BUNDLE_TOO_LONG` for a byte past the declared length. After an
/// error every later call on the state returns the same error.
///
/// Errors: `AMEND_ERR_NULL_ARGUMENT`, `AMEND_ERR_INVALID_ARGUMENT` (state not initialised),
/// and the bundle codes of `amend_bundle_load_memory`.
#[no_mangle]
pub extern "C" fn amend_verify_stream_update(
    state: *mut amend_verify_stream_state,
    chunk: *const u8,
    len: usize,
) -> amend_result {
    guard("amend_verify_stream_update", || {
        let v = self::state(state)?;
        let data = unsafe { args::bytes(chunk, len, "chunk")? };
        Ok(v.update(data)?)
    })
}

/// Ends the stream: `AMEND_OK` only when the whole declared bundle arrived and every check
/// passed; `AMEND_ERR_BUNDLE_TRUNCATED` when the stream ended early.
///
/// Errors: as for `amend_verify_stream_update`, plus `AMEND_ERR_BUNDLE_TRUNCATED`.
#[no_mangle]
pub extern "C" fn amend_verify_stream_finish(
    state: *mut amend_verify_stream_state,
) -> amend_result {
    guard("amend_verify_stream_finish", || {
        let v = self::state(state)?;
        v.finish()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_fits_and_wrong_size_is_specific() {
        let mut st = Box::new(amend_verify_stream_state { opaque: [0; 800] });
        let key = [0x3bu8; 32]; // any valid point works; check the size before the key
        let code = amend_verify_stream_init(
            &mut *st,
            AMEND_VERIFY_STREAM_STATE_SIZE - 8,
            key.as_ptr(),
            1,
        );
        assert_eq!(code, amend_result::AMEND_ERR_STATE_SIZE);
        // A zeroed state was never initialised.
        assert_eq!(
            amend_verify_stream_update(&mut *st, [0u8].as_ptr(), 1),
            amend_result::AMEND_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            amend_verify_stream_finish(std::ptr::null_mut()),
            amend_result::AMEND_ERR_NULL_ARGUMENT
        );
    }
}
