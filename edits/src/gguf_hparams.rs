//! A model's hyperparameters read from its GGUF metadata and checked before llama.cpp sees them.
//!
//! llama.cpp asserts (aborts the process) on some values rather than returning an error: a
//! `block_count` of 0 or above 512 at load, a NaN `layer_norm_rms_epsilon` at the first decode, a
//! key length that differs from the value length or the RoPE width in the graph builders.
//! [`ModelHparams::from_header`] refuses every such value with an error naming the key, so a
//! hostile or broken model file is an error, never an abort. The validated values are also what
//! the model fingerprint hashes ([`ModelHparams::hash_bytes`]).
//!
//! Limits are far above any real model; they exist so that absurd values cannot drive huge
//! allocations inside llama.cpp.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::{GgmlType, GgufArray, GgufHeader, GgufValue};

/// llama.cpp's `LLAMA_MAX_LAYERS`: more layers is a GGML_ASSERT at load.
pub const MAX_LAYERS: u64 = 512;
/// Widest residual stream accepted (the largest released models use 16,384).
pub const MAX_EMBD: u64 = 1 << 16;
/// Widest FFN accepted.
pub const MAX_FF: u64 = 1 << 20;
/// Most attention heads per layer.
pub const MAX_HEADS: u64 = 4096;
/// Largest key/value head size.
pub const MAX_HEAD_DIM: u64 = 4096;
/// Longest training context accepted (16M positions).
pub const MAX_CTX: u64 = 1 << 24;
/// Largest vocabulary accepted (token ids are i32 in llama.cpp).
pub const MAX_VOCAB: u64 = 1 << 24;

/// A hyperparameter that llama.cpp must not see: the GGUF key and why its value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GGUF key `{key}`: {reason}")]
pub struct HparamError {
    pub key: String,
    pub reason: String,
}

fn err<T>(key: &str, reason: String) -> Result<T, HparamError> {
    Err(HparamError {
        key: key.to_string(),
        reason,
    })
}

/// The validated hyperparameters of a transformer model (per-layer values repeated when the
/// file gives a scalar).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelHparams {
    /// `general.architecture`.
    pub arch: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_ctx_train: u32,
    /// Per layer.
    pub n_ff: Vec<u32>,
    /// Per layer.
    pub n_head: Vec<u32>,
    /// Per layer; divides `n_head` of the same layer.
    pub n_head_kv: Vec<u32>,
    pub head_dim_k: u32,
    pub head_dim_v: u32,
    /// RoPE width (= `head_dim_k`; the supported graphs assert it).
    pub n_rot: u32,
    pub rms_eps: Option<f32>,
    pub norm_eps: Option<f32>,
    pub rope_freq_base: Option<f32>,
    /// `rope.freq_base_swa`: the RoPE base of sliding-window layers.
    pub rope_freq_base_swa: Option<f32>,
    /// `rope.scaling.type`, one of [`ROPE_SCALING_TYPES`] (llama.cpp takes "linear" when the key
    /// is absent).
    pub rope_scaling: Option<String>,
    /// `rope.scaling.factor`, else the older `rope.scale_linear`, as llama.cpp reads them (0 or
    /// absent: no scaling).
    pub rope_scaling_factor: Option<f32>,
    pub final_logit_softcapping: Option<f32>,
    pub attention_scale: Option<f32>,
    /// `attention.sliding_window` (0: none).
    pub sliding_window: Option<u32>,
    pub sliding_window_pattern: Option<SwaPattern>,
    pub n_vocab: u32,
    /// Every `tokenizer.ggml.*_token_id` key, in file order, each below `n_vocab`.
    pub special_tokens: Vec<(String, u32)>,
}

/// llama.cpp's RoPE scaling names; any other string is a `GGML_ASSERT` in its load.
pub const ROPE_SCALING_TYPES: &[&str] = &["none", "linear", "yarn", "longrope"];

/// Which layers use the sliding window (`attention.sliding_window_pattern`), in the two forms
/// llama.cpp reads.
#[derive(Debug, Clone, PartialEq)]
pub enum SwaPattern {
    /// Every `p`-th layer attends fully, the others use the window (0: every layer does).
    Period(u32),
    /// One entry per layer from the start, non-zero for a sliding-window layer; layers past the
    /// end attend fully (llama.cpp's zero-filled array).
    Layers(Vec<bool>),
}

impl SwaPattern {
    /// Per layer, whether it uses the sliding window, as llama.cpp's `set_swa_pattern` (dense
    /// layer last in each period) or its array read decides; `None` is the architecture's
    /// default period.
    pub fn layers(pattern: Option<&SwaPattern>, n_layer: usize, default_period: u32) -> Vec<bool> {
        match pattern {
            Some(SwaPattern::Layers(v)) => {
                (0..n_layer).map(|il| v.get(il) == Some(&true)).collect()
            }
            Some(SwaPattern::Period(p)) => period(*p, n_layer),
            None => period(default_period, n_layer),
        }
    }
}

fn period(p: u32, n_layer: usize) -> Vec<bool> {
    (0..n_layer as u32)
        .map(|il| p == 0 || il % p < p - 1)
        .collect()
}

/// The `tokenizer.ggml.model` values accepted: SentencePiece (gemma3, llama 2), byte-level BPE
/// (llama 3, qwen2, qwen3) and WordPiece (the `bert` scope model). llama.cpp knows others, but
/// the architectures amend runs use these, and each one's failure modes are checked below.
pub const TOKENIZERS: &[&str] = &["llama", "gpt2", "bert"];

/// llama.cpp's `LLAMA_TOKEN_TYPE_BYTE`.
const TOKEN_TYPE_BYTE: i64 = 6;

/// What llama.cpp's vocabulary load assumes of the token list, where breaking it aborts the
/// process instead of failing the load:
/// - every token text is unique (`GGML_ASSERT(id_to_token.size() == token_to_id.size())`);
/// - a WordPiece vocabulary has no byte-typed tokens (rendering one is `GGML_ABORT`).
///
/// (A SentencePiece vocabulary without a `<0xXX>` byte token throws `std::out_of_range` from
/// its byte fallback while tokenizing a prompt that needs the byte: the runtime's C++ shim turns
/// that into an error for that prompt, so such a vocabulary is not refused here.)
fn check_vocabulary(h: &GgufHeader, tokenizer: &str, tokens: &[String]) -> Result<(), HparamError> {
    const TOKENS: &str = "tokenizer.ggml.tokens";
    let mut sorted: Vec<&str> = tokens.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return err(
            TOKENS,
            format!(
                "the token {:?} appears more than once (llama.cpp asserts every token is unique)",
                w[0]
            ),
        );
    }
    if tokenizer == "bert" {
        const TYPES: &str = "tokenizer.ggml.token_type";
        if let Some(types) = h
            .get(TYPES)
            .and_then(GgufValue::as_array)
            .and_then(array_ints_signed)
        {
            if let Some(i) = types.iter().position(|&t| t == TOKEN_TYPE_BYTE) {
                return err(
                    TYPES,
                    format!("token {i} is a byte token, which a WordPiece vocabulary cannot render (llama.cpp aborts)"),
                );
            }
        }
    }
    Ok(())
}

/// The values of an integer array as i64 (token types are i32 in llama.cpp's files).
fn array_ints_signed(a: &GgufArray) -> Option<Vec<i64>> {
    Some(match a {
        GgufArray::I32(v) => v.iter().map(|&x| x as i64).collect(),
        GgufArray::U32(v) => v.iter().map(|&x| x as i64).collect(),
        GgufArray::I8(v) => v.iter().map(|&x| x as i64).collect(),
        GgufArray::U8(v) => v.iter().map(|&x| x as i64).collect(),
        GgufArray::I16(v) => v.iter().map(|&x| x as i64).collect(),
        GgufArray::U16(v) => v.iter().map(|&x| x as i64).collect(),
        GgufArray::I64(v) => v.clone(),
        _ => return None,
    })
}

/// An integer key, `None` when absent. llama.cpp reads each integer hyperparameter as a u32 and
/// refuses any other type at load, so a u32 is all that is taken here: a reader that converted
/// would let the ONNX Runtime backend run files llama.cpp refuses.
fn int(h: &GgufHeader, key: &str) -> Result<Option<u64>, HparamError> {
    match h.get(key) {
        None => Ok(None),
        Some(GgufValue::U32(x)) => Ok(Some(*x as u64)),
        Some(v) => err(key, format!("must be a u32, got {}", show(v))),
    }
}

/// A float key, `None` when absent: an f32, the one type llama.cpp reads floats as.
fn float(h: &GgufHeader, key: &str) -> Result<Option<f32>, HparamError> {
    match h.get(key) {
        None => Ok(None),
        Some(GgufValue::F32(x)) => Ok(Some(*x)),
        Some(v) => err(key, format!("must be an f32, got {}", show(v))),
    }
}

fn int_in(h: &GgufHeader, key: &str, lo: u64, hi: u64) -> Result<Option<u32>, HparamError> {
    match int(h, key)? {
        None => Ok(None),
        Some(x) if (lo..=hi).contains(&x) => Ok(Some(x as u32)),
        Some(x) => err(key, format!("{x} is outside {lo}..={hi}")),
    }
}

fn required<T>(key: &str, v: Option<T>) -> Result<T, HparamError> {
    v.ok_or_else(|| HparamError {
        key: key.to_string(),
        reason: "is missing".to_string(),
    })
}

/// A key that is either one integer for every layer or an array with one per layer.
fn per_layer(
    h: &GgufHeader,
    key: &str,
    n_layer: u32,
    lo: u64,
    hi: u64,
) -> Result<Option<Vec<u32>>, HparamError> {
    let Some(v) = h.get(key) else {
        return Ok(None);
    };
    let vals: Vec<u64> = match v {
        // llama.cpp takes an array of u32 or i32 for a per-layer value, and nothing else.
        GgufValue::Array(a @ (GgufArray::U32(_) | GgufArray::I32(_))) => {
            let vals = array_ints(a).ok_or_else(|| HparamError {
                key: key.to_string(),
                reason: "has a negative entry".to_string(),
            })?;
            if vals.len() != n_layer as usize {
                return err(
                    key,
                    format!("has {} entries, the model has {n_layer} layers", vals.len()),
                );
            }
            vals
        }
        GgufValue::U32(x) => alloc::vec![*x as u64; n_layer as usize],
        other => {
            return err(
                key,
                format!(
                    "must be a u32 or an array of u32 or i32, got {}",
                    show(other)
                ),
            )
        }
    };
    for (il, &x) in vals.iter().enumerate() {
        if !(lo..=hi).contains(&x) {
            return err(key, format!("{x} (layer {il}) is outside {lo}..={hi}"));
        }
    }
    Ok(Some(vals.into_iter().map(|x| x as u32).collect()))
}

/// A per-layer array's values: the u32 or i32 arrays llama.cpp takes (`None` for another type,
/// or a negative entry).
fn array_ints(a: &GgufArray) -> Option<Vec<u64>> {
    match a {
        GgufArray::U32(v) => Some(v.iter().map(|&x| x.into()).collect()),
        GgufArray::I32(v) => v.iter().map(|&x| u64::try_from(x).ok()).collect(),
        _ => None,
    }
}

fn show(v: &GgufValue) -> String {
    match v {
        GgufValue::String(s) => format!("the string {s:?}"),
        GgufValue::Array(a) => format!("an array of {}", a.len()),
        // The value with its GGUF type, as a user reads it (`the u32 999999999`).
        GgufValue::U8(x) => format!("the u8 {x}"),
        GgufValue::I8(x) => format!("the i8 {x}"),
        GgufValue::U16(x) => format!("the u16 {x}"),
        GgufValue::I16(x) => format!("the i16 {x}"),
        GgufValue::U32(x) => format!("the u32 {x}"),
        GgufValue::I32(x) => format!("the i32 {x}"),
        GgufValue::U64(x) => format!("the u64 {x}"),
        GgufValue::I64(x) => format!("the i64 {x}"),
        GgufValue::F32(x) => format!("the f32 {x}"),
        GgufValue::F64(x) => format!("the f64 {x}"),
        GgufValue::Bool(x) => format!("the bool {x}"),
    }
}

/// An epsilon: finite and in [0, 1].
fn epsilon(h: &GgufHeader, key: &str) -> Result<Option<f32>, HparamError> {
    match float(h, key)? {
        None => Ok(None),
        Some(x) if x.is_finite() && (0.0..=1.0).contains(&x) => Ok(Some(x)),
        Some(x) => err(key, format!("{x} is not a finite epsilon in [0, 1]")),
    }
}

impl ModelHparams {
    /// Reads and checks the hyperparameters llama.cpp builds the graph from. Errors name the key.
    pub fn from_header(h: &GgufHeader) -> Result<ModelHparams, HparamError> {
        const ARCH: &str = "general.architecture";
        let arch = match h.get(ARCH) {
            Some(GgufValue::String(s)) if !s.is_empty() => s.clone(),
            Some(v) => return err(ARCH, format!("must be a non-empty string, got {}", show(v))),
            None => return err(ARCH, "is missing".to_string()),
        };
        let k = |s: &str| format!("{arch}.{s}");

        let n_layer = required(
            &k("block_count"),
            int_in(h, &k("block_count"), 1, MAX_LAYERS)?,
        )?;
        let n_embd = required(
            &k("embedding_length"),
            int_in(h, &k("embedding_length"), 1, MAX_EMBD)?,
        )?;
        let n_ctx_train = required(
            &k("context_length"),
            int_in(h, &k("context_length"), 1, MAX_CTX)?,
        )?;
        let n_ff = per_layer(h, &k("feed_forward_length"), n_layer, 1, MAX_FF)?
            .unwrap_or_else(|| alloc::vec![0; n_layer as usize]);
        let key_head = k("attention.head_count");
        let n_head = required(&key_head, per_layer(h, &key_head, n_layer, 1, MAX_HEADS)?)?;
        let key_kv = k("attention.head_count_kv");
        let n_head_kv = per_layer(h, &key_kv, n_layer, 1, MAX_HEADS)?.unwrap_or(n_head.clone());
        for (il, (&q, &kv)) in n_head.iter().zip(&n_head_kv).enumerate() {
            if q % kv != 0 {
                return err(
                    &key_kv,
                    format!("{kv} (layer {il}) does not divide the {q} query heads"),
                );
            }
        }
        // Without explicit head sizes llama.cpp divides the width by the head count.
        let derived = || -> Result<u32, HparamError> {
            let h0 = n_head[0];
            if n_embd % h0 != 0 {
                return err(
                    &key_head,
                    format!("{h0} does not divide embedding_length {n_embd}"),
                );
            }
            Ok(n_embd / h0)
        };
        let key_k = k("attention.key_length");
        let head_dim_k = match int_in(h, &key_k, 1, MAX_HEAD_DIM)? {
            Some(d) => d,
            None => derived()?,
        };
        let key_v = k("attention.value_length");
        let head_dim_v = match int_in(h, &key_v, 1, MAX_HEAD_DIM)? {
            Some(d) => d,
            None => derived()?,
        };
        if head_dim_v != head_dim_k {
            return err(
                &key_v,
                format!("{head_dim_v} differs from the key length {head_dim_k} (the supported graphs need equal head sizes)"),
            );
        }
        let key_rot = k("rope.dimension_count");
        let n_rot = int_in(h, &key_rot, 0, MAX_HEAD_DIM)?.unwrap_or(head_dim_k);
        if n_rot != head_dim_k {
            return err(
                &key_rot,
                format!("{n_rot} differs from the head size {head_dim_k} (partial RoPE is not supported)"),
            );
        }
        let rms_eps = epsilon(h, &k("attention.layer_norm_rms_epsilon"))?;
        let norm_eps = epsilon(h, &k("attention.layer_norm_epsilon"))?;
        // Every float of the architecture's section must be finite (RoPE bases and factors,
        // soft-capping, attention scales feed the graph unchecked).
        let prefix = format!("{arch}.");
        for (key, v) in &h.metadata {
            if !key.starts_with(&prefix) {
                continue;
            }
            let finite = match v {
                GgufValue::F32(x) => x.is_finite(),
                GgufValue::F64(x) => x.is_finite(),
                GgufValue::Array(GgufArray::F32(a)) => a.iter().all(|x| x.is_finite()),
                GgufValue::Array(GgufArray::F64(a)) => a.iter().all(|x| x.is_finite()),
                _ => true,
            };
            if !finite {
                return err(key, "must be finite (NaN or infinity)".to_string());
            }
        }
        let key_base = k("rope.freq_base");
        let rope_freq_base = match float(h, &key_base)? {
            Some(x) if x <= 0.0 => return err(&key_base, format!("must be > 0, got {x}")),
            x => x,
        };
        // llama.cpp reads the older `rope.scale_linear` when `rope.scaling.factor` is absent.
        let (key_factor, key_linear) = (k("rope.scaling.factor"), k("rope.scale_linear"));
        let (factor, linear) = (float(h, &key_factor)?, float(h, &key_linear)?);
        for (key, x) in [(&key_factor, factor), (&key_linear, linear)] {
            if let Some(x) = x.filter(|&x| x < 0.0) {
                return err(key, format!("must be >= 0, got {x}"));
            }
        }
        let rope_scaling_factor = factor.or(linear);
        // The other keys either backend reads, in the type llama.cpp reads them as (checked
        // whether or not this architecture's llama.cpp code reads them, so that both backends
        // refuse the same files).
        let rope_freq_base_swa = float(h, &k("rope.freq_base_swa"))?;
        let final_logit_softcapping = float(h, &k("final_logit_softcapping"))?;
        let attention_scale = float(h, &k("attention.scale"))?;
        let sliding_window = int(h, &k("attention.sliding_window"))?.map(|w| w as u32);
        let key_swa = k("attention.sliding_window_pattern");
        let sliding_window_pattern = match h.get(&key_swa) {
            None => None,
            Some(GgufValue::U32(p)) => Some(SwaPattern::Period(*p)),
            // llama.cpp copies the array into its per-layer table: non-zero is a sliding-window
            // layer, and more entries than it has layers is a load error.
            Some(GgufValue::Array(GgufArray::Bool(v))) => Some(SwaPattern::Layers(v.clone())),
            Some(GgufValue::Array(GgufArray::U32(v))) => {
                Some(SwaPattern::Layers(v.iter().map(|&x| x != 0).collect()))
            }
            Some(GgufValue::Array(GgufArray::I32(v))) => {
                Some(SwaPattern::Layers(v.iter().map(|&x| x != 0).collect()))
            }
            Some(v) => {
                return err(
                    &key_swa,
                    format!(
                        "must be a u32 or an array of bool, u32 or i32, got {}",
                        show(v)
                    ),
                )
            }
        };
        if let Some(SwaPattern::Layers(v)) = &sliding_window_pattern {
            if v.len() as u64 > MAX_LAYERS {
                return err(
                    &key_swa,
                    format!(
                        "has {} entries, llama.cpp takes at most {MAX_LAYERS}",
                        v.len()
                    ),
                );
            }
        }
        let key_scaling = k("rope.scaling.type");
        let rope_scaling = match h.get(&key_scaling) {
            None => None,
            // Another name is a GGML_ASSERT in llama.cpp's load (a process abort).
            Some(GgufValue::String(t)) if ROPE_SCALING_TYPES.contains(&t.as_str()) => {
                Some(t.clone())
            }
            Some(v) => {
                return err(
                    &key_scaling,
                    format!(
                        "must be one of llama.cpp's RoPE scaling types ({}), got {}",
                        ROPE_SCALING_TYPES.join(", "),
                        show(v)
                    ),
                )
            }
        };
        // Keys that llama.cpp asserts on (a process abort, not a load error) or follows where
        // the ONNX graph would not: mixture-of-experts counts, multi-token-prediction layers,
        // non-causal attention in a decoder, sliding-window layers of another head size.
        for (key, what) in [
            ("expert_count", "mixture-of-experts models"),
            ("expert_used_count", "mixture-of-experts models"),
            ("expert_group_count", "mixture-of-experts models"),
            ("expert_group_used_count", "mixture-of-experts models"),
            ("nextn_predict_layers", "multi-token-prediction layers"),
        ] {
            if let Some(v) = h.get(&k(key)).filter(|v| !matches!(v, GgufValue::U32(0))) {
                return err(&k(key), format!("{}: {what} are not supported", show(v)));
            }
        }
        let key_causal = k("attention.causal");
        match h.get(&key_causal) {
            None | Some(GgufValue::Bool(true)) => {}
            Some(GgufValue::Bool(false)) if arch == "bert" => {}
            Some(v) => {
                return err(
                    &key_causal,
                    format!("{}: a decoder amend runs must attend causally", show(v)),
                )
            }
        }
        // Keys llama.cpp's loader reads in a strict type (another fails its load) that neither
        // forward uses: checked for their type only, so that both backends refuse the same files.
        for key in [
            "embedding_length_out",
            "pooling_type",
            "rope.scaling.original_context_length",
            "vocab_size",
        ] {
            int(h, &k(key))?;
        }
        float(h, &k("rope.scaling.alpha"))?;
        let key_finetuned = k("rope.scaling.finetuned");
        if let Some(v) = h
            .get(&key_finetuned)
            .filter(|v| !matches!(v, GgufValue::Bool(_)))
        {
            return err(&key_finetuned, format!("must be a bool, got {}", show(v)));
        }
        // llama.cpp multiplies RoPE's output by this factor; the other forwards do not.
        let key_attn_factor = k("rope.scaling.attn_factor");
        if let Some(x) = float(h, &key_attn_factor)?.filter(|&x| x != 1.0) {
            return err(
                &key_attn_factor,
                format!("{x}: a RoPE attention factor other than 1 is not supported"),
            );
        }
        for (key, full) in [
            ("attention.key_length_swa", head_dim_k),
            ("attention.value_length_swa", head_dim_v),
            ("rope.dimension_count_swa", n_rot),
        ] {
            if let Some(x) = int(h, &k(key))?.filter(|&x| x != full as u64) {
                return err(
                    &k(key),
                    format!("{x} differs from the full-attention layers' {full} (the supported graphs use one head size)"),
                );
            }
        }

        // Vocabulary.
        const MODEL: &str = "tokenizer.ggml.model";
        let tokenizer = match h.get(MODEL) {
            Some(GgufValue::String(s)) if TOKENIZERS.contains(&s.as_str()) => s.as_str(),
            Some(v) => {
                return err(
                    MODEL,
                    format!(
                        "{} is not a tokenizer amend runs (one of {})",
                        show(v),
                        TOKENIZERS.join(", ")
                    ),
                )
            }
            None => return err(MODEL, "is missing".to_string()),
        };
        const TOKENS: &str = "tokenizer.ggml.tokens";
        let n_vocab = match h.get(TOKENS) {
            Some(GgufValue::Array(GgufArray::String(t))) => {
                check_vocabulary(h, tokenizer, t)?;
                t.len() as u64
            }
            Some(v) => {
                return err(
                    TOKENS,
                    format!("must be an array of strings, got {}", show(v)),
                )
            }
            None => return err(TOKENS, "is missing".to_string()),
        };
        if !(1..=MAX_VOCAB).contains(&n_vocab) {
            return err(
                TOKENS,
                format!("{n_vocab} tokens is outside 1..={MAX_VOCAB}"),
            );
        }
        let n_vocab = n_vocab as u32;
        for key in ["tokenizer.ggml.scores", "tokenizer.ggml.token_type"] {
            if let Some(v) = h.get(key) {
                let n = v.as_array().map_or(0, GgufArray::len);
                if n != n_vocab as usize {
                    return err(
                        key,
                        format!("has {n} entries, the vocabulary has {n_vocab} tokens"),
                    );
                }
            }
        }
        let mut special_tokens = Vec::new();
        for (key, v) in &h.metadata {
            if !(key.starts_with("tokenizer.ggml.") && key.ends_with("_token_id")) {
                continue;
            }
            // A u32, as llama.cpp reads it (another type fails its load with no reason given).
            match v {
                GgufValue::U32(id) if *id < n_vocab => special_tokens.push((key.clone(), *id)),
                _ => {
                    return err(
                        key,
                        format!(
                            "{} is not a u32 token id below the vocabulary size {n_vocab}",
                            show(v)
                        ),
                    )
                }
            }
        }

        let hp = ModelHparams {
            arch,
            n_layer,
            n_embd,
            n_ctx_train,
            n_ff,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_rot,
            rms_eps,
            norm_eps,
            rope_freq_base,
            rope_freq_base_swa,
            rope_scaling,
            rope_scaling_factor,
            final_logit_softcapping,
            attention_scale,
            sliding_window,
            sliding_window_pattern,
            n_vocab,
            special_tokens,
        };
        hp.check_shapes(h)?;
        Ok(hp)
    }

    /// The shapes llama.cpp expects of the tensors these hyperparameters size (those present:
    /// which tensors an architecture requires is the runtime's architecture table's business),
    /// and no layer tensor past `n_layer`.
    fn check_shapes(&self, h: &GgufHeader) -> Result<(), HparamError> {
        let e = self.n_embd as u64;
        let v = self.n_vocab as u64;
        let expect = |name: &str, ne: &[u64]| -> Result<(), HparamError> {
            match h.tensor(name) {
                Some(t) if t.ne != ne => err(
                    name,
                    format!(
                        "tensor shape {:?} does not match the hyperparameters (expected {ne:?})",
                        t.ne
                    ),
                ),
                _ => Ok(()),
            }
        };
        expect("token_embd.weight", &[e, v])?;
        expect("output.weight", &[e, v])?;
        expect("output_norm.weight", &[e])?;
        // llama3-style RoPE frequency factors, one per rotated pair (llama.cpp refuses another
        // length at load; the ONNX Runtime backend reads them on the host).
        expect("rope_freqs.weight", &[self.n_rot as u64 / 2])?;
        for il in 0..self.n_layer as usize {
            let (q, kv) = (self.n_head[il] as u64, self.n_head_kv[il] as u64);
            let (dk, dv) = (self.head_dim_k as u64, self.head_dim_v as u64);
            let ff = self.n_ff[il] as u64;
            let t = |s: &str, ne: &[u64]| expect(&format!("blk.{il}.{s}.weight"), ne);
            t("attn_norm", &[e])?;
            t("attn_q", &[e, q * dk])?;
            t("attn_k", &[e, kv * dk])?;
            t("attn_v", &[e, kv * dv])?;
            t("attn_output", &[q * dv, e])?;
            t("attn_q_norm", &[dk])?;
            t("attn_k_norm", &[dk])?;
            t("ffn_norm", &[e])?;
            if ff > 0 {
                t("ffn_gate", &[e, ff])?;
                t("ffn_up", &[e, ff])?;
                t("ffn_down", &[ff, e])?;
            }
        }
        for t in &h.tensors {
            // llama.cpp multiplies and adds 1-D tensors (norms, biases) as f32 rows (ggml's binary
            // ops abort on an f16 one) and runs matrices through type-specific dot products (an
            // integer or activation-only type has none: a segfault).
            if t.ne.len() <= 1 && t.ggml_type != GgmlType::F32 {
                return err(
                    &t.name,
                    format!("a 1-D tensor must be F32, got {}", t.ggml_type),
                );
            }
            if t.ne.len() > 1 && !t.ggml_type.is_weight_type() {
                return err(
                    &t.name,
                    format!(
                        "{} is not a weight type llama.cpp computes with",
                        t.ggml_type
                    ),
                );
            }
            let Some(rest) = t.name.strip_prefix("blk.") else {
                continue;
            };
            let layer = rest.split('.').next().and_then(|n| n.parse::<u64>().ok());
            if let Some(il) = layer.filter(|&il| il >= self.n_layer as u64) {
                return err(
                    &t.name,
                    format!("tensor of layer {il}, but block_count is {}", self.n_layer),
                );
            }
        }
        Ok(())
    }

    /// A canonical encoding of every validated value, for the model fingerprint.
    pub fn hash_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |x: u32| out.extend_from_slice(&x.to_le_bytes());
        put(self.arch.len() as u32);
        for scalar in [
            self.n_layer,
            self.n_embd,
            self.n_ctx_train,
            self.head_dim_k,
            self.head_dim_v,
            self.n_rot,
            self.n_vocab,
        ] {
            put(scalar);
        }
        for per_layer in [&self.n_ff, &self.n_head, &self.n_head_kv] {
            per_layer.iter().for_each(|&x| put(x));
        }
        for f in [self.rms_eps, self.norm_eps, self.rope_freq_base] {
            put(f.map_or(u32::MAX, f32::to_bits));
        }
        put(self.special_tokens.len() as u32);
        for (key, id) in &self.special_tokens {
            put(key.len() as u32);
            put(*id);
        }
        let mut bytes = out;
        bytes.extend_from_slice(self.arch.as_bytes());
        for (key, _) in &self.special_tokens {
            bytes.extend_from_slice(key.as_bytes());
        }
        bytes
    }

    /// The forward constants' encoding for the fingerprint (RoPE scaling, the sliding window and
    /// its pattern and RoPE base, soft-capping, attention scale), `None` when the file sets none
    /// of them: fingerprints of such files (the scope model, most llama-family files) are the
    /// ones computed before these were hashed (session 33).
    pub fn forward_hash_bytes(&self) -> Option<Vec<u8>> {
        let floats = [
            self.rope_freq_base_swa,
            self.rope_scaling_factor,
            self.final_logit_softcapping,
            self.attention_scale,
        ];
        if floats.iter().all(Option::is_none)
            && self.sliding_window.is_none()
            && self.sliding_window_pattern.is_none()
            && self.rope_scaling.is_none()
        {
            return None;
        }
        let mut out = Vec::new();
        let mut put = |x: u32| out.extend_from_slice(&x.to_le_bytes());
        for f in floats {
            put(f.map_or(u32::MAX, f32::to_bits));
        }
        put(self.sliding_window.unwrap_or(u32::MAX));
        match &self.sliding_window_pattern {
            None => put(u32::MAX),
            Some(SwaPattern::Period(p)) => {
                put(0);
                put(*p);
            }
            Some(SwaPattern::Layers(v)) => {
                put(1);
                put(v.len() as u32);
                v.iter().for_each(|&x| put(x as u32));
            }
        }
        let scaling = self.rope_scaling.as_deref().unwrap_or("");
        put(scaling.len() as u32);
        out.extend_from_slice(scaling.as_bytes());
        Some(out)
    }
}
