//! Verification and zero-copy reading of a bundle held in a byte buffer.
//!
//! Order (nothing in the manifest or payload is interpreted before the step that covers it):
//! header structure → signature over header+manifest → manifest decode → section table
//! (bounds, alignment, overlap, zero padding) → section hashes → descriptors, shapes, finiteness.

use alloc::vec::Vec;
use core::ops::Range;

use ed25519_dalek::Signature;
use sha2::{Digest, Sha256};
use zerocopy::FromBytes;

use super::error::BundleError;
use super::format::*;
use super::stream::{
    check_ids, has_control, CONTROL_IN_EDIT_ID, CONTROL_IN_RECORD_ID, EMPTY_VALIDITY,
};
use crate::keys::{secret_seed_index, KeyId, TrustStore};
use crate::site::Site;

/// The verified metadata of a bundle (owned; the tensors stay in the buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub manifest: Manifest,
    pub payloads: Vec<Payload>,
    pub key_id: KeyId,
}

/// Read the header without verifying anything else (used by `sign` and `inspect`).
pub fn read_header(buf: &[u8]) -> Result<Header, BundleError> {
    read_header_of(buf, buf.len() as u64)
}

/// Check the header at the start of `buf` (at least its 64 bytes) for a bundle of `len` bytes in
/// all: a file reader checks it before reading (or allocating) anything else.
pub fn read_header_of(buf: &[u8], len: u64) -> Result<Header, BundleError> {
    let (h, _) = Header::read_from_prefix(buf).map_err(|_| BundleError::Truncated {
        needed: HEADER_LEN as u64,
        have: len.min(buf.len() as u64),
    })?;
    if h.magic != MAGIC {
        return Err(BundleError::BadMagic);
    }
    if h.major.get() != FORMAT_MAJOR {
        return Err(BundleError::UnsupportedVersion {
            major: h.major.get(),
            minor: h.minor.get(),
        });
    }
    if h.header_len.get() as usize != HEADER_LEN {
        return Err(BundleError::BadHeader("header_len"));
    }
    if h.flags.get() != 0 {
        return Err(BundleError::BadHeader("flags"));
    }
    if h.reserved0.get() != 0 || h.reserved1.get() != 0 {
        return Err(BundleError::BadHeader("reserved"));
    }
    if h.sig_len.get() as usize != SIG_BLOCK_LEN {
        return Err(BundleError::BadHeader("sig_len"));
    }
    let total = h.total_len.get();
    if total > MAX_BUNDLE_LEN {
        return Err(BundleError::CapExceeded {
            what: "bundle length",
            value: total,
            cap: MAX_BUNDLE_LEN,
        });
    }
    if h.manifest_len.get() > MAX_MANIFEST_LEN {
        return Err(BundleError::CapExceeded {
            what: "manifest length",
            value: h.manifest_len.get() as u64,
            cap: MAX_MANIFEST_LEN as u64,
        });
    }
    // The layout is fully determined by the manifest length: check it is exactly that.
    let manifest_end = HEADER_LEN as u64 + h.manifest_len.get() as u64;
    let sig_offset = align_up(manifest_end, 8).ok_or(BundleError::BadHeader("sig_offset"))?;
    if h.sig_offset.get() != sig_offset {
        return Err(BundleError::BadHeader("sig_offset"));
    }
    let payload_offset = align_up(sig_offset + SIG_BLOCK_LEN as u64, SECTION_ALIGN)
        .ok_or(BundleError::BadHeader("payload_offset"))?;
    if h.payload_offset.get() != payload_offset {
        return Err(BundleError::BadHeader("payload_offset"));
    }
    if total < payload_offset || total % SECTION_ALIGN != 0 {
        return Err(BundleError::BadHeader("total_len"));
    }
    if len < total {
        return Err(BundleError::Truncated {
            needed: total,
            have: len,
        });
    }
    if len != total {
        return Err(BundleError::LengthMismatch {
            declared: total,
            actual: len,
        });
    }
    Ok(h)
}

/// The bytes the signature covers (header + manifest) and the signature block.
pub(crate) fn signed_parts<'a>(buf: &'a [u8], h: &Header) -> (&'a [u8], &'a [u8]) {
    let end = HEADER_LEN + h.manifest_len.get() as usize;
    let sig = h.sig_offset.get() as usize;
    (&buf[..end], &buf[sig..sig + SIG_BLOCK_LEN])
}

/// Check the signature only (after [`read_header`]).
pub fn verify_signature(buf: &[u8], trust: &TrustStore) -> Result<KeyId, BundleError> {
    let h = read_header(buf)?;
    let (msg, block) = signed_parts(buf, &h);
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&block[..KEY_ID_LEN]);
    if block.iter().all(|&b| b == 0) {
        return Err(BundleError::Unsigned);
    }
    let Some(key) = trust.get(&key_id) else {
        let raw = trust.keys().map(|k| *k.as_bytes());
        return Err(match secret_seed_index(&key_id, raw) {
            Some(index) => BundleError::SecretKeyTrusted { index },
            None => BundleError::UnknownKeyId(key_id),
        });
    };
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&block[KEY_ID_LEN..]);
    key.verify_strict(msg, &Signature::from_bytes(&sig))
        .map_err(|_| BundleError::BadSignature)?;
    Ok(key_id)
}

/// Decode the manifest bytes (no signature check: callers verify first; the fuzzer calls it on
/// arbitrary input).
/// A v1.2 verification record, when present, follows the v1.1 fields (see `encode_manifest`).
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, BundleError> {
    let (mut m, rest): (Manifest, &[u8]) = postcard::take_from_bytes(bytes)
        .map_err(|e| BundleError::ManifestDecode(postcard_msg(e)))?;
    if !rest.is_empty() {
        let (v, rest): (Verification, &[u8]) = postcard::take_from_bytes(rest)
            .map_err(|e| BundleError::ManifestDecode(postcard_msg(e)))?;
        if !rest.is_empty() {
            return Err(BundleError::ManifestTrailingBytes(rest.len()));
        }
        m.verification = Some(v);
    }
    Ok(m)
}

fn postcard_msg(e: postcard::Error) -> &'static str {
    use postcard::Error::*;
    match e {
        DeserializeUnexpectedEnd => "unexpected end",
        DeserializeBadVarint => "bad varint",
        DeserializeBadBool => "bad bool",
        DeserializeBadUtf8 => "bad utf-8",
        DeserializeBadEnum => "bad enum",
        _ => "malformed",
    }
}

/// Full verification of a bundle buffer against a trust store. `buf` must be 4-byte aligned.
pub fn verify(buf: &[u8], trust: &TrustStore) -> Result<Verified, BundleError> {
    let h = read_header(buf)?;
    if !(buf.as_ptr() as usize).is_multiple_of(4) {
        return Err(BundleError::MisalignedBuffer);
    }
    let key_id = verify_signature(buf, trust)?;
    let manifest = decode_manifest(&buf[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize])?;
    check_minor(&manifest, h.minor.get())?;
    let payloads = check_manifest(&manifest, Some((buf, h.payload_offset.get())))?;
    if h.minor.get() < MINOR_SCOPE_HEAD && payloads.iter().any(has_scope_head) {
        return Err(BundleError::BadHeader(
            "minor: a scope head needs format 1.3",
        ));
    }
    if h.minor.get() < MINOR_RELATION_GROUPS && payloads.iter().any(has_relation_groups) {
        return Err(BundleError::BadHeader(
            "minor: relation groups need format 1.4",
        ));
    }
    if h.minor.get() < MINOR_RELATION_MARGIN && payloads.iter().any(has_relation_margin) {
        return Err(BundleError::BadHeader(
            "minor: a relation-group margin needs format 1.5",
        ));
    }
    if h.minor.get() < MINOR_GROUP_VOTE && payloads.iter().any(has_group_vote) {
        return Err(BundleError::BadHeader(
            "minor: relation groups voting with the head need format 1.6",
        ));
    }
    Ok(Verified {
        manifest,
        payloads,
        key_id,
    })
}

/// A manifest carrying v1.2 content under a lower minor is malformed (a v1.1 reader would take it
/// for trailing bytes; this one must not read it as anything else).
pub fn check_minor(m: &Manifest, minor: u16) -> Result<(), BundleError> {
    if m.verification.is_some() && minor < MINOR_VERIFICATION {
        return Err(BundleError::BadHeader(
            "minor: a verification record needs format 1.2",
        ));
    }
    Ok(())
}

/// The counts and values of relation groups over `n` records (their template section is
/// checked where sections are): both readers apply these same rules.
pub fn check_relation_groups(g: &RelationGroupsDesc, n: u64) -> Result<(), &'static str> {
    let (t, k) = (g.template_group.len(), g.names.len());
    if t == 0 || t > MAX_RELATION_TEMPLATES || k == 0 || k > MAX_RELATION_GROUPS {
        return Err("relation groups: template or group count");
    }
    if g.record_group.len() as u64 != n {
        return Err("relation groups: one group per record");
    }
    if g.template_group.iter().any(|&x| x as usize >= k)
        || g.record_group
            .iter()
            .any(|&x| x != u16::MAX && x as usize >= k)
    {
        return Err("relation groups: group id out of range");
    }
    if g.names.iter().any(|s| s.len() > MAX_STRING_LEN) {
        return Err("relation groups: name length");
    }
    if !super::format::is_cosine(g.min_score) {
        return Err("relation groups: min_score must be a cosine in [-1, 1]");
    }
    Ok(())
}

/// A memory payload whose relation groups vote with the head (format 1.6 content).
pub fn has_group_vote(p: &Payload) -> bool {
    matches!(p, Payload::Memory(d) if d.embedder.group_vote().is_some())
}

/// A memory payload with a relation-group margin (format 1.5 content).
pub fn has_relation_margin(p: &Payload) -> bool {
    matches!(p, Payload::Memory(d) if d.embedder.relation_margin() != 0.0)
}

/// A memory payload with relation groups (format 1.4 content).
pub fn has_relation_groups(p: &Payload) -> bool {
    matches!(p, Payload::Memory(d) if d.embedder.relation_groups().is_some())
}

/// A memory payload routed by a trained scope head (format 1.3 content).
pub fn has_scope_head(p: &Payload) -> bool {
    matches!(p, Payload::Memory(d) if d.embedder.scope_head().is_some())
}

fn cap(what: &'static str, value: usize, cap: usize) -> Result<(), BundleError> {
    if value > cap {
        return Err(BundleError::CapExceeded {
            what,
            value: value as u64,
            cap: cap as u64,
        });
    }
    Ok(())
}

fn check_str(s: &str, what: &'static str) -> Result<(), BundleError> {
    cap(what, s.len(), MAX_STRING_LEN)
}

fn check_verification(v: &Verification, n_edits: usize) -> Result<(), BundleError> {
    cap("verified backends", v.backends.len(), MAX_VERIFIED_BACKENDS)?;
    for (i, b) in v.backends.iter().enumerate() {
        cap("backend name length", b.backend.len(), MAX_BACKEND_NAME_LEN)?;
        if b.backend.is_empty() {
            return Err(BundleError::BadManifest("verification: empty backend name"));
        }
        if b.total as usize != n_edits || b.passed > b.total {
            return Err(BundleError::BadManifest(
                "verification: counts do not match the edits",
            ));
        }
        if v.backends[..i].iter().any(|o| o.backend == b.backend) {
            return Err(BundleError::BadManifest(
                "verification: backend listed twice",
            ));
        }
    }
    Ok(())
}

/// Semantic checks of a decoded manifest. With `data` = (bundle, payload offset) also the section
/// bytes: bounds, padding, hashes, finiteness. Returns the decoded payload descriptors.
pub fn check_manifest(
    m: &Manifest,
    data: Option<(&[u8], u64)>,
) -> Result<Vec<Payload>, BundleError> {
    check_str(&m.bundle_id, "bundle id length")?;
    check_str(&m.channel, "channel length")?;
    check_str(&m.model.arch, "architecture length")?;
    if m.bundle_id.is_empty() {
        return Err(BundleError::BadManifest("empty bundle id"));
    }
    check_ids(&m.bundle_id, &m.channel)?;
    // `EditSet::add` accepts only `not_before <= now < expires`: an empty window never applies.
    if m.not_before >= m.expires {
        return Err(BundleError::BadManifest(EMPTY_VALIDITY));
    }
    cap("section count", m.sections.len(), MAX_SECTIONS)?;
    cap("payload count", m.payloads.len(), MAX_PAYLOADS)?;
    cap("edit count", m.edits.len(), MAX_EDITS)?;
    if let Some(v) = &m.verification {
        check_verification(v, m.edits.len())?;
    }
    if m.model.n_embd as u64 > MAX_DIM || m.model.n_embd == 0 {
        return Err(BundleError::BadManifest("model n_embd"));
    }
    if m.model.n_layer > MAX_LAYER {
        return Err(BundleError::BadManifest("model n_layer"));
    }

    // Section table.
    for (i, s) in m.sections.iter().enumerate() {
        let kind = SectionKind::from_code(s.kind).ok_or(BundleError::UnknownSectionKind {
            index: i,
            kind: s.kind,
        })?;
        let dtype = Dtype::from_code(s.dtype).ok_or(BundleError::UnknownDtype {
            index: i,
            dtype: s.dtype,
        })?;
        let want = if kind == SectionKind::GgufLora {
            Dtype::U8
        } else {
            Dtype::F32
        };
        if dtype != want || s.shape.is_empty() || s.shape.len() > MAX_SHAPE_RANK {
            return Err(BundleError::SectionShape { index: i });
        }
        let elems = s
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(dtype.size()));
        if elems != Some(s.len) {
            return Err(BundleError::SectionShape { index: i });
        }
        if s.offset % SECTION_ALIGN != 0 {
            return Err(BundleError::SectionMisaligned { index: i });
        }
    }
    if let Some((buf, payload_offset)) = data {
        check_section_bytes(m, buf, payload_offset)?;
    }

    // Payload descriptors.
    let n_embd = m.model.n_embd as u64;
    let mut used = alloc::vec![false; m.sections.len()];
    let mut payloads = Vec::with_capacity(m.payloads.len());
    for (pi, entry) in m.payloads.iter().enumerate() {
        let kind = PayloadKind::from_code(entry.kind).ok_or(BundleError::UnknownPayloadKind {
            index: pi,
            kind: entry.kind,
        })?;
        let payload =
            decode_body(kind, &entry.body).ok_or(BundleError::DescriptorDecode { index: pi })?;
        let mut r = SectionRefs {
            m,
            used: &mut used,
            payload: pi,
        };
        check_payload(&payload, pi, n_embd, m.model.n_layer, &mut r)?;
        payloads.push(payload);
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(BundleError::UnreferencedSection { index: i });
    }

    // Edits.
    let mut ids: Vec<(&str, usize)> = Vec::with_capacity(m.edits.len());
    let mut ranges: Vec<(u32, u32, u64)> = Vec::with_capacity(m.edits.len());
    for (i, e) in m.edits.iter().enumerate() {
        check_str(&e.id, "edit id length")?;
        check_str(&e.prompt, "prompt length")?;
        check_str(&e.target, "target length")?;
        if e.id.is_empty() {
            return Err(BundleError::BadEdit {
                index: i,
                reason: "empty id",
            });
        }
        if has_control(&e.id) {
            return Err(BundleError::BadEdit {
                index: i,
                reason: CONTROL_IN_EDIT_ID,
            });
        }
        if Site::from_code(e.site).is_none() {
            return Err(BundleError::BadEdit {
                index: i,
                reason: "unknown site",
            });
        }
        if e.layer >= m.model.n_layer.max(1) {
            return Err(BundleError::BadEdit {
                index: i,
                reason: "layer out of range",
            });
        }
        let p = payloads
            .get(e.payload as usize)
            .ok_or(BundleError::BadEdit {
                index: i,
                reason: "no such payload",
            })?;
        let end = e.first as u64 + e.count as u64;
        if e.count == 0 || end > units(m, p) as u64 {
            return Err(BundleError::BadEdit {
                index: i,
                reason: "units out of range",
            });
        }
        ids.push((e.id.as_str(), i));
        ranges.push((e.payload, e.first, end));
    }
    ids.sort_unstable();
    // The first edit (in manifest order) whose id an earlier one has, as the stream reports it.
    if let Some(index) = ids
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .min()
    {
        return Err(BundleError::DuplicateEditId { index });
    }
    if let Some(index) = first_unit_clash(&ranges) {
        return Err(BundleError::BadEdit {
            index,
            reason: "two edits claim the same units",
        });
    }
    Ok(payloads)
}

/// The first edit, in manifest order, whose units (`(payload, first, end)`) overlap an earlier
/// edit's: the index the streaming verifier reports. The edits before it are disjoint, so the
/// earlier range that starts last before this one ends is the only one that can reach into it.
fn first_unit_clash(ranges: &[(u32, u32, u64)]) -> Option<usize> {
    let mut seen = alloc::collections::BTreeMap::<(u32, u32), u64>::new();
    for (j, &(payload, first, end)) in ranges.iter().enumerate() {
        let before = seen
            .range((payload, 0)..=(payload, first))
            .next_back()
            .is_some_and(|(_, &e)| e > first as u64);
        let after = seen
            .range((payload, first)..)
            .next()
            .is_some_and(|(&(p, f), _)| p == payload && (f as u64) < end);
        if before || after {
            return Some(j);
        }
        seen.insert((payload, first), end);
    }
    None
}

/// Decodes a payload descriptor of `kind` (postcard, no trailing bytes); `None` when it does not
/// decode. Shape and reference checks come after (see [`verify`]).
pub fn decode_body(kind: PayloadKind, body: &[u8]) -> Option<Payload> {
    fn d<'a, T: serde::Deserialize<'a>>(b: &'a [u8]) -> Option<T> {
        match postcard::take_from_bytes::<T>(b) {
            Ok((v, [])) => Some(v),
            _ => None,
        }
    }
    Some(match kind {
        PayloadKind::Codebook => Payload::Codebook(d(body)?),
        PayloadKind::PatchNeurons => Payload::PatchNeurons(d(body)?),
        PayloadKind::LowRank => Payload::LowRank(d(body)?),
        PayloadKind::LowRankGguf => Payload::LowRankGguf(d(body)?),
        PayloadKind::Memory => Payload::Memory(d(body)?),
    })
}

/// How many independently removable units a payload has (rows, neurons, tensors, records).
pub fn units(m: &Manifest, p: &Payload) -> usize {
    let rows = |i: u32| {
        m.sections
            .get(i as usize)
            .and_then(|s| s.shape.first().copied())
            .unwrap_or(0) as usize
    };
    match p {
        Payload::Codebook(d) => rows(d.keys),
        Payload::PatchNeurons(d) => rows(d.keys),
        Payload::LowRank(d) => d.tensors.len(),
        Payload::LowRankGguf(_) => 1,
        Payload::Memory(d) => d.records.len(),
    }
}

fn check_section_bytes(m: &Manifest, buf: &[u8], payload_offset: u64) -> Result<(), BundleError> {
    let total = buf.len() as u64;
    // Faults are named as the streaming verifier names them: the first section out of bounds
    // in index order, and the first overlapping pair in index order.
    for (i, s) in m.sections.iter().enumerate() {
        let end = s.offset.checked_add(s.len);
        if s.offset < payload_offset || end.is_none_or(|e| e > total) {
            return Err(BundleError::SectionOutOfBounds { index: i });
        }
    }
    let mut order: Vec<usize> = (0..m.sections.len()).collect();
    order.sort_unstable_by_key(|&i| (m.sections[i].offset, i));
    let overlaps = |a: usize, b: usize| {
        let (x, y) = (&m.sections[a], &m.sections[b]);
        (x.offset, a) < (y.offset, b) && x.offset + x.len > y.offset
    };
    if order.windows(2).any(|w| overlaps(w[0], w[1])) {
        // Only on refusal: the stream's pairwise order (at most MAX_SECTIONS^2 comparisons).
        let n = m.sections.len();
        for a in 0..n {
            if let Some(b) = (0..n).find(|&b| overlaps(a, b)) {
                return Err(BundleError::SectionOverlap { a, b });
            }
        }
    }
    // Every byte outside header/manifest/signature/sections must be zero, so that no bit of the
    // bundle is unauthenticated.
    let manifest_end = HEADER_LEN as u64 + read_u32(buf, 20) as u64;
    let sig_end = read_u64(buf, 24) + SIG_BLOCK_LEN as u64;
    let mut gaps: Vec<Range<u64>> = Vec::with_capacity(order.len() + 2);
    gaps.push(manifest_end..read_u64(buf, 24));
    let mut pos = sig_end;
    for &i in &order {
        let s = &m.sections[i];
        gaps.push(pos..s.offset);
        pos = s.offset + s.len;
    }
    gaps.push(pos..total);
    for g in gaps {
        if let Some(k) = buf[g.start as usize..g.end as usize]
            .iter()
            .position(|&b| b != 0)
        {
            return Err(BundleError::NonZeroPadding {
                offset: g.start + k as u64,
            });
        }
    }
    for (i, s) in m.sections.iter().enumerate() {
        let bytes = &buf[s.offset as usize..(s.offset + s.len) as usize];
        // Hash and scan chunk by chunk so each chunk is read from memory once (still in cache
        // for the finiteness scan). A NaN found early is only reported after the hash matched,
        // so corruption is always reported as corruption.
        let mut h = Sha256::new();
        let mut bounded = true;
        for chunk in bytes.chunks(64 << 10) {
            h.update(chunk);
            if s.dtype == Dtype::F32 as u8 {
                bounded &= within_bound(chunk);
            }
        }
        if h.finalize().as_slice() != s.sha256 {
            return Err(BundleError::SectionHash { index: i });
        }
        if !bounded {
            // Rare path: say which of the two it is.
            return Err(if all_finite(bytes) {
                BundleError::ValueOutOfRange { index: i }
            } else {
                BundleError::NonFinite { index: i }
            });
        }
    }
    Ok(())
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

struct SectionRefs<'m, 'u> {
    m: &'m Manifest,
    used: &'u mut [bool],
    payload: usize,
}

impl SectionRefs<'_, '_> {
    /// Check that section `idx` exists, has `kind`, the given shape, and is used once.
    fn take(&mut self, idx: u32, kind: SectionKind, shape: &[u64]) -> Result<(), BundleError> {
        let err = |reason| BundleError::BadSectionRef {
            payload: self.payload,
            section: idx,
            reason,
        };
        let s = self
            .m
            .sections
            .get(idx as usize)
            .ok_or(err("no such section"))?;
        if s.kind != kind as u16 {
            return Err(err("wrong section kind"));
        }
        if !shape.is_empty() && s.shape != shape {
            return Err(err("wrong shape"));
        }
        if core::mem::replace(&mut self.used[idx as usize], true) {
            return Err(err("section used twice"));
        }
        Ok(())
    }

    fn rows(&self, idx: u32) -> u64 {
        self.m
            .sections
            .get(idx as usize)
            .and_then(|s| s.shape.first().copied())
            .unwrap_or(0)
    }
}

fn site(payload: usize, code: u8) -> Result<Site, BundleError> {
    Site::from_code(code).ok_or(BundleError::UnknownSite { payload, code })
}

fn check_payload(
    p: &Payload,
    pi: usize,
    n_embd: u64,
    n_layer: u32,
    r: &mut SectionRefs,
) -> Result<(), BundleError> {
    let invalid = |reason| BundleError::InvalidPayload {
        payload: pi,
        reason,
    };
    let layer_ok = |layer: u32| {
        if layer >= n_layer {
            Err(BundleError::PayloadDimension {
                payload: pi,
                what: "layer",
                value: layer as u64,
                model: n_layer as u64,
            })
        } else {
            Ok(())
        }
    };
    let rows_cap = |n: u64| {
        if n > MAX_ROWS {
            Err(BundleError::CapExceeded {
                what: "rows",
                value: n,
                cap: MAX_ROWS,
            })
        } else if n == 0 {
            Err(invalid("no rows"))
        } else {
            Ok(())
        }
    };
    match p {
        Payload::Codebook(d) => {
            layer_ok(d.layer)?;
            site(pi, d.key_site)?;
            site(pi, d.replace_site)?;
            if d.distance > 2 {
                return Err(BundleError::UnknownCode {
                    payload: pi,
                    what: "distance",
                    code: d.distance,
                });
            }
            let n = r.rows(d.keys);
            rows_cap(n)?;
            r.take(d.keys, SectionKind::CodebookKeys, &[n, n_embd])?;
            r.take(d.values, SectionKind::CodebookValues, &[n, n_embd])?;
            r.take(d.radii, SectionKind::CodebookRadii, &[n])?;
        }
        Payload::PatchNeurons(d) => {
            layer_ok(d.layer)?;
            site(pi, d.read_site)?;
            site(pi, d.write_site)?;
            if d.activation > 1 {
                return Err(BundleError::UnknownCode {
                    payload: pi,
                    what: "activation",
                    code: d.activation,
                });
            }
            let n = r.rows(d.keys);
            rows_cap(n)?;
            r.take(d.keys, SectionKind::NeuronKeys, &[n, n_embd])?;
            r.take(d.biases, SectionKind::NeuronBiases, &[n])?;
            r.take(d.values, SectionKind::NeuronValues, &[n, n_embd])?;
        }
        Payload::LowRank(d) => {
            cap("low-rank tensors", d.tensors.len(), MAX_LOWRANK_TENSORS)?;
            if d.tensors.is_empty() {
                return Err(invalid("no tensors"));
            }
            for t in &d.tensors {
                check_str(&t.name, "tensor name length")?;
                let (n_in, n_out, rank) = (t.n_in as u64, t.n_out as u64, t.rank as u64);
                if rank == 0 || rank > MAX_RANK || n_in == 0 || n_out == 0 {
                    return Err(invalid("low-rank dims"));
                }
                if n_in > MAX_DIM * 4 || n_out > MAX_DIM * 4 {
                    return Err(BundleError::CapExceeded {
                        what: "low-rank width",
                        value: n_in.max(n_out),
                        cap: MAX_DIM * 4,
                    });
                }
                if !t.alpha.is_finite() {
                    return Err(invalid("alpha not finite"));
                }
                r.take(t.a, SectionKind::LowRankA, &[rank, n_in])?;
                r.take(t.b, SectionKind::LowRankB, &[n_out, rank])?;
            }
        }
        Payload::LowRankGguf(d) => {
            r.take(d.blob, SectionKind::GgufLora, &[])?;
        }
        Payload::Memory(d) => {
            let e = d.embed_dim as u64;
            if e == 0 || e > MAX_DIM {
                return Err(invalid("embed_dim"));
            }
            if !d.threshold.is_finite() {
                return Err(invalid("threshold not finite"));
            }
            check_str(&d.template, "template length")?;
            if let EmbedderDesc::External { model_id } = &d.embedder {
                check_str(model_id, "embedder id length")?;
            }
            if let EmbedderDesc::BaseModel {
                layer,
                site: s,
                pooling,
            } = &d.embedder
            {
                layer_ok(*layer)?;
                site(pi, *s)?;
                if *pooling > 1 {
                    return Err(BundleError::UnknownCode {
                        payload: pi,
                        what: "pooling",
                        code: *pooling,
                    });
                }
            }
            let n = d.records.len() as u64;
            rows_cap(n)?;
            for rec in &d.records {
                check_str(&rec.edit_id, "record id length")?;
                if has_control(&rec.edit_id) {
                    return Err(invalid(CONTROL_IN_RECORD_ID));
                }
                check_str(&rec.prompt, "record prompt length")?;
                check_str(&rec.target, "record target length")?;
                check_str(&rec.text, "record text length")?;
            }
            r.take(d.embeddings, SectionKind::MemoryEmbeddings, &[n, e])?;
            if let Some(sr) = d.embedder.scope_routing() {
                check_str(&sr.model_id, "embedder id length")?;
                if !(sr.subject_threshold.is_finite() && sr.relation_threshold.is_finite()) {
                    return Err(invalid("scope thresholds not finite"));
                }
                if sr.subject_counts.len() as u64 != n || sr.subjects.len() as u64 != n {
                    return Err(invalid("scope routing: one subject per record"));
                }
                for s in &sr.subjects {
                    check_str(s, "subject length")?;
                }
                let mut total = 0u64;
                for &c in &sr.subject_counts {
                    if c == 0 || c as u64 > MAX_DIM {
                        return Err(invalid("scope routing: subject row count"));
                    }
                    total += c as u64;
                }
                rows_cap(total)?;
                r.take(sr.relation, SectionKind::MemoryRelation, &[n, e])?;
                r.take(sr.subject_rows, SectionKind::MemorySubjectRows, &[total, e])?;
                if let Some(h) = d.embedder.scope_head() {
                    let (members, hidden) = (h.members as u64, h.hidden as u64);
                    if members == 0
                        || members > MAX_SCOPE_HEAD_MEMBERS as u64
                        || hidden == 0
                        || hidden > MAX_SCOPE_HEAD_HIDDEN as u64
                        || h.out_bias.len() as u64 != members
                    {
                        return Err(invalid("scope head: member or hidden count"));
                    }
                    if !h.out_bias.iter().all(|b| b.is_finite()) {
                        return Err(invalid("scope head: output bias not finite"));
                    }
                    if !h.threshold.is_finite() {
                        return Err(invalid("scope head: threshold not finite"));
                    }
                    r.take(
                        h.weights,
                        SectionKind::ScopeHeadWeights,
                        &[members * hidden, 3 * e + 5],
                    )?;
                }
                if let Some(g) = d.embedder.relation_groups() {
                    check_relation_groups(g, n).map_err(invalid)?;
                    if !super::format::is_relation_margin(d.embedder.relation_margin()) {
                        return Err(invalid("relation groups: margin must be in [0, 2]"));
                    }
                    if !d
                        .embedder
                        .group_vote()
                        .is_none_or(super::format::is_group_weight)
                    {
                        return Err(invalid("relation groups: vote weight must be in [0, 1000]"));
                    }
                    r.take(
                        g.templates,
                        SectionKind::RelationTemplates,
                        &[g.template_group.len() as u64, e],
                    )?;
                }
            }
        }
    }
    Ok(())
}
