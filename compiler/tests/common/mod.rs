#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use amend_runtime::testutil::write_tiny_model;
use amend_runtime::{Architecture, Model, ModelOptions};

pub fn tmp_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("amend-compiler-tests-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

/// A tiny random llama-family model written once per process.
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

/// The real model's path, or None (test skipped) when it is missing and not required.
pub fn real_model_path() -> Option<PathBuf> {
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
    Some(path)
}

pub fn open_runtime(path: &std::path::Path) -> Arc<Model> {
    Model::open(
        path,
        ModelOptions {
            n_threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// Options of a real-model method test from `AMEND_<PREFIX>_N` (a count or `all`),
/// `AMEND_<PREFIX>_LAYER` and `AMEND_<PREFIX>_SET` (`;`-separated `section.key=value`).
pub struct EnvOptions {
    pub n: usize,
    pub layer: Option<usize>,
    pub sets: Vec<String>,
}

pub fn env_options(prefix: &str, default_n: usize) -> EnvOptions {
    let var = |k: &str| std::env::var(format!("AMEND_{prefix}_{k}")).ok();
    let n = match var("N").as_deref() {
        Some("all") => usize::MAX,
        Some(s) => s.parse().unwrap_or(default_n),
        None => default_n,
    };
    let layer = var("LAYER").and_then(|s| s.parse().ok());
    let sets = var("SET")
        .map(|s| {
            s.split(';')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    EnvOptions { n, layer, sets }
}
