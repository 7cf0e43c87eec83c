//! Signals for the router's hard case (issue 16; docs/eval.md "Other signals for the hard
//! case"): does a signal tell a rephrase of an edit prompt from the same subject under another
//! relation? Each probe of a memory set is scored against its own record; printed is the AUC of
//! rephrases against same-subject probes (and against same-relation probes).
//!
//! Usage: relation_signals state|answer|align DATA.json [OUT.tsv]
//! - `state`: the base model's last-token residual (`l_out-L`, through the runtime's hooks),
//!   cosine centred on the mean over the set's edit prompts (what a compiler sees), per layer.
//! - `answer`: the base model's mean log p of the ground truth and of `target_new` after the
//!   probe minus after the edit prompt (the tokens `amend eval` scores; `gt_study.rs` measured
//!   the first on dev), and the Bhattacharyya coefficient of the next-token distributions after
//!   `{probe} Answer:` and `{prompt} Answer:`. OUT.tsv gets one line per probe (id, kind,
//!   Δlog p ground truth, Δlog p target, BC, prompt).
//! - `align`: scope-model terms the scope head does not read: how well the record's non-subject
//!   rows find a match among the query's (mean, min) and the other way round, and the pooled
//!   cosine with the subject replaced by "it".
use std::io::Write;
use std::sync::{Arc, Mutex};

use amend_compiler::dataset::{self, DataFormat, EditRecord};
use amend_edits::families::strip_subject;
use amend_edits::{HookPoint, Site};
use amend_runtime::{
    prompt_answer_tokens, FnHook, Logits, Model, ScopeModel, Session, SessionOptions,
};

/// Probe kinds: rephrase, same subject, same relation, unrelated.
const KINDS: usize = 4;

fn probes(r: &EditRecord) -> Vec<(usize, &str)> {
    let mut out: Vec<(usize, &str)> = r.rephrase_prompts.iter().map(|p| (0, p.as_str())).collect();
    for p in &r.locality {
        let k = match p.kind.as_str() {
            "Subject_Specificity" => 1,
            "Relation_Specificity" => 2,
            _ => 3,
        };
        out.push((k, p.prompt.as_str()));
    }
    out
}

fn auc(pos: &[f32], neg: &[f32]) -> f32 {
    let mut w = 0f64;
    for p in pos {
        for n in neg {
            w += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    (w / (pos.len() * neg.len()).max(1) as f64) as f32
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One line per signal: its AUCs from the per-kind scores.
fn report(names: &[String], by: &[[Vec<f32>; KINDS]]) {
    for (name, b) in names.iter().zip(by) {
        println!(
            "{name:>28}: AUC rephrase vs same subject {:.3}, vs same relation {:.3}",
            auc(&b[0], &b[1]),
            auc(&b[0], &b[2])
        );
    }
}

fn base_session() -> Session {
    let path = std::env::var_os("AMEND_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("gemma3-270m-q4_k_m.gguf")
        });
    let model = Model::open(path, Default::default()).unwrap();
    let opts = SessionOptions {
        n_threads: Some(2),
        ..Default::default()
    };
    Session::new(&model, opts).unwrap()
}

fn state(data: &[EditRecord]) {
    let mut s = base_session();
    let layers: Vec<u32> = (2..18).collect();
    let points = layers
        .iter()
        .map(|&l| HookPoint::new(l, Site::ResidualOut))
        .collect();
    // The last row seen at each layer: the last prompt token's.
    let slot: Arc<Mutex<Vec<Vec<f32>>>> = Arc::new(Mutex::new(vec![Vec::new(); layers.len()]));
    let (s2, ls) = (slot.clone(), layers.clone());
    let hook = FnHook::new(points, move |p, rows| {
        if let (Some(n), Some(i)) = (
            rows.n_rows().checked_sub(1),
            ls.iter().position(|&l| l == p.layer),
        ) {
            s2.lock().unwrap()[i] = rows.row(n).to_vec();
        }
    });
    s.add_hook(Box::new(hook)).unwrap();
    let mut at_last = |text: &str| -> Vec<Vec<f32>> {
        let t = s.tokenize(text, true).unwrap();
        s.kv_clear();
        s.prefill(&t, Logits::Last).unwrap();
        slot.lock().unwrap().clone()
    };
    let mut recs = Vec::new();
    let mut seen = Vec::new();
    for (ri, r) in data.iter().enumerate() {
        recs.push(at_last(&r.prompt));
        for (k, text) in probes(r) {
            seen.push((ri, k, at_last(text)));
        }
    }
    let nl = layers.len();
    let mut by = vec![<[Vec<f32>; KINDS]>::default(); nl];
    for l in 0..nl {
        let dim = recs[0][l].len();
        let mut mean = vec![0f32; dim];
        for r in &recs {
            mean.iter_mut()
                .zip(&r[l])
                .for_each(|(m, x)| *m += x / recs.len() as f32);
        }
        let centred = |v: &[f32]| -> Vec<f32> {
            let mut c: Vec<f32> = v.iter().zip(&mean).map(|(x, m)| x - m).collect();
            amend_edits::families::l2_normalize(&mut c);
            c
        };
        for (ri, k, st) in &seen {
            by[l][*k].push(dot(&centred(&st[l]), &centred(&recs[*ri][l])));
        }
    }
    let names: Vec<String> = layers.iter().map(|l| format!("l_out-{l}")).collect();
    report(&names, &by);
}

fn answer(data: &[EditRecord], out: Option<&str>) {
    let mut s = base_session();
    let model = s.model().clone();
    // Mean log p of `answer`'s tokens after `prompt`, teacher forced (split as `amend eval`
    // splits prompt and answer).
    let lp = |s: &mut Session, prompt: &str, answer: &str| -> f32 {
        let (p, a) = prompt_answer_tokens(&model, prompt, answer).unwrap();
        let mut t = p.clone();
        t.extend_from_slice(&a);
        s.kv_clear();
        s.prefill(&t, Logits::From(p.len() - 1)).unwrap();
        let mut sum = 0f32;
        for (j, &tok) in a.iter().enumerate() {
            let l = s.logits(p.len() - 1 + j).unwrap();
            let m = l.iter().cloned().fold(f32::MIN, f32::max);
            let z = l.iter().map(|x| (x - m).exp()).sum::<f32>().ln() + m;
            sum += l[tok as usize] - z;
        }
        sum / a.len() as f32
    };
    // Square roots of the next-token probabilities after `{prompt} Answer:`.
    let dist = |s: &mut Session, prompt: &str| -> Vec<f32> {
        let p = s.tokenize(&format!("{prompt} Answer:"), true).unwrap();
        s.kv_clear();
        s.prefill(&p, Logits::Last).unwrap();
        let l = s.last_logits().unwrap();
        let m = l.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = l.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        e.iter().map(|x| (x / z).sqrt()).collect()
    };
    let mut out = out.map(|p| std::fs::File::create(p).unwrap());
    let mut by = vec![<[Vec<f32>; KINDS]>::default(); 3];
    for r in data {
        let gt = r.ground_truth.clone().unwrap_or_default();
        let (g0, n0) = (
            lp(&mut s, &r.prompt, &gt),
            lp(&mut s, &r.prompt, &r.target_new),
        );
        let d0 = dist(&mut s, &r.prompt);
        for (k, text) in probes(r) {
            let g = lp(&mut s, text, &gt) - g0;
            let n = lp(&mut s, text, &r.target_new) - n0;
            let bc = dot(&dist(&mut s, text), &d0);
            for (i, v) in [g, n, bc].into_iter().enumerate() {
                by[i][k].push(v);
            }
            if let Some(f) = out.as_mut() {
                writeln!(f, "{}\t{k}\t{g}\t{n}\t{bc}\t{text}", r.id).unwrap();
            }
        }
    }
    let names = ["Δlog p ground truth", "Δlog p target", "next-token BC"];
    report(&names.map(String::from), &by);
}

/// Rows of `rows` outside the best match of each `subject` row (MaxSim picks, as in routing).
fn rest_rows(rows: &[f32], subject: &[f32], d: usize) -> Vec<Vec<f32>> {
    let mut picked = vec![false; rows.len() / d];
    for s in subject.chunks_exact(d) {
        let best = rows
            .chunks_exact(d)
            .map(|q| dot(s, q))
            .enumerate()
            .fold((0, f32::MIN), |b, (j, c)| if c > b.1 { (j, c) } else { b });
        picked[best.0] = true;
    }
    rows.chunks_exact(d)
        .zip(&picked)
        .filter(|(_, &p)| !p)
        .map(|(r, _)| r.to_vec())
        .collect()
}

/// Mean and min over `from` of each row's best cosine among `to`.
fn coverage(from: &[Vec<f32>], to: &[Vec<f32>]) -> (f32, f32) {
    if from.is_empty() || to.is_empty() {
        return (0.0, 0.0);
    }
    let best: Vec<f32> = from
        .iter()
        .map(|a| to.iter().map(|b| dot(a, b)).fold(f32::MIN, f32::max))
        .collect();
    let min = best.iter().cloned().fold(f32::MAX, f32::min);
    (best.iter().sum::<f32>() / best.len() as f32, min)
}

fn align(data: &[EditRecord]) {
    let scope =
        ScopeModel::open(amend_runtime::default_scope_model_path().unwrap(), Some(2)).unwrap();
    let d = scope.n_embd();
    let mut by = vec![<[Vec<f32>; KINDS]>::default(); 5];
    for r in data {
        let s = r.subject.clone().unwrap_or_default();
        let sub = scope.encode(&s).unwrap();
        let mrest = rest_rows(&scope.encode(&r.prompt).unwrap().rows, &sub.rows, d);
        let strip = |t: &str| strip_subject(t, &s).unwrap_or_else(|| t.to_string());
        let mstrip = scope.encode(&strip(&r.prompt)).unwrap().pooled;
        for (k, text) in probes(r) {
            let qrest = rest_rows(&scope.encode(text).unwrap().rows, &sub.rows, d);
            let (a, b) = coverage(&mrest, &qrest);
            let (c, e) = coverage(&qrest, &mrest);
            let st = dot(&scope.encode(&strip(text)).unwrap().pooled, &mstrip);
            for (i, v) in [a, b, c, e, st].into_iter().enumerate() {
                by[i][k].push(v);
            }
        }
    }
    let names = [
        "record -> query, mean",
        "record -> query, min",
        "query -> record, mean",
        "query -> record, min",
        "stripped pooled cosine",
    ];
    report(&names.map(String::from), &by);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: relation_signals state|answer|align DATA.json [OUT.tsv]");
        std::process::exit(2);
    };
    let data = dataset::load(path.as_ref(), DataFormat::Auto).unwrap();
    match mode.as_str() {
        "state" => state(&data),
        "answer" => answer(&data, args.get(3).map(String::as_str)),
        "align" => align(&data),
        other => {
            eprintln!("unknown mode {other:?}: state, answer or align");
            std::process::exit(2);
        }
    }
}
