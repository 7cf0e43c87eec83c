//! Streaming bundle verification in caller-provided memory (`amend_verify_stream_*`): an update
//! agent feeds a bundle as it downloads it, in chunks of any size, and learns whether it is
//! authentic and intact without holding it. The state is plain bytes the caller owns (a
//! static, a stack buffer): amend allocates nothing for it. See docs/targets.md.

use std::mem::{align_of, size_of, MaybeUninit};

use amend_edits::bundle::StreamVerifier;
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
    use amend_edits::bundle::BundleError as B;
    use amend_result as R;

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

    /// One mapping serves the loaders and the stream: every refusal keeps the code it had
    /// when the stream had its own error type.
    #[test]
    fn every_bundle_error_keeps_its_code() {
        let cases = [
            (
                B::Truncated {
                    needed: 64,
                    have: 0,
                },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::EndedEarly {
                    needed: 64,
                    have: 0,
                },
                R::AMEND_ERR_BUNDLE_TRUNCATED,
            ),
            (
                B::PastDeclaredLength { declared: 64 },
                R::AMEND_ERR_BUNDLE_TOO_LONG,
            ),
            (B::BadMagic, R::AMEND_ERR_BUNDLE_FORMAT),
            (
                B::UnsupportedVersion { major: 2, minor: 0 },
                R::AMEND_ERR_BUNDLE_VERSION,
            ),
            (B::BadHeader("flags"), R::AMEND_ERR_BUNDLE_FORMAT),
            (
                B::LengthMismatch {
                    declared: 64,
                    actual: 65,
                },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::CapExceeded {
                    what: "x",
                    value: 2,
                    cap: 1,
                },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::ManifestTooLarge {
                    len: 9000,
                    cap: 5056,
                },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (B::MisalignedBuffer, R::AMEND_ERR_BUNDLE_FORMAT),
            (B::Unsigned, R::AMEND_ERR_SIGNATURE),
            (B::UnknownKeyId([1; 8]), R::AMEND_ERR_UNTRUSTED_KEY),
            (B::SecretKeyTrusted { index: 0 }, R::AMEND_ERR_UNTRUSTED_KEY),
            (B::BadSignature, R::AMEND_ERR_SIGNATURE),
            (B::BadTrustedKey(0), R::AMEND_ERR_INVALID_KEY),
            (B::TooManyKeys, R::AMEND_ERR_INVALID_ARGUMENT),
            (B::ManifestDecode("bad"), R::AMEND_ERR_BUNDLE_FORMAT),
            (B::ManifestTrailingBytes(1), R::AMEND_ERR_BUNDLE_FORMAT),
            (B::BadManifest("x"), R::AMEND_ERR_BUNDLE_FORMAT),
            (
                B::SectionOutOfBounds { index: 0 },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::SectionMisaligned { index: 0 },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (B::SectionOverlap { a: 0, b: 1 }, R::AMEND_ERR_BUNDLE_FORMAT),
            (B::NonZeroPadding { offset: 9 }, R::AMEND_ERR_BUNDLE_FORMAT),
            (
                B::UnknownSectionKind { index: 0, kind: 99 },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::UnknownDtype { index: 0, dtype: 9 },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (B::SectionShape { index: 0 }, R::AMEND_ERR_BUNDLE_FORMAT),
            (B::SectionHash { index: 0 }, R::AMEND_ERR_BUNDLE_INTEGRITY),
            (B::NonFinite { index: 0 }, R::AMEND_ERR_BUNDLE_INTEGRITY),
            (
                B::ValueOutOfRange { index: 0 },
                R::AMEND_ERR_BUNDLE_INTEGRITY,
            ),
            (
                B::UnreferencedSection { index: 0 },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::UnknownPayloadKind { index: 0, kind: 9 },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (B::DescriptorDecode { index: 0 }, R::AMEND_ERR_BUNDLE_FORMAT),
            (
                B::BadSectionRef {
                    payload: 0,
                    section: 1,
                    reason: "x",
                },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::UnknownSite {
                    payload: 0,
                    code: 99,
                },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::UnknownCode {
                    payload: 0,
                    what: "distance",
                    code: 9,
                },
                R::AMEND_ERR_BUNDLE_FORMAT,
            ),
            (
                B::PayloadDimension {
                    payload: 0,
                    what: "layer",
                    value: 99,
                    model: 18,
                },
                R::AMEND_ERR_EDIT_INVALID,
            ),
            (
                B::InvalidPayload {
                    payload: 0,
                    reason: "x",
                },
                R::AMEND_ERR_EDIT_INVALID,
            ),
            (
                B::BadEdit {
                    index: 0,
                    reason: "x",
                },
                R::AMEND_ERR_EDIT_INVALID,
            ),
            (B::DuplicateEditId { index: 1 }, R::AMEND_ERR_EDIT_INVALID),
        ];
        for (e, code) in cases {
            let got = FfiError::from(e);
            assert_eq!(got.code, code, "{e:?}");
            assert!(got.message.contains(&e.to_string()), "{}", got.message);
        }
    }

    /// A trusted "public key" that is the signer's secret seed is named as such through the C
    /// ABI, under the untrusted-key code.
    #[test]
    fn secret_key_given_as_a_trusted_key_is_named() {
        use amend_edits::bundle::{BundleBuilder, BundleMeta, ModelBinding};
        use amend_edits::ed25519_dalek::{SigningKey, VerifyingKey};
        use amend_edits::Site;
        // A seed whose bytes are also a curve point (about half are): init takes it.
        let seed = (1..=255u8)
            .find(|&s| VerifyingKey::from_bytes(&[s; 32]).is_ok_and(|k| !k.is_weak()))
            .unwrap();
        let key = SigningKey::from_bytes(&[seed; 32]);
        let mut b = BundleBuilder::new(BundleMeta {
            bundle_id: "b".into(),
            channel: "main".into(),
            version: 1,
            created: 0,
            not_before: 0,
            expires: u64::MAX,
            model: ModelBinding {
                fingerprint: [0; 32],
                arch: "gemma3".into(),
                n_layer: 4,
                n_embd: 4,
            },
        });
        let (k, v) = ([1.0, 0.0, 0.0, 0.0], [0.5; 4]);
        let cb = b.add_codebook(
            1,
            Site::FfnOutput,
            Site::FfnOutput,
            0,
            false,
            4,
            &k,
            &v,
            &[0.1],
        );
        b.add_edit("e", 1, Site::FfnOutput, "p", " t", cb, 0, 1);
        let bundle = b.build_signed(&key).unwrap();
        let run = |trusted: [u8; 32]| {
            let mut st = Box::new(amend_verify_stream_state { opaque: [0; 800] });
            let size = AMEND_VERIFY_STREAM_STATE_SIZE;
            assert_eq!(
                amend_verify_stream_init(&mut *st, size, trusted.as_ptr(), 1),
                R::AMEND_OK
            );
            let bytes = bundle.as_slice();
            match amend_verify_stream_update(&mut *st, bytes.as_ptr(), bytes.len()) {
                R::AMEND_OK => amend_verify_stream_finish(&mut *st),
                code => code,
            }
        };
        assert_eq!(run(key.to_bytes()), R::AMEND_ERR_UNTRUSTED_KEY);
        let msg = unsafe { std::ffi::CStr::from_ptr(crate::error::last_error_ptr()) };
        let msg = msg.to_str().unwrap();
        assert!(
            msg.contains("trusted key 0 is the signer's secret key"),
            "{msg}"
        );
        assert_eq!(run(key.verifying_key().to_bytes()), R::AMEND_OK);
    }
}
