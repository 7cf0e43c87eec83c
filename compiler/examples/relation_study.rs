//! Relation-group study (issue 16; docs/eval.md "Relation groups"): classifies a prompt's
//! relation by its nearest template in a lexicon of relation groups (`data/relation-groups.txt`:
//! `name|template|template...`, `{}` the subject), each text encoded by the scope model with the
//! subject replaced by "it". Reports how often a record's rephrases and its same-subject probes
//! fall in the record's own group, and own-record routing with the calibrated thresholds against
//! the same with the group deciding the relation (pooled and subject terms unchanged). Misplaced
//! prompts are printed (`REPH`, `SUBJ`). Usage: relation_study DATA.json LEXICON.txt [MIN_SCORE]
use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::methods::relation_groups::Lexicon;
use amend_compiler::methods::scope_routing::{encode_record, terms};
use amend_edits::families::strip_subject;
use amend_runtime::ScopeModel;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let data = dataset::load(args[1].as_ref(), DataFormat::Auto).unwrap();
    let lex = std::fs::read_to_string(&args[2]).unwrap();
    let tau: f32 = args.get(3).map(|t| t.parse().unwrap()).unwrap_or(0.0);
    let scope =
        ScopeModel::open(amend_runtime::default_scope_model_path().unwrap(), Some(2)).unwrap();
    let lex = Lexicon::parse(&lex).unwrap();
    let templates = lex.encode(&scope).unwrap();
    let groups = lex.groups(scope.n_embd(), &templates, -1.0).unwrap();
    // The nearest template's group and cosine (every text gets one here: the study applies
    // MIN_SCORE itself, and a text without the subject is classified whole).
    let classify = |text: &str, subject: &str| -> (usize, f32) {
        let t = strip_subject(text, subject).unwrap_or_else(|| text.to_string());
        let q = scope.encode(&t).unwrap().pooled;
        let (g, c) = groups.classify(&q).unwrap();
        (g as usize, c)
    };
    let name = |g: usize| groups.name(g as u16);
    let (mut reph, mut reph_same, mut subj, mut subj_same, mut rel, mut rel_same) =
        (0, 0, 0, 0, 0, 0);
    let (mut rec_conf, mut reph_conf, mut reph_conf_same, mut subj_conf, mut subj_conf_diff) =
        (0, 0, 0, 0, 0);
    // Own-record routing under the calibrated thresholds (A) and with the group deciding the
    // relation when the record's group is confident (B): [rephrase, same subject, same relation,
    // unrelated] routed to their own record.
    let (pf, sf, rf) = (0.50f32, 0.507f32, 0.70f32);
    let mut routed_a = [0usize; 4];
    let mut routed_b = [0usize; 4];
    let mut total = [0usize; 4];
    for r in &data {
        let s = r.subject.clone().unwrap_or_default();
        let (g, top) = classify(&r.prompt, &s);
        let rr = encode_record(&scope, &r.prompt, &s).unwrap();
        let mut probe = |kind: usize, text: &str| {
            let (po, su, re) = terms(&scope, &rr, text).unwrap();
            total[kind] += 1;
            let a = po >= pf && su >= sf && re >= rf;
            routed_a[kind] += a as usize;
            let b = if top >= tau {
                let (gq, tq) = classify(text, &s);
                po >= pf && su >= sf && gq == g && tq >= tau
            } else {
                a
            };
            routed_b[kind] += b as usize;
        };
        for p in &r.rephrase_prompts {
            probe(0, p);
        }
        for pr in &r.locality {
            let k = match pr.kind.as_str() {
                "Subject_Specificity" => 1,
                "Relation_Specificity" => 2,
                _ => 3,
            };
            probe(k, &pr.prompt);
        }
        let conf = top >= tau;
        rec_conf += conf as usize;
        for p in &r.rephrase_prompts {
            let (gp, tp) = classify(p, &s);
            reph += 1;
            reph_same += (gp == g) as usize;
            if conf && tp >= tau {
                reph_conf += 1;
                reph_conf_same += (gp == g) as usize;
            }
            if gp != g {
                println!(
                    "REPH {} [{} {:.2}] -> [{} {:.2}] {:?} / {:?}",
                    r.id,
                    name(g),
                    top,
                    name(gp),
                    tp,
                    r.prompt,
                    p
                );
            }
        }
        for pr in &r.locality {
            if pr.kind == "Subject_Specificity" {
                let (gp, tp) = classify(&pr.prompt, &s);
                subj += 1;
                subj_same += (gp == g) as usize;
                if conf && tp >= tau {
                    subj_conf += 1;
                    subj_conf_diff += (gp != g) as usize;
                }
                if gp == g {
                    println!(
                        "SUBJ {} [{}] {:?} / {:?}",
                        r.id,
                        name(g),
                        r.prompt,
                        pr.prompt
                    );
                }
            } else if pr.kind == "Relation_Specificity" {
                let (gp, _) = classify(&pr.prompt, "");
                rel += 1;
                rel_same += (gp == g) as usize;
            }
        }
    }
    let pc = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    for (name, v) in [("thresholds", routed_a), ("groups", routed_b)] {
        println!(
            "{name}: routed to own record: rephrase {:.1}%, same subject {:.1}%, same relation {:.1}%, unrelated {:.1}%",
            pc(v[0], total[0]),
            pc(v[1], total[1]),
            pc(v[2], total[2]),
            pc(v[3], total[3])
        );
    }
    println!(
        "records confident (top >= {tau}): {}/{}",
        rec_conf,
        data.len()
    );
    println!(
        "rephrase same group: {:.1}% ({reph_same}/{reph}); both confident {reph_conf}: same {:.1}%",
        pc(reph_same, reph),
        pc(reph_conf_same, reph_conf)
    );
    println!(
        "same-subject probes same group: {:.1}% ({subj_same}/{subj}); both confident {subj_conf}: different {:.1}%",
        pc(subj_same, subj),
        pc(subj_conf_diff, subj_conf)
    );
    println!(
        "same-relation probes same group: {:.1}% ({rel_same}/{rel})",
        pc(rel_same, rel)
    );
}
