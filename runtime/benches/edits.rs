//! Decode speed with edit sets applied, against the base model in the same run (gemma3-270m
//! Q4_K_M): 1,000 codebook entries + 1,000 patch neurons, 100,000 codebook entries, rank-1 and
//! rank-8 low-rank deltas; and the memory scope check at 10,000 memories.
//!
//! `cargo bench -p amend-runtime --bench edits` (env: AMEND_MODEL, AMEND_BENCH_ROUNDS,
//! AMEND_BENCH_TOKENS, AMEND_BENCH_THREADS).

use std::sync::Arc;
use std::time::Instant;

use amend_edits::bundle::{BundleBuilder, EmbedderDesc, MemoryRecordDesc};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::families::{Embedder, Memory, MemoryRecord, Pooling};
use amend_edits::{EditSet, Site};
use amend_runtime::{Model, ModelOptions, Session, SessionOptions};

mod common;

use common::*;

fn main() {
    let path = std::env::var("AMEND_MODEL").unwrap_or_else(|_| {
        let cache = amend_edits::fsutil::cache_dir().unwrap_or_default();
        cache.join("gemma3-270m-q4_k_m.gguf").display().to_string()
    });
    if !std::path::Path::new(&path).exists() {
        eprintln!("bench edits: model {path} missing (run `make model`); skipped");
        return;
    }
    let threads = env(
        "AMEND_BENCH_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );
    let rounds = env("AMEND_BENCH_ROUNDS", 5);
    let n_tok = env("AMEND_BENCH_TOKENS", 64);
    let model = Model::open(
        &path,
        ModelOptions {
            n_threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap();
    let binding = amend_edits::fingerprint::model_binding(&path).unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let mut rng = Rng(1);

    let t = Instant::now();
    let variants: Vec<(&str, Option<Arc<EditSet>>)> = vec![
        ("base model (no edit set)", None),
        (
            "1,000 codebook + 1,000 neurons",
            Some(set_of(
                &binding,
                &key,
                &codebook(&binding, &mut rng, 1000, 1000),
            )),
        ),
        (
            "100,000 codebook entries",
            Some(set_of(
                &binding,
                &key,
                &codebook(&binding, &mut rng, 100_000, 0),
            )),
        ),
        (
            "low-rank rank 1",
            Some(set_of(&binding, &key, &low_rank(&binding, &mut rng, 1))),
        ),
        (
            "low-rank rank 8",
            Some(set_of(&binding, &key, &low_rank(&binding, &mut rng, 8))),
        ),
    ];
    eprintln!(
        "built bundles in {:.1} s; {rounds} rounds x {n_tok} tokens, {threads} threads",
        t.elapsed().as_secs_f64()
    );

    let mut sessions: Vec<Session> = variants
        .iter()
        .map(|(_, set)| {
            let mut s = Session::new(
                &model,
                SessionOptions {
                    n_ctx: 512,
                    n_threads: Some(threads),
                    ..Default::default()
                },
            )
            .unwrap();
            s.set_edit_set(set.clone()).unwrap();
            s
        })
        .collect();
    let prompt = "The history of the printing press begins in";
    // Warm-up (also builds each plan once: hooks, adapters).
    for s in sessions.iter_mut() {
        decode_tok_s(s, prompt, 8);
    }
    let mut speeds: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for r in 0..rounds {
        // Rotate the order each round so drift in machine load spreads over all variants.
        for k in 0..variants.len() {
            let i = (k + r) % variants.len();
            speeds[i].push(decode_tok_s(&mut sessions[i], prompt, n_tok));
        }
    }
    let base = median(speeds[0].clone());
    println!("decode tokens/s (median of {rounds}), ratio to the base model in the same run:");
    println!("{:<34} {:>10} {:>8}  target", "variant", "tok/s", "ratio");
    let targets = ["", ">= 0.97", ">= 0.90", ">= 0.90", ">= 0.90"];
    for (i, (name, _)) in variants.iter().enumerate() {
        let m = median(speeds[i].clone());
        println!("{:<34} {:>10.1} {:>8.3}  {}", name, m, m / base, targets[i]);
    }

    // Memory scope check: nearest of 10,000 memories (f16 first pass + exact rescoring), and the
    // whole check including the base-model embedding pass of a short prompt.
    let n_mem = 10_000;
    let emb = rng.unit_rows(n_mem);
    let names: Vec<String> = (0..n_mem).map(|i| format!("m{i}")).collect();
    let records: Vec<MemoryRecord<'_>> = names
        .iter()
        .map(|n| MemoryRecord {
            edit_id: n,
            prompt: "p",
            target: "t",
            text: "x",
        })
        .collect();
    let mem = Memory::new(
        D,
        &emb,
        0.9,
        records,
        "{edit}\n{prompt}",
        Embedder::BaseModel {
            layer: 14,
            site: Site::FfnInput,
            pooling: Pooling::Last,
        },
    )
    .unwrap()
    .with_f16_index();
    let q = rng.unit_rows(1);
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(mem.nearest(&q, None));
    }
    let nearest_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;

    let mut b = BundleBuilder::new(meta(&binding, "mem"));
    let recs: Vec<MemoryRecordDesc> = (0..n_mem)
        .map(|i| MemoryRecordDesc {
            edit_id: format!("m{i}"),
            prompt: "p".into(),
            target: " t".into(),
            text: "x".into(),
        })
        .collect();
    let p = b.add_memory(
        D,
        &emb,
        0.9,
        "{edit}\n{prompt}",
        EmbedderDesc::BaseModel {
            layer: 14,
            site: Site::FfnInput.code(),
            pooling: Pooling::Last.code(),
        },
        recs,
    );
    b.add_edit("mem", 14, Site::FfnInput, "p", " t", p, 0, n_mem as u32);
    let set = set_of(&binding, &key, &b);
    let mut s = Session::new(
        &model,
        SessionOptions {
            n_ctx: 512,
            n_threads: Some(threads),
            ..Default::default()
        },
    )
    .unwrap();
    s.set_edit_set(Some(set)).unwrap();
    s.begin_request(prompt).unwrap(); // builds the plan once
    let t = Instant::now();
    for _ in 0..20 {
        s.begin_request(prompt).unwrap();
    }
    let request_ms = t.elapsed().as_secs_f64() * 1e3 / 20.0;
    println!("memory scope check, 10,000 memories: nearest {nearest_ms:.3} ms (target <= 1 ms); whole check incl. embedding pass of a {}-token prompt {request_ms:.2} ms",
        model.tokenize(prompt, true).unwrap().len());
}
