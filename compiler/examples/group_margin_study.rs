//! Relation-group margin study (issue 16): where a record has a group, how far below the
//! query's best group does the record's own group score, for rephrases (should route) and for
//! same-subject probes under another relation (should not)? Prints the routing of both under
//! "in scope when the record's group scores within DELTA of the query's best group" for several
//! DELTA, with the pooled and subject terms at the study thresholds of relation_study.
//! Usage: group_margin_study LEXICON.txt MIN_SCORE DATA.json...
use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::methods::relation_groups::Lexicon;
use amend_compiler::methods::scope_routing::{encode_record, terms};
use amend_edits::families::strip_subject;
use amend_runtime::ScopeModel;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let lex = Lexicon::parse(&std::fs::read_to_string(&args[1]).unwrap()).unwrap();
    let tau: f32 = args[2].parse().unwrap();
    let scope =
        ScopeModel::open(amend_runtime::default_scope_model_path().unwrap(), Some(2)).unwrap();
    let templates = lex.encode(&scope).unwrap();
    let groups = lex.groups(scope.n_embd(), &templates, -1.0).unwrap();
    // Per group, the best template cosine of a text with `subject` replaced by "it" (what the
    // runtime's margin rule reads).
    let group_scores = |text: &str, subject: &str| -> Vec<f32> {
        let t = strip_subject(text, subject).unwrap_or_else(|| text.to_string());
        groups
            .group_scores(&scope.encode(&t).unwrap().pooled)
            .unwrap()
    };
    let argmax = |v: &[f32]| {
        let mut b = 0;
        for i in 0..v.len() {
            if v[i] > v[b] {
                b = i;
            }
        }
        b
    };
    let deltas = [0.0f32, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1];
    let (pf, sf) = (0.50f32, 0.507f32);
    for path in &args[3..] {
        let data = dataset::load(path.as_ref(), DataFormat::Auto).unwrap();
        // [delta][rephrase, same subject] routed, and totals, over grouped records only.
        let mut routed = vec![[0usize; 2]; deltas.len()];
        let mut total = [0usize; 2];
        let mut gaps: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
        let mut grouped = 0;
        for r in &data {
            let s = r.subject.clone().unwrap_or_default();
            let rs = group_scores(&r.prompt, &s);
            let g = argmax(&rs);
            if rs[g] < tau {
                continue;
            }
            grouped += 1;
            let rr = encode_record(&scope, &r.prompt, &s).unwrap();
            let subj: Vec<&str> = r
                .locality
                .iter()
                .filter(|p| p.kind == "Subject_Specificity")
                .map(|p| p.prompt.as_str())
                .collect();
            for (kind, texts) in [
                (
                    0,
                    r.rephrase_prompts
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>(),
                ),
                (1, subj),
            ] {
                for text in texts {
                    let (po, su, _) = terms(&scope, &rr, text).unwrap();
                    total[kind] += 1;
                    if po < pf || su < sf {
                        continue;
                    }
                    let qs = group_scores(text, &s);
                    let best = qs[argmax(&qs)];
                    let gap = best - qs[g];
                    gaps[kind].push(gap);
                    for (k, &delta) in deltas.iter().enumerate() {
                        if best >= tau && gap <= delta {
                            routed[k][kind] += 1;
                        }
                    }
                }
            }
        }
        let pc = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
        println!("{path}: {grouped}/{} records grouped; rephrases {}, same-subject probes {} (of grouped records)", data.len(), total[0], total[1]);
        for (k, &delta) in deltas.iter().enumerate() {
            println!(
                "  delta {delta:.2}: rephrase routed {:.1}%, same subject routed {:.1}%",
                pc(routed[k][0], total[0]),
                pc(routed[k][1], total[1])
            );
        }
        for (kind, name) in [(0, "rephrase"), (1, "same subject")] {
            let mut v = gaps[kind].clone();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let q = |f: f64| {
                v.get(((v.len() as f64 - 1.0) * f) as usize)
                    .copied()
                    .unwrap_or(f32::NAN)
            };
            println!(
                "  {name} gaps (terms passed, n={}): p25 {:.3} p50 {:.3} p75 {:.3} p90 {:.3}",
                v.len(),
                q(0.25),
                q(0.5),
                q(0.75),
                q(0.9)
            );
        }
    }
}
