//! A tiny random-weight model for fast tests (here and in other crates): a 2-layer
//! llama-family GGUF with a small SentencePiece-style vocabulary that llama.cpp accepts.

use std::path::Path;

use amend_edits::gguf::GgufWriter;

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
        w.add_tensor_f32(name, ne, &data).map(|_| ()).map_err(err)
    };
    let emb = rng.vec((n_embd * n_vocab) as usize, 1.0);
    t(&mut w, "token_embd.weight", &[n_embd, n_vocab], emb)?;
    t(&mut w, "output_norm.weight", &[n_embd], ones(n_embd))?;
    let out = rng.vec((n_embd * n_vocab) as usize, 0.3);
    t(&mut w, "output.weight", &[n_embd, n_vocab], out)?;
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
