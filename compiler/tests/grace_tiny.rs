//! GRACE on the tiny llama model: sequential editing (1,000 edits over 10 bundle versions),
//! codebook splitting, and bad input (layer out of range, empty target, unsupported
//! architecture) failing with specific errors.

mod common;

use amend_compiler::dataset::EditRecord;
use amend_compiler::{BundleIdentity, CompileError, Compiler, Hparams, Method};
use amend_edits::bundle::{Bundle, Payload};
use amend_edits::keys::generate_signing_key;
use amend_edits::TrustStore;
use amend_runtime::Architecture;

fn record(i: usize, prompt: &str, target: &str) -> EditRecord {
    EditRecord {
        id: format!("e{i}"),
        id_from_index: false,
        prompt: prompt.to_string(),
        subject: None,
        subject_aliases: vec![],
        target_new: target.to_string(),
        ground_truth: None,
        rephrase_prompts: vec![],
        locality: vec![],
        portability: vec![],
    }
}

#[test]
fn thousand_sequential_edits_make_versions() {
    let path = common::tiny_path(Architecture::Llama);
    let mut c = Compiler::open(&path).unwrap();
    // One cheap step per edit: this checks the bookkeeping, not the training.
    let hp = Hparams::resolve(c.fwd.cfg.arch, None, &["grace.steps=1".into()]).unwrap();
    let key = generate_signing_key().unwrap();
    let trust = TrustStore::with_key(key.verifying_key());
    let subjects = ["France", "Germany", "Italy", "hello", "water", "world"];
    let targets = ["Paris", "Berlin", "Rome", "oxygen"];
    let mut base: Option<Vec<u8>> = None;
    let mut n = 0;
    for round in 0..10 {
        let records: Vec<EditRecord> = (0..100)
            .map(|j| {
                let i = round * 100 + j;
                let prompt = format!("The capital of {} {i} is", subjects[i % subjects.len()]);
                record(i, &prompt, targets[(i / 7) % targets.len()])
            })
            .collect();
        let b = base
            .as_ref()
            .map(|bytes| Bundle::from_bytes(bytes, &trust).unwrap());
        let out = common::compile(&mut c, Method::Grace, &records, &hp, None, b.as_ref());
        n += records.len();
        assert_eq!(out.reports.len(), 100);
        let bytes = out.builder.build_signed(&key).unwrap().as_slice().to_vec();
        let bundle = Bundle::from_bytes(&bytes, &trust).unwrap();
        assert_eq!(bundle.manifest().version, round as u64 + 1);
        assert_eq!(bundle.manifest().edits.len(), n);
        let rows = bundle.units(0);
        assert!(rows >= 1 && rows <= n, "{rows} rows for {n} edits");
        let Payload::Codebook(d) = &bundle.payloads()[0] else {
            panic!("not a codebook")
        };
        assert_eq!(
            d.layer, 1,
            "default layer clamps to the last of the tiny model's 2"
        );
        // Every edit points at a real row.
        assert!(bundle
            .manifest()
            .edits
            .iter()
            .all(|e| (e.first as usize) < rows));
        base = Some(bytes);
    }
}

#[test]
fn conflicting_edits_split_radii() {
    let path = common::tiny_path(Architecture::Llama);
    let mut c = Compiler::open(&path).unwrap();
    // A large radius puts every key within reach of the first, forcing splits.
    let hp = Hparams::resolve(
        c.fwd.cfg.arch,
        None,
        &["grace.steps=1".into(), "grace.radius=2.0".into()],
    )
    .unwrap();
    let records = vec![
        record(0, "The capital of France is", "Paris"),
        record(1, "The capital of Germany is", "Berlin"),
        record(2, "The capital of France is", "Paris"),
    ];
    let out = common::compile(&mut c, Method::Grace, &records, &hp, None, None);
    assert_eq!(out.reports[0].action, "added");
    assert!(
        out.reports[1].action.starts_with("split"),
        "{}",
        out.reports[1].action
    );
    assert!(
        out.reports[2].action.starts_with("duplicate of row 0"),
        "{}",
        out.reports[2].action
    );
}

#[test]
fn bad_input_is_named_and_nothing_is_built() {
    let path = common::tiny_path(Architecture::Llama);
    let mut c = Compiler::open(&path).unwrap();
    let hp = Hparams::resolve(c.fwd.cfg.arch, None, &[]).unwrap();
    let id = BundleIdentity::default();
    let ok = record(0, "The capital of France is", "Paris");
    let e = c
        .compile(
            Method::Grace,
            std::slice::from_ref(&ok),
            &hp,
            Some(2),
            None,
            &id,
            &mut |_| {},
        )
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            CompileError::LayerOutOfRange {
                layer: 2,
                n_layer: 2
            }
        ),
        "{e}"
    );
    let empty = record(1, "The capital of Italy is", "  ");
    let e = c
        .compile(
            Method::Grace,
            &[ok, empty],
            &hp,
            None,
            None,
            &id,
            &mut |_| {},
        )
        .err()
        .unwrap();
    assert!(matches!(e, CompileError::BadRecord { index: 1, .. }), "{e}");
    assert!(e.to_string().contains("empty target"), "{e}");
}

#[test]
fn unsupported_architecture_is_named() {
    let p = common::tmp_dir().join("phi.gguf");
    let mut w = amend_edits::gguf::GgufWriter::new();
    w.add("general.architecture", "phi3");
    w.add_tensor_f32("token_embd.weight", &[4, 4], &[0.0; 16])
        .unwrap();
    w.write_to(&p).unwrap();
    let e = Compiler::open(&p).err().unwrap();
    assert!(
        matches!(e, CompileError::UnsupportedArchitecture { ref arch, .. } if arch == "phi3"),
        "{e}"
    );
    assert!(e.to_string().contains("gemma3, llama, qwen2, qwen3"), "{e}");
}
