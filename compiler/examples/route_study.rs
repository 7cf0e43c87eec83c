//! Routing study (the harness behind docs/eval.md's router figures): per probe of a data set,
//! the scope-model terms against its own record and the nearest other records, written as JSONL
//! for offline analysis. Usage: route_study DATA.json OUT.jsonl [SCOPE.gguf]
use std::io::Write;

use amend_compiler::dataset::{self, DataFormat};
use amend_edits::families::{l2_normalize, subject_relation};
use amend_runtime::ScopeModel;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

struct Rec {
    pooled: Vec<f32>,
    sub_rows: Vec<f32>,
    rel_mean: Vec<f32>,
    rel_strip: Vec<f32>,
    rel_it: Vec<f32>,
    sub_tokens: usize,
}

fn find(hay: &[i32], needle: &[i32]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| hay[i..i + needle.len()] == *needle)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let data = dataset::load(args[1].as_ref(), DataFormat::Auto).unwrap();
    let scope_path = args
        .get(3)
        .map(std::path::PathBuf::from)
        .or_else(amend_runtime::default_scope_model_path)
        .unwrap();
    let scope = ScopeModel::open(&scope_path, Some(1)).unwrap();
    let d = scope.n_embd();
    let it = scope.tokenize("it").unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[2]).unwrap());
    let strip = |toks: &[i32], span: std::ops::Range<usize>, with: &[i32]| -> Vec<f32> {
        let mut t: Vec<i32> = toks[..span.start].to_vec();
        t.extend_from_slice(with);
        t.extend_from_slice(&toks[span.end..]);
        if t.is_empty() {
            t = with.to_vec();
        }
        scope.encode_tokens(t).unwrap().pooled
    };
    let recs: Vec<Rec> = data
        .iter()
        .map(|r| {
            let enc = scope.encode(&r.prompt).unwrap();
            let subj = r.subject.clone().unwrap_or_default();
            let st = scope.tokenize(&subj).unwrap();
            let at = find(&enc.tokens, &st)
                .unwrap_or_else(|| panic!("subject {subj:?} in {:?}", r.prompt));
            let span = at..at + st.len();
            let sub_rows = enc.rows[span.start * d..span.end * d].to_vec();
            let mut rel = vec![0f32; d];
            for (j, row) in enc.rows.chunks_exact(d).enumerate() {
                if !span.contains(&j) {
                    rel.iter_mut().zip(row).for_each(|(a, x)| *a += x);
                }
            }
            l2_normalize(&mut rel);
            Rec {
                pooled: enc.pooled.clone(),
                sub_rows,
                rel_mean: rel,
                rel_strip: strip(&enc.tokens, span.clone(), &[]),
                rel_it: strip(&enc.tokens, span, &it),
                sub_tokens: st.len(),
            }
        })
        .collect();
    for (ri, r) in data.iter().enumerate() {
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
            let q = scope.encode(&p).unwrap();
            let mut cands: Vec<(f32, usize)> = recs
                .iter()
                .enumerate()
                .map(|(i, c)| (dot(&c.pooled, &q.pooled), i))
                .collect();
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut list: Vec<usize> = cands.iter().take(5).map(|c| c.1).collect();
            if !list.contains(&ri) {
                list.push(ri);
            }
            for ci in list {
                let c = &recs[ci];
                let (subject, rel_mean) = subject_relation(&c.sub_rows, &c.rel_mean, &q.rows, d);
                // Query positions the subject rows pick; strip their min..max span when it is
                // compact, else nothing can be stripped reliably.
                let m = q.tokens.len();
                let mut picked = Vec::new();
                for s in c.sub_rows.chunks_exact(d) {
                    let best = (0..m)
                        .max_by(|&a, &b| {
                            dot(s, &q.rows[a * d..(a + 1) * d])
                                .total_cmp(&dot(s, &q.rows[b * d..(b + 1) * d]))
                        })
                        .unwrap_or(0);
                    picked.push(best);
                }
                let lo = *picked.iter().min().unwrap_or(&0);
                let hi = picked.iter().max().map_or(0, |h| h + 1);
                let compact = hi - lo <= c.sub_tokens + 1;
                let (rs, ri_) = if compact && m > 0 {
                    let qs = strip(&q.tokens, lo..hi, &[]);
                    let qi = strip(&q.tokens, lo..hi, &it);
                    (dot(&qs, &c.rel_strip), dot(&qi, &c.rel_it))
                } else {
                    (f32::NAN, f32::NAN)
                };
                writeln!(
                    out,
                    "{{\"rec\":{ri},\"kind\":{:?},\"prompt\":{:?},\"cand\":{ci},\"own\":{},\"pooled\":{},\"subject\":{},\"rel_mean\":{},\"rel_strip\":{},\"rel_it\":{},\"compact\":{}}}",
                    kind,
                    p,
                    ci == ri,
                    cands.iter().find(|x| x.1 == ci).unwrap().0,
                    subject,
                    rel_mean,
                    if rs.is_nan() { -9.0 } else { rs },
                    if ri_.is_nan() { -9.0 } else { ri_ },
                    compact
                )
                .unwrap();
            }
        }
    }
}
