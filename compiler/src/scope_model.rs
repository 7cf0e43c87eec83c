//! The scope model's conversion: a sentence-transformers BERT checkpoint (all-MiniLM-L6-v2:
//! `config.json`, `tokenizer.json`, `model.safetensors`) -> a llama.cpp `bert` GGUF (f16 or
//! Q8_0) written with the project's own GGUF writer, so no Python is needed.
//!
//! What llama.cpp's `bert` loader and WordPiece tokenizer expect:
//! - vocabulary in id order with the phantom-space rule: `##x` -> `x`, special tokens as they
//!   are, every other token `x` -> `\u{2581}x` (its tokenizer prefixes each word with U+2581);
//! - `tokenizer.ggml.normalizer.lowercase` for an uncased model (it lowercases and strips
//!   accents only when told);
//! - tensors renamed (`token_embd`, `position_embd`, `token_types`, `token_embd_norm`,
//!   `blk.N.attn_q/k/v`, `attn_output`, `attn_output_norm`, `ffn_up`, `ffn_down`,
//!   `layer_output_norm`); `embeddings.position_ids` and the pooler are dropped;
//! - `token_types` stays F32 (the graph adds a 1-D view of its first row), as do the 1-D
//!   norms and biases; matrices become F16 or Q8_0.

use std::collections::BTreeMap;
use std::path::Path;

use amend_edits::gguf::{f32_to_f16, GgmlType, GgufArray, GgufWriter};
use safetensors::{Dtype, SafeTensors};

use crate::error::{CompileError, Result};

/// Weight type of the converted matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    F16,
    Q8_0,
}

impl std::str::FromStr for WeightType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(WeightType::F16),
            "q8_0" => Ok(WeightType::Q8_0),
            _ => Err(format!("{s:?}: expected q8_0 or f16")),
        }
    }
}

impl WeightType {
    /// llama.cpp's `general.file_type` (MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7).
    fn file_type(self) -> u32 {
        match self {
            WeightType::F16 => 1,
            WeightType::Q8_0 => 7,
        }
    }
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct Converted {
    pub bytes: Vec<u8>,
    pub n_tensors: usize,
    pub n_vocab: usize,
    pub n_params: u64,
}

const PHANTOM: char = '\u{2581}';
/// llama.cpp token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;

fn bad(what: impl Into<String>) -> CompileError {
    CompileError::Hparams(format!("scope model: {}", what.into()))
}

pub(crate) fn read_json(dir: &Path, name: &str) -> Result<serde_json::Value> {
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p)
        .map_err(|e| bad(format!("cannot read {}: {e}", p.display())))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", p.display())))
}

/// A BERT checkpoint's `config.json`, checked: every count in the range the GGUF reader (and
/// llama.cpp) accepts, so nothing wraps when it is written as a u32, and the width divides
/// into the heads. [`BertConfig::check_tensor`] ties the tensors to it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BertConfig {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub n_types: usize,
    pub eps: f32,
}

/// The GGUF reader's limits (edits/src/gguf_hparams.rs), for the counts `convert` writes.
pub const MAX_LAYERS: u64 = 512;
pub const MAX_EMBD: u64 = 1 << 16;
const MAX_FF: u64 = 1 << 20;
const MAX_HEADS: u64 = 4096;
const MAX_CTX: u64 = 1 << 24;
const MAX_TYPES: u64 = 1 << 16;

impl BertConfig {
    /// Reads and checks `dir/config.json`.
    pub fn read(dir: &Path) -> Result<BertConfig> {
        BertConfig::from_json(&read_json(dir, "config.json")?)
    }

    pub fn from_json(cfg: &serde_json::Value) -> Result<BertConfig> {
        if cfg.get("model_type").and_then(|v| v.as_str()) != Some("bert") {
            return Err(bad("config.json: model_type is not \"bert\""));
        }
        if cfg.get("hidden_act").and_then(|v| v.as_str()) != Some("gelu") {
            return Err(bad("config.json: hidden_act must be gelu"));
        }
        let count = |key: &str, max: u64, default: Option<u64>| -> Result<usize> {
            let v = match (cfg.get(key), default) {
                (None, Some(d)) => return Ok(d as usize),
                (None, None) => return Err(bad(format!("config.json lacks {key}"))),
                (Some(v), _) => v,
            };
            match v.as_u64() {
                Some(n) if (1..=max).contains(&n) => Ok(n as usize),
                _ => Err(bad(format!(
                    "config.json: {key} {v} is not an integer in 1..={max}"
                ))),
            }
        };
        let n_embd = count("hidden_size", MAX_EMBD, None)?;
        let n_layer = count("num_hidden_layers", MAX_LAYERS, None)?;
        let n_head = count("num_attention_heads", MAX_HEADS, None)?;
        let n_ff = count("intermediate_size", MAX_FF, None)?;
        let n_ctx = count("max_position_embeddings", MAX_CTX, None)?;
        let n_types = count("type_vocab_size", MAX_TYPES, Some(2))?;
        if n_embd % n_head != 0 {
            return Err(bad(format!(
                "config.json: num_attention_heads {n_head} does not divide hidden_size {n_embd}"
            )));
        }
        let eps = match cfg.get("layer_norm_eps") {
            None => 1e-12,
            Some(v) => match v.as_f64().map(|x| x as f32) {
                Some(x) if x.is_finite() && x > 0.0 && x <= 1.0 => x,
                _ => {
                    return Err(bad(format!(
                        "config.json: layer_norm_eps {v} is not a finite epsilon in (0, 1]"
                    )))
                }
            },
        };
        Ok(BertConfig {
            n_embd,
            n_layer,
            n_head,
            n_ff,
            n_ctx,
            n_types,
            eps,
        })
    }

    /// The shape config.json gives the checkpoint tensor `name` (`bert.` prefix optional;
    /// `n_vocab` rows for the word embeddings, any when `None`), or `None` for a tensor the
    /// conversion drops. An encoder layer past `num_hidden_layers` or a parameter BERT does not
    /// have is an error.
    pub fn shape_of(&self, name: &str, n_vocab: Option<usize>) -> Result<Option<Vec<usize>>> {
        let d = self.n_embd;
        let Some(g) = gguf_tensor_name(name) else {
            return Ok(None);
        };
        let vec = |n: usize| Some(vec![n]);
        let shape = match g.as_str() {
            "token_embd.weight" => Some(vec![n_vocab.unwrap_or(usize::MAX), d]),
            "position_embd.weight" => Some(vec![self.n_ctx, d]),
            "token_types.weight" => Some(vec![self.n_types, d]),
            "token_embd_norm.weight" | "token_embd_norm.bias" => vec(d),
            _ => {
                // blk.N.MODULE.PARAM (gguf_tensor_name's only other form).
                let mut parts = g.splitn(3, '.').skip(1);
                let (Some(n), Some(rest)) = (parts.next(), parts.next()) else {
                    return Err(bad(format!("unexpected tensor {name}")));
                };
                let n: usize = n.parse().unwrap_or(usize::MAX);
                if n >= self.n_layer {
                    return Err(bad(format!(
                        "the checkpoint has {name}, but config.json's num_hidden_layers is {}",
                        self.n_layer
                    )));
                }
                match rest {
                    "attn_q.weight" | "attn_k.weight" | "attn_v.weight" | "attn_output.weight" => {
                        Some(vec![d, d])
                    }
                    "ffn_up.weight" => Some(vec![self.n_ff, d]),
                    "ffn_up.bias" => vec(self.n_ff),
                    "ffn_down.weight" => Some(vec![d, self.n_ff]),
                    "attn_q.bias"
                    | "attn_k.bias"
                    | "attn_v.bias"
                    | "attn_output.bias"
                    | "ffn_down.bias"
                    | "attn_output_norm.weight"
                    | "attn_output_norm.bias"
                    | "layer_output_norm.weight"
                    | "layer_output_norm.bias" => vec(d),
                    _ => return Err(bad(format!("unexpected tensor {name}"))),
                }
            }
        };
        Ok(shape)
    }

    /// Checks the tensor `name` of `shape` against config.json (see [`BertConfig::shape_of`]).
    pub fn check_tensor(&self, name: &str, shape: &[usize], n_vocab: Option<usize>) -> Result<()> {
        let Some(want) = self.shape_of(name, n_vocab)? else {
            return Ok(());
        };
        let fits = want.len() == shape.len()
            && want
                .iter()
                .zip(shape)
                .all(|(&w, &s)| w == usize::MAX || w == s);
        if !fits {
            let show = |s: &[usize]| {
                s.iter()
                    .map(|&x| {
                        if x == usize::MAX {
                            "_".into()
                        } else {
                            x.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(bad(format!(
                "{name} has shape [{}], config.json (hidden_size {}, intermediate_size {}, max_position_embeddings {}, type_vocab_size {}) and the vocabulary give [{}]",
                show(shape),
                self.n_embd,
                self.n_ff,
                self.n_ctx,
                self.n_types,
                show(&want)
            )));
        }
        Ok(())
    }

    /// The checkpoint names (without `bert.`) of every tensor a conversion needs, in order.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            "word_embeddings.weight",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "LayerNorm.weight",
            "LayerNorm.bias",
        ]
        .iter()
        .map(|n| format!("embeddings.{n}"))
        .collect();
        for l in 0..self.n_layer {
            for m in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "attention.output.LayerNorm",
                "intermediate.dense",
                "output.dense",
                "output.LayerNorm",
            ] {
                for p in ["weight", "bias"] {
                    v.push(format!("encoder.layer.{l}.{m}.{p}"));
                }
            }
        }
        v
    }
}

/// The vocabulary in id order with llama.cpp's phantom-space rule, and each token's type.
pub fn gguf_vocab(tokenizer: &serde_json::Value) -> Result<(Vec<String>, Vec<i32>)> {
    let model = tokenizer
        .get("model")
        .ok_or_else(|| bad("tokenizer.json has no model"))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("WordPiece") {
        return Err(bad(
            "tokenizer.json: only WordPiece vocabularies are supported",
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("tokenizer.json has no vocab"))?;
    let mut by_id: Vec<Option<&str>> = vec![None; vocab.len()];
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .filter(|&i| (i as usize) < by_id.len())
            .ok_or_else(|| bad(format!("token {tok:?} has an id out of range")))?;
        if by_id[id as usize].replace(tok).is_some() {
            return Err(bad(format!("two tokens share id {id}")));
        }
    }
    let special: Vec<&str> = tokenizer
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter(|t| t.get("special").and_then(|s| s.as_bool()) == Some(true))
                .filter_map(|t| t.get("content").and_then(|c| c.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let mut tokens = Vec::with_capacity(by_id.len());
    let mut types = Vec::with_capacity(by_id.len());
    for (id, tok) in by_id.into_iter().enumerate() {
        let tok = tok.ok_or_else(|| bad(format!("no token has id {id}")))?;
        if special.contains(&tok) {
            tokens.push(tok.to_string());
            types.push(TOKEN_CONTROL);
        } else if let Some(rest) = tok.strip_prefix("##") {
            tokens.push(rest.to_string());
            types.push(TOKEN_NORMAL);
        } else {
            tokens.push(format!("{PHANTOM}{tok}"));
            types.push(TOKEN_NORMAL);
        }
    }
    Ok((tokens, types))
}

/// The GGUF name of a checkpoint tensor (`None`: dropped).
pub fn gguf_tensor_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    let fixed = match name {
        "embeddings.word_embeddings.weight" => Some("token_embd.weight"),
        "embeddings.position_embeddings.weight" => Some("position_embd.weight"),
        "embeddings.token_type_embeddings.weight" => Some("token_types.weight"),
        "embeddings.LayerNorm.weight" => Some("token_embd_norm.weight"),
        "embeddings.LayerNorm.bias" => Some("token_embd_norm.bias"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("encoder.layer.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: u32 = n.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let gguf = match module {
        "attention.self.query" => "attn_q",
        "attention.self.key" => "attn_k",
        "attention.self.value" => "attn_v",
        "attention.output.dense" => "attn_output",
        "attention.output.LayerNorm" => "attn_output_norm",
        "intermediate.dense" => "ffn_up",
        "output.dense" => "ffn_down",
        "output.LayerNorm" => "layer_output_norm",
        _ => return None,
    };
    Some(format!("blk.{n}.{gguf}.{param}"))
}

/// ggml's Q8_0: blocks of 32 values as an f16 scale (max |x| / 127) and 32 rounded i8.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        for &v in block {
            out.push((v * id).round() as i8 as u8);
        }
    }
    out
}

/// Low-rank factors to merge (`amend scope-model tune`): per projection `P`, `P.lora_a`
/// `[rank, in]` and `P.lora_b` `[out, rank]` (scale folded in), so `P.weight += B A`. Errors
/// are plain messages: the caller says which input (`--tune`) they are about.
struct Factors {
    pairs: BTreeMap<String, (Vec<f32>, Vec<f32>, usize)>,
}

fn f32_data(
    t: &safetensors::tensor::TensorView<'_>,
    name: &str,
) -> std::result::Result<Vec<f32>, String> {
    if t.dtype() != Dtype::F32 {
        return Err(format!("{name}: expected F32, got {:?}", t.dtype()));
    }
    let data: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if data.iter().any(|v| !v.is_finite()) {
        return Err(format!("{name}: non-finite value"));
    }
    Ok(data)
}

impl Factors {
    fn read(path: &Path) -> std::result::Result<Factors, String> {
        let bytes = amend_edits::fsutil::read_regular(path, 64 << 20).map_err(|e| e.to_string())?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        let mut pairs = BTreeMap::new();
        for name in st.names() {
            let Some(p) = name.strip_suffix(".lora_a") else {
                if name.ends_with(".lora_b") {
                    continue;
                }
                return Err(format!("unexpected tensor {name}"));
            };
            let bname = format!("{p}.lora_b");
            let a = st.tensor(name).map_err(|e| format!("{name}: {e}"))?;
            let b = st.tensor(&bname).map_err(|e| format!("{bname}: {e}"))?;
            let (&[r, _], &[_, rb]) = (a.shape(), b.shape()) else {
                return Err(format!("{p}: factors must be matrices"));
            };
            if r != rb || r == 0 {
                return Err(format!("{p}: ranks differ"));
            }
            pairs.insert(
                p.to_string(),
                (f32_data(&a, name)?, f32_data(&b, &bname)?, r),
            );
        }
        if st.names().len() != 2 * pairs.len() {
            return Err("a lora_b without its lora_a".into());
        }
        Ok(Factors { pairs })
    }

    /// `w [out, in]` plus B A for the projection `sname` (`….weight`), if it has factors.
    fn merge(
        &mut self,
        sname: &str,
        shape: &[usize],
        w: &mut [f32],
    ) -> std::result::Result<(), String> {
        let Some(p) = sname.strip_suffix(".weight") else {
            return Ok(());
        };
        let p = p.strip_prefix("bert.").unwrap_or(p);
        let Some((a, b, r)) = self.pairs.remove(p) else {
            return Ok(());
        };
        let &[out, inp] = shape else {
            return Err(format!("{p} is not a matrix"));
        };
        if a.len() != r * inp || b.len() != out * r {
            return Err(format!("{p}: factor shapes do not fit [{out}, {inp}]"));
        }
        for o in 0..out {
            let row = &mut w[o * inp..(o + 1) * inp];
            for k in 0..r {
                let bk = b[o * r + k];
                for (x, ak) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                    *x += bk * ak;
                }
            }
        }
        Ok(())
    }
}

/// A failed conversion, by the input at fault: the checkpoint, or the tuned factors (their
/// file, or their fit to the checkpoint), so that the CLI names `--from` or `--tune`.
#[derive(Debug)]
pub enum ConvertError {
    Checkpoint(CompileError),
    Tune(String),
}

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvertError::Checkpoint(e) => e.fmt(f),
            ConvertError::Tune(m) => write!(f, "scope model: --tune: {m}"),
        }
    }
}

impl std::error::Error for ConvertError {}

impl From<CompileError> for ConvertError {
    fn from(e: CompileError) -> Self {
        ConvertError::Checkpoint(e)
    }
}

impl From<ConvertError> for CompileError {
    fn from(e: ConvertError) -> Self {
        match e {
            ConvertError::Checkpoint(e) => e,
            ConvertError::Tune(m) => bad(format!("--tune: {m}")),
        }
    }
}

/// [`convert_checked`] with one error type.
pub fn convert(dir: &Path, ty: WeightType, tune: Option<&Path>) -> Result<Converted> {
    Ok(convert_checked(dir, ty, tune)?)
}

/// Converts the checkpoint in `dir` (see the module docs), merging tuned low-rank factors
/// when `tune` names a file of them. config.json is checked against the tensors, so a
/// conversion that succeeds has the shapes its header says.
pub fn convert_checked(
    dir: &Path,
    ty: WeightType,
    tune: Option<&Path>,
) -> std::result::Result<Converted, ConvertError> {
    let mut factors = tune
        .map(Factors::read)
        .transpose()
        .map_err(ConvertError::Tune)?;
    let cfg = BertConfig::read(dir)?;
    let (n_embd, n_layer, n_head, n_ff, n_ctx, n_types, eps) = (
        cfg.n_embd as u32,
        cfg.n_layer as u32,
        cfg.n_head as u32,
        cfg.n_ff as u32,
        cfg.n_ctx as u32,
        cfg.n_types as u32,
        cfg.eps,
    );
    let tok_cfg = read_json(dir, "tokenizer_config.json").ok();
    let lowercase = tok_cfg
        .as_ref()
        .and_then(|c| c.get("do_lower_case"))
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let tokenizer = read_json(dir, "tokenizer.json")?;
    let (tokens, types) = gguf_vocab(&tokenizer)?;
    let id_of = |t: &str| -> Result<u32> {
        tokens
            .iter()
            .position(|x| x == t)
            .map(|i| i as u32)
            .ok_or_else(|| bad(format!("vocabulary lacks {t}")))
    };

    let st_path = dir.join("model.safetensors");
    let st_bytes = std::fs::read(&st_path)
        .map_err(|e| bad(format!("cannot read {}: {e}", st_path.display())))?;
    let st = SafeTensors::deserialize(&st_bytes)
        .map_err(|e| bad(format!("{}: {e}", st_path.display())))?;

    let mut w = GgufWriter::new();
    w.add("general.architecture", "bert");
    w.add("general.name", "all-MiniLM-L6-v2");
    w.add("general.license", "apache-2.0");
    w.add("general.file_type", ty.file_type());
    w.add("bert.context_length", n_ctx);
    w.add("bert.embedding_length", n_embd);
    w.add("bert.feed_forward_length", n_ff);
    w.add("bert.block_count", n_layer);
    w.add("bert.attention.head_count", n_head);
    w.add("bert.attention.layer_norm_epsilon", eps);
    w.add("bert.attention.causal", false);
    // Mean pooling, as the checkpoint's 1_Pooling/config.json says.
    w.add("bert.pooling_type", 1u32);
    w.add("tokenizer.ggml.model", "bert");
    w.add("tokenizer.ggml.token_type_count", n_types);
    w.add("tokenizer.ggml.normalizer.lowercase", lowercase);
    w.add("tokenizer.ggml.normalizer.strip_accents", lowercase);
    w.add("tokenizer.ggml.bos_token_id", id_of("[CLS]")?);
    w.add("tokenizer.ggml.seperator_token_id", id_of("[SEP]")?);
    w.add("tokenizer.ggml.unknown_token_id", id_of("[UNK]")?);
    w.add("tokenizer.ggml.padding_token_id", id_of("[PAD]")?);
    w.add("tokenizer.ggml.mask_token_id", id_of("[MASK]")?);
    w.add("tokenizer.ggml.add_bos_token", true);
    w.add("tokenizer.ggml.add_sep_token", true);
    w.add("tokenizer.ggml.add_eos_token", false);
    w.add("tokenizer.ggml.token_type", GgufArray::I32(types));
    let n_vocab = tokens.len();
    w.add("tokenizer.ggml.tokens", GgufArray::String(tokens));

    // Sorted names: the output is byte-identical run to run (its sha256 is recorded).
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut st_names = st.names();
    st_names.sort();
    for name in st_names {
        if let Some(g) = gguf_tensor_name(name) {
            let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            cfg.check_tensor(name, t.shape(), Some(n_vocab))?;
            if names.insert(g, name.to_string()).is_some() {
                return Err(
                    bad(format!("{name} appears with and without the bert. prefix")).into(),
                );
            }
        }
    }
    // Every tensor is one config.json gives (checked above), so a short count is a missing one.
    let have: std::collections::BTreeSet<&str> = names
        .values()
        .map(|n| n.strip_prefix("bert.").unwrap_or(n))
        .collect();
    if let Some(m) = cfg
        .tensor_names()
        .iter()
        .find(|n| !have.contains(n.as_str()))
    {
        return Err(bad(format!(
            "the checkpoint lacks {m} (config.json: num_hidden_layers {n_layer})"
        ))
        .into());
    }
    let mut n_params = 0u64;
    for (gname, sname) in &names {
        let t = st.tensor(sname).map_err(|e| bad(format!("{sname}: {e}")))?;
        let mut data = f32_data(&t, sname).map_err(bad)?;
        if let Some(f) = factors.as_mut() {
            f.merge(sname, t.shape(), &mut data)
                .map_err(ConvertError::Tune)?;
        }
        n_params += data.len() as u64;
        // GGUF's ne is the row-major shape reversed (ne[0] is the row length).
        let ne: Vec<u64> = t.shape().iter().rev().map(|&d| d as u64).collect();
        let is_matrix = ne.len() == 2 && gname != "token_types.weight";
        let res = if !is_matrix {
            w.add_tensor_f32(gname, &ne, &data)
        } else {
            match ty {
                WeightType::F16 => w.add_tensor_f16(gname, &ne, &data),
                WeightType::Q8_0 if ne[0].is_multiple_of(32) => {
                    w.add_tensor_raw(gname, GgmlType::Q8_0, &ne, quantize_q8_0(&data))
                }
                WeightType::Q8_0 => w.add_tensor_f16(gname, &ne, &data),
            }
        };
        res.map_err(|e| bad(format!("{gname}: {e}")))?;
    }
    if let Some(p) = factors.as_ref().and_then(|f| f.pairs.keys().next()) {
        return Err(ConvertError::Tune(format!(
            "the checkpoint has no projection {p}"
        )));
    }
    Ok(Converted {
        bytes: w.to_bytes(),
        n_tensors: names.len(),
        n_vocab,
        n_params,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// all-MiniLM-L6-v2's config.json with `key` set to `v` (removed when `Null`).
    pub(crate) fn minilm_config(key: &str, v: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "model_type": "bert", "hidden_act": "gelu", "hidden_size": 384,
            "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12
        });
        match v {
            serde_json::Value::Null => c.as_object_mut().unwrap().remove(key),
            v => c.as_object_mut().unwrap().insert(key.into(), v),
        };
        c
    }

    /// Every count is refused outside what a u32 GGUF field and the reader take, naming the
    /// key: 99999999999 used to wrap to 1215752191, 0 layers to read as "101 of 5 tensors".
    #[test]
    fn bert_config_refuses_bad_values() {
        let ok = BertConfig::from_json(&minilm_config("x", 0.into())).unwrap();
        assert_eq!((ok.n_embd, ok.n_layer, ok.n_head), (384, 6, 12));
        for (key, v, msg) in [
            (
                "hidden_size",
                serde_json::json!(99999999999u64),
                "hidden_size 99999999999",
            ),
            ("hidden_size", serde_json::json!(-1), "hidden_size -1"),
            (
                "num_hidden_layers",
                0.into(),
                "num_hidden_layers 0 is not an integer in 1..=512",
            ),
            (
                "num_attention_heads",
                5.into(),
                "num_attention_heads 5 does not divide",
            ),
            (
                "max_position_embeddings",
                0.into(),
                "max_position_embeddings 0",
            ),
            (
                "intermediate_size",
                serde_json::Value::Null,
                "lacks intermediate_size",
            ),
            ("type_vocab_size", "2".into(), "type_vocab_size \"2\""),
            (
                "layer_norm_eps",
                serde_json::json!(-1.0),
                "layer_norm_eps -1",
            ),
            (
                "layer_norm_eps",
                serde_json::json!(1e-60),
                "not a finite epsilon",
            ),
        ] {
            let e = BertConfig::from_json(&minilm_config(key, v))
                .expect_err(msg)
                .to_string();
            assert!(e.contains(msg), "{e} lacks {msg:?}");
        }
    }

    #[test]
    fn bert_config_ties_the_tensors_to_it() {
        let c = BertConfig::from_json(&minilm_config("num_hidden_layers", 2.into())).unwrap();
        assert_eq!(c.tensor_names().len(), 5 + 16 * 2);
        c.check_tensor(
            "bert.encoder.layer.1.intermediate.dense.weight",
            &[1536, 384],
            None,
        )
        .unwrap();
        c.check_tensor("embeddings.word_embeddings.weight", &[7, 384], None)
            .unwrap();
        c.check_tensor("pooler.dense.weight", &[1, 1], None)
            .unwrap();
        let e = |name: &str, shape: &[usize], n_vocab| {
            c.check_tensor(name, shape, n_vocab)
                .unwrap_err()
                .to_string()
        };
        assert!(
            e("encoder.layer.2.output.dense.bias", &[384], None).contains("num_hidden_layers is 2")
        );
        assert!(
            e("encoder.layer.0.output.dense.weight", &[1536, 384], None).contains("[384, 1536]")
        );
        assert!(e("embeddings.word_embeddings.weight", &[7, 384], Some(8)).contains("[8, 384]"));
        assert!(
            e("encoder.layer.0.output.LayerNorm.gamma", &[384], None).contains("unexpected tensor")
        );
    }

    #[test]
    fn tensor_names() {
        assert_eq!(
            gguf_tensor_name("encoder.layer.3.attention.self.query.bias").as_deref(),
            Some("blk.3.attn_q.bias")
        );
        assert_eq!(
            gguf_tensor_name("encoder.layer.0.output.LayerNorm.weight").as_deref(),
            Some("blk.0.layer_output_norm.weight")
        );
        assert_eq!(
            gguf_tensor_name("embeddings.word_embeddings.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_tensor_name("embeddings.position_ids"), None);
        assert_eq!(gguf_tensor_name("pooler.dense.weight"), None);
    }

    #[test]
    fn phantom_space_vocab() {
        let tok = serde_json::json!({
            "added_tokens": [{"id": 0, "content": "[PAD]", "special": true}],
            "model": {"type": "WordPiece", "vocab": {"[PAD]": 0, "paris": 1, "##is": 2}}
        });
        let (t, ty) = gguf_vocab(&tok).unwrap();
        assert_eq!(t, vec!["[PAD]", "\u{2581}paris", "is"]);
        assert_eq!(ty, vec![TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_NORMAL]);
    }

    #[test]
    fn q8_0_roundtrip() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.01).collect();
        let q = quantize_q8_0(&x);
        assert_eq!(q.len(), 68);
        let d = amend_edits::gguf::f16_to_f32(u16::from_le_bytes([q[0], q[1]]));
        // Quantized with the f32 scale, stored as f16 (as ggml does): half a step plus up to 127
        // times the scale's f16 rounding.
        let d32 = x[..32].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let tol = d * 0.5 + 127.0 * (d - d32).abs() + 1e-6;
        for (j, &v) in x[..32].iter().enumerate() {
            let back = d * (q[2 + j] as i8) as f32;
            assert!((back - v).abs() <= tol, "{v} -> {back}");
        }
    }
}
