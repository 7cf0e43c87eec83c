//! The C ABI called from Rust: misuse gives specific codes, and generation through the ABI
//! gives the same tokens as the Rust API for the same seed (real model; skipped without it
//! unless AMEND_REQUIRE_MODEL=1).

use std::ffi::{c_char, c_void, CString};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::ptr;

use amend::*;
use amend_runtime::{GenerateParams, Model, ModelOptions, Session, SessionOptions};

#[path = "common/util.rs"]
mod util;
use util::last_error;

fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("AMEND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("gemma3-270m-q4_k_m.gguf")
        });
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var("AMEND_REQUIRE_MODEL").as_deref() != Ok("1"),
        "model {} missing (AMEND_REQUIRE_MODEL=1)",
        p.display()
    );
    println!("model {} missing: skipped", p.display());
    None
}

#[test]
fn misuse_gives_specific_codes() {
    let mut m: *mut amend_model = 0x10 as *mut _;
    assert_eq!(
        amend_model_open(ptr::null(), ptr::null(), &mut m),
        amend_result::AMEND_ERR_NULL_ARGUMENT
    );
    assert!(m.is_null());
    assert_eq!(
        amend_session_cancel(0x4242 as *const _),
        amend_result::AMEND_ERR_INVALID_HANDLE
    );
    assert!(
        last_error().contains("not a live amend_session handle"),
        "{}",
        last_error()
    );
    let mut t = ptr::null_mut();
    assert_eq!(
        amend_trust_store_new(ptr::null(), 0, &mut t),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
    amend_model_free(ptr::null_mut());
    assert_eq!(amend_last_error_code(), amend_result::AMEND_OK);
}

struct Collected(Vec<i32>);

unsafe extern "C" fn collect(ud: *mut c_void, token: i32, _t: *const c_char, _n: usize) -> bool {
    let c = unsafe { &mut *(ud as *mut Collected) };
    if token != AMEND_FLUSH_TOKEN {
        c.0.push(token);
    }
    true
}

#[test]
fn abi_generation_matches_the_rust_api() {
    let Some(path) = model_path() else { return };
    let prompt = "Water is made of hydrogen and";
    let rust = {
        let model = Model::open(&path, ModelOptions::default()).unwrap();
        let mut s = Session::new(&model, SessionOptions::default()).unwrap();
        let p = GenerateParams {
            max_tokens: 10,
            temperature: 0.9,
            seed: 1234,
            ..Default::default()
        };
        s.generate(prompt, &p, |_| ControlFlow::Continue(()))
            .unwrap()
            .tokens
    };
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let mut model = ptr::null_mut();
    assert_eq!(
        amend_model_open(cpath.as_ptr(), ptr::null(), &mut model),
        amend_result::AMEND_OK
    );
    let mut session = ptr::null_mut();
    assert_eq!(
        amend_session_open(model, ptr::null(), &mut session),
        amend_result::AMEND_OK
    );
    let mut params = amend_generate_default_params();
    params.max_tokens = 10;
    params.temperature = 0.9;
    params.seed = 1234;
    let mut got = Collected(Vec::new());
    let mut out = std::mem::MaybeUninit::<amend_generation>::uninit();
    let r = amend_session_generate(
        session,
        prompt.as_ptr() as *const c_char,
        prompt.len(),
        &params,
        Some(collect),
        &mut got as *mut Collected as *mut c_void,
        out.as_mut_ptr(),
    );
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    let out = unsafe { out.assume_init() };
    assert_eq!(out.n_generated as usize, got.0.len());
    assert_eq!(got.0, rust);
    amend_session_free(session);
    amend_model_free(model);
    assert_eq!(amend_live_handles(), 0);
}
