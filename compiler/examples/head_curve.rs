//! How well a scope model and head separate, on one labelled set (issue 16; docs/eval.md "A
//! larger tune, its head calibrated apart"): the head alone (no relation groups) routes every
//! probe among the set's records; prints rephrases routed home and locality probes kept out at
//! the head's own threshold, and the rephrase rate at the lowest threshold that reaches each of
//! several locality levels on this set. That threshold is chosen on the scored set, so those
//! rows compare models; they are not a result. Usage: head_curve SCOPE.gguf HEAD.safetensors DATA.json
use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::methods::scope_head::{self, HeadFile};
use amend_runtime::ScopeModel;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scope = ScopeModel::open(&args[1], Some(2)).unwrap();
    let head = HeadFile::parse(&std::fs::read(&args[2]).unwrap()).unwrap();
    let records = dataset::load(args[3].as_ref(), DataFormat::Auto).unwrap();
    let p = scope_head::pairs(&scope, &records).unwrap();
    let scores = scope_head::score_pairs(&head, &p).unwrap();
    let (r, l) = scope_head::route_rates(&p, &scores, head.threshold);
    println!(
        "{}: at the head's threshold {:.3}: rephrase {r:.1}, locality {l:.1}",
        args[3], head.threshold
    );
    for target in [97.0, 98.0, 98.5, 99.0, 99.5] {
        match scope_head::lowest_threshold(&p, &scores, target) {
            Ok(t) => {
                let (r, l) = scope_head::route_rates(&p, &scores, t);
                println!(
                    "  locality >= {target}: threshold {t:.3}, rephrase {r:.1}, locality {l:.1}"
                );
            }
            Err(e) => println!("  locality >= {target}: {e}"),
        }
    }
}
