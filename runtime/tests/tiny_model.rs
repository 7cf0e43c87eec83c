//! Runtime tests on the tiny random-weight models (milliseconds each).
mod common;

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use amend_runtime::reference::RawContext;
use amend_runtime::testutil::{TINY_N_EMBD, TINY_N_LAYER};
use amend_runtime::*;

fn cont(_: &TokenEvent<'_>) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn session(m: &Arc<Model>) -> Session {
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

/// Every hookable point of the tiny model of `arch`.
fn all_points(m: &Model) -> Vec<HookPoint> {
    (0..m.info().n_layer)
        .flat_map(|l| Site::ALL.map(|s| HookPoint::new(l, s)))
        .filter(|p| m.node_name(*p).is_ok())
        .collect()
}

const PROMPT: &str = "The capital of France is";

#[test]
fn info_and_tokenizer() {
    let m = common::tiny(Architecture::Llama);
    let i = m.info();
    assert_eq!(i.architecture, Architecture::Llama);
    assert_eq!(
        (i.n_layer, i.n_embd, i.n_ff),
        (TINY_N_LAYER, TINY_N_EMBD, 128)
    );
    assert_eq!(
        i.n_vocab,
        3 + 256 + amend_runtime::testutil::TINY_WORDS.len() as u32
    );
    assert_eq!(i.quantization, "all F32");
    assert!(i.add_bos);
    let with = m.tokenize(PROMPT, true).unwrap();
    let without = m.tokenize(PROMPT, false).unwrap();
    assert_eq!(with[0], 1, "BOS first");
    assert_eq!(&with[1..], &without[..]);
    // Round trip, including characters only reachable through byte-fallback tokens.
    let text = "hello é 😀 world";
    let toks = m.tokenize(text, false).unwrap();
    assert_eq!(m.detokenize(&toks).unwrap().trim_start(), text);
    // Streaming: the emoji is 4 byte tokens; no partial character may be emitted.
    let mut d = Detokenizer::new();
    let mut streamed = String::new();
    for &t in &toks {
        let piece = d.push(&m.token_bytes(t).unwrap());
        assert!(!piece.contains('\u{FFFD}'), "partial UTF-8 emitted");
        streamed.push_str(&piece);
    }
    streamed.push_str(&d.finish());
    assert_eq!(streamed.trim_start(), text);
    assert!(matches!(
        m.token_bytes(100_000),
        Err(RuntimeError::InvalidToken { .. })
    ));
}

#[test]
fn chunked_eval_matches_single_batch_and_reference() {
    let m = common::tiny(Architecture::Llama);
    let toks = m
        .tokenize("hello world and the water is made of hydrogen", true)
        .unwrap();
    assert!(toks.len() > 20);
    let mut raw = RawContext::new(&m, 512, 512, 1).unwrap();
    let reference = raw.all_logits(&toks).unwrap();
    let mut s = session(&m);
    s.prefill(&toks, Logits::All).unwrap();
    for (i, r) in reference.iter().enumerate() {
        assert_eq!(
            s.logits(i).unwrap(),
            &r[..],
            "position {i} differs from plain llama.cpp"
        );
    }
    // Chunks of 4 (logits of earlier chunks are copied out before the next overwrites them).
    let mut small = Session::new(
        &m,
        SessionOptions {
            n_ctx: 512,
            n_ubatch: 4,
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    small.prefill(&toks, Logits::All).unwrap();
    for (i, r) in reference.iter().enumerate() {
        let got = small.logits(i).unwrap();
        let max = got
            .iter()
            .zip(r)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-3, "chunked position {i}: max diff {max}");
    }
    // Logits::From / Last only expose what was asked for.
    s.kv_clear();
    s.prefill(&toks, Logits::From(toks.len() - 3)).unwrap();
    assert!(s.logits(0).is_err());
    same_rows(
        s.logits(toks.len() - 3).unwrap(),
        &reference[toks.len() - 3],
        "Logits::From",
    );
    same_rows(s.last_logits().unwrap(), &reference[toks.len() - 1], "last");
    assert!(s.logits(toks.len()).is_err());
}

/// The logits of a batch that asks for fewer output rows against those of the batch asking for
/// all. Bitwise on x86-64. aarch64 ggml picks the output projection's kernel by the number of
/// rows, so its sums run in another order there (measured under qemu, docs/targets.md): there
/// the rows must agree to 1e-4 and pick the same token.
fn same_rows(got: &[f32], want: &[f32], what: &str) {
    if cfg!(target_arch = "x86_64") {
        assert_eq!(got, want, "{what}: not bitwise the all-rows batch");
        return;
    }
    assert_eq!(got.len(), want.len());
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    assert!(max < 1e-4, "{what}: max diff {max} from the all-rows batch");
    assert_eq!(argmax(got), argmax(want), "{what}: another token");
}

#[test]
fn kv_truncate_and_clear() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let a = m.tokenize("hello world", true).unwrap();
    let b = m.tokenize(" and the water", false).unwrap();
    s.prefill(&a, Logits::None).unwrap();
    s.prefill(&b, Logits::All).unwrap();
    let first: Vec<Vec<f32>> = (0..b.len())
        .map(|i| s.logits(i).unwrap().to_vec())
        .collect();
    assert_eq!(s.n_past(), a.len() + b.len());
    s.kv_truncate(a.len()).unwrap();
    assert_eq!(s.n_past(), a.len());
    s.prefill(&b, Logits::All).unwrap();
    for (i, f) in first.iter().enumerate() {
        assert_eq!(
            s.logits(i).unwrap(),
            &f[..],
            "re-evaluated suffix differs at {i}"
        );
    }
    s.kv_clear();
    assert_eq!(s.n_past(), 0);
    assert!(matches!(
        s.prefill(&[], Logits::All),
        Err(RuntimeError::EmptyInput)
    ));
    assert!(matches!(
        s.prefill(&[9999], Logits::All),
        Err(RuntimeError::InvalidToken { .. })
    ));
    let long = vec![5; 600];
    assert!(matches!(
        s.prefill(&long, Logits::Last),
        Err(RuntimeError::ContextFull { .. })
    ));
}

#[test]
fn greedy_equals_plain_llama_cpp() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let m = common::tiny(arch);
        let prompt = m.tokenize(PROMPT, true).unwrap();
        let mut raw = RawContext::new(&m, 512, 512, 1).unwrap();
        let (expected, _) = raw.greedy(&prompt, 40).unwrap();
        let mut s = session(&m);
        let p = GenerateParams {
            ignore_eos: true,
            ..GenerateParams::greedy(40)
        };
        let a = s.generate_tokens(&prompt, &p, cont).unwrap();
        assert_eq!(
            a.tokens, expected,
            "{arch}: amend greedy != llama.cpp greedy"
        );
        let b = s.generate_tokens(&prompt, &p, cont).unwrap();
        assert_eq!(
            a,
            GenerateOutput {
                timings: a.timings,
                ..b.clone()
            },
            "{arch}: not deterministic"
        );
        assert_eq!(a.n_prompt, prompt.len());
        assert_eq!(a.n_generated, 40);
        assert_eq!(a.stop_reason, StopReason::MaxTokens);
    }
}

#[test]
fn observe_only_hooks_leave_logits_bitwise_identical() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let m = common::tiny(arch);
        let toks = m.tokenize(PROMPT, true).unwrap();
        let mut s = session(&m);
        s.prefill(&toks, Logits::All).unwrap();
        let base: Vec<Vec<f32>> = (0..toks.len())
            .map(|i| s.logits(i).unwrap().to_vec())
            .collect();
        let seen = Arc::new(Mutex::new(0usize));
        let seen2 = seen.clone();
        s.add_hook(Box::new(FnHook::new(all_points(&m), move |_, rows| {
            let mut sum = 0.0f32;
            for i in 0..rows.n_rows() {
                sum += rows.row(i).iter().sum::<f32>();
            }
            std::hint::black_box(sum);
            *seen2.lock().unwrap() += 1;
        })))
        .unwrap();
        s.kv_clear();
        s.prefill(&toks, Logits::All).unwrap();
        assert!(*seen.lock().unwrap() >= all_points(&m).len());
        for (i, b) in base.iter().enumerate() {
            assert_eq!(
                s.logits(i).unwrap(),
                &b[..],
                "{arch}: logits changed at {i}"
            );
        }
    }
}

/// Each site of each llama-family architecture maps to a node that exists, is called once per
/// decode with the right rows (all rows, or only output rows on the last layer) and the right
/// metadata.
#[test]
fn site_names_resolve_on_every_llama_family_arch() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let m = common::tiny(arch);
        let points = all_points(&m);
        // llama: all but Embeddings; qwen: no Embeddings, no AttnOutput.
        let expected_sites = if arch == Architecture::Llama { 4 } else { 3 };
        assert_eq!(
            points.len(),
            expected_sites * TINY_N_LAYER as usize,
            "{arch}"
        );
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let mut s = session(&m);
        s.add_hook(Box::new(FnHook::new(points.clone(), move |p, rows| {
            let infos: Vec<RowInfo> = (0..rows.n_rows()).map(|i| rows.info(i)).collect();
            log2.lock().unwrap().push((
                p,
                rows.node_name().to_string(),
                rows.phase(),
                rows.only_output_rows(),
                infos,
            ));
        })))
        .unwrap();
        let toks = m.tokenize(PROMPT, true).unwrap();
        let n = toks.len();
        s.prefill(&toks, Logits::Last).unwrap();
        let calls = std::mem::take(&mut *log.lock().unwrap());
        assert_eq!(
            calls.len(),
            points.len(),
            "{arch}: one call per point: {calls:?}"
        );
        for (p, node, phase, only_out, infos) in &calls {
            assert_eq!(node, &m.node_name(*p).unwrap());
            assert_eq!(*phase, Phase::Prefill);
            let last_layer = p.layer == TINY_N_LAYER - 1;
            // On the last layer, llama.cpp keeps only output rows after attention.
            let pruned = last_layer && p.site != Site::AttnOutput;
            assert_eq!(*only_out, pruned, "{arch} {p}");
            assert_eq!(infos.len(), if pruned { 1 } else { n }, "{arch} {p}");
            let last = infos.last().unwrap();
            assert!(last.is_last_prompt_token && last.is_output);
            assert_eq!(last.pos as usize, n - 1);
            assert_eq!(last.token, toks[n - 1]);
            assert_eq!(infos.iter().filter(|r| r.is_last_prompt_token).count(), 1);
        }
        s.decode(5).unwrap();
        let calls = std::mem::take(&mut *log.lock().unwrap());
        assert_eq!(calls.len(), points.len());
        for (_, _, phase, _, infos) in &calls {
            assert_eq!(*phase, Phase::Decode);
            assert_eq!(infos.len(), 1);
            assert_eq!(infos[0].pos as usize, n);
            assert!(!infos[0].is_last_prompt_token);
        }
        // No outputs requested: the pruned last-layer tensors have 0 rows and are not shown.
        s.prefill(&[6, 7, 8], Logits::None).unwrap();
        let calls = std::mem::take(&mut *log.lock().unwrap());
        assert!(calls
            .iter()
            .all(|(p, ..)| p.layer < TINY_N_LAYER - 1 || p.site == Site::AttnOutput));
    }
}

/// On llama, `ffn_out-N` is the FFN's output before the residual add:
/// l_out-N = l_out-(N-1) + attn_out-N + ffn_out-N.
#[test]
fn llama_ffn_output_is_before_the_residual_add() {
    let m = common::tiny(Architecture::Llama);
    let pts = vec![
        HookPoint::new(0, Site::ResidualOut),
        HookPoint::new(1, Site::AttnOutput),
        HookPoint::new(1, Site::FfnOutput),
        HookPoint::new(1, Site::ResidualOut),
    ];
    let got = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let g2 = got.clone();
    let mut s = session(&m);
    s.add_hook(Box::new(FnHook::new(pts.clone(), move |p, rows| {
        let r = rows.n_rows() - 1;
        g2.lock().unwrap().insert(p, rows.row(r).to_vec());
    })))
    .unwrap();
    s.prefill(&m.tokenize(PROMPT, true).unwrap(), Logits::Last)
        .unwrap();
    let g = got.lock().unwrap();
    let (prev, attn, ffn, out) = (&g[&pts[0]], &g[&pts[1]], &g[&pts[2]], &g[&pts[3]]);
    for i in 0..prev.len() {
        let sum = prev[i] + attn[i] + ffn[i];
        assert!(
            (sum - out[i]).abs() <= 1e-4 * (1.0 + out[i].abs()),
            "dim {i}: {sum} vs {}",
            out[i]
        );
    }
    assert!(
        ffn.iter().any(|x| x.abs() > 1e-3),
        "ffn output is not trivially zero"
    );
}

#[test]
fn writing_hook_changes_output_and_removal_restores_it() {
    let m = common::tiny(Architecture::Llama);
    let toks = m.tokenize(PROMPT, true).unwrap();
    let mut s = session(&m);
    s.prefill(&toks, Logits::Last).unwrap();
    let base = s.last_logits().unwrap().to_vec();
    let p = HookPoint::new(1, Site::ResidualOut);
    let id = s
        .add_hook(Box::new(FnHook::new(vec![p], |_, rows| {
            if let Some(r) = rows.last_prompt_row() {
                rows.row_mut(r).iter_mut().for_each(|x| *x = -*x);
            }
        })))
        .unwrap();
    s.kv_clear();
    s.prefill(&toks, Logits::Last).unwrap();
    assert_ne!(s.last_logits().unwrap(), &base[..]);
    assert!(s.remove_hook(id).is_some());
    assert!(s.remove_hook(id).is_none());
    s.kv_clear();
    s.prefill(&toks, Logits::Last).unwrap();
    assert_eq!(s.last_logits().unwrap(), &base[..]);
}

#[test]
fn hook_panics_and_bad_points_are_errors_not_crashes() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let err = s
        .add_hook(Box::new(FnHook::new(
            vec![HookPoint::new(2, Site::ResidualOut)],
            |_, _| {},
        )))
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::LayerOutOfRange { n_layer: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("0..=1"), "{err}");
    let err = s
        .add_hook(Box::new(FnHook::new(
            vec![HookPoint::new(0, Site::Embeddings)],
            |_, _| {},
        )))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::SiteUnavailable { .. }), "{err}");
    assert_eq!(s.n_hooks(), 0);
    let q = common::tiny(Architecture::Qwen2);
    let mut sq = session(&q);
    assert!(matches!(
        sq.add_hook(Box::new(FnHook::new(
            vec![HookPoint::new(0, Site::AttnOutput)],
            |_, _| {}
        ))),
        Err(RuntimeError::SiteUnavailable { .. })
    ));

    let toks = m.tokenize(PROMPT, true).unwrap();
    s.prefill(&toks, Logits::Last).unwrap();
    let base = s.last_logits().unwrap().to_vec();
    s.add_hook(Box::new(FnHook::new(
        vec![HookPoint::new(0, Site::ResidualOut)],
        |_, _| panic!("boom"),
    )))
    .unwrap();
    s.kv_clear();
    let err = s.prefill(&toks, Logits::Last).unwrap_err();
    assert!(
        matches!(&err, RuntimeError::Hook { message, .. } if message.contains("boom")),
        "{err}"
    );
    // The session stays usable.
    s.clear_hooks();
    s.kv_clear();
    s.prefill(&toks, Logits::Last).unwrap();
    assert_eq!(s.last_logits().unwrap(), &base[..]);
}

#[test]
fn stop_strings_callback_and_max_tokens() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let p = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(30)
    };
    let full = s.generate(PROMPT, &p, cont).unwrap();
    assert_eq!(full.tokens.len(), 30);
    // Pick a stop string from the middle of the greedy text.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 12, "{:?}", full.text);
    let stop: String = chars[8..10].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let out = s
        .generate(
            PROMPT,
            &GenerateParams {
                stop: vec![stop.clone(), "\u{1}never".into()],
                ..p.clone()
            },
            |e| {
                streamed.push_str(e.text);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::StopString(stop.clone()));
    assert_eq!(out.text, full.text[..cut]);
    assert_eq!(
        streamed, out.text,
        "streamed text must never include (part of) the stop string"
    );
    assert!(out.tokens.len() < 30);

    let mut n = 0;
    let out = s
        .generate(PROMPT, &p, |_| {
            n += 1;
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::Callback);
    assert_eq!(out.n_generated, 3);
    assert_eq!(out.tokens, full.tokens[..3]);

    let out = s
        .generate(
            PROMPT,
            &GenerateParams {
                max_tokens: 5,
                ..p.clone()
            },
            cont,
        )
        .unwrap();
    assert_eq!(
        (out.n_generated, out.stop_reason),
        (5, StopReason::MaxTokens)
    );
    assert!(matches!(
        s.generate(
            PROMPT,
            &GenerateParams {
                top_p: 0.0,
                ..p.clone()
            },
            cont
        ),
        Err(RuntimeError::InvalidParams(_))
    ));
    // A positive temperature so small that the scaled logits overflow: refused, not drawn.
    for t in [1e-40f32, 1e-7] {
        let e = s
            .generate(
                PROMPT,
                &GenerateParams {
                    temperature: t,
                    ..p.clone()
                },
                cont,
            )
            .unwrap_err();
        assert!(
            matches!(e, RuntimeError::InvalidParams(_)) && e.to_string().contains("0 is greedy"),
            "{t}: {e}"
        );
    }
    assert!(matches!(
        s.generate(
            "",
            &GenerateParams {
                add_bos: false,
                ..p
            },
            cont
        ),
        Err(RuntimeError::EmptyInput)
    ));
}

#[test]
fn sampling_is_seeded() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let p = |seed| GenerateParams {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        min_p: 0.01,
        repeat_penalty: 1.1,
        seed,
        ignore_eos: true,
        ..GenerateParams::greedy(40)
    };
    let a = s.generate(PROMPT, &p(1), cont).unwrap();
    let b = s.generate(PROMPT, &p(1), cont).unwrap();
    assert_eq!(a.tokens, b.tokens);
    let differs = (2..6).any(|seed| s.generate(PROMPT, &p(seed), cont).unwrap().tokens != a.tokens);
    assert!(differs, "different seeds never changed the sample");
}

#[test]
fn cancellation_from_another_thread_within_one_token() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let handle = s.cancel_handle();
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
    let canceller = std::thread::spawn(move || {
        // Cancel as soon as the 5th token is reported, then let the generator go on.
        while let Ok(i) = rx.recv() {
            if i == 4 {
                handle.cancel();
            }
            let _ = ack_tx.send(());
        }
    });
    let mut seen_after_cancel = 0;
    let mut cancelled_at = None;
    let out = s
        .generate(
            PROMPT,
            &GenerateParams {
                ignore_eos: true,
                ..GenerateParams::greedy(200)
            },
            |e| {
                if cancelled_at.is_some() {
                    seen_after_cancel += 1;
                }
                let _ = tx.send(e.index);
                ack_rx.recv().unwrap();
                if e.index == 4 {
                    cancelled_at = Some(e.index);
                }
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    drop(tx);
    canceller.join().unwrap();
    assert_eq!(out.stop_reason, StopReason::Cancelled);
    assert_eq!(out.n_generated, 5, "stopped within one token");
    assert_eq!(seen_after_cancel, 0);
    // The request was consumed: the next generation runs normally.
    let again = s
        .generate(
            PROMPT,
            &GenerateParams {
                ignore_eos: true,
                ..GenerateParams::greedy(8)
            },
            cont,
        )
        .unwrap();
    assert_eq!(again.stop_reason, StopReason::MaxTokens);
    // A cancel issued while idle stops the next generation immediately.
    s.cancel_handle().cancel();
    let out = s
        .generate(PROMPT, &GenerateParams::greedy(8), cont)
        .unwrap();
    assert_eq!(
        (out.stop_reason, out.n_generated),
        (StopReason::Cancelled, 0)
    );
}

#[test]
fn two_sessions_on_two_threads_match_serial() {
    let m = common::tiny(Architecture::Llama);
    let prompts = ["The capital of France is", "hello world and the water"];
    let p = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(48)
    };
    let serial: Vec<_> = prompts
        .iter()
        .map(|pr| session(&m).generate(pr, &p, cont).unwrap().tokens)
        .collect();
    let threads: Vec<_> = prompts
        .iter()
        .map(|pr| {
            let mut s = session(&m); // created here, moved to its thread
            let p = p.clone();
            let pr = pr.to_string();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                for _ in 0..3 {
                    all.push(s.generate(&pr, &p, cont).unwrap().tokens);
                }
                all
            })
        })
        .collect();
    for (t, expected) in threads.into_iter().zip(&serial) {
        for got in t.join().unwrap() {
            assert_eq!(&got, expected);
        }
    }
}

#[test]
fn bench_runs_every_variant() {
    let m = common::tiny(Architecture::Llama);
    let cfg = amend_runtime::bench::BenchConfig {
        prompt_tokens: 16,
        gen_tokens: 8,
        rounds: 2,
        n_threads: Some(1),
        layer: None,
    };
    let mut lines = 0;
    let r = amend_runtime::bench::run_bench(&m, &cfg, |_| lines += 1).unwrap();
    assert_eq!(lines, 8);
    assert_eq!(r.point, HookPoint::new(1, Site::ResidualOut));
    assert_eq!(r.results.len(), 4);
    for v in amend_runtime::bench::Variant::ALL {
        let (p, d) = r.ratio(v);
        assert!(
            p.is_finite() && p > 0.0 && d.is_finite() && d > 0.0,
            "{v:?}: {p} {d}"
        );
    }
    assert!(r.table().contains("amend, writing hook"));
    let bad = amend_runtime::bench::BenchConfig {
        prompt_tokens: 0,
        ..cfg
    };
    assert!(matches!(
        amend_runtime::bench::run_bench(&m, &bad, |_| {}),
        Err(RuntimeError::InvalidParams(_))
    ));
}

/// Overwrites `len` bytes at `start` of the file at `p` in place.
fn w_rewrite(p: &std::path::Path, start: usize, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut w = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    w.seek(SeekFrom::Start(start as u64)).unwrap();
    w.write_all(&vec![0x3f; len]).unwrap();
    w.sync_all().unwrap();
}

/// A model file rewritten in place, or truncated, after it was opened (another process with write
/// access to the model directory): with the private copy (the default) the model computes what
/// it computed before, bitwise, and keeps the fingerprint of the bytes it runs; mapping the file
/// instead
/// (`private_copy: false`) the rewrite reaches the weights llama.cpp reads.
#[test]
fn model_file_rewritten_after_open_changes_nothing() {
    let src = std::fs::read(common::tiny_path(Architecture::Llama)).unwrap();
    let f = amend_edits::gguf::GgufFile::parse(&src).unwrap();
    let t = f.tensor("output.weight").unwrap();
    let start = (f.data_offset + t.offset) as usize;
    let len = t.byte_size().unwrap() as usize;
    let logits = |m: &Arc<Model>| {
        let toks = m.tokenize(PROMPT, true).unwrap();
        let mut s = session(m);
        s.prefill(&toks, Logits::Last).unwrap();
        s.last_logits().unwrap().to_vec()
    };
    for private_copy in [true, false] {
        let p = common::tmp_dir().join(format!("rewritten-{private_copy}.gguf"));
        std::fs::write(&p, &src).unwrap();
        let m = Model::open(
            &p,
            ModelOptions {
                n_threads: Some(1),
                private_copy,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            m.runs_from_private_copy(),
            private_copy && cfg!(target_os = "linux")
        );
        let binding = m.binding().unwrap();
        let before = logits(&m);
        // The output projection overwritten in place: same length, same inode, other values.
        w_rewrite(&p, start, len);
        let after = logits(&m);
        if m.runs_from_private_copy() {
            assert!(
                before
                    .iter()
                    .zip(&after)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "the private copy must not see the rewrite"
            );
            assert_eq!(
                m.binding().unwrap(),
                binding,
                "the bytes run are the bytes bound"
            );
            // Truncated under it: no SIGBUS (a mapped file would end the process here).
            let len_now = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len_now / 2)
                .unwrap();
            let truncated = logits(&m);
            assert!(before
                .iter()
                .zip(&truncated)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            std::fs::write(&p, &src).unwrap();
            w_rewrite(&p, start, len);
        } else {
            assert_ne!(
                before, after,
                "a mapped file shows the rewrite (why the copy exists)"
            );
        }
        // Opening the rewritten file again is another model (another fingerprint).
        let again = Model::open(&p, ModelOptions::default()).unwrap();
        assert_ne!(again.binding().unwrap().fingerprint, binding.fingerprint);
    }
}

/// A model file replaced by rename while it is opened (how updates are installed) is copied
/// again from the path: every open succeeds, with the old file's or the new one's binding.
/// (The old inode's ctime changes when it loses its link, so the copy's check sees a change.)
#[test]
fn model_replaced_by_rename_while_opened_opens() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = common::tmp_dir().join("renamed");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("model.gguf");
    let versions: Vec<_> = [7u64, 8]
        .iter()
        .map(|&seed| {
            let v = dir.join(format!("v{seed}.gguf"));
            amend_runtime::testutil::write_tiny_model(&v, Architecture::Llama, seed).unwrap();
            v
        })
        .collect();
    std::fs::copy(&versions[0], &p).unwrap();
    let bindings: Vec<_> = versions
        .iter()
        .map(|v| amend_edits::fingerprint::model_binding_uncached(v).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let replacer = {
        let (stop, p, versions, dir) = (stop.clone(), p.clone(), versions.clone(), dir.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let tmp = dir.join(format!("tmp{n}"));
                std::fs::copy(&versions[n % 2], &tmp).unwrap();
                std::fs::rename(&tmp, &p).unwrap();
                n += 1;
                // Hundreds of updates a second, still far more than any deployment sees.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            n
        })
    };
    let mut opened = 0;
    for _ in 0..500 {
        let m = Model::open(
            &p,
            ModelOptions {
                n_threads: Some(1),
                ..Default::default()
            },
        );
        match m {
            Ok(m) => {
                if m.runs_from_private_copy() {
                    let b = m.binding().unwrap();
                    assert!(bindings.contains(&b), "a binding of neither version");
                }
                opened += 1;
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                panic!("open {opened} failed while the file was replaced: {e}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let renames = replacer.join().unwrap();
    assert!(renames > 10, "the file was replaced {renames} times");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hook's `points()` is user code: the registry asks it once, at `add_hook`. It used to ask
/// again at every rebuild (each later add or remove), so a hook that panicked on its second
/// call was left registered and never called, and one whose answer changed moved unvalidated.
#[test]
fn hook_points_are_read_once_at_registration() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Once {
        calls: Arc<AtomicUsize>,
        seen: Arc<AtomicUsize>,
    }
    impl Hook for Once {
        fn points(&self) -> Vec<HookPoint> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(n, 0, "points() asked again after registration");
            vec![HookPoint::new(0, Site::ResidualOut)]
        }
        fn on_tensor(&mut self, _: HookPoint, rows: &mut HookRows<'_>) {
            self.seen.fetch_add(rows.n_rows(), Ordering::SeqCst);
        }
    }
    let m = common::tiny(Architecture::Llama);
    let mut s = Session::new(
        &m,
        SessionOptions {
            n_ctx: 64,
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let (calls, seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    s.add_hook(Box::new(Once {
        calls: calls.clone(),
        seen: seen.clone(),
    }))
    .unwrap();
    // Adding and removing another hook rebuilds the registry.
    let other = s
        .add_hook(Box::new(FnHook::new(
            vec![HookPoint::new(1, Site::ResidualOut)],
            |_, _: &mut HookRows<'_>| {},
        )))
        .unwrap();
    s.remove_hook(other).unwrap();
    s.generate("hello", &GenerateParams::greedy(2), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(seen.load(Ordering::SeqCst) > 0, "the hook was called");
}

/// A session's compute threads are started once with it (threads.rs), not by ggml at every
/// decode: the logits are bitwise those of plain llama.cpp with the same thread count.
#[test]
fn compute_threads_match_plain_llama_cpp() {
    let m = common::tiny(Architecture::Llama);
    let toks = m
        .tokenize("hello world and the water is made of hydrogen", true)
        .unwrap();
    for threads in [2, 3] {
        let (_, reference, _) = threaded_session(&m, &toks, threads);
        assert_eq!(reference.len(), toks.len());
    }
}

/// A session on `threads` threads that has evaluated `toks`, plain llama.cpp's logits for them
/// with as many threads (checked bitwise against the session's), and the session's options.
fn threaded_session(
    m: &Arc<Model>,
    toks: &[Token],
    threads: usize,
) -> (Session, Vec<Vec<f32>>, SessionOptions) {
    let mut raw = RawContext::new(m, 512, 512, threads).unwrap();
    let reference = raw.all_logits(toks).unwrap();
    let opts = SessionOptions {
        n_ctx: 512,
        n_threads: Some(threads),
        ..Default::default()
    };
    let mut s = Session::new(m, opts.clone()).unwrap();
    s.prefill(toks, Logits::All).unwrap();
    for (i, r) in reference.iter().enumerate() {
        assert_eq!(
            s.logits(i).unwrap(),
            &r[..],
            "{threads} threads, position {i}"
        );
    }
    (s, reference, opts)
}

/// A `fork()`ed child has none of the parent's threads: a session made before the fork still
/// evaluates there (on ggml's per-call threads) instead of waiting forever for the pool's, and
/// can drop the session. (Skipped under qemu-user, which cannot fork a threaded guest.)
#[test]
fn session_made_before_fork_evaluates_in_the_child() {
    let m = common::tiny(Architecture::Llama);
    let toks = m
        .tokenize("hello world and the water is made of hydrogen", true)
        .unwrap();
    for threads in [2, 3] {
        let (mut s, reference, opts) = threaded_session(&m, &toks, threads);
        // SAFETY: the child only runs this session's code, then leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                s.kv_clear();
                s.prefill(&toks, Logits::All).unwrap();
                let same = (0..toks.len()).all(|i| s.logits(i).unwrap() == &reference[i][..]);
                drop(s);
                // A session made in the child gets threads of its own.
                let mut fresh = Session::new(&m, opts.clone()).unwrap();
                fresh.prefill(&toks, Logits::All).unwrap();
                same && fresh.last_logits().unwrap() == &reference[toks.len() - 1][..]
            }));
            unsafe { libc::_exit(if matches!(ok, Ok(true)) { 0 } else { 1 }) };
        }
        let start = std::time::Instant::now();
        let status = loop {
            let mut status = 0;
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                break Some(status);
            }
            if start.elapsed() > std::time::Duration::from_secs(60) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let status = status.expect("the forked child hung evaluating with the parent's threads");
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{threads} threads: the forked child failed (status {status:#x})"
        );
        // The parent's session still runs on its own threads.
        s.kv_clear();
        s.prefill(&toks, Logits::All).unwrap();
        assert_eq!(s.last_logits().unwrap(), &reference[toks.len() - 1][..]);
    }
}
