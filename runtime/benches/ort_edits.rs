//! The cost of edits on the ONNX Runtime backend (issue 14), against the ORT base graph in the
//! same run (gemma3-270m Q4_K_M, CPU EP): the graph with edit slots and nothing fed (the
//! always-paid cost of the slots), 1,000 codebook entries + 1,000 patch neurons, 100,000
//! codebook entries, rank-1 and rank-8 low-rank deltas. Decode and prefill tokens/s.
//!
//! `cargo bench -p amend-runtime --bench ort_edits` (env: AMEND_MODEL, AMEND_BENCH_ROUNDS,
//! AMEND_BENCH_TOKENS, AMEND_BENCH_THREADS; AMEND_ORT_EP=openvino for the OpenVINO EP).

mod common;

use std::sync::Arc;
use std::time::Instant;

use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::EditSet;
use amend_runtime::onnxruntime::{self as ortb, Ep, OrtModel, OrtOptions, OrtSession, SlotLayout};
use common::*;

fn main() {
    let path = std::env::var("AMEND_MODEL").unwrap_or_else(|_| {
        let cache = amend_edits::fsutil::cache_dir().unwrap_or_default();
        cache.join("gemma3-270m-q4_k_m.gguf").display().to_string()
    });
    let ep = Ep::parse(&std::env::var("AMEND_ORT_EP").unwrap_or_else(|_| "cpu".into())).unwrap();
    if !std::path::Path::new(&path).exists() || !ortb::default_library(&ep).exists() {
        eprintln!("bench ort_edits: model {path} or the ONNX Runtime library missing (make model ort); skipped");
        return;
    }
    let threads = env("AMEND_BENCH_THREADS", 1);
    let rounds = env("AMEND_BENCH_ROUNDS", 5);
    let n_tok = env("AMEND_BENCH_TOKENS", 64);
    let binding = amend_edits::fingerprint::model_binding(&path).unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let mut rng = Rng(1);
    let t = Instant::now();
    let sets: Vec<(&str, Option<Arc<EditSet>>, &str)> = vec![
        ("slots, nothing fed", None, ">= 0.97"),
        (
            "1,000 codebook + 1,000 neurons",
            Some(set_of(
                &binding,
                &key,
                &codebook(&binding, &mut rng, 1000, 1000),
            )),
            ">= 0.97",
        ),
        (
            "100,000 codebook entries",
            Some(set_of(
                &binding,
                &key,
                &codebook(&binding, &mut rng, 100_000, 0),
            )),
            ">= 0.90",
        ),
        (
            "low-rank rank 1",
            Some(set_of(&binding, &key, &low_rank(&binding, &mut rng, 1))),
            ">= 0.95",
        ),
        (
            "low-rank rank 8",
            Some(set_of(&binding, &key, &low_rank(&binding, &mut rng, 8))),
            ">= 0.95",
        ),
    ];
    let mut layout = SlotLayout::default();
    for (_, set, _) in &sets {
        if let Some(s) = set {
            layout.merge(
                &SlotLayout::for_bundles(s.snapshot().bundles.iter().map(|b| &*b.bundle)).unwrap(),
            );
        }
    }
    let open = |slots: SlotLayout| {
        OrtModel::open(
            &path,
            OrtOptions {
                ep: ep.clone(),
                n_threads: Some(threads),
                slots,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let base = open(SlotLayout::default());
    let slotted = open(layout.clone());
    eprintln!(
        "bundles and graphs in {:.1} s (slots {}); {rounds} rounds x {n_tok} tokens, {threads} thread(s), {}",
        t.elapsed().as_secs_f64(),
        layout.describe(),
        ep.name()
    );
    let mut sessions: Vec<OrtSession> = vec![OrtSession::new(&base, 512).unwrap()];
    for (_, set, _) in &sets {
        let mut s = OrtSession::new(&slotted, 512).unwrap();
        s.set_edit_set(set.clone()).unwrap();
        sessions.push(s);
    }
    let prompt = "The history of the printing press begins in";
    for s in sessions.iter_mut() {
        timings(s, prompt, 8);
    }
    let mut prefill: Vec<Vec<f64>> = vec![Vec::new(); sessions.len()];
    let mut decode: Vec<Vec<f64>> = vec![Vec::new(); sessions.len()];
    for r in 0..rounds {
        for k in 0..sessions.len() {
            let i = (k + r) % sessions.len();
            let (p, d) = timings(&mut sessions[i], prompt, n_tok);
            prefill[i].push(p);
            decode[i].push(d);
        }
    }
    let (bp, bd) = (median(prefill[0].clone()), median(decode[0].clone()));
    println!(
        "ONNX Runtime ({}): tokens/s (median of {rounds}), ratio to the ORT base graph in the same run:",
        ep.name()
    );
    println!(
        "{:<34} {:>10} {:>8} {:>10} {:>8}  decode target",
        "variant", "decode", "ratio", "prefill", "ratio"
    );
    println!(
        "{:<34} {:>10.1} {:>8.3} {:>10.1} {:>8.3}",
        "ORT base graph", bd, 1.0, bp, 1.0
    );
    for (i, (name, _, target)) in sets.iter().enumerate() {
        let (p, d) = (
            median(prefill[i + 1].clone()),
            median(decode[i + 1].clone()),
        );
        println!(
            "{:<34} {:>10.1} {:>8.3} {:>10.1} {:>8.3}  {target}",
            name,
            d,
            d / bd,
            p,
            p / bp
        );
    }
}
