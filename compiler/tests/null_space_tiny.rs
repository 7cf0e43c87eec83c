//! AlphaEdit's null-space constraint on the tiny model: every rank-one term ROME and MEMIT write
//! with `null_space = true` lies in the null space of the corpus keys' second moment (so the
//! corpus's inputs pass the edited projection unchanged), and without it they do not. One test:
//! it sets `AMEND_CACHE` for the process.

mod common;

use amend_compiler::dataset::EditRecord;
use amend_compiler::methods::corpus::{second_moments, NullSpace};
use amend_compiler::{Compiler, Hparams, Method};
use amend_edits::bundle::LowRankTensorView;
use amend_runtime::Architecture;

fn record(i: usize, subject: &str, prompt: &str, target: &str) -> EditRecord {
    EditRecord {
        id: format!("n{i}"),
        prompt: prompt.to_string(),
        subject: Some(subject.to_string()),
        target_new: target.to_string(),
        ..EditRecord::default()
    }
}

/// The largest `‖a − P a‖ / ‖a‖` over the update directions `a` of every rank-one term.
fn worst_outside(c: &Compiler, out: amend_compiler::CompileOutput, threshold: f64) -> f64 {
    let (bundle, _) = common::signed(&out.builder);
    let mut worst = 0.0f64;
    for p in 0..bundle.payloads().len() {
        let views = bundle.low_rank(p, |_| true).unwrap();
        let lr = LowRankTensorView::to_family(&views).unwrap();
        for t in lr.tensors() {
            let layer: usize = t.name.split('.').nth(1).unwrap().parse().unwrap();
            let m = second_moments(c, "neutral", 2000, &[layer]).unwrap();
            let ns = NullSpace::of(&m[0], threshold).unwrap();
            assert!(ns.dim > 0 && ns.dim < t.n_in);
            for a in t.a.chunks_exact(t.n_in) {
                let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
                let pa = ns.project(&a);
                let out: f64 = a.iter().zip(&pa).map(|(x, y)| (x - y).powi(2)).sum();
                let all: f64 = a.iter().map(|x| x * x).sum();
                worst = worst.max((out / all).sqrt());
            }
        }
    }
    worst
}

#[test]
fn null_space_updates_lie_in_the_null_space() {
    let cache = common::tmp_dir().join("null-space-cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::env::set_var("AMEND_CACHE", &cache);
    let path = common::tiny_path(Architecture::Llama);
    let mut c = Compiler::open(&path).unwrap();
    let records = vec![
        record(0, "France", "The capital of France is", "Berlin"),
        record(1, "Italy", "The capital of Italy is", "Paris"),
        record(2, "Toyota", "Toyota was founded in", "Japan"),
    ];
    let arch = c.fwd.cfg.arch;
    let sets = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "rome.corpus=\"neutral\"",
            "rome.corpus_tokens=2000",
            "rome.steps=3",
            "memit.corpus=\"neutral\"",
            "memit.corpus_tokens=2000",
            "memit.steps=3",
            "memit.layers=[0, 1]",
            "rome.layer=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        Hparams::resolve(arch, None, &v).unwrap()
    };
    for (method, section) in [(Method::Memit, "memit"), (Method::Rome, "rome")] {
        let on = format!("{section}.null_space=true");
        let thr = format!("{section}.null_space_threshold=0.3");
        let hp = sets(&[&on, &thr]);
        let out = common::compile(&mut c, method, &records, &hp, None, None);
        let worst = worst_outside(&c, out, 0.3);
        assert!(
            worst < 1e-3,
            "{section} null space: {worst} of a direction outside"
        );
        let hp = sets(&[]);
        let out = common::compile(&mut c, method, &records, &hp, None, None);
        let worst = worst_outside(&c, out, 0.3);
        assert!(
            worst > 0.1,
            "{section} without the null space: only {worst} outside"
        );
        eprintln!("{section}: without the null space {worst:.3} of a direction lies outside it");
    }
    // A threshold that leaves no null space is refused by name.
    let hp = sets(&["memit.null_space=true", "memit.null_space_threshold=1e-9"]);
    let err = c
        .compile(
            Method::Memit,
            &records,
            &hp,
            None,
            None,
            &Default::default(),
            &mut |_| {},
        )
        .err()
        .expect("empty null space");
    assert!(err.to_string().contains("null_space_threshold"), "{err}");

    // A record whose subject is not in its prompt is refused before any training, unless the
    // user asks for the last prompt token as its key.
    let mut misspelt = records.clone();
    misspelt[2].subject = Some("Toyotaa".into());
    for (method, section) in [(Method::Memit, "memit"), (Method::Rome, "rome")] {
        let err = c
            .compile(
                method,
                &misspelt,
                &sets(&[]),
                None,
                None,
                &Default::default(),
                &mut |_| panic!("{section}: trained before refusing the record"),
            )
            .err()
            .expect("subject not in the prompt");
        assert!(
            matches!(
                err,
                amend_compiler::CompileError::BadRecord { index: 2, .. }
            ) && err.to_string().contains("\"Toyotaa\" does not occur"),
            "{err}"
        );
        let allow = format!("{section}.allow_missing_subject=true");
        common::compile(&mut c, method, &misspelt, &sets(&[&allow]), None, None);
    }
}
