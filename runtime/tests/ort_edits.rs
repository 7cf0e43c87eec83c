//! Edits on the ONNX Runtime backend (issue 14), on the tiny model and the CPU EP: the same
//! bundles give the same logits as on llama.cpp, an empty or rolled-back bundle leaves the
//! logits bitwise those of the base graph, hot swaps under 8 threads give each request exactly
//! its pinned snapshot's output, and edits the graph has no slot for are refused by name.
//!
//! Needs the library from scripts/fetch-ort.sh (skipped without it unless AMEND_REQUIRE_MODEL=1).

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use amend_edits::bundle::{BundleBuilder, BundleMeta};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::families::LowRankTensor;
use amend_edits::{AddOptions, Bundle, EditSet, HookPoint, ModelBinding, Site, TrustStore};
use amend_runtime::onnxruntime::{self as ortb, OrtModel, OrtOptions, OrtSession, SlotLayout};
use amend_runtime::{
    Architecture, Backend, GenerateParams, Logits, Model, RuntimeError, Session, SessionOptions,
};

const D: usize = amend_runtime::testutil::TINY_N_EMBD as usize;
const A: &str = "The capital of France is";
const UNRELATED: [&str; 3] = ["hello world", "water is made of", "a the and"];

fn library() -> Option<PathBuf> {
    common::ort_library()
}

fn ort_model(path: &std::path::Path, slots: SlotLayout) -> Arc<OrtModel> {
    OrtModel::open(
        path,
        OrtOptions {
            n_threads: Some(1),
            library: library(),
            cache: ortb::OnnxCache::Off,
            slots,
            ..Default::default()
        },
    )
    .unwrap()
}

fn llama(m: &Arc<Model>) -> Session {
    Session::new(
        m,
        SessionOptions {
            n_ctx: 256,
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap()
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn edit_set(m: &Model) -> Arc<EditSet> {
    let binding: ModelBinding = amend_edits::fingerprint::model_binding(m.path()).unwrap();
    Arc::new(EditSet::new(
        binding,
        TrustStore::with_key(key().verifying_key()),
    ))
}

fn meta(m: &Model, id: &str) -> BundleMeta {
    common::bundle_meta(m, id, 1)
}

fn signed(set: &EditSet, b: &BundleBuilder) -> Arc<Bundle> {
    let bytes = b.build_signed(&key()).unwrap();
    Arc::new(Bundle::from_bytes(bytes.as_slice(), set.trust()).unwrap())
}

/// The last prompt token's row at `point` on llama.cpp.
fn capture(s: &mut Session, prompt: &str, point: HookPoint) -> Vec<f32> {
    let v = common::capture_last_row(s, prompt, point);
    assert_eq!(v.len(), D, "captured {point} for {prompt:?}");
    v
}

/// Next-token logits of `prompt` as a request on any backend.
fn next_logits(b: &mut dyn Backend, prompt: &str) -> Vec<f32> {
    let req = b.begin_request(prompt).unwrap();
    let toks = b.tokenize(&req.prompt, true).unwrap();
    b.kv_clear().unwrap();
    b.eval(&toks, amend_runtime::EvalOptions::prefill(Logits::Last))
        .unwrap();
    b.last_logits().unwrap().to_vec()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn bitwise(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn noise(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * scale
        })
        .collect()
}

/// A bundle `id` with one codebook entry at layer 1 (FFN input -> FFN output, radius 0.05),
/// edit `edit` on prompt A.
fn codebook_builder(m: &Model, id: &str, edit: &str, key: &[f32], value: &[f32]) -> BundleBuilder {
    let mut b = BundleBuilder::new(meta(m, id));
    let p = b.add_codebook(
        1,
        Site::FfnInput,
        Site::FfnOutput,
        1,
        false,
        D,
        key,
        value,
        &[0.05],
    );
    b.add_edit(edit, 1, Site::FfnOutput, A, " Paris", p, 0, 1);
    b
}

/// Three bundles, one per family, each keyed on prompt A of the tiny model: a codebook at
/// layer 1 (FFN input -> FFN output), patch neurons at layer 0, a rank-2 delta on layer 1's
/// down projection.
struct Bundles {
    codebook: Arc<Bundle>,
    neurons: Arc<Bundle>,
    low_rank: Arc<Bundle>,
}

fn bundles(m: &Arc<Model>, set: &EditSet) -> Bundles {
    let mut s = llama(m);
    let mut seed = 11u64;
    let mut x1 = capture(&mut s, A, HookPoint::new(1, Site::FfnInput));
    assert!(amend_edits::families::l2_normalize(&mut x1));
    let value = noise(&mut seed, D, 40.0);
    let cb = codebook_builder(m, "cb", "cb-a", &x1, &value);

    let x0 = capture(&mut s, A, HookPoint::new(0, Site::FfnInput));
    let n2: f32 = x0.iter().map(|v| v * v).sum();
    let k: Vec<f32> = x0.iter().map(|v| v / n2).collect();
    let mut pn = BundleBuilder::new(meta(m, "pn"));
    let v = noise(&mut seed, D, 30.0);
    let p = pn.add_patch_neurons(0, Site::FfnInput, Site::FfnOutput, 0, D, &k, &[-0.9], &v);
    pn.add_edit("pn-a", 0, Site::FfnOutput, A, " Paris", p, 0, 1);

    let n_ff = amend_runtime::testutil::TINY_N_FF as usize;
    let a = noise(&mut seed, 2 * n_ff, 1.0);
    let b = noise(&mut seed, 2 * D, 1.0);
    let t = LowRankTensor {
        name: "blk.1.ffn_down.weight",
        n_in: n_ff,
        n_out: D,
        rank: 2,
        a: &a,
        b: &b,
        alpha: 2.0,
    };
    let mut lr = BundleBuilder::new(meta(m, "lr"));
    let p = lr.add_low_rank(&[t]);
    lr.add_edit("lr-a", 1, Site::FfnOutput, A, " Paris", p, 0, 1);
    Bundles {
        codebook: signed(set, &cb),
        neurons: signed(set, &pn),
        low_rank: signed(set, &lr),
    }
}

impl Bundles {
    /// Each family's bundle with its name.
    fn each(&self) -> [(&'static str, &Arc<Bundle>); 3] {
        [
            ("codebook", &self.codebook),
            ("neurons", &self.neurons),
            ("low_rank", &self.low_rank),
        ]
    }
}

/// The neurons that fired: (unit, positions, edit id).
fn fired(x: &amend_runtime::Explain) -> Vec<(usize, usize, Option<String>)> {
    x.neurons
        .iter()
        .map(|n| (n.neuron, n.positions, n.edit_id.clone()))
        .collect()
}

/// The tiny model (path, llama.cpp model), an edit set, the three bundles (signed for it) and
/// the slot layout they need.
struct Fixture {
    path: PathBuf,
    m: Arc<Model>,
    set: Arc<EditSet>,
    all: Bundles,
    layout: SlotLayout,
}

fn fixture() -> Fixture {
    let path = common::tiny_path(Architecture::Llama);
    let m = common::tiny(Architecture::Llama);
    let set = edit_set(&m);
    let all = bundles(&m, &set);
    let layout = SlotLayout::for_bundles([&*all.codebook, &*all.neurons, &*all.low_rank]).unwrap();
    Fixture {
        path,
        m,
        set,
        all,
        layout,
    }
}

#[test]
fn every_family_gives_llama_cpps_logits_and_fires_the_same_units() {
    let Some(_) = library() else { return };
    let Fixture {
        path,
        m,
        all,
        layout,
        ..
    } = fixture();
    assert_eq!(
        layout.describe(),
        "cb:1:ffn_input:ffn_output;pn:0:ffn_input:ffn_output:relu;lr:blk.1.ffn_down.weight"
    );
    let om = ort_model(&path, layout);
    let base_l = next_logits(&mut llama(&m), A);
    let base_o = next_logits(&mut OrtSession::new(&om, 256).unwrap(), A);
    for (name, b) in all.each() {
        let set = edit_set(&m);
        set.add(b.clone(), AddOptions::default()).unwrap();
        let mut l = llama(&m);
        l.set_edit_set(Some(set.clone())).unwrap();
        let mut o = OrtSession::new(&om, 256).unwrap();
        o.set_edit_set(Some(set.clone())).unwrap();
        let el = next_logits(&mut l, A);
        let eo = next_logits(&mut o, A);
        let moved = max_abs(&el, &base_l);
        let gap = max_abs(&el, &eo);
        eprintln!("{name}: edit moves the logits by {moved:.3}; llama.cpp vs ORT {gap:.2e}");
        assert!(
            moved > 0.5,
            "{name}: the edit must change the logits ({moved})"
        );
        assert!(max_abs(&eo, &base_o) > 0.5, "{name}: ORT applied nothing");
        assert!(gap < 0.05, "{name}: backends disagree by {gap}");
        let (xl, xo) = (l.explain(), o.explain());
        assert_eq!(
            xl.codebook.len(),
            xo.codebook.len(),
            "{name}: {xl:?} / {xo:?}"
        );
        for (a, b) in xl.codebook.iter().zip(&xo.codebook) {
            assert_eq!((a.entry, a.replaced, a.pos), (b.entry, b.replaced, b.pos));
            assert!((a.distance - b.distance).abs() < 1e-3, "{a:?} {b:?}");
        }
        assert_eq!(fired(&xl), fired(&xo), "{name}");
        assert_eq!(xl.low_rank, xo.low_rank, "{name}");
        // Other prompts: the same units fire on both backends, and where none fires the ORT
        // logits are bitwise the base graph's.
        if name != "low_rank" {
            let mut silent = 0;
            for p in UNRELATED {
                let u = next_logits(&mut o, p);
                let ul = next_logits(&mut l, p);
                let (xl, xo) = (l.explain(), o.explain());
                assert_eq!(fired(&xl), fired(&xo), "{name}: {p:?}");
                let hits = |x: &amend_runtime::Explain| {
                    x.codebook.iter().filter(|c| c.replaced).count() + x.neurons.len()
                };
                assert_eq!(hits(&xl), hits(&xo), "{name}: {p:?}: {xl:?} / {xo:?}");
                assert!(max_abs(&u, &ul) < 0.05, "{name}: {p:?}");
                if hits(&xo) == 0 {
                    silent += 1;
                    let ub = next_logits(&mut OrtSession::new(&om, 256).unwrap(), p);
                    assert!(
                        bitwise(&u, &ub),
                        "{name}: {p:?} moved on ORT with nothing fired"
                    );
                }
            }
            assert!(silent >= 2, "{name}: the edit fires on unrelated prompts");
        }
    }
}

#[test]
fn empty_and_rolled_back_bundles_give_the_base_graphs_logits_bitwise() {
    let Some(_) = library() else { return };
    let Fixture {
        path,
        set,
        all,
        layout,
        ..
    } = fixture();
    let base = ort_model(&path, SlotLayout::default());
    let slotted = ort_model(&path, layout);
    let greedy = |s: &mut OrtSession, p: &str| {
        let out = s
            .generate(p, &GenerateParams::greedy(6), |_| ControlFlow::Continue(()))
            .unwrap();
        (out.tokens, s.last_logits().unwrap().to_vec())
    };
    let mut b = OrtSession::new(&base, 256).unwrap();
    let reference: Vec<_> = std::iter::once(A)
        .chain(UNRELATED)
        .map(|p| (next_logits(&mut b, p), greedy(&mut b, p)))
        .collect();
    let check = |s: &mut OrtSession, what: &str| {
        for (p, (l, g)) in std::iter::once(A).chain(UNRELATED).zip(&reference) {
            assert!(bitwise(&next_logits(s, p), l), "{what}: {p:?} prefill");
            let (t, last) = greedy(s, p);
            assert_eq!(&t, &g.0, "{what}: {p:?} tokens");
            assert!(bitwise(&last, &g.1), "{what}: {p:?} decode logits");
        }
    };
    // No edit set; an empty one; every edit rolled back; scale 0 on the low-rank bundle alone.
    let mut s = OrtSession::new(&slotted, 256).unwrap();
    check(&mut s, "no edit set");
    s.set_edit_set(Some(set.clone())).unwrap();
    check(&mut s, "empty edit set");
    for b in [&all.codebook, &all.neurons, &all.low_rank] {
        set.add(b.clone(), AddOptions::default()).unwrap();
    }
    assert!(
        !bitwise(&next_logits(&mut s, A), &reference[0].0),
        "the bundles are active"
    );
    for id in ["cb-a", "pn-a", "lr-a"] {
        set.rollback_edit(id).unwrap();
    }
    check(&mut s, "all rolled back");
    set.restore_edit("lr-a").unwrap();
    s.set_lora_scale("lr", 0.0).unwrap();
    check(&mut s, "low-rank at scale 0");
}

/// Moves `set` (holding the three bundles) to the state where the edits of `st` apply and the
/// others are rolled back; returns the new generation.
fn set_state(set: &EditSet, st: &[&Arc<Bundle>]) -> u64 {
    set.update(|tx| {
        for (bundle, edit) in [("cb", "cb-a"), ("pn", "pn-a"), ("lr", "lr-a")] {
            let want = st.iter().any(|b| b.id() == bundle);
            let rolled = tx.state().get(bundle).unwrap().is_rolled_back(edit);
            match (want, rolled) {
                (true, true) => tx.restore_edit(edit)?,
                (false, false) => tx.rollback_edit(edit)?,
                _ => {}
            }
        }
        Ok(())
    })
    .unwrap();
    set.snapshot().generation
}

#[test]
fn hot_swaps_under_eight_threads_give_each_request_its_pinned_snapshot() {
    let Some(_) = library() else { return };
    let Fixture {
        path,
        m,
        set,
        all,
        layout,
    } = fixture();
    let om = ort_model(&path, layout);
    // The states the swapper moves through, and their outputs run serially.
    let states: Vec<Vec<&Arc<Bundle>>> = vec![
        vec![],
        vec![&all.codebook],
        vec![&all.codebook, &all.neurons],
        vec![&all.low_rank],
        vec![&all.codebook, &all.neurons, &all.low_rank],
    ];
    let run = |s: &mut OrtSession| {
        s.generate(A, &GenerateParams::greedy(5), |_| ControlFlow::Continue(()))
            .unwrap()
            .tokens
    };
    let expected: Vec<Vec<i32>> = states
        .iter()
        .map(|st| {
            let one = edit_set(&m);
            for b in st {
                one.add((*b).clone(), AddOptions::default()).unwrap();
            }
            let mut s = OrtSession::new(&om, 256).unwrap();
            s.set_edit_set(Some(one)).unwrap();
            run(&mut s)
        })
        .collect();
    let distinct: std::collections::BTreeSet<_> = expected.iter().collect();
    assert!(distinct.len() >= 3, "the states must differ: {expected:?}");

    // Every bundle is added once (versions are monotonic: a removed bundle cannot come back);
    // a state is the set of edits not rolled back.
    for b in [&all.codebook, &all.neurons, &all.low_rank] {
        set.add(b.clone(), AddOptions::default()).unwrap();
    }
    let generation_state: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    generation_state
        .lock()
        .unwrap()
        .push((set_state(&set, &states[0]), 0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results: Vec<Vec<(u64, Vec<i32>)>> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (om, set) = (om.clone(), set.clone());
                sc.spawn(move || {
                    let mut s = OrtSession::new(&om, 256).unwrap();
                    s.set_edit_set(Some(set)).unwrap();
                    (0..6)
                        .map(|_| {
                            let t = run(&mut s);
                            (s.explain().generation.unwrap(), t)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let swapper = {
            let (set, gs, done) = (set.clone(), generation_state.clone(), done.clone());
            let states = &states;
            sc.spawn(move || {
                let mut i = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    i = (i + 1) % states.len();
                    let g = set_state(&set, &states[i]);
                    gs.lock().unwrap().push((g, i));
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
            })
        };
        let r = workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        swapper.join().unwrap();
        r
    });
    let gs = generation_state.lock().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for (g, tokens) in results.iter().flatten() {
        let st = gs
            .iter()
            .find(|(gg, _)| gg == g)
            .map(|&(_, s)| s)
            .unwrap_or_else(|| panic!("generation {g} was never published"));
        assert_eq!(tokens, &expected[st], "generation {g} (state {st})");
        seen.insert(st);
    }
    eprintln!(
        "{} requests over {} swaps saw {} distinct states",
        results.iter().flatten().count(),
        gs.len(),
        seen.len()
    );
}

#[test]
fn edits_without_a_slot_or_support_are_refused_by_name_and_nothing_applies() {
    let Some(_) = library() else { return };
    let path = common::tiny_path(Architecture::Llama);
    let m = common::tiny(Architecture::Llama);
    let set = edit_set(&m);
    let all = bundles(&m, &set);
    // A graph with the codebook's slot only.
    let om = ort_model(&path, SlotLayout::for_bundles([&*all.codebook]).unwrap());
    let mut s = OrtSession::new(&om, 256).unwrap();
    let base = next_logits(&mut s, A);
    s.set_edit_set(Some(set.clone())).unwrap();
    set.add(all.codebook.clone(), AddOptions::default())
        .unwrap();
    set.add(all.low_rank.clone(), AddOptions::default())
        .unwrap();
    match s.begin_request(A) {
        Err(RuntimeError::EditSlot(msg)) => {
            assert!(msg.contains("blk.1.ffn_down.weight"), "{msg}")
        }
        other => panic!("expected EditSlot, got {other:?}"),
    }
    // The same answer before activation (what amend_session_activate checks).
    assert!(om.check_fits(&all.codebook).is_ok());
    match om.check_fits(&all.low_rank) {
        Err(RuntimeError::EditSlot(msg)) => {
            assert!(msg.contains("lr:blk.1.ffn_down.weight"), "{msg}")
        }
        other => panic!("expected EditSlot, got {other:?}"),
    }
    // Nothing of the refused snapshot applies: the session runs the base graph.
    s.kv_clear().unwrap();
    let toks = s.model().tokenize(A, true).unwrap();
    s.eval(&toks, Logits::Last).unwrap();
    assert!(bitwise(s.last_logits().unwrap(), &base));
    set.remove("lr").unwrap();
    assert!(s.begin_request(A).is_ok(), "the codebook alone fits");

    // A neuron slot with another activation is another slot.
    let gelu = SlotLayout::parse("pn:0:ffn_input:ffn_output:gelu").unwrap();
    let om2 = ort_model(&path, gelu);
    let mut s2 = OrtSession::new(&om2, 256).unwrap();
    let set2 = edit_set(&m);
    set2.add(all.neurons.clone(), AddOptions::default())
        .unwrap();
    s2.set_edit_set(Some(set2)).unwrap();
    assert!(matches!(
        s2.begin_request(A),
        Err(RuntimeError::EditSlot(_))
    ));

    // A codebook with the plain Euclidean distance has no graph form.
    let mut x = capture(&mut llama(&m), A, HookPoint::new(1, Site::FfnInput));
    x.iter_mut().for_each(|v| *v *= 2.0);
    let mut eu = BundleBuilder::new(meta(&m, "eu"));
    let p = eu.add_codebook(
        1,
        Site::FfnInput,
        Site::FfnOutput,
        0,
        false,
        D,
        &x,
        &x,
        &[0.5],
    );
    eu.add_edit("eu-a", 1, Site::FfnOutput, A, " Paris", p, 0, 1);
    let set3 = edit_set(&m);
    set3.add(signed(&set3, &eu), AddOptions::default()).unwrap();
    let mut s3 = OrtSession::new(&om, 256).unwrap();
    s3.set_edit_set(Some(set3)).unwrap();
    assert!(matches!(
        s3.begin_request(A),
        Err(RuntimeError::Unsupported(_))
    ));

    // Layouts the graph cannot have: a weight the model lacks, a layer past the last, a
    // matrix no linear reads (the embedding table, beside the model's own output.weight).
    for layout in [
        "lr:blk.9.ffn_down.weight",
        "cb:5:ffn_input:ffn_output",
        "lr:token_embd.weight",
    ] {
        let bad = OrtModel::open(
            &path,
            OrtOptions {
                library: library(),
                cache: ortb::OnnxCache::Off,
                slots: SlotLayout::parse(layout).unwrap(),
                ..Default::default()
            },
        );
        assert!(
            matches!(bad, Err(RuntimeError::OrtGraph(_))),
            "{layout}: {bad:?}"
        );
    }
}

/// `OrtOptions::capture`: the rows ONNX Runtime computes at a hook site, per evaluation, are
/// llama.cpp's rows at that site (what `amend compile --verify-ort` keys neurons on).
#[test]
fn captured_sites_match_llama_cpps_rows() {
    let Some(_) = library() else { return };
    let path = common::tiny_path(Architecture::Llama);
    let m = common::tiny(Architecture::Llama);
    let point = HookPoint::new(1, Site::FfnInput);
    let om = OrtModel::open(
        &path,
        OrtOptions {
            n_threads: Some(1),
            library: library(),
            cache: ortb::OnnxCache::Off,
            capture: vec![point],
            ..Default::default()
        },
    )
    .unwrap();
    let mut o = OrtSession::new(&om, 256).unwrap();
    let toks = m.tokenize(A, true).unwrap();
    o.eval(&toks, Logits::Last).unwrap();
    let rows = o.captured(point).unwrap().to_vec();
    assert_eq!(rows.len(), toks.len() * D);
    let last = capture(&mut llama(&m), A, point);
    let got = &rows[rows.len() - D..];
    // llama.cpp's f16 KV cache is the only difference (measured 2e-3 on rows of norm ~8).
    let cos = got.iter().zip(&last).map(|(a, b)| a * b).sum::<f32>()
        / (got.iter().map(|a| a * a).sum::<f32>().sqrt()
            * last.iter().map(|b| b * b).sum::<f32>().sqrt());
    assert!(
        cos > 0.9999 && max_abs(got, &last) < 1e-2,
        "cos {cos}, max {}",
        max_abs(got, &last)
    );
    // A decode step captures its one row.
    o.eval_with(&[toks[1]], amend_runtime::EvalOptions::decode())
        .unwrap();
    assert_eq!(o.captured(point).unwrap().len(), D);
    assert!(o.captured(HookPoint::new(0, Site::FfnInput)).is_none());
}

/// A one-edit codebook bundle (layer 1) whose v1.2 verification record lists `backends`.
fn recorded(
    f: &Fixture,
    set: &EditSet,
    id: &str,
    backends: &[(&str, u32)],
    required: bool,
) -> Arc<Bundle> {
    let mut seed = 5u64;
    let mut key = noise(&mut seed, D, 1.0);
    assert!(amend_edits::families::l2_normalize(&mut key));
    let value = noise(&mut seed, D, 1.0);
    let mut b = codebook_builder(&f.m, id, &format!("{id}-e"), &key, &value);
    b.set_verification(Some(amend_edits::bundle::Verification {
        backends: backends
            .iter()
            .map(|&(name, passed)| amend_edits::bundle::VerifiedBackend {
                backend: name.into(),
                passed,
                total: 1,
            })
            .collect(),
        required,
    }));
    signed(set, &b)
}

#[test]
fn verification_records_warn_or_refuse_on_other_backends() {
    if library().is_none() {
        return;
    }
    let f = fixture();
    let om = ort_model(&f.path, f.layout.clone());
    let mut ort = OrtSession::new(&om, 256).unwrap();
    let mut ll = llama(&f.m);
    // The id carries the loaded library's version: another ONNX Runtime is another backend.
    let cpu_id = ort.backend_id();
    let cpu = cpu_id.as_str();
    let version = amend_runtime::onnxruntime::library_version().unwrap();
    let g = amend_runtime::onnxruntime::graph::GRAPH_VERSION;
    assert_eq!(cpu, format!("onnxruntime-{version}:cpu/g{g}-cpu"));
    assert!(version.starts_with("1."), "{version}");
    assert_eq!(ll.backend_id(), amend_runtime::LLAMA_CPP_BACKEND_ID);
    let ll_id = amend_runtime::LLAMA_CPP_BACKEND_ID;
    assert_eq!(
        ll_id,
        format!("llama.cpp-{}:cpu", amend_runtime::LLAMA_CPP_SYS_VERSION)
    );
    // (bundle name, backends verified on with edits passed, verification required)
    type Case<'a> = (&'a str, &'a [(&'a str, u32)], bool);
    let cases: [Case; 7] = [
        ("v-llama", &[(ll_id, 1)], false),
        ("v-llama-req", &[(ll_id, 1)], true),
        ("v-both-req", &[(ll_id, 1), (cpu, 1)], true),
        // 0 of 1 passed on the CPU EP: listed, yet not verified there.
        ("v-cpu-failed", &[(ll_id, 1), (cpu, 0)], false),
        ("v-cpu-failed-req", &[(ll_id, 1), (cpu, 0)], true),
        // Verified on another llama.cpp build (or recorded before builds were named): refused
        // where required, on llama.cpp as well.
        ("v-other-llama-req", &[("llama.cpp", 1)], true),
        // Verified on the CPU EP of another ONNX Runtime release: not this backend.
        (
            "v-other-ort-req",
            &[("onnxruntime-0.0.1:cpu/g7-cpu", 1)],
            true,
        ),
    ];
    let probe = |b: &mut dyn Backend, bundle: Arc<Bundle>| {
        let set = edit_set(&f.m);
        set.add(bundle.clone(), AddOptions::default()).unwrap();
        b.set_edit_set(Some(set)).unwrap();
        let r = b.begin_request(A).map(|_| b.explain().unverified);
        b.set_edit_set(None).unwrap();
        (amend_runtime::check_verified(&bundle, &b.backend_id()), r)
    };
    for (id, backends, required) in cases {
        let bundle = recorded(&f, &f.set, id, backends, required);
        for b in [&mut ll as &mut dyn Backend, &mut ort] {
            let here = b.backend_id();
            let covered = backends.iter().any(|&(n, p)| n == here && p == 1);
            let (check, request) = probe(b, bundle.clone());
            match (covered, required) {
                (true, _) => {
                    assert_eq!(check.unwrap(), None, "{id} on {here}");
                    assert_eq!(request.unwrap(), vec![], "{id} on {here}");
                }
                (false, false) => {
                    let w = check.unwrap().expect("a warning");
                    assert_eq!((w.bundle.as_str(), w.backend.as_str()), (id, here.as_str()));
                    let events = request.unwrap();
                    assert_eq!(events, vec![w], "{id} on {here}: explain warns");
                }
                (false, true) => {
                    // Refused at activation (check_verified) and, were it attached anyway, by
                    // the request itself: nothing of it is applied.
                    for e in [check.unwrap_err(), request.unwrap_err()] {
                        match e {
                            RuntimeError::Unverified {
                                bundle, backend, ..
                            } => {
                                assert_eq!((bundle.as_str(), backend.as_str()), (id, here.as_str()))
                            }
                            e => panic!("{id} on {here}: {e}"),
                        }
                    }
                }
            }
        }
    }
    // A bundle without a record (v1.1) is applied without a warning on both.
    for b in [&mut ll as &mut dyn Backend, &mut ort] {
        let (check, request) = probe(b, f.all.codebook.clone());
        assert_eq!(check.unwrap(), None);
        assert_eq!(request.unwrap(), vec![]);
    }
}

/// Static shapes with static-capacity slots (`StaticShapes::capacity`): every family gives the
/// dynamic graph's logits and fires the same units; unused capacity changes nothing; a snapshot
/// needing more than a slot holds is refused naming the slot, and nothing of it applies.
#[test]
fn static_capacity_slots_match_the_dynamic_graph() {
    use amend_runtime::onnxruntime::{SlotCapacity, StaticShapes};
    let Some(_) = library() else { return };
    let f = fixture();
    let (path, m, all, layout) = (&f.path, &f.m, &f.all, f.layout.clone());
    let fixed = |capacity: SlotCapacity, layout: SlotLayout| {
        OrtModel::open(
            path,
            OrtOptions {
                n_threads: Some(1),
                library: library(),
                cache: ortb::OnnxCache::Off,
                slots: layout,
                static_shapes: Some(StaticShapes {
                    chunk: 4,
                    window: 64,
                    capacity,
                }),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let roomy = SlotCapacity {
        entries: 8,
        neurons: 8,
        rank: 8,
    };
    let dynamic = ort_model(path, layout.clone());
    let stat = fixed(roomy, layout.clone());
    let plain = fixed(roomy, SlotLayout::default());
    // No edits: the slots' padded sentinels leave the static base graph's logits bitwise.
    let base = next_logits(&mut OrtSession::new(&plain, 64).unwrap(), A);
    let empty = next_logits(&mut OrtSession::new(&stat, 64).unwrap(), A);
    assert!(bitwise(&base, &empty), "{}", max_abs(&base, &empty));
    for (name, b) in all.each() {
        let set = edit_set(m);
        set.add(b.clone(), AddOptions::default()).unwrap();
        let mut d = OrtSession::new(&dynamic, 64).unwrap();
        d.set_edit_set(Some(set.clone())).unwrap();
        let mut s = OrtSession::new(&stat, 64).unwrap();
        s.set_edit_set(Some(set.clone())).unwrap();
        let (ed, es) = (next_logits(&mut d, A), next_logits(&mut s, A));
        assert!(
            max_abs(&es, &base) > 0.5,
            "{name}: the static graph applied nothing"
        );
        assert!(max_abs(&ed, &es) < 1e-4, "{name}: {}", max_abs(&ed, &es));
        let (xd, xs) = (d.explain(), s.explain());
        assert_eq!(xd.codebook.len(), xs.codebook.len(), "{name}");
        for (a, b) in xd.codebook.iter().zip(&xs.codebook) {
            assert_eq!(
                (a.entry, a.replaced, a.pos),
                (b.entry, b.replaced, b.pos),
                "{name}"
            );
        }
        assert_eq!(fired(&xd), fired(&xs), "{name}");
        // Greedy generation (chunked prefill, then the decode graph) agrees too.
        let greedy = |sess: &mut OrtSession| {
            let t = sess.model().tokenize(A, true).unwrap();
            sess.kv_clear().unwrap();
            sess.generate_greedy(&t, 6).unwrap()
        };
        assert_eq!(greedy(&mut d), greedy(&mut s), "{name}");
    }
    // Over capacity: the rank-2 delta in a rank-1 slot is refused by name at the request, and
    // nothing applies; the one-entry codebook fills its one-entry slot exactly.
    let tight = fixed(
        SlotCapacity {
            entries: 1,
            neurons: 1,
            rank: 1,
        },
        layout,
    );
    let set = edit_set(m);
    set.add(all.codebook.clone(), AddOptions::default())
        .unwrap();
    set.add(all.low_rank.clone(), AddOptions::default())
        .unwrap();
    let mut s = OrtSession::new(&tight, 64).unwrap();
    s.set_edit_set(Some(set.clone())).unwrap();
    match s.begin_request(A) {
        Err(RuntimeError::EditSlot(msg)) => {
            assert!(
                msg.contains("blk.1.ffn_down.weight") && msg.contains("holds 1"),
                "{msg}"
            )
        }
        other => panic!("expected EditSlot, got {other:?}"),
    }
    s.kv_clear().unwrap();
    let toks = s.model().tokenize(A, true).unwrap();
    s.eval(&toks, Logits::Last).unwrap();
    assert!(bitwise(s.last_logits().unwrap(), &base), "nothing applies");
    set.remove("lr").unwrap();
    assert!(s.begin_request(A).is_ok(), "the one-entry codebook fits");
    // At activation (what the C ABI does): the state about to be published is checked inside
    // the edit set's transaction, so the overflowing bundle is refused and nothing changes
    // (a fresh set: the one above has seen version 1 of the low-rank bundle).
    let set = edit_set(m);
    set.add(all.codebook.clone(), AddOptions::default())
        .unwrap();
    s.set_edit_set(Some(set.clone())).unwrap();
    let before = set.snapshot();
    type AnyError = Box<dyn std::error::Error + Send + Sync>;
    let r = set.update_with(|tx| -> Result<(), AnyError> {
        tx.add(all.low_rank.clone(), AddOptions::default())?;
        Ok(tight.check_capacity(Arc::new(tx.state().clone()), None)?)
    });
    match r.map_err(|e| e.downcast::<RuntimeError>().map(|e| *e)) {
        Err(Ok(RuntimeError::EditSlot(msg))) => assert!(msg.contains("holds 1"), "{msg}"),
        other => panic!("expected EditSlot, got {other:?}"),
    }
    let after = set.snapshot();
    assert_eq!(after.generation, before.generation, "nothing published");
    assert_eq!(after.list().len(), 1, "only the codebook is active");
    assert!(s.begin_request(A).is_ok());
    // The same check passes a state that fits, and is a no-op on a dynamic graph.
    let fits = set.snapshot();
    assert!(tight.check_capacity(fits, None).is_ok());
    let mut over = (*set.snapshot()).clone();
    set.update(|tx| {
        tx.add(all.low_rank.clone(), AddOptions::default())?;
        over = tx.state().clone();
        Ok(())
    })
    .unwrap();
    let over = Arc::new(over);
    assert!(
        stat.check_capacity(over.clone(), None).is_ok(),
        "rank 8 holds it"
    );
    assert!(
        dynamic.check_capacity(over, None).is_ok(),
        "a dynamic graph has no capacity"
    );
    assert!(SlotCapacity::parse("8,8,8").is_ok());
    for bad in ["8,8", "0,8,8", "8,8,x", "8,8,8,8"] {
        assert!(SlotCapacity::parse(bad).is_err(), "{bad}");
    }
}

/// One session kept across requests (its binding keeps a snapshot's slot inputs bound) gives
/// what a fresh session gives: the same snapshot again (the codebook's entries bound at the
/// prefill, its sentinel while decoding, its entries again), swaps and rollbacks to other
/// snapshots and back; on the dynamic graph and on a static pair.
#[test]
fn a_reused_session_matches_fresh_sessions_across_requests_and_swaps() {
    use amend_runtime::onnxruntime::{SlotCapacity, StaticShapes};
    let Some(_) = library() else { return };
    let Fixture {
        path,
        set,
        all,
        layout,
        ..
    } = fixture();
    for b in [&all.codebook, &all.neurons, &all.low_rank] {
        set.add(b.clone(), AddOptions::default()).unwrap();
    }
    let stat = OrtModel::open(
        &path,
        OrtOptions {
            n_threads: Some(1),
            library: library(),
            cache: ortb::OnnxCache::Off,
            slots: layout.clone(),
            static_shapes: Some(StaticShapes {
                chunk: 4,
                window: 64,
                capacity: SlotCapacity {
                    entries: 8,
                    neurons: 8,
                    rank: 8,
                },
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let (cb, pn, lr) = (&all.codebook, &all.neurons, &all.low_rank);
    // (the bundles applied, whether the codebook replaces: not under the layer-0 neurons,
    // which move its key site).
    let states: [(&[&Arc<Bundle>], bool); 5] = [
        (&[cb, lr], true),
        (&[cb, lr], true),
        (&[], false),
        (&[cb, pn, lr], false),
        (&[cb], true),
    ];
    type Outcome = (
        Vec<i32>,
        Vec<f32>,
        Vec<(usize, bool, i32)>,
        Vec<(usize, usize, Option<String>)>,
    );
    let request = |s: &mut OrtSession| -> Outcome {
        let out = s
            .generate(A, &GenerateParams::greedy(5), |_| ControlFlow::Continue(()))
            .unwrap();
        let x = s.explain();
        let cb = x
            .codebook
            .iter()
            .map(|c| (c.entry, c.replaced, c.pos))
            .collect();
        (out.tokens, s.last_logits().unwrap().to_vec(), cb, fired(&x))
    };
    for (what, om) in [("dynamic", ort_model(&path, layout)), ("static", stat)] {
        let mut reused = OrtSession::new(&om, 64).unwrap();
        reused.set_edit_set(Some(set.clone())).unwrap();
        for (i, &(st, replaces)) in states.iter().enumerate() {
            set_state(&set, st);
            let mut fresh = OrtSession::new(&om, 64).unwrap();
            fresh.set_edit_set(Some(set.clone())).unwrap();
            let (r, f) = (request(&mut reused), request(&mut fresh));
            assert_eq!(
                (&r.0, &r.2, &r.3),
                (&f.0, &f.2, &f.3),
                "{what}: request {i}"
            );
            assert!(bitwise(&r.1, &f.1), "{what}: request {i}: logits");
            assert_eq!(r.2.iter().any(|c| c.1), replaces, "{what}: request {i}");
            let neurons_on = st.iter().any(|b| Arc::ptr_eq(b, pn));
            assert_eq!(!r.3.is_empty(), neurons_on, "{what}: request {i}");
        }
    }
}
