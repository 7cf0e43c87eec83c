//! MEMIT's margin loop on the real gemma3 model: with a covariance weight heavy enough that the
//! batch's solve leaves edits short of their targets, `memit.margin_rounds` weights those edits
//! up and solves the batch again, and they end closer to their targets than without the loop
//! (with the averaged key, and with `memit.margin_own_key`).

mod common;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::{Compiler, Hparams, Method};

#[test]
fn margin_rounds_weight_up_the_edits_the_solve_leaves_short() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let records = dataset::load(&common::repo_file("data/dev-edits.json"), DataFormat::Auto)
        .unwrap()
        .into_iter()
        .take(3)
        .collect::<Vec<_>>();
    let mut c = Compiler::open(&path).unwrap();
    let arch = c.fwd.cfg.arch;
    // Few neighbours and v* steps keep it quick; the heavy covariance is what leaves edits short.
    let hp_with = |rounds: &str, own_key: &str| {
        let sets = [
            "memit.neighbours=2",
            "memit.steps=12",
            "memit.mom2_weight=5000.0",
            rounds,
            own_key,
        ]
        .map(String::from);
        Hparams::resolve(arch, None, &sets).unwrap()
    };
    let hp = |rounds: &str| hp_with(rounds, "memit.margin_own_key=false");
    let without = common::compile(
        &mut c,
        Method::Memit,
        &records,
        &hp("memit.margin_rounds=0"),
        None,
        None,
    );
    let with = common::compile(
        &mut c,
        Method::Memit,
        &records,
        &hp("memit.margin_rounds=2"),
        None,
        None,
    );
    let margin = hp("memit.margin_rounds=0").memit.margin_nll;
    let mut weighted = 0;
    for (a, b) in without.reports.iter().zip(&with.reports) {
        eprintln!(
            "{}: loss {:.3} ({}) -> {:.3} ({}); {}",
            a.id, a.loss, a.success, b.loss, b.success, b.action
        );
        assert!(!a.action.contains("weighted"), "{}", a.action);
        // A mean NLL above the margin means some token's is: that edit must be weighted up.
        if a.loss > margin || !a.success {
            assert!(b.action.contains("weighted"), "{}: {}", b.id, b.action);
        }
        if b.action.contains("weighted") {
            weighted += 1;
            assert!(b.loss < a.loss, "{}: {} -> {}", a.id, a.loss, b.loss);
        }
    }
    assert!(
        weighted >= 1,
        "the heavy covariance left no edit short; raise mom2_weight"
    );
    // `memit.margin_own_key`: a weighted edit's key is its own prompt's; the check is on that
    // prompt; the weighted edits end closer to their targets than without the loop here too.
    let own = common::compile(
        &mut c,
        Method::Memit,
        &records,
        &hp_with("memit.margin_rounds=2", "memit.margin_own_key=true"),
        None,
        None,
    );
    for (a, b) in without.reports.iter().zip(&own.reports) {
        eprintln!(
            "own key {}: loss {:.3} -> {:.3}; {}",
            a.id, a.loss, b.loss, b.action
        );
        if b.action.contains("weighted") {
            assert!(b.loss < a.loss, "{}: {} -> {}", a.id, a.loss, b.loss);
        }
    }
}
