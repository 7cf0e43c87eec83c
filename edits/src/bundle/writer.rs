//! Building bundles (used by the compiler, the CLI and tests).

use alloc::string::String;
use alloc::vec::Vec;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::error::BundleError;
use super::format::*;
use super::reader::{read_header, signed_parts};
use super::AlignedBuf;
use crate::keys::key_id;

/// Bundle metadata the builder needs besides payloads and edits.
#[derive(Clone, Debug, PartialEq)]
pub struct BundleMeta {
    pub bundle_id: String,
    pub channel: String,
    pub version: u64,
    pub created: u64,
    pub not_before: u64,
    pub expires: u64,
    pub model: ModelBinding,
}

/// Accumulates sections, payload descriptors and edits, then lays the bundle out.
#[derive(Clone, Debug)]
pub struct BundleBuilder {
    meta: BundleMeta,
    sections: Vec<(SectionEntry, Vec<u8>)>,
    payloads: Vec<Payload>,
    edits: Vec<EditEntry>,
    verification: Option<Verification>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

impl BundleBuilder {
    pub fn new(meta: BundleMeta) -> Self {
        BundleBuilder {
            meta,
            sections: Vec::new(),
            payloads: Vec::new(),
            edits: Vec::new(),
            verification: None,
        }
    }

    /// Records where the edits were checked (format 1.2); `None` leaves the bundle v1.1.
    pub fn set_verification(&mut self, v: Option<Verification>) {
        self.verification = v;
    }

    /// The edits declared so far.
    pub fn edits(&self) -> &[EditEntry] {
        &self.edits
    }

    /// Add a raw section; returns its index.
    pub fn add_section(
        &mut self,
        kind: SectionKind,
        dtype: Dtype,
        shape: Vec<u64>,
        data: Vec<u8>,
    ) -> u32 {
        let entry = SectionEntry {
            kind: kind as u16,
            dtype: dtype as u8,
            shape,
            offset: 0,
            len: data.len() as u64,
            sha256: Sha256::digest(&data).into(),
        };
        self.sections.push((entry, data));
        (self.sections.len() - 1) as u32
    }

    pub fn add_f32(&mut self, kind: SectionKind, shape: Vec<u64>, data: &[f32]) -> u32 {
        self.add_section(kind, Dtype::F32, shape, f32_bytes(data))
    }

    /// Add a payload descriptor (its sections must already be added); returns its index.
    pub fn add_payload(&mut self, p: Payload) -> u32 {
        self.payloads.push(p);
        (self.payloads.len() - 1) as u32
    }

    /// A GRACE codebook: `keys`/`values` are `[n, dim]` row-major, `radii` `[n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_codebook(
        &mut self,
        layer: u32,
        key_site: crate::Site,
        replace_site: crate::Site,
        distance: u8,
        all_positions: bool,
        dim: usize,
        keys: &[f32],
        values: &[f32],
        radii: &[f32],
    ) -> u32 {
        let n = radii.len() as u64;
        let k = self.add_f32(SectionKind::CodebookKeys, alloc::vec![n, dim as u64], keys);
        let v = self.add_f32(
            SectionKind::CodebookValues,
            alloc::vec![n, dim as u64],
            values,
        );
        let r = self.add_f32(SectionKind::CodebookRadii, alloc::vec![n], radii);
        self.add_payload(Payload::Codebook(CodebookDesc {
            layer,
            key_site: key_site.code(),
            replace_site: replace_site.code(),
            distance,
            all_positions,
            keys: k,
            values: v,
            radii: r,
        }))
    }

    /// T-Patcher neurons: `keys`/`values` `[m, dim]`, `biases` `[m]`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_patch_neurons(
        &mut self,
        layer: u32,
        read_site: crate::Site,
        write_site: crate::Site,
        activation: u8,
        dim: usize,
        keys: &[f32],
        biases: &[f32],
        values: &[f32],
    ) -> u32 {
        let m = biases.len() as u64;
        let k = self.add_f32(SectionKind::NeuronKeys, alloc::vec![m, dim as u64], keys);
        let b = self.add_f32(SectionKind::NeuronBiases, alloc::vec![m], biases);
        let v = self.add_f32(
            SectionKind::NeuronValues,
            alloc::vec![m, dim as u64],
            values,
        );
        self.add_payload(Payload::PatchNeurons(PatchNeuronsDesc {
            layer,
            read_site: read_site.code(),
            write_site: write_site.code(),
            activation,
            keys: k,
            biases: b,
            values: v,
        }))
    }

    /// Low-rank deltas `W += alpha/rank * B A`, one per base tensor (A `[rank, n_in]`,
    /// B `[n_out, rank]`); the families' type doubles as the input description.
    pub fn add_low_rank(&mut self, tensors: &[crate::families::LowRankTensor<'_>]) -> u32 {
        let mut descs = Vec::with_capacity(tensors.len());
        for t in tensors {
            let ai = self.add_f32(
                SectionKind::LowRankA,
                alloc::vec![t.rank as u64, t.n_in as u64],
                t.a,
            );
            let bi = self.add_f32(
                SectionKind::LowRankB,
                alloc::vec![t.n_out as u64, t.rank as u64],
                t.b,
            );
            descs.push(LowRankTensorDesc {
                name: t.name.into(),
                n_in: t.n_in as u32,
                n_out: t.n_out as u32,
                rank: t.rank as u32,
                alpha: t.alpha,
                a: ai,
                b: bi,
            });
        }
        self.add_payload(Payload::LowRank(LowRankDesc { tensors: descs }))
    }

    /// A whole llama.cpp GGUF-LoRA file.
    pub fn add_gguf_lora(&mut self, blob: Vec<u8>) -> u32 {
        let n = blob.len() as u64;
        let s = self.add_section(SectionKind::GgufLora, Dtype::U8, alloc::vec![n], blob);
        self.add_payload(Payload::LowRankGguf(LowRankGgufDesc { blob: s }))
    }

    /// A SERAC-style memory: `embeddings` `[records.len(), embed_dim]`, L2-normalized.
    pub fn add_memory(
        &mut self,
        embed_dim: usize,
        embeddings: &[f32],
        threshold: f32,
        template: &str,
        embedder: EmbedderDesc,
        records: Vec<MemoryRecordDesc>,
    ) -> u32 {
        let n = records.len() as u64;
        let e = self.add_f32(
            SectionKind::MemoryEmbeddings,
            alloc::vec![n, embed_dim as u64],
            embeddings,
        );
        self.add_payload(Payload::Memory(MemoryDesc {
            embed_dim: embed_dim as u32,
            threshold,
            template: template.into(),
            embedder,
            embeddings: e,
            records,
        }))
    }

    /// A scope-model memory (v1.1): `embeddings` and `relation` are `[n, embed_dim]`,
    /// `subject_rows` `[sum(routing.subject_counts), embed_dim]`; the section indices in
    /// `routing` are filled in here. `group_vote` (v1.6) makes the groups vote with the head
    /// by that weight; it needs both a head and groups, and is dropped without either.
    #[allow(clippy::too_many_arguments)]
    pub fn add_scope_memory(
        &mut self,
        embed_dim: usize,
        embeddings: &[f32],
        relation: &[f32],
        subject_rows: &[f32],
        threshold: f32,
        template: &str,
        mut routing: ScopeRoutingDesc,
        head: Option<(ScopeHeadDesc, &[f32])>,
        groups: Option<(RelationGroupsDesc, &[f32])>,
        relation_margin: f32,
        group_vote: Option<f32>,
        records: Vec<MemoryRecordDesc>,
    ) -> u32 {
        let n = records.len() as u64;
        let e = embed_dim as u64;
        let emb = self.add_f32(SectionKind::MemoryEmbeddings, alloc::vec![n, e], embeddings);
        routing.relation = self.add_f32(SectionKind::MemoryRelation, alloc::vec![n, e], relation);
        let total = (subject_rows.len() / embed_dim.max(1)) as u64;
        routing.subject_rows = self.add_f32(
            SectionKind::MemorySubjectRows,
            alloc::vec![total, e],
            subject_rows,
        );
        let head = head.map(|(mut h, weights)| {
            let rows = h.members as u64 * h.hidden as u64;
            h.weights = self.add_f32(
                SectionKind::ScopeHeadWeights,
                alloc::vec![rows, 3 * e + 5],
                weights,
            );
            h
        });
        let embedder = match (head, groups) {
            (None, None) => EmbedderDesc::ScopeModel(routing),
            (Some(h), None) => EmbedderDesc::ScopeModelHead(routing, h),
            (head, Some((mut g, templates))) => {
                let t = g.template_group.len() as u64;
                g.templates =
                    self.add_f32(SectionKind::RelationTemplates, alloc::vec![t, e], templates);
                // A vote needs a head and format 1.6, a margin 1.5; without either the bundle
                // stays 1.4.
                match (head, group_vote) {
                    (Some(h), Some(w)) => {
                        EmbedderDesc::ScopeModelGroupsVote(routing, h, g, relation_margin, w)
                    }
                    (head, _) if relation_margin != 0.0 => {
                        EmbedderDesc::ScopeModelGroupsMargin(routing, head, g, relation_margin)
                    }
                    (head, _) => EmbedderDesc::ScopeModelGroups(routing, head, g),
                }
            }
        };
        self.add_payload(Payload::Memory(MemoryDesc {
            embed_dim: embed_dim as u32,
            threshold,
            template: template.into(),
            embedder,
            embeddings: emb,
            records,
        }))
    }

    /// Declare an edit implemented by units `first..first+count` of `payload`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_edit(
        &mut self,
        id: &str,
        layer: u32,
        site: crate::Site,
        prompt: &str,
        target: &str,
        payload: u32,
        first: u32,
        count: u32,
    ) {
        self.edits.push(EditEntry {
            id: id.into(),
            layer,
            site: site.code(),
            prompt: prompt.into(),
            target: target.into(),
            payload,
            first,
            count,
        });
    }

    /// The manifest with final section offsets and the laid-out bundle, signature block zeroed.
    pub fn build_unsigned(&self) -> Result<AlignedBuf, BundleError> {
        // What the readers refuse is not built (`assemble` stays free to craft bad bundles).
        super::stream::check_ids(&self.meta.bundle_id, &self.meta.channel)?;
        // A signer learns here, not on the device, that the bundle could never be activated.
        if self.meta.not_before >= self.meta.expires {
            return Err(BundleError::BadManifest(super::stream::EMPTY_VALIDITY));
        }
        if let Some(index) = self
            .edits
            .iter()
            .position(|e| super::stream::has_control(&e.id))
        {
            return Err(BundleError::BadEdit {
                index,
                reason: super::stream::CONTROL_IN_EDIT_ID,
            });
        }
        for (payload, p) in self.payloads.iter().enumerate() {
            if let Payload::Memory(d) = p {
                if d.records
                    .iter()
                    .any(|r| super::stream::has_control(&r.edit_id))
                {
                    return Err(BundleError::InvalidPayload {
                        payload,
                        reason: super::stream::CONTROL_IN_RECORD_ID,
                    });
                }
            }
        }
        let mut manifest = Manifest {
            bundle_id: self.meta.bundle_id.clone(),
            channel: self.meta.channel.clone(),
            version: self.meta.version,
            created: self.meta.created,
            not_before: self.meta.not_before,
            expires: self.meta.expires,
            model: self.meta.model.clone(),
            sections: self.sections.iter().map(|(e, _)| e.clone()).collect(),
            payloads: self.payloads.iter().map(Payload::to_entry).collect(),
            edits: self.edits.clone(),
            verification: self.verification.clone(),
        };
        layout(&mut manifest)?;
        let blobs: Vec<&[u8]> = self.sections.iter().map(|(_, d)| d.as_slice()).collect();
        assemble(&manifest, &blobs)
    }

    pub fn build_signed(&self, key: &SigningKey) -> Result<AlignedBuf, BundleError> {
        let mut buf = self.build_unsigned()?;
        sign_in_place(buf.as_mut_slice(), key)?;
        Ok(buf)
    }
}

/// Assign section offsets: consecutive, 64-byte aligned, starting at the payload offset.
/// Offsets are varints inside the manifest, whose length decides where sections start, so this
/// iterates until the layout is stable (two or three rounds).
pub fn layout(manifest: &mut Manifest) -> Result<(), BundleError> {
    let mut payload_offset = 0u64;
    for _ in 0..8 {
        let mut pos = payload_offset;
        for s in manifest.sections.iter_mut() {
            s.offset = pos;
            pos = align_up(pos.saturating_add(s.len), SECTION_ALIGN)
                .ok_or(BundleError::BadManifest("layout"))?;
        }
        let len = encode_manifest(manifest)?.len() as u64;
        let sig = align_up(HEADER_LEN as u64 + len, 8).unwrap_or(u64::MAX);
        let po = align_up(sig + SIG_BLOCK_LEN as u64, SECTION_ALIGN).unwrap_or(u64::MAX);
        if po == payload_offset {
            return Ok(());
        }
        payload_offset = po;
    }
    Err(BundleError::BadManifest("layout does not converge"))
}

/// Lay out `manifest` and the section bytes at the offsets the manifest declares (which must be
/// at or after the payload offset and not overlap). Low level: tests use it to craft bundles.
pub fn assemble(manifest: &Manifest, blobs: &[&[u8]]) -> Result<AlignedBuf, BundleError> {
    let m = encode_manifest(manifest)?;
    let sig_offset = align_up((HEADER_LEN + m.len()) as u64, 8).unwrap_or(u64::MAX);
    let payload_offset =
        align_up(sig_offset + SIG_BLOCK_LEN as u64, SECTION_ALIGN).unwrap_or(u64::MAX);
    let mut end = payload_offset;
    for s in &manifest.sections {
        end = end.max(s.offset.saturating_add(s.len));
    }
    let total = align_up(end, SECTION_ALIGN).ok_or(BundleError::BadManifest("layout"))?;
    if total > MAX_BUNDLE_LEN {
        return Err(BundleError::CapExceeded {
            what: "bundle length",
            value: total,
            cap: MAX_BUNDLE_LEN,
        });
    }
    let header = Header {
        magic: MAGIC,
        major: U16::new(FORMAT_MAJOR),
        minor: U16::new(manifest_minor(manifest)),
        flags: U32::new(0),
        header_len: U32::new(HEADER_LEN as u32),
        manifest_len: U32::new(m.len() as u32),
        sig_offset: U64::new(sig_offset),
        sig_len: U32::new(SIG_BLOCK_LEN as u32),
        reserved0: U32::new(0),
        payload_offset: U64::new(payload_offset),
        total_len: U64::new(total),
        reserved1: U64::new(0),
    };
    let mut buf = AlignedBuf::zeroed(total as usize);
    let out = buf.as_mut_slice();
    out[..HEADER_LEN].copy_from_slice(header.as_bytes());
    out[HEADER_LEN..HEADER_LEN + m.len()].copy_from_slice(&m);
    for (s, data) in manifest.sections.iter().zip(blobs) {
        // Crafted (invalid) offsets are left for the reader to refuse; never clobber the header.
        let o = s.offset;
        if o >= payload_offset && o.saturating_add(data.len() as u64) <= total {
            out[o as usize..o as usize + data.len()].copy_from_slice(data);
        }
    }
    Ok(buf)
}

/// Sign (or re-sign) a bundle in place: writes key id + ed25519 signature over header+manifest.
pub fn sign_in_place(buf: &mut [u8], key: &SigningKey) -> Result<(), BundleError> {
    let h = read_header(buf)?;
    let (msg, _) = signed_parts(buf, &h);
    let sig = key.sign(msg).to_bytes();
    let id = key_id(&key.verifying_key());
    let at = h.sig_offset.get() as usize;
    buf[at..at + KEY_ID_LEN].copy_from_slice(&id);
    buf[at + KEY_ID_LEN..at + SIG_BLOCK_LEN].copy_from_slice(&sig);
    Ok(())
}

/// The manifest's bytes (what the header's manifest_len counts): the postcard encoding of the
/// v1.1 fields, then, in v1.2, the postcard encoding of the verification record when there is one.
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>, BundleError> {
    let mut out = postcard::to_allocvec(m).map_err(|_| BundleError::BadManifest("encode"))?;
    if let Some(v) = &m.verification {
        out.extend(postcard::to_allocvec(v).map_err(|_| BundleError::BadManifest("encode"))?);
    }
    Ok(out)
}

/// The lowest format minor that holds `m`: bundles without v1.2 content stay readable by v1.1
/// runtimes.
pub fn manifest_minor(m: &Manifest) -> u16 {
    let memory = |f: fn(&MemoryDesc) -> bool| {
        m.payloads.iter().any(|p| {
            p.kind == PayloadKind::Memory as u16
                && postcard::from_bytes::<MemoryDesc>(&p.body).is_ok_and(|d| f(&d))
        })
    };
    if memory(|d| d.embedder.group_vote().is_some()) {
        MINOR_GROUP_VOTE
    } else if memory(|d| d.embedder.relation_margin() != 0.0) {
        MINOR_RELATION_MARGIN
    } else if memory(|d| d.embedder.relation_groups().is_some()) {
        MINOR_RELATION_GROUPS
    } else if memory(|d| d.embedder.scope_head().is_some()) {
        MINOR_SCOPE_HEAD
    } else if m.verification.is_some() {
        MINOR_VERIFICATION
    } else {
        1
    }
}
