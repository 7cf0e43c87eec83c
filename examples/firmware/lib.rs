//! The streaming bundle verifier as a Cortex-M firmware would link it: `no_std`, no
//! `#[global_allocator]`, state in a static. rustc refuses to produce this staticlib if anything
//! in it needs `alloc`, so building it is the proof that the verifier needs no allocator.

#![no_std]

use core::mem::{size_of, MaybeUninit};
use core::ptr::addr_of_mut;

use amend_edits::bundle::{StreamVerifier, STREAM_SIGNED_CAP};

/// The whole verifier state, in .bss.
static mut STATE: MaybeUninit<StreamVerifier> = MaybeUninit::uninit();
static mut READY: bool = false;

// The state on this 32-bit target: the header + manifest buffer and under 1 KiB besides.
const _: () = assert!(size_of::<StreamVerifier>() <= STREAM_SIGNED_CAP + 1024);

/// Start verifying with one trusted ed25519 public key. 0 = ok, 1 = bad key.
///
/// # Safety
/// `key` points to 32 readable bytes; not re-entered (one verification at a time).
#[no_mangle]
pub unsafe extern "C" fn fw_verify_begin(key: *const [u8; 32]) -> i32 {
    let slot = &mut *addr_of_mut!(STATE);
    READY = StreamVerifier::init(slot, core::slice::from_ref(&*key)).is_ok();
    if READY {
        0
    } else {
        1
    }
}

/// Feed `len` bytes. 0 = ok so far, 1 = refused (or not started).
///
/// # Safety
/// `p` points to `len` readable bytes; after a successful `fw_verify_begin`.
#[no_mangle]
pub unsafe extern "C" fn fw_verify_chunk(p: *const u8, len: usize) -> i32 {
    if !READY {
        return 1;
    }
    let v = (*addr_of_mut!(STATE)).assume_init_mut();
    match v.update(core::slice::from_raw_parts(p, len)) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// End of stream. 0 = the whole bundle arrived and verified.
///
/// # Safety
/// As for `fw_verify_chunk`.
#[no_mangle]
pub unsafe extern "C" fn fw_verify_end() -> i32 {
    if !READY {
        return 1;
    }
    let v = (*addr_of_mut!(STATE)).assume_init_mut();
    match v.finish() {
        Ok(_) => 0,
        Err(_) => 1,
    }
}

/// Bytes of verifier state (for the build log).
#[no_mangle]
pub extern "C" fn fw_verify_state_size() -> usize {
    size_of::<StreamVerifier>()
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
