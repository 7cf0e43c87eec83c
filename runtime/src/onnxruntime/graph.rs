//! GGUF -> ONNX: the forward of a supported architecture as an ONNX graph, with the GGUF's
//! weights at their exact values ([`super::quant`]) and the KV cache as graph inputs and
//! outputs. Written to follow llama.cpp's graphs (`src/models/gemma3.cpp`, `llama.cpp`,
//! `qwen2.cpp`, `qwen3.cpp`) and the compiler's candle forward step by step.
//!
//! Inputs (T new tokens, P cached positions, S = P + T, R rows of logits):
//! - the tokens' embedding rows, read by the host ([`EmbeddingInput`]): `embd_codes` u8
//!   `[1, T, n_embd/32, 32]` and `embd_scales` f32 `[1, T, n_embd/32, 1]`, or `embd_rows` f32
//!   `[1, T, n_embd]`;
//! - `rope_cos`, `rope_sin` f32 `[T, head_dim/2]` (full-attention layers) and, when the model
//!   has sliding-window layers, `rope_cos_swa`, `rope_sin_swa`: computed on the host as ggml
//!   computes them;
//! - `mask` f32 `[T, S]` (additive: 0 or -inf) and, with sliding-window layers, `mask_swa`;
//! - `logit_rows` int64 `[R]`: the positions (0..T) whose logits are wanted;
//! - `past_key.{il}`, `past_value.{il}` f32 `[1, n_head_kv, P, head_dim]`.
//!
//! Outputs: `logits` f32 `[1, R, n_vocab]`, `present_key.{il}`, `present_value.{il}`
//! `[1, n_head_kv, S, head_dim]`. The residual stream at each hook site is a named tensor
//! (`blk.{il}.attn_output`, `ffn_input`, `ffn_output`, `residual_out`), the names of
//! [`amend_edits::Site`], mirroring the llama.cpp graph nodes the hooks use.

use amend_edits::gguf::{GgmlType, GgufFile, TensorInfo};
use amend_edits::{HookPoint, Site};

use super::onnx::{Attr, DataType, Dim, Graph, Node, TensorData, ValueInfo};
use super::quant::{self, LinearWeight, QuantError};
use super::slots::{self, SlotCapacity, SlotLayout};
use crate::arch::Forward;
use crate::config::ModelConfig;

/// Which operator set the graph may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// ORT's contrib ops (`MatMulNBits`, `SimplifiedLayerNormalization`): the CPU EP, and the
    /// OpenVINO EP, which takes both.
    Cpu,
    /// Standard ONNX ops only (opset 21): blockwise `DequantizeLinear` + `MatMul` for the
    /// weights, RMS norm from `ReduceMean`/`Sqrt`. For EPs without contrib ops.
    Portable,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Cpu => "cpu",
            Profile::Portable => "portable",
        }
    }
}

/// The shapes of the graph's inputs and outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shapes {
    /// Any number of new tokens over any cached length: the KV cache grows through the graph
    /// (`present_*` = past + new).
    Dynamic,
    /// Every dimension fixed, as QNN requires: `tokens` new tokens (the host pads a shorter
    /// chunk) attend over a KV window of `window` cached positions (the host masks the unused
    /// ones), one row of logits, and `present_*` are the new positions' K and V only
    /// (`[1, n_head_kv, tokens, head_dim]`), which the host writes into its window.
    Static { tokens: usize, window: usize },
}

impl Shapes {
    fn name(self) -> String {
        match self {
            Shapes::Dynamic => "dynamic".into(),
            Shapes::Static { tokens, window } => format!("static-{tokens}x{window}"),
        }
    }

    /// A dimension of the graph's interface: `T` new tokens, `P` cached positions, `S = P + T`
    /// keys, `R` rows of logits.
    fn dim(self, name: &str) -> Dim {
        match (self, name) {
            (Shapes::Static { tokens, .. }, "T") => Dim::Fixed(tokens as i64),
            (Shapes::Static { window, .. }, "P") => Dim::Fixed(window as i64),
            (Shapes::Static { tokens, window }, "S") => Dim::Fixed((window + tokens) as i64),
            (Shapes::Static { .. }, "R") => Dim::Fixed(1),
            _ => named(name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("tensor `{tensor}`: {detail}")]
    Tensor { tensor: String, detail: String },
    #[error("the ONNX graph builder has no forward for architecture `{0}`")]
    Architecture(String),
    #[error("edit slots: {0}")]
    Slots(String),
}

// Names of the graph's inputs and outputs.

/// The prompt's token-embedding rows come in as inputs, read by the host from the GGUF
/// (`embedding::EmbeddingRows`), never as a table in the graph: a `Gather` would keep the
/// whole table resident (docs/backends.md, Memory). [`EmbeddingInput`] says in which form.
/// With [`EmbeddingInput::Q8_0`]: `[1, T, n_embd / 32, 32]` codes (`qs + 128`) and
/// `[1, T, n_embd / 32, 1]` scales, as the GGUF holds them.
pub const EMBD_CODES: &str = "embd_codes";
pub const EMBD_SCALES: &str = "embd_scales";
/// With [`EmbeddingInput::F32`]: `[1, T, n_embd]` rows dequantized on the host.
pub const EMBD_ROWS: &str = "embd_rows";
/// With [`EmbeddingInput::F32`]: the GGUF's table bytes, unread by any node, kept so that the
/// host checks the rows it reads against the graph's own (verified) copy; `[n_vocab, row bytes]`.
pub const EMBD_TABLE: &str = "token_embd.weight.gguf";
/// With [`EmbeddingInput::Q8_0`]: the table's codes and scales, the tied output projection's
/// `MatMulNBits` inputs, from which the host's row digests are taken.
pub const EMBD_Q8_CODES_TABLE: &str = "token_embd.weight.B";
pub const EMBD_Q8_SCALES_TABLE: &str = "token_embd.weight.scales";

/// How the graph takes the token embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingInput {
    /// A Q8_0 table on the `cpu` profile: codes and scales, scaled in the graph (exact). The
    /// table's codes stay in the graph only for a tied output projection, whose `MatMulNBits`
    /// computes from its prepacked copy ([`super::WeightMemory::Lean`]).
    Q8_0,
    /// Any other table or profile: f32 rows, dequantized on the host as the graph builder
    /// dequantizes (`quant::dequantize`).
    F32,
}

impl EmbeddingInput {
    pub fn of(token_embd: GgmlType, profile: Profile) -> EmbeddingInput {
        if token_embd == GgmlType::Q8_0 && profile == Profile::Cpu {
            EmbeddingInput::Q8_0
        } else {
            EmbeddingInput::F32
        }
    }
}

pub const LOGIT_ROWS: &str = "logit_rows";
pub const LOGITS: &str = "logits";
pub fn past_key(il: usize) -> String {
    format!("past_key.{il}")
}
pub fn past_value(il: usize) -> String {
    format!("past_value.{il}")
}
pub fn present_key(il: usize) -> String {
    format!("present_key.{il}")
}
pub fn present_value(il: usize) -> String {
    format!("present_value.{il}")
}
/// The named tensor of a hook site.
pub fn site_tensor(p: HookPoint) -> String {
    format!("blk.{}.{}", p.layer, p.site.name())
}

/// The graph layout's version: bumped whenever what the builder writes changes, numerics
/// included (v7: 4-bit matmuls at f32 activations). Part of [`builder_id`], so cached graphs of
/// another version are rebuilt, and of the backend id bundles are verified on.
pub const GRAPH_VERSION: u32 = 7;

/// Identifies what this builder writes for `profile` (graph layout version and the llama.cpp
/// roundings it reproduces): a cached graph from another builder is not used.
pub fn builder_id(
    profile: Profile,
    emu: &Emulation,
    slots: &SlotLayout,
    capture: &[HookPoint],
    shapes: Shapes,
    capacity: &SlotCapacity,
) -> String {
    let cap: Vec<String> = capture.iter().map(|&p| site_tensor(p)).collect();
    let mut id = format!(
        "v{GRAPH_VERSION} {} roundings={} slots={} capture={}",
        profile.name(),
        emu.name(),
        slots.describe(),
        cap.join(",")
    );
    if shapes != Shapes::Dynamic {
        id.push_str(&format!(" shapes={}", shapes.name()));
        if !slots.is_empty() {
            id.push_str(&format!(" capacity={}", capacity.describe()));
        }
    }
    id
}

/// Whether the graph has the sliding-window inputs (`rope_*_swa`, `mask_swa`).
pub fn has_swa(cfg: &ModelConfig) -> bool {
    cfg.swa_layers.iter().any(|&s| s)
}

struct Builder<'a> {
    g: Graph,
    n: usize,
    profile: Profile,
    file: Option<&'a GgufFile<'a>>,
    consts: Vec<(Vec<i64>, String)>,
    /// MatMulNBits `accuracy_level` for models: 4, and 1 (f32 activations) for 4-bit weights
    /// ([`Builder::apply_linear`]); 0 (f32 everywhere) where a test needs the weights' exact
    /// products.
    accuracy: i64,
    emu: Emulation,
    slots: SlotLayout,
    /// The tensor of each hook site built so far, before any edit slot wrote it (what a slot
    /// reading the site sees, as the llama.cpp hooks read before they write).
    sites: std::collections::HashMap<HookPoint, String>,
    /// Slot inputs and outputs added while building.
    slot_inputs: Vec<ValueInfo>,
    /// Which low-rank slots a linear of the graph reads (an unread one is an error).
    low_rank_used: Vec<bool>,
    slot_outputs: Vec<ValueInfo>,
    /// The interface's shapes, and the slots' sizes when they are static.
    shapes: Shapes,
    capacity: Option<SlotCapacity>,
}

/// Roundings of llama.cpp's CPU backend the graph reproduces, so that both backends pick the
/// same tokens (measured in docs/backends.md).
#[derive(Clone, Copy, Debug, Default)]
pub struct Emulation {
    /// K and V (and Q) rounded to f16, as llama.cpp's f16 KV cache and flash attention do.
    pub kv_f16: bool,
    /// GELU through f16, as ggml's table does.
    pub gelu_f16: bool,
    /// Matmul inputs rounded as ggml quantizes them for Q8_0/Q5_0/Q4_0 weights (q8_0 blocks).
    pub act_q8_0: bool,
    /// ... and for K-quant weights (q8_K, 256-blocks).
    pub act_q8_k: bool,
    /// Q6_K weights as exact f32 (no 8-bit kernel computes with f32 activations at speed).
    pub q6k_f32: bool,
}

impl Emulation {
    const NAMES: [&'static str; 5] = ["kv", "gelu", "q80", "q8k", "q6kf32"];

    /// Every rounding on.
    pub fn all() -> Emulation {
        Emulation::parse(&Self::NAMES.join(",")).expect("known names")
    }

    /// A comma-separated list of `kv`, `gelu`, `q80`, `q8k`, `q6kf32` (or `none`).
    /// Off by default: on gemma3-270m (100 prompts, docs/backends.md) they lower the mean
    /// logit error (0.236 -> 0.215) but not top-1 disagreement, and cost decode speed.
    pub fn parse(list: &str) -> Result<Emulation, String> {
        let all: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .collect();
        if all.len() > 1 && all.contains(&"none") {
            return Err(format!(
                "`{list}`: `none` cannot be combined with roundings"
            ));
        }
        let items: Vec<&str> = all.into_iter().filter(|x| *x != "none").collect();
        if let Some(bad) = items.iter().find(|x| !Self::NAMES.contains(x)) {
            return Err(format!(
                "unknown rounding `{bad}` (known: {})",
                Self::NAMES.join(", ")
            ));
        }
        let has = |k: &str| items.contains(&k);
        Ok(Emulation {
            kv_f16: has("kv"),
            gelu_f16: has("gelu"),
            act_q8_0: has("q80"),
            act_q8_k: has("q8k"),
            q6k_f32: has("q6kf32"),
        })
    }

    fn flags(&self) -> [bool; 5] {
        [
            self.kv_f16,
            self.gelu_f16,
            self.act_q8_0,
            self.act_q8_k,
            self.q6k_f32,
        ]
    }

    /// The list form (`none` when empty).
    pub fn name(&self) -> String {
        let on: Vec<&str> = Self::NAMES
            .iter()
            .zip(self.flags())
            .filter(|(_, f)| *f)
            .map(|(n, _)| *n)
            .collect();
        if on.is_empty() {
            "none".into()
        } else {
            on.join(",")
        }
    }
}

impl<'a> Builder<'a> {
    fn node(
        &mut self,
        domain: &'static str,
        op: &'static str,
        inputs: &[&str],
        attrs: Vec<(&'static str, Attr)>,
        out: Option<String>,
    ) -> String {
        self.n += 1;
        let out = out.unwrap_or_else(|| format!("t{}", self.n));
        self.g.nodes.push(Node {
            op,
            domain,
            name: format!("n{}_{op}", self.n),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.clone()],
            attrs,
        });
        out
    }

    fn op(&mut self, op: &'static str, inputs: &[&str]) -> String {
        self.node("", op, inputs, vec![], None)
    }

    fn op_a(
        &mut self,
        op: &'static str,
        inputs: &[&str],
        attrs: Vec<(&'static str, Attr)>,
    ) -> String {
        self.node("", op, inputs, attrs, None)
    }

    fn init(&mut self, t: TensorData) -> String {
        let name = t.name.clone();
        self.g.initializers.push(t);
        name
    }

    /// An int64 constant (shapes, axes), shared by value.
    fn ints(&mut self, v: &[i64]) -> String {
        if let Some((_, n)) = self.consts.iter().find(|(c, _)| c == v) {
            return n.clone();
        }
        let name = format!("const_i{}", self.consts.len());
        self.consts.push((v.to_vec(), name.clone()));
        self.init(TensorData::i64(name, vec![v.len() as i64], v))
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.init(TensorData::f32(name, vec![], &[v]))
    }

    fn gguf(&self) -> &'a GgufFile<'a> {
        self.file.expect("a model graph has its GGUF")
    }

    fn tensor_info(&self, name: &str) -> Result<&'a TensorInfo, BuildError> {
        self.gguf()
            .header
            .tensor(name)
            .ok_or_else(|| BuildError::MissingTensor(name.to_string()))
    }

    fn bytes(&self, t: &TensorInfo) -> Result<&'a [u8], BuildError> {
        self.gguf().data_of(t).map_err(|e| BuildError::Tensor {
            tensor: t.name.clone(),
            detail: e.to_string(),
        })
    }

    /// An f32 vector tensor (norm weights, biases).
    fn vector(&mut self, name: &str) -> Result<String, BuildError> {
        let t = self.tensor_info(name)?;
        let n = t.n_elements() as usize;
        let v = quant::dequantize(name, t.ggml_type, n, 1, self.bytes(t)?)?;
        Ok(self.init(TensorData::f32(name, vec![n as i64], &v)))
    }

    fn vector_opt(&mut self, name: &str) -> Result<Option<String>, BuildError> {
        if self.gguf().header.tensor(name).is_some() {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }

    fn rms_norm(&mut self, x: &str, w: &str, eps: f64) -> String {
        match self.profile {
            Profile::Cpu => self.op_a(
                "SimplifiedLayerNormalization",
                &[x, w],
                vec![
                    ("axis", Attr::Int(-1)),
                    ("epsilon", Attr::Float(eps as f32)),
                    ("stash_type", Attr::Int(1)),
                ],
            ),
            Profile::Portable => {
                let sq = self.op("Mul", &[x, x]);
                let axes = self.ints(&[-1]);
                let mean = self.op_a(
                    "ReduceMean",
                    &[&sq, &axes],
                    vec![("keepdims", Attr::Int(1))],
                );
                let e = self.scalar(&format!("eps_{}", self.n), eps as f32);
                let me = self.op("Add", &[&mean, &e]);
                let rs = self.op("Sqrt", &[&me]);
                let nx = self.op("Div", &[x, &rs]);
                self.op("Mul", &[&nx, w])
            }
        }
    }

    /// `x W^T` for the GGUF weight `name` (`ne = [in, out]`), exact weights.
    /// A matrix tensor and its `(k, n)` = `(ne[0], ne[1])`, checked to have two dimensions.
    fn matrix(&self, name: &str) -> Result<(&'a TensorInfo, usize, usize), BuildError> {
        let t = self.tensor_info(name)?;
        match t.ne[..] {
            [k, n] => Ok((t, k as usize, n as usize)),
            _ => Err(BuildError::Tensor {
                tensor: name.into(),
                detail: format!("expected a matrix, got dims {:?}", t.ne),
            }),
        }
    }

    fn linear(&mut self, x: &str, name: &str) -> Result<String, BuildError> {
        let (t, k, n) = self.matrix(name)?;
        let ty = t.ggml_type;
        let lw = if ty == GgmlType::Q6_K && self.emu.q6k_f32 {
            quant::float_weight(name, ty, k, n, self.bytes(t)?)?
        } else {
            quant::linear_weight(name, ty, k, n, self.bytes(t)?)?
        };
        let xr = match ty {
            GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0
                if self.emu.act_q8_0 && k % 32 == 0 =>
            {
                self.round_blocks(x, k, 32, false)
            }
            GgmlType::Q4_K | GgmlType::Q6_K if self.emu.act_q8_k && k % 256 == 0 => {
                self.round_blocks(x, k, 256, true)
            }
            _ => x.to_string(),
        };
        let y = self.apply_linear(&xr, name, lw);
        match self.slots.low_rank.iter().position(|t| t == name) {
            Some(i) => {
                self.low_rank_used[i] = true;
                Ok(self.low_rank_slot(i, x, &y, k, n))
            }
            None => Ok(y),
        }
    }

    /// `[1, T, d]` as `[T, d]` and back.
    fn rows2d(&mut self, x: &str, d: usize) -> String {
        let sh = self.ints(&[-1, d as i64]);
        self.op("Reshape", &[x, &sh])
    }
    fn rows3d(&mut self, x: &str, d: usize) -> String {
        let sh = self.ints(&[1, -1, d as i64]);
        self.op("Reshape", &[x, &sh])
    }

    /// A slot's own dimension: named, or its static capacity (`pick`).
    fn slot_dim(&self, name: String, pick: fn(&SlotCapacity) -> usize) -> Dim {
        match &self.capacity {
            Some(c) => Dim::Fixed(pick(c) as i64),
            None => Dim::Named(name),
        }
    }

    fn slot_input(&mut self, name: String, dtype: DataType, shape: Vec<Dim>) -> String {
        self.slot_inputs.push(input(&name, dtype, shape));
        name
    }

    /// Low-rank slot `i` on a linear `y = x W^T` (`k` in, `n` out): `y + (x A^T) B^T` when on.
    fn low_rank_slot(&mut self, i: usize, x: &str, y: &str, k: usize, n: usize) -> String {
        let r = self.slot_dim(format!("lr{i}_rank"), |c| c.rank);
        let a = self.slot_input(
            slots::lr_name(i, "a"),
            DataType::Float,
            vec![r.clone(), Dim::Fixed(k as i64)],
        );
        let b = self.slot_input(
            slots::lr_name(i, "b"),
            DataType::Float,
            vec![Dim::Fixed(n as i64), r],
        );
        let on = self.slot_input(slots::lr_name(i, "on"), DataType::Bool, vec![Dim::Fixed(1)]);
        let x2 = self.rows2d(x, k);
        let tb = vec![("transB", Attr::Int(1))];
        let u = self.op_a("Gemm", &[&x2, &a], tb.clone());
        let d = self.op_a("Gemm", &[&u, &b], tb);
        let d3 = self.rows3d(&d, n);
        let sum = self.op("Add", &[y, &d3]);
        self.op("Where", &[&on, &sum, y])
    }

    /// Codebook slot `i`: of the rows the host selects (`rows`: the last prompt token, or all
    /// positions), those whose `key` row is near an entry become the entry's value in
    /// `replace`. Only the selected rows are looked up, so a large codebook costs one row per
    /// prompt, and the other rows are copied through untouched (ScatterND).
    fn codebook_slot(&mut self, i: usize, key: &str, replace: &str, d: usize) -> String {
        let n = self.slot_dim(format!("cb{i}_entries"), |c| c.entries);
        let keys = self.slot_input(
            slots::cb_name(i, "keys"),
            DataType::Float,
            vec![n.clone(), Dim::Fixed(d as i64)],
        );
        let values = self.slot_input(
            slots::cb_name(i, "values"),
            DataType::Float,
            vec![n.clone(), Dim::Fixed(d as i64)],
        );
        let bound = self.slot_input(slots::cb_name(i, "cos_min"), DataType::Float, vec![n]);
        // One looked-up row per run with static shapes (the last prompt token's).
        let r = self.slot_dim(format!("cb{i}_rows"), |_| 1);
        let rows = self.slot_input(slots::cb_name(i, "rows"), DataType::Int64, vec![r.clone()]);
        let g0 = vec![("axis", Attr::Int(0))];
        let x2 = self.rows2d(key, d);
        let xs = self.op_a("Gather", &[&x2, &rows], g0.clone()); // [R, d]
        let dots = self.op_a("Gemm", &[&xs, &keys], vec![("transB", Attr::Int(1))]);
        let best = self.node(
            "",
            "ArgMax",
            &[&dots],
            vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
            Some(slots::cb_name(i, "best")),
        );
        let ax1 = self.ints(&[1]);
        let keep0 = vec![("keepdims", Attr::Int(0))];
        let maxd = self.op_a("ReduceMax", &[&dots, &ax1], keep0.clone());
        let sq = self.op_a("ReduceSumSquare", &[&xs, &ax1], keep0);
        let norm = self.op("Sqrt", &[&sq]);
        let cos = self.node(
            "",
            "Div",
            &[&maxd, &norm],
            vec![],
            Some(slots::cb_name(i, "cos")),
        );
        self.slot_outputs
            .push(input(&best, DataType::Int64, vec![r.clone()]));
        self.slot_outputs
            .push(input(&cos, DataType::Float, vec![r]));
        let thr = self.op_a("Gather", &[&bound, &best], g0.clone());
        let hit = self.op("GreaterOrEqual", &[&cos, &thr]); // [R]
        let hit2 = self.op("Unsqueeze", &[&hit, &ax1]); // [R, 1]
        let vals = self.op_a("Gather", &[&values, &best], g0.clone()); // [R, d]
        let r2 = self.rows2d(replace, d);
        let cur = self.op_a("Gather", &[&r2, &rows], g0);
        let upd = self.op("Where", &[&hit2, &vals, &cur]);
        let idx = self.op("Unsqueeze", &[&rows, &ax1]); // [R, 1]
        let out = self.op("ScatterND", &[&r2, &idx, &upd]);
        self.rows3d(&out, d)
    }

    /// Neuron slot `i`: `write + act(read K^T + b) V` on the rows where a neuron fired.
    fn neuron_slot(
        &mut self,
        i: usize,
        read: &str,
        write: &str,
        d: usize,
        act: amend_edits::families::Activation,
    ) -> String {
        let m = self.slot_dim(format!("pn{i}_neurons"), |c| c.neurons);
        let keys = self.slot_input(
            slots::pn_name(i, "keys"),
            DataType::Float,
            vec![m.clone(), Dim::Fixed(d as i64)],
        );
        let bias = self.slot_input(slots::pn_name(i, "bias"), DataType::Float, vec![m.clone()]);
        let values = self.slot_input(
            slots::pn_name(i, "values"),
            DataType::Float,
            vec![m.clone(), Dim::Fixed(d as i64)],
        );
        let x2 = self.rows2d(read, d);
        let z = self.op_a("Gemm", &[&x2, &keys, &bias], vec![("transB", Attr::Int(1))]);
        let out = Some(slots::pn_name(i, "act"));
        let a = match act {
            amend_edits::families::Activation::Relu => self.node("", "Relu", &[&z], vec![], out),
            amend_edits::families::Activation::Gelu => self.node(
                "",
                "Gelu",
                &[&z],
                vec![("approximate", Attr::Str("tanh".into()))],
                out,
            ),
        };
        self.slot_outputs
            .push(input(&a, DataType::Float, vec![self.shapes.dim("T"), m]));
        let abs = self.op("Abs", &[&a]);
        let ax1 = self.ints(&[1]);
        let mx = self.op_a("ReduceMax", &[&abs, &ax1], vec![("keepdims", Attr::Int(1))]);
        let zero = self.scalar(&format!("zero_{}", self.n), 0.0);
        let fired = self.op("Greater", &[&mx, &zero]);
        let sh = self.ints(&[1, -1, 1]);
        let fired3 = self.op("Reshape", &[&fired, &sh]);
        let delta = self.op("MatMul", &[&a, &values]);
        let delta3 = self.rows3d(&delta, d);
        let sum = self.op("Add", &[write, &delta3]);
        self.op("Where", &[&fired3, &sum, write])
    }

    /// Names the hook site tensor `x` at `p` and applies the edit slots that write there
    /// (codebooks first, then neurons, as the llama.cpp hook does); returns the tensor the
    /// forward continues with.
    fn site(&mut self, x: &str, p: HookPoint, d: usize) -> Result<String, BuildError> {
        let named = self.name_site(x, p);
        self.sites.insert(p, named.clone());
        let mut out = named;
        let read = |b: &Self, layer: u32, s: Site| {
            b.sites
                .get(&HookPoint::new(layer, s))
                .cloned()
                .ok_or_else(|| {
                    BuildError::Slots(format!(
                        "layer {layer}: site {s} is not read before it is written"
                    ))
                })
        };
        for i in 0..self.slots.codebooks.len() {
            let c = self.slots.codebooks[i];
            if HookPoint::new(c.layer, c.replace_site) == p {
                let key = read(self, c.layer, c.key_site)?;
                out = self.codebook_slot(i, &key, &out, d);
            }
        }
        for i in 0..self.slots.neurons.len() {
            let n = self.slots.neurons[i];
            if HookPoint::new(n.layer, n.write_site) == p {
                let r = read(self, n.layer, n.read_site)?;
                out = self.neuron_slot(i, &r, &out, d, n.activation);
            }
        }
        Ok(out)
    }

    /// `x` `[1, T, k]` rounded to 8-bit blocks as ggml quantizes a matmul input: q8_0
    /// (`k_quant` false: scale amax/127 stored as f16) or q8_K (scale max/-127, f32).
    fn round_blocks(&mut self, x: &str, k: usize, block: usize, k_quant: bool) -> String {
        let shape = self.ints(&[0, 0, (k / block) as i64, block as i64]);
        let xb = self.op("Reshape", &[x, &shape]);
        let ax = self.ints(&[-1]);
        let a = self.op("Abs", &[&xb]);
        let amax = self.op_a("ReduceMax", &[&a, &ax], vec![("keepdims", Attr::Int(1))]);
        let tiny = self.scalar(&format!("tiny_{}", self.n), 1e-30);
        let amax = self.op("Max", &[&amax, &tiny]);
        let c127 = self.scalar(&format!("c127_{}", self.n), 127.0);
        // ggml (AVX2): id = 127 / amax, q = round-half-even(x * id).
        let id = self.op("Div", &[&c127, &amax]);
        let q = self.op("Mul", &[&xb, &id]);
        let q = self.op("Round", &[&q]);
        let d = if k_quant {
            // q8_K: d = 1 / iscale, in f32.
            self.op("Reciprocal", &[&id])
        } else {
            // q8_0: d = amax / 127, stored as f16.
            let d = self.op("Div", &[&amax, &c127]);
            self.f16_round(&d)
        };
        let y = self.op("Mul", &[&q, &d]);
        let back = self.ints(&[0, 0, k as i64]);
        self.op("Reshape", &[&y, &back])
    }

    /// The `[k, k/block]` 0/1 matrix summing each block of a row, shared by value.
    fn block_indicator(&mut self, k: usize, block: usize) -> String {
        let name = format!("block_indicator.{k}x{block}");
        if !self.g.initializers.iter().any(|t| t.name == name) {
            let kb = k / block;
            let mut ind = vec![0f32; k * kb];
            for c in 0..k {
                ind[c * kb + c / block] = 1.0;
            }
            self.init(TensorData::f32(&name, vec![k as i64, kb as i64], &ind));
        }
        name
    }

    fn f16_round(&mut self, x: &str) -> String {
        let h = self.op_a(
            "Cast",
            &[x],
            vec![("to", Attr::Int(DataType::Float16 as i64))],
        );
        self.op_a(
            "Cast",
            &[&h],
            vec![("to", Attr::Int(DataType::Float as i64))],
        )
    }

    fn apply_linear(&mut self, x: &str, name: &str, lw: LinearWeight) -> String {
        match lw {
            LinearWeight::Float { k, n, wt } => {
                let w = self.init(TensorData::f32(
                    format!("{name}.T"),
                    vec![k as i64, n as i64],
                    &wt,
                ));
                self.op("MatMul", &[x, &w])
            }
            LinearWeight::NBits {
                k,
                n,
                bits,
                block,
                b,
                scales,
                zero_points,
                mins,
            } => {
                let kb = k / block;
                // 4-bit weights take f32 activations (level 1): llama.cpp requantizes its
                // activations for its own dot products, and an int8 requantization of ours, in
                // other blocks, is rounding noise independent of it (agreement 96.22 -> 96.69%,
                // mean logit error 0.233 -> 0.202 on the 100 prompts; docs/backends.md). 8-bit
                // weights stay at level 4: their f32 path is a fallback ~100x slower.
                let level = if bits == 4 && self.accuracy == 4 {
                    1
                } else {
                    self.accuracy
                };
                let y = match self.profile {
                    Profile::Cpu => {
                        let blob = block * bits as usize / 8;
                        let bn = self.init(TensorData::u8(
                            format!("{name}.B"),
                            vec![n as i64, kb as i64, blob as i64],
                            b,
                        ));
                        let sn = self.init(TensorData::f32(
                            format!("{name}.scales"),
                            vec![(n * kb) as i64],
                            &scales,
                        ));
                        let mut inputs = vec![x.to_string(), bn, sn];
                        if let Some(zp) = zero_points {
                            let len = zp.len() as i64;
                            inputs.push(self.init(TensorData::u8(
                                format!("{name}.zp"),
                                vec![len],
                                zp,
                            )));
                        }
                        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                        self.node(
                            "com.microsoft",
                            "MatMulNBits",
                            &refs,
                            vec![
                                ("K", Attr::Int(k as i64)),
                                ("N", Attr::Int(n as i64)),
                                ("bits", Attr::Int(bits as i64)),
                                ("block_size", Attr::Int(block as i64)),
                                ("accuracy_level", Attr::Int(level)),
                            ],
                            None,
                        )
                    }
                    Profile::Portable => {
                        // Blockwise DequantizeLinear along K of the transposed codes [K, N],
                        // then a plain MatMul. Codes are re-centred to signed int8 with no zero
                        // point: ONNX Runtime computes (x - zp) * s as x * s - zp * s, which is
                        // not ggml's rounding, while x * s alone is.
                        let zp: i16 = match (bits, zero_points.is_some()) {
                            (8, _) => 128,
                            (_, true) => 0,
                            _ => 8,
                        };
                        let mut codes = vec![0u8; k * n];
                        let blob = block * bits as usize / 8;
                        for r in 0..n {
                            for sb in 0..kb {
                                let src = &b[(r * kb + sb) * blob..][..blob];
                                for j in 0..block {
                                    let c = if bits == 8 {
                                        src[j]
                                    } else if j % 2 == 0 {
                                        src[j / 2] & 0xF
                                    } else {
                                        src[j / 2] >> 4
                                    };
                                    codes[(sb * block + j) * n + r] = (c as i16 - zp) as i8 as u8;
                                }
                            }
                        }
                        let mut st = vec![0f32; kb * n];
                        for r in 0..n {
                            for sb in 0..kb {
                                st[sb * n + r] = scales[r * kb + sb];
                            }
                        }
                        let cn = self.init(TensorData {
                            name: format!("{name}.q"),
                            dtype: DataType::Int8,
                            dims: vec![k as i64, n as i64],
                            raw: codes,
                        });
                        let sn = self.init(TensorData::f32(
                            format!("{name}.scales"),
                            vec![kb as i64, n as i64],
                            &st,
                        ));
                        let w = self.op_a(
                            "DequantizeLinear",
                            &[&cn, &sn],
                            vec![
                                ("axis", Attr::Int(0)),
                                ("block_size", Attr::Int(block as i64)),
                            ],
                        );
                        self.op("MatMul", &[x, &w])
                    }
                };
                match mins {
                    None => y,
                    Some(m) => {
                        // Q4_K: subtract (sum of x over each 32-block) x (dmin * m). The block
                        // sums are x times a 0/1 block-indicator matrix [K, K/32] (any rank),
                        // one initializer per K shared by every weight (a ReduceSum sums in
                        // another order and moved top-1 agreement with llama.cpp down: 96.47%
                        // -> 96.19% on data/prompts-100.txt).
                        let ind = self.block_indicator(k, block);
                        let sums = self.op("MatMul", &[x, &ind]);
                        let mn = self.init(TensorData::f32(
                            format!("{name}.mins"),
                            vec![kb as i64, n as i64],
                            &m,
                        ));
                        let corr = self.op("MatMul", &[&sums, &mn]);
                        self.op("Sub", &[&y, &corr])
                    }
                }
            }
        }
    }

    /// RoPE on `x` `[1, T, H, hd]` with `cos`/`sin` `[T, hd/2]`.
    fn rope(&mut self, x: &str, cos: &str, sin: &str, hd: usize, neox: bool) -> String {
        let half = hd as i64 / 2;
        if neox {
            // Rotate the two halves of each head.
            let cshape = self.ints(&[1, -1, 1, half]);
            let c = self.op("Reshape", &[cos, &cshape]);
            let s = self.op("Reshape", &[sin, &cshape]);
            let (z, h, e, ax) = (
                self.ints(&[0]),
                self.ints(&[half]),
                self.ints(&[2 * half]),
                self.ints(&[3]),
            );
            let x1 = self.op("Slice", &[x, &z, &h, &ax]);
            let x2 = self.op("Slice", &[x, &h, &e, &ax]);
            let (a, b) = (self.op("Mul", &[&x1, &c]), self.op("Mul", &[&x2, &s]));
            let lo = self.op("Sub", &[&a, &b]);
            let (a, b) = (self.op("Mul", &[&x2, &c]), self.op("Mul", &[&x1, &s]));
            let hi = self.op("Add", &[&a, &b]);
            self.op_a("Concat", &[&lo, &hi], vec![("axis", Attr::Int(3))])
        } else {
            // Rotate adjacent pairs.
            let cshape = self.ints(&[1, -1, 1, half, 1]);
            let c = self.op("Reshape", &[cos, &cshape]);
            let s = self.op("Reshape", &[sin, &cshape]);
            let pshape = self.ints(&[0, 0, 0, half, 2]);
            let xp = self.op("Reshape", &[x, &pshape]);
            let (z, o, t, ax) = (
                self.ints(&[0]),
                self.ints(&[1]),
                self.ints(&[2]),
                self.ints(&[4]),
            );
            let xe = self.op("Slice", &[&xp, &z, &o, &ax]);
            let xo = self.op("Slice", &[&xp, &o, &t, &ax]);
            let (a, b) = (self.op("Mul", &[&xe, &c]), self.op("Mul", &[&xo, &s]));
            let re = self.op("Sub", &[&a, &b]);
            let (a, b) = (self.op("Mul", &[&xe, &s]), self.op("Mul", &[&xo, &c]));
            let ro = self.op("Add", &[&a, &b]);
            let r = self.op_a("Concat", &[&re, &ro], vec![("axis", Attr::Int(4))]);
            let back = self.ints(&[0, 0, 0, hd as i64]);
            self.op("Reshape", &[&r, &back])
        }
    }

    fn name_site(&mut self, x: &str, p: HookPoint) -> String {
        self.node("", "Identity", &[x], vec![], Some(site_tensor(p)))
    }
}

fn input(name: &str, dtype: DataType, shape: Vec<Dim>) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        dtype,
        shape,
    }
}

fn named(s: &str) -> Dim {
    Dim::Named(s.into())
}

/// Builds the graph of the model in `file`.
#[allow(clippy::too_many_arguments)]
pub fn build(
    cfg: &ModelConfig,
    file: &GgufFile<'_>,
    profile: Profile,
    emu: Emulation,
    slots: &SlotLayout,
    capture: &[HookPoint],
    shapes: Shapes,
    capacity: SlotCapacity,
) -> Result<Graph, BuildError> {
    slots.check(cfg.n_layer).map_err(BuildError::Slots)?;
    if let Shapes::Static { tokens, window } = shapes {
        if tokens == 0 || window == 0 {
            return Err(BuildError::Slots(
                "static shapes need at least one token and one window position".into(),
            ));
        }
        if !capture.is_empty() {
            return Err(BuildError::Slots(
                "static shapes take no captured sites".into(),
            ));
        }
    }
    let dim = |n: &str| shapes.dim(n);
    let forward = cfg
        .arch
        .spec()
        .forward
        .ok_or_else(|| BuildError::Architecture(cfg.arch.name().into()))?;
    let gemma = forward == Forward::Gemma3;
    let mut b = Builder {
        g: Graph {
            name: format!("amend-{}", cfg.arch.name()),
            ..Graph::default()
        },
        n: 0,
        profile,
        file: Some(file),
        consts: Vec::new(),
        accuracy: 4,
        emu,
        slots: slots.clone(),
        sites: Default::default(),
        slot_inputs: Vec::new(),
        low_rank_used: vec![false; slots.low_rank.len()],
        slot_outputs: Vec::new(),
        shapes,
        capacity: match shapes {
            Shapes::Dynamic => None,
            Shapes::Static { .. } => Some(capacity),
        },
    };
    let (nh, nkv, hd) = (cfg.n_head as i64, cfg.n_head_kv as i64, cfg.head_dim as i64);
    let swa = has_swa(cfg);

    // Inputs.
    let (te, k, nv) = b.matrix("token_embd.weight")?;
    let embedding = EmbeddingInput::of(te.ggml_type, profile);
    let mut inputs = if embedding == EmbeddingInput::Q8_0 {
        let kb = Dim::Fixed(k as i64 / 32);
        vec![
            input(
                EMBD_CODES,
                DataType::Uint8,
                vec![Dim::Fixed(1), dim("T"), kb.clone(), Dim::Fixed(32)],
            ),
            input(
                EMBD_SCALES,
                DataType::Float,
                vec![Dim::Fixed(1), dim("T"), kb, Dim::Fixed(1)],
            ),
        ]
    } else {
        vec![input(
            EMBD_ROWS,
            DataType::Float,
            vec![Dim::Fixed(1), dim("T"), Dim::Fixed(k as i64)],
        )]
    };
    inputs.extend([
        input(
            "rope_cos",
            DataType::Float,
            vec![dim("T"), Dim::Fixed(hd / 2)],
        ),
        input(
            "rope_sin",
            DataType::Float,
            vec![dim("T"), Dim::Fixed(hd / 2)],
        ),
        input("mask", DataType::Float, vec![dim("T"), dim("S")]),
    ]);
    if swa {
        for name in ["rope_cos_swa", "rope_sin_swa"] {
            inputs.push(input(
                name,
                DataType::Float,
                vec![dim("T"), Dim::Fixed(hd / 2)],
            ));
        }
        inputs.push(input("mask_swa", DataType::Float, vec![dim("T"), dim("S")]));
    }
    inputs.push(input(LOGIT_ROWS, DataType::Int64, vec![dim("R")]));
    let kv_shape = |s: &str| vec![Dim::Fixed(1), Dim::Fixed(nkv), dim(s), Dim::Fixed(hd)];
    for il in 0..cfg.n_layer {
        inputs.push(input(&past_key(il), DataType::Float, kv_shape("P")));
        inputs.push(input(&past_value(il), DataType::Float, kv_shape("P")));
    }
    b.g.inputs = inputs;

    // Token embeddings: Q8_0 rows come in as codes and scales (read by the host) and are
    // scaled here (exact; the table's codes stay for a tied output projection only); other
    // types become an f32 table gathered here.
    let tied = file.header.tensor("output.weight").is_none();
    // The output projection reuses the embedding's codes (below).
    let mut tied_codes = false;
    let mut x = if embedding == EmbeddingInput::Q8_0 {
        let lw = quant::linear_weight("token_embd.weight", te.ggml_type, k, nv, b.bytes(te)?)?;
        let LinearWeight::NBits {
            b: codes, scales, ..
        } = lw
        else {
            unreachable!("Q8_0 maps to MatMulNBits")
        };
        let kb = k / 32;
        // The table stays in the graph even when nothing reads it (untied): the host checks
        // the rows it feeds against these very bytes (`embedding::EmbeddingRows`).
        b.init(TensorData::u8(
            EMBD_Q8_CODES_TABLE,
            vec![nv as i64, kb as i64, 32],
            codes,
        ));
        b.init(TensorData::f32(
            EMBD_Q8_SCALES_TABLE,
            vec![(nv * kb) as i64],
            &scales,
        ));
        let rf = b.op_a(
            "Cast",
            &[EMBD_CODES],
            vec![("to", Attr::Int(DataType::Float as i64))],
        );
        let off = b.scalar("embd_offset", 128.0);
        let centred = b.op("Sub", &[&rf, &off]);
        let v = b.op("Mul", &[&centred, EMBD_SCALES]);
        let eshape = b.ints(&[1, -1, k as i64]);
        tied_codes = tied;
        b.op("Reshape", &[&v, &eshape])
    } else {
        let raw = b.bytes(te)?;
        // A type the builder cannot dequantize fails here, naming the tensor, as it did when
        // the table was built into the graph.
        quant::dequantize(
            "token_embd.weight",
            te.ggml_type,
            k,
            1,
            &raw[..raw.len() / nv],
        )?;
        b.init(TensorData::u8(
            EMBD_TABLE,
            vec![nv as i64, (raw.len() / nv) as i64],
            raw.to_vec(),
        ));
        EMBD_ROWS.to_string()
    };
    if cfg.embed_scale.is_some() {
        // llama.cpp scales by sqrtf(n_embd) in f32 (not the f64 root rounded).
        let sc = b.scalar("embd_scale", (cfg.n_embd as f32).sqrt());
        x = b.op("Mul", &[&x, &sc]);
    }
    x = b.site(&x, HookPoint::new(0, Site::Embeddings), cfg.n_embd)?;

    let attn_scale = b.scalar("attn_scale", cfg.attn_scale as f32);
    let q_shape = b.ints(&[0, 0, nh, hd]);
    let kv_shape4 = b.ints(&[0, 0, nkv, hd]);
    let perm = vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))];
    let g = nh / nkv;
    let q5 = b.ints(&[1, nkv, g, -1, hd]);
    let heads_back = b.ints(&[1, nh, -1, hd]);
    let merge = b.ints(&[0, 0, nh * hd]);
    let ax2 = b.ints(&[2]);

    for il in 0..cfg.n_layer {
        let w = |s: &str| format!("blk.{il}.{s}.weight");
        let is_swa = cfg.swa_layers[il];
        let (cos, sin, mask) = if is_swa {
            ("rope_cos_swa", "rope_sin_swa", "mask_swa")
        } else {
            ("rope_cos", "rope_sin", "mask")
        };

        // Attention.
        let an = b.vector(&w("attn_norm"))?;
        let h = b.rms_norm(&x, &an, cfg.rms_eps);
        let mut q = b.linear(&h, &w("attn_q"))?;
        let mut k = b.linear(&h, &w("attn_k"))?;
        let mut v = b.linear(&h, &w("attn_v"))?;
        for (t, bias) in [(&mut q, "attn_q"), (&mut k, "attn_k"), (&mut v, "attn_v")] {
            if let Some(bn) = b.vector_opt(&format!("blk.{il}.{bias}.bias"))? {
                *t = b.op("Add", &[t, &bn]);
            }
        }
        let mut q = b.op("Reshape", &[&q, &q_shape]);
        let mut k = b.op("Reshape", &[&k, &kv_shape4]);
        let v = b.op("Reshape", &[&v, &kv_shape4]);
        if let Some(qn) = b.vector_opt(&w("attn_q_norm"))? {
            q = b.rms_norm(&q, &qn, cfg.rms_eps);
        }
        if let Some(kn) = b.vector_opt(&w("attn_k_norm"))? {
            k = b.rms_norm(&k, &kn, cfg.rms_eps);
        }
        let q = b.rope(&q, cos, sin, cfg.head_dim, cfg.rope_neox);
        let k = b.rope(&k, cos, sin, cfg.head_dim, cfg.rope_neox);
        let (q, k, v) = if b.emu.kv_f16 {
            (b.f16_round(&q), b.f16_round(&k), b.f16_round(&v))
        } else {
            (q, k, v)
        };
        let q = b.op_a("Transpose", &[&q], perm.clone());
        let k = b.op_a("Transpose", &[&k], perm.clone());
        let v = b.op_a("Transpose", &[&v], perm.clone());
        // Dynamic: present = past + new (the cache grows through the graph). Static: present
        // = the new rows only; the host keeps the window.
        let (k_out, v_out, kv_new) = match shapes {
            Shapes::Dynamic => (Some(present_key(il)), Some(present_value(il)), None),
            Shapes::Static { .. } => (None, None, Some((present_key(il), present_value(il)))),
        };
        if let Some((pk, pv)) = kv_new {
            b.node("", "Identity", &[&k], vec![], Some(pk));
            b.node("", "Identity", &[&v], vec![], Some(pv));
        }
        let cat2 = vec![("axis", Attr::Int(2))];
        let k_all = b.node("", "Concat", &[&past_key(il), &k], cat2.clone(), k_out);
        let v_all = b.node("", "Concat", &[&past_value(il), &v], cat2, v_out);
        // Grouped-query attention: query heads [j*g, (j+1)*g) read kv head j.
        let q5t = b.op("Reshape", &[&q, &q5]);
        let kt = b.op_a(
            "Transpose",
            &[&k_all],
            vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        );
        let kt5 = b.op("Unsqueeze", &[&kt, &ax2]);
        let scores = b.op("MatMul", &[&q5t, &kt5]);
        let scores = b.op("Mul", &[&scores, &attn_scale]);
        let scores = b.op("Add", &[&scores, mask]);
        let probs = b.op_a("Softmax", &[&scores], vec![("axis", Attr::Int(-1))]);
        let v5 = b.op("Unsqueeze", &[&v_all, &ax2]);
        let out = b.op("MatMul", &[&probs, &v5]);
        let out = b.op("Reshape", &[&out, &heads_back]);
        let out = b.op_a("Transpose", &[&out], perm.clone());
        let out = b.op("Reshape", &[&out, &merge]);
        let mut attn = b.linear(&out, &w("attn_output"))?;
        if let Some(pn) = b.vector_opt(&w("post_attention_norm"))? {
            attn = b.rms_norm(&attn, &pn, cfg.rms_eps);
        }
        let attn = b.site(
            &attn,
            HookPoint::new(il as u32, Site::AttnOutput),
            cfg.n_embd,
        )?;
        let x1 = b.op("Add", &[&x, &attn]);

        // Feed-forward.
        let fnw = b.vector(&w("ffn_norm"))?;
        let h = b.rms_norm(&x1, &fnw, cfg.rms_eps);
        let h = b.site(&h, HookPoint::new(il as u32, Site::FfnInput), cfg.n_embd)?;
        let gate = b.linear(&h, &w("ffn_gate"))?;
        let up = b.linear(&h, &w("ffn_up"))?;
        let act = if gemma {
            // ggml's GELU is an f16 table: input and output through f16 when reproduced.
            let g = if b.emu.gelu_f16 {
                b.f16_round(&gate)
            } else {
                gate
            };
            let tanh = vec![("approximate", Attr::Str("tanh".into()))];
            let a = b.op_a("Gelu", &[&g], tanh);
            if b.emu.gelu_f16 {
                b.f16_round(&a)
            } else {
                a
            }
        } else {
            let sg = b.op("Sigmoid", &[&gate]);
            b.op("Mul", &[&gate, &sg])
        };
        let gu = b.op("Mul", &[&act, &up]);
        let mut ffn = b.linear(&gu, &w("ffn_down"))?;
        if let Some(pn) = b.vector_opt(&w("post_ffw_norm"))? {
            ffn = b.rms_norm(&ffn, &pn, cfg.rms_eps);
        }
        let ffn = b.site(&ffn, HookPoint::new(il as u32, Site::FfnOutput), cfg.n_embd)?;
        let x2 = b.op("Add", &[&x1, &ffn]);
        x = b.site(
            &x2,
            HookPoint::new(il as u32, Site::ResidualOut),
            cfg.n_embd,
        )?;
    }

    // Output: the wanted rows only, final norm, projection, optional soft-cap.
    let rows = b.op_a("Gather", &[&x, LOGIT_ROWS], vec![("axis", Attr::Int(1))]);
    let on = b.vector("output_norm.weight")?;
    let h = b.rms_norm(&rows, &on, cfg.rms_eps);
    let mut logits = if tied_codes {
        // Reuse the embedding's codes and scales: no second copy of the largest tensor.
        let h = if b.emu.act_q8_0 {
            b.round_blocks(&h, k, 32, false)
        } else {
            h
        };
        b.node(
            "com.microsoft",
            "MatMulNBits",
            &[&h, EMBD_Q8_CODES_TABLE, EMBD_Q8_SCALES_TABLE],
            vec![
                ("K", Attr::Int(k as i64)),
                ("N", Attr::Int(nv as i64)),
                ("bits", Attr::Int(8)),
                ("block_size", Attr::Int(32)),
                ("accuracy_level", Attr::Int(4)),
            ],
            None,
        )
    } else if tied {
        b.linear(&h, "token_embd.weight")?
    } else {
        b.linear(&h, "output.weight")?
    };
    if let Some(cap) = cfg.final_softcap {
        let c = b.scalar("softcap", cap as f32);
        let d = b.op("Div", &[&logits, &c]);
        let t = b.op("Tanh", &[&d]);
        logits = b.op("Mul", &[&t, &c]);
    }
    b.node("", "Identity", &[&logits], vec![], Some(LOGITS.into()));

    let mut outputs = vec![input(
        LOGITS,
        DataType::Float,
        vec![Dim::Fixed(1), dim("R"), Dim::Fixed(nv as i64)],
    )];
    let present = match shapes {
        Shapes::Dynamic => "S",
        Shapes::Static { .. } => "T",
    };
    for il in 0..cfg.n_layer {
        outputs.push(input(&present_key(il), DataType::Float, kv_shape(present)));
        outputs.push(input(
            &present_value(il),
            DataType::Float,
            kv_shape(present),
        ));
    }
    // A weight no linear reads (the embedding table, a tied LM head's codes) has no place
    // for a delta: refused here rather than fed into an input the graph lacks.
    if let Some(i) = b.low_rank_used.iter().position(|u| !u) {
        return Err(BuildError::Slots(format!(
            "low-rank slot on `{}`: no linear of the graph reads this weight",
            slots.low_rank[i]
        )));
    }
    outputs.append(&mut b.slot_outputs);
    // Captured hook sites: the rows as the site computes them, before any slot writes there.
    for &p in capture {
        if !b.sites.contains_key(&p) {
            return Err(BuildError::Slots(format!(
                "capture: the graph has no site {p}"
            )));
        }
        outputs.push(input(
            &site_tensor(p),
            DataType::Float,
            vec![Dim::Fixed(1), named("T"), Dim::Fixed(cfg.n_embd as i64)],
        ));
    }
    b.g.outputs = outputs;
    let mut slot_inputs = std::mem::take(&mut b.slot_inputs);
    b.g.inputs.append(&mut slot_inputs);
    Ok(b.g)
}

/// A graph of one linear weight, `Y[M, N] = X[M, K] W^T` (input `x`, output `y`), with f32
/// activations: what tests use to read back the weights ONNX Runtime computes with.
pub fn linear_probe(lw: LinearWeight, profile: Profile) -> Graph {
    let (k, n) = match &lw {
        LinearWeight::Float { k, n, .. } | LinearWeight::NBits { k, n, .. } => (*k, *n),
    };
    let mut b = Builder {
        g: Graph {
            name: "probe".into(),
            ..Graph::default()
        },
        n: 0,
        profile,
        file: None,
        consts: Vec::new(),
        accuracy: 0,
        emu: Emulation::default(),
        slots: SlotLayout::default(),
        sites: Default::default(),
        slot_inputs: Vec::new(),
        low_rank_used: Vec::new(),
        slot_outputs: Vec::new(),
        shapes: Shapes::Dynamic,
        capacity: None,
    };
    let y = b.apply_linear("x", "w", lw);
    b.node("", "Identity", &[&y], vec![], Some("y".into()));
    b.g.inputs = vec![input(
        "x",
        DataType::Float,
        vec![named("M"), Dim::Fixed(k as i64)],
    )];
    b.g.outputs = vec![input(
        "y",
        DataType::Float,
        vec![named("M"), Dim::Fixed(n as i64)],
    )];
    b.g
}
