//! GRACE on the real gemma3 model: compile dev edits, apply the codebook on the runtime through
//! its hooks, and measure edit success (teacher-forced), locality and time per edit.
//! `AMEND_GRACE_N` sets how many dev edits (default 6; the full set is slow for `make test`;
//! `all` for every record), `AMEND_GRACE_LAYER` the layer, `AMEND_GRACE_SET` extra
//! `section.key=value` overrides separated by `;`.

mod common;

use amend_compiler::Method;
use amend_edits::families::{Codebook, Distance};
use amend_edits::{HookPoint, Site};
use amend_runtime::FnHook;
use std::sync::{Arc, Mutex};

#[test]
fn grace_edits_gemma3() {
    let Some(common::Compiled {
        records,
        compiler: c,
        out,
        ..
    }) = common::compile_dev("GRACE", 6, Method::Grace)
    else {
        return;
    };
    let n = records.len();
    let (bundle, _) = common::signed(&out.builder);
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
    let mut s = common::session(&rt);
    let mut base = common::session(&rt);
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
        succ += common::edit_succeeds(&rt, &mut s, r) as usize;
        for probe in &r.locality {
            let (same, n) = common::locality_tokens(&rt, &mut s, &mut base, probe);
            loc_same += same;
            loc_n += n;
        }
    }
    eprintln!(
        "GRACE gemma3 layer {layer}: {n} edits, edit success {succ}/{n} on the runtime (candle: {}), locality {loc_same}/{loc_n} tokens, median {:.2} s/edit, losses {:?}",
        common::trained_successes(&out.reports),
        common::median_seconds(&out.reports),
        out.reports.iter().map(|r| (r.loss * 1000.0).round() / 1000.0).collect::<Vec<_>>()
    );
    common::print_reports(&out.reports);
    assert!(succ as f64 >= 0.9 * n as f64, "edit success {succ}/{n}");
    assert!(
        loc_same as f64 >= 0.9 * loc_n as f64,
        "locality {loc_same}/{loc_n}"
    );
}
