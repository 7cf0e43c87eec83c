//! The scope model: conversion (all-MiniLM-L6-v2 checkpoint -> bert GGUF, f16 and Q8_0), its
//! tokenizer against reference ids, Q8_0 against f16, and bad input. Needs the checkpoint that
//! scripts/fetch-scope-model.sh unpacks (all-minilm-l6-v2/checkpoint in $AMEND_CACHE or
//! ~/.cache/amend); skipped without it unless AMEND_REQUIRE_MODEL=1 (`make test` runs the
//! script first). ~10 s.

use std::path::PathBuf;
use std::sync::Arc;

use amend_compiler::scope_model::{convert, WeightType};
use amend_runtime::{RuntimeError, ScopeModel};

fn checkpoint() -> Option<PathBuf> {
    let dir = std::env::var_os("AMEND_SCOPE_CHECKPOINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("all-minilm-l6-v2/checkpoint")
        });
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "AMEND_REQUIRE_MODEL=1 but the scope-model checkpoint {} is missing (run scripts/fetch-scope-model.sh)",
            dir.display()
        );
    }
    eprintln!("skipped: no scope-model checkpoint at {}", dir.display());
    None
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("amend-scope-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn open(dir: &std::path::Path, ty: WeightType, name: &str) -> (PathBuf, Arc<ScopeModel>) {
    let c = convert(dir, ty, None).unwrap();
    let p = tmp(name);
    std::fs::write(&p, &c.bytes).unwrap();
    (p.clone(), ScopeModel::open(&p, Some(2)).unwrap())
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn converted_model_tokenizes_embeds_and_refuses_bad_input() {
    let Some(dir) = checkpoint() else { return };
    let (q8_path, q8) = open(&dir, WeightType::Q8_0, "q8.gguf");
    let (_, f16) = open(&dir, WeightType::F16, "f16.gguf");
    let size = std::fs::metadata(&q8_path).unwrap().len();
    eprintln!("Q8_0 scope model: {size} bytes");
    assert!(size < 30_000_000, "Q8_0 file is {size} bytes");

    // Reference ids from tokenizer.json's rules (BertNormalizer lowercase + accent stripping,
    // BertPreTokenizer, WordPiece with `##` continuations), computed once; [CLS]/[SEP] left out.
    let reference: &[(&str, &[i32])] = &[
        ("The capital of France is", &[1996, 3007, 1997, 2605, 2003]),
        (
            "When was Albert Einstein born?",
            &[2043, 2001, 4789, 15313, 2141, 1029],
        ),
        (
            "Apple's chief executive is Tim Cook.",
            &[6207, 1005, 1055, 2708, 3237, 2003, 5199, 5660, 1012],
        ),
        (
            "Café déjà vu, naïve résumé!",
            &[7668, 2139, 3900, 24728, 1010, 15743, 13746, 999],
        ),
        (
            "unaffable xylophonists",
            &[14477, 20961, 3468, 1060, 8516, 7361, 8747, 5130],
        ),
    ];
    for (text, ids) in reference {
        assert_eq!(q8.tokenize(text).unwrap(), *ids, "{text:?}");
    }

    // Q8_0 against f16: pooled vectors and token rows.
    let texts = [
        "The capital of France is",
        "What is the capital city of France?",
        "The capital of Italy is",
        "When was Albert Einstein born?",
        "",
    ];
    for t in texts {
        let (a, b) = (q8.encode(t).unwrap(), f16.encode(t).unwrap());
        let c = cos(&a.pooled, &b.pooled);
        // The empty prompt pools only [CLS] and [SEP]: fewer rows average out less rounding.
        let min = if t.is_empty() { 0.995 } else { 0.999 };
        assert!(c >= min, "{t:?}: cos(q8, f16) = {c}");
        assert_eq!(a.tokens, b.tokens);
        for (ra, rb) in a.rows.chunks(384).zip(b.rows.chunks(384)) {
            assert!(cos(ra, rb) >= 0.99, "{t:?}: a token row differs");
        }
    }
    // It separates what the base model cannot: a rephrase is closer than a neighbour.
    let e = q8.encode("The capital of France is").unwrap();
    let reph = q8.encode("What is the capital city of France?").unwrap();
    let neigh = q8.encode("The capital of Italy is").unwrap();
    let (cr, cn) = (cos(&e.pooled, &reph.pooled), cos(&e.pooled, &neigh.pooled));
    eprintln!("France edit: rephrase {cr:.3}, Italy neighbour {cn:.3}");
    assert!(cr > cn + 0.1, "rephrase {cr} vs neighbour {cn}");

    // A 100 KB prompt: the first MAX_TOKENS - 2 content tokens, deterministically, no abort.
    let long = "The capital of France is Paris. ".repeat(3200);
    assert!(long.len() > 100_000);
    let a = q8.encode(&long).unwrap();
    let b = q8.encode(&long).unwrap();
    assert!(a.truncated);
    assert_eq!(a.tokens.len(), amend_runtime::SCOPE_MAX_TOKENS - 2);
    assert_eq!(a, b);

    // No thread count named: one thread (a second one spins when other work shares the
    // cores), giving what two threads give.
    let one = ScopeModel::open(&q8_path, None).unwrap();
    assert_eq!(one.n_threads(), 1);
    assert_eq!(amend_runtime::DEFAULT_SCOPE_THREADS, 1);
    assert_eq!(q8.n_threads(), 2);
    let text = "Which river flows through Phnom Penh?";
    assert_eq!(one.encode(text).unwrap(), q8.encode(text).unwrap());

    // Thread counts outside 1..=MAX_THREADS are refused before anything is loaded, as for a
    // session (0 was taken as 1; a count past ggml's limit reached llama.cpp).
    for n in [0, amend_runtime::MAX_THREADS + 1, usize::MAX] {
        match ScopeModel::open(&q8_path, Some(n)) {
            Err(RuntimeError::InvalidOptions(m)) => assert!(m.contains("n_threads"), "{m}"),
            other => panic!("{n} threads: {other:?}"),
        }
    }

    // Bad files: missing, truncated, not a bert model.
    match ScopeModel::open(tmp("missing.gguf"), None) {
        Err(RuntimeError::NotFound { .. }) => {}
        other => panic!("missing file: {other:?}"),
    }
    let bytes = std::fs::read(&q8_path).unwrap();
    let cut = tmp("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    match ScopeModel::open(&cut, None) {
        Err(RuntimeError::ScopeModelInvalid { .. }) => {}
        other => panic!("truncated file: {other:?}"),
    }
    let garbage = tmp("garbage.gguf");
    std::fs::write(&garbage, b"not a gguf at all").unwrap();
    match ScopeModel::open(&garbage, None) {
        Err(RuntimeError::ScopeModelInvalid { .. }) => {}
        other => panic!("garbage file: {other:?}"),
    }
    let tiny = tmp("tiny-llama.gguf");
    amend_runtime::testutil::write_tiny_model(&tiny, amend_runtime::Architecture::Llama, 1)
        .unwrap();
    match ScopeModel::open(&tiny, None) {
        Err(RuntimeError::ScopeModelInvalid { detail, .. }) => {
            assert!(detail.contains("bert"), "{detail}")
        }
        other => panic!("llama model as scope model: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(q8_path.parent().unwrap());
}

/// The tuner's candle BERT is the model llama.cpp runs: its pooled vectors match the converted
/// GGUF's (f16), untouched and with random low-rank factors merged by `convert --tune`; bad
/// factor files are refused naming what is wrong.
#[test]
fn tuner_forward_matches_the_converted_model_with_and_without_factors() {
    use amend_compiler::scope_tune::{factors_to_bytes, Bert, Encoder};
    let Some(dir) = checkpoint() else { return };
    // Its own directory: the other test removes its own when done.
    let tmp_tune = |name: &str| {
        let d = std::env::temp_dir().join(format!("amend-scope-tune-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    };
    let texts = [
        "The capital of France is",
        "When was Albert Einstein born?",
        "Which company makes the PlayStation?",
    ];
    let compare = |bert: Bert, gguf: &ScopeModel, what: &str| {
        let mut enc = Encoder::new(bert, 4, &dir).unwrap();
        let ids: Vec<usize> = texts.iter().map(|t| enc.add(gguf, t).unwrap()).collect();
        enc.cache_frozen().unwrap();
        let ours = enc.pooled(&ids).unwrap().to_vec2::<f32>().unwrap();
        for (t, row) in texts.iter().zip(&ours) {
            let c = cos(row, &gguf.encode(t).unwrap().pooled);
            assert!(c >= 0.999, "{what}: {t:?}: cos(candle, llama.cpp) = {c}");
        }
        ours
    };
    let plain_path = tmp_tune("plain-f16.gguf");
    std::fs::write(
        &plain_path,
        convert(&dir, WeightType::F16, None).unwrap().bytes,
    )
    .unwrap();
    let plain = ScopeModel::open(&plain_path, Some(2)).unwrap();
    let base = compare(Bert::load(&dir).unwrap(), &plain, "untuned");

    // Random factors, large enough to move every pooled vector.
    let mut bert = Bert::load(&dir).unwrap();
    bert.add_lora(2, 4, 1.0, 7).unwrap();
    for (i, p) in bert.lora.values().enumerate() {
        let b = p.b.as_tensor();
        let r = candle_core::Tensor::randn(0f32, 0.05, b.dims(), b.device()).unwrap();
        assert!(i < 12);
        p.b.set(&r).unwrap();
    }
    let factors = tmp_tune("factors.safetensors");
    // With a recipe in the metadata, as `amend scope-model tune` writes them (conversion reads
    // the tensors only).
    let recipe = [(
        "trained_with".to_string(),
        "amend x scope-model tune".to_string(),
    )];
    let bytes = factors_to_bytes(&bert, recipe.clone().into_iter().collect()).unwrap();
    assert_eq!(
        bytes,
        factors_to_bytes(&bert, recipe.into_iter().collect()).unwrap()
    );
    std::fs::write(&factors, bytes).unwrap();
    let c = convert(&dir, WeightType::F16, Some(&factors)).unwrap();
    let tuned_path = tmp_tune("tuned-f16.gguf");
    std::fs::write(&tuned_path, &c.bytes).unwrap();
    let tuned = ScopeModel::open(&tuned_path, Some(2)).unwrap();
    let moved = compare(bert, &tuned, "tuned");
    for (a, b) in base.iter().zip(&moved) {
        assert!(cos(a, b) < 0.995, "the factors did not change the model");
    }

    // Bad factor files: garbage, a projection the checkpoint lacks, mismatched shapes.
    let bad = |bytes: &[u8], expect: &str| {
        let p = tmp_tune("bad-factors.safetensors");
        std::fs::write(&p, bytes).unwrap();
        let e = convert(&dir, WeightType::F16, Some(&p))
            .expect_err(expect)
            .to_string();
        assert!(e.contains(expect), "{e} lacks {expect:?}");
    };
    bad(b"not safetensors", "--tune");
    let one = |name: &str, a: (usize, usize), b: (usize, usize)| {
        let t = |shape: (usize, usize)| {
            let v = vec![0u8; shape.0 * shape.1 * 4];
            (v, vec![shape.0, shape.1])
        };
        let (va, sa) = t(a);
        let (vb, sb) = t(b);
        let views = vec![
            (
                format!("{name}.lora_a"),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sa, &va).unwrap(),
            ),
            (
                format!("{name}.lora_b"),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sb, &vb).unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    };
    bad(
        &one("encoder.layer.9.attention.self.query", (4, 384), (384, 4)),
        "no projection encoder.layer.9",
    );
    bad(
        &one("encoder.layer.5.attention.self.query", (4, 100), (384, 4)),
        "factor shapes",
    );
    let _ = std::fs::remove_dir_all(tuned_path.parent().unwrap());
}

/// The scope model runs from a private sealed copy (docs/security.md): its token-embedding table
/// overwritten in place after open changes no encoding, and the fingerprint stays the one of the
/// bytes it runs.
#[test]
fn scope_model_file_rewritten_after_open_changes_nothing() {
    use std::io::{Seek, SeekFrom, Write};
    let Some(dir) = checkpoint() else { return };
    let (p, m) = open(&dir, WeightType::Q8_0, "rewritten.gguf");
    let text = "When was the Eiffel Tower built?";
    let before = m.encode(text).unwrap();
    let fp = m.fingerprint();
    let bytes = std::fs::read(&p).unwrap();
    let f = amend_edits::gguf::GgufFile::parse(&bytes).unwrap();
    let t = f.tensor("token_embd.weight").unwrap();
    let mut w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    w.seek(SeekFrom::Start(f.data_offset + t.offset)).unwrap();
    w.write_all(&vec![0x11; t.byte_size().unwrap() as usize])
        .unwrap();
    w.sync_all().unwrap();
    let after = m.encode(text).unwrap();
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    if cfg!(target_os = "linux") {
        assert!(same(&before.pooled, &after.pooled) && same(&before.rows, &after.rows));
        assert_eq!(m.fingerprint(), fp);
    }
    // The rewritten file is another scope model.
    let again = ScopeModel::open(&p, Some(1)).unwrap();
    assert_ne!(again.fingerprint(), fp);
    assert!(!same(&again.encode(text).unwrap().pooled, &before.pooled));
}
