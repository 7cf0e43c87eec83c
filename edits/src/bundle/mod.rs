//! Patch bundles: signed, model-bound, zero-copy containers of edits.
//!
//! [`verify`] checks a byte buffer completely (signature, sizes, hashes, descriptors, finiteness)
//! before anything is interpreted; a [`Bundle`] then hands out typed views whose slices borrow
//! the buffer (an mmap or an [`AlignedBuf`]).

pub mod error;
pub mod format;
pub mod reader;
pub mod stream;
pub mod writer;

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

pub use error::BundleError;
pub use format::*;
pub use reader::{
    check_manifest, decode_manifest, read_header, read_header_of, units, verify, verify_signature,
    Verified,
};
pub use stream::{StreamVerified, StreamVerifier, STREAM_MAX_MANIFEST_LEN, STREAM_SIGNED_CAP};
pub use writer::{assemble, encode_manifest, layout, sign_in_place, BundleBuilder, BundleMeta};

use crate::families::{self, InvalidPayload};
use crate::keys::{KeyId, TrustStore};
use crate::site::Site;

/// A 64-byte-aligned owned byte buffer: a received bundle copied here can be viewed as f32
/// in place (a `Vec<u8>` only guarantees alignment 1).
#[derive(Clone)]
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf {
            blocks: alloc::vec![Block([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `blocks` is `len.div_ceil(64)` contiguous 64-byte arrays with no padding
        // (repr(C), size 64), so the first `len` bytes are initialized and in bounds.
        unsafe { core::slice::from_raw_parts(self.blocks.as_ptr() as *const u8, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, with unique access through `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(self.blocks.as_mut_ptr() as *mut u8, self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl core::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Where a bundle's bytes live: always memory this process owns (or a `'static` it compiled
/// in), never a shared mapping of a file another process could rewrite or truncate after the
/// bytes were verified.
pub enum BundleBytes {
    Owned(AlignedBuf),
    Static(&'static [u8]),
}

impl AsRef<[u8]> for BundleBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            BundleBytes::Owned(b) => b.as_slice(),
            BundleBytes::Static(s) => s,
        }
    }
}

impl core::fmt::Debug for BundleBytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "BundleBytes({} bytes)", self.as_ref().len())
    }
}

/// A verified bundle over its bytes `B` (a borrowed slice, an [`AlignedBuf`], an mmap).
#[derive(Debug)]
pub struct Bundle<B: AsRef<[u8]> = BundleBytes> {
    bytes: B,
    verified: Verified,
}

impl<B: AsRef<[u8]>> Bundle<B> {
    /// Verify `bytes` completely against `trust`; nothing is interpreted before the signature
    /// and hashes check out.
    pub fn open(bytes: B, trust: &TrustStore) -> Result<Self, BundleError> {
        let verified = verify(bytes.as_ref(), trust)?;
        let b = Bundle { bytes, verified };
        b.check_families()?;
        Ok(b)
    }

    /// Build every payload's family object once over all its units, so the families' own
    /// checks (radii, unit-norm embeddings, GGUF-LoRA structure) run at open and views handed
    /// out later cannot fail.
    fn check_families(&self) -> Result<(), BundleError> {
        for p in 0..self.payloads().len() {
            let n = self.units(p);
            let r = match &self.payloads()[p] {
                Payload::Codebook(_) => self.codebook(p, 0..n).map(|v| v.to_family().map(drop)),
                Payload::PatchNeurons(_) => {
                    self.patch_neurons(p, 0..n).map(|v| v.to_family().map(drop))
                }
                Payload::LowRank(_) => self
                    .low_rank(p, |_| true)
                    .map(|v| LowRankTensorView::to_family(&v).map(drop)),
                Payload::LowRankGguf(_) => self
                    .gguf_lora(p)
                    .map(|b| families::LowRank::from_gguf_blob(b).map(drop)),
                Payload::Memory(_) => self.memory(p, 0..n).map(|v| v.to_family().map(drop)),
            };
            match r {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    return Err(BundleError::InvalidPayload {
                        payload: p,
                        reason: e.0,
                    })
                }
                None => {
                    return Err(BundleError::InvalidPayload {
                        payload: p,
                        reason: "no view",
                    })
                }
            }
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.verified.manifest
    }

    pub fn id(&self) -> &str {
        &self.verified.manifest.bundle_id
    }

    pub fn key_id(&self) -> KeyId {
        self.verified.key_id
    }

    pub fn payloads(&self) -> &[Payload] {
        &self.verified.payloads
    }

    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// Payload bytes (sum of section lengths).
    pub fn payload_len(&self) -> u64 {
        self.manifest().sections.iter().map(|s| s.len).sum()
    }

    /// Units (rows, neurons, tensors, records) of payload `p`.
    pub fn units(&self, p: usize) -> usize {
        self.payloads()
            .get(p)
            .map_or(0, |pl| units(self.manifest(), pl))
    }

    fn section(&self, i: u32) -> &[u8] {
        let s = &self.verified.manifest.sections[i as usize];
        &self.bytes.as_ref()[s.offset as usize..(s.offset + s.len) as usize]
    }

    /// Section `i` as f32 (verified: in bounds, aligned, finite, f32 dtype).
    fn f32s(&self, i: u32) -> &[f32] {
        // Verification checked dtype, length and 64-byte alignment inside a 4-aligned buffer.
        crate::gguf::cast_f32(self.section(i)).unwrap_or(&[])
    }

    /// Rows `rows` of codebook payload `p`.
    pub fn codebook(&self, p: usize, rows: Range<usize>) -> Option<CodebookView<'_>> {
        let Some(Payload::Codebook(d)) = self.payloads().get(p) else {
            return None;
        };
        let dim = self.manifest().model.n_embd as usize;
        let n = self.units(p);
        if rows.start > rows.end || rows.end > n {
            return None;
        }
        Some(CodebookView {
            layer: d.layer,
            key_site: Site::from_code(d.key_site)?,
            replace_site: Site::from_code(d.replace_site)?,
            dim,
            keys: &self.f32s(d.keys)[rows.start * dim..rows.end * dim],
            values: &self.f32s(d.values)[rows.start * dim..rows.end * dim],
            radii: &self.f32s(d.radii)[rows.clone()],
            distance: d.distance,
            all_positions: d.all_positions,
            rows,
        })
    }

    /// Neurons `rows` of patch payload `p`.
    pub fn patch_neurons(&self, p: usize, rows: Range<usize>) -> Option<PatchNeuronsView<'_>> {
        let Some(Payload::PatchNeurons(d)) = self.payloads().get(p) else {
            return None;
        };
        let dim = self.manifest().model.n_embd as usize;
        if rows.start > rows.end || rows.end > self.units(p) {
            return None;
        }
        Some(PatchNeuronsView {
            layer: d.layer,
            read_site: Site::from_code(d.read_site)?,
            write_site: Site::from_code(d.write_site)?,
            dim,
            keys: &self.f32s(d.keys)[rows.start * dim..rows.end * dim],
            biases: &self.f32s(d.biases)[rows.clone()],
            values: &self.f32s(d.values)[rows.start * dim..rows.end * dim],
            activation: d.activation,
            rows,
        })
    }

    /// The tensors of low-rank payload `p` whose indices `keep` accepts.
    pub fn low_rank(
        &self,
        p: usize,
        keep: impl Fn(usize) -> bool,
    ) -> Option<Vec<LowRankTensorView<'_>>> {
        let Some(Payload::LowRank(d)) = self.payloads().get(p) else {
            return None;
        };
        Some(
            d.tensors
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .map(|(_, t)| LowRankTensorView {
                    name: &t.name,
                    n_in: t.n_in as usize,
                    n_out: t.n_out as usize,
                    rank: t.rank as usize,
                    a: self.f32s(t.a),
                    b: self.f32s(t.b),
                    alpha: t.alpha,
                })
                .collect(),
        )
    }

    /// The GGUF-LoRA file of payload `p`.
    pub fn gguf_lora(&self, p: usize) -> Option<&[u8]> {
        let Some(Payload::LowRankGguf(d)) = self.payloads().get(p) else {
            return None;
        };
        Some(self.section(d.blob))
    }

    /// Records `rows` of memory payload `p`.
    pub fn memory(&self, p: usize, rows: Range<usize>) -> Option<MemoryView<'_>> {
        let Some(Payload::Memory(d)) = self.payloads().get(p) else {
            return None;
        };
        let e = d.embed_dim as usize;
        if rows.start > rows.end || rows.end > d.records.len() {
            return None;
        }
        let scope = match d.embedder.scope_routing() {
            Some(sr) => {
                // Subject rows of records before `rows.start`, and of `rows`.
                let counts = &sr.subject_counts[rows.clone()];
                let before: usize = sr.subject_counts[..rows.start]
                    .iter()
                    .map(|&c| c as usize)
                    .sum();
                let here: usize = counts.iter().map(|&c| c as usize).sum();
                Some(ScopeView {
                    relation: &self.f32s(sr.relation)[rows.start * e..rows.end * e],
                    subject_rows: &self.f32s(sr.subject_rows)[before * e..(before + here) * e],
                    subject_counts: counts,
                    subject_threshold: sr.subject_threshold,
                    relation_threshold: sr.relation_threshold,
                    head: d.embedder.scope_head().map(|h| HeadView {
                        members: h.members as usize,
                        hidden: h.hidden as usize,
                        weights: self.f32s(h.weights),
                        out_bias: &h.out_bias,
                        threshold: h.threshold,
                    }),
                    subjects: &sr.subjects[rows.clone()],
                    groups: d.embedder.relation_groups().map(|g| GroupsView {
                        templates: self.f32s(g.templates),
                        template_group: &g.template_group,
                        names: &g.names,
                        record_group: &g.record_group[rows.clone()],
                        min_score: g.min_score,
                        margin: d.embedder.relation_margin(),
                        vote: d.embedder.group_vote(),
                    }),
                })
            }
            None => None,
        };
        Some(MemoryView {
            scope,
            embed_dim: e,
            embeddings: &self.f32s(d.embeddings)[rows.start * e..rows.end * e],
            threshold: d.threshold,
            records: &d.records[rows.clone()],
            template: &d.template,
            embedder: &d.embedder,
            rows,
        })
    }
}

impl Bundle<BundleBytes> {
    /// Copy received bytes into an aligned buffer and verify them.
    pub fn from_bytes(bytes: &[u8], trust: &TrustStore) -> Result<Self, BundleError> {
        Self::open(BundleBytes::Owned(AlignedBuf::from_slice(bytes)), trust)
    }

    /// Read a bundle file into owned, aligned memory and verify it. The file is opened without
    /// blocking and must be a regular file within the bundle cap; its 64-byte header is read and
    /// checked (magic, version, layout, `total_len` = file length) before anything else is read
    /// or allocated. The bytes verified are then the only bytes used: a later rewrite,
    /// truncation or replacement of the file changes nothing in this process.
    #[cfg(feature = "std")]
    pub fn open_file(
        path: impl AsRef<std::path::Path>,
        trust: &TrustStore,
    ) -> Result<Self, OpenError> {
        Ok(Self::open(read_file(path.as_ref())?, trust)?)
    }

    /// Sha256 of the signed bytes (header + manifest): names this exact bundle in the version
    /// store.
    pub fn signed_digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let len = HEADER_LEN
            + self
                .bytes()
                .get(20..24)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        Sha256::digest(&self.bytes()[..len.min(self.bytes().len())]).into()
    }
}

/// A bundle file's bytes, header checked first (see [`Bundle::open_file`]); nothing verified yet
/// beyond the header.
#[cfg(feature = "std")]
pub fn read_file(path: &std::path::Path) -> Result<BundleBytes, OpenError> {
    use std::io::Read;
    let (mut f, len) = crate::fsutil::open_regular(path, MAX_BUNDLE_LEN)?;
    let mut head = [0u8; HEADER_LEN];
    let n = read_full(&mut f, &mut head).map_err(|e| io_error(path, e))?;
    read_header_of(&head[..n], len)?;
    let mut buf = AlignedBuf::zeroed(len as usize);
    buf.as_mut_slice()[..HEADER_LEN].copy_from_slice(&head);
    let got = HEADER_LEN
        + read_full(&mut f, &mut buf.as_mut_slice()[HEADER_LEN..])
            .map_err(|e| io_error(path, e))?;
    // Shrunk since fstat: report as truncated; grown: what was read is what gets verified (and
    // the header's total_len must equal it), the rest is ignored.
    if got < len as usize {
        return Err(BundleError::Truncated {
            needed: len,
            have: got as u64,
        }
        .into());
    }
    let mut extra = [0u8; 1];
    if f.read(&mut extra).map_err(|e| io_error(path, e))? != 0 {
        return Err(BundleError::LengthMismatch {
            declared: len,
            actual: len + 1,
        }
        .into());
    }
    Ok(BundleBytes::Owned(buf))
}

#[cfg(feature = "std")]
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(feature = "std")]
fn io_error(path: &std::path::Path, error: std::io::Error) -> OpenError {
    OpenError::File(crate::fsutil::FileError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Errors of [`Bundle::open_file`].
#[cfg(feature = "std")]
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    File(#[from] crate::fsutil::FileError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// Zero-copy rows of a GRACE codebook.
#[derive(Clone, Debug, PartialEq)]
pub struct CodebookView<'a> {
    pub layer: u32,
    pub key_site: Site,
    pub replace_site: Site,
    pub dim: usize,
    /// `[n, dim]`
    pub keys: &'a [f32],
    /// `[n, dim]`
    pub values: &'a [f32],
    /// `[n]`
    pub radii: &'a [f32],
    /// `families::Distance` code.
    pub distance: u8,
    pub all_positions: bool,
    /// Which rows of the payload these are.
    pub rows: Range<usize>,
}

/// Zero-copy neurons of a T-Patcher patch.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchNeuronsView<'a> {
    pub layer: u32,
    pub read_site: Site,
    pub write_site: Site,
    pub dim: usize,
    pub keys: &'a [f32],
    pub biases: &'a [f32],
    pub values: &'a [f32],
    /// `families::Activation` code.
    pub activation: u8,
    pub rows: Range<usize>,
}

/// One zero-copy low-rank delta `W += alpha/rank * B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRankTensorView<'a> {
    pub name: &'a str,
    pub n_in: usize,
    pub n_out: usize,
    pub rank: usize,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub alpha: f32,
}

/// Zero-copy records of a memory.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryView<'a> {
    pub embed_dim: usize,
    pub embeddings: &'a [f32],
    pub threshold: f32,
    pub records: &'a [MemoryRecordDesc],
    pub template: &'a str,
    pub embedder: &'a EmbedderDesc,
    pub rows: Range<usize>,
    /// Routing data when the embedder is the scope model.
    pub scope: Option<ScopeView<'a>>,
}

/// Zero-copy routing data of a scope-model memory over some records.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeView<'a> {
    pub relation: &'a [f32],
    pub subject_rows: &'a [f32],
    pub subject_counts: &'a [u32],
    pub subject_threshold: f32,
    pub relation_threshold: f32,
    /// v1.3: the trained scope head (whole: it does not depend on the records).
    pub head: Option<HeadView<'a>>,
    /// Per record, its subject.
    pub subjects: &'a [String],
    /// v1.4: relation groups (the templates whole, the record groups of these records).
    pub groups: Option<GroupsView<'a>>,
}

/// Zero-copy view of a memory's relation groups over some records.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupsView<'a> {
    pub templates: &'a [f32],
    pub template_group: &'a [u16],
    pub names: &'a [String],
    pub record_group: &'a [u16],
    pub min_score: f32,
    /// v1.5 (0 before).
    pub margin: f32,
    /// v1.6: the weight of the groups' vote with the head (`None`: they decide alone).
    pub vote: Option<f32>,
}

/// Zero-copy view of a trained scope head.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadView<'a> {
    pub members: usize,
    pub hidden: usize,
    pub weights: &'a [f32],
    pub out_bias: &'a [f32],
    pub threshold: f32,
}

impl<'a> CodebookView<'a> {
    /// The families' zero-copy codebook over these rows.
    pub fn to_family(&self) -> Result<families::Codebook<'a>, InvalidPayload> {
        let distance =
            families::Distance::from_code(self.distance).ok_or(InvalidPayload("distance code"))?;
        families::Codebook::new(
            self.layer,
            self.key_site,
            self.replace_site,
            self.dim,
            self.keys,
            self.values,
            self.radii,
            distance,
            self.all_positions,
        )
    }
}

impl<'a> PatchNeuronsView<'a> {
    pub fn to_family(&self) -> Result<families::PatchNeurons<'a>, InvalidPayload> {
        let act = families::Activation::from_code(self.activation)
            .ok_or(InvalidPayload("activation code"))?;
        families::PatchNeurons::new(
            self.layer,
            self.read_site,
            self.write_site,
            self.dim,
            self.keys,
            self.biases,
            self.values,
            act,
        )
    }
}

impl<'a> LowRankTensorView<'a> {
    /// One families' `LowRank` applying all `tensors` together.
    pub fn to_family(
        tensors: &[LowRankTensorView<'a>],
    ) -> Result<families::LowRank<'a>, InvalidPayload> {
        families::LowRank::new(
            tensors
                .iter()
                .map(|t| families::LowRankTensor {
                    name: t.name,
                    n_in: t.n_in,
                    n_out: t.n_out,
                    rank: t.rank,
                    a: t.a,
                    b: t.b,
                    alpha: t.alpha,
                })
                .collect(),
        )
    }
}

impl<'a> MemoryView<'a> {
    pub fn to_family(&self) -> Result<families::Memory<'a>, InvalidPayload> {
        let embedder = match self.embedder {
            EmbedderDesc::BaseModel {
                layer,
                site,
                pooling,
            } => families::Embedder::BaseModel {
                layer: *layer,
                site: Site::from_code(*site).ok_or(InvalidPayload("site code"))?,
                pooling: families::Pooling::from_code(*pooling)
                    .ok_or(InvalidPayload("pooling code"))?,
            },
            EmbedderDesc::External { model_id } => families::Embedder::External {
                model_id,
                fingerprint: None,
            },
            EmbedderDesc::ScopeModel(sr)
            | EmbedderDesc::ScopeModelHead(sr, _)
            | EmbedderDesc::ScopeModelGroups(sr, _, _)
            | EmbedderDesc::ScopeModelGroupsMargin(sr, _, _, _)
            | EmbedderDesc::ScopeModelGroupsVote(sr, _, _, _, _) => families::Embedder::External {
                model_id: &sr.model_id,
                fingerprint: Some(&sr.fingerprint),
            },
        };
        let mem = families::Memory::new(
            self.embed_dim,
            self.embeddings,
            self.threshold,
            self.records
                .iter()
                .map(|r| families::MemoryRecord {
                    edit_id: &r.edit_id,
                    prompt: &r.prompt,
                    target: &r.target,
                    text: &r.text,
                })
                .collect(),
            self.template,
            embedder,
        )?;
        match &self.scope {
            None => Ok(mem),
            Some(sv) => {
                let mut routing = families::ScopeRouting::new(
                    self.embed_dim,
                    sv.relation,
                    sv.subject_rows,
                    sv.subject_counts,
                    sv.subject_threshold,
                    sv.relation_threshold,
                )?;
                if let Some(h) = &sv.head {
                    routing = routing.with_head(families::ScopeHead::new(
                        self.embed_dim,
                        h.members,
                        h.hidden,
                        h.weights,
                        h.out_bias,
                        h.threshold,
                    )?)?;
                }
                if let Some(g) = &sv.groups {
                    routing = routing.with_groups(
                        families::RelationGroups::new(
                            self.embed_dim,
                            g.templates,
                            g.template_group,
                            g.names.iter().map(String::as_str).collect(),
                            g.record_group,
                            g.min_score,
                        )?
                        .with_margin(g.margin)?
                        .with_vote(g.vote)?,
                        sv.subjects.iter().map(String::as_str).collect(),
                    )?;
                }
                mem.with_scope_routing(routing)
            }
        }
    }
}
