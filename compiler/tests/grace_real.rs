//! GRACE on the real gemma3 model: compile dev edits, apply the codebook on the runtime through
//! its hooks, and measure edit success (teacher-forced), locality and time per edit.
//! `AMEND_GRACE_N` sets how many dev edits (default 6; the full set is slow for `make test`).

mod common;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::eval::{prompt_answer_tokens, teacher_forced_argmax};
use amend_compiler::methods::median;
use amend_compiler::{BundleIdentity, Compiler, Hparams, Method};
use amend_edits::bundle::Bundle;
use amend_edits::families::{Codebook, Distance};
use amend_edits::keys::generate_signing_key;
use amend_edits::{HookPoint, Site, TrustStore};
use amend_runtime::{FnHook, Session, SessionOptions};
use std::sync::{Arc, Mutex};

#[test]
fn grace_edits_gemma3() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let n: usize = std::env::var("AMEND_GRACE_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let records =
        dataset::load(&common::repo_file("data/dev-edits.json"), DataFormat::Auto).unwrap();
    let records: Vec<_> = records.into_iter().take(n).collect();
    let n = records.len();
    let mut c = Compiler::open(&path).unwrap();
    let hp = Hparams::resolve(c.fwd.cfg.arch, None, &[]).unwrap();
    let out = c
        .compile(
            Method::Grace,
            &records,
            &hp,
            None,
            None,
            &BundleIdentity::default(),
            &mut |_| {},
        )
        .unwrap();
    let key = generate_signing_key().unwrap();
    let bytes = out.builder.build_signed(&key).unwrap();
    let bundle =
        Bundle::from_bytes(bytes.as_slice(), &TrustStore::with_key(key.verifying_key())).unwrap();
    let view = bundle.codebook(0, 0..bundle.units(0)).unwrap();
    let layer = view.layer;
    let (keys, values, radii) = (
        view.keys.to_vec(),
        view.values.to_vec(),
        view.radii.to_vec(),
    );
    let dim = view.dim;

    // Apply the codebook on the runtime: remember the key row, replace the FFN output row.
    let rt = c.runtime.clone();
    let mut s = Session::new(
        &rt,
        SessionOptions {
            n_ctx: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let mut base = Session::new(
        &rt,
        SessionOptions {
            n_ctx: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let key_row: Arc<Mutex<Option<Vec<f32>>>> = Arc::default();
    let k2 = key_row.clone();
    let hits = Arc::new(Mutex::new(0usize));
    let h2 = hits.clone();
    s.add_hook(Box::new(FnHook::new(
        vec![
            HookPoint::new(layer, Site::FfnInput),
            HookPoint::new(layer, Site::FfnOutput),
        ],
        move |p, rows| {
            let Some(r) = rows.last_prompt_row() else {
                return;
            };
            if p.site == Site::FfnInput {
                *k2.lock().unwrap() = Some(rows.row(r).to_vec());
            } else if let Some(k) = k2.lock().unwrap().take() {
                let cb = Codebook::new(
                    layer,
                    Site::FfnInput,
                    Site::FfnOutput,
                    dim,
                    &keys,
                    &values,
                    &radii,
                    Distance::NormalizedEuclidean,
                    false,
                )
                .unwrap();
                if cb
                    .apply(&k, rows.row_mut(r))
                    .is_some_and(|h| h.within_radius)
                {
                    *h2.lock().unwrap() += 1;
                }
            }
        },
    )))
    .unwrap();

    let (mut succ, mut loc_same, mut loc_n) = (0usize, 0usize, 0usize);
    for r in &records {
        let (p, a) = prompt_answer_tokens(&rt, &r.prompt, &r.target_new).unwrap();
        let got = teacher_forced_argmax(&mut s, &p, &a).unwrap();
        let ok = got == a;
        succ += ok as usize;
        for probe in &r.locality {
            let (p, a) = prompt_answer_tokens(&rt, &probe.prompt, &probe.ground_truth).unwrap();
            let before = teacher_forced_argmax(&mut base, &p, &a).unwrap();
            let after = teacher_forced_argmax(&mut s, &p, &a).unwrap();
            loc_n += before.len();
            loc_same += before.iter().zip(&after).filter(|(x, y)| x == y).count();
        }
    }
    let times: Vec<f64> = out.reports.iter().map(|r| r.seconds).collect();
    eprintln!(
        "GRACE gemma3 layer {layer}: {n} edits, edit success {succ}/{n} on the runtime (candle: {}), locality {loc_same}/{loc_n} tokens, median {:.2} s/edit, losses {:?}",
        out.reports.iter().filter(|r| r.success).count(),
        median(&times),
        out.reports.iter().map(|r| (r.loss * 1000.0).round() / 1000.0).collect::<Vec<_>>()
    );
    for r in &out.reports {
        eprintln!(
            "  {} {} steps {} loss {:.3} {:.2}s",
            r.id, r.action, r.steps, r.loss, r.seconds
        );
    }
    assert!(succ as f64 >= 0.9 * n as f64, "edit success {succ}/{n}");
    assert!(
        loc_same as f64 >= 0.9 * loc_n as f64,
        "locality {loc_same}/{loc_n}"
    );
}
