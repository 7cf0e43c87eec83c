//! `rome.shrink_nll` and `memit.shrink_nll` on the real gemma3 model: the value delta v* found is
//! scaled down to the smallest fraction that still carries the edit with the margin, and the
//! edit then sits between v*'s own loss and that margin.

mod common;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::{Compiler, Hparams, Method};

#[test]
fn shrink_keeps_the_smallest_update_that_meets_the_margin() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let records = dataset::load(&common::repo_file("data/dev-edits.json"), DataFormat::Auto)
        .unwrap()
        .into_iter()
        .take(1)
        .collect::<Vec<_>>();
    let mut c = Compiler::open(&path).unwrap();
    let arch = c.fwd.cfg.arch;
    for (method, section) in [(Method::Rome, "rome"), (Method::Memit, "memit")] {
        // Few neighbours keep it quick; one edit, so the final check is the edit's own.
        let hp = |shrink: &str| {
            let sets = [
                format!("{section}.neighbours=2"),
                format!("{section}.shrink_nll={shrink}"),
            ];
            Hparams::resolve(arch, None, &sets).unwrap()
        };
        let full = common::compile(&mut c, method, &records, &hp("0.0"), None, None);
        let shrunk = common::compile(&mut c, method, &records, &hp("0.693"), None, None);
        let (a, b) = (&full.reports[0], &shrunk.reports[0]);
        eprintln!(
            "{section} {}: loss {:.3} ({}) -> {:.3} ({}); {}",
            a.id, a.loss, a.success, b.loss, b.success, b.action
        );
        assert!(a.success && !a.action.contains("scaled"), "{}", a.action);
        // v* stops below stop_loss (0.05) and overshoots: a fraction of it meets ln 2.
        let tag = if method == Method::Rome {
            "value scaled "
        } else {
            "v* scaled "
        };
        let s: f32 = b
            .action
            .split(tag)
            .nth(1)
            .and_then(|t| t.split([',', ')']).next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no fraction in {:?}", b.action));
        assert!(s > 0.0 && s < 1.0, "fraction {s}");
        assert!(b.success, "the shrunk edit still reaches its target");
        assert!(b.loss > a.loss, "{} -> {}", a.loss, b.loss);
        if method == Method::Rome {
            // ROME checks the rank-one update itself against the margin (mean <= worst token).
            assert!(b.loss <= 0.693, "loss {}", b.loss);
        }
    }
}
