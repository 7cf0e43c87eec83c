//! Every kind of bad input is refused with its own specific error, and the active EditSet is
//! left exactly as it was (same generation, same snapshot pointer, same list).

mod common;

use std::sync::Arc;

use amend_edits::bundle::*;
use amend_edits::ed25519_dalek::VerifyingKey;
use amend_edits::editset::{AddOptions, EditSet, EditSetError};
use amend_edits::keys::{key_id, TrustStore};
use common::*;

/// Try to open and add `bytes`; return the error and check that nothing changed.
fn refuse(set: &EditSet, bytes: &[u8]) -> EditSetError {
    let before = set.snapshot();
    let list = set.list();
    let err = set
        .open_bytes(bytes)
        .and_then(|b| set.add(b, AddOptions::default()))
        .expect_err("bad input was accepted");
    common::stream::assert_stream_agrees(bytes, set.trust(), &err);
    let after = set.snapshot();
    assert!(
        Arc::ptr_eq(&before, &after),
        "snapshot changed after {err:?}"
    );
    assert_eq!(before.generation, after.generation);
    assert_eq!(list, set.list());
    err
}

/// An EditSet with one bundle already active, so "unchanged" is not trivially empty.
fn active_set() -> EditSet {
    let (set, _clock) = editset();
    let b = set
        .open_bytes(signed("base", "other", 1).as_slice())
        .unwrap();
    set.add(b, AddOptions::default()).unwrap();
    set
}

fn bundle_err(e: EditSetError) -> BundleError {
    match e {
        EditSetError::Bundle(b) => b,
        other => panic!("expected a bundle error, got {other:?}"),
    }
}

fn good() -> AlignedBuf {
    signed("b1", "main", 5)
}

fn flip(buf: &[u8], at: usize, bit: u8) -> Vec<u8> {
    let mut v = buf.to_vec();
    v[at] ^= 1 << bit;
    v
}

fn manifest_of(buf: &[u8]) -> Manifest {
    let h = read_header(buf).unwrap();
    decode_manifest(&buf[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize]).unwrap()
}

#[test]
fn k01_truncation_at_every_offset() {
    let set = active_set();
    let g = good();
    for k in 0..g.len() {
        match bundle_err(refuse(&set, &g.as_slice()[..k])) {
            BundleError::Truncated { have, .. } => assert_eq!(have, k as u64),
            e => panic!("offset {k}: {e:?}"),
        }
    }
}

#[test]
fn k02_trailing_bytes() {
    let set = active_set();
    let mut v = good().as_slice().to_vec();
    v.extend_from_slice(&[0; 64]);
    assert!(matches!(
        bundle_err(refuse(&set, &v)),
        BundleError::LengthMismatch { .. }
    ));
}

#[test]
fn k03_bad_magic() {
    let set = active_set();
    assert_eq!(
        bundle_err(refuse(&set, &flip(good().as_slice(), 0, 0))),
        BundleError::BadMagic
    );
}

#[test]
fn k04_future_format_version() {
    let set = active_set();
    let mut v = good().as_slice().to_vec();
    v[8] = 2; // major = 2
    assert!(matches!(
        bundle_err(refuse(&set, &v)),
        BundleError::UnsupportedVersion { major: 2, .. }
    ));
}

#[test]
fn k05_header_flags_and_layout_fields() {
    let set = active_set();
    let g = good();
    assert_eq!(
        bundle_err(refuse(&set, &flip(g.as_slice(), 12, 0))),
        BundleError::BadHeader("flags")
    );
    assert_eq!(
        bundle_err(refuse(&set, &flip(g.as_slice(), 24, 3))),
        BundleError::BadHeader("sig_offset")
    );
    assert_eq!(
        bundle_err(refuse(&set, &flip(g.as_slice(), 40, 6))),
        BundleError::BadHeader("payload_offset")
    );
    assert_eq!(
        bundle_err(refuse(&set, &flip(g.as_slice(), 56, 0))),
        BundleError::BadHeader("reserved")
    );
}

#[test]
fn k06_flipped_bit_in_signed_header_field() {
    // minor version is not structural: only the signature catches it.
    let set = active_set();
    assert_eq!(
        bundle_err(refuse(&set, &flip(good().as_slice(), 10, 0))),
        BundleError::BadSignature
    );
}

#[test]
fn k07_manifest_length_over_cap() {
    let set = active_set();
    let mut v = good().as_slice().to_vec();
    v[20..24].copy_from_slice(&(MAX_MANIFEST_LEN + 1).to_le_bytes());
    assert!(matches!(
        bundle_err(refuse(&set, &v)),
        BundleError::CapExceeded {
            what: "manifest length",
            ..
        }
    ));
}

#[test]
fn k08_flipped_bit_in_every_manifest_byte() {
    let set = active_set();
    let g = good();
    let h = read_header(g.as_slice()).unwrap();
    for at in HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize {
        assert_eq!(
            bundle_err(refuse(&set, &flip(g.as_slice(), at, (at % 8) as u8))),
            BundleError::BadSignature
        );
    }
}

#[test]
fn k09_flipped_bit_in_each_section() {
    let set = active_set();
    let g = good();
    let m = manifest_of(g.as_slice());
    for (i, s) in m.sections.iter().enumerate() {
        for at in [s.offset, s.offset + s.len / 2, s.offset + s.len - 1] {
            assert_eq!(
                bundle_err(refuse(&set, &flip(g.as_slice(), at as usize, 1))),
                BundleError::SectionHash { index: i }
            );
        }
    }
}

#[test]
fn k10_flipped_bit_in_signature() {
    let set = active_set();
    let g = good();
    let at = read_header(g.as_slice()).unwrap().sig_offset.get() as usize;
    for k in KEY_ID_LEN..SIG_BLOCK_LEN {
        assert_eq!(
            bundle_err(refuse(&set, &flip(g.as_slice(), at + k, 2))),
            BundleError::BadSignature
        );
    }
}

#[test]
fn k11_flipped_bit_in_key_id_is_unknown_key() {
    let set = active_set();
    let g = good();
    let at = read_header(g.as_slice()).unwrap().sig_offset.get() as usize;
    assert!(matches!(
        bundle_err(refuse(&set, &flip(g.as_slice(), at, 0))),
        BundleError::UnknownKeyId(_)
    ));
}

#[test]
fn k12_flipped_bit_in_padding() {
    let set = active_set();
    let g = good();
    let m = manifest_of(g.as_slice());
    // The gap right after the first section (radii etc. are shorter than 64 bytes).
    let s = m.sections.iter().find(|s| s.len % 64 != 0).unwrap();
    let at = (s.offset + s.len) as usize;
    assert_eq!(
        bundle_err(refuse(&set, &flip(g.as_slice(), at, 0))),
        BundleError::NonZeroPadding { offset: at as u64 }
    );
}

#[test]
fn k13_unsigned() {
    let set = active_set();
    let u = builder("b1", "main", 5, 5.0).build_unsigned().unwrap();
    assert_eq!(
        bundle_err(refuse(&set, u.as_slice())),
        BundleError::Unsigned
    );
}

#[test]
fn k14_signed_by_untrusted_key() {
    let set = active_set();
    let v = builder("b1", "main", 5, 5.0).build_signed(&key(2)).unwrap();
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::UnknownKeyId(key_id(&key(2).verifying_key()))
    );
}

#[test]
fn k15_wrong_key_claiming_trusted_id() {
    let set = active_set();
    let mut v = builder("b1", "main", 5, 5.0).build_signed(&key(2)).unwrap();
    let at = read_header(v.as_slice()).unwrap().sig_offset.get() as usize;
    v.as_mut_slice()[at..at + KEY_ID_LEN].copy_from_slice(&key_id(&key(1).verifying_key()));
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::BadSignature
    );
}

#[test]
fn k16_misaligned_buffer() {
    let g = good();
    // An AlignedBuf starts 64-aligned, so one byte in is misaligned for f32.
    let mut store = AlignedBuf::zeroed(g.len() + 1);
    store.as_mut_slice()[1..].copy_from_slice(g.as_slice());
    let s = &store.as_slice()[1..];
    assert_eq!(
        verify(s, &trust()).unwrap_err(),
        BundleError::MisalignedBuffer
    );
    assert!(verify(g.as_slice(), &trust()).is_ok());
    // Alignment is where the caller keeps the bytes, not a property of the bundle: a stream
    // has no buffer, so it accepts the same bytes.
    assert!(common::stream::stream(s, &trust(), 7).is_ok());
}

#[test]
fn k17_garbage_manifest_signed() {
    let set = active_set();
    let g = good();
    let mut v = g.as_slice().to_vec();
    let h = read_header(&v).unwrap();
    for b in &mut v[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize] {
        *b = 0xff;
    }
    sign_in_place(&mut v, &key(1)).unwrap();
    assert!(matches!(
        bundle_err(refuse(&set, &v)),
        BundleError::ManifestDecode(_)
    ));
}

#[test]
fn k18_section_out_of_bounds() {
    let set = active_set();
    let v = craft(good().as_slice(), false, |m, _| {
        layout(m).unwrap();
        m.sections[0].offset = 64;
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::SectionOutOfBounds { index: 0 }
    );
}

#[test]
fn k19_overlapping_sections() {
    let set = active_set();
    let v = craft(good().as_slice(), false, |m, _| {
        layout(m).unwrap();
        m.sections[1].offset = m.sections[0].offset;
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::SectionOverlap { a: 0, b: 1 }
    );
    // The reader names the pair the stream names (`refuse` checks the stream): the first
    // section, in index order, that runs into another, then that other.
    let v = craft(good().as_slice(), false, |m, _| {
        layout(m).unwrap();
        m.sections[2].offset = m.sections[0].offset;
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::SectionOverlap { a: 0, b: 2 }
    );
}

/// Two edits claiming the same units: both verifiers name the first edit, in manifest order,
/// that claims units an earlier edit has (not a position in some sorted order).
#[test]
fn k19b_edits_claiming_the_same_units() {
    let set = active_set();
    // Edit 5 (the memory's second record) claims edit 4's record.
    let v = craft(good().as_slice(), true, |m, _| m.edits[5].first = 0);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::BadEdit {
            index: 5,
            reason: "two edits claim the same units"
        }
    );
    // Edit 1 reaches back into edit 0's rows of the codebook.
    let v = craft(good().as_slice(), true, |m, _| m.edits[1].first = 1);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::BadEdit {
            index: 1,
            reason: "two edits claim the same units"
        }
    );
    // Edit 0 grows over edit 1's row: edit 1 is the one that finds its units taken.
    let v = craft(good().as_slice(), true, |m, _| m.edits[0].count = 3);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::BadEdit {
            index: 1,
            reason: "two edits claim the same units"
        }
    );
}

#[test]
fn k20_misaligned_section() {
    let set = active_set();
    let v = craft(good().as_slice(), false, |m, _| {
        layout(m).unwrap();
        m.sections[2].offset += 4;
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::SectionMisaligned { index: 2 }
    );
}

#[test]
fn k21_unknown_section_kind() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| m.sections[1].kind = 999);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::UnknownSectionKind {
            index: 1,
            kind: 999
        }
    );
}

#[test]
fn k22_unknown_payload_kind() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| m.payloads[1].kind = 77);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::UnknownPayloadKind { index: 1, kind: 77 }
    );
}

#[test]
fn k23_unknown_dtype() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| m.sections[0].dtype = 9);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::UnknownDtype { index: 0, dtype: 9 }
    );
}

#[test]
fn k24_shape_does_not_match_length() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| m.sections[0].shape[0] += 1);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::SectionShape { index: 0 }
    );
}

fn poison(x: f32) -> AlignedBuf {
    craft(good().as_slice(), true, |m, blobs| {
        blobs[1][8..12].copy_from_slice(&x.to_le_bytes());
        m.sections[1].sha256 = sha256(&blobs[1]);
    })
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

#[test]
fn k25_nan_in_payload() {
    let set = active_set();
    assert_eq!(
        bundle_err(refuse(&set, poison(f32::NAN).as_slice())),
        BundleError::NonFinite { index: 1 }
    );
}

#[test]
fn k26_infinity_in_payload() {
    let set = active_set();
    assert_eq!(
        bundle_err(refuse(&set, poison(f32::NEG_INFINITY).as_slice())),
        BundleError::NonFinite { index: 1 }
    );
}

/// A finite value over the magnitude bound: refused by the reader and, at every chunk size,
/// by the streaming verifier (which used to let it through: it checked only NaN and infinity).
#[test]
fn k26b_value_over_the_bound_in_payload() {
    let set = active_set();
    for x in [2.0e6f32, -MAX_ABS_VALUE * 1.5, f32::MAX] {
        assert_eq!(
            bundle_err(refuse(&set, poison(x).as_slice())),
            BundleError::ValueOutOfRange { index: 1 },
            "{x}"
        );
    }
}

#[test]
fn k27_counts_beyond_caps() {
    let set = active_set();
    // Too many sections.
    let v = craft(good().as_slice(), true, |m, blobs| {
        let s = m.sections[2].clone();
        for _ in 0..MAX_SECTIONS {
            m.sections.push(s.clone());
            blobs.push(blobs[2].clone());
        }
    });
    assert!(matches!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::CapExceeded {
            what: "section count",
            ..
        }
    ));
    // A string over the length cap.
    let v = craft(good().as_slice(), true, |m, _| {
        m.edits[0].prompt = "x".repeat(MAX_STRING_LEN + 1)
    });
    assert!(matches!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::CapExceeded {
            what: "prompt length",
            ..
        }
    ));
    // Rows over the cap (checked on the manifest alone: such a bundle would be 100+ MB).
    let mut m = manifest_of(good().as_slice());
    for s in m.sections.iter_mut().take(3) {
        s.shape[0] = MAX_ROWS + 1;
        s.len = s.shape.iter().product::<u64>() * 4;
    }
    assert!(matches!(
        check_manifest(&m, None),
        Err(BundleError::CapExceeded { what: "rows", .. })
    ));
}

#[test]
fn k28_section_of_wrong_kind_referenced() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| {
        let mut p = decode_codebook(&m.payloads[0].body);
        std::mem::swap(&mut p.keys, &mut p.values);
        m.payloads[0] = Payload::Codebook(p).to_entry();
    });
    assert!(matches!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::BadSectionRef {
            payload: 0,
            reason: "wrong section kind",
            ..
        }
    ));
}

fn decode_codebook(body: &[u8]) -> CodebookDesc {
    postcard::from_bytes(body).unwrap()
}

#[test]
fn k29_unreferenced_section() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, blobs| {
        m.sections.push(m.sections[2].clone());
        blobs.push(blobs[2].clone());
    });
    let n = manifest_of(v.as_slice()).sections.len() - 1;
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::UnreferencedSection { index: n }
    );
}

#[test]
fn k30_descriptor_garbage() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| {
        m.payloads[0].body = vec![0xff; 3]
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::DescriptorDecode { index: 0 }
    );
}

#[test]
fn k31_unknown_site_code() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| {
        let mut p = decode_codebook(&m.payloads[0].body);
        p.key_site = 42;
        m.payloads[0] = Payload::Codebook(p).to_entry();
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::UnknownSite {
            payload: 0,
            code: 42
        }
    );
}

#[test]
fn k32_unknown_distance_code() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| {
        let mut p = decode_codebook(&m.payloads[0].body);
        p.distance = 9;
        m.payloads[0] = Payload::Codebook(p).to_entry();
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::UnknownCode {
            payload: 0,
            what: "distance",
            code: 9
        }
    );
}

#[test]
fn k33_payload_layer_beyond_model() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| {
        let mut p = decode_codebook(&m.payloads[0].body);
        p.layer = 18;
        m.payloads[0] = Payload::Codebook(p).to_entry();
    });
    assert!(matches!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::PayloadDimension {
            payload: 0,
            what: "layer",
            ..
        }
    ));
}

#[test]
fn k34_duplicate_edit_id() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| {
        m.edits[1].id = m.edits[0].id.clone()
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::DuplicateEditId { index: 1 }
    );
    // Two repeats: the first in manifest order is named (edit 2), not the first in id order
    // (edit 3 repeats e-cb-0, which sorts before e-cb-1).
    let v = craft(good().as_slice(), true, |m, _| {
        m.edits[3].id = m.edits[0].id.clone();
        m.edits[2].id = m.edits[1].id.clone();
    });
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::DuplicateEditId { index: 2 }
    );
}

#[test]
fn k35_edit_units_out_of_range() {
    let set = active_set();
    let v = craft(good().as_slice(), true, |m, _| m.edits[1].count = 5);
    assert_eq!(
        bundle_err(refuse(&set, v.as_slice())),
        BundleError::BadEdit {
            index: 1,
            reason: "units out of range"
        }
    );
}

#[test]
fn k36_replay_same_version() {
    let set = active_set();
    let b = set.open_bytes(good().as_slice()).unwrap();
    set.add(b, AddOptions::default()).unwrap();
    let e = refuse(&set, signed("b1-again", "main", 5).as_slice());
    assert_eq!(
        e,
        EditSetError::Replay {
            channel: "main".into(),
            version: 5
        }
    );
}

#[test]
fn k37_downgrade() {
    let set = active_set();
    let b = set.open_bytes(good().as_slice()).unwrap();
    set.add(b, AddOptions::default()).unwrap();
    let e = refuse(&set, signed("b0", "main", 4).as_slice());
    assert_eq!(
        e,
        EditSetError::Downgrade {
            channel: "main".into(),
            current: 5,
            offered: 4
        }
    );
    // Removing the bundle does not reopen the door to older versions.
    set.remove("b1").unwrap();
    assert!(matches!(
        refuse(&set, signed("b0", "main", 4).as_slice()),
        EditSetError::Downgrade { .. }
    ));
    // An explicit downgrade is possible.
    let b = set.open_bytes(signed("b0", "main", 4).as_slice()).unwrap();
    set.add(
        b,
        AddOptions {
            allow_downgrade: true,
        },
    )
    .unwrap();
}

#[test]
fn k38_expired() {
    let (set, clock) = editset();
    clock.set(T0 + 1000);
    assert!(matches!(
        refuse(&set, good().as_slice()),
        EditSetError::Expired { .. }
    ));
}

#[test]
fn k39_not_yet_valid() {
    let (set, clock) = editset();
    clock.set(T0 - 11);
    assert!(matches!(
        refuse(&set, good().as_slice()),
        EditSetError::NotYetValid { .. }
    ));
}

fn with_model(f: impl FnOnce(&mut ModelBinding)) -> AlignedBuf {
    let mut mt = meta("b1", "main", 5);
    f(&mut mt.model);
    let base = builder("x", "x", 1, 1.0).build_unsigned().unwrap();
    craft(base.as_slice(), true, |m, _| {
        m.model = mt.model.clone();
        m.bundle_id = mt.bundle_id.clone();
        m.channel = mt.channel.clone();
        m.version = mt.version;
    })
}

#[test]
fn k40_wrong_model_fingerprint() {
    let set = active_set();
    let v = with_model(|m| m.fingerprint[0] ^= 1);
    assert_eq!(refuse(&set, v.as_slice()), EditSetError::WrongModel);
}

#[test]
fn k41_dimension_mismatch_with_model() {
    let set = active_set();
    let v = with_model(|m| m.n_layer = 26);
    assert_eq!(
        refuse(&set, v.as_slice()),
        EditSetError::DimensionMismatch {
            what: "n_layer",
            bundle: 26,
            model: 18
        }
    );
    // n_embd differs: the bundle's payloads are [n, 8] so a bundle for 640 cannot even be
    // consistent; check the EditSet-level error by binding the set to another width instead.
    let (set2, _) = {
        let clock = Arc::new(amend_edits::editset::ManualClock::new(T0));
        let mut mb = model();
        mb.n_embd = 640;
        (EditSet::with_clock(mb, trust(), clock.clone()), clock)
    };
    assert_eq!(
        refuse(&set2, good().as_slice()),
        EditSetError::DimensionMismatch {
            what: "n_embd",
            bundle: 8,
            model: 640
        }
    );
}

#[test]
fn k42_architecture_mismatch() {
    let set = active_set();
    let v = with_model(|m| m.arch = "llama".into());
    assert!(matches!(
        refuse(&set, v.as_slice()),
        EditSetError::ArchMismatch { .. }
    ));
}

#[test]
fn k43_duplicate_bundle_id_in_other_channel() {
    let set = active_set();
    let e = refuse(&set, signed("base", "main", 9).as_slice());
    assert_eq!(e, EditSetError::DuplicateBundle("base".into()));
}

#[test]
fn k44_unknown_edit_and_bundle_ids_leave_set_unchanged() {
    let set = active_set();
    let before = set.snapshot();
    assert_eq!(
        set.rollback_edit("nope"),
        Err(EditSetError::UnknownEdit("nope".into()))
    );
    assert!(matches!(
        set.remove("nope"),
        Err(EditSetError::UnknownBundle(_))
    ));
    set.rollback_edit("e-cb-0").unwrap();
    let mid = set.snapshot();
    assert_eq!(
        set.rollback_edit("e-cb-0"),
        Err(EditSetError::AlreadyRolledBack("e-cb-0".into()))
    );
    assert!(Arc::ptr_eq(&mid, &set.snapshot()));
    assert_ne!(before.generation, mid.generation);
}

#[test]
fn k45_trust_store_without_keys_refuses_everything() {
    let b = verify(good().as_slice(), &TrustStore::new());
    assert!(matches!(b, Err(BundleError::UnknownKeyId(_))));
    let s = common::stream::stream(good().as_slice(), &TrustStore::new(), 64);
    assert!(matches!(s, Err(BundleError::UnknownKeyId(_))));
}

/// The first seed byte `s` whose `[s; 32]` does (or does not) decode as an ed25519 point:
/// about half of all 32-byte strings do, so a secret seed may pass for a public key or not.
fn seed_that_is_a_point(point: bool) -> u8 {
    (2..=255u8)
        .find(|&s| VerifyingKey::from_bytes(&[s; 32]).is_ok_and(|k| !k.is_weak()) == point)
        .unwrap()
}

#[test]
fn k45b_secret_key_trusted_in_place_of_the_public_key() {
    let seed = seed_that_is_a_point(true);
    let k = key(seed);
    let mut b = good();
    sign_in_place(b.as_mut_slice(), &k).unwrap();
    // Trust key(1)'s public key and, second, k's secret seed read as a public key.
    let mut t = trust();
    t.add(VerifyingKey::from_bytes(&k.to_bytes()).unwrap())
        .unwrap();
    let want = BundleError::SecretKeyTrusted { index: 1 };
    assert_eq!(verify(b.as_slice(), &t).map(drop), Err(want));
    assert_eq!(Bundle::from_bytes(b.as_slice(), &t).map(drop), Err(want));
    for chunk in common::stream::CHUNKS.iter().copied() {
        assert_eq!(common::stream::stream(b.as_slice(), &t, chunk), Err(want));
    }
    // The stream's raw key list, where the secret is the first key.
    let mut v = StreamVerifier::new(&[k.to_bytes()]).unwrap();
    assert_eq!(
        v.update(b.as_slice()),
        Err(BundleError::SecretKeyTrusted { index: 0 })
    );
    assert!(want.to_string().contains("secret key"), "{want}");
    // Unchanged: the public key verifies, and a key that is neither stays unknown.
    let ok = TrustStore::with_key(k.verifying_key());
    assert!(verify(b.as_slice(), &ok).is_ok());
    assert!(common::stream::stream(b.as_slice(), &ok, 64).is_ok());
    let unknown = BundleError::UnknownKeyId(key_id(&k.verifying_key()));
    assert_eq!(verify(b.as_slice(), &trust()).map(drop), Err(unknown));
    assert_eq!(
        common::stream::stream(b.as_slice(), &trust(), 64),
        Err(unknown)
    );
}

#[test]
fn k45c_secret_key_that_is_no_point_is_refused_where_it_is_trusted() {
    // Such a seed never reaches a verifier: the key is refused as it is added, with a hint.
    let seed = seed_that_is_a_point(false);
    let file = amend_edits::keys::to_hex(&[seed; 32]);
    let e = amend_edits::keys::verifying_key_from_file_bytes(file.as_bytes()).unwrap_err();
    assert_eq!(e, amend_edits::keys::KeyError::BadPublicKey);
    assert!(e.to_string().contains("secret key file"), "{e}");
    let s = StreamVerifier::new(&[[seed; 32]]).map(drop).unwrap_err();
    assert_eq!(s, BundleError::BadTrustedKey(0));
    assert!(s.to_string().contains("secret key file"), "{s}");
}

fn with_verification(v: Verification) -> AlignedBuf {
    craft(good().as_slice(), true, |m, _| m.verification = Some(v))
}

fn backend(name: &str, passed: u32, total: u32) -> VerifiedBackend {
    VerifiedBackend {
        backend: name.into(),
        passed,
        total,
    }
}

#[test]
fn k46_verification_record() {
    let n = manifest_of(good().as_slice()).edits.len() as u32;
    // A good record: format 1.2, read back as written, and streamed alike at every chunk size.
    let v = Verification {
        backends: vec![
            backend("llama.cpp", n, n),
            backend("onnxruntime-1.32.0:cpu", n - 1, n),
        ],
        required: true,
    };
    let ok = with_verification(v.clone());
    assert_eq!(read_header(ok.as_slice()).unwrap().minor.get(), 2);
    let set = active_set();
    let b = set.open_bytes(ok.as_slice()).unwrap();
    assert_eq!(b.manifest().verification.as_ref(), Some(&v));
    assert!(v.covers("llama.cpp") && !v.covers("onnxruntime-1.32.0:cpu"));
    for chunk in [1, 7, 4096, ok.len()] {
        common::stream::stream(ok.as_slice(), set.trust(), chunk).unwrap();
    }
    // Without a record the bundle stays v1.1, readable by v1.1 runtimes.
    assert_eq!(read_header(good().as_slice()).unwrap().minor.get(), 1);

    // Bad records: each refused by name, by the reader and the stream alike, nothing applied.
    let bad = |v: Verification| bundle_err(refuse(&set, with_verification(v).as_slice()));
    let one = |b: VerifiedBackend| Verification {
        backends: vec![b],
        required: false,
    };
    assert_eq!(
        bad(one(backend("llama.cpp", n, n + 1))),
        BundleError::BadManifest("verification: counts do not match the edits")
    );
    assert_eq!(
        bad(one(backend("llama.cpp", n + 1, n))),
        BundleError::BadManifest("verification: counts do not match the edits")
    );
    assert_eq!(
        bad(one(backend("", n, n))),
        BundleError::BadManifest("verification: empty backend name")
    );
    assert!(matches!(
        bad(one(backend(&"x".repeat(65), n, n))),
        BundleError::CapExceeded {
            what: "backend name length",
            ..
        }
    ));
    assert_eq!(
        bad(Verification {
            backends: vec![backend("a", n, n), backend("a", 0, n)],
            required: false,
        }),
        BundleError::BadManifest("verification: backend listed twice")
    );
    assert!(matches!(
        bad(Verification {
            backends: (0..17).map(|i| backend(&format!("b{i}"), n, n)).collect(),
            required: false,
        }),
        BundleError::CapExceeded {
            what: "verified backends",
            ..
        }
    ));
    // A record under a v1.1 header (re-signed, so only the minor rule catches it).
    let mut v11 = ok.as_slice().to_vec();
    v11[10] = 1;
    let mut v11 = AlignedBuf::from_slice(&v11);
    sign_in_place(v11.as_mut_slice(), &key(1)).unwrap();
    assert_eq!(
        bundle_err(refuse(&set, v11.as_slice())),
        BundleError::BadHeader("minor: a verification record needs format 1.2")
    );
    // Junk after the record.
    let mut bytes = encode_manifest(&manifest_of(ok.as_slice())).unwrap();
    bytes.push(0);
    assert_eq!(
        decode_manifest(&bytes),
        Err(BundleError::ManifestTrailingBytes(1))
    );
}

/// Ids and the channel are printed by tools: a control character in them (a newline, ESC, a
/// C1 control) could forge or hide lines of output, so the reader and the stream refuse them
/// with the same error, and the builder does not build them. Prompts and targets may hold
/// newlines (a multi-line prompt is legitimate).
#[test]
fn k60_control_characters_in_ids_and_channel() {
    let set = active_set();
    for bad in [
        "a\nsigner 1234 (verified)",
        "a\x1b[8m",
        "\u{7f}",
        "a\u{9b}2J",
        "\0",
        // Shown as nothing, yet they make one id display as another or break its line.
        "paris\u{202e}",
        "par\u{200b}is",
        "\u{feff}id",
        "a\u{2028}signer",
        "id\u{e0041}",
    ] {
        let v = craft(good().as_slice(), true, |m, _| m.bundle_id = bad.into());
        assert_eq!(
            bundle_err(refuse(&set, v.as_slice())),
            BundleError::BadManifest("control character in bundle id"),
            "{bad:?}"
        );
        let v = craft(good().as_slice(), true, |m, _| m.channel = bad.into());
        assert_eq!(
            bundle_err(refuse(&set, v.as_slice())),
            BundleError::BadManifest("control character in channel"),
            "{bad:?}"
        );
        let v = craft(good().as_slice(), true, |m, _| m.edits[2].id = bad.into());
        assert_eq!(
            bundle_err(refuse(&set, v.as_slice())),
            BundleError::BadEdit {
                index: 2,
                reason: "control character in id"
            },
            "{bad:?}"
        );
        // A memory record's edit id.
        let v = craft(good().as_slice(), true, |m, _| {
            let (pi, e) = m
                .payloads
                .iter_mut()
                .enumerate()
                .find(|(_, p)| p.kind == PayloadKind::Memory as u16)
                .unwrap();
            let mut d: MemoryDesc = postcard::from_bytes(&e.body).unwrap();
            d.records[1].edit_id = bad.into();
            *e = Payload::Memory(d).to_entry();
            assert_eq!(pi, 3);
        });
        assert_eq!(
            bundle_err(refuse(&set, v.as_slice())),
            BundleError::InvalidPayload {
                payload: 3,
                reason: "control character in record id"
            },
            "{bad:?}"
        );
    }
    // The builder refuses the same, naming what is wrong.
    let e = builder("id\x1b", "main", 1, 1.0).build_unsigned().err();
    assert_eq!(
        e,
        Some(BundleError::BadManifest("control character in bundle id"))
    );
    let e = builder("id", "ma\nin", 1, 1.0).build_unsigned().err();
    assert_eq!(
        e,
        Some(BundleError::BadManifest("control character in channel"))
    );
    let mut b = builder("id", "main", 1, 1.0);
    b.add_edit("e\r", 3, amend_edits::Site::FfnOutput, "p", " t", 0, 0, 1);
    assert_eq!(
        b.build_unsigned().err(),
        Some(BundleError::BadEdit {
            index: 7,
            reason: "control character in id"
        })
    );
    // Ids in any script are fine: only characters that display as nothing or break lines are
    // refused.
    let v = craft(good().as_slice(), true, |m, _| {
        m.edits[0].id = "Париж-東京-مدينة-é".into();
        m.bundle_id = "bündle-日本".into();
    });
    drop(set.open_bytes(v.as_slice()).expect("ids in any script"));
    // Newlines and ESC in prompts, targets and memory texts are content, not refused.
    let v = craft(good().as_slice(), true, |m, _| {
        m.edits[0].prompt = "line one\nline two \x1b".into();
        m.edits[0].target = " a\nb".into();
    });
    let b = set
        .open_bytes(v.as_slice())
        .expect("newlines in a prompt are fine");
    drop(b);
    for chunk in common::stream::CHUNKS {
        assert!(common::stream::stream(v.as_slice(), &trust(), *chunk).is_ok());
    }
}

/// Session 38: a bundle valid from `t` until `t` verified but could never be activated
/// (activation needs `not_before <= now < expires`). The reader and the streaming verifier
/// refuse the empty window by name, and the builder does not build it; one second is enough.
#[test]
fn empty_validity_window_is_refused() {
    use amend_edits::bundle::stream::EMPTY_VALIDITY;
    let set = active_set();
    for t in [0, T0, u64::MAX] {
        let v = craft(good().as_slice(), true, |m, _| {
            m.not_before = t;
            m.expires = t;
        });
        let e = refuse(&set, v.as_slice());
        assert!(
            matches!(e, EditSetError::Bundle(BundleError::BadManifest(r)) if r == EMPTY_VALIDITY),
            "{t}: {e:?}"
        );
        assert!(e.to_string().contains("empty validity window"), "{e}");
    }
    let v = craft(good().as_slice(), true, |m, _| {
        m.not_before = T0;
        m.expires = T0 + 1;
    });
    drop(set.open_bytes(v.as_slice()).expect("a one-second window"));
    for (not_before, expires) in [(T0, T0), (T0 + 1, T0)] {
        let mut meta = meta("id", "main", 1);
        meta.not_before = not_before;
        meta.expires = expires;
        assert_eq!(
            BundleBuilder::new(meta).build_signed(&key(1)).err(),
            Some(BundleError::BadManifest(EMPTY_VALIDITY))
        );
    }
}

/// Session 38: a signed memory template could repeat `{prompt}` about 2,000 times within
/// the 16 KiB string cap; the rendered prompt was refused only after tokenization. Opening now
/// refuses a placeholder used over `MAX_PLACEHOLDER_USES` (4) times, naming it; the compilers'
/// templates (two `{edit}` at most) still open.
#[test]
fn memory_template_caps_each_placeholder() {
    use amend_edits::families::MAX_PLACEHOLDER_USES;
    let bundle = |template: &str| {
        let mut b = BundleBuilder::new(meta("tpl", "tpl", 1));
        let p = b.add_memory(
            4,
            &[1.0, 0.0, 0.0, 0.0],
            0.8,
            template,
            EmbedderDesc::External {
                model_id: "minilm".into(),
            },
            vec![MemoryRecordDesc {
                edit_id: "m".into(),
                prompt: "a".into(),
                target: "b".into(),
                text: "a is b".into(),
            }],
        );
        b.add_edit("m", 0, amend_edits::Site::ResidualOut, "a", "b", p, 0, 1);
        b.build_signed(&key(1)).unwrap()
    };
    let (set, _clock) = editset();
    assert_eq!(MAX_PLACEHOLDER_USES, 4);
    for name in ["{edit}", "{prompt}", "{edit_prompt}", "{target}"] {
        let over = format!(
            "{{prompt}}{}",
            name.repeat(5 - (name == "{prompt}") as usize)
        );
        let e = set.open_bytes(bundle(&over).as_slice()).err();
        let Some(EditSetError::Bundle(BundleError::InvalidPayload { payload: 0, reason })) = e
        else {
            panic!("{name}: {e:?}");
        };
        assert!(
            reason.contains(name) && reason.contains("more than 4 times"),
            "{name}: {reason}"
        );
        // Exactly at the cap: opens.
        let at = format!(
            "{{prompt}}{}",
            name.repeat(4 - (name == "{prompt}") as usize)
        );
        drop(set.open_bytes(bundle(&at).as_slice()).expect(&at));
    }
    // 2,000 copies, the QA case; literal braces are not placeholders.
    let e = set
        .open_bytes(bundle(&"{prompt}".repeat(2000)).as_slice())
        .err();
    assert!(format!("{e:?}").contains("{prompt} more than 4"), "{e:?}");
    let braces = format!("{}{{prompt}}", "{{x}}".repeat(100));
    drop(set.open_bytes(bundle(&braces).as_slice()).unwrap());
    for t in [
        "{edit}\n{prompt}",
        "{prompt}{answer}",
        "Fact: {edit}\nFact: {edit}\n{prompt}",
        "Fact: {edit}\n{prompt}{answer}",
    ] {
        drop(set.open_bytes(bundle(t).as_slice()).expect(t));
    }
}
