//! The model fingerprint on the real default model (skipped when absent unless
//! AMEND_REQUIRE_MODEL=1), plus a synthetic GGUF: binding, cache, and refusal of other models.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use amend_edits::editset::{AddOptions, EditSet, EditSetError, ManualClock};
use amend_edits::fingerprint::{
    binding_of_bytes, cache_path, model_binding, model_binding_uncached,
};
use amend_edits::gguf::GgufWriter;

fn tiny_gguf(weight: f32, quant_tag: &str) -> Vec<u8> {
    tiny_gguf_with(weight, quant_tag, |_| {})
}

/// A minimal model whose hyperparameters pass validation; `edit` may change metadata.
fn tiny_gguf_with(weight: f32, quant_tag: &str, edit: impl FnOnce(&mut GgufWriter)) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "gemma3");
    w.add("general.name", quant_tag);
    w.add("gemma3.block_count", amend_edits::gguf::GgufValue::U32(18));
    w.add(
        "gemma3.embedding_length",
        amend_edits::gguf::GgufValue::U32(common::DIM as u32),
    );
    w.add("gemma3.context_length", 512u32);
    w.add("gemma3.attention.head_count", 2u32);
    w.add("gemma3.attention.layer_norm_rms_epsilon", 1e-6f32);
    w.add("tokenizer.ggml.model", "llama");
    w.add("tokenizer.ggml.tokens", vec!["a", "b"]);
    edit(&mut w);
    w.add_tensor_f32(
        "token_embd.weight",
        &[common::DIM as u64, 2],
        &[weight; common::DIM * 2],
    )
    .unwrap();
    w.to_bytes()
}

#[test]
fn fingerprint_binds_data_and_dims() {
    let a = binding_of_bytes(&tiny_gguf(1.0, "a")).unwrap();
    assert_eq!(a.arch, "gemma3");
    assert_eq!((a.n_layer, a.n_embd), (18, common::DIM as u32));
    // Same table, different data: different fingerprint.
    let b = binding_of_bytes(&tiny_gguf(2.0, "a")).unwrap();
    assert_ne!(a.fingerprint, b.fingerprint);
    assert_eq!(a, binding_of_bytes(&tiny_gguf(1.0, "a")).unwrap());

    // A bundle built for `a` activates on `a` and is refused on `b`.
    let mut meta = common::meta("fp", "main", 1);
    meta.model = a.clone();
    let mut bb = amend_edits::BundleBuilder::new(meta);
    let p = bb.add_codebook(
        1,
        amend_edits::Site::FfnOutput,
        amend_edits::Site::FfnOutput,
        0,
        false,
        common::DIM,
        &common::ramp(common::DIM, 0.0),
        &common::ramp(common::DIM, 1.0),
        &[1.0],
    );
    bb.add_edit("e", 1, amend_edits::Site::FfnOutput, "p", "t", p, 0, 1);
    let bytes = bb.build_signed(&common::key(1)).unwrap();
    let clock = Arc::new(ManualClock::new(common::T0));
    let on_a = EditSet::with_clock(a, common::trust(), clock.clone());
    on_a.add(
        on_a.open_bytes(bytes.as_slice()).unwrap(),
        AddOptions::default(),
    )
    .unwrap();
    let on_b = EditSet::with_clock(b, common::trust(), clock);
    assert_eq!(
        on_b.add(
            on_b.open_bytes(bytes.as_slice()).unwrap(),
            AddOptions::default()
        ),
        Err(EditSetError::WrongModel)
    );
}

#[test]
fn hyperparameters_are_in_the_fingerprint() {
    let base = binding_of_bytes(&tiny_gguf(1.0, "a")).unwrap();
    // Same tensors and data, one hyperparameter llama.cpp reads changed.
    for (key, value) in [
        ("gemma3.attention.head_count_kv", 1u32),
        ("gemma3.attention.key_length", 8u32),
        ("gemma3.context_length", 1024u32),
    ] {
        let other = tiny_gguf_with(1.0, "a", |w| {
            w.add(key, value);
            if key.ends_with("key_length") {
                w.add("gemma3.attention.value_length", value);
            }
        });
        let b = binding_of_bytes(&other).unwrap();
        assert_ne!(base.fingerprint, b.fingerprint, "{key}");
    }
    // The forward constants (hashed since session 33): each changes what the model computes, so
    // each changes the fingerprint (before, these files shared one fingerprint and so one
    // bundle). `base` sets none of them, so its fingerprint is the one it had before.
    use amend_edits::gguf::{GgufArray, GgufValue};
    let mut seen = vec![base.fingerprint];
    for (key, value) in [
        ("gemma3.final_logit_softcapping", GgufValue::F32(30.0)),
        ("gemma3.attention.scale", GgufValue::F32(0.5)),
        ("gemma3.rope.freq_base_swa", GgufValue::F32(20000.0)),
        ("gemma3.rope.scaling.factor", GgufValue::F32(8.0)),
        ("gemma3.rope.scaling.type", GgufValue::String("none".into())),
        ("gemma3.attention.sliding_window", GgufValue::U32(512)),
        ("gemma3.attention.sliding_window_pattern", GgufValue::U32(4)),
        (
            "gemma3.attention.sliding_window_pattern",
            GgufValue::Array(GgufArray::Bool(vec![true, false])),
        ),
        (
            "gemma3.attention.sliding_window_pattern",
            GgufValue::Array(GgufArray::Bool(vec![true, true])),
        ),
    ] {
        let other = tiny_gguf_with(1.0, "a", |w| {
            w.add(key, value.clone());
        });
        let b = binding_of_bytes(&other).unwrap();
        assert!(!seen.contains(&b.fingerprint), "{key} = {value:?}");
        seen.push(b.fingerprint);
    }
    // A value llama.cpp would abort on is refused, naming the key.
    let bad = tiny_gguf_with(1.0, "a", |w| {
        w.add("gemma3.attention.layer_norm_rms_epsilon", f32::NAN);
    });
    let e = binding_of_bytes(&bad).unwrap_err().to_string();
    assert!(e.contains("gemma3.attention.layer_norm_rms_epsilon"), "{e}");
}

#[test]
fn cache_is_used_and_invalidated() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.gguf");
    std::fs::write(&model, tiny_gguf(1.0, "a")).unwrap();
    let first = model_binding(&model).unwrap();
    assert!(cache_path(&model).exists());
    assert_eq!(first, model_binding(&model).unwrap());
    // Replace the model (different length via the name): the stale cache must not be used.
    std::fs::write(&model, tiny_gguf(3.0, "bbbbbbbb")).unwrap();
    let second = model_binding(&model).unwrap();
    assert_ne!(first.fingerprint, second.fingerprint);
    assert_eq!(second, model_binding_uncached(&model).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn real_model_fingerprint() {
    let path = std::env::var("AMEND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("gemma3-270m-q4_k_m.gguf")
        });
    if !path.exists() {
        if std::env::var("AMEND_REQUIRE_MODEL").as_deref() == Ok("1") {
            panic!("model {} missing and AMEND_REQUIRE_MODEL=1", path.display());
        }
        eprintln!("skipped: model {} not found", path.display());
        return;
    }
    let t = std::time::Instant::now();
    let full = model_binding_uncached(&path).unwrap();
    let full_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = std::time::Instant::now();
    let cached = model_binding(&path).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "fingerprint: full {full_ms:.0} ms, via cache {ms:.1} ms: {:?} n_layer={} n_embd={}",
        full.arch, full.n_layer, full.n_embd
    );
    assert_eq!(full, cached);
    assert_eq!(full.arch, "gemma3");
    assert_eq!(full.n_embd, 640);
}

/// Issue 11: a byte changed in the tensor data with the mtime restored must not be served from
/// the cache (the ctime moves and cannot be set back).
#[test]
fn cache_sees_a_data_change_with_mtime_restored() {
    use std::io::{Seek, SeekFrom, Write};
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fp-mtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.gguf");
    let bytes = tiny_gguf(1.0, "a");
    std::fs::write(&model, &bytes).unwrap();
    // Let the model's ctime age past the racy window, then cache it.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let first = model_binding(&model).unwrap();
    let mtime = std::fs::metadata(&model).unwrap().modified().unwrap();
    assert_eq!(first, model_binding(&model).unwrap());
    // Flip a bit of the last byte (tensor data: 1.0 becomes 0.25, still finite), keep the
    // length, restore the mtime.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    f.seek(SeekFrom::Start(bytes.len() as u64 - 1)).unwrap();
    f.write_all(&[bytes[bytes.len() - 1] ^ 0x01]).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(
        std::fs::metadata(&model).unwrap().modified().unwrap(),
        mtime
    );
    let second = model_binding(&model).unwrap();
    assert_ne!(
        first.fingerprint, second.fingerprint,
        "stale cache entry was used"
    );
    assert_eq!(second, model_binding_uncached(&model).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}
