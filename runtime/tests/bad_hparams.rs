//! Hyperparameters llama.cpp would abort on (GGML_ASSERT, not an error) or misread: each is a
//! specific error from `Model::open` naming the GGUF key, never a crash of the test process.
mod common;

use std::path::PathBuf;

use amend_edits::gguf::{GgmlType, GgufArray, GgufValue};
use amend_runtime::{Model, ModelOptions, RuntimeError};
use common::tiny_variant as variant;

fn set(key: &str, value: impl Into<GgufValue>) -> PathBuf {
    let value = value.into();
    // One file per key and value: tests that set the same key run in parallel.
    let tag = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{value:?}").hash(&mut h);
        format!("{}-{:016x}", key.replace('.', "_"), h.finish())
    };
    variant(&tag, |meta, _| {
        match meta.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => meta.push((key.to_string(), value)),
        }
    })
}

/// The tiny model with `key` set to `value` is refused, naming `key`; returns the message.
fn bad(key: &str, value: impl Into<GgufValue>) -> String {
    refused(&set(key, value), key)
}

/// Opening `p` fails with `InvalidHparams` for `key`; returns the message.
fn refused(p: &std::path::Path, key: &str) -> String {
    let err = Model::open(p, ModelOptions::default()).unwrap_err();
    match &err {
        RuntimeError::InvalidHparams { source, .. } => {
            assert_eq!(source.key, key, "{err}")
        }
        other => panic!("expected InvalidHparams for {key}, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(key), "{msg}");
    msg
}

#[test]
fn layer_counts() {
    // llama.cpp: GGML_ASSERT(n_layer > 0 && n_layer <= LLAMA_MAX_LAYERS).
    bad("llama.block_count", 0u32);
    bad("llama.block_count", 100_000u32);
    bad("llama.block_count", -1i32);
    // More layers than tensors: the first missing tensor is named.
    refused(&set("llama.block_count", 3u32), "blk.2.attn_norm.weight");
    // Fewer: a tensor past the last layer.
    let msg = refused(&set("llama.block_count", 1u32), "blk.1.attn_norm.weight");
    assert!(msg.contains("block_count is 1"), "{msg}");
}

#[test]
fn widths_and_heads() {
    bad("llama.embedding_length", 0u32);
    bad("llama.embedding_length", 1u32 << 20);
    // Consistent-looking but not the tensors' width.
    let msg = refused(&set("llama.embedding_length", 32u32), "token_embd.weight");
    assert!(msg.contains("expected [32,"), "{msg}");
    bad("llama.feed_forward_length", 0u32);
    bad("llama.attention.head_count", 0u32);
    // 64 % 6 != 0 and no explicit head size (6 % 2 KV heads is fine).
    let msg = bad("llama.attention.head_count", 6u32);
    assert!(msg.contains("does not divide"), "{msg}");
    bad("llama.attention.head_count", vec![4u32]);
    bad("llama.attention.head_count_kv", 0u32);
    let msg = bad("llama.attention.head_count_kv", 3u32);
    assert!(msg.contains("does not divide the 4 query heads"), "{msg}");
    refused(
        &set("llama.attention.head_count_kv", 4u32),
        "blk.0.attn_k.weight",
    );
    bad("llama.attention.key_length", 0u32);
    bad("llama.attention.key_length", 1u32 << 20);
    // Key length 32 against the derived value length 16: the graph asserts they are equal.
    refused(
        &set("llama.attention.key_length", 32u32),
        "llama.attention.value_length",
    );
    bad("llama.rope.dimension_count", 8u32);
}

#[test]
fn floats() {
    let eps = "llama.attention.layer_norm_rms_epsilon";
    // NaN reached a GGML_ASSERT at the first decode.
    bad(eps, f32::NAN);
    bad(eps, f32::INFINITY);
    bad(eps, -1e-5f32);
    bad(eps, "tiny");
    bad("llama.rope.freq_base", f32::NAN);
    bad("llama.rope.freq_base", 0.0f32);
    bad("llama.rope.scaling.factor", -2.0f32);
    bad("llama.attention.scale", f64::NAN);
}

/// llama.cpp reads each integer hyperparameter as a u32 and each float as an f32, refusing any
/// other type; so does the one parser (before, it converted, and the ONNX Runtime backend ran
/// files llama.cpp refused). Per-layer values may be arrays of u32 or i32, as in llama.cpp.
#[test]
fn metadata_types_are_llama_cpps() {
    // Files of their own (other tests set the same keys, in parallel).
    let n = std::cell::Cell::new(0);
    let with = |key: &str, value: GgufValue| {
        n.set(n.get() + 1);
        variant(&format!("types-{}", n.get()), |meta, _| {
            match meta.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = value,
                None => meta.push((key.to_string(), value)),
            }
        })
    };
    let bad = |key: &str, value: GgufValue| refused(&with(key, value), key);
    let msg = bad("llama.context_length", GgufValue::U64(512));
    assert!(msg.contains("must be a u32, got the u64 512"), "{msg}");
    bad("llama.block_count", GgufValue::U16(2));
    bad("llama.attention.head_count", GgufValue::I32(4));
    let msg = bad("llama.rope.freq_base", GgufValue::F64(10000.0));
    assert!(msg.contains("must be an f32"), "{msg}");
    bad(
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F64(1e-5),
    );
    bad("llama.attention.scale", GgufValue::U32(1));
    bad("llama.attention.sliding_window", GgufValue::U64(1 << 40));
    bad("llama.rope.scaling.type", GgufValue::U32(1));
    let msg = bad("tokenizer.ggml.bos_token_id", GgufValue::U64(1));
    assert!(msg.contains("is not a u32 token id"), "{msg}");
    bad(
        "llama.attention.head_count",
        GgufValue::Array(GgufArray::U64(vec![4, 4])),
    );
    // The tiny model's own head count as per-layer arrays of i32 and u32 still opens.
    for heads in [GgufArray::I32(vec![4, 4]), GgufArray::U32(vec![4, 4])] {
        let p = with("llama.attention.head_count", GgufValue::Array(heads));
        Model::open(p, ModelOptions::default()).unwrap();
    }
}

#[test]
fn context_and_vocabulary() {
    bad("llama.context_length", 0u32);
    bad("llama.context_length", u32::MAX);
    let n_vocab = amend_runtime::testutil::tiny_vocab().0.len() as u32;
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.eot_token_id",
    ] {
        let msg = bad(key, n_vocab);
        assert!(msg.contains("below the vocabulary size"), "{msg}");
    }
    bad("tokenizer.ggml.bos_token_id", -1i32);
    bad("tokenizer.ggml.model", "none");
    refused(
        &set("tokenizer.ggml.scores", vec![0.0f32; 3]),
        "tokenizer.ggml.scores",
    );
    bad("tokenizer.ggml.tokens", vec![1u32, 2]);
    let p = variant("no-tokens", |meta, _| {
        meta.retain(|(k, _)| k != "tokenizer.ggml.tokens")
    });
    refused(&p, "tokenizer.ggml.tokens");
}

#[test]
fn missing_and_misshapen_tensors() {
    let p = variant("no-ffn-down", |_, t| {
        t.retain(|t| t.name != "blk.1.ffn_down.weight")
    });
    refused(&p, "blk.1.ffn_down.weight");
    let p = variant("short-q", |_, t| {
        let q = t
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        q.ne = vec![64, 32];
        q.data.truncate(64 * 32 * 4);
    });
    let msg = refused(&p, "blk.0.attn_q.weight");
    assert!(msg.contains("[64, 32]"), "{msg}");
    // The unmodified copy still loads: the check refuses only what is wrong.
    let ok = variant("unchanged", |_, _| {});
    Model::open(&ok, ModelOptions::default()).unwrap();
}

fn tokens(meta: &mut [(String, GgufValue)]) -> &mut Vec<String> {
    match meta.iter_mut().find(|(k, _)| k == "tokenizer.ggml.tokens") {
        Some((_, GgufValue::Array(GgufArray::String(t)))) => t,
        _ => panic!("the tiny model has a token list"),
    }
}

/// Vocabularies and tensor types that pass the structure checks but that llama.cpp aborts the
/// process on (found by tests/hostile_models.rs), each refused naming the key or tensor.
#[test]
fn vocabularies_and_tensor_types() {
    // GGML_ASSERT(id_to_token.size() == token_to_id.size()) in the vocabulary load.
    let p = variant("dup-token", |m, _| {
        let t = tokens(m);
        t[280] = t[281].clone();
    });
    assert!(refused(&p, "tokenizer.ggml.tokens").contains("more than once"));
    // A SentencePiece vocabulary without a byte token loads; a prompt that needs the byte makes
    // llama.cpp's byte fallback throw std::out_of_range, which the C++ shim turns into an error
    // for that prompt (it aborted the process before); other prompts tokenize.
    let p = variant("no-byte-token", |m, _| {
        let t = tokens(m);
        let i = t.iter().position(|x| x == "<0xC3>").unwrap();
        t[i] = "<byteC3>".into();
    });
    let m = Model::open(&p, ModelOptions::default()).unwrap();
    let e = m.tokenize("the cat é", false).unwrap_err();
    assert!(
        matches!(
            e,
            RuntimeError::CppException {
                call: "llama_tokenize",
                ..
            }
        ),
        "{e}"
    );
    assert!(!m.tokenize("the cat", false).unwrap().is_empty());
    // GGML_ABORT rendering a byte token of a WordPiece vocabulary at load.
    let p = set("tokenizer.ggml.model", "bert");
    assert!(refused(&p, "tokenizer.ggml.token_type").contains("byte token"));
    // A tokenizer amend does not run.
    assert!(bad("tokenizer.ggml.model", "rwkv").contains("llama, gpt2, bert"));
    // ggml's binary ops abort on an f32 x f16 multiply (a norm) at the first decode.
    let p = variant("f16-norm", |_, ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blk.1.ffn_norm.weight")
            .unwrap();
        t.ty = GgmlType::F16;
        t.data.truncate(t.data.len() / 2);
    });
    assert!(refused(&p, "blk.1.ffn_norm.weight").contains("must be F32"));
    // No dot product for an I32 matrix: a segfault in the matmul.
    let p = variant("i32-matrix", |_, ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_v.weight")
            .unwrap();
        t.ty = GgmlType(26);
    });
    assert!(refused(&p, "blk.0.attn_v.weight").contains("not a weight type"));
}

/// Keys the llama.cpp code the tiny models load reads without amend's parser knowing them
/// until session 33: each of the first group aborted the test process (GGML_ASSERT in
/// `load_hparams`); llama.cpp follows the others where the ONNX graph and the compiler's
/// forward would not (a non-causal decoder, sliding-window heads of another size, a RoPE
/// attention factor). Each is now refused by the one parser, naming the key, on every backend.
#[test]
fn keys_llama_cpp_asserts_on_or_alone_follows() {
    use GgufValue::{Bool, String as S, F32, U32};
    let aborted = [
        (
            "llama.rope.scaling.type",
            S("foo".into()),
            "none, linear, yarn, longrope",
        ),
        ("llama.expert_used_count", U32(2), "mixture-of-experts"),
        ("llama.expert_count", U32(600), "mixture-of-experts"),
        ("llama.expert_count", U32(4), "mixture-of-experts"),
        ("llama.expert_group_count", U32(1), "mixture-of-experts"),
        (
            "llama.nextn_predict_layers",
            U32(100),
            "multi-token-prediction",
        ),
    ];
    let diverged = [
        (
            "llama.nextn_predict_layers",
            U32(1),
            "multi-token-prediction",
        ),
        ("llama.attention.causal", Bool(false), "attend causally"),
        ("llama.attention.causal", U32(1), "attend causally"),
        (
            "llama.attention.key_length_swa",
            U32(7),
            "differs from the full-attention layers' 16",
        ),
        (
            "llama.attention.value_length_swa",
            U32(7),
            "differs from the full-attention layers' 16",
        ),
        (
            "llama.rope.dimension_count_swa",
            U32(1000),
            "differs from the full-attention layers' 16",
        ),
        (
            "llama.rope.scaling.attn_factor",
            F32(0.0),
            "attention factor other than 1",
        ),
        (
            "llama.attention.sliding_window_pattern",
            GgufValue::Array(GgufArray::Bool(vec![true; 600])),
            "llama.cpp takes at most 512",
        ),
        // Read by llama.cpp's loader in a strict type, by no forward: the type is checked.
        ("llama.embedding_length_out", F32(4.0), "must be a u32"),
        ("llama.pooling_type", Bool(false), "must be a u32"),
        (
            "llama.rope.scaling.original_context_length",
            S("x".into()),
            "must be a u32",
        ),
        ("llama.vocab_size", F32(4.0), "must be a u32"),
        ("llama.rope.scaling.alpha", U32(2), "must be an f32"),
        ("llama.rope.scaling.finetuned", U32(0), "must be a bool"),
    ];
    for (key, value, why) in aborted.into_iter().chain(diverged) {
        let msg = bad(key, value);
        assert!(msg.contains(why), "{msg}");
    }
    // What real dense models carry passes: zero counts, a causal flag, equal head sizes.
    for (key, value) in [
        ("llama.expert_count", U32(0)),
        ("llama.expert_used_count", U32(0)),
        ("llama.nextn_predict_layers", U32(0)),
        ("llama.attention.causal", Bool(true)),
        ("llama.attention.key_length_swa", U32(16)),
        ("llama.rope.scaling.attn_factor", F32(1.0)),
        ("llama.rope.scaling.type", S("yarn".into())),
    ] {
        let p = set(key, value);
        Model::open(&p, ModelOptions::default()).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
}
