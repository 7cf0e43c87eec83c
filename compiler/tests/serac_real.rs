//! SERAC on the real gemma3 model: compile dev edits into a memory bundle, attach it to a
//! runtime session and check the routing: the edit prompts and their rephrases are in scope
//! (the counterfactual prompt is used), locality prompts are not. `AMEND_SERAC_N` sets how
//! many dev edits (default 8; `all` for every record), `AMEND_SERAC_SET` `;`-separated
//! `serac.key=value` overrides.

mod common;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::{BundleIdentity, Compiler, Hparams, Method};
use amend_edits::bundle::Bundle;
use amend_edits::keys::generate_signing_key;
use amend_edits::{AddOptions, EditSet, TrustStore};
use amend_runtime::{Session, SessionOptions};
use std::sync::Arc;

#[test]
fn serac_routes_rephrases_not_locality_gemma3() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let common::EnvOptions { n, sets, .. } = common::env_options("SERAC", 8);
    let records =
        dataset::load(&common::repo_file("data/dev-edits.json"), DataFormat::Auto).unwrap();
    let records: Vec<_> = records.into_iter().take(n).collect();
    let n = records.len();
    let mut c = Compiler::open(&path).unwrap();
    let hp = Hparams::resolve(c.fwd.cfg.arch, None, &sets).unwrap();
    let t0 = std::time::Instant::now();
    let out = c
        .compile(
            Method::Serac,
            &records,
            &hp,
            None,
            None,
            &BundleIdentity::default(),
            &mut |_| {},
        )
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cal = out
        .calibration
        .clone()
        .expect("serac reports its calibration");
    assert!(out.gguf_lora.is_none());

    let key = generate_signing_key().unwrap();
    let bytes = out.builder.build_signed(&key).unwrap();
    let set = Arc::new(EditSet::new(
        amend_edits::fingerprint::model_binding(&path).unwrap(),
        TrustStore::with_key(key.verifying_key()),
    ));
    let bundle = Bundle::from_bytes(bytes.as_slice(), set.trust()).unwrap();
    assert_eq!(bundle.manifest().edits.len(), n);
    set.add(Arc::new(bundle), AddOptions::default()).unwrap();
    let mut s = Session::new(
        &c.runtime,
        SessionOptions {
            n_ctx: 512,
            ..Default::default()
        },
    )
    .unwrap();
    s.set_edit_set(Some(set)).unwrap();

    let mut routed = |q: &str| -> (bool, Option<String>, String) {
        s.begin_request(q).unwrap();
        let m = s
            .explain()
            .memory
            .expect("a memory event for every request");
        (m.in_scope, m.edit_id, m.routed_prompt)
    };
    let (mut edit_in, mut reph_in, mut reph_n, mut loc_out, mut loc_n) = (0, 0, 0, 0, 0);
    for r in &records {
        let (in_scope, id, prompt) = routed(&r.prompt);
        if in_scope && id.as_deref() == Some(r.id.as_str()) {
            edit_in += 1;
            assert!(
                prompt.contains(r.target_new.trim()),
                "routed prompt {prompt:?}"
            );
        }
        for q in &r.rephrase_prompts {
            reph_n += 1;
            let (in_scope, id, _) = routed(q);
            reph_in += (in_scope && id.as_deref() == Some(r.id.as_str())) as usize;
        }
        for p in &r.locality {
            loc_n += 1;
            let (in_scope, _, prompt) = routed(&p.prompt);
            if !in_scope {
                loc_out += 1;
                assert_eq!(prompt, p.prompt, "out of scope runs the prompt as is");
            }
        }
    }
    eprintln!(
        "SERAC gemma3 layer {}: {n} edits in {secs:.1}s, threshold {:.4} (separable {}; calibration rephrases in {:?}, locality out {:?}); runtime: edit prompts in scope {edit_in}/{n}, rephrases routed to their edit {reph_in}/{reph_n}, locality out of scope {loc_out}/{loc_n}",
        hp.serac.layer, cal.threshold, cal.separable, cal.rephrases_in, cal.locality_out
    );
    assert_eq!(edit_in, n, "every edit prompt routes to its own memory");
    // Base-model embeddings barely separate a rephrase from the same template with another
    // subject ("The capital of Italy is"); measured 5/11 rephrases in, 15/16 locality out.
    assert!(
        reph_in as f64 >= 0.3 * reph_n as f64,
        "rephrases {reph_in}/{reph_n}"
    );
    assert!(
        loc_out as f64 >= 0.8 * loc_n as f64,
        "locality {loc_out}/{loc_n}"
    );
    // The runtime routes as the compiler calibrated (same embedder, same threshold).
    assert_eq!(
        loc_out, cal.locality_out.0,
        "locality routing differs from calibration"
    );
    assert!(
        reph_in.abs_diff(cal.rephrases_in.0) <= 1,
        "rephrase routing differs from calibration: {reph_in} vs {:?}",
        cal.rephrases_in
    );
}
