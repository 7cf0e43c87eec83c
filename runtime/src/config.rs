//! A model's forward constants from its GGUF metadata: what every forward implementation (the
//! compiler's candle forward, the ONNX graph builder) needs beyond the validated
//! [`ModelHparams`]. One derivation, so the backends cannot disagree on, say, which gemma3
//! layers use the sliding window.

use amend_edits::gguf::{GgufArray, GgufHeader, GgufValue, ModelHparams};

use crate::arch::{Architecture, Forward};

/// Why a model's constants could not be derived.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing metadata `{0}`")]
    MissingMetadata(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
}

/// Dimensions and constants of a model, from its GGUF metadata.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub rms_eps: f64,
    /// RoPE base of full-attention layers and of sliding-window layers.
    pub rope_base: f32,
    pub rope_base_swa: f32,
    /// Position multiplier of full-attention layers (linear RoPE scaling; 1 when none).
    pub rope_freq_scale: f32,
    /// NEOX RoPE rotates the two halves of a head; the llama ("normal") style rotates pairs.
    pub rope_neox: bool,
    /// Sliding window size and which layers use it.
    pub sliding_window: Option<usize>,
    pub swa_layers: Vec<bool>,
    /// Multiplier of the attention scores.
    pub attn_scale: f64,
    /// Multiplier of the token embeddings (gemma: sqrt(n_embd)).
    pub embed_scale: Option<f64>,
    /// Final logit soft-capping (tanh), when the model has it.
    pub final_softcap: Option<f64>,
}

impl ModelConfig {
    /// Derives the constants of `arch` from a validated header.
    pub fn from_gguf(
        header: &GgufHeader,
        hp: &ModelHparams,
        arch: Architecture,
    ) -> Result<ModelConfig, ConfigError> {
        let gemma = arch.spec().forward == Some(Forward::Gemma3);
        let a = arch.name();
        let k = |s: &str| format!("{a}.{s}");
        let u32_opt = |key: &str| -> Result<Option<usize>, ConfigError> {
            match header.get(key) {
                None => Ok(None),
                Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                    ConfigError::Unsupported(format!("metadata `{key}` is not an integer"))
                }),
            }
        };
        let f32_opt = |key: &str| -> Result<Option<f32>, ConfigError> {
            match header.get(key) {
                None => Ok(None),
                Some(v) => v.as_f32().map(Some).ok_or_else(|| {
                    ConfigError::Unsupported(format!("metadata `{key}` is not a float"))
                }),
            }
        };
        // Head counts, head sizes, RoPE width and epsilons were validated with the header.
        let n_layer = hp.n_layer as usize;
        let n_embd = hp.n_embd as usize;
        let n_ff = hp.n_ff[0] as usize;
        let n_head = hp.n_head[0] as usize;
        let n_head_kv = hp.n_head_kv[0] as usize;
        let head_dim = hp.head_dim_k as usize;
        let uniform = |v: &[u32]| v.iter().all(|&x| x == v[0]);
        if n_ff == 0 || !uniform(&hp.n_ff) || !uniform(&hp.n_head) || !uniform(&hp.n_head_kv) {
            return Err(ConfigError::Unsupported(
                "per-layer FFN widths or head counts".into(),
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(ConfigError::Unsupported(format!(
                "head counts {n_head}/{n_head_kv} with head size {head_dim}"
            )));
        }
        let rms_eps = hp
            .rms_eps
            .ok_or_else(|| ConfigError::MissingMetadata(k("attention.layer_norm_rms_epsilon")))?
            as f64;
        let rope_base = f32_opt(&k("rope.freq_base"))?.unwrap_or(10000.0);
        let rope_base_swa = f32_opt(&k("rope.freq_base_swa"))?.unwrap_or(10000.0);
        let rope_freq_scale = match header.get(&k("rope.scaling.type")) {
            None => 1.0,
            Some(GgufValue::String(t)) if t == "none" => 1.0,
            Some(GgufValue::String(t)) if t == "linear" => {
                1.0 / f32_opt(&k("rope.scaling.factor"))?.unwrap_or(1.0)
            }
            Some(GgufValue::String(t)) => {
                return Err(ConfigError::Unsupported(format!("RoPE scaling `{t}`")));
            }
            Some(_) => 1.0,
        };

        let mut sliding_window = None;
        let mut swa_layers = vec![false; n_layer];
        if gemma {
            if let Some(w) = u32_opt(&k("attention.sliding_window"))?.filter(|&w| w > 0) {
                sliding_window = Some(w);
                // llama.cpp: an explicit per-layer array, else a period (default 6: five
                // sliding-window layers, then one full-attention layer).
                let key = k("attention.sliding_window_pattern");
                match header.get(&key) {
                    Some(GgufValue::Array(GgufArray::Bool(vals))) => {
                        for (i, &v) in vals.iter().enumerate().take(n_layer) {
                            swa_layers[i] = v;
                        }
                    }
                    _ => {
                        let p = u32_opt(&key)?.unwrap_or(6);
                        for (il, s) in swa_layers.iter_mut().enumerate() {
                            *s = p == 0 || il % p < p - 1;
                        }
                    }
                }
            }
        }

        let attn_scale = if gemma {
            // gemma_pytorch: 27B scales by n_embd/n_head, the others by the head size.
            if n_layer == 62 {
                1.0 / ((n_embd / n_head) as f64).sqrt()
            } else {
                1.0 / (head_dim as f64).sqrt()
            }
        } else {
            match f32_opt(&k("attention.scale"))? {
                Some(s) if s != 0.0 => s as f64,
                _ => 1.0 / (head_dim as f64).sqrt(),
            }
        };
        let final_softcap = if gemma {
            f32_opt(&k("final_logit_softcapping"))?
                .filter(|&c| c != 0.0)
                .map(|c| c as f64)
        } else {
            None
        };
        // ggml's ne of the embeddings is [n_embd, n_vocab].
        let n_vocab = match header.tensor("token_embd.weight").map(|t| t.ne.get(1)) {
            Some(Some(&n)) => n as usize,
            Some(None) => {
                return Err(ConfigError::Unsupported(
                    "token_embd.weight is not a matrix".into(),
                ))
            }
            None => return Err(ConfigError::MissingTensor("token_embd.weight".into())),
        };
        Ok(ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            rms_eps,
            rope_base,
            rope_base_swa,
            rope_freq_scale,
            rope_neox: arch.spec().rope_neox,
            sliding_window,
            swa_layers,
            attn_scale,
            embed_scale: gemma.then(|| (n_embd as f64).sqrt()),
            final_softcap,
        })
    }
}
