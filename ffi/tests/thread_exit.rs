//! amend called from a thread-exit destructor (a pthread key destructor, a C++ or Rust
//! `thread_local` destructor: how hosts free per-thread handles) after amend's own thread-local
//! storage was torn down: the call works and reports its code instead of aborting the process
//! (it panicked in a function that cannot unwind). Its own test binary: the old failure was an
//! abort, which takes the whole process down.

use std::ffi::CStr;
use std::ptr;
use std::sync::Mutex;

use amend::*;

/// What the destructor saw: (code of the free, code of the double free, its message).
static SEEN: Mutex<Option<(amend_result, amend_result, String)>> = Mutex::new(None);

struct FreeAtExit(*mut amend_trust_store);

impl Drop for FreeAtExit {
    fn drop(&mut self) {
        amend_trust_store_free(self.0);
        let first = amend_last_error_code();
        amend_trust_store_free(self.0);
        let second = amend_last_error_code();
        let msg = unsafe { CStr::from_ptr(amend_last_error()) }
            .to_string_lossy()
            .into_owned();
        *SEEN.lock().unwrap() = Some((first, second, msg));
    }
}

thread_local! {
    static AT_EXIT: std::cell::RefCell<Option<FreeAtExit>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn amend_calls_from_a_thread_exit_destructor_do_not_abort() {
    std::thread::spawn(|| {
        // Registered before amend's storage, so destroyed after it (reverse order).
        AT_EXIT.with(|_| {});
        // A failure: amend's message storage is in use on this thread.
        let mut t = ptr::null_mut();
        assert_eq!(
            amend_trust_store_new(ptr::null(), 1, &mut t),
            amend_result::AMEND_ERR_NULL_ARGUMENT
        );
        let key = amend_edits::ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        assert_eq!(
            amend_trust_store_new(key.as_bytes().as_ptr(), 1, &mut t),
            amend_result::AMEND_OK
        );
        AT_EXIT.with(|a| *a.borrow_mut() = Some(FreeAtExit(t)));
    })
    .join()
    .unwrap();
    let (first, second, msg) = SEEN.lock().unwrap().take().expect("the destructor ran");
    assert_eq!(first, amend_result::AMEND_OK);
    assert_eq!(second, amend_result::AMEND_ERR_INVALID_HANDLE, "{msg}");
    assert!(!msg.is_empty());
    assert_eq!(amend_live_handles(), 0);
}
