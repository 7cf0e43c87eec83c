//! Streaming verification in fixed memory, without an allocator: a bootloader or update agent
//! feeds the bundle in chunks of any size as it arrives and learns, before it keeps a byte of
//! it, whether the bundle is authentic and intact (Uptane's "partial verification" for an ECU).
//!
//! What it checks is what [`super::verify`] checks (header, signature over header + manifest,
//! manifest decode and every manifest rule, section table, zero padding, each section's length
//! and sha256, no NaN/Inf and no value over `MAX_ABS_VALUE` in f32 sections), in the same order
//! except that the manifest rules
//! all run when the signature block has arrived (before any payload byte), and each section's
//! hash when its last byte has. Two things are outside its reach: the buffer alignment
//! (`MisalignedBuffer`: a property of where the caller keeps the bytes, not of the bundle) and
//! the families' content checks that [`super::Bundle::open`] adds (radii ≥ 0, unit-norm keys,
//! GGUF-LoRA structure), which need the payload as a whole.
//!
//! A refusal is the reader's [`BundleError`] for the same fault, or one only a stream has:
//! `EndedEarly` (at `finish`), `PastDeclaredLength`, `ManifestTooLarge`, and `BadTrustedKey` /
//! `TooManyKeys` (at `init`).
//!
//! ## Memory
//!
//! Ed25519 signs the raw message `header ‖ manifest` and hashes `R ‖ A ‖ message`, where `R`
//! is the first half of the signature, which the format stores *after* the manifest. So the
//! message cannot be hashed as it streams past: the header and manifest are buffered, and the
//! verifier accepts manifests up to [`STREAM_MAX_MANIFEST_LEN`] bytes ([`STREAM_SIGNED_CAP`]
//! with the header). Everything else is a fixed set of counters, the trusted keys and one
//! sha256 state; the section table is re-read from the buffered manifest when needed instead
//! of being copied. `size_of::<StreamVerifier>()` is the whole state (no heap);
//! `tests/stream_verify.rs` prints it and the peak stack of a run over a 256 MB bundle.

use core::mem::MaybeUninit;
use core::ptr::addr_of_mut;

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use zerocopy::FromBytes;

use super::error::BundleError;
use super::format::*;
use crate::keys::{secret_seed_index, KeyId, MAX_TRUSTED_KEYS};
use crate::site::Site;

/// Bytes of header + manifest the streaming verifier buffers (the signed message).
pub const STREAM_SIGNED_CAP: usize = 5120;
/// Largest manifest the streaming verifier accepts (a larger one is
/// [`BundleError::ManifestTooLarge`]); `amend inspect` prints a bundle's manifest length.
pub const STREAM_MAX_MANIFEST_LEN: u32 = (STREAM_SIGNED_CAP - HEADER_LEN) as u32;

type R<T> = Result<T, BundleError>;

/// What a completed stream proved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamVerified {
    pub key_id: KeyId,
    pub total_len: u64,
    pub manifest_len: u32,
    pub sections: u32,
}

/// The section being hashed.
#[derive(Clone)]
struct Current {
    index: u32,
    end: u64,
    want: [u8; 32],
    sha: Sha256,
    is_f32: bool,
    /// No NaN or infinity so far, and no value over [`MAX_ABS_VALUE`] (the reader's two checks).
    finite: bool,
    bounded: bool,
    /// Bytes of an f32 split across chunks.
    part: [u8; 4],
    part_len: u8,
}

/// Streaming verifier state: fixed size, no heap (see the module docs for the budget).
#[derive(Clone)]
pub struct StreamVerifier {
    keys: heapless::Vec<(KeyId, [u8; 32]), MAX_TRUSTED_KEYS>,
    /// Header + manifest (the signed message), filled as it arrives.
    signed: [u8; STREAM_SIGNED_CAP],
    sig: [u8; SIG_BLOCK_LEN],
    /// Bytes consumed so far.
    pos: u64,
    // Layout from the header (valid once `pos >= HEADER_LEN`).
    manifest_end: u64,
    sig_offset: u64,
    total: u64,
    key_id: KeyId,
    /// Set once the signature and manifest have been checked.
    sections_at: Option<u32>,
    n_sections: u32,
    /// (offset, index) of the last section started; sections are visited in this order.
    last: Option<(u64, u32)>,
    /// (offset, index) of the next section to start.
    next: Option<(u64, u32)>,
    cur: Option<Current>,
    failed: Option<BundleError>,
}

impl StreamVerifier {
    /// A verifier that accepts bundles signed by any of `public_keys` (raw 32-byte ed25519
    /// keys, at most [`MAX_TRUSTED_KEYS`]). The value is large ([`STREAM_SIGNED_CAP`] + ~1 KiB):
    /// on a small stack use [`StreamVerifier::init`] on memory of your choice instead.
    pub fn new(public_keys: &[[u8; 32]]) -> R<Self> {
        let mut slot = MaybeUninit::uninit();
        Self::init(&mut slot, public_keys)?;
        // SAFETY: `init` returned Ok, so every field is written.
        Ok(unsafe { slot.assume_init() })
    }

    /// A verifier trusting the keys of `trust`.
    pub fn from_trust(trust: &crate::keys::TrustStore) -> Self {
        let mut slot = MaybeUninit::uninit();
        Self::init_from_trust(&mut slot, trust);
        // SAFETY: `init_from_trust` writes every field.
        unsafe { slot.assume_init() }
    }

    /// Initialise a verifier in place (no state-sized temporary on the stack), e.g. in a
    /// static, a `Box::new_uninit()` or memory a C caller provides. On error `slot` is left
    /// uninitialised.
    pub fn init<'s>(slot: &'s mut MaybeUninit<Self>, public_keys: &[[u8; 32]]) -> R<&'s mut Self> {
        let mut keys: heapless::Vec<(KeyId, [u8; 32]), MAX_TRUSTED_KEYS> = heapless::Vec::new();
        for (i, k) in public_keys.iter().enumerate() {
            let vk = VerifyingKey::from_bytes(k).map_err(|_| BundleError::BadTrustedKey(i))?;
            keys.push((crate::keys::key_id(&vk), *k))
                .map_err(|_| BundleError::TooManyKeys)?;
        }
        let p = slot.as_mut_ptr();
        // SAFETY: each field of `*p` is written exactly once through a raw pointer (no reference
        // to uninitialised memory is formed); after this every field holds a valid value.
        unsafe {
            addr_of_mut!((*p).keys).write(keys);
            // All-zero bytes are a valid `[u8; N]`: zero the buffers without a temporary.
            addr_of_mut!((*p).signed).write_bytes(0, 1);
            addr_of_mut!((*p).sig).write_bytes(0, 1);
            addr_of_mut!((*p).pos).write(0);
            addr_of_mut!((*p).manifest_end).write(0);
            addr_of_mut!((*p).sig_offset).write(0);
            addr_of_mut!((*p).total).write(0);
            addr_of_mut!((*p).key_id).write([0; KEY_ID_LEN]);
            addr_of_mut!((*p).sections_at).write(None);
            addr_of_mut!((*p).n_sections).write(0);
            addr_of_mut!((*p).last).write(None);
            addr_of_mut!((*p).next).write(None);
            addr_of_mut!((*p).cur).write(None);
            addr_of_mut!((*p).failed).write(None);
            Ok(&mut *p)
        }
    }

    /// [`StreamVerifier::init`] with the keys of `trust`.
    pub fn init_from_trust<'s>(
        slot: &'s mut MaybeUninit<Self>,
        trust: &crate::keys::TrustStore,
    ) -> &'s mut Self {
        let mut raw: heapless::Vec<[u8; 32], MAX_TRUSTED_KEYS> = heapless::Vec::new();
        for k in trust.keys() {
            // A trust store never holds more than MAX_TRUSTED_KEYS keys.
            let _ = raw.push(*k.as_bytes());
        }
        match Self::init(slot, &raw) {
            Ok(v) => v,
            // Keys from a trust store are valid points and at most MAX_TRUSTED_KEYS.
            Err(_) => unreachable!("trust store keys are valid"),
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Feed the next chunk (any size, including 0). After the first error every later call
    /// returns the same error.
    pub fn update(&mut self, chunk: &[u8]) -> R<()> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let r = self.feed(chunk);
        if let Err(e) = r {
            self.failed = Some(e);
        }
        r
    }

    /// The stream has ended: did the whole declared bundle arrive and check out?
    pub fn finish(&mut self) -> R<StreamVerified> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let needed = if self.pos < HEADER_LEN as u64 {
            HEADER_LEN as u64
        } else {
            self.total
        };
        if self.pos < needed {
            let e = BundleError::EndedEarly {
                needed,
                have: self.pos,
            };
            self.failed = Some(e);
            return Err(e);
        }
        Ok(StreamVerified {
            key_id: self.key_id,
            total_len: self.total,
            manifest_len: (self.manifest_end - HEADER_LEN as u64) as u32,
            sections: self.n_sections,
        })
    }

    fn feed(&mut self, mut data: &[u8]) -> R<()> {
        while !data.is_empty() {
            let pos = self.pos;
            if pos < HEADER_LEN as u64 {
                let n = data.len().min(HEADER_LEN - pos as usize);
                self.signed[pos as usize..pos as usize + n].copy_from_slice(&data[..n]);
                self.pos += n as u64;
                data = &data[n..];
                if self.pos == HEADER_LEN as u64 {
                    self.on_header()?;
                }
                continue;
            }
            if data.len() as u64 > self.total - pos {
                return Err(BundleError::PastDeclaredLength {
                    declared: self.total,
                });
            }
            let sig_end = self.sig_offset + SIG_BLOCK_LEN as u64;
            if pos < self.manifest_end {
                let n = data.len().min((self.manifest_end - pos) as usize);
                self.signed[pos as usize..pos as usize + n].copy_from_slice(&data[..n]);
                self.pos += n as u64;
                data = &data[n..];
            } else if pos < self.sig_offset {
                let n = data.len().min((self.sig_offset - pos) as usize);
                zero(&data[..n], pos)?;
                self.pos += n as u64;
                data = &data[n..];
            } else if pos < sig_end {
                let at = (pos - self.sig_offset) as usize;
                let n = data.len().min(SIG_BLOCK_LEN - at);
                self.sig[at..at + n].copy_from_slice(&data[..n]);
                self.pos += n as u64;
                data = &data[n..];
                if self.pos == sig_end {
                    self.on_signature()?;
                }
            } else {
                let n = self.payload(data)?;
                data = &data[n..];
            }
        }
        Ok(())
    }

    /// The header's rules, as [`super::read_header`] checks them (less the buffer length,
    /// which a stream only knows at the end).
    fn on_header(&mut self) -> R<()> {
        let h = match Header::read_from_bytes(&self.signed[..HEADER_LEN]) {
            Ok(h) => h,
            Err(_) => return Err(BundleError::BadHeader("header")),
        };
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
        let m_len = h.manifest_len.get();
        if m_len > MAX_MANIFEST_LEN {
            return Err(BundleError::CapExceeded {
                what: "manifest length",
                value: m_len as u64,
                cap: MAX_MANIFEST_LEN as u64,
            });
        }
        let manifest_end = HEADER_LEN as u64 + m_len as u64;
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
        if m_len > STREAM_MAX_MANIFEST_LEN {
            return Err(BundleError::ManifestTooLarge {
                len: m_len,
                cap: STREAM_MAX_MANIFEST_LEN,
            });
        }
        self.manifest_end = manifest_end;
        self.sig_offset = sig_offset;
        self.total = total;
        Ok(())
    }

    /// Signature, then every manifest rule; then the payload area may stream.
    fn on_signature(&mut self) -> R<()> {
        let block = &self.sig;
        if block.iter().all(|&b| b == 0) {
            return Err(BundleError::Unsigned);
        }
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&block[..KEY_ID_LEN]);
        let Some(raw) = self
            .keys
            .iter()
            .find(|(id, _)| *id == key_id)
            .map(|(_, k)| *k)
        else {
            let raw = self.keys.iter().map(|(_, k)| *k);
            return Err(match secret_seed_index(&key_id, raw) {
                Some(index) => BundleError::SecretKeyTrusted { index },
                None => BundleError::UnknownKeyId(key_id),
            });
        };
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| BundleError::BadSignature)?;
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&block[KEY_ID_LEN..]);
        let msg = &self.signed[..self.manifest_end as usize];
        key.verify_strict(msg, &Signature::from_bytes(&sig))
            .map_err(|_| BundleError::BadSignature)?;
        self.key_id = key_id;

        let m = Manifest::index(&self.signed[HEADER_LEN..self.manifest_end as usize])?;
        let minor = Header::read_from_bytes(&self.signed[..HEADER_LEN])
            .map_err(|_| BundleError::BadHeader("header"))?
            .minor
            .get();
        if m.verification.is_some() && minor < MINOR_VERIFICATION {
            return Err(BundleError::BadHeader(
                "minor: a verification record needs format 1.2",
            ));
        }
        let payload_offset = align_up(self.sig_offset + SIG_BLOCK_LEN as u64, SECTION_ALIGN)
            .ok_or(BundleError::BadHeader("payload_offset"))?;
        m.check(payload_offset, self.total, minor)?;
        self.sections_at = Some(m.sections.0 as u32);
        self.n_sections = m.sections.1 as u32;
        self.next = self.find_next();
        self.start_sections()
    }

    fn manifest(&self) -> &[u8] {
        &self.signed[HEADER_LEN..self.manifest_end as usize]
    }

    /// The section after `last` in (offset, index) order.
    fn find_next(&self) -> Option<(u64, u32)> {
        let at = self.sections_at? as usize;
        let mut c = Cur::at(self.manifest(), at);
        let mut best: Option<(u64, u32)> = None;
        for i in 0..self.n_sections {
            let s = c.section().ok()?;
            let key = (s.offset, i);
            if self.last.is_none_or(|l| key > l) && best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best
    }

    /// Start every section that begins at the current position (finishing empty ones).
    fn start_sections(&mut self) -> R<()> {
        while self.cur.is_none() {
            let Some((offset, index)) = self.next else {
                return Ok(());
            };
            if offset != self.pos {
                return Ok(());
            }
            let at = self.sections_at.unwrap_or(0) as usize;
            let s = Cur::at(self.manifest(), at)
                .nth_section(index)
                .map_err(BundleError::ManifestDecode)?;
            self.cur = Some(Current {
                index,
                end: s.offset + s.len,
                want: s.sha256,
                sha: Sha256::new(),
                is_f32: s.dtype == Dtype::F32 as u8,
                finite: true,
                bounded: true,
                part: [0; 4],
                part_len: 0,
            });
            self.last = Some((offset, index));
            self.next = self.find_next();
            if s.len == 0 {
                self.end_section()?;
            }
        }
        Ok(())
    }

    fn end_section(&mut self) -> R<()> {
        if let Some(c) = self.cur.take() {
            let index = c.index as usize;
            if c.sha.finalize().as_slice() != c.want {
                return Err(BundleError::SectionHash { index });
            }
            if !c.finite {
                return Err(BundleError::NonFinite { index });
            }
            if !c.bounded {
                return Err(BundleError::ValueOutOfRange { index });
            }
        }
        Ok(())
    }

    /// Bytes after the signature block: padding (must be zero) and sections. Returns how many
    /// bytes of `data` it consumed.
    fn payload(&mut self, data: &[u8]) -> R<usize> {
        let pos = self.pos;
        let n = if let Some(c) = &mut self.cur {
            let n = data.len().min((c.end - pos) as usize);
            c.feed(&data[..n]);
            self.pos += n as u64;
            if self.pos == c.end {
                self.end_section()?;
            }
            n
        } else {
            let gap_end = self.next.map_or(self.total, |(o, _)| o);
            let n = data.len().min((gap_end - pos) as usize);
            zero(&data[..n], pos)?;
            self.pos += n as u64;
            n
        };
        self.start_sections()?;
        Ok(n)
    }
}

impl Current {
    /// Whole f32s: the bound is checked in one pass; which fault it is, only when it fails.
    fn check(&mut self, values: &[u8]) {
        if !within_bound(values) {
            self.bounded = false;
            self.finite &= all_finite(values);
        }
    }

    fn feed(&mut self, mut d: &[u8]) {
        self.sha.update(d);
        if !self.is_f32 {
            return;
        }
        // Sections start 64-aligned, so f32 boundaries are where 4 bytes of the section end.
        while self.part_len != 0 && !d.is_empty() {
            self.part[self.part_len as usize] = d[0];
            self.part_len += 1;
            d = &d[1..];
            if self.part_len == 4 {
                let value = self.part;
                self.check(&value);
                self.part_len = 0;
            }
        }
        if d.is_empty() {
            return; // still inside a split f32 (or exactly done with it)
        }
        let whole = d.len() / 4 * 4;
        self.check(&d[..whole]);
        let tail = &d[whole..];
        self.part[..tail.len()].copy_from_slice(tail);
        self.part_len = tail.len() as u8;
    }
}

fn zero(d: &[u8], pos: u64) -> R<()> {
    match d.iter().position(|&b| b != 0) {
        Some(k) => Err(BundleError::NonZeroPadding {
            offset: pos + k as u64,
        }),
        None => Ok(()),
    }
}

// ---- the manifest, read in place from its postcard bytes (no allocation) ----

type D<T> = Result<T, &'static str>;

/// A postcard reader over a byte slice, accepting exactly what `postcard::take_from_bytes`
/// accepts for the manifest's types (varints with postcard's limits, bools 0/1, UTF-8 strings).
#[derive(Clone)]
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

/// One section table entry (shape: its first 4 dimensions; `rank` and `elems` cover all).
#[derive(Clone, Copy)]
struct Sec {
    kind: u16,
    dtype: u8,
    rank: u64,
    shape: [u64; MAX_SHAPE_RANK],
    /// Product of all dimensions (`None` on overflow).
    elems: Option<u64>,
    offset: u64,
    len: u64,
    sha256: [u8; 32],
}

impl Sec {
    fn shape(&self) -> &[u64] {
        &self.shape[..(self.rank as usize).min(MAX_SHAPE_RANK)]
    }
    fn rows(&self) -> u64 {
        if self.rank == 0 {
            0
        } else {
            self.shape[0]
        }
    }
}

struct Edit<'a> {
    id: &'a str,
    layer: u32,
    site: u8,
    prompt: &'a str,
    target: &'a str,
    payload: u32,
    first: u32,
    count: u32,
}

impl<'a> Cur<'a> {
    fn at(b: &'a [u8], at: usize) -> Self {
        Cur { b, at }
    }
    fn done(&self) -> bool {
        self.at >= self.b.len()
    }
    fn byte(&mut self) -> D<u8> {
        let v = *self.b.get(self.at).ok_or("unexpected end")?;
        self.at += 1;
        Ok(v)
    }
    fn take(&mut self, n: u64) -> D<&'a [u8]> {
        let rest = (self.b.len() - self.at) as u64;
        if n > rest {
            return Err("unexpected end");
        }
        let s = &self.b[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }
    /// postcard's unsigned varint for a `bits`-wide integer.
    fn varint(&mut self, bits: u32) -> D<u64> {
        let max = bits.div_ceil(7);
        let last_max = (1u8 << (bits % 7)) - 1;
        let mut out = 0u64;
        for i in 0..max {
            let v = self.byte()?;
            out |= ((v & 0x7f) as u64).wrapping_shl(7 * i);
            if v & 0x80 == 0 {
                if i == max - 1 && v > last_max {
                    return Err("bad varint");
                }
                return Ok(out);
            }
        }
        Err("bad varint")
    }
    fn u16(&mut self) -> D<u16> {
        Ok(self.varint(16)? as u16)
    }
    fn u32(&mut self) -> D<u32> {
        Ok(self.varint(32)? as u32)
    }
    fn u64(&mut self) -> D<u64> {
        self.varint(64)
    }
    /// A sequence or string length (postcard: a `usize` varint).
    fn len(&mut self) -> D<u64> {
        self.varint(usize::BITS)
    }
    fn bool(&mut self) -> D<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("bad bool"),
        }
    }
    fn f32(&mut self) -> D<f32> {
        let b = self.take(4)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn str(&mut self) -> D<&'a str> {
        let n = self.len()?;
        core::str::from_utf8(self.take(n)?).map_err(|_| "bad utf-8")
    }
    fn bytes(&mut self) -> D<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn section(&mut self) -> D<Sec> {
        let kind = self.u16()?;
        let dtype = self.byte()?;
        let rank = self.len()?;
        let mut shape = [0u64; MAX_SHAPE_RANK];
        let mut elems = Some(1u64);
        for i in 0..rank {
            let d = self.u64()?;
            if (i as usize) < MAX_SHAPE_RANK {
                shape[i as usize] = d;
            }
            elems = elems.and_then(|e| e.checked_mul(d));
        }
        let offset = self.u64()?;
        let len = self.u64()?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(self.take(32)?);
        Ok(Sec {
            kind,
            dtype,
            rank,
            shape,
            elems,
            offset,
            len,
            sha256,
        })
    }
    fn nth_section(&mut self, n: u32) -> D<Sec> {
        for _ in 0..n {
            self.section()?;
        }
        self.section()
    }
    fn payload(&mut self) -> D<(u16, &'a [u8])> {
        Ok((self.u16()?, self.bytes()?))
    }
    fn edit(&mut self) -> D<Edit<'a>> {
        Ok(Edit {
            id: self.str()?,
            layer: self.u32()?,
            site: self.byte()?,
            prompt: self.str()?,
            target: self.str()?,
            payload: self.u32()?,
            first: self.u32()?,
            count: self.u32()?,
        })
    }
}

/// Where the parts of a decoded manifest are (sequences: position of the first element and
/// the count).
struct Manifest<'a> {
    b: &'a [u8],
    bundle_id: &'a str,
    channel: &'a str,
    not_before: u64,
    expires: u64,
    arch: &'a str,
    n_layer: u32,
    n_embd: u32,
    sections: (usize, u64),
    payloads: (usize, u64),
    edits: (usize, u64),
    /// v1.2 verification record: where its backend list starts, its length.
    verification: Option<(usize, u64)>,
}

/// A v1.1 memory's scope-model routing data (`EmbedderDesc::ScopeModel`), left in place.
#[derive(Clone)]
struct ScopeDesc<'a> {
    relation: u32,
    subject_rows: u32,
    counts: Cur<'a>,
    n_counts: u64,
    subjects: Cur<'a>,
    n_subjects: u64,
    subject_threshold: f32,
    relation_threshold: f32,
    /// v1.3: a trained scope head: members, hidden, weights section, output biases, threshold.
    head: Option<(u32, u32, u32, Cur<'a>, u64, f32)>,
    /// v1.4: relation groups, left in place.
    groups: Option<GroupsDesc<'a>>,
}

/// v1.4 relation groups (`RelationGroupsDesc`), left in place.
#[derive(Clone)]
struct GroupsDesc<'a> {
    templates: u32,
    template_group: Cur<'a>,
    n_templates: u64,
    names: Cur<'a>,
    n_names: u64,
    record_group: Cur<'a>,
    n_records: u64,
    min_score: f32,
    /// v1.5 (tags 5 and 6); 0 before.
    margin: f32,
    /// v1.6 (tag 6): the weight of the groups' vote with the head.
    vote: Option<f32>,
}

/// A payload descriptor, decoded in place.
// One lives at a time, on the stack; boxing the memory variant would need an allocator, which
// this verifier does without.
#[allow(clippy::large_enum_variant)]
enum Desc<'a> {
    Codebook {
        layer: u32,
        key_site: u8,
        replace_site: u8,
        distance: u8,
        keys: u32,
        values: u32,
        radii: u32,
    },
    Neurons {
        layer: u32,
        read_site: u8,
        write_site: u8,
        activation: u8,
        keys: u32,
        biases: u32,
        values: u32,
    },
    LowRank {
        tensors: Cur<'a>,
        n: u64,
    },
    Gguf {
        blob: u32,
    },
    Memory {
        embed_dim: u32,
        threshold: f32,
        template: &'a str,
        /// `Ok((layer, site, pooling))` for `BaseModel`, `Err(model_id)` for `External` and
        /// `ScopeModel` (whose routing data is then in `scope`).
        embedder: Result<(u32, u8, u8), &'a str>,
        scope: Option<ScopeDesc<'a>>,
        embeddings: u32,
        records: Cur<'a>,
        n: u64,
    },
}

fn decode_desc(kind: PayloadKind, body: &[u8]) -> D<Desc<'_>> {
    let mut c = Cur::at(body, 0);
    let d = match kind {
        PayloadKind::Codebook => Desc::Codebook {
            layer: c.u32()?,
            key_site: c.byte()?,
            replace_site: c.byte()?,
            distance: c.byte()?,
            keys: {
                c.bool()?; // all_positions: only its encoding matters here
                c.u32()?
            },
            values: c.u32()?,
            radii: c.u32()?,
        },
        PayloadKind::PatchNeurons => Desc::Neurons {
            layer: c.u32()?,
            read_site: c.byte()?,
            write_site: c.byte()?,
            activation: c.byte()?,
            keys: c.u32()?,
            biases: c.u32()?,
            values: c.u32()?,
        },
        PayloadKind::LowRank => {
            let n = c.len()?;
            let tensors = c.clone();
            for _ in 0..n {
                lowrank_tensor(&mut c)?;
            }
            Desc::LowRank { tensors, n }
        }
        PayloadKind::LowRankGguf => Desc::Gguf { blob: c.u32()? },
        PayloadKind::Memory => {
            let embed_dim = c.u32()?;
            let threshold = c.f32()?;
            let template = c.str()?;
            let mut scope = None;
            let embedder = match c.varint(32)? {
                0 => Ok((c.u32()?, c.byte()?, c.byte()?)),
                1 => Err(c.str()?),
                tag @ (2..=6) => {
                    let model_id = c.str()?;
                    c.take(32)?; // the scope model's fingerprint
                    let relation = c.u32()?;
                    let subject_rows = c.u32()?;
                    let n_counts = c.len()?;
                    let counts = c.clone();
                    for _ in 0..n_counts {
                        c.u32()?;
                    }
                    let n_subjects = c.len()?;
                    let subjects = c.clone();
                    for _ in 0..n_subjects {
                        c.str()?;
                    }
                    scope = Some(ScopeDesc {
                        relation,
                        subject_rows,
                        counts,
                        n_counts,
                        subjects,
                        n_subjects,
                        subject_threshold: c.f32()?,
                        relation_threshold: c.f32()?,
                        head: None,
                        groups: None,
                    });
                    // v1.4 (tags 4 and 5): the head is optional; v1.6 (tag 6) has one.
                    let has_head = tag == 3 || tag == 6 || (tag >= 4 && c.bool()?);
                    if has_head {
                        let (members, hidden, weights) = (c.u32()?, c.u32()?, c.u32()?);
                        let n_bias = c.len()?;
                        let bias = c.clone();
                        for _ in 0..n_bias {
                            c.f32()?;
                        }
                        let t = c.f32()?;
                        if let Some(sd) = scope.as_mut() {
                            sd.head = Some((members, hidden, weights, bias, n_bias, t));
                        }
                    }
                    if tag >= 4 {
                        let templates = c.u32()?;
                        let n_templates = c.len()?;
                        let template_group = c.clone();
                        for _ in 0..n_templates {
                            c.u16()?;
                        }
                        let n_names = c.len()?;
                        let names = c.clone();
                        for _ in 0..n_names {
                            c.str()?;
                        }
                        let n_records = c.len()?;
                        let record_group = c.clone();
                        for _ in 0..n_records {
                            c.u16()?;
                        }
                        let min_score = c.f32()?;
                        let margin = if tag >= 5 { c.f32()? } else { 0.0 };
                        let vote = if tag == 6 { Some(c.f32()?) } else { None };
                        if let Some(sd) = scope.as_mut() {
                            sd.groups = Some(GroupsDesc {
                                templates,
                                template_group,
                                n_templates,
                                names,
                                n_names,
                                record_group,
                                n_records,
                                min_score,
                                margin,
                                vote,
                            });
                        }
                    }
                    Err(model_id)
                }
                _ => return Err("bad enum"),
            };
            let embeddings = c.u32()?;
            let n = c.len()?;
            let records = c.clone();
            for _ in 0..n {
                for _ in 0..4 {
                    c.str()?;
                }
            }
            Desc::Memory {
                embed_dim,
                threshold,
                template,
                embedder,
                scope,
                embeddings,
                records,
                n,
            }
        }
    };
    if !c.done() {
        return Err("trailing bytes");
    }
    Ok(d)
}

struct TensorDesc<'a> {
    name: &'a str,
    n_in: u32,
    n_out: u32,
    rank: u32,
    alpha: f32,
    a: u32,
    b: u32,
}

fn lowrank_tensor<'a>(c: &mut Cur<'a>) -> D<TensorDesc<'a>> {
    Ok(TensorDesc {
        name: c.str()?,
        n_in: c.u32()?,
        n_out: c.u32()?,
        rank: c.u32()?,
        alpha: c.f32()?,
        a: c.u32()?,
        b: c.u32()?,
    })
}

fn cap(what: &'static str, value: u64, cap: u64) -> R<()> {
    if value > cap {
        return Err(BundleError::CapExceeded { what, value, cap });
    }
    Ok(())
}

fn check_str(s: &str, what: &'static str) -> R<()> {
    cap(what, s.len() as u64, MAX_STRING_LEN as u64)
}

/// Whether `s` holds a control character (U+0000..U+001F, U+007F, U+0080..U+009F), a line or
/// paragraph separator (U+2028, U+2029), or an [`invisible`] character. Ids and the channel are
/// printed by tools, logged and shown by host apps: a newline or an escape sequence in them could
/// forge lines of output (a "verified" signer line) or hide others, and a bidi override or a
/// zero-width mark makes one id display as another (rollback by id then misses).
pub fn has_control(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') || invisible(c))
}

/// Format characters a display draws as nothing but that reorder or hide the text around them:
/// bidi marks, overrides and isolates, zero-width marks and joiners, the word joiner and
/// invisible operators, the BOM, interlinear annotation marks, and tag characters (which can
/// smuggle hidden text). Tools escape them when printing bundle text; ids may not hold them.
pub fn invisible(c: char) -> bool {
    matches!(c,
        '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}' | '\u{e0000}'..='\u{e007f}')
}

/// The `BadEdit` reason for an edit id with a control character (reader and stream alike).
pub const CONTROL_IN_EDIT_ID: &str = "control character in id";
/// The `InvalidPayload` reason for a memory record's edit id with a control character.
pub const CONTROL_IN_RECORD_ID: &str = "control character in record id";
/// The `BadManifest` reason for `not_before >= expires` (reader, this verifier and the builder):
/// activation needs `not_before <= now < expires`, so such a bundle could never apply.
pub const EMPTY_VALIDITY: &str =
    "empty validity window: not_before must be before expires (expires u64::MAX = never)";

/// The bundle id and channel hold no control characters (same rule and error in the reader,
/// this verifier and the builder).
pub fn check_ids(bundle_id: &str, channel: &str) -> R<()> {
    if has_control(bundle_id) {
        return Err(BundleError::BadManifest("control character in bundle id"));
    }
    if has_control(channel) {
        return Err(BundleError::BadManifest("control character in channel"));
    }
    Ok(())
}

fn site(payload: usize, code: u8) -> R<()> {
    match Site::from_code(code) {
        Some(_) => Ok(()),
        None => Err(BundleError::UnknownSite { payload, code }),
    }
}

/// Each section referenced exactly once (bit per section; `MAX_SECTIONS` bits).
struct Refs<'m, 'a> {
    m: &'m Manifest<'a>,
    used: [u64; MAX_SECTIONS / 64],
    payload: usize,
    /// A memory carries a scope head (format 1.3 content; checked against the minor last, as
    /// the in-memory reader does).
    scope_head: bool,
    /// A memory carries relation groups (format 1.4 content; likewise).
    relation_groups: bool,
    /// A memory carries a relation-group margin (format 1.5 content).
    relation_margin: bool,
    /// A memory's relation groups vote with its head (format 1.6 content).
    group_vote: bool,
}

impl Refs<'_, '_> {
    fn take(&mut self, idx: u32, kind: SectionKind, shape: &[u64]) -> R<()> {
        let err = |reason| BundleError::BadSectionRef {
            payload: self.payload,
            section: idx,
            reason,
        };
        let s = self.m.section(idx).ok_or(err("no such section"))?;
        if s.kind != kind as u16 {
            return Err(err("wrong section kind"));
        }
        if !shape.is_empty() && s.shape() != shape {
            return Err(err("wrong shape"));
        }
        let (w, bit) = (idx as usize / 64, 1u64 << (idx % 64));
        if self.used[w] & bit != 0 {
            return Err(err("section used twice"));
        }
        self.used[w] |= bit;
        Ok(())
    }
    fn rows(&self, idx: u32) -> u64 {
        self.m.section(idx).map_or(0, |s| s.rows())
    }
}

impl<'a> Manifest<'a> {
    /// Decode (as postcard would, refusing trailing bytes) and note where each part is.
    fn index(b: &'a [u8]) -> R<Self> {
        Self::index_inner(b).map_err(|e| match e {
            Ok(n) => BundleError::ManifestTrailingBytes(n),
            Err(m) => BundleError::ManifestDecode(m),
        })
    }

    fn index_inner(b: &'a [u8]) -> Result<Self, Result<usize, &'static str>> {
        let mut c = Cur::at(b, 0);
        let bundle_id = c.str().map_err(Err)?;
        let channel = c.str().map_err(Err)?;
        let mut scalars = [0u64; 4];
        for s in &mut scalars {
            *s = c.u64().map_err(Err)?;
        }
        c.take(32).map_err(Err)?; // model fingerprint: bound by activation, not here
        let arch = c.str().map_err(Err)?;
        let n_layer = c.u32().map_err(Err)?;
        let n_embd = c.u32().map_err(Err)?;
        let seq = |c: &mut Cur<'a>, f: fn(&mut Cur<'a>) -> D<()>| -> D<(usize, u64)> {
            let n = c.len()?;
            let at = c.at;
            for _ in 0..n {
                f(c)?;
            }
            Ok((at, n))
        };
        let sections = seq(&mut c, |c| c.section().map(drop)).map_err(Err)?;
        let payloads = seq(&mut c, |c| c.payload().map(drop)).map_err(Err)?;
        let edits = seq(&mut c, |c| c.edit().map(drop)).map_err(Err)?;
        // v1.2: the verification record (backends, then `required`).
        let mut verification = None;
        if !c.done() {
            let backends = seq(&mut c, |c| {
                c.str()?;
                c.u32()?;
                c.u32().map(drop)
            })
            .map_err(Err)?;
            c.bool().map_err(Err)?;
            verification = Some(backends);
        }
        if !c.done() {
            return Err(Ok(b.len() - c.at));
        }
        Ok(Manifest {
            b,
            bundle_id,
            channel,
            not_before: scalars[2],
            expires: scalars[3],
            arch,
            n_layer,
            n_embd,
            sections,
            payloads,
            edits,
            verification,
        })
    }

    fn section(&self, i: u32) -> Option<Sec> {
        if i as u64 >= self.sections.1 {
            return None;
        }
        Cur::at(self.b, self.sections.0).nth_section(i).ok()
    }

    fn each_section(&self, mut f: impl FnMut(usize, Sec) -> R<()>) -> R<()> {
        let mut c = Cur::at(self.b, self.sections.0);
        for i in 0..self.sections.1 as usize {
            f(i, c.section().map_err(BundleError::ManifestDecode)?)?;
        }
        Ok(())
    }

    fn payload(&self, i: u64) -> Option<(u16, &'a [u8])> {
        let mut c = Cur::at(self.b, self.payloads.0);
        for _ in 0..i {
            c.payload().ok()?;
        }
        c.payload().ok()
    }

    fn edits(&self) -> impl Iterator<Item = Edit<'a>> + 'a {
        let mut c = Cur::at(self.b, self.edits.0);
        (0..self.edits.1).map_while(move |_| c.edit().ok())
    }

    /// Units of payload `i` (its descriptor already checked).
    fn units(&self, i: u64) -> u64 {
        let Some((kind, body)) = self.payload(i) else {
            return 0;
        };
        let Some(kind) = PayloadKind::from_code(kind) else {
            return 0;
        };
        match decode_desc(kind, body) {
            Ok(Desc::Codebook { keys, .. }) | Ok(Desc::Neurons { keys, .. }) => {
                self.section(keys).map_or(0, |s| s.rows())
            }
            Ok(Desc::LowRank { n, .. }) | Ok(Desc::Memory { n, .. }) => n,
            Ok(Desc::Gguf { .. }) => 1,
            Err(_) => 0,
        }
    }

    /// Every rule of `reader::check_manifest`, in its order, with the section bounds and
    /// overlap checks (`payload_offset`, `total`) where it checks them.
    fn check(&self, payload_offset: u64, total: u64, minor: u16) -> R<()> {
        check_str(self.bundle_id, "bundle id length")?;
        check_str(self.channel, "channel length")?;
        check_str(self.arch, "architecture length")?;
        if self.bundle_id.is_empty() {
            return Err(BundleError::BadManifest("empty bundle id"));
        }
        check_ids(self.bundle_id, self.channel)?;
        if self.not_before >= self.expires {
            return Err(BundleError::BadManifest(EMPTY_VALIDITY));
        }
        cap("section count", self.sections.1, MAX_SECTIONS as u64)?;
        cap("payload count", self.payloads.1, MAX_PAYLOADS as u64)?;
        cap("edit count", self.edits.1, MAX_EDITS as u64)?;
        if let Some((at, n)) = self.verification {
            cap("verified backends", n, MAX_VERIFIED_BACKENDS as u64)?;
            let entry = |c: &mut Cur<'a>| -> R<(&'a str, u32, u32)> {
                let d = |e| BundleError::ManifestDecode(e);
                Ok((
                    c.str().map_err(d)?,
                    c.u32().map_err(d)?,
                    c.u32().map_err(d)?,
                ))
            };
            let mut c = Cur::at(self.b, at);
            for i in 0..n {
                let (name, passed, total) = entry(&mut c)?;
                cap(
                    "backend name length",
                    name.len() as u64,
                    MAX_BACKEND_NAME_LEN as u64,
                )?;
                if name.is_empty() {
                    return Err(BundleError::BadManifest("verification: empty backend name"));
                }
                if total as u64 != self.edits.1 || passed > total {
                    return Err(BundleError::BadManifest(
                        "verification: counts do not match the edits",
                    ));
                }
                let mut o = Cur::at(self.b, at);
                for _ in 0..i {
                    if entry(&mut o)?.0 == name {
                        return Err(BundleError::BadManifest(
                            "verification: backend listed twice",
                        ));
                    }
                }
            }
        }
        if self.n_embd as u64 > MAX_DIM || self.n_embd == 0 {
            return Err(BundleError::BadManifest("model n_embd"));
        }
        if self.n_layer > MAX_LAYER {
            return Err(BundleError::BadManifest("model n_layer"));
        }

        // Section table.
        self.each_section(|i, s| {
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
            if dtype != want || s.rank == 0 || s.rank > MAX_SHAPE_RANK as u64 {
                return Err(BundleError::SectionShape { index: i });
            }
            if s.elems.and_then(|e| e.checked_mul(dtype.size())) != Some(s.len) {
                return Err(BundleError::SectionShape { index: i });
            }
            if s.offset % SECTION_ALIGN != 0 {
                return Err(BundleError::SectionMisaligned { index: i });
            }
            Ok(())
        })?;
        // Bounds and overlap (the bytes themselves are checked as they stream).
        self.each_section(|i, s| {
            let end = s.offset.checked_add(s.len);
            if s.offset < payload_offset || end.is_none_or(|e| e > total) {
                return Err(BundleError::SectionOutOfBounds { index: i });
            }
            Ok(())
        })?;
        self.each_section(|i, a| {
            self.each_section(|j, b| {
                // a before b in (offset, index) order and a runs into b.
                if (a.offset, i) < (b.offset, j) && a.offset + a.len > b.offset {
                    return Err(BundleError::SectionOverlap { a: i, b: j });
                }
                Ok(())
            })
        })?;

        // Payload descriptors.
        let n_embd = self.n_embd as u64;
        let mut refs = Refs {
            m: self,
            used: [0; MAX_SECTIONS / 64],
            payload: 0,
            scope_head: false,
            relation_groups: false,
            relation_margin: false,
            group_vote: false,
        };
        let mut c = Cur::at(self.b, self.payloads.0);
        for pi in 0..self.payloads.1 as usize {
            let (kind, body) = c.payload().map_err(BundleError::ManifestDecode)?;
            let kind = PayloadKind::from_code(kind)
                .ok_or(BundleError::UnknownPayloadKind { index: pi, kind })?;
            let desc =
                decode_desc(kind, body).map_err(|_| BundleError::DescriptorDecode { index: pi })?;
            refs.payload = pi;
            check_payload(&desc, pi, n_embd, self.n_layer, &mut refs)?;
        }
        for i in 0..self.sections.1 as usize {
            if refs.used[i / 64] & (1 << (i % 64)) == 0 {
                return Err(BundleError::UnreferencedSection { index: i });
            }
        }

        // Edits.
        for (i, e) in self.edits().enumerate() {
            check_str(e.id, "edit id length")?;
            check_str(e.prompt, "prompt length")?;
            check_str(e.target, "target length")?;
            let bad = |reason| BundleError::BadEdit { index: i, reason };
            if e.id.is_empty() {
                return Err(bad("empty id"));
            }
            if has_control(e.id) {
                return Err(bad(CONTROL_IN_EDIT_ID));
            }
            if Site::from_code(e.site).is_none() {
                return Err(bad("unknown site"));
            }
            if e.layer >= self.n_layer.max(1) {
                return Err(bad("layer out of range"));
            }
            if e.payload as u64 >= self.payloads.1 {
                return Err(bad("no such payload"));
            }
            let end = e.first as u64 + e.count as u64;
            if e.count == 0 || end > self.units(e.payload as u64) {
                return Err(bad("units out of range"));
            }
        }
        for (j, b) in self.edits().enumerate() {
            if self.edits().take(j).any(|a| a.id == b.id) {
                return Err(BundleError::DuplicateEditId { index: j });
            }
        }
        for (j, b) in self.edits().enumerate() {
            let (b0, b1) = (b.first as u64, b.first as u64 + b.count as u64);
            let clash = self.edits().take(j).any(|a| {
                let (a0, a1) = (a.first as u64, a.first as u64 + a.count as u64);
                a.payload == b.payload && a0 < b1 && b0 < a1
            });
            if clash {
                return Err(BundleError::BadEdit {
                    index: j,
                    reason: "two edits claim the same units",
                });
            }
        }
        if refs.scope_head && minor < MINOR_SCOPE_HEAD {
            return Err(BundleError::BadHeader(
                "minor: a scope head needs format 1.3",
            ));
        }
        if refs.relation_groups && minor < MINOR_RELATION_GROUPS {
            return Err(BundleError::BadHeader(
                "minor: relation groups need format 1.4",
            ));
        }
        if refs.relation_margin && minor < MINOR_RELATION_MARGIN {
            return Err(BundleError::BadHeader(
                "minor: a relation-group margin needs format 1.5",
            ));
        }
        if refs.group_vote && minor < MINOR_GROUP_VOTE {
            return Err(BundleError::BadHeader(
                "minor: relation groups voting with the head need format 1.6",
            ));
        }
        Ok(())
    }
}

fn check_payload(p: &Desc, pi: usize, n_embd: u64, n_layer: u32, r: &mut Refs) -> R<()> {
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
    let code = |what, code, max| {
        if code > max {
            Err(BundleError::UnknownCode {
                payload: pi,
                what,
                code,
            })
        } else {
            Ok(())
        }
    };
    match p {
        Desc::Codebook {
            layer,
            key_site,
            replace_site,
            distance,
            keys,
            values,
            radii,
        } => {
            layer_ok(*layer)?;
            site(pi, *key_site)?;
            site(pi, *replace_site)?;
            code("distance", *distance, 2)?;
            let n = r.rows(*keys);
            rows_cap(n)?;
            r.take(*keys, SectionKind::CodebookKeys, &[n, n_embd])?;
            r.take(*values, SectionKind::CodebookValues, &[n, n_embd])?;
            r.take(*radii, SectionKind::CodebookRadii, &[n])?;
        }
        Desc::Neurons {
            layer,
            read_site,
            write_site,
            activation,
            keys,
            biases,
            values,
        } => {
            layer_ok(*layer)?;
            site(pi, *read_site)?;
            site(pi, *write_site)?;
            code("activation", *activation, 1)?;
            let n = r.rows(*keys);
            rows_cap(n)?;
            r.take(*keys, SectionKind::NeuronKeys, &[n, n_embd])?;
            r.take(*biases, SectionKind::NeuronBiases, &[n])?;
            r.take(*values, SectionKind::NeuronValues, &[n, n_embd])?;
        }
        Desc::LowRank { tensors, n } => {
            cap("low-rank tensors", *n, MAX_LOWRANK_TENSORS as u64)?;
            if *n == 0 {
                return Err(invalid("no tensors"));
            }
            let mut c = tensors.clone();
            for _ in 0..*n {
                let t = lowrank_tensor(&mut c)
                    .map_err(|_| BundleError::DescriptorDecode { index: pi })?;
                check_str(t.name, "tensor name length")?;
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
        Desc::Gguf { blob } => {
            r.take(*blob, SectionKind::GgufLora, &[])?;
        }
        Desc::Memory {
            embed_dim,
            threshold,
            template,
            embedder,
            scope,
            embeddings,
            records,
            n,
        } => {
            let e = *embed_dim as u64;
            if e == 0 || e > MAX_DIM {
                return Err(invalid("embed_dim"));
            }
            if !threshold.is_finite() {
                return Err(invalid("threshold not finite"));
            }
            check_str(template, "template length")?;
            match embedder {
                Err(model_id) => check_str(model_id, "embedder id length")?,
                Ok((layer, s, pooling)) => {
                    layer_ok(*layer)?;
                    site(pi, *s)?;
                    code("pooling", *pooling, 1)?;
                }
            }
            rows_cap(*n)?;
            let mut c = records.clone();
            for _ in 0..*n {
                let what = [
                    "record id length",
                    "record prompt length",
                    "record target length",
                    "record text length",
                ];
                for (k, w) in what.into_iter().enumerate() {
                    let s = c
                        .str()
                        .map_err(|_| BundleError::DescriptorDecode { index: pi })?;
                    check_str(s, w)?;
                    if k == 0 && has_control(s) {
                        return Err(invalid(CONTROL_IN_RECORD_ID));
                    }
                }
            }
            r.take(*embeddings, SectionKind::MemoryEmbeddings, &[*n, e])?;
            // The same checks as the in-memory reader's, in its order.
            if let Some(sd) = scope {
                if !(sd.subject_threshold.is_finite() && sd.relation_threshold.is_finite()) {
                    return Err(invalid("scope thresholds not finite"));
                }
                if sd.n_counts != *n || sd.n_subjects != *n {
                    return Err(invalid("scope routing: one subject per record"));
                }
                let decode = |_| BundleError::DescriptorDecode { index: pi };
                let mut c = sd.subjects.clone();
                for _ in 0..*n {
                    check_str(c.str().map_err(decode)?, "subject length")?;
                }
                let mut c = sd.counts.clone();
                let mut total = 0u64;
                for _ in 0..*n {
                    let k = c.u32().map_err(decode)? as u64;
                    if k == 0 || k > MAX_DIM {
                        return Err(invalid("scope routing: subject row count"));
                    }
                    total += k;
                }
                rows_cap(total)?;
                r.take(sd.relation, SectionKind::MemoryRelation, &[*n, e])?;
                r.take(sd.subject_rows, SectionKind::MemorySubjectRows, &[total, e])?;
                if let Some((members, hidden, weights, bias, n_bias, t)) = &sd.head {
                    r.scope_head = true;
                    let (members, hidden) = (*members as u64, *hidden as u64);
                    if members == 0
                        || members > MAX_SCOPE_HEAD_MEMBERS as u64
                        || hidden == 0
                        || hidden > MAX_SCOPE_HEAD_HIDDEN as u64
                        || *n_bias != members
                    {
                        return Err(invalid("scope head: member or hidden count"));
                    }
                    let mut c = bias.clone();
                    for _ in 0..members {
                        let b = c
                            .f32()
                            .map_err(|_| BundleError::DescriptorDecode { index: pi })?;
                        if !b.is_finite() {
                            return Err(invalid("scope head: output bias not finite"));
                        }
                    }
                    if !t.is_finite() {
                        return Err(invalid("scope head: threshold not finite"));
                    }
                    r.take(
                        *weights,
                        SectionKind::ScopeHeadWeights,
                        &[members * hidden, 3 * e + 5],
                    )?;
                }
                if let Some(g) = &sd.groups {
                    r.relation_groups = true;
                    // The in-memory reader's `check_relation_groups`, in its order.
                    let (t, k) = (g.n_templates, g.n_names);
                    if t == 0
                        || t > MAX_RELATION_TEMPLATES as u64
                        || k == 0
                        || k > MAX_RELATION_GROUPS as u64
                    {
                        return Err(invalid("relation groups: template or group count"));
                    }
                    if g.n_records != *n {
                        return Err(invalid("relation groups: one group per record"));
                    }
                    let decode = |_| BundleError::DescriptorDecode { index: pi };
                    let mut c = g.template_group.clone();
                    for _ in 0..t {
                        if c.u16().map_err(decode)? as u64 >= k {
                            return Err(invalid("relation groups: group id out of range"));
                        }
                    }
                    let mut c = g.record_group.clone();
                    for _ in 0..g.n_records {
                        let x = c.u16().map_err(decode)?;
                        if x != u16::MAX && x as u64 >= k {
                            return Err(invalid("relation groups: group id out of range"));
                        }
                    }
                    let mut c = g.names.clone();
                    for _ in 0..k {
                        if c.str().map_err(decode)?.len() > MAX_STRING_LEN {
                            return Err(invalid("relation groups: name length"));
                        }
                    }
                    if !super::format::is_cosine(g.min_score) {
                        return Err(invalid(
                            "relation groups: min_score must be a cosine in [-1, 1]",
                        ));
                    }
                    if !super::format::is_relation_margin(g.margin) {
                        return Err(invalid("relation groups: margin must be in [0, 2]"));
                    }
                    r.relation_margin |= g.margin != 0.0;
                    if !g.vote.is_none_or(super::format::is_group_weight) {
                        return Err(invalid("relation groups: vote weight must be in [0, 1000]"));
                    }
                    r.group_vote |= g.vote.is_some();
                    r.take(g.templates, SectionKind::RelationTemplates, &[t, e])?;
                }
            }
        }
    }
    Ok(())
}
