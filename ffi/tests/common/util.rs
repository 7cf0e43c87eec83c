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
