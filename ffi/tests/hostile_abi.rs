//! Issue 11 through the C ABI: an empty prompt is refused as amend.h promises, a path that is
//! not UTF-8 can be opened (`amend_bundle_load_file_bytes`), a small-order public key is
//! refused, and two sessions sharing a version store file refuse a replay of v1 after v9.
//! Real model; skipped without it unless AMEND_REQUIRE_MODEL=1.

use std::ffi::{c_char, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::ptr;

use amend::*;
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::{BundleMeta, ModelBinding};

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

fn bundle(binding: &ModelBinding, version: u64) -> Vec<u8> {
    let meta = BundleMeta {
        bundle_id: format!("abi-v{version}"),
        channel: "main".into(),
        version,
        created: 0,
        not_before: 0,
        expires: u64::MAX,
        model: binding.clone(),
    };
    util::one_edit_bundle(meta, 10, 1, &SigningKey::from_bytes(&[42; 32]))
}

#[test]
fn hostile_inputs_through_the_c_abi() {
    let Some(path) = model_path() else { return };
    let dir = std::env::temp_dir().join(format!("amend-hostile-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let binding = amend_edits::fingerprint::model_binding(&path).unwrap();

    // A small-order public key (the identity point) is refused.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut t = ptr::null_mut();
    assert_eq!(
        amend_trust_store_new(identity.as_ptr(), 1, &mut t),
        amend_result::AMEND_ERR_INVALID_KEY
    );
    assert!(last_error().contains("weak"), "{}", last_error());

    let trust = util::trust_store(&SigningKey::from_bytes(&[42; 32]));
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut model = ptr::null_mut();
    assert_eq!(
        amend_model_open(cpath.as_ptr(), ptr::null(), &mut model),
        amend_result::AMEND_OK
    );

    // A bundle at a path that is not UTF-8.
    let mut name = dir.as_os_str().as_bytes().to_vec();
    name.extend_from_slice(b"/bundle-\xff\xfe-v9.amend");
    let v9_path = std::ffi::OsStr::from_bytes(&name);
    std::fs::write(v9_path, bundle(&binding, 9)).unwrap();
    let mut v9 = ptr::null_mut();
    let c = CString::new(name.clone()).unwrap();
    assert_eq!(
        amend_bundle_load_file(trust, model, c.as_ptr(), &mut v9),
        amend_result::AMEND_ERR_INVALID_UTF8
    );
    assert_eq!(
        amend_bundle_load_file_bytes(trust, model, name.as_ptr(), name.len(), &mut v9),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    let v1_path = dir.join("v1.amend");
    std::fs::write(&v1_path, bundle(&binding, 1)).unwrap();
    let v1_name = v1_path.as_os_str().as_bytes();
    let mut v1 = ptr::null_mut();
    assert_eq!(
        amend_bundle_load_file_bytes(trust, model, v1_name.as_ptr(), v1_name.len(), &mut v1),
        amend_result::AMEND_OK
    );

    // Two sessions share one state file: v9 in the first, then v1 in the second is refused.
    let state = dir.join("versions.state");
    let state = state.as_os_str().as_bytes();
    let mut s1 = ptr::null_mut();
    let mut s2 = ptr::null_mut();
    assert_eq!(
        amend_session_open(model, ptr::null(), &mut s1),
        amend_result::AMEND_OK
    );
    assert_eq!(
        amend_session_open(model, ptr::null(), &mut s2),
        amend_result::AMEND_OK
    );
    for s in [s1, s2] {
        assert_eq!(
            amend_session_set_state_file(s, state.as_ptr(), state.len()),
            amend_result::AMEND_OK,
            "{}",
            last_error()
        );
    }
    assert_eq!(amend_session_activate(s1, v9), amend_result::AMEND_OK);
    assert_eq!(
        amend_session_activate(s2, v1),
        amend_result::AMEND_ERR_BUNDLE_DOWNGRADE
    );
    assert!(
        last_error().contains("is at version 9; 1 would be a downgrade"),
        "{}",
        last_error()
    );
    let mut n = 99;
    assert_eq!(
        amend_session_active_bundle_count(s2, &mut n),
        amend_result::AMEND_OK
    );
    assert_eq!(n, 0, "the refused bundle is not active");
    // Too late to attach a store once bundles are active.
    assert_eq!(
        amend_session_set_state_file(s1, state.as_ptr(), state.len()),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );

    // An empty prompt is refused (it used to generate from BOS alone).
    let r = amend_session_generate(
        s1,
        "".as_ptr() as *const c_char,
        0,
        ptr::null(),
        None,
        ptr::null_mut(),
        ptr::null_mut(),
    );
    assert_eq!(
        r,
        amend_result::AMEND_ERR_INVALID_ARGUMENT,
        "{}",
        last_error()
    );

    for s in [s1, s2] {
        amend_session_free(s);
    }
    amend_bundle_free(v1);
    amend_bundle_free(v9);
    amend_model_free(model);
    amend_trust_store_free(trust);
    assert_eq!(amend_live_handles(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
