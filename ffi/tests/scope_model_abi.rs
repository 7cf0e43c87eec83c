//! Issue 16 through the C ABI: the scope model that serac bundles route their memories with.
//! Opening refuses a missing file, a FIFO, a corrupt file and a model that is not a `bert`
//! encoder with AMEND_ERR_SCOPE_MODEL; a serac bundle compiled with the scope model is refused
//! whole on a session without one (AMEND_ERR_SCOPE_MODEL) or with another one
//! (AMEND_ERR_SCOPE_MODEL_MISMATCH), and routes a prompt (its score changes) with the right
//! one. Needs the real model and ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf
//! (scripts/fetch-scope-model.sh); skipped without them unless AMEND_REQUIRE_MODEL=1.

#[path = "common/serac.rs"]
mod serac;

use std::ffi::{c_char, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;

use amend::*;
use amend_edits::ed25519_dalek::SigningKey;

#[path = "common/util.rs"]
mod util;
use util::last_error;

fn required() -> bool {
    std::env::var("AMEND_REQUIRE_MODEL").as_deref() == Ok("1")
}

fn existing(p: PathBuf, what: &str) -> Option<PathBuf> {
    if p.is_file() {
        return Some(p);
    }
    assert!(
        !required(),
        "{what} {} missing (AMEND_REQUIRE_MODEL=1)",
        p.display()
    );
    println!("{what} {} missing: skipped", p.display());
    None
}

fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("AMEND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("gemma3-270m-q4_k_m.gguf")
        });
    existing(p, "model")
}

fn scope_path() -> Option<PathBuf> {
    existing(serac::default_scope_model_path(), "scope model")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("amend-scope-abi-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `amend_scope_model_open` on `path`: the code, and `*out` must be NULL on failure.
fn open_code(path: &Path) -> amend_result {
    let mut out: *mut amend_scope_model = 0x10 as *mut _;
    let c = cpath(path);
    let r = amend_scope_model_open(c.as_ptr(), 1, &mut out);
    if r != amend_result::AMEND_OK {
        assert!(out.is_null(), "out not cleared on failure");
    } else {
        amend_scope_model_free(out);
    }
    r
}

#[test]
fn scope_model_open_refuses_bad_arguments_and_files() {
    let dir = tmp_dir("bad");
    let mut out: *mut amend_scope_model = 0x10 as *mut _;
    // NULL arguments.
    assert_eq!(
        amend_scope_model_open(ptr::null(), 0, &mut out),
        amend_result::AMEND_ERR_NULL_ARGUMENT
    );
    assert!(out.is_null());
    assert!(last_error().contains("`path`"), "{}", last_error());
    let c = cpath(&dir.join("x.gguf"));
    assert_eq!(
        amend_scope_model_open(c.as_ptr(), 0, ptr::null_mut()),
        amend_result::AMEND_ERR_NULL_ARGUMENT
    );
    assert_eq!(
        amend_scope_model_open_bytes(ptr::null(), 3, 0, &mut out),
        amend_result::AMEND_ERR_NULL_ARGUMENT
    );
    // An empty path, a NUL inside, threads above the cap.
    out = 0x10 as *mut _;
    assert_eq!(
        amend_scope_model_open_bytes(b"".as_ptr(), 0, 0, &mut out),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
    assert!(out.is_null());
    assert_eq!(
        amend_scope_model_open_bytes(b"a\0b".as_ptr(), 3, 0, &mut out),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        amend_scope_model_open(c.as_ptr(), 513, &mut out),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("n_threads 513"), "{}", last_error());
    // A path that is not UTF-8 through the NUL-terminated variant.
    let bad = CString::new(b"/tmp/scope-\xff.gguf".to_vec()).unwrap();
    assert_eq!(
        amend_scope_model_open(bad.as_ptr(), 0, &mut out),
        amend_result::AMEND_ERR_INVALID_UTF8
    );
    // Setting a scope model needs a session; a forged scope handle is reported.
    assert_eq!(
        amend_session_set_scope_model(ptr::null_mut(), ptr::null()),
        amend_result::AMEND_ERR_NULL_ARGUMENT
    );
    assert_eq!(
        amend_session_set_scope_model(0x4240 as *mut _, ptr::null()),
        amend_result::AMEND_ERR_INVALID_HANDLE
    );
    amend_scope_model_free(ptr::null_mut());
    assert_eq!(amend_last_error_code(), amend_result::AMEND_OK);
    amend_scope_model_free(0x4250 as *mut _);
    assert_eq!(
        amend_last_error_code(),
        amend_result::AMEND_ERR_INVALID_HANDLE
    );

    // A missing file, a directory, a FIFO, garbage: AMEND_ERR_SCOPE_MODEL, never a hang.
    let missing = dir.join("missing.gguf");
    assert_eq!(open_code(&missing), amend_result::AMEND_ERR_SCOPE_MODEL);
    assert!(last_error().contains("not found"), "{}", last_error());
    assert_eq!(open_code(&dir), amend_result::AMEND_ERR_SCOPE_MODEL);
    let fifo = dir.join("fifo.gguf");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    assert_eq!(open_code(&fifo), amend_result::AMEND_ERR_SCOPE_MODEL);
    assert!(last_error().contains("fifo.gguf"), "{}", last_error());
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"not a gguf file at all, not even close").unwrap();
    assert_eq!(open_code(&garbage), amend_result::AMEND_ERR_SCOPE_MODEL);

    // With the real scope model: a truncated copy is corrupt; the base model is not bert.
    if let Some(scope) = scope_path() {
        let bytes = std::fs::read(&scope).unwrap();
        let cut = dir.join("truncated.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(open_code(&cut), amend_result::AMEND_ERR_SCOPE_MODEL);
    }
    if let Some(model) = model_path() {
        assert_eq!(open_code(&model), amend_result::AMEND_ERR_SCOPE_MODEL);
        assert!(last_error().contains("bert"), "{}", last_error());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

unsafe extern "C" fn count_memory(ud: *mut c_void, a: *const amend_edit_activity) -> bool {
    let (n, fired) = unsafe { &mut *(ud as *mut (u32, u32)) };
    let a = unsafe { &*a };
    let family = unsafe { CStr::from_ptr(a.family) }.to_str().unwrap();
    if family == "memory" {
        *n += 1;
        *fired += a.n_fired;
    }
    true
}

fn score(s: *mut amend_session) -> f64 {
    let (p, t) = (serac::SERAC_PROMPT, serac::SERAC_TARGET);
    let mut out = amend_score::default();
    let r = amend_session_score(
        s,
        p.as_ptr() as *const c_char,
        p.len(),
        t.as_ptr() as *const c_char,
        t.len(),
        &mut out,
    );
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    out.logprob_sum
}

/// (memory activities, their firings) of the session's last request.
fn memory_activity(s: *mut amend_session) -> (u32, u32) {
    let mut acc = (0u32, 0u32);
    let r = amend_session_explain(s, Some(count_memory), &mut acc as *mut _ as *mut c_void);
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    acc
}

fn active(s: *mut amend_session) -> usize {
    let mut n = 99;
    assert_eq!(
        amend_session_active_bundle_count(s, &mut n),
        amend_result::AMEND_OK
    );
    n
}

fn open_scope(path: &Path) -> *mut amend_scope_model {
    let bytes = path.as_os_str().as_bytes();
    let mut out = ptr::null_mut();
    let r = amend_scope_model_open_bytes(bytes.as_ptr(), bytes.len(), 2, &mut out);
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    assert!(!out.is_null());
    out
}

#[test]
fn serac_bundle_needs_its_scope_model() {
    let (Some(model_file), Some(scope_file)) = (model_path(), scope_path()) else {
        return;
    };
    let dir = tmp_dir("serac");
    let key = SigningKey::from_bytes(&[42; 32]);
    let t0 = std::time::Instant::now();
    let bytes = serac::compile_serac(&model_file, &scope_file, &key, "abi-serac").unwrap();
    println!(
        "serac bundle: {} bytes in {:.1} s",
        bytes.len(),
        t0.elapsed().as_secs_f64()
    );
    // A copy of the scope model with one weight changed: it loads, its fingerprint differs.
    // The path is not UTF-8, so it goes through amend_scope_model_open_bytes.
    let mut other_name = dir.as_os_str().as_bytes().to_vec();
    other_name.extend_from_slice(b"/scope-\xff-other.gguf");
    let other_file = PathBuf::from(std::ffi::OsStr::from_bytes(&other_name));
    serac::modified_copy(&scope_file, &other_file).unwrap();

    let trust = util::trust_store(&key);
    let mut model = ptr::null_mut();
    let c = cpath(&model_file);
    assert_eq!(
        amend_model_open(c.as_ptr(), ptr::null(), &mut model),
        amend_result::AMEND_OK
    );
    let mut bundle = ptr::null_mut();
    assert_eq!(
        amend_bundle_load_memory(trust, model, bytes.as_ptr(), bytes.len(), &mut bundle),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    let mut params = amend_session_default_params();
    params.n_ctx = 512;
    params.n_threads = 2;
    let mut s = ptr::null_mut();
    assert_eq!(
        amend_session_open(model, &params, &mut s),
        amend_result::AMEND_OK
    );
    let base = score(s);
    assert_eq!(memory_activity(s), (0, 0));

    // No scope model: refused whole, nothing applied.
    assert_eq!(
        amend_session_activate(s, bundle),
        amend_result::AMEND_ERR_SCOPE_MODEL
    );
    let msg = last_error();
    assert!(
        msg.contains("abi-serac") && msg.contains("amend_session_set_scope_model"),
        "{msg}"
    );
    assert_eq!(active(s), 0);
    assert_eq!(score(s), base, "a refused bundle changed the score");
    assert_eq!(memory_activity(s), (0, 0));

    // Another scope model (another fingerprint): refused whole with the MISMATCH code.
    let other = open_scope(&other_file);
    assert_eq!(
        amend_session_set_scope_model(s, other),
        amend_result::AMEND_OK
    );
    assert_eq!(
        amend_session_activate(s, bundle),
        amend_result::AMEND_ERR_SCOPE_MODEL_MISMATCH
    );
    assert!(last_error().contains("abi-serac"), "{}", last_error());
    assert_eq!(active(s), 0);
    assert_eq!(score(s), base, "a refused bundle changed the score");
    assert_eq!(memory_activity(s), (0, 0));

    // The right one: the bundle activates and the edited prompt routes to its memory. The
    // handle is freed at once: the session keeps the model alive.
    let right = open_scope(&scope_file);
    assert_eq!(
        amend_session_set_scope_model(s, right),
        amend_result::AMEND_OK
    );
    amend_scope_model_free(right);
    assert_eq!(
        amend_session_activate(s, bundle),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    assert_eq!(active(s), 1);
    let edited = score(s);
    let (n_mem, fired) = memory_activity(s);
    println!(
        "log p(\"{}\"): base {base:.3}, routed {edited:.3}",
        serac::SERAC_TARGET
    );
    assert!(n_mem >= 1 && fired >= 1, "memory {n_mem} fired {fired}");
    assert!(
        edited > base + 1.0,
        "the routed prompt scores {edited} vs base {base}"
    );

    // While the bundle is active its scope model cannot be taken away or swapped.
    assert_eq!(
        amend_session_set_scope_model(s, ptr::null()),
        amend_result::AMEND_ERR_SCOPE_MODEL
    );
    assert!(
        last_error().contains("keeps its scope model"),
        "{}",
        last_error()
    );
    assert_eq!(
        amend_session_set_scope_model(s, other),
        amend_result::AMEND_ERR_SCOPE_MODEL_MISMATCH
    );
    assert_eq!(score(s), edited, "the refused swap changed routing");
    // Rolled back, it can.
    let id = CString::new("abi-serac").unwrap();
    assert_eq!(
        amend_session_rollback_bundle(s, id.as_ptr()),
        amend_result::AMEND_OK
    );
    assert_eq!(
        amend_session_set_scope_model(s, ptr::null()),
        amend_result::AMEND_OK
    );
    assert_eq!(score(s), base);

    // A second session shares the still-open `other` handle; freeing it first is fine.
    let mut s2 = ptr::null_mut();
    assert_eq!(
        amend_session_open(model, &params, &mut s2),
        amend_result::AMEND_OK
    );
    assert_eq!(
        amend_session_set_scope_model(s2, other),
        amend_result::AMEND_OK
    );
    amend_scope_model_free(other);
    assert_eq!(amend_last_error_code(), amend_result::AMEND_OK);
    amend_scope_model_free(other);
    assert_eq!(
        amend_last_error_code(),
        amend_result::AMEND_ERR_INVALID_HANDLE,
        "double free is reported"
    );
    assert_eq!(
        amend_session_set_scope_model(s2, other),
        amend_result::AMEND_ERR_INVALID_HANDLE
    );
    // A handle of another kind is not a scope model.
    assert_eq!(
        amend_session_set_scope_model(s2, trust as *const amend_scope_model),
        amend_result::AMEND_ERR_INVALID_HANDLE
    );

    for s in [s, s2] {
        amend_session_free(s);
    }
    amend_bundle_free(bundle);
    amend_model_free(model);
    amend_trust_store_free(trust);
    assert_eq!(amend_live_handles(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
