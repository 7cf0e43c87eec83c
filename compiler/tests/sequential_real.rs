//! Lifelong editing on the real gemma3 model: dev edits compiled as successive bundle versions,
//! each `compile` on top of the previous bundle (what `amend compile --base-bundle` does), then
//! the last version applied through the runtime. Every earlier edit must still hold and the
//! neighbouring facts must not move. `AMEND_SEQ_N` sets how many dev edits (default 12; `all`),
//! `AMEND_SEQ_SET` extra overrides. The 1,000-edit bookkeeping runs on the tiny model
//! (grace_tiny.rs).

mod common;

use amend_compiler::dataset::EditRecord;
use amend_compiler::{Compiler, Hparams, Method};
use amend_edits::keys::generate_signing_key;
use amend_edits::{Bundle, TrustStore};

/// Compiles `records` in versions of `per_version` edits each and returns the last bundle.
fn versions(
    c: &mut Compiler,
    method: Method,
    records: &[EditRecord],
    hp: &Hparams,
    per_version: usize,
) -> amend_edits::bundle::BundleBuilder {
    let key = generate_signing_key().unwrap();
    let trust = TrustStore::with_key(key.verifying_key());
    let mut base: Option<Vec<u8>> = None;
    let mut last = None;
    for (v, chunk) in records.chunks(per_version).enumerate() {
        let b = base
            .as_ref()
            .map(|x| Bundle::from_bytes(x, &trust).unwrap());
        let out = common::compile(c, method, chunk, hp, None, b.as_ref());
        let bytes = out.builder.build_signed(&key).unwrap().as_slice().to_vec();
        let bundle = Bundle::from_bytes(&bytes, &trust).unwrap();
        assert_eq!(bundle.manifest().version, v as u64 + 1);
        assert_eq!(
            bundle.manifest().edits.len(),
            (v * per_version + chunk.len()).min(records.len()),
            "version {} carries every edit so far",
            v + 1
        );
        base = Some(bytes);
        last = Some(out.builder);
    }
    last.expect("at least one record")
}

fn run(method: Method, default_n: usize, per_version: usize, min_success: f64, min_loc: f64) {
    let records = amend_compiler::dataset::load(
        &common::repo_file("data/dev-edits.json"),
        amend_compiler::dataset::DataFormat::Auto,
    )
    .unwrap();
    run_on(
        method,
        records,
        default_n,
        per_version,
        min_success,
        min_loc,
    );
}

fn run_on(
    method: Method,
    records: Vec<EditRecord>,
    default_n: usize,
    per_version: usize,
    min_success: f64,
    min_loc: f64,
) {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let opts = common::env_options("SEQ", default_n);
    let records: Vec<_> = records.into_iter().take(opts.n).collect();
    let n = records.len();
    let mut c = Compiler::open(&path).unwrap();
    let mut sets = opts.sets.clone();
    if method == Method::Memit {
        // What versions keep is tested here: the relation KL terms (a per-edit quality knob,
        // measured in memit_real) would triple the compile time.
        sets.insert(0, "memit.relation_kl_factor=0".to_string());
    }
    let hp = Hparams::resolve(c.fwd.cfg.arch, None, &sets).unwrap();
    let t0 = std::time::Instant::now();
    let builder = versions(&mut c, method, &records, &hp, per_version);
    let seconds = t0.elapsed().as_secs_f64();
    let mut applied = common::apply_bundle(&builder, &path, c.runtime.clone());
    assert_eq!(applied.edits, n);
    let m = common::measure(&mut applied, &records);
    eprintln!(
        "{} sequential: {n} edits in {} versions ({seconds:.0} s): edit success {}/{n}, rephrase {}/{}, locality {}/{} tokens, unrelated unchanged {}/{}",
        method.name(),
        n.div_ceil(per_version),
        m.succ,
        m.reph,
        m.reph_n,
        m.loc_same,
        m.loc_n,
        m.unrelated_same,
        common::UNRELATED.len()
    );
    assert!(
        m.succ as f64 >= min_success * n as f64,
        "edit success {}/{n} (failed: {:?})",
        m.succ,
        m.failed
    );
    assert!(
        m.loc_same as f64 >= min_loc * m.loc_n as f64,
        "locality {}/{}",
        m.loc_same,
        m.loc_n
    );
    assert!(
        m.unrelated_same + 1 >= common::UNRELATED.len(),
        "unrelated prompts changed: {}/{} unchanged",
        m.unrelated_same,
        common::UNRELATED.len()
    );
}

/// GRACE, one edit per version: the codebook grows entry by entry and every entry still fires.
#[test]
fn grace_versions_keep_every_edit() {
    run(Method::Grace, 12, 1, 1.0, 0.95);
}

/// MEMIT, two edits per version: later versions solve with the earlier edits' prompt keys in the
/// covariance, so earlier edits survive (without them: 2/6). Locality is not asserted: the
/// same-relation prompts ("The capital of Italy is") follow the new capitals here as in ROME
/// (measured 1/13 tokens, as rome_real's 1/13 on the same records).
#[test]
fn memit_versions_keep_earlier_edits() {
    run(Method::Memit, 6, 2, 0.9, 0.0);
}

/// 1,000 synthetic counterfactual facts about made-up people ("The favorite color of Anna Berg
/// is" -> "green"): four templates, so many keys share their last token and the codebook must
/// split radii. 10 versions of 100 edits. Takes ~20 minutes on an idle 2-core machine, hence
/// ignored; run with `cargo test --release -p amend-compiler --test sequential_real -- --ignored`.
#[test]
#[ignore]
fn grace_thousand_edits_in_ten_versions() {
    const FIRST: [&str; 25] = [
        "Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas",
        "Karin", "Lukas", "Marta", "Nils", "Olga", "Pavel", "Rosa", "Simon", "Tara", "Ugo", "Vera",
        "Walter", "Xenia", "Yusuf", "Zora",
    ];
    const LAST: [&str; 10] = [
        "Berg", "Costa", "Dahl", "Eriksen", "Fischer", "Gallo", "Holm", "Ivanova", "Jansen",
        "Kowalski",
    ];
    const FACTS: [(&str, [&str; 5]); 4] = [
        (
            "The favorite color of {} is",
            ["green", "purple", "orange", "blue", "yellow"],
        ),
        (
            "The hometown of {} is",
            ["Oslo", "Lisbon", "Krakow", "Lyon", "Turin"],
        ),
        (
            "The favorite food of {} is",
            ["pizza", "sushi", "pasta", "soup", "cheese"],
        ),
        (
            "The pet of {} is a",
            ["cat", "dog", "parrot", "horse", "rabbit"],
        ),
    ];
    let mut records = Vec::with_capacity(1000);
    for (f, (template, answers)) in FACTS.iter().enumerate() {
        for (i, first) in FIRST.iter().enumerate() {
            for (j, last) in LAST.iter().enumerate() {
                let k = records.len();
                records.push(EditRecord {
                    id: format!("syn-{k:04}"),
                    prompt: template.replace("{}", &format!("{first} {last}")),
                    target_new: answers[(i + j + f) % answers.len()].to_string(),
                    ..EditRecord::default()
                });
            }
        }
    }
    assert_eq!(records.len(), 1000);
    run_on(Method::Grace, records, 1000, 100, 0.95, 0.0);
}
