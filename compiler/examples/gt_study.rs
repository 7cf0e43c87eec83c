//! Study of a base-model answer-type check for routing: per probe, the base model's mean
//! log-probability of the own record's ground truth (old answer) and target after the probe,
//! against the same after the record's own prompt. JSONL for offline analysis.
//! Usage: gt_study MODEL.gguf DATA.json OUT.jsonl
use std::io::Write;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::eval::prompt_answer_tokens;
use amend_runtime::{EvalOptions, Logits, Model, ModelOptions, Phase, Session, SessionOptions};

fn lp(s: &mut Session, model: &Model, prompt: &str, answer: &str) -> (f32, f32) {
    let (p, a) = prompt_answer_tokens(model, prompt, answer).unwrap();
    let mut t = p.clone();
    t.extend_from_slice(&a);
    s.kv_clear();
    let first = p.len() - 1;
    s.eval(
        &t[..t.len() - 1],
        EvalOptions {
            logits: Logits::From(first),
            phase: Phase::Prefill,
            last_prompt_token: Some(first),
        },
    )
    .unwrap();
    let mut sum = 0.0;
    let mut first_lp = 0.0;
    for (i, &tok) in a.iter().enumerate() {
        let l = s.logits(first + i).unwrap();
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = l.iter().map(|x| (x - m).exp()).sum::<f32>().ln() + m;
        let v = l[tok as usize] - z;
        if i == 0 {
            first_lp = v;
        }
        sum += v;
    }
    (sum / a.len() as f32, first_lp)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::open(&args[1], ModelOptions::default()).unwrap();
    let data = dataset::load(args[2].as_ref(), DataFormat::Auto).unwrap();
    let mut s = Session::new(
        &model,
        SessionOptions {
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[3]).unwrap());
    for (ri, r) in data.iter().enumerate() {
        let gt = r.ground_truth.clone().unwrap_or_default();
        let mut probes: Vec<(String, String)> = vec![("edit".into(), r.prompt.clone())];
        probes.extend(
            r.rephrase_prompts
                .iter()
                .map(|p| ("rephrase".into(), p.clone())),
        );
        probes.extend(
            r.locality
                .iter()
                .map(|p| (p.kind.clone(), p.prompt.clone())),
        );
        for (kind, p) in probes {
            let (g, g1) = lp(&mut s, &model, &p, &gt);
            let (t, t1) = lp(&mut s, &model, &p, &r.target_new);
            writeln!(out, "{{\"rec\":{ri},\"kind\":{kind:?},\"prompt\":{p:?},\"gt\":{g},\"gt1\":{g1},\"tg\":{t},\"tg1\":{t1}}}").unwrap();
        }
    }
}
