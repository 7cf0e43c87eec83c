//! The architecture table: every architecture amend runs, hooks and compiles edits for, in one
//! place. An entry gives the GGUF `general.architecture` name, how each hook site maps to a
//! llama.cpp graph node, the tensors a model file must have, which compiler forward runs it, and
//! the edit compiler's default hyperparameters. The runtime ([`crate::Model`], hooks), the
//! compiler (forward, hyperparameters, errors) and the tests read only this table: adding an
//! architecture is one entry here plus its forward code in the compiler.
//!
//! Node names come from the graph builders of the pinned llama.cpp (`src/models/*.cpp`): each
//! `cb(tensor, "name", il)` names a node `name-il`. A later `cb` on the same tensor renames it,
//! and the eval callback sees the final name. Checked by the tests on a tiny model of each
//! llama-family architecture and on the real gemma3 model.

use std::fmt;

use amend_edits::gguf::{GgufHeader, HparamError, ModelHparams};
use amend_edits::{HookPoint, Site};

use crate::error::RuntimeError;

/// Where a hook site is in an architecture's graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteNode {
    /// The node `name-{layer}` of every layer.
    PerLayer(&'static str),
    /// One node before the first layer (layer 0 only).
    Input(&'static str),
    /// No named node in this llama.cpp graph; the reason is reported.
    Unavailable(&'static str),
}

/// Which differentiable forward of the compiler (`amend_compiler::forward`) runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// gemma3: scaled embeddings, post-attention and post-FFN norms, GELU, sliding window,
    /// logit soft-capping.
    Gemma3,
    /// llama, qwen2, qwen3: SiLU-gated FFN, optional q/k norms and q/k/v biases.
    Llama,
}

/// One row of the architecture table.
#[derive(Debug)]
pub struct ArchSpec {
    /// The GGUF `general.architecture` string (which llama.cpp must support).
    pub name: &'static str,
    /// Graph node of each hook site, in [`Site::ALL`] order.
    pub sites: [SiteNode; 5],
    /// Tensors every model file must have.
    pub tensors: &'static [&'static str],
    /// Per-layer tensors every layer must have: `blk.{layer}.{name}.weight`.
    pub layer_tensors: &'static [&'static str],
    /// NEOX RoPE (rotates the halves of a head) rather than llama's pairwise rotation.
    pub rope_neox: bool,
    /// The compiler forward; `None` for an architecture the runtime runs but the compiler
    /// cannot train on.
    pub forward: Option<Forward>,
    /// The edit compiler's default hyperparameters (TOML).
    pub compiler_defaults: &'static str,
}

const GLOBAL_TENSORS: &[&str] = &["token_embd.weight", "output_norm.weight"];
const LLAMA_LAYER: &[&str] = &[
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];
const QK_NORM_LAYER: &[&str] = &[
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "attn_q_norm",
    "attn_k_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];
const GEMMA3_LAYER: &[&str] = &[
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "attn_q_norm",
    "attn_k_norm",
    "post_attention_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "post_ffw_norm",
];
const GEMMA3_DEFAULTS: &str = include_str!("../hparams/gemma3.toml");
const LLAMA_DEFAULTS: &str = include_str!("../hparams/llama.toml");

const NO_EMBEDDINGS: SiteNode = SiteNode::Unavailable(
    "the token-embedding node is unnamed in this llama.cpp graph; use residual_out or ffn_input of layer 0",
);

/// llama's entry: also the template of llama-graph aliases.
const LLAMA: ArchSpec = ArchSpec {
    name: "llama",
    sites: [
        NO_EMBEDDINGS,
        SiteNode::PerLayer("attn_out"),
        SiteNode::PerLayer("ffn_norm"),
        SiteNode::PerLayer("ffn_out"),
        SiteNode::PerLayer("l_out"),
    ],
    tensors: GLOBAL_TENSORS,
    layer_tensors: LLAMA_LAYER,
    rope_neox: false,
    forward: Some(Forward::Llama),
    compiler_defaults: LLAMA_DEFAULTS,
};

const QWEN2: ArchSpec = ArchSpec {
    sites: [
        NO_EMBEDDINGS,
        SiteNode::Unavailable("the attention output projection is unnamed in this llama.cpp graph"),
        LLAMA.sites[2],
        LLAMA.sites[3],
        LLAMA.sites[4],
    ],
    name: "qwen2",
    rope_neox: true,
    ..LLAMA
};

/// The table. Order is the order of [`Architecture::supported_list`].
const TABLE: &[ArchSpec] = &[
    ArchSpec {
        name: "gemma3",
        sites: [
            SiteNode::Input("inp_scaled"),
            SiteNode::PerLayer("attn_post_norm"),
            SiteNode::PerLayer("ffn_norm"),
            // gemma3 renormalises the FFN output: what is added to the residual is the post-norm.
            SiteNode::PerLayer("ffn_post_norm"),
            SiteNode::PerLayer("l_out"),
        ],
        tensors: GLOBAL_TENSORS,
        layer_tensors: GEMMA3_LAYER,
        rope_neox: true,
        forward: Some(Forward::Gemma3),
        compiler_defaults: GEMMA3_DEFAULTS,
    },
    LLAMA,
    QWEN2,
    ArchSpec {
        name: "qwen3",
        layer_tensors: QK_NORM_LAYER,
        ..QWEN2
    },
    // Test only: llama.cpp's `mistral3` builds llama's graph from llama's tensors, so this alias
    // is one entry and nothing else (see `tests::alias_entry_runs_on_the_tiny_model`).
    #[cfg(test)]
    ArchSpec {
        name: "mistral3",
        ..LLAMA
    },
];

/// A model architecture amend can run and hook: a row of the table.
#[derive(Clone, Copy)]
pub struct Architecture(&'static ArchSpec);

#[allow(non_upper_case_globals)]
impl Architecture {
    pub const Gemma3: Architecture = Architecture(&TABLE[0]);
    pub const Llama: Architecture = Architecture(&TABLE[1]);
    pub const Qwen2: Architecture = Architecture(&TABLE[2]);
    pub const Qwen3: Architecture = Architecture(&TABLE[3]);

    /// Every architecture of the table.
    pub fn all() -> impl Iterator<Item = Architecture> {
        TABLE.iter().map(Architecture)
    }

    /// The table row.
    pub const fn spec(self) -> &'static ArchSpec {
        self.0
    }

    /// The GGUF `general.architecture` string.
    pub const fn name(self) -> &'static str {
        self.0.name
    }

    pub fn from_name(name: &str) -> Option<Architecture> {
        Architecture::all().find(|a| a.name() == name)
    }

    /// "gemma3, llama, qwen2, qwen3": for error messages.
    pub fn supported_list() -> String {
        Architecture::all()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The graph node name of `site` at `layer`, or why this architecture has no such node.
    /// Does not check the layer range (see [`Architecture::node_name`]).
    pub fn site_node(self, site: Site, layer: u32) -> Result<String, &'static str> {
        if site == Site::Embeddings && layer != 0 {
            return Err("the embeddings site exists only at layer 0");
        }
        match self.0.sites[site as usize] {
            SiteNode::PerLayer(base) => Ok(format!("{base}-{layer}")),
            SiteNode::Input(name) if layer == 0 => Ok(name.to_string()),
            SiteNode::Input(_) => Err("this site exists only at layer 0"),
            SiteNode::Unavailable(reason) => Err(reason),
        }
    }

    /// Validates `point` for a model with `n_layer` layers and returns its node name.
    pub fn node_name(self, point: HookPoint, n_layer: u32) -> Result<String, RuntimeError> {
        if point.layer >= n_layer {
            return Err(RuntimeError::LayerOutOfRange { point, n_layer });
        }
        self.site_node(point.site, point.layer)
            .map_err(|reason| RuntimeError::SiteUnavailable {
                point,
                arch: self.name(),
                reason,
            })
    }

    /// Checks that a model file has every tensor this architecture needs (their shapes were
    /// checked against the hyperparameters by [`ModelHparams::from_header`]).
    pub fn check_tensors(self, h: &GgufHeader, hp: &ModelHparams) -> Result<(), HparamError> {
        let missing = |name: String| HparamError {
            key: name,
            reason: format!("tensor is missing (every {} model has it)", self.name()),
        };
        for name in self.0.tensors {
            if h.tensor(name).is_none() {
                return Err(missing(name.to_string()));
            }
        }
        for il in 0..hp.n_layer {
            for t in self.0.layer_tensors {
                let name = format!("blk.{il}.{t}.weight");
                if h.tensor(&name).is_none() {
                    return Err(missing(name));
                }
            }
        }
        Ok(())
    }
}

impl PartialEq for Architecture {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Architecture {}

impl std::hash::Hash for Architecture {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state)
    }
}

impl fmt::Debug for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Architecture({})", self.name())
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_names() {
        let a = Architecture::Gemma3;
        let n = |s, l| a.node_name(HookPoint::new(l, s), 18).unwrap();
        assert_eq!(n(Site::Embeddings, 0), "inp_scaled");
        assert_eq!(n(Site::AttnOutput, 3), "attn_post_norm-3");
        assert_eq!(n(Site::FfnInput, 4), "ffn_norm-4");
        assert_eq!(n(Site::FfnOutput, 5), "ffn_post_norm-5");
        assert_eq!(n(Site::ResidualOut, 17), "l_out-17");
    }

    #[test]
    fn errors_are_specific() {
        let a = Architecture::Llama;
        assert!(matches!(
            a.node_name(HookPoint::new(2, Site::ResidualOut), 2),
            Err(RuntimeError::LayerOutOfRange { n_layer: 2, .. })
        ));
        assert!(matches!(
            Architecture::Gemma3.node_name(HookPoint::new(1, Site::Embeddings), 18),
            Err(RuntimeError::SiteUnavailable { .. })
        ));
        assert!(matches!(
            Architecture::Qwen2.node_name(HookPoint::new(0, Site::AttnOutput), 2),
            Err(RuntimeError::SiteUnavailable { .. })
        ));
        assert_eq!(Architecture::from_name("qwen3"), Some(Architecture::Qwen3));
        assert_eq!(Architecture::from_name("mamba"), None);
        for (i, a) in Architecture::all().enumerate() {
            assert_eq!(a.spec().name, TABLE[i].name);
        }
    }

    /// The test-only fifth entry (`mistral3`, llama's graph) needs nothing outside the table: it
    /// is listed, the tiny-model writer builds it from the table's tensor list, the pre-load
    /// check accepts it, llama.cpp loads it and its hooks fire at the table's node names.
    #[test]
    fn alias_entry_runs_on_the_tiny_model() {
        use crate::{FnHook, Model, ModelOptions, Session, SessionOptions};
        let alias = Architecture::from_name("mistral3").expect("test entry");
        assert_eq!(
            Architecture::supported_list(),
            "gemma3, llama, qwen2, qwen3, mistral3"
        );
        assert_eq!(alias.spec().compiler_defaults, LLAMA_DEFAULTS);
        let dir = std::env::temp_dir().join(format!("amend-arch-alias-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny-mistral3.gguf");
        crate::testutil::write_tiny_model(&path, alias, 7).unwrap();
        let model = Model::open(
            &path,
            ModelOptions {
                n_threads: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(model.architecture(), alias);
        let mut s = Session::new(
            &model,
            SessionOptions {
                n_ctx: 64,
                ..Default::default()
            },
        )
        .unwrap();
        let fired = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let f2 = fired.clone();
        let point = HookPoint::new(1, Site::FfnOutput);
        s.add_hook(Box::new(FnHook::new(vec![point], move |_, _| {
            f2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })))
        .unwrap();
        let out = s
            .generate(
                "hello",
                &crate::GenerateParams {
                    ignore_eos: true,
                    ..crate::GenerateParams::greedy(3)
                },
                |_| std::ops::ControlFlow::Continue(()),
            )
            .unwrap();
        assert_eq!(out.n_generated, 3);
        assert!(fired.load(std::sync::atomic::Ordering::Relaxed) > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
