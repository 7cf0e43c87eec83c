//! Result codes, the thread-local last error and the panic boundary every entry point runs in.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Declares `amend_result` once: the enum, its `ALL` list, its names and its docs are generated
/// from this one table. cbindgen does not expand macros, so `tests/header.rs` feeds it the enum
/// rendered from `ALL`/`name`/`doc` (what C sees is generated from here too).
macro_rules! result_codes {
    (
        $(#[doc = $enum_doc:literal])+
        pub enum amend_result {
            $( $(#[doc = $doc:literal])+ $name:ident = $value:literal, )+
        }
    ) => {
        $(#[doc = $enum_doc])+
        #[allow(non_camel_case_types)]
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum amend_result {
            $( $(#[doc = $doc])+ $name = $value, )+
        }

        impl amend_result {
            /// The enum's documentation (one string per doc line).
            pub const DOC: &'static [&'static str] = &[$($enum_doc),+];

            /// Every code, in declaration order.
            pub const ALL: &'static [amend_result] = &[$(amend_result::$name,)+];

            /// The code's name as a NUL-terminated static string.
            pub const fn name_cstr(self) -> &'static CStr {
                match self {
                    $(amend_result::$name => {
                        match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                            Ok(s) => s,
                            Err(_) => panic!("a result name has an interior NUL"),
                        }
                    })+
                }
            }

            /// The code's documentation (one string per doc line), as written above.
            pub const fn doc(self) -> &'static [&'static str] {
                match self {
                    $(amend_result::$name => &[$($doc),+],)+
                }
            }
        }
    };
}

result_codes! {
    /// The outcome of a call: `AMEND_OK` (0) or one code per failure class.
    ///
    /// Codes are stable: new ones are only ever added. Groups: 1xx argument and usage errors,
    /// 2xx model and generation errors, 3xx bundle and edit errors.
    pub enum amend_result {
        /// Success.
        AMEND_OK = 0,
        /// A required pointer argument was NULL.
        AMEND_ERR_NULL_ARGUMENT = 100,
        /// A handle is not (or no longer) a live handle of the expected kind: freed, never
        /// returned by amend, or a handle of another kind.
        AMEND_ERR_INVALID_HANDLE = 101,
        /// An argument is out of range (a length too large, a bad parameter value).
        AMEND_ERR_INVALID_ARGUMENT = 102,
        /// Text that must be UTF-8 (a prompt, a target, a path, an id) is not.
        AMEND_ERR_INVALID_UTF8 = 103,
        /// A caller-provided buffer is too small; the needed size is reported through the call's
        /// length out-parameter.
        AMEND_ERR_BUFFER_TOO_SMALL = 104,
        /// The handle is in use by another call right now (a session is used by one thread at a
        /// time, and may not be re-entered from its own token callback).
        AMEND_ERR_BUSY = 105,
        /// The operation is not supported by this build or this runtime version.
        AMEND_ERR_NOT_SUPPORTED = 106,
        /// A bug inside amend: a Rust panic was caught at the ABI boundary. The handle involved
        /// should be freed.
        AMEND_ERR_PANIC = 107,
        /// A file could not be read.
        AMEND_ERR_IO = 108,
        /// A caller-provided state struct has the wrong size (`state_size` differs from the size
        /// this library was built with: the header and the library do not match).
        AMEND_ERR_STATE_SIZE = 109,
        /// The model file could not be loaded (missing, not GGUF, unsupported architecture,
        /// more than the process's memory can hold).
        AMEND_ERR_MODEL_LOAD = 200,
        /// An inference context could not be created (out of memory, bad context size, the
        /// process at its thread limit).
        AMEND_ERR_CONTEXT = 201,
        /// The text could not be tokenized.
        AMEND_ERR_TOKENIZE = 202,
        /// The prompt plus generated tokens do not fit in the session's context window.
        AMEND_ERR_CONTEXT_FULL = 203,
        /// llama.cpp failed to evaluate a batch.
        AMEND_ERR_DECODE = 204,
        /// The generation was cancelled through `amend_session_cancel`.
        AMEND_ERR_CANCELLED = 205,
        /// The bundle bytes are malformed: bad magic, truncated, corrupt section.
        AMEND_ERR_BUNDLE_FORMAT = 300,
        /// The bundle uses a format version this build does not read.
        AMEND_ERR_BUNDLE_VERSION = 301,
        /// A bundle's content does not match its recorded digest.
        AMEND_ERR_BUNDLE_INTEGRITY = 302,
        /// The bundle's signature is invalid.
        AMEND_ERR_SIGNATURE = 303,
        /// The bundle is signed by a key that is not in the trust store. Also when a trusted key
        /// is the signer's secret key given in place of its public key (the message says so).
        AMEND_ERR_UNTRUSTED_KEY = 304,
        /// The bundle was compiled for another model.
        AMEND_ERR_MODEL_MISMATCH = 305,
        /// An edit does not fit the model (layer or width out of range, unknown site).
        AMEND_ERR_EDIT_INVALID = 306,
        /// The bundle or edit conflicts with what is already active.
        AMEND_ERR_EDIT_CONFLICT = 307,
        /// No active bundle or edit has the given id.
        AMEND_ERR_NOT_FOUND = 308,
        /// A public key is not a valid ed25519 key.
        AMEND_ERR_INVALID_KEY = 309,
        /// The bundle is outside its validity window (expired, or not valid yet).
        AMEND_ERR_BUNDLE_EXPIRED = 310,
        /// The bundle's version is not newer than one already accepted on its channel (replay or
        /// downgrade).
        AMEND_ERR_BUNDLE_DOWNGRADE = 311,
        /// A bundle stream ended before the length its header declares.
        AMEND_ERR_BUNDLE_TRUNCATED = 312,
        /// A bundle stream continued past the length its header declares.
        AMEND_ERR_BUNDLE_TOO_LONG = 313,
        /// A scope model is needed and not usable: the bundle's memories route with one and the
        /// session has none (`amend_session_set_scope_model`), or the file given to
        /// `amend_scope_model_open` is missing, not a regular file, corrupt or not a `bert`
        /// encoder. Nothing of the bundle was applied.
        AMEND_ERR_SCOPE_MODEL = 314,
        /// The bundle was compiled against another scope model (its recorded fingerprint differs
        /// from the session's scope model). Nothing of the bundle was applied.
        AMEND_ERR_SCOPE_MODEL_MISMATCH = 315,
        /// The bundle requires its edits to have been verified on the backend it runs on, and
        /// its verification record does not list this session's backend (see
        /// `amend_session_activate`). Nothing of the bundle was applied.
        AMEND_ERR_BUNDLE_UNVERIFIED = 316,
    }
}

impl amend_result {
    /// The code's name, e.g. "AMEND_ERR_IO".
    pub fn name(self) -> &'static str {
        self.name_cstr().to_str().unwrap_or("AMEND_UNKNOWN_RESULT")
    }

    /// The code for a raw value, if it is one (for `amend_result_name` on caller input).
    pub fn from_raw(raw: i64) -> Option<amend_result> {
        Self::ALL.iter().copied().find(|c| *c as i64 == raw)
    }
}

/// A failure on its way to C: the code returned and the message kept for `amend_last_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfiError {
    pub code: amend_result,
    pub message: String,
}

impl FfiError {
    pub fn new(code: amend_result, message: impl Into<String>) -> Self {
        FfiError {
            code,
            message: message.into(),
        }
    }

    pub fn null(arg: &str) -> Self {
        Self::new(
            amend_result::AMEND_ERR_NULL_ARGUMENT,
            format!("argument `{arg}` is NULL"),
        )
    }

    pub fn not_supported(what: &str) -> Self {
        Self::new(
            amend_result::AMEND_ERR_NOT_SUPPORTED,
            format!("{what} is not supported by this runtime yet"),
        )
    }
}

pub type FfiResult<T> = Result<T, FfiError>;

thread_local! {
    // The code has no destructor (a const-initialised `Cell` of a `Copy` enum), so it stays
    // readable while the thread's storage is torn down: a pthread key destructor or a C++
    // `thread_local` destructor that frees an amend handle at thread exit must not abort.
    static LAST_CODE: Cell<amend_result> = const { Cell::new(amend_result::AMEND_OK) };
    // The message needs a destructor; after it ran, `try_with` fails and a fixed text stands in.
    static LAST_MESSAGE: RefCell<CString> = RefCell::new(CString::default());
}

/// What `amend_last_error` says for a failure recorded after this thread's message storage was
/// destroyed (a call from a thread-exit destructor).
const MESSAGE_GONE: &CStr =
    c"amend: the message of this failure is unavailable (the thread is exiting); see amend_last_error_code";

/// Records `err` as this thread's last error (interior NULs in the message become spaces so
/// the message is never silently cut).
pub fn set_last_error(err: &FfiError) {
    let bytes: Vec<u8> = err
        .message
        .bytes()
        .map(|b| if b == 0 { b' ' } else { b })
        .collect();
    let message = CString::new(bytes).unwrap_or_default();
    LAST_CODE.set(err.code);
    let _ = LAST_MESSAGE.try_with(|m| *m.borrow_mut() = message);
}

/// Forgets this thread's last error: each entry point starts with it, so the message always
/// describes the latest call.
pub fn clear_last_error() {
    if LAST_CODE.replace(amend_result::AMEND_OK) != amend_result::AMEND_OK {
        let _ = LAST_MESSAGE.try_with(|m| *m.borrow_mut() = CString::default());
    }
}

pub fn last_error_code() -> amend_result {
    LAST_CODE.get()
}

/// Pointer to the thread-local message; valid until the next amend call on this thread.
pub fn last_error_ptr() -> *const c_char {
    match LAST_MESSAGE.try_with(|m| m.borrow().as_ptr()) {
        Ok(p) => p,
        Err(_) if LAST_CODE.get() == amend_result::AMEND_OK => c"".as_ptr(),
        Err(_) => MESSAGE_GONE.as_ptr(),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs an entry point's body: no panic unwinds past this, and a failure becomes a code plus
/// the thread's last error. `name` is the C function name, prefixed to messages.
pub fn guard(name: &str, body: impl FnOnce() -> FfiResult<()>) -> amend_result {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            // A nested call (e.g. from a token callback) may have failed meanwhile.
            clear_last_error();
            amend_result::AMEND_OK
        }
        Ok(Err(mut err)) => {
            err.message = format!("{name}: {}", err.message);
            set_last_error(&err);
            err.code
        }
        Err(payload) => {
            let err = FfiError::new(
                amend_result::AMEND_ERR_PANIC,
                format!(
                    "{name}: internal error (panic): {}",
                    panic_message(&*payload)
                ),
            );
            set_last_error(&err);
            err.code
        }
    }
}

/// `guard` for entry points that return a value instead of a code (accessors, free
/// functions): failures record the last error and yield `fallback`.
pub fn guard_value<T>(name: &str, fallback: T, body: impl FnOnce() -> FfiResult<T>) -> T {
    let mut out = None;
    let code = guard(name, || {
        out = Some(body()?);
        Ok(())
    });
    match (code, out) {
        (amend_result::AMEND_OK, Some(v)) => v,
        _ => fallback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_match_codes() {
        let mut seen = std::collections::HashSet::new();
        for &c in amend_result::ALL {
            let name = c.name_cstr().to_str().unwrap();
            assert!(name.starts_with("AMEND_"));
            assert_eq!(amend_result::from_raw(c as i64), Some(c));
            seen.insert(name);
        }
        assert_eq!(seen.len(), amend_result::ALL.len());
        assert_eq!(amend_result::from_raw(99), None);
    }

    #[test]
    fn guard_catches_panics_and_records_errors() {
        let code = guard("amend_test", || panic!("boom"));
        assert_eq!(code, amend_result::AMEND_ERR_PANIC);
        assert_eq!(last_error_code(), amend_result::AMEND_ERR_PANIC);
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_str()
            .unwrap();
        assert!(msg.contains("amend_test") && msg.contains("boom"), "{msg}");

        let code = guard("amend_test", || Err(FfiError::null("prompt")));
        assert_eq!(code, amend_result::AMEND_ERR_NULL_ARGUMENT);
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_str()
            .unwrap();
        assert_eq!(msg, "amend_test: argument `prompt` is NULL");

        assert_eq!(guard("amend_test", || Ok(())), amend_result::AMEND_OK);
        assert_eq!(last_error_code(), amend_result::AMEND_OK);
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_str()
            .unwrap();
        assert_eq!(msg, "");
    }

    #[test]
    fn interior_nul_does_not_truncate() {
        set_last_error(&FfiError::new(amend_result::AMEND_ERR_IO, "a\0b"));
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_str()
            .unwrap();
        assert_eq!(msg, "a b");
    }
}
