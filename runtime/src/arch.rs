//! Supported architectures and the mapping from hook sites to llama.cpp graph node names.
//!
//! The names come from the graph builders of the pinned llama.cpp (`src/models/*.cpp`): each
//! `cb(tensor, "name", il)` names a node `name-il`. A later `cb` on the same tensor renames it,
//! and the eval callback sees the final name. Checked by the tests on a tiny model of each
//! llama-family architecture and on the real gemma3 model.

use std::fmt;

use amend_edits::{HookPoint, Site};

use crate::error::RuntimeError;

/// A model architecture amend can run and hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    Gemma3,
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Gemma3,
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    /// The GGUF `general.architecture` string.
    pub const fn name(self) -> &'static str {
        match self {
            Architecture::Gemma3 => "gemma3",
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    pub fn from_name(name: &str) -> Option<Architecture> {
        Architecture::ALL.into_iter().find(|a| a.name() == name)
    }

    /// "gemma3, llama, qwen2, qwen3": for error messages.
    pub fn supported_list() -> String {
        Architecture::ALL
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The graph node name of `site` at `layer`, or why this architecture has no such node.
    /// Does not check the layer range (see [`Architecture::node_name`]).
    pub fn site_node(self, site: Site, layer: u32) -> Result<String, &'static str> {
        use Architecture::*;
        let per_layer = |base: &str| Ok(format!("{base}-{layer}"));
        match (self, site) {
            (_, Site::Embeddings) if layer != 0 => {
                Err("the embeddings site exists only at layer 0")
            }
            (Gemma3, Site::Embeddings) => Ok("inp_scaled".to_string()),
            (Llama | Qwen2 | Qwen3, Site::Embeddings) => {
                Err("the token-embedding node is unnamed in this llama.cpp graph; use residual_out or ffn_input of layer 0")
            }
            (Gemma3, Site::AttnOutput) => per_layer("attn_post_norm"),
            (Llama, Site::AttnOutput) => per_layer("attn_out"),
            (Qwen2 | Qwen3, Site::AttnOutput) => {
                Err("the attention output projection is unnamed in this llama.cpp graph")
            }
            (_, Site::FfnInput) => per_layer("ffn_norm"),
            // gemma3 renormalises the FFN output: what is added to the residual is the post-norm.
            (Gemma3, Site::FfnOutput) => per_layer("ffn_post_norm"),
            (Llama | Qwen2 | Qwen3, Site::FfnOutput) => per_layer("ffn_out"),
            (_, Site::ResidualOut) => per_layer("l_out"),
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
        assert_eq!(
            Architecture::supported_list(),
            "gemma3, llama, qwen2, qwen3"
        );
        assert_eq!(Architecture::from_name("qwen3"), Some(Architecture::Qwen3));
        assert_eq!(Architecture::from_name("mamba"), None);
    }
}
