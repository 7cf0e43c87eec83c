#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use amend_runtime::testutil::write_tiny_model;
use amend_runtime::{Architecture, Model, ModelOptions};

/// A per-process temp dir for generated files.
pub fn tmp_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("amend-runtime-tests-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

pub fn tiny_path(arch: Architecture) -> PathBuf {
    let p = tmp_dir().join(format!("tiny-{}.gguf", arch.name()));
    if !p.exists() {
        let tmp = p.with_extension(
            format!("tmp{:?}", std::thread::current().id()).replace(['(', ')'], ""),
        );
        write_tiny_model(&tmp, arch, 7).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }
    p
}

pub fn tiny(arch: Architecture) -> Arc<Model> {
    Model::open(
        tiny_path(arch),
        ModelOptions {
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The real model, or None (test skipped) when it is missing and not required.
pub fn real_model() -> Option<Arc<Model>> {
    static MODEL: OnceLock<Option<Arc<Model>>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = std::env::var_os("AMEND_MODEL")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/amend/gemma3-270m-q4_k_m.gguf")
                });
            if !path.exists() {
                if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
                    panic!(
                        "AMEND_REQUIRE_MODEL=1 but the model {} is missing (run `make model`)",
                        path.display()
                    );
                }
                eprintln!(
                    "skipped: real model {} not found (set AMEND_MODEL or run `make model`)",
                    path.display()
                );
                return None;
            }
            Some(Model::open(&path, ModelOptions::default()).unwrap())
        })
        .clone()
}
