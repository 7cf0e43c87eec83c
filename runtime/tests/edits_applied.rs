//! Edits at inference on the real model (gemma3-270m Q4_K_M) with hand-built, signed bundles:
//! codebook, patch neurons, low-rank, memory, and rolling back one edit by id.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;

use amend_edits::bundle::{BundleBuilder, BundleMeta, EmbedderDesc, MemoryRecordDesc};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::families::{LowRankTensor, Pooling};
use amend_edits::{AddOptions, Bundle, EditSet, HookPoint, ModelBinding, Site, TrustStore};
use amend_runtime::{GenerateParams, Logits, Model, Session, SessionOptions};

const LAYER: u32 = 12;

const UNRELATED: [&str; 20] = [
    "Water is made of hydrogen and",
    "The capital of Italy is",
    "My favourite colour is",
    "The sun rises in the",
    "Cats like to chase",
    "The largest ocean on Earth is the",
    "In 1969, humans first walked on the",
    "A triangle has three",
    "The opposite of hot is",
    "Shakespeare wrote the play",
    "The chemical symbol for gold is",
    "Bread is made from",
    "The fastest land animal is the",
    "Music is a form of",
    "The river that flows through Egypt is the",
    "Photosynthesis happens in the",
    "The first month of the year is",
    "Mount Everest is located in",
    "A group of wolves is called a",
    "Coffee beans are roasted before",
];

fn model() -> Option<Arc<Model>> {
    common::real_model()
}

fn session(m: &Arc<Model>) -> Session {
    Session::new(
        m,
        SessionOptions {
            n_ctx: 512,
            n_threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap()
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn binding(m: &Model) -> ModelBinding {
    amend_edits::fingerprint::model_binding(m.path()).unwrap()
}

fn edit_set(m: &Model) -> Arc<EditSet> {
    Arc::new(EditSet::new(
        binding(m),
        TrustStore::with_key(key().verifying_key()),
    ))
}

fn meta(m: &Model, id: &str, version: u64) -> BundleMeta {
    common::bundle_meta(m, id, version)
}

fn activate(set: &EditSet, b: &BundleBuilder) {
    let bytes = b.build_signed(&key()).unwrap();
    let bundle = Bundle::from_bytes(bytes.as_slice(), set.trust()).unwrap();
    set.add(Arc::new(bundle), AddOptions::default()).unwrap();
}

/// The last prompt token's row at `point` on llama.cpp.
fn capture(s: &mut Session, prompt: &str, point: HookPoint) -> Vec<f32> {
    let v = common::capture_last_row(s, prompt, point);
    assert_eq!(v.len(), 640, "captured {point} for {prompt:?}");
    v
}

/// Next-token logits for `prompt` as a request (edits of the attached set pinned and applied).
fn next_logits(s: &mut Session, prompt: &str) -> Vec<f32> {
    let req = s.begin_request(prompt).unwrap();
    let toks = s.tokenize(&req.prompt, true).unwrap();
    s.kv_clear();
    s.prefill(&toks, Logits::Last).unwrap();
    let l = s.last_logits().unwrap().to_vec();
    s.kv_clear();
    l
}

fn argmax(v: &[f32]) -> usize {
    amend_runtime::reference::argmax(v)
}

fn greedy(s: &mut Session, prompt: &str, n: usize) -> String {
    s.generate(prompt, &GenerateParams::greedy(n), |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
    .text
}

fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    assert!(amend_edits::families::l2_normalize(&mut v));
    v
}

fn softmax_p(logits: &[f32], tok: usize) -> f32 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = logits.iter().map(|x| (x - m).exp()).sum();
    (logits[tok] - m).exp() / z
}

fn base_logits(m: &Arc<Model>, prompts: &[&str]) -> Vec<Vec<f32>> {
    let mut s = session(m);
    prompts.iter().map(|p| next_logits(&mut s, p)).collect()
}

fn assert_unrelated_bitwise(s: &mut Session, base: &[Vec<f32>]) {
    for (p, b) in UNRELATED.iter().zip(base) {
        let l = next_logits(s, p);
        assert!(
            l.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "unrelated prompt {p:?} changed under the edit"
        );
    }
}

/// A codebook entry keyed on prompt A's FFN input; its value is prompt B's row at the replace
/// site. GRACE replaces what the layer adds to the residual; a full transplant of B's state
/// replaces the residual after the block (ResidualOut), which is what makes A answer like B.
#[test]
fn codebook_transplant_moves_a_and_leaves_unrelated_prompts_bitwise() {
    let Some(m) = model() else { return };
    let a = "The capital of France is";
    let b = "Berlin is the capital of";
    let mut s = session(&m);
    let key_a = normalized(capture(&mut s, a, HookPoint::new(LAYER, Site::FfnInput)));
    let value_b = capture(&mut s, b, HookPoint::new(LAYER, Site::ResidualOut));
    let base_a = next_logits(&mut s, a);
    let base_b = next_logits(&mut s, b);
    let base = base_logits(&m, &UNRELATED);
    assert_ne!(
        argmax(&base_a),
        argmax(&base_b),
        "the test needs prompts with different answers"
    );

    let set = edit_set(&m);
    let mut bb = BundleBuilder::new(meta(&m, "cb", 1));
    // Radius in normalized-euclidean units (sqrt(2 - 2cos)).
    let p = bb.add_codebook(
        LAYER,
        Site::FfnInput,
        Site::ResidualOut,
        1,
        false,
        640,
        &key_a,
        &value_b,
        &[0.1],
    );
    bb.add_edit("france", LAYER, Site::ResidualOut, a, " Germany", p, 0, 1);
    activate(&set, &bb);
    s.set_edit_set(Some(set.clone())).unwrap();

    let edited_a = next_logits(&mut s, a);
    assert_eq!(argmax(&edited_a), argmax(&base_b), "A continues like B");
    let ex = s.explain();
    assert_eq!(ex.codebook.len(), 1);
    assert!(
        ex.codebook[0].replaced && ex.codebook[0].distance < 1e-3,
        "{ex:?}"
    );
    assert_eq!(ex.codebook[0].edit_id.as_deref(), Some("france"));
    assert_unrelated_bitwise(&mut s, &base);
    // Generation applies it too.
    let text = greedy(&mut s, a, 3);
    let plain_b = {
        let mut s2 = session(&m);
        greedy(&mut s2, b, 1)
    };
    assert!(
        text.starts_with(plain_b.trim_end()),
        "{text:?} vs B's {plain_b:?}"
    );
}

/// A patch neuron keyed on A's FFN input (k = x/|x|^2, so k.x = 1; bias -0.9: it fires only on
/// inputs close to A's) writing toward B's residual at that layer.
#[test]
fn patch_neuron_moves_a_toward_a_chosen_token_and_leaves_unrelated_prompts_bitwise() {
    let Some(m) = model() else { return };
    let a = "The capital of France is";
    let b = "Berlin is the capital of";
    let mut s = session(&m);
    let x_a = capture(&mut s, a, HookPoint::new(LAYER, Site::FfnInput));
    let r_a = capture(&mut s, a, HookPoint::new(LAYER, Site::ResidualOut));
    let r_b = capture(&mut s, b, HookPoint::new(LAYER, Site::ResidualOut));
    let base_a = next_logits(&mut s, a);
    let target = argmax(&next_logits(&mut s, b));
    let base = base_logits(&m, &UNRELATED);

    let n2: f32 = x_a.iter().map(|v| v * v).sum();
    let key: Vec<f32> = x_a.iter().map(|v| v / n2).collect();
    // The ReLU margin: halfway between A (k.x = 1) and the closest unrelated prompt, so only
    // A's last token fires ("The capital of Italy is" sits at ~0.99 here).
    let closest = UNRELATED
        .iter()
        .map(|p| {
            let x = capture(&mut s, p, HookPoint::new(LAYER, Site::FfnInput));
            key.iter().zip(&x).map(|(k, x)| k * x).sum::<f32>()
        })
        .fold(0.9f32, f32::max);
    assert!(
        closest < 0.9999,
        "an unrelated prompt has A's FFN input ({closest})"
    );
    let bias = -(1.0 + closest) / 2.0;
    let act = 1.0 + bias;
    // Scale the value so the neuron adds (r_b - r_a) on A.
    let value: Vec<f32> = r_b.iter().zip(&r_a).map(|(b, a)| (b - a) / act).collect();
    let set = edit_set(&m);
    let mut bb = BundleBuilder::new(meta(&m, "pn", 1));
    let p = bb.add_patch_neurons(
        LAYER,
        Site::FfnInput,
        Site::ResidualOut,
        0,
        640,
        &key,
        &[bias],
        &value,
    );
    bb.add_edit(
        "france-neuron",
        LAYER,
        Site::ResidualOut,
        a,
        " Germany",
        p,
        0,
        1,
    );
    activate(&set, &bb);
    s.set_edit_set(Some(set)).unwrap();

    let edited = next_logits(&mut s, a);
    assert!(
        softmax_p(&edited, target) > softmax_p(&base_a, target) + 0.1,
        "p(target) {} -> {}",
        softmax_p(&base_a, target),
        softmax_p(&edited, target)
    );
    assert_eq!(argmax(&edited), target);
    let ex = s.explain();
    assert!(
        ex.neurons
            .iter()
            .any(|n| n.edit_id.as_deref() == Some("france-neuron")),
        "{ex:?}"
    );
    assert_unrelated_bitwise(&mut s, &base);
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// A rank-1 delta on an FFN down projection through a llama.cpp adapter: it changes the logits;
/// scale 0 and removing the bundle give back bitwise the base logits; no model reload.
#[test]
fn low_rank_delta_changes_logits_and_scale_zero_or_removal_restore_bitwise() {
    let Some(m) = model() else { return };
    let prompt = "The capital of France is";
    let mut s = session(&m);
    let base = next_logits(&mut s, prompt);
    let mut seed = 7u64;
    let u: Vec<f32> = (0..2048).map(|_| lcg(&mut seed) * 0.2).collect();
    let v: Vec<f32> = (0..640).map(|_| lcg(&mut seed) * 0.2).collect();
    let name = format!("blk.{LAYER}.ffn_down.weight");
    let t = LowRankTensor::rank_one(&name, &u, &v);

    for as_gguf in [false, true] {
        let set = edit_set(&m);
        let mut bb = BundleBuilder::new(meta(&m, "lr", 1));
        let p = if as_gguf {
            // A llama.cpp GGUF-LoRA file carried whole (what `gguf`-written adapters look like).
            let blob = amend_edits::families::LowRank::new(vec![t])
                .unwrap()
                .to_gguf_lora("gemma3");
            bb.add_gguf_lora(blob)
        } else {
            bb.add_low_rank(&[t])
        };
        bb.add_edit("rank1", LAYER, Site::FfnOutput, prompt, " x", p, 0, 1);
        activate(&set, &bb);
        s.set_edit_set(Some(set.clone())).unwrap();
        let edited = next_logits(&mut s, prompt);
        let max_diff = edited
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            max_diff > 1e-2,
            "rank-1 delta did not change the logits (gguf={as_gguf})"
        );
        assert_eq!(s.explain().low_rank.len(), 1);

        s.set_lora_scale("lr", 0.0).unwrap();
        let zero = next_logits(&mut s, prompt);
        assert!(
            zero.iter()
                .zip(&base)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "scale 0 is the base model"
        );
        s.set_lora_scale("lr", 1.0).unwrap();
        let again = next_logits(&mut s, prompt);
        assert!(
            again
                .iter()
                .zip(&edited)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "scale 1 again"
        );

        set.remove("lr").unwrap();
        let removed = next_logits(&mut s, prompt);
        assert!(
            removed
                .iter()
                .zip(&base)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "removal is the base model"
        );
    }
}

/// A memory edit: an in-scope rephrase gets the counterfactual prompt (the edit in context);
/// out-of-scope prompts run the base model bitwise.
#[test]
fn memory_routes_in_scope_rephrases_and_leaves_out_of_scope_bitwise() {
    let Some(m) = model() else { return };
    // Measured on this model: base-model states separate a rephrase from unrelated text best at
    // the normed FFN input of a late layer, last token (a same-template prompt with another
    // subject, "The capital of Italy is", stays close: cos 0.95; see docs/methods.md).
    let (layer, site, pooling) = (14u32, Site::FfnInput, Pooling::Last);
    let mut s = session(&m);
    let edit_prompt = "The capital of France is";
    let rephrase = "The capital city of France is";
    let e_edit = s.embed(edit_prompt, layer, site, pooling).unwrap();
    let e_reph = s.embed(rephrase, layer, site, pooling).unwrap();
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let in_score = cos(&e_edit, &e_reph);
    let out_of_scope: Vec<&str> = UNRELATED
        .iter()
        .copied()
        .filter(|p| !p.starts_with("The capital of"))
        .collect();
    let out_max = out_of_scope
        .iter()
        .map(|p| cos(&e_edit, &s.embed(p, layer, site, pooling).unwrap()))
        .fold(f32::NEG_INFINITY, f32::max);
    assert!(
        in_score > out_max,
        "embedding cannot separate: in {in_score} vs out {out_max}"
    );
    let threshold = (in_score + out_max) / 2.0;
    let base = base_logits(&m, &UNRELATED);

    let set = edit_set(&m);
    let mut bb = BundleBuilder::new(meta(&m, "mem", 1));
    let p = bb.add_memory(
        640,
        &e_edit,
        threshold,
        "{edit}\n{prompt}",
        EmbedderDesc::BaseModel {
            layer,
            site: site.code(),
            pooling: pooling.code(),
        },
        vec![MemoryRecordDesc {
            edit_id: "france-mem".into(),
            prompt: edit_prompt.into(),
            target: " Berlin".into(),
            text: "The capital of France is Berlin.".into(),
        }],
    );
    bb.add_edit("france-mem", layer, site, edit_prompt, " Berlin", p, 0, 1);
    activate(&set, &bb);
    s.set_edit_set(Some(set)).unwrap();

    let req = s.begin_request(rephrase).unwrap();
    assert_eq!(
        req.prompt,
        "The capital of France is Berlin.\nThe capital city of France is"
    );
    let ex = s.explain();
    let mem = ex.memory.expect("scope check recorded");
    assert!(mem.in_scope && mem.edit_id.as_deref() == Some("france-mem"));
    let text = greedy(&mut s, rephrase, 4);
    assert!(
        text.contains("Berlin"),
        "counterfactual answer, got {text:?}"
    );
    for (p, b) in UNRELATED.iter().zip(&base) {
        if !out_of_scope.contains(p) {
            continue;
        }
        let l = next_logits(&mut s, p);
        assert!(
            l.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "out-of-scope {p:?} changed"
        );
    }
    assert!(!s.explain().memory.unwrap().in_scope);
}

/// A bundle `id` with one answering memory (`{prompt}{answer}`, threshold 0.99) keyed on
/// `key`, the base model's row of `edit_prompt` at `at`.
fn answering_memory(
    m: &Model,
    id: &str,
    key: &[f32],
    (layer, site, pooling): (u32, Site, Pooling),
    edit_prompt: &str,
    target: &str,
    text: &str,
) -> BundleBuilder {
    let mut bb = BundleBuilder::new(meta(m, id, 1));
    let p = bb.add_memory(
        640,
        key,
        0.99,
        "{prompt}{answer}",
        EmbedderDesc::BaseModel {
            layer,
            site: site.code(),
            pooling: pooling.code(),
        },
        vec![MemoryRecordDesc {
            edit_id: format!("{id}-edit"),
            prompt: edit_prompt.into(),
            target: target.into(),
            text: text.into(),
        }],
    );
    bb.add_edit(
        &format!("{id}-edit"),
        layer,
        site,
        edit_prompt,
        target,
        p,
        0,
        1,
    );
    bb
}

/// An answering memory whose target is as long as the format allows (16 KB of text, thousands of
/// tokens) in a small context: generation stops with the context full, what it said is the
/// answer's beginning, and the session still
/// serves the next request; no panic, no abort inside llama.cpp.
#[test]
fn answer_longer_than_the_context_stops_at_it() {
    let Some(m) = model() else { return };
    let (layer, site, pooling) = (14u32, Site::FfnInput, Pooling::Last);
    let mut s = Session::new(
        &m,
        SessionOptions {
            n_ctx: 64,
            n_threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let edit_prompt = "The capital of France is";
    let e_edit = s.embed(edit_prompt, layer, site, pooling).unwrap();
    let words = ["Ulaanbaatar", " é", " 日本", " Bay", "\n", " ∑", " x"];
    let mut target = String::new();
    let mut i = 0;
    while target.len() < amend_edits::bundle::MAX_STRING_LEN - 16 {
        target.push_str(words[i % words.len()]);
        i += 1;
    }
    let set = edit_set(&m);
    let text = "t";
    let bb = answering_memory(
        &m,
        "mem-long",
        &e_edit,
        (layer, site, pooling),
        edit_prompt,
        &target,
        text,
    );
    activate(&set, &bb);
    s.set_edit_set(Some(set)).unwrap();
    for n in [8, 200] {
        let r = s.generate(edit_prompt, &GenerateParams::greedy(n), |_| {
            std::ops::ControlFlow::Continue(())
        });
        eprintln!(
            "{n} tokens: {:?}",
            r.as_ref().map(|o| o.text.len()).map_err(|e| e.to_string())
        );
        if let Ok(o) = &r {
            assert!(target.starts_with(o.text.trim_start()), "{:?}", o.text);
        }
    }
    // The session serves the next request.
    let o = s
        .generate("Water is made of", &GenerateParams::greedy(4), |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert!(!o.text.is_empty());
}

/// A memory that answers (`{prompt}{answer}`): the routed prompt is unchanged, the target's
/// tokens come first in the logits right after it (generation, teacher forcing), the model
/// speaks freely after the answer or once the text leaves it, and out-of-scope prompts run the
/// base model bitwise.
#[test]
fn answering_memory_forces_the_target_then_lets_the_model_speak() {
    let Some(m) = model() else { return };
    let (layer, site, pooling) = (14u32, Site::FfnInput, Pooling::Last);
    let mut s = session(&m);
    let edit_prompt = "The capital of France is";
    let e_edit = s.embed(edit_prompt, layer, site, pooling).unwrap();
    let base = base_logits(&m, &UNRELATED[2..]);
    let set = edit_set(&m);
    let bb = answering_memory(
        &m,
        "mem-answer",
        &e_edit,
        (layer, site, pooling),
        edit_prompt,
        "Ulaanbaatar Bay",
        "The capital of France is Ulaanbaatar Bay.",
    );
    activate(&set, &bb);
    s.set_edit_set(Some(set)).unwrap();

    let req = s.begin_request(edit_prompt).unwrap();
    assert_eq!(
        req.prompt, edit_prompt,
        "an answering memory keeps the prompt"
    );
    assert_eq!(req.answer.as_deref(), Some("Ulaanbaatar Bay"));
    let ex = s.explain().memory.expect("scope check recorded");
    assert!(ex.in_scope && ex.answer.as_deref() == Some("Ulaanbaatar Bay"));
    // Teacher forcing on the answer: every answer token is the argmax at its position.
    let (pt, at) = amend_runtime::prompt_answer_tokens(&m, edit_prompt, "Ulaanbaatar Bay").unwrap();
    assert!(at.len() >= 2, "a multi-token answer: {at:?}");
    let mut all = pt.clone();
    all.extend_from_slice(&at);
    s.kv_clear();
    let first = pt.len() - 1;
    s.eval(
        &all,
        amend_runtime::EvalOptions {
            last_prompt_token: Some(first),
            ..amend_runtime::EvalOptions::prefill(Logits::From(first))
        },
    )
    .unwrap();
    for (j, &t) in at.iter().enumerate() {
        assert_eq!(
            argmax(s.logits(first + j).unwrap()),
            t as usize,
            "answer token {j}"
        );
    }
    // After the answer the model's own logits: not the forced margin.
    let after = s.logits(first + at.len()).unwrap();
    let mx = after.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sorted = after.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert!(
        mx - sorted[1] < amend_runtime::answer::ANSWER_MARGIN,
        "no forcing after the answer"
    );
    // Text that leaves the answer after its first token: nothing more is forced.
    s.begin_request(edit_prompt).unwrap();
    let mut off = pt.clone();
    off.push(at[0]);
    let other = s.tokenize(" and", false).unwrap()[0];
    off.push(other);
    s.kv_clear();
    s.eval(
        &off,
        amend_runtime::EvalOptions {
            last_prompt_token: Some(first),
            ..amend_runtime::EvalOptions::prefill(Logits::From(first))
        },
    )
    .unwrap();
    assert_eq!(argmax(s.logits(first).unwrap()), at[0] as usize);
    assert_eq!(argmax(s.logits(first + 1).unwrap()), at[1] as usize);
    let free = s.logits(first + 2).unwrap();
    let mut sorted = free.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert!(
        sorted[0] - sorted[1] < amend_runtime::answer::ANSWER_MARGIN,
        "left the answer"
    );
    // Generation says the answer first.
    let text = greedy(&mut s, edit_prompt, 8);
    assert!(text.starts_with(" Ulaanbaatar Bay"), "{text:?}");
    // Out of scope: bitwise base.
    for (p, b) in UNRELATED[2..].iter().zip(&base) {
        let l = next_logits(&mut s, p);
        assert!(
            l.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "out-of-scope {p:?} changed"
        );
        assert!(s
            .explain()
            .memory
            .is_some_and(|m| !m.in_scope && m.answer.is_none()));
    }
}

/// Two codebook edits in one bundle; rolling back one by id removes exactly its effect.
#[test]
fn rolling_back_one_edit_by_id_removes_exactly_its_effect() {
    let Some(m) = model() else { return };
    let (a, a_to) = ("The capital of France is", "Berlin is the capital of");
    let (c, c_to) = ("Water is made of hydrogen and", "The opposite of hot is");
    let mut s = session(&m);
    let keys: Vec<f32> = [a, c]
        .iter()
        .flat_map(|p| normalized(capture(&mut s, p, HookPoint::new(LAYER, Site::FfnInput))))
        .collect();
    let values: Vec<f32> = [a_to, c_to]
        .iter()
        .flat_map(|p| capture(&mut s, p, HookPoint::new(LAYER, Site::ResidualOut)))
        .collect();
    let base_a = next_logits(&mut s, a);
    let base_c = next_logits(&mut s, c);

    let set = edit_set(&m);
    let mut bb = BundleBuilder::new(meta(&m, "two", 1));
    let p = bb.add_codebook(
        LAYER,
        Site::FfnInput,
        Site::ResidualOut,
        1,
        false,
        640,
        &keys,
        &values,
        &[0.1, 0.1],
    );
    bb.add_edit("edit-a", LAYER, Site::ResidualOut, a, " x", p, 0, 1);
    bb.add_edit("edit-c", LAYER, Site::ResidualOut, c, " y", p, 1, 1);
    activate(&set, &bb);
    s.set_edit_set(Some(set.clone())).unwrap();
    let edited_a = next_logits(&mut s, a);
    let edited_c = next_logits(&mut s, c);
    assert_ne!(argmax(&edited_a), argmax(&base_a));
    assert_ne!(argmax(&edited_c), argmax(&base_c));

    set.rollback_edit("edit-a").unwrap();
    let rolled_a = next_logits(&mut s, a);
    let still_c = next_logits(&mut s, c);
    assert!(
        rolled_a
            .iter()
            .zip(&base_a)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "edit-a gone"
    );
    assert!(
        still_c
            .iter()
            .zip(&edited_c)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "edit-c stays"
    );
}
