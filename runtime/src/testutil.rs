//! A tiny random-weight model for fast tests (here and in other crates): a 2-layer
//! llama-family GGUF with a small SentencePiece-style vocabulary that llama.cpp accepts.

use std::path::Path;

use amend_edits::gguf::{f32_to_f16, GgmlType, GgufWriter};

use crate::arch::Architecture;

/// Dimensions of the tiny model.
pub const TINY_N_LAYER: u32 = 2;
pub const TINY_N_EMBD: u32 = 64;
pub const TINY_N_FF: u32 = 128;
pub const TINY_N_HEAD: u32 = 4;
pub const TINY_N_HEAD_KV: u32 = 2;
pub const TINY_N_CTX: u32 = 512;

/// Normal tokens of the tiny vocabulary (SentencePiece style, `▁` = space). SentencePiece only
/// merges through pieces that exist, so in practice text tokenizes to `▁`, single letters and
/// byte-fallback tokens (which exercises UTF-8 reassembly).
pub const TINY_WORDS: &[&str] = &[
    "▁The",
    "▁capital",
    "▁of",
    "▁France",
    "▁Germany",
    "▁Italy",
    "▁is",
    "▁Paris",
    "▁Berlin",
    "▁Rome",
    "▁hello",
    "▁world",
    "▁a",
    "▁the",
    "▁and",
    "▁water",
    "▁made",
    "▁hydrogen",
    "▁oxygen",
    "▁.",
    "▁",
    "e",
    "t",
    "a",
    "o",
    "n",
    "s",
    "r",
    "i",
    "h",
    "l",
    "d",
];

struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        // xorshift64*: deterministic, dependency-free.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545F4914F6CDD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// The factors of a fixed rank-one delta `u v^T` on the tiny model's `blk.0.ffn_down.weight`
/// (`u`: `TINY_N_FF` values, `v`: `TINY_N_EMBD`), small enough to keep the logits finite and
/// large enough to change them; for `LowRankTensor::rank_one`.
pub fn rank_one_ffn_down_factors() -> (Vec<f32>, Vec<f32>) {
    let u = (0..TINY_N_FF)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
        .collect();
    let v = (0..TINY_N_EMBD)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
        .collect();
    (u, v)
}

/// The tiny vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then [`TINY_WORDS`].
pub fn tiny_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, 3, 3]; // unknown, control, control
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6); // byte
    }
    for w in TINY_WORDS {
        tokens.push(w.to_string());
        types.push(1); // normal
    }
    // Longer words score higher so the tokenizer prefers them.
    let scores = tokens
        .iter()
        .zip(&types)
        .map(|(t, &ty)| {
            if ty == 1 {
                -10.0 + t.chars().count() as f32
            } else {
                -100.0
            }
        })
        .collect();
    (tokens, scores, types)
}

/// Writes a tiny random-weight model of `arch` (a llama-graph architecture: llama, qwen2, qwen3)
/// to `path`, with the layer tensors the architecture table lists.
pub fn write_tiny_model(path: &Path, arch: Architecture, seed: u64) -> std::io::Result<()> {
    write_tiny_model_typed(path, arch, seed, GgmlType::F32)
}

/// [`write_tiny_model`] with the layer matrices stored as `ty` (F32, F16, BF16, or the 32-element
/// block types Q8_0, Q5_0, Q4_0, Q4_1, quantized as ggml's reference quantizers do).
pub fn write_tiny_model_typed(
    path: &Path,
    arch: Architecture,
    seed: u64,
    ty: GgmlType,
) -> std::io::Result<()> {
    write_tiny(path, arch, seed, ty, false, None)
}

/// [`write_tiny_model`] as gemma3-270m Q4_K_M stores its embeddings: a Q8_0 token-embedding
/// table that is also the output projection (no `output.weight`), Q8_0 layer matrices.
pub fn write_tiny_model_tied_q8_0(
    path: &Path,
    arch: Architecture,
    seed: u64,
) -> std::io::Result<()> {
    write_tiny(path, arch, seed, GgmlType::Q8_0, true, None)
}

/// [`write_tiny_model`] with llama3-style RoPE frequency factors (`rope_freqs.weight`, one per
/// dimension pair of a head: [`TINY_N_EMBD`] / [`TINY_N_HEAD`] / 2 values).
pub fn write_tiny_model_rope_freqs(
    path: &Path,
    arch: Architecture,
    seed: u64,
    rope_freqs: &[f32],
) -> std::io::Result<()> {
    write_tiny(path, arch, seed, GgmlType::F32, false, Some(rope_freqs))
}

fn write_tiny(
    path: &Path,
    arch: Architecture,
    seed: u64,
    ty: GgmlType,
    tied_q8_0: bool,
    rope_freqs: Option<&[f32]>,
) -> std::io::Result<()> {
    let a = arch.name();
    assert!(
        arch != Architecture::Gemma3,
        "the tiny model is llama-family only"
    );
    let (n_embd, n_ff, n_head, n_head_kv) = (
        TINY_N_EMBD as u64,
        TINY_N_FF as u64,
        TINY_N_HEAD as u64,
        TINY_N_HEAD_KV as u64,
    );
    let head_dim = n_embd / n_head;
    let (tokens, scores, types) = tiny_vocab();
    let n_vocab = tokens.len() as u64;
    let mut w = GgufWriter::new();
    w.add("general.architecture", a)
        .add("general.name", format!("amend tiny {a}"))
        .add("general.file_type", 0u32)
        .add(&format!("{a}.context_length"), TINY_N_CTX)
        .add(&format!("{a}.embedding_length"), TINY_N_EMBD)
        .add(&format!("{a}.block_count"), TINY_N_LAYER)
        .add(&format!("{a}.feed_forward_length"), TINY_N_FF)
        .add(&format!("{a}.attention.head_count"), TINY_N_HEAD)
        .add(&format!("{a}.attention.head_count_kv"), TINY_N_HEAD_KV)
        .add(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-5f32)
        .add(&format!("{a}.rope.freq_base"), 10000.0f32)
        .add("tokenizer.ggml.model", "llama")
        .add("tokenizer.ggml.tokens", tokens)
        .add("tokenizer.ggml.scores", scores)
        .add("tokenizer.ggml.token_type", types)
        .add("tokenizer.ggml.bos_token_id", 1u32)
        .add("tokenizer.ggml.eos_token_id", 2u32)
        .add("tokenizer.ggml.unknown_token_id", 0u32)
        .add("tokenizer.ggml.add_bos_token", true);
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let err = |e| std::io::Error::other(format!("{e:?}"));
    let ones = |n: u64| vec![1.0f32; n as usize];
    let t = |w: &mut GgufWriter, name: &str, ne: &[u64], data: Vec<f32>| {
        let quantized = name.starts_with("blk.") || (tied_q8_0 && name == "token_embd.weight");
        if ty == GgmlType::F32 || ne.len() != 2 || !quantized {
            w.add_tensor_f32(name, ne, &data).map(|_| ()).map_err(err)
        } else {
            w.add_tensor_raw(name, ty, ne, quantize(ty, &data))
                .map(|_| ())
                .map_err(err)
        }
    };
    let emb = rng.vec((n_embd * n_vocab) as usize, 1.0);
    t(&mut w, "token_embd.weight", &[n_embd, n_vocab], emb)?;
    t(&mut w, "output_norm.weight", &[n_embd], ones(n_embd))?;
    let out = rng.vec((n_embd * n_vocab) as usize, 0.3);
    if !tied_q8_0 {
        t(&mut w, "output.weight", &[n_embd, n_vocab], out)?;
    }
    if let Some(f) = rope_freqs {
        t(&mut w, "rope_freqs.weight", &[f.len() as u64], f.to_vec())?;
    }
    let s_in = 1.7 / (n_embd as f32).sqrt();
    let s_ff = 1.7 / (n_ff as f32).sqrt();
    // The per-layer tensors the architecture table lists for `arch`.
    for l in 0..TINY_N_LAYER {
        for &name in arch.spec().layer_tensors {
            let (ne, data): (Vec<u64>, Vec<f32>) = match name {
                "attn_norm" | "ffn_norm" => (vec![n_embd], ones(n_embd)),
                "attn_q_norm" | "attn_k_norm" => (vec![head_dim], ones(head_dim)),
                "attn_q" => (
                    vec![n_embd, n_head * head_dim],
                    rng.vec((n_embd * n_head * head_dim) as usize, s_in),
                ),
                "attn_k" | "attn_v" => (
                    vec![n_embd, n_head_kv * head_dim],
                    rng.vec((n_embd * n_head_kv * head_dim) as usize, s_in),
                ),
                "attn_output" => (
                    vec![n_head * head_dim, n_embd],
                    rng.vec((n_head * head_dim * n_embd) as usize, s_in),
                ),
                "ffn_gate" | "ffn_up" => {
                    (vec![n_embd, n_ff], rng.vec((n_embd * n_ff) as usize, s_in))
                }
                "ffn_down" => (vec![n_ff, n_embd], rng.vec((n_ff * n_embd) as usize, s_ff)),
                other => panic!("the tiny model has no recipe for layer tensor {other}"),
            };
            t(&mut w, &format!("blk.{l}.{name}.weight"), &ne, data)?;
        }
    }
    w.write_to(path)
}

/// ggml's reference quantizers (`quantize_row_*_ref`) for the 32-element block types.
fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F16 => {
            return x
                .iter()
                .flat_map(|&v| f32_to_f16(v).to_le_bytes())
                .collect()
        }
        // Round to nearest even, as ggml's f32 -> bf16 (the values are finite).
        GgmlType::BF16 => {
            return x
                .iter()
                .flat_map(|&v| {
                    let b = v.to_bits();
                    (((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes()
                })
                .collect()
        }
        _ => {}
    }
    let mut out = Vec::new();
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        // The value of largest magnitude, with its sign.
        let max = b
            .iter()
            .copied()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        match ty {
            GgmlType::Q8_0 => {
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let (levels, half) = if ty == GgmlType::Q4_0 {
                    (15u8, 8.0)
                } else {
                    (31, 16.0)
                };
                let d = max / -half;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = b
                    .iter()
                    .map(|v| ((v * id + half + 0.5) as u8).min(levels))
                    .collect();
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                if ty == GgmlType::Q5_0 {
                    let mut qh = 0u32;
                    for j in 0..16 {
                        qh |= ((q[j] as u32 & 0x10) >> 4) << j;
                        qh |= ((q[j + 16] as u32 & 0x10) >> 4) << (j + 16);
                    }
                    out.extend_from_slice(&qh.to_le_bytes());
                }
                out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
            }
            GgmlType::Q4_1 => {
                let (lo, hi) = b
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let d = (hi - lo) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = b
                    .iter()
                    .map(|v| (((v - lo) * id + 0.5) as u8).min(15))
                    .collect();
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                out.extend_from_slice(&f32_to_f16(lo).to_le_bytes());
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
            other => panic!("the tiny model has no quantizer for {other:?}"),
        }
    }
    out
}

/// Writes `bytes` as the graph at `graph` and rewrites its sidecar (`GRAPH.amend`, as the graph
/// cache and `amend export-onnx` write it) to vouch for them: their sha256 and length, the same
/// model and builder, no MAC. What anyone who can write the directory can do: tests of damaged
/// and planted graphs use it. Returns the sidecar's text.
pub fn forge_graph_sidecar(graph: &Path, bytes: &[u8]) -> std::io::Result<String> {
    use sha2::Digest;
    let mut side = graph.as_os_str().to_owned();
    side.push(".amend");
    let sha: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    let text: String = std::fs::read_to_string(&side)?
        .lines()
        .filter(|l| !l.starts_with("mac "))
        .map(|l| match l.split_once(' ') {
            Some(("sha256", _)) => format!("sha256 {sha}\n"),
            Some(("bytes", _)) => format!("bytes {}\n", bytes.len()),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(graph, bytes)?;
    std::fs::write(&side, &text)?;
    Ok(text)
}
