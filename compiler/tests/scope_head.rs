//! The scope head: the shipped file parses and round-trips, damaged files and a head of another
//! scope model are refused by name; with the scope model present (skipped without it unless
//! AMEND_REQUIRE_MODEL=1), the shipped head is bound to the default scope model's fingerprint,
//! and training on a small labelled set writes a head that routes its out-of-fold probes at the
//! locality it was asked for.

mod common;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::methods::scope_head::{self, HeadFile, TrainOptions, BUILTIN};

#[test]
fn shipped_head_parses_round_trips_and_damage_is_refused() {
    let h = HeadFile::parse(BUILTIN).unwrap();
    assert_eq!((h.members, h.hidden, h.embed_dim), (4, 32, 384));
    assert!(h.threshold.is_finite());
    assert_eq!(HeadFile::parse(&h.to_bytes().unwrap()).unwrap(), h);
    let err = |b: &[u8]| HeadFile::parse(b).unwrap_err().to_string();
    assert!(err(&BUILTIN[..BUILTIN.len() - 1]).contains("not a safetensors file"));
    assert!(err(b"").contains("not a safetensors file"));
    // A NaN weight, a wrong weight shape, a bad fingerprint: each refused by what it is.
    let mut nan = h.clone();
    nan.weights[7] = f32::NAN;
    assert!(
        err(&nan.to_bytes().unwrap()).contains("non-finite weight"),
        "{}",
        err(&nan.to_bytes().unwrap())
    );
    let mut short = h.clone();
    short.hidden -= 1;
    assert!(err(&short.to_bytes().unwrap_or_default()).contains("scope head"));
    let text = String::from_utf8_lossy(BUILTIN).into_owned();
    let fp = amend_edits::keys::to_hex(&h.scope_fingerprint);
    assert!(text.contains(&fp));
    let at = text.find(&fp).unwrap();
    let mut bad_fp = BUILTIN.to_vec();
    bad_fp[at] = b'z';
    assert!(err(&bad_fp).contains("scope_fingerprint"));
    // "none" is no head; another scope model's fingerprint is refused with the way out.
    assert!(scope_head::load("none", [0; 32], 384).unwrap().is_none());
    let e = scope_head::load("builtin", [9; 32], 384)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("retrain") && e.contains("serac.scope_head"),
        "{e}"
    );
    let e = scope_head::load("/nonexistent/head.safetensors", h.scope_fingerprint, 384)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/head.safetensors"), "{e}");
}

#[test]
fn shipped_head_matches_the_scope_model_and_training_meets_its_target() {
    let Some(scope) = common::scope_model() else {
        return;
    };
    let h = HeadFile::parse(BUILTIN).unwrap();
    assert_eq!(
        h.scope_fingerprint,
        scope.fingerprint(),
        "data/scope-head.safetensors was trained on another scope model: retrain it (docs/methods.md)"
    );
    let records =
        dataset::load(&common::repo_file("data/memory-dev.json"), DataFormat::Auto).unwrap();
    let calibration: Vec<_> = records[40..60].to_vec();
    let records: Vec<_> = records.into_iter().take(40).collect();
    let o = TrainOptions {
        members: 1,
        hidden: 8,
        epochs: 5,
        folds: 4,
        target_locality: 95.0,
        ..Default::default()
    };
    let (head, rep) = scope_head::train(&scope, &records, &[], &o, &mut |_| {}).unwrap();
    eprintln!("{rep:?}");
    assert!(!rep.calibrated);
    assert!(rep.oof_locality >= 95.0, "{rep:?}");
    assert_eq!(head.scope_fingerprint, scope.fingerprint());
    assert_eq!(HeadFile::parse(&head.to_bytes().unwrap()).unwrap(), head);
    // On the pairs it was trained on, the head at its threshold routes rephrases home.
    let p = scope_head::pairs(&scope, &records).unwrap();
    let scores = scope_head::score_pairs(&head, &p).unwrap();
    let (reph, loc) = scope_head::route_rates(&p, &scores, head.threshold);
    eprintln!("training pairs: rephrase {reph:.1}, locality {loc:.1}");
    assert!(
        reph > 50.0 && loc >= 95.0,
        "rephrase {reph:.1}, locality {loc:.1}"
    );
    // Fewer records than folds: refused.
    let e = scope_head::train(&scope, &records[..2], &[], &o, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("a record per fold"), "{e}");
    // Calibrated on records it was not trained on: the threshold is the lowest at which those
    // records' locality probes meet the target, and the report gives their figures.
    let (head, rep) = scope_head::train(&scope, &records, &calibration, &o, &mut |_| {}).unwrap();
    eprintln!("calibrated: {rep:?}");
    assert!(rep.calibrated && rep.oof_locality >= 95.0, "{rep:?}");
    let c = scope_head::pairs(&scope, &calibration).unwrap();
    let scores = scope_head::score_pairs(&head, &c).unwrap();
    assert_eq!(
        scope_head::route_rates(&c, &scores, head.threshold),
        (rep.oof_rephrase, rep.oof_locality)
    );
    let below = scores
        .iter()
        .copied()
        .filter(|&s| s < head.threshold)
        .fold(f32::NEG_INFINITY, f32::max);
    assert!(
        scope_head::route_rates(&c, &scores, below).1 < 95.0,
        "a lower threshold also met the target: not the lowest"
    );
}
