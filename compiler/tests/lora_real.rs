//! The LoRA (FT-L) baseline on the real gemma3 model: compile dev edits, apply the signed bundle through the
//! runtime's edit set (llama.cpp LoRA adapters), and measure teacher-forced edit success,
//! rephrase success, locality (argmax tokens unchanged vs the base model) and time per edit.
//! `AMEND_LORA_N` sets how many dev edits (default 4; `all` for every record),
//! `AMEND_LORA_LAYER` the layer, `AMEND_LORA_SET` extra `section.key=value` overrides
//! separated by `;`.

mod common;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::eval::{prompt_answer_tokens, teacher_forced_argmax};
use amend_compiler::methods::median;
use amend_compiler::{BundleIdentity, Compiler, Hparams, Method};
use amend_edits::bundle::Bundle;
use amend_edits::families::inspect_gguf_lora;
use amend_edits::keys::generate_signing_key;
use amend_edits::{AddOptions, EditSet, TrustStore};
use amend_runtime::{Session, SessionOptions};
use std::sync::Arc;

/// Prompts whose last token the edits (capitals, languages, ...) must not change (the prompt
/// is all but the last token; the last token is the one scored).
const UNRELATED: [&str; 10] = [
    "Water is made of hydrogen and oxygen",
    "The opposite of hot is cold",
    "A triangle has three sides",
    "The first month of the year is January",
    "Cats like to chase mice",
    "Bread is made from flour",
    "The sun rises in the east",
    "Music is a form of art",
    "Two plus two equals four",
    "Ice is frozen water",
];

#[test]
fn lora_edits_gemma3_through_the_runtime() {
    let Some(path) = common::real_model_path() else {
        return;
    };
    let common::EnvOptions { n, layer, sets } = common::env_options("LORA", 4);
    let records =
        dataset::load(&common::repo_file("data/dev-edits.json"), DataFormat::Auto).unwrap();
    let records: Vec<_> = records.into_iter().take(n).collect();
    let n = records.len();
    let mut c = Compiler::open(&path).unwrap();
    let hp = Hparams::resolve(c.fwd.cfg.arch, None, &sets).unwrap();
    let out = c
        .compile(
            Method::Lora,
            &records,
            &hp,
            layer,
            None,
            &BundleIdentity::default(),
            &mut |_| {},
        )
        .unwrap();

    // The GGUF-LoRA file: one rank-n tensor on the edited down projection.
    let lora = out
        .gguf_lora
        .as_ref()
        .expect("lora writes a GGUF-LoRA file");
    let info = inspect_gguf_lora(lora).unwrap();
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(info.tensors.len(), 1);
    assert_eq!(info.tensors[0].rank as usize, n * hp.lora.rank);

    let key = generate_signing_key().unwrap();
    let bytes = out.builder.build_signed(&key).unwrap();
    let set = Arc::new(EditSet::new(
        amend_edits::fingerprint::model_binding(&path).unwrap(),
        TrustStore::with_key(key.verifying_key()),
    ));
    let bundle = Bundle::from_bytes(bytes.as_slice(), set.trust()).unwrap();
    assert_eq!(bundle.manifest().edits.len(), n);
    set.add(Arc::new(bundle), AddOptions::default()).unwrap();

    let rt = c.runtime.clone();
    let opts = SessionOptions {
        n_ctx: 512,
        ..Default::default()
    };
    let mut s = Session::new(&rt, opts.clone()).unwrap();
    s.set_edit_set(Some(set)).unwrap();
    let mut base = Session::new(&rt, opts).unwrap();

    let mut last_ok = false;
    let (mut succ, mut reph, mut reph_n, mut loc_same, mut loc_n) = (0, 0, 0, 0, 0);
    for r in &records {
        let (p, a) = prompt_answer_tokens(&rt, &r.prompt, &r.target_new).unwrap();
        s.begin_request(&r.prompt).unwrap();
        let got = teacher_forced_argmax(&mut s, &p, &a).unwrap();
        assert_eq!(
            s.explain().low_rank.len(),
            n,
            "every edit's adapter is installed"
        );
        let ok = got == a;
        succ += ok as usize;
        last_ok = ok;
        if !ok {
            eprintln!(
                "  edit failed: {} {:?} -> {:?}",
                r.id, r.prompt, r.target_new
            );
        }
        for q in &r.rephrase_prompts {
            let (p, a) = prompt_answer_tokens(&rt, q, &r.target_new).unwrap();
            s.begin_request(q).unwrap();
            reph += (teacher_forced_argmax(&mut s, &p, &a).unwrap() == a) as usize;
            reph_n += 1;
        }
        for probe in &r.locality {
            let (p, a) = prompt_answer_tokens(&rt, &probe.prompt, &probe.ground_truth).unwrap();
            let before = teacher_forced_argmax(&mut base, &p, &a).unwrap();
            s.begin_request(&probe.prompt).unwrap();
            let after = teacher_forced_argmax(&mut s, &p, &a).unwrap();
            if before != after {
                eprintln!(
                    "  locality changed: {:?}: {:?} -> {:?}",
                    probe.prompt,
                    rt.detokenize(&before).unwrap_or_default(),
                    rt.detokenize(&after).unwrap_or_default()
                );
            }
            loc_n += before.len();
            loc_same += before.iter().zip(&after).filter(|(x, y)| x == y).count();
        }
    }
    // Unrelated prompts (other relations than the edits'): next token unchanged.
    let mut unrelated_same = 0;
    for q in UNRELATED {
        let toks = rt.tokenize(q, rt.info().add_bos).unwrap();
        let last = *toks.last().unwrap();
        let (p, a) = (&toks[..toks.len() - 1], [last]);
        s.begin_request(q).unwrap();
        let after = teacher_forced_argmax(&mut s, p, &a).unwrap();
        let before = teacher_forced_argmax(&mut base, p, &a).unwrap();
        unrelated_same += (after == before) as usize;
    }
    let times: Vec<f64> = out.reports.iter().map(|r| r.seconds).collect();
    eprintln!(
        "LoRA (FT-L) gemma3 layer {:?}: {n} edits, edit success {succ}/{n} on the runtime (candle: {}), rephrase {reph}/{reph_n}, locality {loc_same}/{loc_n} tokens, unrelated next token unchanged {unrelated_same}/{}, median {:.2} s/edit",
        layer.unwrap_or(hp.lora.layer),
        out.reports.iter().filter(|r| r.success).count(),
        UNRELATED.len(),
        median(&times),
    );
    for r in &out.reports {
        eprintln!(
            "  {} steps {} loss {:.3} {:.2}s: {}",
            r.id, r.steps, r.loss, r.seconds, r.action
        );
    }
    // FT-L is the baseline that forgets: sequential LoRA edits of one relation override each
    // other (measured: 1/4 earlier edits survive). Each edit must reach its target when trained
    // and the most recent one must hold on the runtime (training and device agree).
    assert!(
        out.reports.iter().all(|r| r.success),
        "an edit did not reach its target in training"
    );
    assert!(last_ok, "the most recent edit does not hold on the runtime");
    assert!(
        unrelated_same as f64 >= 0.6 * UNRELATED.len() as f64,
        "unrelated prompts changed: {unrelated_same}/{} unchanged",
        UNRELATED.len()
    );
    assert!(
        median(&times) <= 30.0,
        "median {:.1} s/edit",
        median(&times)
    );
}
