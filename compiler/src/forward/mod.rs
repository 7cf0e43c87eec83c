//! A differentiable forward pass of the supported architectures in candle, read from the same
//! GGUF the device runs (weights dequantized to f32) and following llama.cpp's graphs
//! (`src/models/gemma3.cpp`, `llama.cpp`, `qwen2.cpp`, `qwen3.cpp` of llama-cpp-sys-2 0.1.161)
//! step by step, so that what is trained here is what the runtime computes.
//!
//! Edits plug in through [`Hooks`]: at every hook site ([`amend_edits::Site`]) of every layer
//! the hook may read the tensor or return a replacement (a captured row, a replaced row, an
//! added trainable tensor), and every linear projection may get an extra output (LoRA, rank-one
//! deltas). Rows are positions, columns are features: the tensor at a site is `[T, n_embd]`.

mod hooks;
mod load;

pub use hooks::{AddAt, Capture, HookList, Hooks, Proj, ReplaceRow};
pub use load::Weights;

use crate::error::{CompileError, Result};
use amend_edits::{HookPoint, Site};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};

/// Architectures come from the runtime's architecture table; [`Forward`] says which forward
/// below runs one.
pub use amend_runtime::{Architecture as Arch, Forward};

/// The architecture named `name` (GGUF `general.architecture`) when the compiler has a forward
/// for it.
pub fn arch_from_gguf_name(name: &str) -> Result<Arch> {
    Arch::from_name(name)
        .filter(|a| a.spec().forward.is_some())
        .ok_or_else(|| CompileError::UnsupportedArchitecture {
            arch: name.to_string(),
            supported: Arch::all()
                .filter(|a| a.spec().forward.is_some())
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Dimensions and constants of a model, derived once by the runtime for every backend.
pub use amend_runtime::ModelConfig as Config;

/// One transformer block's weights, f32, `[out, in]` like the GGUF stores them.
pub struct Layer {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub attn_post_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
    pub ffn_post_norm: Option<Tensor>,
    /// How the device rounds each projection's input (see [`device_rounding`]), by [`Proj`].
    pub act_quant: [Option<GgmlDType>; 7],
}

/// The model: config and f32 weights.
pub struct Model {
    pub cfg: Config,
    pub tok_embd: Tensor,
    /// The output projection when it is not tied to `tok_embd`.
    pub output: Option<Tensor>,
    pub output_norm: Tensor,
    pub rope_freqs: Option<Tensor>,
    pub layers: Vec<Layer>,
    pub device: Device,
    /// How the device rounds the output projection's input.
    pub output_act_quant: Option<GgmlDType>,
    /// Reproduce llama.cpp's CPU rounding (activations quantized to the weights' dot-product
    /// type, f16 K/V cache and f16-accumulating flash attention, the f16 GELU table) in the
    /// forward value, with straight-through gradients. Off by default: on gemma3-270m it makes
    /// one FFN exact (1e-7 relative) but moves top-1 agreement only from 95 to 96 of 100
    /// prompts (mean logit error 0.19 -> 0.22) and the forward 3x slower.
    pub emulate_device: bool,
}

impl Model {
    /// The output projection `[n_vocab, n_embd]` (the token embeddings when tied).
    pub fn output_weight(&self) -> &Tensor {
        self.output.as_ref().unwrap_or(&self.tok_embd)
    }

    /// Check a layer index given by a user.
    pub fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.n_layer {
            return Err(CompileError::LayerOutOfRange {
                layer,
                n_layer: self.cfg.n_layer,
            });
        }
        Ok(())
    }

    /// The residual stream entering layer 0: token embeddings, scaled where the architecture
    /// scales them, after the `Embeddings` hook.
    pub fn embed(&self, tokens: &[u32], hooks: &mut dyn Hooks) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.tok_embd.index_select(&ids, 0)?;
        if let Some(s) = self.cfg.embed_scale {
            x = (x * s)?;
        }
        apply(hooks, HookPoint::new(0, Site::Embeddings), x)
    }

    /// Full forward: logits `[logits_at.len(), n_vocab]` at the given positions.
    pub fn forward(
        &self,
        tokens: &[u32],
        hooks: &mut dyn Hooks,
        logits_at: &[usize],
    ) -> Result<Tensor> {
        let x = self.embed(tokens, hooks)?;
        let h = self.run_layers(0, x, hooks)?;
        self.logits(&h, logits_at)
    }

    /// Runs layers `start..n_layer` on `x`, the residual stream entering layer `start`
    /// (`[T, n_embd]`, positions 0..T), and returns the residual stream after the last layer.
    /// Training steps start at the edited layer with the cached (constant) input of that layer.
    pub fn run_layers(&self, start: usize, x: Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let t = x.dim(0)?;
        self.run_packed(start..self.cfg.n_layer, x, &[t], hooks)
    }

    /// Runs the blocks `layers` on several sequences packed one after another (`x` is the
    /// residual stream entering the first): `lens` are their lengths (summing to T); each
    /// sequence starts at position 0 and attends only to itself. A training step with KL
    /// prompts, or the keys of many short prompts, is one pass instead of one per prompt (the
    /// per-op cost of short sequences dominates on the CPU).
    pub fn run_packed(
        &self,
        layers: std::ops::Range<usize>,
        mut x: Tensor,
        lens: &[usize],
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let layout = self.layout(lens)?;
        if layout.rows != x.dim(0)? {
            let msg = format!(
                "packed lengths sum to {} rows, the stream has {}",
                layout.rows,
                x.dim(0)?
            );
            return Err(candle_core::Error::Msg(msg).into());
        }
        for il in layers {
            x = self.block(il, &x, &layout, hooks)?;
        }
        Ok(x)
    }

    /// Runs the single block `il` on `x`, the residual stream entering it.
    pub fn run_one(&self, il: usize, x: Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let layout = self.layout(&[x.dim(0)?])?;
        self.block(il, &x, &layout, hooks)
    }

    /// Final norm and output projection of the rows `at` of the last residual stream.
    pub fn logits(&self, h: &Tensor, at: &[usize]) -> Result<Tensor> {
        let idx: Vec<u32> = at.iter().map(|&p| p as u32).collect();
        let rows = h.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
        let rows = rms_norm(&rows, &self.output_norm, self.cfg.rms_eps)?;
        let rows = match self.output_act_quant.filter(|_| self.emulate_device) {
            Some(dt) => device_rounding(&rows, dt)?,
            None => rows,
        };
        let mut logits = frozen_matmul(&rows, self.output_weight())?;
        if let Some(cap) = self.cfg.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }

    /// One transformer block, as llama.cpp builds it for the architecture.
    fn block(
        &self,
        il: usize,
        x: &Tensor,
        layout: &Layout,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let l = &self.layers[il];
        let gemma = self.cfg.arch.spec().forward == Some(Forward::Gemma3);

        // Attention.
        let h = rms_norm(x, &l.attn_norm, self.cfg.rms_eps)?;
        let mut attn = self.attention(il, &h, layout, hooks)?;
        if let Some(w) = &l.attn_post_norm {
            attn = rms_norm(&attn, w, self.cfg.rms_eps)?;
        }
        let attn = apply(hooks, HookPoint::new(il as u32, Site::AttnOutput), attn)?;
        let x = (x + attn)?;

        // Feed-forward: gated, GELU (tanh) on gemma, SiLU on the llama family.
        let h = rms_norm(&x, &l.ffn_norm, self.cfg.rms_eps)?;
        let h = apply(hooks, HookPoint::new(il as u32, Site::FfnInput), h)?;
        let gate = linear(
            hooks,
            il,
            Proj::Gate,
            &h,
            &l.w_gate,
            None,
            self.round(il, Proj::Gate),
        )?;
        let up = linear(
            hooks,
            il,
            Proj::Up,
            &h,
            &l.w_up,
            None,
            self.round(il, Proj::Up),
        )?;
        let act = if !gemma {
            gate.silu()?
        } else if self.emulate_device {
            // ggml's CPU GELU is a table lookup: f16 input, f16 output.
            device_rounding(
                &device_rounding(&gate, GgmlDType::F16)?.gelu()?,
                GgmlDType::F16,
            )?
        } else {
            gate.gelu()?
        };
        let mut ffn = linear(
            hooks,
            il,
            Proj::Down,
            &(act * up)?,
            &l.w_down,
            None,
            self.round(il, Proj::Down),
        )?;
        if let Some(w) = &l.ffn_post_norm {
            ffn = rms_norm(&ffn, w, self.cfg.rms_eps)?;
        }
        let ffn = apply(hooks, HookPoint::new(il as u32, Site::FfnOutput), ffn)?;
        let x = (x + ffn)?;
        apply(hooks, HookPoint::new(il as u32, Site::ResidualOut), x)
    }

    /// Self-attention of layer `il` on the normed input `h` (`[T, n_embd]`), output projected
    /// back to `[T, n_embd]`.
    fn attention(
        &self,
        il: usize,
        h: &Tensor,
        layout: &Layout,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let l = &self.layers[il];
        let t = h.dim(0)?;
        let (nh, nkv, hd) = (c.n_head, c.n_head_kv, c.head_dim);

        let q = linear(
            hooks,
            il,
            Proj::Q,
            h,
            &l.wq,
            l.bq.as_ref(),
            self.round(il, Proj::Q),
        )?
        .reshape((t, nh, hd))?;
        let k = linear(
            hooks,
            il,
            Proj::K,
            h,
            &l.wk,
            l.bk.as_ref(),
            self.round(il, Proj::K),
        )?
        .reshape((t, nkv, hd))?;
        let v = linear(
            hooks,
            il,
            Proj::V,
            h,
            &l.wv,
            l.bv.as_ref(),
            self.round(il, Proj::V),
        )?
        .reshape((t, nkv, hd))?;
        // q/k norms (gemma3, qwen3) come before RoPE.
        let q = match &l.q_norm {
            Some(w) => rms_norm(&q, w, c.rms_eps)?,
            None => q,
        };
        let k = match &l.k_norm {
            Some(w) => rms_norm(&k, w, c.rms_eps)?,
            None => k,
        };
        let (mask, (cos, sin)) = if c.swa_layers[il] {
            (&layout.swa_mask, &layout.swa_rope)
        } else {
            (&layout.mask, &layout.rope)
        };
        let mut q = rope(&q, cos, sin, c.rope_neox)?;
        let mut k = rope(&k, cos, sin, c.rope_neox)?;
        let mut v = v;
        if self.emulate_device {
            // The KV cache is f16 and CPU flash attention converts Q to f16.
            q = device_rounding(&q, GgmlDType::F16)?;
            k = device_rounding(&k, GgmlDType::F16)?;
            v = device_rounding(&v, GgmlDType::F16)?;
        }

        // Grouped-query attention: query heads [g*G, (g+1)*G) read kv head g (ggml broadcast).
        let g = nh / nkv;
        let q = q.transpose(0, 1)?.contiguous()?.reshape((nkv, g * t, hd))?;
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * c.attn_scale)?.reshape((nh, t, t))?;
        let scores = scores.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?.reshape((nkv, g * t, t))?;
        let mut out = probs.matmul(&v)?.reshape((nh, t, hd))?;
        if self.emulate_device {
            let emulated = flash_attention_f16(&q, &k, &v, mask, c.attn_scale as f32, g)?;
            out = (&out + (emulated - out.detach())?.detach())?;
        }
        let out = out.transpose(0, 1)?.contiguous()?;
        let out = out.reshape((t, nh * hd))?;
        linear(
            hooks,
            il,
            Proj::O,
            &out,
            &l.wo,
            None,
            self.round(il, Proj::O),
        )
    }

    /// The rounding of projection `proj`'s input at layer `il` when emulating the device.
    fn round(&self, il: usize, proj: Proj) -> Option<GgmlDType> {
        if self.emulate_device {
            self.layers[il].act_quant[proj as usize]
        } else {
            None
        }
    }

    /// The masks and RoPE tables of a stream made of sequences of lengths `lens`.
    fn layout(&self, lens: &[usize]) -> Result<Layout> {
        // Each row's sequence and position within it.
        let rows: Vec<(usize, usize)> = lens
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..n).map(move |p| (s, p)))
            .collect();
        let t = rows.len();
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        let mut full = vec![f32::NEG_INFINITY; t * t];
        let mut swa = vec![f32::NEG_INFINITY; t * t];
        for (i, &(si, pi)) in rows.iter().enumerate() {
            for (j, &(sj, pj)) in rows.iter().enumerate().take(i + 1) {
                if si != sj {
                    continue;
                }
                full[i * t + j] = 0.0;
                // llama.cpp masks a key when (query pos - key pos) >= n_swa.
                if pi - pj < window {
                    swa[i * t + j] = 0.0;
                }
            }
        }
        let positions: Vec<usize> = rows.iter().map(|&(_, p)| p).collect();
        let c = &self.cfg;
        Ok(Layout {
            rows: t,
            mask: Tensor::from_vec(full, (t, t), &self.device)?,
            swa_mask: Tensor::from_vec(swa, (t, t), &self.device)?,
            rope: self.rope_tables(&positions, c.rope_base, c.rope_freq_scale)?,
            swa_rope: self.rope_tables(&positions, c.rope_base_swa, 1.0)?,
        })
    }

    /// cos/sin tables `[T, head_dim/2]` for the rows' positions.
    fn rope_tables(
        &self,
        positions: &[usize],
        base: f32,
        freq_scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let mut inv: Vec<f32> = (0..half)
            .map(|i| base.powf(-2.0 * i as f32 / self.cfg.head_dim as f32))
            .collect();
        if let Some(f) = &self.rope_freqs {
            // llama3-style frequency factors divide theta.
            let f = f.to_vec1::<f32>()?;
            for (x, d) in inv.iter_mut().zip(f) {
                *x /= d;
            }
        }
        let t = positions.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for &p in positions {
            for &w in &inv {
                let theta = p as f32 * freq_scale * w;
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }
}

/// Additive attention masks `[T, T]` (full and sliding window) and RoPE tables of one stream.
struct Layout {
    rows: usize,
    mask: Tensor,
    swa_mask: Tensor,
    rope: (Tensor, Tensor),
    swa_rope: (Tensor, Tensor),
}

/// Calls the hook of `point` and returns its replacement, or `x` unchanged.
fn apply(hooks: &mut dyn Hooks, point: HookPoint, x: Tensor) -> Result<Tensor> {
    Ok(hooks.at(point, &x)?.unwrap_or(x))
}

/// `x W^T (+ b)` plus what the hooks add for this projection.
fn linear(
    hooks: &mut dyn Hooks,
    il: usize,
    proj: Proj,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    round: Option<GgmlDType>,
) -> Result<Tensor> {
    let xr = match round {
        Some(dt) => device_rounding(x, dt)?,
        None => x.clone(),
    };
    let mut y = frozen_matmul(&xr, w)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    if let Some(d) = hooks.linear_delta(il, proj, x)? {
        y = (y + d)?;
    }
    Ok(y)
}

/// `x W^T` for a frozen weight `w` (`[out, in]`, x `[T, in]`). candle's matmul backward always
/// computes the gradient of both operands; a frozen weight needs none, and for the tied output
/// projection (262k x 640 on gemma3) that gradient costs seconds per step. This op's backward
/// is `grad W` only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })?)
}

struct FrozenMatmul {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let data = storage.as_slice::<f32>()?;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: non-contiguous input".into()))?;
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// `x` rounded as llama.cpp's CPU backend rounds a matmul input (`dt`: the weights' dot-product
/// type: Q8_0 for the 32-blocks, Q8_K for k-quants, f16), with a straight-through gradient.
pub fn device_rounding(x: &Tensor, dt: GgmlDType) -> Result<Tensor> {
    let plain = x.detach().contiguous()?;
    let rounded = match dt {
        GgmlDType::F32 => return Ok(x.clone()),
        GgmlDType::F16 => plain.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
        GgmlDType::BF16 => plain.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        _ => {
            let shape = plain.shape().clone();
            let last = *shape.dims().last().unwrap_or(&0);
            if last % dt.block_size() != 0 {
                return Ok(x.clone());
            }
            let flat = plain.reshape(((), last))?;
            QTensor::quantize(&flat, dt)?
                .dequantize(x.device())?
                .reshape(shape)?
        }
    };
    // Forward value = rounded; gradient = identity.
    Ok((x + (rounded - &plain)?.detach())?)
}

/// The type llama.cpp's CPU backend converts a matmul input to for weights of type `w`.
pub fn vec_dot_type(w: GgmlDType) -> Option<GgmlDType> {
    use GgmlDType::*;
    match w {
        F32 => None,
        F16 => Some(F16),
        BF16 => Some(BF16),
        Q4_0 | Q5_0 | Q8_0 => Some(Q8_0),
        Q4_1 | Q5_1 => Some(Q8_1),
        Q8_1 => Some(Q8_1),
        _ => Some(Q8K),
    }
}

/// RMSNorm over the last dimension, times `w` (llama.cpp: `ggml_rms_norm` then `mul`; the
/// gemma converters store `1 + w`, so the same code serves both).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(w)?)
}

/// The value llama.cpp's CPU flash attention computes (`ggml_compute_forward_flash_attn_ext_f16`
/// with an f16 KV cache): scores are f32 dot products of the f16 query and key, the softmax is
/// online (running max) and the weighted sum of values is accumulated in f16, rescaled whenever
/// the max grows; the result is divided by the f32 sum at the end. `q` `[n_kv_head, G*T, hd]`
/// (query heads grouped by the KV head they read), `k`/`v` `[n_kv_head, T, hd]`, `mask` `[T, T]`
/// additive. Returns `[n_head, T, hd]`. Forward value only (no gradient).
fn flash_attention_f16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
    group: usize,
) -> Result<Tensor> {
    use half::f16;
    let r16 = |x: f32| f16::from_f32(x).to_f32();
    let (nkv, gt, hd) = q.dims3()?;
    let t = gt / group;
    let qv = q.detach().flatten_all()?.to_vec1::<f32>()?;
    let kv = k.detach().flatten_all()?.to_vec1::<f32>()?;
    let vv = v.detach().flatten_all()?.to_vec1::<f32>()?;
    let mv = mask.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; nkv * gt * hd];
    let mut acc = vec![0f32; hd];
    for h in 0..nkv {
        for row in 0..gt {
            let i = row % t;
            let qr: Vec<f32> = qv[(h * gt + row) * hd..][..hd]
                .iter()
                .map(|&x| r16(x))
                .collect();
            let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
            acc.iter_mut().for_each(|a| *a = 0.0);
            for j in 0..t {
                let bias = mv[i * t + j];
                if bias == f32::NEG_INFINITY {
                    continue;
                }
                let kr = &kv[(h * t + j) * hd..][..hd];
                let dot: f32 = qr.iter().zip(kr).map(|(a, b)| a * r16(*b)).sum();
                let s = dot * scale + bias;
                let (mut ms, mut vs) = (1f32, 1f32);
                if s > m {
                    ms = (m - s).exp();
                    m = s;
                    acc.iter_mut().for_each(|a| *a = r16(*a * ms));
                } else {
                    vs = (s - m).exp();
                }
                let vr = &vv[(h * t + j) * hd..][..hd];
                for (a, &x) in acc.iter_mut().zip(vr) {
                    *a = r16(*a + r16(x) * vs);
                }
                sum = sum * ms + vs;
            }
            let o = &mut out[(h * gt + row) * hd..][..hd];
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = a / sum;
            }
        }
    }
    Ok(Tensor::from_vec(out, (nkv * gt, hd), q.device())?.reshape((nkv * group, t, hd))?)
}

/// Numerically stable softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Rotary embedding of `x` `[T, heads, head_dim]` with tables `[T, head_dim/2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Tensor> {
    let (t, nh, hd) = x.dims3()?;
    let half = hd / 2;
    let cos = cos.reshape((t, 1, half))?;
    let sin = sin.reshape((t, 1, half))?;
    if neox {
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let b = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        Ok(Tensor::cat(&[a, b], 2)?)
    } else {
        let xp = x.reshape((t, nh, half, 2))?;
        let x1 = xp.narrow(3, 0, 1)?.squeeze(3)?;
        let x2 = xp.narrow(3, 1, 1)?.squeeze(3)?;
        let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let b = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        Ok(Tensor::stack(&[a, b], 3)?.reshape((t, nh, hd))?)
    }
}

/// Mean negative log-likelihood of `targets` under `logits` `[n, vocab]`.
pub fn nll(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let lp = log_softmax_last(logits)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = lp.gather(&idx, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

/// Row `i` of a `[T, n]` tensor replaced by `row` (`[n]` or `[1, n]`), differentiably.
pub fn replace_row(x: &Tensor, i: usize, row: &Tensor) -> Result<Tensor> {
    let (t, n) = x.dims2()?;
    let row = row.reshape((1, n))?.to_dtype(DType::F32)?;
    let mut parts = Vec::with_capacity(3);
    if i > 0 {
        parts.push(x.narrow(0, 0, i)?);
    }
    parts.push(row);
    if i + 1 < t {
        parts.push(x.narrow(0, i + 1, t - i - 1)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
