//! A careless library user (session 37 QA): non-finite logits, generation parameters, a
//! panicking callback, hand-built static slot capacities and an export over the model. Each is
//! a specific error and changes nothing.
mod common;

use std::ops::ControlFlow;
use std::sync::Arc;

use amend_runtime::onnxruntime::{
    self as ortb, CodebookSlot, OrtModel, OrtOptions, OrtSession, SlotCapacity, SlotLayout,
    StaticShapes,
};
use amend_runtime::*;

fn cont(_: &TokenEvent<'_>) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn session(m: &Arc<Model>) -> Session {
    Session::new(
        m,
        SessionOptions {
            n_ctx: 64,
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap()
}

/// A hook that writes NaN (or +inf) into the last layer's rows made greedy generation return
/// token 0 and the sampler chain sort NaN, with `Ok`; now generation refuses the row by name.
#[test]
fn non_finite_logits_are_refused_not_sampled() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let base = s
        .generate("hello", &GenerateParams::greedy(3), cont)
        .unwrap()
        .tokens;
    let last = m.info().n_layer - 1;
    for bad in [f32::NAN, f32::INFINITY] {
        let id = s
            .add_hook(Box::new(FnHook::new(
                vec![HookPoint::new(last, Site::ResidualOut)],
                move |_, r: &mut HookRows<'_>| r.data_mut().fill(bad),
            )))
            .unwrap();
        for p in [
            GenerateParams::greedy(3),
            GenerateParams {
                temperature: 0.8,
                max_tokens: 3,
                ..Default::default()
            },
            GenerateParams {
                repeat_penalty: 1.3,
                max_tokens: 3,
                ..Default::default()
            },
        ] {
            let mut events = 0;
            let e = s
                .generate("hello", &p, |_| {
                    events += 1;
                    ControlFlow::Continue(())
                })
                .unwrap_err();
            assert!(
                matches!(&e, RuntimeError::NonFiniteLogits { index: 0, .. }),
                "{bad} {p:?}: {e}"
            );
            assert!(e.to_string().contains("not usable"), "{e}");
            assert_eq!(events, 0, "no token was streamed from such a row");
        }
        s.remove_hook(id).unwrap();
        // The session is not poisoned.
        assert_eq!(
            s.generate("hello", &GenerateParams::greedy(3), cont)
                .unwrap()
                .tokens,
            base
        );
    }
}

/// A panicking streaming callback unwinds to the caller (it is the caller's code, run on the
/// caller's thread); the session is not poisoned and gives the same text after.
#[test]
fn a_panicking_callback_leaves_the_session_usable() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let p = GenerateParams::greedy(4);
    let base = s.generate("hello", &p, cont).unwrap().tokens;
    for _ in 0..2 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.generate("hello", &p, |e| {
                if e.index == 1 {
                    panic!("callback");
                }
                ControlFlow::Continue(())
            })
        }));
        assert!(r.is_err());
        assert_eq!(s.generate("hello", &p, cont).unwrap().tokens, base);
    }
}

/// Every refused generation parameter names the value given (the CLI passes the message on).
#[test]
fn generation_parameter_errors_name_the_value() {
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let base = GenerateParams {
        temperature: 0.8,
        max_tokens: 2,
        ..Default::default()
    };
    for (p, needle) in [
        (
            GenerateParams {
                top_p: f32::NAN,
                ..base.clone()
            },
            "top_p NaN is outside (0, 1]",
        ),
        (
            GenerateParams {
                top_p: 0.0,
                ..base.clone()
            },
            "top_p 0 is outside (0, 1]",
        ),
        (
            GenerateParams {
                min_p: 1.5,
                ..base.clone()
            },
            "min_p 1.5 is outside [0, 1]",
        ),
        (
            GenerateParams {
                repeat_penalty: -1.0,
                ..base.clone()
            },
            "repeat_penalty -1 is not a finite number > 0",
        ),
        (
            GenerateParams {
                repeat_penalty: f32::INFINITY,
                ..base.clone()
            },
            "repeat_penalty inf is not",
        ),
        (
            GenerateParams {
                temperature: f32::NEG_INFINITY,
                ..base.clone()
            },
            "temperature -inf is not finite",
        ),
        (
            GenerateParams {
                top_k: -3,
                ..base.clone()
            },
            "top_k must be >= 0 (0 is off), got -3",
        ),
    ] {
        let e = s.generate("hello", &p, cont).unwrap_err();
        assert!(
            matches!(e, RuntimeError::InvalidParams(_)) && e.to_string().contains(needle),
            "{needle}: {e}"
        );
    }
}

/// `StaticShapes::new` ("checked") took any slot capacity: 0 failed inside ONNX Runtime at the
/// first run (an ArgMax status), usize::MAX panicked and 2^40 aborted the process allocating.
#[test]
fn static_slot_capacity_is_checked_before_any_work() {
    for cap in [
        SlotCapacity {
            entries: 0,
            neurons: 8,
            rank: 8,
        },
        SlotCapacity {
            entries: 1 << 40,
            neurons: 8,
            rank: 8,
        },
        SlotCapacity {
            entries: 8,
            neurons: usize::MAX,
            rank: 8,
        },
        SlotCapacity {
            entries: 8,
            neurons: 8,
            rank: 0,
        },
    ] {
        let e = StaticShapes::new(4, 64, cap).unwrap_err();
        assert!(
            matches!(e, RuntimeError::InvalidOptions(_))
                && e.to_string().contains("must be 1..=1000000"),
            "{cap:?}: {e}"
        );
    }
    assert!(StaticShapes::new(4, 64, SlotCapacity::default()).is_ok());
    // Built by hand (public fields), the open refuses it before building anything.
    let Some(lib) = common::ort_library() else {
        return;
    };
    let layout = SlotLayout {
        codebooks: vec![CodebookSlot {
            layer: 1,
            key_site: Site::ResidualOut,
            replace_site: Site::ResidualOut,
        }],
        ..Default::default()
    };
    for entries in [0, 1 << 40] {
        let e = OrtModel::open(
            common::tiny_path(Architecture::Llama),
            OrtOptions {
                n_threads: Some(1),
                library: Some(lib.clone()),
                cache: ortb::OnnxCache::Off,
                slots: layout.clone(),
                static_shapes: Some(StaticShapes {
                    chunk: 4,
                    window: 64,
                    capacity: SlotCapacity {
                        entries,
                        neurons: 8,
                        rank: 8,
                    },
                }),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, RuntimeError::InvalidOptions(_)), "{e}");
    }
}

/// `OrtOptions::export` naming the model replaced the GGUF with the graph (and the open then
/// failed on "not a GGUF file"); naming the graph the open reads rewrote it. Both are refused
/// before any work, and the files are unchanged.
#[test]
fn an_export_over_the_opens_own_inputs_is_refused() {
    let Some(lib) = common::ort_library() else {
        return;
    };
    let dir = common::tmp_dir().join("export-over-input");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.gguf");
    std::fs::copy(common::tiny_path(Architecture::Llama), &model).unwrap();
    let opts = |export: &std::path::Path, cache: ortb::OnnxCache| OrtOptions {
        n_threads: Some(1),
        library: Some(lib.clone()),
        cache,
        export: Some(export.to_path_buf()),
        ..Default::default()
    };
    let before = std::fs::read(&model).unwrap();
    // By its own name and through a link.
    let link = dir.join("link.gguf");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&model, &link).unwrap();
    for out in [&model, &link] {
        let e = OrtModel::open(&model, opts(out, ortb::OnnxCache::Off)).unwrap_err();
        assert!(
            matches!(e, RuntimeError::InvalidOptions(_))
                && e.to_string().contains("that is the model"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&model).unwrap(),
            before,
            "the model was replaced"
        );
    }
    // A named graph: exporting over it (or its sidecar) is refused too.
    let graph = dir.join("g.onnx");
    OrtModel::open(&model, opts(&graph, ortb::OnnxCache::Off)).unwrap();
    let side = dir.join("g.onnx.amend");
    let (g0, s0) = (
        std::fs::read(&graph).unwrap(),
        std::fs::read(&side).unwrap(),
    );
    for out in [&graph, &side] {
        let e =
            OrtModel::open(&model, opts(out, ortb::OnnxCache::File(graph.clone()))).unwrap_err();
        assert!(
            e.to_string().contains("that is the named ONNX graph"),
            "{e}"
        );
    }
    assert_eq!(std::fs::read(&graph).unwrap(), g0);
    assert_eq!(std::fs::read(&side).unwrap(), s0);
    // Another path is fine.
    OrtModel::open(&model, opts(&dir.join("other.onnx"), ortb::OnnxCache::Off)).unwrap();
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // A session's context out of range names the value.
    let m = OrtModel::open(&model, opts(&dir.join("other.onnx"), ortb::OnnxCache::Off)).unwrap();
    let Err(e) = OrtSession::new(&m, 0) else {
        panic!("n_ctx 0 was taken")
    };
    assert!(e.to_string().contains("n_ctx 0 is outside 1..="), "{e}");
}

/// Session 38: `set_lora_scale` took any finite scale; 1e30 gave non-finite logits,
/// refused only at generation. A scale outside [-100, 100] (or NaN) is refused naming the
/// value, the bundle and the range, and the scale in use stays as it was.
#[test]
fn lora_scale_outside_its_range_is_refused_and_changes_nothing() {
    use amend_edits::bundle::{Bundle, BundleBuilder};
    use amend_edits::editset::{AddOptions, EditSet};
    use amend_edits::families::LowRankTensor;
    use amend_edits::keys::TrustStore;
    let m = common::tiny(Architecture::Llama);
    let mut s = session(&m);
    let logits = |s: &mut Session| {
        let req = s.begin_request("hello").unwrap();
        let toks = s.tokenize(&req.prompt, true).unwrap();
        s.kv_clear();
        s.prefill(&toks, Logits::Last).unwrap();
        let l = s.last_logits().unwrap().to_vec();
        s.kv_clear();
        l
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let base = logits(&mut s);
    let (u, v) = amend_runtime::testutil::rank_one_ffn_down_factors();
    let key = amend_edits::ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let set = Arc::new(EditSet::new(
        amend_edits::fingerprint::model_binding(m.path()).unwrap(),
        TrustStore::with_key(key.verifying_key()),
    ));
    // Bundle `lr` at `version`: the rank-one adapter above, verified by the set's trust store.
    let lr_bundle = |version: u64| {
        let mut bb = BundleBuilder::new(common::bundle_meta(&m, "lr", version));
        let p = bb.add_low_rank(&[LowRankTensor::rank_one("blk.0.ffn_down.weight", &u, &v)]);
        bb.add_edit("rank1", 0, Site::FfnOutput, "hello", " x", p, 0, 1);
        let signed = bb.build_signed(&key).unwrap();
        Arc::new(Bundle::from_bytes(signed.as_slice(), set.trust()).unwrap())
    };
    set.add(lr_bundle(1), AddOptions::default()).unwrap();
    s.set_edit_set(Some(set.clone())).unwrap();
    let edited = logits(&mut s);
    assert_ne!(bits(&edited), bits(&base), "the adapter changes the logits");
    s.set_lora_scale("lr", 0.0).unwrap();
    assert_eq!(
        bits(&logits(&mut s)),
        bits(&base),
        "scale 0 is the base model"
    );
    for bad in [
        1e30,
        -1e30,
        100.5,
        -101.0,
        f32::MAX,
        f32::INFINITY,
        f32::NAN,
    ] {
        let e = s.set_lora_scale("lr", bad).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, RuntimeError::InvalidOptions(_)), "{bad}: {e:?}");
        for needle in [
            format!("LoRA scale {bad} "),
            "\"lr\"".into(),
            "[-100, 100]".into(),
        ] {
            assert!(msg.contains(&needle), "{bad}: {needle:?} not in {msg}");
        }
        // Refused: still scale 0, bitwise the base model.
        assert_eq!(
            bits(&logits(&mut s)),
            bits(&base),
            "{bad} changed the scale"
        );
    }
    for good in [1.0, 100.0, -100.0, -1.0, 2.5] {
        s.set_lora_scale("lr", good).unwrap();
        let l = logits(&mut s);
        assert!(l.iter().all(|x| x.is_finite()), "scale {good}");
    }
    s.set_lora_scale("lr", 1.0).unwrap();
    assert_eq!(bits(&logits(&mut s)), bits(&edited), "scale 1 again");

    // Session 39: an id no active bundle has was kept silently (the C ABI alone refused it).
    s.set_lora_scale("lr", 0.0).unwrap();
    for unknown in ["lr2", "", "LR"] {
        match s.set_lora_scale(unknown, 1.0) {
            Err(RuntimeError::UnknownBundle(id)) => assert_eq!(id, unknown),
            other => panic!("{unknown:?}: {other:?}"),
        }
    }
    assert_eq!(bits(&logits(&mut s)), bits(&base), "still scale 0");
    // A scale leaves with its bundle: removed, then its next version (same id and adapter)
    // added, the bundle is as compiled.
    set.update(|tx| tx.remove("lr").map(|_| ())).unwrap();
    assert_eq!(bits(&logits(&mut s)), bits(&base), "no bundle");
    assert!(matches!(
        s.set_lora_scale("lr", 0.0),
        Err(RuntimeError::UnknownBundle(_))
    ));
    set.add(lr_bundle(2), AddOptions::default()).unwrap();
    assert_eq!(
        bits(&logits(&mut s)),
        bits(&edited),
        "version 2 at scale 1, not version 1's 0"
    );
}
