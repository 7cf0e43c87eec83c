//! The streaming verifier against the in-memory reader: same verdict at every chunk size.

use amend_edits::bundle::*;
use amend_edits::editset::EditSetError;
use amend_edits::keys::TrustStore;

/// Chunk sizes every bundle is streamed in (`usize::MAX`: one chunk), plus random splits.
pub const CHUNKS: &[usize] = &[1, 2, 3, 7, 64, 4096, usize::MAX];

/// Stream `bytes` in chunks of `chunk` bytes.
pub fn stream(
    bytes: &[u8],
    trust: &TrustStore,
    chunk: usize,
) -> Result<StreamVerified, BundleError> {
    let mut slot = Box::<StreamVerifier>::new_uninit();
    let v = StreamVerifier::init_from_trust(&mut slot, trust);
    for c in bytes.chunks(chunk.clamp(1, bytes.len().max(1))) {
        v.update(c)?;
    }
    v.finish()
}

/// Stream `bytes` in random chunk sizes (1..=97, xorshift from `seed`), with empty chunks too.
pub fn stream_random(
    bytes: &[u8],
    trust: &TrustStore,
    mut seed: u64,
) -> Result<StreamVerified, BundleError> {
    let mut slot = Box::<StreamVerifier>::new_uninit();
    let v = StreamVerifier::init_from_trust(&mut slot, trust);
    let mut rest = bytes;
    while !rest.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (seed % 98) as usize;
        let (a, b) = rest.split_at(n.min(rest.len()));
        v.update(a)?;
        rest = b;
    }
    v.finish()
}

/// Does the stream's error name the reader's fault? Both are `BundleError`s: the same value,
/// except where a stream differs by nature: it sees the end of the bytes or bytes past the end
/// as they arrive (no buffer length), and a manifest over the stream's cap is refused before
/// anything else.
pub fn same_fault(s: &BundleError, e: &BundleError, bytes: &[u8]) -> bool {
    let manifest_len = bytes
        .get(20..24)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()));
    if let BundleError::ManifestTooLarge { len, cap } = s {
        return *len == manifest_len && manifest_len > *cap;
    }
    use BundleError as B;
    match (*s, *e) {
        (B::EndedEarly { needed, have }, B::Truncated { needed: n, have: h }) => {
            (needed, have) == (n, h)
        }
        (B::PastDeclaredLength { declared }, B::LengthMismatch { declared: d, .. }) => {
            declared == d
        }
        _ => s == e,
    }
}

/// The streaming verifier's verdict equals the in-memory reader's for `bytes` at every chunk
/// size: refused for the same fault when the reader refuses it, accepted when the reader
/// accepted it and only activation refused it (expiry, model, version: not a reader's job).
pub fn assert_stream_agrees(bytes: &[u8], trust: &TrustStore, refused: &EditSetError) {
    let seeds = [0x9e37_79b9_7f4a_7c15u64, 42, 7];
    let runs = CHUNKS
        .iter()
        .map(|&c| (format!("chunk {c}"), stream(bytes, trust, c)))
        .chain(
            seeds
                .iter()
                .map(|&s| (format!("random split {s}"), stream_random(bytes, trust, s))),
        );
    for (how, got) in runs {
        match (refused, got) {
            (EditSetError::Bundle(e), Err(s)) => {
                assert!(same_fault(&s, e, bytes), "{how}: stream says {s:?}, reader {e:?}")
            }
            (EditSetError::Bundle(e), Ok(_)) => panic!("{how}: stream accepted what the reader refused: {e:?}"),
            (_, Ok(_)) => {}
            (other, Err(s)) => panic!("{how}: stream refused ({s:?}) a bundle the reader accepted (activation: {other:?})"),
        }
    }
}
