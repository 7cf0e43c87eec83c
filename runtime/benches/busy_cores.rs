//! What other work on the device does to amend's two llama.cpp models, by thread count, in one
//! run: the scope model's encode (the scope check of every request to a memory bundle) and the
//! base model's decode. ggml's worker threads spin at a barrier after every graph node, so when
//! another process takes a core, the workers left running spin until the descheduled one gets
//! its next timeslice, node after node. A phone app shares its cores like that all the time.
//!
//! `cargo bench -p amend-runtime --bench busy_cores` (env: AMEND_MODEL, AMEND_SCOPE_MODEL;
//! AMEND_BENCH_BUSY, the spinning threads that stand in for other work, default the machine's
//! available parallelism; AMEND_BENCH_CAP_S, the seconds one case may take before it is cut,
//! default 20). Prints, for 1 and 2 threads, quiet and busy: encode ms per prompt (p50 / p95)
//! and decode tok/s, and the busy / quiet ratio.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amend_runtime::{GenerateParams, Model, ModelOptions, ScopeModel, Session, SessionOptions};

mod common;

use common::env;

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Which river flows through Phnom Penh?",
    "Who wrote the novel Moby-Dick?",
    "The mother tongue of Danielle Darrieux is",
    "In which country is Mount Fuji found?",
    "What is the name of the world where the film Avatar is set?",
    "Since 2015, Google has been a subsidiary of the company",
    "The lead guitarist of The Rolling Stones is",
];

/// `n` threads spinning until dropped: other apps keeping the cores busy.
struct Busy {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start(n: usize) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Encode ms per prompt (p50, p95, prompts encoded before the cap).
fn encode_ms(scope: &ScopeModel, cap: Duration) -> (f64, f64, usize) {
    let start = Instant::now();
    let mut ms = Vec::new();
    'outer: for _ in 0..4 {
        for p in PROMPTS {
            let t = Instant::now();
            scope.encode(p).unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            if start.elapsed() > cap {
                break 'outer;
            }
        }
    }
    let n = ms.len();
    (pct(&mut ms, 0.5), pct(&mut ms, 0.95), n)
}

/// Decode tok/s of a greedy run (cut at the cap), tokens decoded.
fn decode_tok_s(session: &mut Session, tokens: usize, cap: Duration) -> (f64, usize) {
    let start = Instant::now();
    let out = session
        .generate(PROMPTS[0], &GenerateParams::greedy(tokens), |_| {
            if start.elapsed() > cap {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    (out.timings.decode_tok_s(), out.timings.n_decoded)
}

fn main() {
    let model_path = std::env::var("AMEND_MODEL").unwrap_or_else(|_| {
        let cache = amend_edits::fsutil::cache_dir().unwrap_or_default();
        cache.join("gemma3-270m-q4_k_m.gguf").display().to_string()
    });
    let scope_path = amend_runtime::default_scope_model_path().unwrap_or_default();
    if !std::path::Path::new(&model_path).exists() || !scope_path.exists() {
        eprintln!(
            "bench busy_cores: {model_path} or {} missing (make model scope-model); skipped",
            scope_path.display()
        );
        return;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let busy_n = env("AMEND_BENCH_BUSY", cores);
    let cap = Duration::from_secs(env("AMEND_BENCH_CAP_S", 20) as u64);
    let tokens = env("AMEND_BENCH_TOKENS", 32);
    let model = Model::open(&model_path, ModelOptions::default()).unwrap();
    println!(
        "busy cores: {cores} cores, {busy_n} spinning threads as other work; each case cut after {} s",
        cap.as_secs()
    );
    println!(
        "{:<28} {:>9} {:>22} {:>22} {:>8}",
        "", "threads", "quiet", "busy", "busy/quiet"
    );
    for threads in [1usize, 2] {
        let scope = ScopeModel::open(&scope_path, Some(threads)).unwrap();
        scope.encode(PROMPTS[0]).unwrap();
        let q = encode_ms(&scope, cap);
        let b = {
            let _busy = Busy::start(busy_n);
            encode_ms(&scope, cap)
        };
        println!(
            "{:<28} {:>9} {:>8.2} / {:>6.2} ms ({:>2}) {:>8.2} / {:>6.2} ms ({:>2}) {:>9.1}x",
            "scope encode p50 / p95 (n)",
            threads,
            q.0,
            q.1,
            q.2,
            b.0,
            b.1,
            b.2,
            b.0 / q.0
        );
    }
    for threads in [1usize, 2] {
        let mut session = Session::new(
            &model,
            SessionOptions {
                n_threads: Some(threads),
                ..Default::default()
            },
        )
        .unwrap();
        decode_tok_s(&mut session, 4, cap);
        let q = decode_tok_s(&mut session, tokens, cap);
        let b = {
            let _busy = Busy::start(busy_n);
            decode_tok_s(&mut session, tokens, cap)
        };
        println!(
            "{:<28} {:>9} {:>13.1} tok/s ({:>2}) {:>13.1} tok/s ({:>2}) {:>9.3}x",
            "base decode tok/s (tokens)",
            threads,
            q.0,
            q.1,
            b.0,
            b.1,
            b.0 / q.0
        );
    }
}
