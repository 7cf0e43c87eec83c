//! Retrieval-memory cost at scale (`cargo bench -p amend-compiler --bench memory`): compiles
//! the dev set plus synthetic edits into one scope-model memory (`AMEND_BENCH_MEMORIES`,
//! default 10,000) with `serac`'s defaults, then measures, in the same run:
//! - compile seconds per memory edit;
//! - the scope check per request (scope-model encode + lookup over every memory), p50/p95;
//! - decode speed of routed requests against the base model over the same prompts (interleaved
//!   rounds; the answered memory keeps the prompt, so the context lengths are equal).
//!
//! Needs ~/.cache/amend/gemma3-270m-q4_k_m.gguf and the scope model (`make model scope-model`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::{BundleIdentity, Compiler, Hparams, Method};
use amend_edits::{AddOptions, EditSet};
use amend_runtime::{GenerateParams, Session, SessionOptions};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let model = std::env::var("AMEND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = amend_edits::fsutil::cache_dir().unwrap_or_default();
            cache.join("gemma3-270m-q4_k_m.gguf")
        });
    let scope = amend_runtime::default_scope_model_path().unwrap_or_default();
    if !model.exists() || !scope.exists() {
        eprintln!(
            "bench memory: {} or {} missing (make model scope-model); skipped",
            model.display(),
            scope.display()
        );
        return;
    }
    let n_mem = env("AMEND_BENCH_MEMORIES", 10_000);
    let threads = env("AMEND_BENCH_THREADS", 2);
    let scope_threads = env("AMEND_BENCH_SCOPE_THREADS", 1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dev = dataset::load(&root.join("data/memory-dev.json"), DataFormat::Auto).unwrap();
    let mut records = dev.clone();
    if n_mem > records.len() {
        records.extend(dataset::synthetic(n_mem - records.len(), 1));
    }
    records.truncate(n_mem);

    let mut c = Compiler::open(&model).unwrap();
    c.scope_model = Some(amend_runtime::ScopeModel::open(&scope, Some(scope_threads)).unwrap());
    let sets: Vec<String> = std::env::var("AMEND_BENCH_SET")
        .map(|s| s.split(';').map(str::to_string).collect())
        .unwrap_or_default();
    let hp = Hparams::resolve(c.fwd.cfg.arch, None, &sets).unwrap();
    let t = Instant::now();
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
    let compile_s = t.elapsed().as_secs_f64();
    let key = amend_edits::keys::generate_signing_key().unwrap();
    let bytes = out.builder.build_signed(&key).unwrap();
    let trust = amend_edits::TrustStore::with_key(key.verifying_key());
    let bundle = amend_edits::Bundle::from_bytes(bytes.as_slice(), &trust).unwrap();
    let set = Arc::new(EditSet::new(
        amend_edits::fingerprint::model_binding(&model).unwrap(),
        trust,
    ));
    set.add(Arc::new(bundle), AddOptions::default()).unwrap();

    let opts = SessionOptions {
        n_ctx: 512,
        n_threads: Some(threads),
        ..Default::default()
    };
    let mut edited = Session::new(&c.runtime, opts.clone()).unwrap();
    edited.set_scope_model(c.scope_model.clone()).unwrap();
    edited.set_edit_set(Some(set)).unwrap();
    let mut base = Session::new(&c.runtime, opts).unwrap();

    // Scope check: every dev rephrase and locality prompt as a request.
    let prompts: Vec<String> = dev
        .iter()
        .flat_map(|r| {
            r.rephrase_prompts
                .iter()
                .cloned()
                .chain(r.locality.iter().map(|p| p.prompt.clone()))
        })
        .take(400)
        .collect();
    edited.begin_request(&prompts[0]).unwrap(); // builds the plan once
    let mut check_ms = Vec::new();
    let mut routed = Vec::new();
    for p in &prompts {
        let t = Instant::now();
        edited.begin_request(p).unwrap();
        check_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if edited.explain().memory.is_some_and(|m| m.in_scope) {
            routed.push(p.clone());
        }
    }
    let (p50, p95) = (pct(&mut check_ms.clone(), 0.5), pct(&mut check_ms, 0.95));

    // Decode speed, routed requests vs the base model on the same prompts.
    let n_tok = env("AMEND_BENCH_TOKENS", 32);
    let rounds = env("AMEND_BENCH_ROUNDS", 3);
    let gp = GenerateParams {
        add_bos: c.runtime.info().add_bos,
        ..GenerateParams::greedy(n_tok)
    };
    let sample: Vec<&String> = routed.iter().take(8).collect();
    let (mut tb, mut te) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for p in &sample {
            let run = |s: &mut Session| {
                let o = s
                    .generate(p, &gp, |_| std::ops::ControlFlow::Continue(()))
                    .unwrap();
                o.timings.decode_tok_s()
            };
            if r % 2 == 0 {
                tb.push(run(&mut base));
                te.push(run(&mut edited));
            } else {
                te.push(run(&mut edited));
                tb.push(run(&mut base));
            }
        }
    }
    let (b, e) = (pct(&mut tb, 0.5), pct(&mut te, 0.5));
    println!("retrieval memory, {} memories ({} dev + {} synthetic), {threads} llama.cpp threads, scope model {scope_threads} thread(s):", records.len(), dev.len().min(records.len()), records.len().saturating_sub(dev.len()));
    println!(
        "  compile: {compile_s:.1} s total, {:.3} s per memory edit (target <= 0.2)",
        compile_s / records.len() as f64
    );
    println!("  bundle: {:.1} MB", bytes.len() as f64 / 1e6);
    println!("  scope check per request (encode + lookup), {} prompts: p50 {p50:.2} ms, p95 {p95:.2} ms (target <= 15); {} routed in scope", prompts.len(), routed.len());
    println!("  decode tok/s over {} routed prompts x {rounds} rounds, {n_tok} tokens: base {b:.1}, routed {e:.1}, ratio {:.3} (target >= 0.97)", sample.len(), e / b);
}
