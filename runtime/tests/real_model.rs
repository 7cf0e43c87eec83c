//! Tests on the default real model (gemma3-270m Q4_K_M). Skipped with a message when the model
//! is missing, unless AMEND_REQUIRE_MODEL=1 (`make test`), which makes a missing model fail.
mod common;

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use amend_runtime::reference::{argmax, RawContext};
use amend_runtime::*;

fn cont(_: &TokenEvent<'_>) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn session(m: &Arc<Model>) -> Session {
    // One thread each: tests run in parallel on few cores, and ggml's spinning thread pools
    // slow each other down badly when oversubscribed.
    Session::new(
        m,
        SessionOptions {
            n_ctx: 512,
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn info_matches_gemma3_270m() {
    let Some(m) = common::real_model() else {
        return;
    };
    let i = m.info();
    if i.architecture != Architecture::Gemma3 {
        eprintln!("skipped: AMEND_MODEL is not gemma3");
        return;
    }
    assert_eq!(
        (i.n_layer, i.n_embd, i.n_ff, i.n_vocab),
        (18, 640, 2048, 262_144)
    );
    assert_eq!(i.quantization, "Q4_K - Medium");
    assert_eq!((i.bos, i.eos), (Some(2), Some(1)));
}

#[test]
fn greedy_is_deterministic_and_equals_plain_llama_cpp() {
    let Some(m) = common::real_model() else {
        return;
    };
    let prompt = m.tokenize("The capital of France is", true).unwrap();
    let mut raw = RawContext::new(&m, 512, 512, 1).unwrap();
    let (expected, _) = raw.greedy(&prompt, 24).unwrap();
    let mut s = session(&m);
    let p = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(24)
    };
    let a = s.generate_tokens(&prompt, &p, cont).unwrap();
    assert_eq!(
        a.tokens, expected,
        "amend greedy differs from plain llama.cpp greedy"
    );
    let b = s.generate_tokens(&prompt, &p, cont).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, b.text);
    assert!(a.text.starts_with(" the capital"), "{:?}", a.text);
}

#[test]
fn observe_only_hooks_leave_all_logits_bitwise_identical() {
    let Some(m) = common::real_model() else {
        return;
    };
    let toks = m.tokenize("Water is made of hydrogen and", true).unwrap();
    let mut s = session(&m);
    s.prefill(&toks, Logits::All).unwrap();
    let base: Vec<Vec<f32>> = (0..toks.len())
        .map(|i| s.logits(i).unwrap().to_vec())
        .collect();
    let n_layer = m.info().n_layer;
    let points: Vec<HookPoint> = (0..n_layer)
        .flat_map(|l| Site::ALL.map(|s| HookPoint::new(l, s)))
        .filter(|p| m.node_name(*p).is_ok())
        .collect();
    let calls = Arc::new(Mutex::new(0usize));
    let c2 = calls.clone();
    s.add_hook(Box::new(FnHook::new(points.clone(), move |_, rows| {
        let norm: f32 = (0..rows.n_rows())
            .map(|i| rows.row(i).iter().map(|x| x * x).sum::<f32>())
            .sum();
        std::hint::black_box(norm);
        *c2.lock().unwrap() += 1;
    })))
    .unwrap();
    s.kv_clear();
    s.prefill(&toks, Logits::All).unwrap();
    assert_eq!(*calls.lock().unwrap(), points.len());
    for (i, b) in base.iter().enumerate() {
        assert!(
            s.logits(i).unwrap() == &b[..],
            "logits changed at position {i}"
        );
    }
    // And through generation.
    s.clear_hooks();
    let p = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(12)
    };
    let plain = s
        .generate("Water is made of hydrogen and", &p, cont)
        .unwrap();
    s.add_hook(Box::new(FnHook::new(points, |_, rows| {
        std::hint::black_box(rows.row(0)[0]);
    })))
    .unwrap();
    let hooked = s
        .generate("Water is made of hydrogen and", &p, cont)
        .unwrap();
    assert_eq!(plain.tokens, hooked.tokens);
    assert!(plain.text.starts_with(" oxygen"), "{:?}", plain.text);
}

#[test]
fn every_gemma3_site_is_found_on_every_layer() {
    let Some(m) = common::real_model() else {
        return;
    };
    if m.architecture() != Architecture::Gemma3 {
        return;
    }
    let points: Vec<HookPoint> = (0..18)
        .flat_map(|l| Site::ALL.map(|s| HookPoint::new(l, s)))
        .filter(|p| p.site != Site::Embeddings || p.layer == 0)
        .collect();
    assert_eq!(points.len(), 18 * 4 + 1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let mut s = session(&m);
    s.add_hook(Box::new(FnHook::new(points.clone(), move |p, rows| {
        s2.lock()
            .unwrap()
            .push((p, rows.n_rows(), rows.only_output_rows()));
    })))
    .unwrap();
    let toks = m.tokenize("The capital of France is", true).unwrap();
    s.prefill(&toks, Logits::Last).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), points.len(), "every point called exactly once");
    for &(p, n_rows, only_out) in seen.iter() {
        // gemma3 prunes to output rows right after attention on the last layer.
        let pruned = p.layer == 17 && p.site != Site::Embeddings;
        assert_eq!(
            (n_rows, only_out),
            (if pruned { 1 } else { toks.len() }, pruned),
            "{p}"
        );
    }
    assert!(matches!(
        s.add_hook(Box::new(FnHook::new(
            vec![HookPoint::new(18, Site::ResidualOut)],
            |_, _| {}
        ))),
        Err(RuntimeError::LayerOutOfRange { n_layer: 18, .. })
    ));
}

/// Records prompt A's last-row ResidualOut at `layer`, then replaces prompt B's with it.
fn transplant(
    m: &Arc<Model>,
    s: &mut Session,
    a: &str,
    b: &str,
    layer: u32,
    n: usize,
) -> (GenerateOutput, GenerateOutput) {
    let p = HookPoint::new(layer, Site::ResidualOut);
    let captured = Arc::new(Mutex::new(None::<Vec<f32>>));
    let c2 = captured.clone();
    let id = s
        .add_hook(Box::new(FnHook::new(vec![p], move |_, rows| {
            if rows.phase() == Phase::Prefill {
                if let Some(r) = rows.last_prompt_row() {
                    *c2.lock().unwrap() = Some(rows.row(r).to_vec());
                }
            }
        })))
        .unwrap();
    let params = GenerateParams::greedy(n);
    let out_a = s.generate(a, &params, cont).unwrap();
    s.remove_hook(id).unwrap();
    let value = captured.lock().unwrap().clone().expect("captured A's row");
    assert_eq!(value.len(), m.info().n_embd as usize);
    let id = s
        .add_hook(Box::new(FnHook::new(vec![p], move |_, rows| {
            if rows.phase() == Phase::Prefill {
                if let Some(r) = rows.last_prompt_row() {
                    rows.row_mut(r).copy_from_slice(&value);
                }
            }
        })))
        .unwrap();
    let out_b = s.generate(b, &params, cont).unwrap();
    s.remove_hook(id).unwrap();
    (out_a, out_b)
}

#[test]
fn transplanting_the_last_residual_row_moves_the_answer() {
    let Some(m) = common::real_model() else {
        return;
    };
    if m.architecture() != Architecture::Gemma3 {
        return;
    }
    let mut s = session(&m);
    let g = GenerateParams::greedy(6);
    // Baselines without hooks.
    let germany = s.generate("The capital of Germany is", &g, cont).unwrap();
    let berlin = s.generate("Berlin is the capital of", &g, cont).unwrap();
    let rome = s.generate("Rome is the capital of", &g, cont).unwrap();
    assert!(berlin.text.starts_with(" Germany"), "{:?}", berlin.text);
    assert!(!germany.text.contains("Paris"), "{:?}", germany.text);

    // Next token of B becomes A's next token (" France"), at a middle-upper layer.
    for layer in [12, 14] {
        let (a, b) = transplant(
            &m,
            &mut s,
            "Paris is the capital of",
            "Berlin is the capital of",
            layer,
            6,
        );
        assert!(a.text.starts_with(" France"), "{:?}", a.text);
        assert_eq!(
            b.tokens[0], a.tokens[0],
            "layer {layer}: B answered {:?}, A {:?}",
            b.text, a.text
        );
    }
    // "The capital of Germany is" now answers with Paris.
    let (_, b) = transplant(
        &m,
        &mut s,
        "The capital of France is",
        "The capital of Germany is",
        14,
        6,
    );
    assert!(b.text.contains("Paris"), "{:?}", b.text);
    assert_ne!(b.tokens, germany.tokens);

    // Hooks removed: prompts run unchanged, bitwise the same continuation as before.
    assert_eq!(s.n_hooks(), 0);
    assert_eq!(
        s.generate("Rome is the capital of", &g, cont)
            .unwrap()
            .tokens,
        rome.tokens
    );
    assert_eq!(
        s.generate("The capital of Germany is", &g, cont)
            .unwrap()
            .tokens,
        germany.tokens
    );
    // An early layer barely matters for the answer (the fact is read later).
    let (_, early) = transplant(
        &m,
        &mut s,
        "Paris is the capital of",
        "Berlin is the capital of",
        2,
        6,
    );
    assert_eq!(early.tokens[0], berlin.tokens[0]);
}

#[test]
fn teacher_forced_logits_match_plain_llama_cpp_and_stepwise_decode() {
    let Some(m) = common::real_model() else {
        return;
    };
    let mut s = session(&m);
    let prompt = m.tokenize("The capital of France is", true).unwrap();
    let target = m.tokenize(" Paris, the city of light", false).unwrap();
    let mut all = prompt.clone();
    all.extend_from_slice(&target);
    // One pass, logits at every target position: bitwise what plain llama.cpp computes.
    s.prefill(&all, Logits::From(prompt.len() - 1)).unwrap();
    let mut raw = RawContext::new(&m, 512, 512, 1).unwrap();
    let reference = raw.all_logits(&all).unwrap();
    for (i, row) in reference.iter().enumerate().skip(prompt.len() - 1) {
        assert!(
            s.logits(i).unwrap() == &row[..],
            "position {i} differs from llama.cpp"
        );
    }
    let forced: Vec<Vec<f32>> = (prompt.len() - 1..all.len())
        .map(|i| s.logits(i).unwrap().to_vec())
        .collect();
    // Step by step: the same up to llama.cpp kernel differences between batch and single-token
    // matmuls (measured up to ~6% of the logit scale on Q4_K_M).
    s.kv_clear();
    s.prefill(&prompt, Logits::Last).unwrap();
    let mut stepped = vec![s.last_logits().unwrap().to_vec()];
    for &t in &target {
        s.decode(t).unwrap();
        stepped.push(s.last_logits().unwrap().to_vec());
    }
    for (i, (f, st)) in forced.iter().zip(&stepped).enumerate() {
        let max = f
            .iter()
            .zip(st)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = f.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            max < 0.1 * scale,
            "target position {i}: max diff {max} (logit scale {scale})"
        );
        // Where the top choice is clear, both agree on it.
        let mut sorted = f.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 2.0 * max {
            assert_eq!(argmax(f), argmax(st), "target position {i}");
        }
    }
}

#[test]
fn two_sessions_on_two_threads_match_serial() {
    let Some(m) = common::real_model() else {
        return;
    };
    let prompts = ["The capital of France is", "Water is made of hydrogen and"];
    let p = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(12)
    };
    let threads = Some(1);
    let mk = || {
        Session::new(
            &m,
            SessionOptions {
                n_ctx: 256,
                n_threads: threads,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let serial: Vec<_> = prompts
        .iter()
        .map(|pr| mk().generate(pr, &p, cont).unwrap().tokens)
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|pr| {
            let mut s = mk();
            let (p, pr) = (p.clone(), pr.to_string());
            std::thread::spawn(move || s.generate(&pr, &p, cont).unwrap().tokens)
        })
        .collect();
    for (h, expected) in handles.into_iter().zip(&serial) {
        assert_eq!(&h.join().unwrap(), expected);
    }
}

#[test]
fn cancellation_stops_within_one_token() {
    let Some(m) = common::real_model() else {
        return;
    };
    let mut s = session(&m);
    let handle = s.cancel_handle();
    let t0 = std::time::Instant::now();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        handle.cancel();
        std::time::Instant::now()
    });
    let mut last_token_at = None;
    let out = s
        .generate(
            "Once upon a time",
            &GenerateParams {
                ignore_eos: true,
                ..GenerateParams::greedy(400)
            },
            |_| {
                last_token_at = Some(std::time::Instant::now());
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    let cancelled_at = canceller.join().unwrap();
    let stopped_at = std::time::Instant::now();
    assert_eq!(out.stop_reason, StopReason::Cancelled);
    assert!(out.n_generated < 400);
    // At most one token was produced after the cancel request.
    let after = last_token_at.is_some_and(|t| t > cancelled_at);
    let per_token = out.timings.decode.as_secs_f64() / out.n_generated.max(1) as f64;
    assert!(
        (stopped_at - cancelled_at).as_secs_f64() < 3.0 * per_token + 0.05,
        "stopped {:?} after cancel (per token {per_token:.4}s, token after cancel: {after})",
        stopped_at - cancelled_at
    );
    assert!(t0.elapsed().as_secs_f64() < 10.0);
}

#[test]
fn cancellation_interrupts_a_long_prefill() {
    let Some(m) = common::real_model() else {
        return;
    };
    let mut s = session(&m);
    let body = m
        .tokenize(" The quick brown fox jumps over the lazy dog.", false)
        .unwrap();
    let mut prompt = m.tokenize("Story:", true).unwrap();
    while prompt.len() < 480 {
        prompt.extend_from_slice(&body);
    }
    let handle = s.cancel_handle();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        handle.cancel();
        std::time::Instant::now()
    });
    let out = s
        .generate_tokens(&prompt, &GenerateParams::greedy(8), cont)
        .unwrap();
    let stopped = std::time::Instant::now();
    let cancelled_at = canceller.join().unwrap();
    assert_eq!(out.stop_reason, StopReason::Cancelled);
    assert_eq!(out.n_generated, 0, "cancelled during the prefill");
    // llama.cpp's abort callback is checked between graph nodes: far sooner than the prefill.
    assert!(
        stopped
            .saturating_duration_since(cancelled_at)
            .as_secs_f64()
            < 2.0,
        "took {:?} to stop",
        stopped.saturating_duration_since(cancelled_at)
    );
    // The session is usable afterwards.
    let again = s
        .generate("The capital of France is", &GenerateParams::greedy(3), cont)
        .unwrap();
    assert_eq!(again.stop_reason, StopReason::MaxTokens);
}
