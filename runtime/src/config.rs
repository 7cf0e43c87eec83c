//! A model's forward constants from its GGUF metadata: what every forward implementation (the
//! compiler's candle forward, the ONNX graph builder) needs beyond the validated
//! [`ModelHparams`]. One derivation, so the backends cannot disagree on, say, which gemma3
//! layers use the sliding window.

use amend_edits::gguf::{ModelHparams, SwaPattern};

use crate::arch::{Architecture, Forward};

/// Why a model's constants could not be derived.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing metadata `{0}`")]
    MissingMetadata(String),
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
    /// Derives the constants of `arch` from a validated file's hyperparameters.
    pub fn from_hparams(hp: &ModelHparams, arch: Architecture) -> Result<ModelConfig, ConfigError> {
        let gemma = arch.spec().forward == Some(Forward::Gemma3);
        // Every value below was read and type-checked once, by `ModelHparams::from_header`.
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
        let rms_eps = hp.rms_eps.ok_or_else(|| {
            ConfigError::MissingMetadata(format!(
                "{}.attention.layer_norm_rms_epsilon",
                arch.name()
            ))
        })? as f64;
        // llama.cpp's defaults where a key is absent.
        let rope_base = hp.rope_freq_base.unwrap_or(10000.0);
        let rope_base_swa = hp.rope_freq_base_swa.unwrap_or(10000.0);
        // As llama.cpp: no type means "linear", and the factor (0: none) divides positions.
        let rope_freq_scale = match hp.rope_scaling.as_deref() {
            Some("none") => 1.0,
            None | Some("linear") => match hp.rope_scaling_factor {
                Some(f) if f != 0.0 => 1.0 / f,
                _ => 1.0,
            },
            Some(t) => {
                return Err(ConfigError::Unsupported(format!("RoPE scaling `{t}`")));
            }
        };

        let mut sliding_window = None;
        let mut swa_layers = vec![false; n_layer];
        if gemma {
            if let Some(w) = hp.sliding_window.filter(|&w| w > 0) {
                sliding_window = Some(w as usize);
                // llama.cpp: an explicit per-layer array, else a period (default 6: five
                // sliding-window layers, then one full-attention layer).
                swa_layers = SwaPattern::layers(hp.sliding_window_pattern.as_ref(), n_layer, 6);
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
            match hp.attention_scale {
                Some(s) if s != 0.0 => s as f64,
                _ => 1.0 / (head_dim as f64).sqrt(),
            }
        };
        let final_softcap = if gemma {
            hp.final_logit_softcapping
                .filter(|&c| c != 0.0)
                .map(|c| c as f64)
        } else {
            None
        };
        // The parser ties `token_embd.weight` (required by the architecture table) to
        // [n_embd, n_vocab].
        let n_vocab = hp.n_vocab as usize;
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

#[cfg(test)]
mod tests {
    use super::*;
    use amend_edits::gguf::{GgufArray, GgufFile, GgufValue};

    /// The tiny llama's header under `arch`'s name, with `extra` keys set (`{a}` is the name).
    fn header(arch: Architecture, extra: &[(&str, GgufValue)]) -> Result<ModelConfig, String> {
        let dir = std::env::temp_dir().join(format!("amend-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tiny.gguf");
        if !p.exists() {
            // Written aside and renamed: tests run in parallel.
            let tmp =
                dir.join(format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
            crate::testutil::write_tiny_model(&tmp, Architecture::Llama, 7).unwrap();
            std::fs::rename(&tmp, &p).unwrap();
        }
        let bytes = std::fs::read(&p).unwrap();
        let mut h = GgufFile::parse(&bytes).unwrap().header;
        let a = arch.name();
        for (k, v) in h.metadata.iter_mut() {
            if let Some(rest) = k.strip_prefix("llama.") {
                *k = format!("{a}.{rest}");
            } else if k == "general.architecture" {
                *v = GgufValue::String(a.to_string());
            }
        }
        for (k, v) in extra {
            let k = k.replace("{a}", a);
            h.metadata.retain(|(x, _)| *x != k);
            h.metadata.push((k, v.clone()));
        }
        let hp = ModelHparams::from_header(&h).map_err(|e| e.to_string())?;
        ModelConfig::from_hparams(&hp, arch).map_err(|e| e.to_string())
    }

    #[test]
    fn sliding_window_layers_in_every_form_llama_cpp_reads() {
        let g = Architecture::Gemma3;
        let window = ("{a}.attention.sliding_window", GgufValue::U32(4));
        let pattern = |v: GgufValue| [window.clone(), ("{a}.attention.sliding_window_pattern", v)];
        let n = header(g, &[]).unwrap().n_layer;
        // The default period, 6: five windowed layers, then a full one.
        let c = header(g, std::slice::from_ref(&window)).unwrap();
        assert_eq!(c.sliding_window, Some(4));
        assert_eq!(
            c.swa_layers,
            (0..n).map(|il| il % 6 < 5).collect::<Vec<_>>()
        );
        let c = header(g, &pattern(GgufValue::U32(2))).unwrap();
        assert_eq!(
            c.swa_layers,
            (0..n).map(|il| il % 2 == 0).collect::<Vec<_>>()
        );
        // Arrays of bool, u32 and i32 (non-zero: windowed); layers past the end attend fully.
        let want: Vec<bool> = (0..n).map(|il| il == 0).collect();
        for v in [
            GgufValue::Array(GgufArray::Bool(vec![true])),
            GgufValue::Array(GgufArray::U32(vec![7])),
            GgufValue::Array(GgufArray::I32(vec![-1])),
        ] {
            assert_eq!(
                header(g, &pattern(v.clone())).unwrap().swa_layers,
                want,
                "{v:?}"
            );
        }
        let e = header(
            g,
            &pattern(GgufValue::Array(GgufArray::Bool(vec![true; 513]))),
        )
        .unwrap_err();
        assert!(
            e.contains("513 entries, llama.cpp takes at most 512"),
            "{e}"
        );
    }

    #[test]
    fn rope_scaling_as_llama_cpp_reads_it() {
        let l = Architecture::Llama;
        let scale = |extra: &[(&str, GgufValue)]| header(l, extra).map(|c| c.rope_freq_scale);
        assert_eq!(scale(&[]), Ok(1.0));
        // No type is llama.cpp's "linear"; the older key is read when the newer one is absent.
        let factor = ("{a}.rope.scaling.factor", GgufValue::F32(4.0));
        assert_eq!(scale(std::slice::from_ref(&factor)), Ok(0.25));
        assert_eq!(
            scale(&[("{a}.rope.scale_linear", GgufValue::F32(2.0))]),
            Ok(0.5)
        );
        let typed = |t: &str| ("{a}.rope.scaling.type", GgufValue::String(t.into()));
        assert_eq!(scale(&[typed("linear"), factor.clone()]), Ok(0.25));
        assert_eq!(scale(&[typed("none"), factor.clone()]), Ok(1.0));
        assert_eq!(
            scale(&[("{a}.rope.scaling.factor", GgufValue::F32(0.0))]),
            Ok(1.0)
        );
        let e = scale(&[typed("yarn"), factor]).unwrap_err();
        assert!(e.contains("RoPE scaling `yarn`"), "{e}");
        let e = scale(&[typed("foo")]).unwrap_err();
        assert!(e.contains("none, linear, yarn, longrope"), "{e}");
    }
}
