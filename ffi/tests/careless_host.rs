//! A careless or hostile host through the C ABI, on the tiny model: a refused activation leaves
//! the session as it was (a state file can still be attached), parameter structs with garbage
//! in their `bool` fields are read as C reads them (nonzero = true), and the streaming verifier
//! keeps its first error however the bytes after it are chunked.

use std::path::PathBuf;
use std::ptr;

use amend::*;
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::BundleMeta;

#[path = "common/util.rs"]
mod util;
use util::last_error;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ffi-careless-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn open_model() -> *mut amend_model {
    util::open_tiny_model("careless")
}

fn open_session(m: *mut amend_model) -> *mut amend_session {
    util::open_session_with(
        m,
        &amend_session_params {
            n_ctx: 64,
            n_threads: 1,
            n_threads_batch: 1,
            ..amend_session_default_params()
        },
    )
}

const KEY: [u8; 32] = [7; 32];

/// A signed one-edit bundle for the tiny model, valid from `not_before` to `expires`.
fn bundle_bytes(id: &str, version: u64, not_before: u64, expires: u64) -> Vec<u8> {
    let meta = BundleMeta {
        bundle_id: id.into(),
        channel: id.into(),
        version,
        created: 0,
        not_before,
        expires,
        model: amend_edits::fingerprint::model_binding(util::tiny_model_path("careless")).unwrap(),
    };
    util::one_edit_bundle(meta, 1, 0, &SigningKey::from_bytes(&KEY))
}

fn trust() -> *mut amend_trust_store {
    util::trust_store(&SigningKey::from_bytes(&KEY))
}

/// A refused activation changes nothing: the session had no edit set before it and has none
/// after, so a version store can still be attached ("call it before the first activation").
#[test]
fn refused_activation_leaves_the_session_as_it_was() {
    let dir = scratch("activate");
    let (m, t) = (open_model(), trust());
    let expired = util::load_bundle(t, m, &bundle_bytes("old", 1, 0, 1));
    let s = open_session(m);
    assert_eq!(
        amend_session_activate(s, expired),
        amend_result::AMEND_ERR_BUNDLE_EXPIRED,
        "{}",
        last_error()
    );
    let mut n = 99;
    assert_eq!(
        amend_session_active_bundle_count(s, &mut n),
        amend_result::AMEND_OK
    );
    assert_eq!(n, 0);
    let state = dir.join("versions.state");
    let state = state.to_str().unwrap();
    assert_eq!(
        amend_session_set_state_file(s, state.as_ptr(), state.len()),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    // A second state file is refused, and the message says why (no activation happened).
    assert_eq!(
        amend_session_set_state_file(s, state.as_ptr(), state.len()),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
    assert!(
        last_error().contains("already has a state file"),
        "{}",
        last_error()
    );
    // After an activation that succeeded, a state file is too late.
    let good = util::load_bundle(t, m, &bundle_bytes("good", 3, 0, u64::MAX));
    let s2 = open_session(m);
    assert_eq!(
        amend_session_activate(s2, good),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    assert_eq!(
        amend_session_set_state_file(s2, state.as_ptr(), state.len()),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
    assert!(
        last_error().contains("before the first amend_session_activate"),
        "{}",
        last_error()
    );
    for b in [expired, good] {
        amend_bundle_free(b);
    }
    amend_session_free(s);
    amend_session_free(s2);
    amend_trust_store_free(t);
    amend_model_free(m);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A count above `AMEND_MAX_TRUSTED_KEYS` is refused before any key is read (as the streaming
/// verifier refuses it): a huge count from a length mix-up used to walk the caller's buffer
/// key by key, past its end, until a key happened to be invalid.
#[test]
fn trust_store_key_count_is_checked_before_reading() {
    let vk = SigningKey::from_bytes(&KEY).verifying_key();
    let keys: Vec<u8> = (0..AMEND_MAX_TRUSTED_KEYS + 1)
        .flat_map(|_| *vk.as_bytes())
        .collect();
    let mut t = ptr::null_mut();
    for n in [AMEND_MAX_TRUSTED_KEYS + 1, 1 << 40, usize::MAX / 32] {
        assert_eq!(
            amend_trust_store_new(keys.as_ptr(), n, &mut t),
            amend_result::AMEND_ERR_INVALID_ARGUMENT,
            "n_keys {n}"
        );
        assert!(
            last_error().contains("give 1 to 16 keys"),
            "{}",
            last_error()
        );
        assert!(t.is_null());
    }
    // Duplicates within the limit still count once.
    assert_eq!(
        amend_trust_store_new(keys.as_ptr(), AMEND_MAX_TRUSTED_KEYS, &mut t),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    amend_trust_store_free(t);
}

/// Parameter structs whose `bool` fields hold bytes other than 0 and 1 (memset, an
/// uninitialised field) are read as C reads flags: nonzero is true.
#[test]
fn garbage_in_bool_fields_reads_as_true() {
    let path = std::ffi::CString::new(util::tiny_model_path("careless").to_str().unwrap()).unwrap();
    let mut mp = amend_model_params {
        n_threads: 1,
        ..amend_model_default_params()
    };
    // SAFETY: the bytes of the flags, written as a careless C caller would.
    unsafe {
        let base = &mut mp as *mut amend_model_params as *mut u8;
        base.add(std::mem::offset_of!(amend_model_params, use_mmap))
            .write(0xff);
        base.add(std::mem::offset_of!(amend_model_params, cpu_fallback))
            .write(0x80);
        base.add(std::mem::offset_of!(amend_model_params, private_copy))
            .write(0x10);
    }
    let mut m = ptr::null_mut();
    assert_eq!(
        amend_model_open(path.as_ptr(), &mp, &mut m),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    let s = open_session(m);
    let prompt = "hello";
    let run = |p: &amend_generate_params| {
        let mut g = std::mem::MaybeUninit::<amend_generation>::zeroed();
        let r = amend_session_generate(
            s,
            prompt.as_ptr() as *const _,
            prompt.len(),
            p,
            None,
            ptr::null_mut(),
            g.as_mut_ptr(),
        );
        assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
        let g = unsafe { g.assume_init() };
        (g.n_prompt_tokens, g.n_generated)
    };
    let clean = amend_generate_params {
        max_tokens: 3,
        ..amend_generate_default_params()
    };
    let mut dirty = clean;
    unsafe {
        let base = &mut dirty as *mut amend_generate_params as *mut u8;
        base.add(std::mem::offset_of!(amend_generate_params, add_bos))
            .write(0x02);
        base.add(std::mem::offset_of!(amend_generate_params, stop_at_eos))
            .write(0xfe);
    }
    assert_eq!(run(&dirty), run(&clean));
    amend_session_free(s);
    amend_model_free(m);
}

fn stream_init(st: &mut amend_verify_stream_state) {
    let vk = SigningKey::from_bytes(&KEY).verifying_key();
    assert_eq!(
        amend_verify_stream_init(
            st,
            AMEND_VERIFY_STREAM_STATE_SIZE,
            vk.as_bytes().as_ptr(),
            1
        ),
        amend_result::AMEND_OK
    );
}

/// The streaming verifier fed in odd chunks: after its first error every later call (updates of
/// any size, empty ones, finish) gives that error; a copy of a state taken mid-stream goes on
/// on its own; bytes past a finished bundle are too long.
#[test]
fn stream_verifier_keeps_its_first_error_and_copies_are_independent() {
    let good = bundle_bytes("stream", 1, 0, u64::MAX);
    let mut bad = good.clone();
    let at = bad.len() - 5; // in the last section (data or padding)
    bad[at] ^= 0x40;
    let mut st = Box::new(amend_verify_stream_state { opaque: [0; 800] });
    stream_init(&mut st);
    let mut first = None;
    let mut off = 0;
    for size in [1usize, 7, 64, 3, 1000, 13].iter().cycle() {
        if off >= bad.len() {
            break;
        }
        let end = (off + size).min(bad.len());
        let r = amend_verify_stream_update(&mut *st, bad[off..end].as_ptr(), end - off);
        match first {
            None if r != amend_result::AMEND_OK => first = Some(r),
            Some(f) => assert_eq!(r, f, "after the first error, at byte {off}"),
            None => {}
        }
        off = end;
    }
    let first = first.expect("the corrupt byte was refused");
    assert!(
        matches!(
            first,
            amend_result::AMEND_ERR_BUNDLE_INTEGRITY | amend_result::AMEND_ERR_BUNDLE_FORMAT
        ),
        "{first:?}: {}",
        last_error()
    );
    assert_eq!(amend_verify_stream_update(&mut *st, ptr::null(), 0), first);
    assert_eq!(
        amend_verify_stream_update(&mut *st, good.as_ptr(), 9),
        first
    );
    assert_eq!(amend_verify_stream_finish(&mut *st), first);
    assert_eq!(amend_verify_stream_finish(&mut *st), first);

    // A copy taken half way finishes on its own; the original is unaffected by the copy.
    stream_init(&mut st);
    let half = good.len() / 2;
    assert_eq!(
        amend_verify_stream_update(&mut *st, good.as_ptr(), half),
        amend_result::AMEND_OK
    );
    let mut copy = Box::new(amend_verify_stream_state { opaque: st.opaque });
    for s in [&mut st, &mut copy] {
        assert_eq!(
            amend_verify_stream_update(&mut **s, good[half..].as_ptr(), good.len() - half),
            amend_result::AMEND_OK,
            "{}",
            last_error()
        );
        assert_eq!(amend_verify_stream_finish(&mut **s), amend_result::AMEND_OK);
        assert_eq!(amend_verify_stream_finish(&mut **s), amend_result::AMEND_OK);
    }
    assert_eq!(
        amend_verify_stream_update(&mut *st, good.as_ptr(), 1),
        amend_result::AMEND_ERR_BUNDLE_TOO_LONG
    );
    // A state that is not 8-byte aligned is refused, not read.
    let raw = st.opaque.as_mut_ptr() as *mut u8;
    let shifted = unsafe { raw.add(4) } as *mut amend_verify_stream_state;
    assert_eq!(
        amend_verify_stream_update(shifted, good.as_ptr(), 1),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
}
