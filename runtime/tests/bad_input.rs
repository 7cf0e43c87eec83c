//! Bad files: each is a specific error, never a crash.
mod common;

use amend_edits::gguf::GgufWriter;
use amend_runtime::{Architecture, Model, ModelOptions, RuntimeError};

fn open(p: &std::path::Path) -> Result<std::sync::Arc<Model>, RuntimeError> {
    Model::open(p, ModelOptions::default())
}

#[test]
fn missing_file() {
    let err = open(&common::tmp_dir().join("does-not-exist.gguf")).unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist.gguf"));
}

#[test]
fn text_file_renamed_gguf() {
    let p = common::tmp_dir().join("notes.gguf");
    std::fs::write(&p, "these are my notes, not a model\n").unwrap();
    let err = open(&p).unwrap_err();
    assert!(matches!(err, RuntimeError::NotGguf { .. }), "{err}");
    assert!(
        err.to_string().contains("bad magic [74, 68, 65, 73]"),
        "{err}"
    );
    // An empty file or one shorter than the magic: said as such, not as zero bytes it lacks.
    let empty = common::tmp_dir().join("empty.gguf");
    std::fs::write(&empty, "").unwrap();
    let err = open(&empty).unwrap_err();
    assert!(matches!(err, RuntimeError::NotGguf { .. }), "{err}");
    assert!(err.to_string().ends_with("(it is empty)"), "{err}");
    let short = common::tmp_dir().join("short.gguf");
    std::fs::write(&short, "ab").unwrap();
    let err = open(&short).unwrap_err();
    assert!(err.to_string().ends_with("(bad magic [61, 62])"), "{err}");
    assert!(matches!(
        open(&common::tmp_dir()),
        Err(RuntimeError::File(_))
    ));
}

#[test]
fn truncated_at_many_offsets() {
    let full = std::fs::read(common::tiny_path(Architecture::Llama)).unwrap();
    let n = full.len();
    let offsets = [
        2,
        4,
        7,
        12,
        20,
        24,
        40,
        100,
        1000,
        3000,
        5000,
        10_000,
        n / 3,
        n / 2,
        n - 4096,
        n - 1,
    ];
    for (i, &cut) in offsets.iter().enumerate() {
        let p = common::tmp_dir().join(format!("trunc-{i}.gguf"));
        std::fs::write(&p, &full[..cut]).unwrap();
        let err = open(&p).unwrap_err();
        assert!(
            matches!(err, RuntimeError::Truncated { .. }),
            "cut at {cut}: {err}"
        );
    }
    // The untouched file still loads.
    let ok = common::tmp_dir().join("full-copy.gguf");
    std::fs::write(&ok, &full).unwrap();
    open(&ok).unwrap();
}

#[test]
fn corrupted_header_fields() {
    let full = std::fs::read(common::tiny_path(Architecture::Llama)).unwrap();
    let mut v = full.clone();
    v[4] = 99; // version
    let p = common::tmp_dir().join("badversion.gguf");
    std::fs::write(&p, &v).unwrap();
    assert!(matches!(open(&p), Err(RuntimeError::InvalidGguf { .. })));
    let mut v = full;
    v[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // n_kv
    std::fs::write(&p, &v).unwrap();
    assert!(matches!(open(&p), Err(RuntimeError::InvalidGguf { .. })));
}

#[test]
fn unsupported_architecture_lists_supported_ones() {
    let p = common::tmp_dir().join("mamba.gguf");
    let mut w = GgufWriter::new();
    w.add("general.architecture", "mamba");
    w.add_tensor_f32("x.weight", &[4], &[0.0; 4]).unwrap();
    w.write_to(&p).unwrap();
    let err = open(&p).unwrap_err();
    assert!(
        matches!(err, RuntimeError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("mamba") && msg.contains("gemma3, llama, qwen2, qwen3"),
        "{msg}"
    );
}

#[test]
fn structurally_valid_but_incomplete_model_names_what_is_missing() {
    let p = common::tmp_dir().join("llama-no-tensors.gguf");
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama")
        .add("llama.block_count", 2u32);
    w.write_to(&p).unwrap();
    let err = open(&p).unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidHparams { .. }), "{err}");
    assert!(err.to_string().contains("llama.embedding_length"), "{err}");
}
