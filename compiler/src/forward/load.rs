//! Reading a GGUF into a [`Model`]: metadata -> [`Config`], tensors dequantized to f32.

use super::{Arch, Config, Layer, Model, Proj};
use crate::error::{CompileError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// The metadata and an open reader of a GGUF file.
pub struct Weights {
    content: Content,
    reader: BufReader<File>,
    device: Device,
}

impl Weights {
    pub fn open(path: &Path) -> Result<Weights> {
        // A FIFO, directory or device is refused without blocking (issue 11).
        let (file, _) = amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
            .map_err(|e| CompileError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| CompileError::BadGguf {
            path: path.to_path_buf(),
            message: crate::error::candle_message(&e),
        })?;
        Ok(Weights {
            content,
            reader,
            device: Device::Cpu,
        })
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn u32(&self, key: &str) -> Result<usize> {
        self.u32_opt(key)?
            .ok_or_else(|| CompileError::MissingMetadata(key.to_string()))
    }

    fn u32_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_u32()
                .map(|x| Some(x as usize))
                .or_else(|_| v.to_u64().map(|x| Some(x as usize)))
                .or_else(|_| v.to_i32().map(|x| Some(x.max(0) as usize)))
                .map_err(|_| {
                    CompileError::UnsupportedModel(format!("metadata `{key}` is not an integer"))
                }),
        }
    }

    fn f32_opt(&self, key: &str) -> Result<Option<f32>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v.to_f32().map(Some).map_err(|_| {
                CompileError::UnsupportedModel(format!("metadata `{key}` is not a float"))
            }),
        }
    }

    /// The device rounding of the input of a matmul with weight `name` (see
    /// [`super::vec_dot_type`]).
    pub fn act_quant(&self, name: &str) -> Option<GgmlDType> {
        self.content
            .tensor_infos
            .get(name)
            .and_then(|i| super::vec_dot_type(i.ggml_dtype))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor dequantized to f32, in candle's (row-major, reversed ggml) shape.
    pub fn tensor(&mut self, name: &str) -> Result<Tensor> {
        if !self.has_tensor(name) {
            return Err(CompileError::MissingTensor(name.to_string()));
        }
        let q = self.content.tensor(&mut self.reader, name, &self.device)?;
        Ok(q.dequantize(&self.device)?)
    }

    pub fn tensor_opt(&mut self, name: &str) -> Result<Option<Tensor>> {
        if self.has_tensor(name) {
            self.tensor(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The architecture name (`general.architecture`).
    pub fn arch_name(&self) -> Result<String> {
        let v = self
            .metadata("general.architecture")
            .ok_or_else(|| CompileError::MissingMetadata("general.architecture".into()))?;
        v.to_string().map(|s| s.to_string()).map_err(|_| {
            CompileError::UnsupportedModel("general.architecture is not a string".into())
        })
    }

    /// The model's [`Config`] from its metadata.
    pub fn config(&self) -> Result<Config> {
        let arch = Arch::from_gguf_name(&self.arch_name()?)?;
        let a = arch.name();
        let k = |s: &str| format!("{a}.{s}");
        let n_layer = self.u32(&k("block_count"))?;
        let n_embd = self.u32(&k("embedding_length"))?;
        let n_ff = self.u32(&k("feed_forward_length"))?;
        let n_head = self.u32(&k("attention.head_count"))?;
        let n_head_kv = self
            .u32_opt(&k("attention.head_count_kv"))?
            .unwrap_or(n_head);
        let head_dim = self
            .u32_opt(&k("attention.key_length"))?
            .unwrap_or(n_embd / n_head.max(1));
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || head_dim % 2 != 0 {
            return Err(CompileError::UnsupportedModel(format!(
                "head counts {n_head}/{n_head_kv} with head size {head_dim}"
            )));
        }
        if let Some(n_rot) = self.u32_opt(&k("rope.dimension_count"))? {
            if n_rot != head_dim {
                return Err(CompileError::UnsupportedModel(format!(
                    "partial RoPE ({n_rot} of {head_dim} dims)"
                )));
            }
        }
        let rms_eps = self
            .f32_opt(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| CompileError::MissingMetadata(k("attention.layer_norm_rms_epsilon")))?
            as f64;
        let rope_base = self.f32_opt(&k("rope.freq_base"))?.unwrap_or(10000.0);
        let rope_base_swa = self.f32_opt(&k("rope.freq_base_swa"))?.unwrap_or(10000.0);
        let rope_freq_scale = match self
            .metadata(&k("rope.scaling.type"))
            .map(|v| v.to_string())
        {
            None => 1.0,
            Some(Ok(t)) if t == "none" => 1.0,
            Some(Ok(t)) if t == "linear" => {
                1.0 / self.f32_opt(&k("rope.scaling.factor"))?.unwrap_or(1.0)
            }
            Some(Ok(t)) => {
                return Err(CompileError::UnsupportedModel(format!(
                    "RoPE scaling `{t}`"
                )));
            }
            Some(Err(_)) => 1.0,
        };

        let mut sliding_window = None;
        let mut swa_layers = vec![false; n_layer];
        if arch == Arch::Gemma3 {
            if let Some(w) = self
                .u32_opt(&k("attention.sliding_window"))?
                .filter(|&w| w > 0)
            {
                sliding_window = Some(w);
                // llama.cpp: an explicit per-layer array, else a period (default 6: five
                // sliding-window layers, then one full-attention layer).
                let key = k("attention.sliding_window_pattern");
                match self.metadata(&key) {
                    Some(Value::Array(vals)) => {
                        for (i, v) in vals.iter().enumerate().take(n_layer) {
                            swa_layers[i] = v.to_bool().unwrap_or(false);
                        }
                    }
                    _ => {
                        let p = self.u32_opt(&key)?.unwrap_or(6);
                        for (il, s) in swa_layers.iter_mut().enumerate() {
                            *s = p == 0 || il % p < p - 1;
                        }
                    }
                }
            }
        }

        let attn_scale = match arch {
            // gemma_pytorch: 27B scales by n_embd/n_head, the others by the head size.
            Arch::Gemma3 if n_layer == 62 => 1.0 / ((n_embd / n_head) as f64).sqrt(),
            Arch::Gemma3 => 1.0 / (head_dim as f64).sqrt(),
            _ => match self.f32_opt(&k("attention.scale"))? {
                Some(s) if s != 0.0 => s as f64,
                _ => 1.0 / (head_dim as f64).sqrt(),
            },
        };
        let final_softcap = match arch {
            Arch::Gemma3 => self
                .f32_opt(&k("final_logit_softcapping"))?
                .filter(|&c| c != 0.0)
                .map(|c| c as f64),
            _ => None,
        };
        // candle reports shapes reversed from ggml's ne: [n_vocab, n_embd].
        let n_vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(CompileError::MissingTensor("token_embd.weight".into())),
        };
        Ok(Config {
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
            rope_neox: arch != Arch::Llama,
            sliding_window,
            swa_layers,
            attn_scale,
            embed_scale: (arch == Arch::Gemma3).then(|| (n_embd as f64).sqrt()),
            final_softcap,
        })
    }
}

impl Model {
    /// Reads the GGUF at `path` and dequantizes every tensor of the forward to f32.
    pub fn load(path: &Path) -> Result<Model> {
        let mut w = Weights::open(path)?;
        let cfg = w.config()?;
        let tok_embd = w.tensor("token_embd.weight")?;
        let output = w.tensor_opt("output.weight")?;
        let output_norm = w.tensor("output_norm.weight")?;
        let rope_freqs = w.tensor_opt("rope_freqs.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let mut t = |s: &str| w.tensor(&format!("blk.{il}.{s}"));
            let attn_norm = t("attn_norm.weight")?;
            let wq = t("attn_q.weight")?;
            let wk = t("attn_k.weight")?;
            let wv = t("attn_v.weight")?;
            let wo = t("attn_output.weight")?;
            let ffn_norm = t("ffn_norm.weight")?;
            let w_gate = t("ffn_gate.weight")?;
            let w_up = t("ffn_up.weight")?;
            let w_down = t("ffn_down.weight")?;
            let act_quant = [
                Proj::Q,
                Proj::K,
                Proj::V,
                Proj::O,
                Proj::Gate,
                Proj::Up,
                Proj::Down,
            ]
            .map(|p| w.act_quant(&p.weight_name(il)));
            let mut o = |s: &str| w.tensor_opt(&format!("blk.{il}.{s}"));
            let layer = Layer {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                bq: o("attn_q.bias")?,
                bk: o("attn_k.bias")?,
                bv: o("attn_v.bias")?,
                q_norm: o("attn_q_norm.weight")?,
                k_norm: o("attn_k_norm.weight")?,
                attn_post_norm: o("post_attention_norm.weight")?,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
                ffn_post_norm: o("post_ffw_norm.weight")?,
                act_quant,
            };
            layers.push(layer);
        }
        if cfg.arch == Arch::Gemma3
            && layers
                .iter()
                .any(|l| l.attn_post_norm.is_none() || l.ffn_post_norm.is_none())
        {
            return Err(CompileError::MissingTensor(
                "blk.N.post_attention_norm/post_ffw_norm".into(),
            ));
        }
        let output_act_quant = if output.is_some() {
            w.act_quant("output.weight")
        } else {
            w.act_quant("token_embd.weight")
        };
        Ok(Model {
            output_act_quant,
            emulate_device: false,
            cfg,
            tok_embd,
            output,
            output_norm,
            rope_freqs,
            layers,
            device: Device::Cpu,
        })
    }
}
