#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use amend_edits::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter};
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
                    amend_edits::fsutil::cache_dir()
                        .unwrap_or_default()
                        .join("gemma3-270m-q4_k_m.gguf")
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

/// The first `n` prompts of data/prompts-100.txt, tokenized by `model`.
pub fn prompts_100(model: &Model, n: usize) -> Vec<Vec<i32>> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/prompts-100.txt"
    ))
    .unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| model.tokenize(l, true).unwrap())
        .collect()
}

/// Top-1 agreement and logit error of ONNX Runtime (`opts`) against llama.cpp on the same
/// model file, along llama.cpp's greedy continuations of `prompts` (`n` tokens each).
pub fn ort_parity(
    llama: &Arc<Model>,
    opts: amend_runtime::onnxruntime::OrtOptions,
    prompts: &[Vec<i32>],
    n: usize,
    mode: amend_runtime::parity::Mode,
) -> amend_runtime::parity::ParityReport {
    use amend_runtime::onnxruntime::{OrtModel, OrtSession};
    let mut reference = amend_runtime::Session::new(
        llama,
        amend_runtime::SessionOptions {
            n_ctx: 512,
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let m = OrtModel::open(llama.path(), opts).unwrap();
    let mut cand = OrtSession::new(&m, 512).unwrap();
    amend_runtime::parity::parity(&mut reference, &mut cand, prompts, n, mode, |_, _| {}).unwrap()
}

/// The ONNX Runtime CPU library from scripts/fetch-ort.sh, or None (test skipped) when it is
/// missing and not required (AMEND_REQUIRE_MODEL=1 makes it a failure).
pub fn ort_library() -> Option<PathBuf> {
    use amend_runtime::onnxruntime::{default_library, Ep};
    let p = default_library(&Ep::Cpu);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "AMEND_REQUIRE_MODEL=1 but {} is missing (run `make ort`)",
            p.display()
        );
    }
    eprintln!(
        "skipped: {} is missing (run scripts/fetch-ort.sh)",
        p.display()
    );
    None
}

/// Bundle metadata valid for an hour, bound to `m`'s file.
pub fn bundle_meta(m: &Model, id: &str, version: u64) -> amend_edits::bundle::BundleMeta {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    amend_edits::bundle::BundleMeta {
        bundle_id: id.into(),
        channel: id.into(),
        version,
        created: now - 10,
        not_before: now - 10,
        expires: now + 3600,
        model: amend_edits::fingerprint::model_binding(m.path()).unwrap(),
    }
}

/// The last prompt token's row at `point` when `prompt` is evaluated on llama.cpp (through a
/// hook; the KV cache is cleared before and after).
pub fn capture_last_row(
    s: &mut amend_runtime::Session,
    prompt: &str,
    point: amend_edits::HookPoint,
) -> Vec<f32> {
    use amend_runtime::{FnHook, HookRows, Logits};
    let out: Arc<std::sync::Mutex<Vec<f32>>> = Arc::default();
    let sink = out.clone();
    let id = s
        .add_hook(Box::new(FnHook::new(
            vec![point],
            move |_, r: &mut HookRows<'_>| {
                if let Some(i) = r.last_prompt_row() {
                    *sink.lock().unwrap() = r.row(i).to_vec();
                }
            },
        )))
        .unwrap();
    let toks = s.tokenize(prompt, true).unwrap();
    s.kv_clear();
    s.prefill(&toks, Logits::Last).unwrap();
    s.remove_hook(id);
    s.kv_clear();
    let v = out.lock().unwrap().clone();
    v
}

/// The tiny llama model rewritten by `edit` (metadata and tensors copied, then edited), as
/// `variant-{tag}.gguf` in the per-process temp dir.
pub fn tiny_variant(
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, GgufValue)>, &mut Vec<TinyTensor>),
) -> PathBuf {
    let full = std::fs::read(tiny_path(Architecture::Llama)).unwrap();
    let f = GgufFile::parse(&full).unwrap();
    let mut meta = f.metadata.clone();
    let mut tensors: Vec<TinyTensor> = f
        .tensors
        .iter()
        .map(|t| TinyTensor {
            name: t.name.clone(),
            ty: t.ggml_type,
            ne: t.ne.clone(),
            data: f.data_of(t).unwrap().to_vec(),
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add(&k, v);
    }
    for t in tensors {
        w.add_tensor_raw(&t.name, t.ty, &t.ne, t.data).unwrap();
    }
    let p = tmp_dir().join(format!("variant-{tag}.gguf"));
    w.write_to(&p).unwrap();
    p
}

/// A tensor of [`tiny_variant`]'s model, as `edit` sees it.
pub struct TinyTensor {
    pub name: String,
    pub ty: GgmlType,
    pub ne: Vec<u64>,
    pub data: Vec<u8>,
}
