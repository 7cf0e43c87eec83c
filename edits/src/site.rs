//! Where in a transformer layer an edit reads or writes: the runtime maps each site to the
//! architecture's graph node name; bundles record sites by their stable numeric code.

use core::fmt;

/// A per-layer tensor an edit (or a hook) can read or modify. Rows are `n_embd` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u8)]
pub enum Site {
    /// Token embeddings as they enter layer 0 (after any input scaling). Only valid with layer 0.
    Embeddings = 0,
    /// What the attention block adds to the residual stream (after any post-attention norm).
    AttnOutput = 1,
    /// The FFN's input after its norm (what the FFN's first projections read).
    FfnInput = 2,
    /// What the FFN adds to the residual stream (after any post-FFN norm; gemma3: `ffn_post_norm-N`).
    FfnOutput = 3,
    /// The residual stream after the whole block (`l_out-N`).
    ResidualOut = 4,
}

impl Site {
    pub const ALL: [Site; 5] = [
        Site::Embeddings,
        Site::AttnOutput,
        Site::FfnInput,
        Site::FfnOutput,
        Site::ResidualOut,
    ];

    /// The stable code stored in bundles.
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Site> {
        match code {
            0 => Some(Site::Embeddings),
            1 => Some(Site::AttnOutput),
            2 => Some(Site::FfnInput),
            3 => Some(Site::FfnOutput),
            4 => Some(Site::ResidualOut),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Site::Embeddings => "embeddings",
            Site::AttnOutput => "attn_output",
            Site::FfnInput => "ffn_input",
            Site::FfnOutput => "ffn_output",
            Site::ResidualOut => "residual_out",
        }
    }

    pub fn from_name(name: &str) -> Option<Site> {
        Site::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor at one layer: the unit hooks and edits address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HookPoint {
    pub layer: u32,
    pub site: Site,
}

impl HookPoint {
    pub const fn new(layer: u32, site: Site) -> Self {
        HookPoint { layer, site }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.site, self.layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for s in Site::ALL {
            assert_eq!(Site::from_code(s.code()), Some(s));
            assert_eq!(Site::from_name(s.name()), Some(s));
        }
        assert_eq!(Site::from_code(5), None);
        assert_eq!(Site::from_name("nope"), None);
    }
}
