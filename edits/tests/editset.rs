//! EditSet behaviour: stacking, channel replacement, rollback by bundle and by edit, views.

mod common;

use std::sync::Arc;

use amend_edits::editset::{AddOptions, EditSetError};
use common::*;

#[test]
fn add_replace_rollback_and_views() {
    let (set, _clock) = editset();
    let g1 = set
        .add(
            set.open_bytes(signed("a1", "a", 1).as_slice()).unwrap(),
            AddOptions::default(),
        )
        .unwrap();
    let g2 = set
        .add(
            set.open_bytes(signed("b1", "b", 1).as_slice()).unwrap(),
            AddOptions::default(),
        )
        .unwrap();
    assert!(g2 > g1);
    let snap = set.snapshot();
    assert_eq!(snap.bundles.len(), 2);
    let cbs: Vec<_> = snap.codebook_views().collect();
    assert_eq!(cbs.len(), 2);
    assert_eq!(cbs[0].1.rows, 0..3);
    assert_eq!(snap.patch_neurons_views().count(), 2);
    assert_eq!(snap.low_rank_views().count(), 2);
    assert_eq!(snap.memory_views().count(), 2);
    assert_eq!(snap.gguf_loras().count(), 2);

    // Roll back the first codebook edit (rows 0..2) of a1: the view shrinks to row 2, zero-copy.
    // Edit ids are per bundle; the topmost bundle that has the id is the one rolled back.
    set.rollback_edit("e-cb-0").unwrap();
    let snap2 = set.snapshot();
    let b1_cb: Vec<_> = snap2
        .codebook_views()
        .filter(|(id, _)| *id == "b1")
        .collect();
    assert_eq!(b1_cb.len(), 1);
    assert_eq!(b1_cb[0].1.rows, 2..3);
    let full = snap.codebook_views().find(|(id, _)| *id == "b1").unwrap().1;
    assert_eq!(b1_cb[0].1.keys, &full.keys[2 * DIM..]);
    assert_eq!(
        b1_cb[0].1.keys.as_ptr(),
        full.keys[2 * DIM..].as_ptr(),
        "must be zero-copy"
    );
    // The old snapshot is untouched.
    assert_eq!(
        snap.codebook_views()
            .find(|(id, _)| *id == "b1")
            .unwrap()
            .1
            .rows,
        0..3
    );

    // Roll back a memory record and the low-rank edit.
    set.rollback_edit("e-mem-1").unwrap();
    set.rollback_edit("e-lr").unwrap();
    let s3 = set.snapshot();
    let mems: Vec<_> = s3.memory_views().filter(|(id, _)| *id == "b1").collect();
    assert_eq!(mems.len(), 1);
    assert_eq!(mems[0].1.records.len(), 1);
    assert_eq!(mems[0].1.records[0].edit_id, "e-mem-0");
    assert_eq!(s3.low_rank_views().filter(|(id, _)| *id == "b1").count(), 0);
    assert_eq!(set.list()[1].rolled_back, vec!["e-cb-0", "e-lr", "e-mem-1"]);

    // A newer version in channel a replaces a1 in place.
    set.add(
        set.open_bytes(signed("a2", "a", 2).as_slice()).unwrap(),
        AddOptions::default(),
    )
    .unwrap();
    let ids: Vec<_> = set.list().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec!["a2", "b1"]);

    // Remove, then restore the previous state.
    let removed = set.remove("a2").unwrap();
    assert_eq!(removed.id(), "a2");
    assert_eq!(set.list().len(), 1);
    set.restore_previous().unwrap();
    assert_eq!(set.list().len(), 2);
    // restore_edit re-enables.
    set.restore_edit("e-lr").unwrap();
    assert_eq!(set.snapshot().low_rank_views().count(), 2);
    // An active edit has nothing to restore (it used to be called unknown); an absent one is.
    assert_eq!(
        set.restore_edit("e-lr"),
        Err(EditSetError::NotRolledBack("e-lr".into()))
    );
    assert_eq!(
        set.restore_edit("no-such-edit"),
        Err(EditSetError::UnknownEdit("no-such-edit".into()))
    );
    let _ = Arc::strong_count(&removed);
}

#[test]
fn rollback_edit_targets_topmost_bundle() {
    let (set, _c) = editset();
    set.add(
        set.open_bytes(signed("a1", "a", 1).as_slice()).unwrap(),
        AddOptions::default(),
    )
    .unwrap();
    set.add(
        set.open_bytes(signed("b1", "b", 1).as_slice()).unwrap(),
        AddOptions::default(),
    )
    .unwrap();
    set.rollback_edit("e-cb-0").unwrap();
    let s = set.snapshot();
    assert!(s.get("b1").unwrap().is_rolled_back("e-cb-0"));
    assert!(!s.get("a1").unwrap().is_rolled_back("e-cb-0"));
    set.rollback_edit("e-cb-0").unwrap();
    assert!(set.snapshot().get("a1").unwrap().is_rolled_back("e-cb-0"));
    assert_eq!(
        set.rollback_edit("e-cb-0"),
        Err(EditSetError::AlreadyRolledBack("e-cb-0".into()))
    );
}

/// Writes an unsigned sample bundle for CLI smoke tests (`amend sign/verify/inspect`).
#[test]
fn writes_unsigned_sample_for_cli() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let u = builder("sample", "main", 1, 1.0).build_unsigned().unwrap();
    let p = dir.join("sample.unsigned.amend");
    std::fs::write(&p, u.as_slice()).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), u.as_slice());
}

/// Regenerates the fuzz seed corpus (`AMEND_WRITE_FUZZ_SEEDS=1 cargo test ... seeds`): valid
/// bundles signed with key [1; 32] and their manifests.
#[test]
fn fuzz_seeds() {
    use amend_edits::bundle::{read_header, HEADER_LEN};
    let mut seeds = vec![signed("seed-a", "main", 1), signed("seed-b", "other", 7)];
    let mut small = amend_edits::bundle::BundleBuilder::new(meta("seed-c", "c", 2));
    let p = small.add_codebook(
        1,
        amend_edits::Site::ResidualOut,
        amend_edits::Site::ResidualOut,
        0,
        true,
        DIM,
        &ramp(DIM, 0.0),
        &ramp(DIM, 1.0),
        &[0.5],
    );
    small.add_edit("only", 1, amend_edits::Site::ResidualOut, "x", "y", p, 0, 1);
    seeds.push(small.build_signed(&key(1)).unwrap());
    for s in &seeds {
        // Every seed must be valid, or the fuzzer starts from nothing.
        amend_edits::Bundle::open(s.as_slice(), &trust()).unwrap();
    }
    if std::env::var_os("AMEND_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    for (i, s) in seeds.iter().enumerate() {
        let b = s.as_slice();
        std::fs::write(root.join(format!("bundle_reader/seed{i}.amend")), b).unwrap();
        let h = read_header(b).unwrap();
        let m = &b[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize];
        std::fs::write(root.join(format!("manifest_decoder/seed{i}.manifest")), m).unwrap();
    }
}
