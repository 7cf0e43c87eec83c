//! Helpers shared by the C ABI test crates (each includes this file with `#[path]`).

use std::ffi::CStr;
use std::path::PathBuf;

/// This thread's last error message.
pub fn last_error() -> String {
    unsafe { CStr::from_ptr(amend::amend_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A tiny llama model, written once per test process (`tag` names the file): the tests run on
/// several threads, and one writing the file while another opened it read a half-written model.
#[allow(dead_code)]
pub fn tiny_model_path(tag: &str) -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let p = dir.join(format!("ffi-{tag}-tiny-{}.gguf", std::process::id()));
        amend_runtime::testutil::write_tiny_model(&p, amend_runtime::Architecture::Llama, 3)
            .unwrap();
        p
    })
    .clone()
}

/// The tiny model of [`tiny_model_path`]`(tag)` opened on llama.cpp with one thread.
#[allow(dead_code)]
pub fn open_tiny_model(tag: &str) -> *mut amend::amend_model {
    let path = std::ffi::CString::new(tiny_model_path(tag).to_str().unwrap()).unwrap();
    let params = amend::amend_model_params {
        n_threads: 1,
        ..amend::amend_model_default_params()
    };
    let mut m = std::ptr::null_mut();
    assert_eq!(
        amend::amend_model_open(path.as_ptr(), &params, &mut m),
        amend::amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    m
}

/// A session on `m` with the default parameters.
#[allow(dead_code)]
pub fn open_session(m: *mut amend::amend_model) -> *mut amend::amend_session {
    open_session_with(m, &amend::amend_session_default_params())
}

/// A session on `m` with `params`.
#[allow(dead_code)]
pub fn open_session_with(
    m: *mut amend::amend_model,
    params: &amend::amend_session_params,
) -> *mut amend::amend_session {
    let mut s = std::ptr::null_mut();
    assert_eq!(
        amend::amend_session_open(m, params, &mut s),
        amend::amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    s
}

/// A signed bundle of one edit for the model `meta.model` names: one codebook entry at `layer`
/// (FFN output, `distance` as `BundleBuilder::add_codebook` takes it, a unit key on the first
/// dimension), signed with `key`.
#[allow(dead_code)]
pub fn one_edit_bundle(
    meta: amend_edits::BundleMeta,
    layer: u32,
    distance: u8,
    key: &amend_edits::ed25519_dalek::SigningKey,
) -> Vec<u8> {
    use amend_edits::Site;
    let d = meta.model.n_embd as usize;
    let mut b = amend_edits::BundleBuilder::new(meta);
    let mut k = vec![0.0; d];
    k[0] = 1.0;
    let p = b.add_codebook(
        layer,
        Site::FfnOutput,
        Site::FfnOutput,
        distance,
        false,
        d,
        &k,
        &vec![0.5; d],
        &[0.1],
    );
    b.add_edit("e0", layer, Site::FfnOutput, "p", "t", p, 0, 1);
    b.build_signed(key).unwrap().as_slice().to_vec()
}

/// A trust store holding `key`'s public half (free with `amend_trust_store_free`).
#[allow(dead_code)]
pub fn trust_store(key: &amend_edits::ed25519_dalek::SigningKey) -> *mut amend::amend_trust_store {
    let mut trust = std::ptr::null_mut();
    assert_eq!(
        amend::amend_trust_store_new(key.verifying_key().as_bytes().as_ptr(), 1, &mut trust),
        amend::amend_result::AMEND_OK
    );
    trust
}

/// `bytes` loaded as a bundle for `m`, verified against `trust`.
#[allow(dead_code)]
pub fn load_bundle(
    trust: *mut amend::amend_trust_store,
    m: *mut amend::amend_model,
    bytes: &[u8],
) -> *mut amend::amend_bundle {
    let mut b = std::ptr::null_mut();
    assert_eq!(
        amend::amend_bundle_load_memory(trust, m, bytes.as_ptr(), bytes.len(), &mut b),
        amend::amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    b
}
