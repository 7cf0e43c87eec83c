//! Reading a GGUF into a [`Model`]: metadata -> [`Config`], tensors dequantized to f32.
//!
//! The header is read and its hyperparameters validated by the one GGUF reader
//! ([`amend_edits::gguf`], the same check the runtime runs before llama.cpp loads the file);
//! candle only dequantizes the tensor bytes.

use super::{Arch, Config, Forward, Layer, Model, Proj};
use crate::error::{CompileError, Result};
use amend_edits::gguf::{GgmlType, GgufFile, GgufHeader, GgufValue, ModelHparams};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The validated header and an open file of a GGUF model.
pub struct Weights {
    header: GgufHeader,
    hparams: ModelHparams,
    arch: Arch,
    file: File,
    path: PathBuf,
    device: Device,
}

/// candle's name for a ggml type id (the types candle can dequantize).
fn candle_dtype(t: GgmlType) -> Option<GgmlDType> {
    use GgmlDType::*;
    Some(match t.0 {
        0 => F32,
        1 => F16,
        2 => Q4_0,
        3 => Q4_1,
        6 => Q5_0,
        7 => Q5_1,
        8 => Q8_0,
        9 => Q8_1,
        10 => Q2K,
        11 => Q3K,
        12 => Q4K,
        13 => Q5K,
        14 => Q6K,
        15 => Q8K,
        30 => BF16,
        _ => return None,
    })
}

impl Weights {
    /// Reads and validates the header; fails with [`CompileError::UnsupportedArchitecture`] when
    /// the compiler has no forward for the model's architecture.
    pub fn open(path: &Path) -> Result<Weights> {
        // A FIFO, directory or device is refused without blocking (issue 11).
        let (file, _) = amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
            .map_err(|e| CompileError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let bad = |message: String| CompileError::BadGguf {
            path: path.to_path_buf(),
            message,
        };
        let header = GgufFile::read_header(path).map_err(|e| bad(e.to_string()))?;
        let name = header
            .architecture()
            .ok_or_else(|| CompileError::MissingMetadata("general.architecture".into()))?;
        let arch = super::arch_from_gguf_name(name)?;
        let hparams = ModelHparams::from_header(&header).map_err(|e| CompileError::BadGguf {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Weights {
            header,
            hparams,
            arch,
            file,
            path: path.to_path_buf(),
            device: Device::Cpu,
        })
    }

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.header.get(key)
    }

    /// The device rounding of the input of a matmul with weight `name` (see
    /// [`super::vec_dot_type`]).
    pub fn act_quant(&self, name: &str) -> Option<GgmlDType> {
        self.header
            .tensor(name)
            .and_then(|t| candle_dtype(t.ggml_type))
            .and_then(super::vec_dot_type)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.header.tensor(name).is_some()
    }

    /// A tensor dequantized to f32, in candle's (row-major, reversed ggml) shape.
    pub fn tensor(&mut self, name: &str) -> Result<Tensor> {
        let t = self
            .header
            .tensor(name)
            .ok_or_else(|| CompileError::MissingTensor(name.to_string()))?;
        let dtype = candle_dtype(t.ggml_type).ok_or_else(|| {
            CompileError::UnsupportedModel(format!(
                "tensor `{name}` has type {}, which candle cannot dequantize",
                t.ggml_type
            ))
        })?;
        let bad = |message: String| CompileError::BadGguf {
            path: self.path.clone(),
            message,
        };
        let size = t.byte_size().map_err(|e| bad(e.to_string()))?;
        let mut raw = vec![0u8; size as usize];
        let io = |source| CompileError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .seek(SeekFrom::Start(self.header.data_offset + t.offset))
            .map_err(io)?;
        self.file.read_exact(&mut raw).map_err(io)?;
        let dims: Vec<usize> = t.ne.iter().rev().map(|&d| d as usize).collect();
        let q = qtensor_from_ggml(dtype, &raw, dims, &self.device)?;
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
        Ok(self.arch.name().to_string())
    }

    /// The model's [`Config`] from its metadata (derived by the runtime, for every backend).
    pub fn config(&self) -> Result<Config> {
        use amend_runtime::ConfigError as E;
        Config::from_hparams(&self.hparams, self.arch).map_err(|e| match e {
            E::Unsupported(m) => CompileError::UnsupportedModel(m),
            E::MissingMetadata(k) => CompileError::MissingMetadata(k),
        })
    }
}

impl Model {
    /// Reads the GGUF at `path` and dequantizes every tensor of the forward to f32.
    pub fn load(path: &Path) -> Result<Model> {
        Model::from_weights(Weights::open(path)?)
    }

    /// Dequantizes every tensor of the forward from an opened [`Weights`].
    pub fn from_weights(mut w: Weights) -> Result<Model> {
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
        if cfg.arch.spec().forward == Some(Forward::Gemma3)
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
