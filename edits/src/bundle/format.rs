//! The on-disk layout of a patch bundle (v1): fixed header, postcard manifest, signature block,
//! 64-byte-aligned little-endian payload sections. See `docs/bundle-format.md`.

// The manifest types need `alloc`; the header and the codes do not (the streaming verifier).
#[cfg(feature = "alloc")]
use alloc::string::String;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;
#[cfg(feature = "alloc")]
use serde::{Deserialize, Serialize};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First 8 bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"AMENDBDL";
/// Format version this crate reads (and the highest it writes). A reader refuses a higher major;
/// minor bumps only add things an older reader refuses explicitly: v1.1 new payload and section
/// kinds, v1.2 the verification record after the manifest (a v1.1 reader refuses it as trailing
/// bytes). The writer puts the lowest minor that holds the bundle's content in the header.
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 6;
/// The minor a bundle with a verification record needs.
pub const MINOR_VERIFICATION: u16 = 2;
/// The minor a bundle with a trained scope head (`EmbedderDesc::ScopeModelHead`) needs.
pub const MINOR_SCOPE_HEAD: u16 = 3;
/// The minor a bundle with relation groups (`EmbedderDesc::ScopeModelGroups`) needs.
pub const MINOR_RELATION_GROUPS: u16 = 4;
/// The minor a bundle with a relation-group margin (`EmbedderDesc::ScopeModelGroupsMargin`) needs.
pub const MINOR_RELATION_MARGIN: u16 = 5;
/// The minor a bundle whose relation groups vote with the scope head
/// (`EmbedderDesc::ScopeModelGroupsVote`) needs.
pub const MINOR_GROUP_VOTE: u16 = 6;
/// Size of [`Header`].
pub const HEADER_LEN: usize = 64;
/// Alignment of every payload section (relative to the start of the bundle).
pub const SECTION_ALIGN: u64 = 64;
/// Key id (8) + ed25519 signature (64).
pub const SIG_BLOCK_LEN: usize = 72;
pub const KEY_ID_LEN: usize = 8;

// ---- caps: every count and length a reader accepts is bounded (documented in the spec) ----
/// Largest member count of a scope head (v1.3).
pub const MAX_SCOPE_HEAD_MEMBERS: usize = 16;
/// Largest hidden-unit count of a scope head's member (v1.3).
pub const MAX_SCOPE_HEAD_HIDDEN: usize = 1024;
/// Largest number of relation templates of a memory (v1.4).
pub const MAX_RELATION_TEMPLATES: usize = 4096;
/// Largest number of relation groups of a memory (v1.4); `u16::MAX` marks a record without one.
pub const MAX_RELATION_GROUPS: usize = 1024;
/// Largest magnitude of any f32 in a tensor section (and of a GGUF-LoRA's values and alpha). Finite is not enough: 3e38 squares to
/// infinity in a distance and poisons the residual stream. gemma3's residual rows exceed the
/// f16 range (65504), so the bound is 1e6: far above any real activation, far below overflow
/// (640 squared rows of 1e6 sum to 6.4e14).
pub const MAX_ABS_VALUE: f32 = 1.0e6;
/// Largest codebook radius for the normalized distances, whose range is [0, 2].
pub const MAX_NORMALIZED_RADIUS: f32 = 2.0;
/// Largest bundle (bytes).
pub const MAX_BUNDLE_LEN: u64 = 4 << 30;
/// Largest postcard manifest (bytes).
pub const MAX_MANIFEST_LEN: u32 = 64 << 20;
pub const MAX_SECTIONS: usize = 4096;
pub const MAX_PAYLOADS: usize = 1024;
pub const MAX_EDITS: usize = 1 << 18;
/// Rows of a codebook, neurons of a patch, records of a memory.
pub const MAX_ROWS: u64 = 1 << 22;
/// Width of a hidden state / embedding.
pub const MAX_DIM: u64 = 1 << 16;
pub const MAX_RANK: u64 = 4096;
pub const MAX_LOWRANK_TENSORS: usize = 4096;
pub const MAX_SHAPE_RANK: usize = 4;
/// Longest string in a manifest (ids, prompts, targets, memory texts, templates).
pub const MAX_STRING_LEN: usize = 16 << 10;
pub const MAX_LAYER: u32 = 4096;
/// Backends in a verification record, and the length of a backend's name.
pub const MAX_VERIFIED_BACKENDS: usize = 16;
pub const MAX_BACKEND_NAME_LEN: usize = 64;

/// The fixed 64-byte header. All integers little-endian; alignment 1 so it can be read in place.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    pub magic: [u8; 8],
    pub major: U16,
    pub minor: U16,
    /// Reserved, must be 0 in v1.
    pub flags: U32,
    /// Always [`HEADER_LEN`].
    pub header_len: U32,
    pub manifest_len: U32,
    /// Absolute offset of the signature block (= manifest end rounded up to 8).
    pub sig_offset: U64,
    /// Always [`SIG_BLOCK_LEN`].
    pub sig_len: U32,
    pub reserved0: U32,
    /// Absolute offset where payload sections may start (= signature end rounded up to 64).
    pub payload_offset: U64,
    /// Length of the whole bundle.
    pub total_len: U64,
    pub reserved1: U64,
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);

/// A wire-code enum declared once: the enum (with its `#[repr]` code per variant) and its
/// `from_code` are generated from the same list, so a code cannot be added to one and not the
/// other.
macro_rules! wire_codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident : $repr:ty { $( $variant:ident = $code:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr($repr)]
        pub enum $name { $( $variant = $code ),+ }

        impl $name {
            /// Every variant, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The variant of a wire code, `None` for a code this reader does not know.
            pub fn from_code(c: $repr) -> Option<Self> {
                match c {
                    $( $code => Some($name::$variant), )+
                    _ => None,
                }
            }
        }
    };
}

wire_codes! {
    /// What a section holds; the payload descriptor that references it checks the kind.
    pub enum SectionKind: u16 {
        CodebookKeys = 1,
        CodebookValues = 2,
        CodebookRadii = 3,
        NeuronKeys = 4,
        NeuronBiases = 5,
        NeuronValues = 6,
        LowRankA = 7,
        LowRankB = 8,
        GgufLora = 9,
        MemoryEmbeddings = 10,
        // v1.1: per memory record, the relation embedding of the scope model (unit rows).
        MemoryRelation = 11,
        // v1.1: the subjects' token rows of the scope model, record after record (unit rows).
        MemorySubjectRows = 12,
        // v1.3: a trained scope head's weights, [members * hidden, 3 * embed_dim + 5].
        ScopeHeadWeights = 13,
        // v1.4: relation templates of the scope model, [n_templates, embed_dim] (unit rows).
        RelationTemplates = 14,
    }
}

wire_codes! {
    /// Element type of a section.
    pub enum Dtype: u8 {
        U8 = 0,
        F32 = 1,
    }
}

impl Dtype {
    pub fn size(self) -> u64 {
        match self {
            Dtype::U8 => 1,
            Dtype::F32 => 4,
        }
    }
}

wire_codes! {
    /// Payload (family) kinds. A v1.x reader refuses kinds it does not know.
    pub enum PayloadKind: u16 {
        Codebook = 1,
        PatchNeurons = 2,
        LowRank = 3,
        LowRankGguf = 4,
        Memory = 5,
    }
}

impl PayloadKind {
    pub fn name(self) -> &'static str {
        match self {
            PayloadKind::Codebook => "codebook",
            PayloadKind::PatchNeurons => "patch_neurons",
            PayloadKind::LowRank => "low_rank",
            PayloadKind::LowRankGguf => "low_rank_gguf",
            PayloadKind::Memory => "memory",
        }
    }
}

/// The signed manifest (postcard).
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub bundle_id: String,
    /// Versions are monotonic per channel.
    pub channel: String,
    pub version: u64,
    /// Unix seconds.
    pub created: u64,
    pub not_before: u64,
    /// Unix seconds; `u64::MAX` = never.
    pub expires: u64,
    pub model: ModelBinding,
    pub sections: Vec<SectionEntry>,
    pub payloads: Vec<PayloadEntry>,
    pub edits: Vec<EditEntry>,
    /// v1.2: the backends the compiler checked the edits on. Encoded after the fields above
    /// (postcard has no optional trailing fields), only when present: see `encode_manifest`.
    #[serde(skip)]
    pub verification: Option<Verification>,
}

/// v1.2: where the compiler checked the bundle's edits through the runtime (closed loop: each
/// edit's prompt answers its target, teacher-forced and greedy). Numerics differ a little between
/// backends (llama.cpp, ONNX Runtime per execution provider), so an edit keyed on one may miss on
/// another; a runtime on a backend not listed here warns in `explain`, or refuses the bundle when
/// `required`.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub backends: Vec<VerifiedBackend>,
    /// Refuse to apply the bundle on a backend where not every edit passed.
    pub required: bool,
}

/// One backend of a [`Verification`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedBackend {
    /// The runtime's backend id: `llama.cpp`, `onnxruntime-1.32.0:cpu/g7-cpu`,
    /// `onnxruntime-1.24.1:openvino:CPU/g7-portable-1a2b3c4d`.
    pub backend: String,
    /// Edits that passed on it, of `total` (= the manifest's edit count).
    pub passed: u32,
    pub total: u32,
}

#[cfg(feature = "alloc")]
impl Verification {
    /// Every edit passed on `backend`.
    pub fn covers(&self, backend: &str) -> bool {
        self.backends
            .iter()
            .any(|b| b.backend == backend && b.passed == b.total)
    }

    /// `llama.cpp 34/34, onnxruntime-1.32.0:cpu/g7-cpu 33/34` (for messages).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, b) in self.backends.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&alloc::format!("{} {}/{}", b.backend, b.passed, b.total));
        }
        if out.is_empty() {
            out.push_str("no backend");
        }
        out
    }
}

/// The base model a bundle was compiled for.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelBinding {
    /// [`crate::fingerprint`] of the GGUF.
    pub fingerprint: [u8; 32],
    pub arch: String,
    pub n_layer: u32,
    pub n_embd: u32,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    /// [`SectionKind`] code.
    pub kind: u16,
    /// [`Dtype`] code.
    pub dtype: u8,
    /// Row-major shape; the product times the dtype size is `len`.
    pub shape: Vec<u64>,
    /// Absolute offset in the bundle (multiple of [`SECTION_ALIGN`]).
    pub offset: u64,
    pub len: u64,
    pub sha256: [u8; 32],
}

/// A payload: its kind and a postcard-encoded, kind-specific descriptor (so a reader can name an
/// unknown kind precisely instead of failing somewhere inside the manifest).
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadEntry {
    pub kind: u16,
    pub body: Vec<u8>,
}

/// One knowledge edit and the units (codebook rows, neurons, low-rank tensors, memory records)
/// of one payload that implement it, so it can be rolled back alone.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditEntry {
    pub id: String,
    pub layer: u32,
    /// [`crate::Site`] code.
    pub site: u8,
    pub prompt: String,
    pub target: String,
    pub payload: u32,
    pub first: u32,
    pub count: u32,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodebookDesc {
    pub layer: u32,
    pub key_site: u8,
    pub replace_site: u8,
    /// `families::Distance` code.
    pub distance: u8,
    pub all_positions: bool,
    pub keys: u32,
    pub values: u32,
    pub radii: u32,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchNeuronsDesc {
    pub layer: u32,
    pub read_site: u8,
    pub write_site: u8,
    /// `families::Activation` code.
    pub activation: u8,
    pub keys: u32,
    pub biases: u32,
    pub values: u32,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowRankTensorDesc {
    /// Base tensor name, e.g. `blk.5.ffn_down.weight`.
    pub name: String,
    pub n_in: u32,
    pub n_out: u32,
    pub rank: u32,
    pub alpha: f32,
    /// Section of A `[rank, n_in]`.
    pub a: u32,
    /// Section of B `[n_out, rank]`.
    pub b: u32,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowRankDesc {
    pub tensors: Vec<LowRankTensorDesc>,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowRankGgufDesc {
    /// Section holding a llama.cpp GGUF-LoRA file.
    pub blob: u32,
}

/// How memory embeddings were computed.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EmbedderDesc {
    /// Pooled hidden state of the base model at `layer`/`site` (`pooling`: 0 mean, 1 last token).
    BaseModel { layer: u32, site: u8, pooling: u8 },
    /// An external embedding model, named only (v1.0; no runtime routes with it: it pins no
    /// model).
    External { model_id: String },
    /// v1.1: the scope model (a `bert` GGUF, see docs/methods.md) pinned by its fingerprint,
    /// with what subject-aware routing needs. A v1.0 reader refuses the payload (unknown
    /// variant) rather than misreading it.
    ScopeModel(ScopeRoutingDesc),
    /// v1.3: the same routing data, with a trained scope head that decides "in scope" instead
    /// of the three cosine thresholds. A v1.2 reader refuses the payload (unknown variant).
    ScopeModelHead(ScopeRoutingDesc, ScopeHeadDesc),
    /// v1.4: the same, with relation groups: where a record's relation is one of the groups,
    /// the query's group (its text with the record's subject replaced by "it", classified by
    /// the nearest template) decides instead of the head or the relation threshold. A v1.3
    /// reader refuses the payload (unknown variant).
    ScopeModelGroups(ScopeRoutingDesc, Option<ScopeHeadDesc>, RelationGroupsDesc),
    /// v1.5: the same, with a margin: a query also belongs with a record whose group's best
    /// template scores within the margin (a cosine difference in `[0, 2]`) of its best template
    /// overall. A v1.4 reader refuses the payload (unknown variant).
    ScopeModelGroupsMargin(
        ScopeRoutingDesc,
        Option<ScopeHeadDesc>,
        RelationGroupsDesc,
        f32,
    ),
    /// v1.6: the groups vote with the head instead of deciding alone: the head's logit is moved
    /// by `weight` up when the query falls in the record's group (margin included), down when
    /// it falls in another group, and not at all when no template reaches `min_score` (the
    /// lexicon does not know the query's relation); in scope when the moved logit reaches the
    /// head's threshold. Fields: routing, head, groups, margin, weight (in `[0, 1000]`). A
    /// v1.5 reader refuses the payload (unknown variant).
    ScopeModelGroupsVote(
        ScopeRoutingDesc,
        ScopeHeadDesc,
        RelationGroupsDesc,
        f32,
        f32,
    ),
}

#[cfg(feature = "alloc")]
impl EmbedderDesc {
    /// The scope-model routing data, with or without a head.
    pub fn scope_routing(&self) -> Option<&ScopeRoutingDesc> {
        match self {
            EmbedderDesc::ScopeModel(r)
            | EmbedderDesc::ScopeModelHead(r, _)
            | EmbedderDesc::ScopeModelGroups(r, _, _)
            | EmbedderDesc::ScopeModelGroupsMargin(r, _, _, _)
            | EmbedderDesc::ScopeModelGroupsVote(r, _, _, _, _) => Some(r),
            _ => None,
        }
    }
    pub fn scope_head(&self) -> Option<&ScopeHeadDesc> {
        match self {
            EmbedderDesc::ScopeModelHead(_, h)
            | EmbedderDesc::ScopeModelGroups(_, Some(h), _)
            | EmbedderDesc::ScopeModelGroupsMargin(_, Some(h), _, _)
            | EmbedderDesc::ScopeModelGroupsVote(_, h, _, _, _) => Some(h),
            _ => None,
        }
    }
    pub fn relation_groups(&self) -> Option<&RelationGroupsDesc> {
        match self {
            EmbedderDesc::ScopeModelGroups(_, _, g)
            | EmbedderDesc::ScopeModelGroupsMargin(_, _, g, _)
            | EmbedderDesc::ScopeModelGroupsVote(_, _, g, _, _) => Some(g),
            _ => None,
        }
    }
    /// The relation-group margin (v1.5; 0 without one).
    pub fn relation_margin(&self) -> f32 {
        match self {
            EmbedderDesc::ScopeModelGroupsMargin(_, _, _, m)
            | EmbedderDesc::ScopeModelGroupsVote(_, _, _, m, _) => *m,
            _ => 0.0,
        }
    }
    /// The weight of the groups' vote with the head (v1.6; `None`: the groups decide alone).
    pub fn group_vote(&self) -> Option<f32> {
        match self {
            EmbedderDesc::ScopeModelGroupsVote(_, _, _, _, w) => Some(*w),
            _ => None,
        }
    }
}

/// Relation groups of a scope-model memory (v1.4): a lexicon of relation templates, each
/// encoded by the scope model with its subject replaced by "it", grouped by relation.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelationGroupsDesc {
    /// Section `[n_templates, embed_dim]` (`RelationTemplates`), unit rows.
    pub templates: u32,
    /// Per template, its group (an index into `names`).
    pub template_group: Vec<u16>,
    /// Per group, its name (for `explain`).
    pub names: Vec<String>,
    /// Per record, its relation's group, or `u16::MAX` where none was close enough (the head
    /// or the thresholds decide for that record).
    pub record_group: Vec<u16>,
    /// A text belongs to its nearest template's group when the cosine reaches this.
    pub min_score: f32,
}

/// A trained scope head (`amend_edits::families::ScopeHead`): an ensemble of `members`
/// one-hidden-layer perceptrons of `hidden` units over a (query, record) pair's features.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScopeHeadDesc {
    pub members: u32,
    pub hidden: u32,
    /// Section `[members * hidden, 3 * embed_dim + 5]` (`ScopeHeadWeights`).
    pub weights: u32,
    /// Per member, the output bias.
    pub out_bias: Vec<f32>,
    /// The mean logit must reach this.
    pub threshold: f32,
}

/// Routing data of a memory whose embeddings come from the scope model.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScopeRoutingDesc {
    /// A human-readable name, e.g. "all-MiniLM-L6-v2 Q8_0".
    pub model_id: String,
    /// [`crate::fingerprint`] of the scope-model GGUF the embeddings were computed with.
    pub fingerprint: [u8; 32],
    /// Section `[n, embed_dim]`: per record, the mean of its prompt's non-subject token rows.
    pub relation: u32,
    /// Section `[sum(subject_counts), embed_dim]`: the subject's token rows in the prompt.
    pub subject_rows: u32,
    /// Per record, how many subject rows it has (at least one).
    pub subject_counts: Vec<u32>,
    /// Per record, the subject (a later version recomputes the rows from it).
    pub subjects: Vec<String>,
    /// MaxSim of the subject rows against the query's rows must reach this.
    pub subject_threshold: f32,
    /// Cosine of the relation embeddings must reach this.
    pub relation_threshold: f32,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRecordDesc {
    pub edit_id: String,
    pub prompt: String,
    pub target: String,
    pub text: String,
}

#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryDesc {
    pub embed_dim: u32,
    pub threshold: f32,
    pub template: String,
    pub embedder: EmbedderDesc,
    /// Section of L2-normalized embeddings `[n, embed_dim]`.
    pub embeddings: u32,
    pub records: Vec<MemoryRecordDesc>,
}

/// A decoded, validated payload descriptor.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq)]
// A memory's descriptor is the largest; a bundle holds a handful of payloads, so boxing it
// would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Payload {
    Codebook(CodebookDesc),
    PatchNeurons(PatchNeuronsDesc),
    LowRank(LowRankDesc),
    LowRankGguf(LowRankGgufDesc),
    Memory(MemoryDesc),
}

#[cfg(feature = "alloc")]
impl Payload {
    pub fn kind(&self) -> PayloadKind {
        match self {
            Payload::Codebook(_) => PayloadKind::Codebook,
            Payload::PatchNeurons(_) => PayloadKind::PatchNeurons,
            Payload::LowRank(_) => PayloadKind::LowRank,
            Payload::LowRankGguf(_) => PayloadKind::LowRankGguf,
            Payload::Memory(_) => PayloadKind::Memory,
        }
    }

    /// The layer the payload acts on (low-rank payloads: none).
    pub fn layer(&self) -> Option<u32> {
        match self {
            Payload::Codebook(d) => Some(d.layer),
            Payload::PatchNeurons(d) => Some(d.layer),
            _ => None,
        }
    }

    /// Encode for a [`PayloadEntry`].
    pub fn to_entry(&self) -> PayloadEntry {
        let body = match self {
            Payload::Codebook(d) => postcard::to_allocvec(d),
            Payload::PatchNeurons(d) => postcard::to_allocvec(d),
            Payload::LowRank(d) => postcard::to_allocvec(d),
            Payload::LowRankGguf(d) => postcard::to_allocvec(d),
            Payload::Memory(d) => postcard::to_allocvec(d),
        }
        // Serializing plain structs into a Vec cannot fail.
        .unwrap_or_default();
        PayloadEntry {
            kind: self.kind() as u16,
            body,
        }
    }
}

/// Round `x` up to a multiple of `a` (a power of two), `None` on overflow.
pub(crate) fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

/// A finite cosine in [-1, 1]: what every stored scope threshold and score must be (NaN and
/// ±inf fail). Both readers and the in-memory families check it.
pub fn is_cosine(x: f32) -> bool {
    x.is_finite() && (-1.0..=1.0).contains(&x)
}

/// A relation-group margin: a difference of two cosines, in [0, 2] (NaN fails). Both readers,
/// the family and the compiler's hyperparameters check it.
pub fn is_relation_margin(x: f32) -> bool {
    (0.0..=2.0).contains(&x)
}

/// The weight of relation groups' vote with the scope head (v1.6): a shift of the head's logit,
/// in [0, 1000] (NaN fails). Both readers, the family and the compiler's hyperparameters check it.
pub fn is_group_weight(x: f32) -> bool {
    (0.0..=1000.0).contains(&x)
}

// The value checks both verifiers run on f32 sections (here: they need no allocator).

/// True when no little-endian f32 in `bytes` is NaN or infinite (exponent bits all ones).
/// Written branch-free over u32 lanes so it vectorizes.
pub fn all_finite(bytes: &[u8]) -> bool {
    let mut bad = 0u32;
    for c in bytes.chunks_exact(4) {
        let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        bad |= ((x & 0x7f80_0000) == 0x7f80_0000) as u32;
    }
    bad == 0
}

/// True when every little-endian f32 in `bytes` is finite with `|x| <= MAX_ABS_VALUE` (NaN and
/// infinity have larger magnitude bits, so one unsigned compare covers all three).
pub fn within_bound(bytes: &[u8]) -> bool {
    let max = MAX_ABS_VALUE.to_bits();
    let mut bad = 0u32;
    for c in bytes.chunks_exact(4) {
        let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        bad |= ((x & 0x7fff_ffff) > max) as u32;
    }
    bad == 0
}

#[cfg(test)]
mod code_tests {
    use super::*;

    #[test]
    fn wire_codes_round_trip() {
        for &k in SectionKind::ALL {
            assert_eq!(SectionKind::from_code(k as u16), Some(k));
        }
        for &k in PayloadKind::ALL {
            assert_eq!(PayloadKind::from_code(k as u16), Some(k));
        }
        for &d in Dtype::ALL {
            assert_eq!(Dtype::from_code(d as u8), Some(d));
        }
        assert_eq!(SectionKind::from_code(0), None);
        assert_eq!(SectionKind::from_code(15), None);
        assert_eq!(PayloadKind::from_code(6), None);
        assert_eq!(Dtype::from_code(2), None);
    }
}
