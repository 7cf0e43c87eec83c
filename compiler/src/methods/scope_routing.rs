//! Scope-model routing data for a memory and its calibration on synthesized hard negatives.
//!
//! Per record the scope model (all-MiniLM-L6-v2, `amend_runtime::ScopeModel`) encodes the
//! prompt once: the pooled unit vector, the subject's token rows (found by the subject's token
//! ids inside the prompt's), and the relation embedding (the mean of the other token rows).
//! `Memory::route` scores a request with the same three terms.
//!
//! Calibration never sees the records' rephrases or locality prompts unless the user hands them
//! over (`amend compile --use-probes`). It synthesizes, per record:
//! - swapped subjects: the record's prompt with another subject in place of its own (subjects of
//!   other records in the batch, then a built-in list): the subject term must reject them;
//! - other relations: the record's subject in built-in relation templates (question and
//!   statement forms), leaving out the relation closest to the record's own: once the subject
//!   matches, the relation term must reject them.
//!
//! `subject threshold = max(subject term over swapped subjects) + margin`, then `relation
//! threshold = the 95th percentile of the relation term over the negatives that pass the pooled
//! floor and the subject threshold, + margin`, each capped so a bad negative cannot push a
//! threshold past what any rephrase reaches.

use amend_edits::families::subject_relation;
use amend_runtime::ScopeModel;

use crate::error::{CompileError, Result};

/// Subjects swapped into an edit's prompt after those of the other edits of the batch.
pub const BUILTIN_SUBJECTS: &[&str] = &[
    "Barack Obama",
    "Marie Curie",
    "Leonardo da Vinci",
    "William Shakespeare",
    "Taylor Swift",
    "Cristiano Ronaldo",
    "Germany",
    "Brazil",
    "India",
    "Mexico",
    "Norway",
    "Tokyo",
    "Chicago",
    "Cairo",
    "Google",
    "Amazon",
    "Nike",
    "the Eiffel Tower",
    "the Nile",
    "Mount Kilimanjaro",
    "the piano",
    "chocolate",
    "the Titanic",
    "Pablo Picasso",
    "Isaac Newton",
    "Coca-Cola",
    "the Pacific Ocean",
    "Sweden",
    "Beethoven",
    "the Louvre",
];

/// Relation templates (`{}` = the subject), each in statement and question form.
pub const BUILTIN_RELATIONS: &[[&str; 2]] = &[
    ["{} was born in the city of", "Where was {} born?"],
    ["{} was born in the year", "When was {} born?"],
    ["{} died in the year", "When did {} die?"],
    ["The capital of {} is", "What is the capital of {}?"],
    ["The population of {} is", "How many people live in {}?"],
    [
        "The official language of {} is",
        "What language is spoken in {}?",
    ],
    ["{} is located in", "Where is {} located?"],
    ["{} was founded by", "Who founded {}?"],
    ["{} was founded in the year", "When was {} founded?"],
    ["The CEO of {} is", "Who is the CEO of {}?"],
    ["{} is famous for", "What is {} famous for?"],
    ["{} is a citizen of", "What is the nationality of {}?"],
    ["The profession of {} is", "What does {} do for a living?"],
    ["{} was written by", "Who wrote {}?"],
    ["{} was created by", "Who created {}?"],
    ["The currency of {} is", "What currency is used in {}?"],
    ["{} is married to", "Who is {} married to?"],
    ["The color of {} is", "What color is {}?"],
    ["{} is made of", "What is {} made of?"],
    ["The sport {} plays is", "What sport does {} play?"],
    [
        "The headquarters of {} are in",
        "Where are the headquarters of {}?",
    ],
    ["{} is a member of", "What group is {} a member of?"],
    ["The religion of {} is", "What religion does {} follow?"],
    ["The size of {} is", "How big is {}?"],
];

/// How many swapped subjects and other relations each record is calibrated against (the
/// compile-time cost is one scope-model encode per negative).
pub const SWAPS_PER_RECORD: usize = 6;
pub const RELATIONS_PER_RECORD: usize = 8;

/// One record's routing data.
#[derive(Clone, Debug)]
pub struct RecordRouting {
    pub pooled: Vec<f32>,
    pub subject_rows: Vec<f32>,
    pub relation: Vec<f32>,
}

fn rt(e: amend_runtime::RuntimeError) -> CompileError {
    CompileError::Runtime(e.to_string())
}

pub use crate::dataset::find_subject;

/// Encodes a record's prompt: pooled vector, the subject's rows and the relation embedding.
pub fn encode_record(scope: &ScopeModel, prompt: &str, subject: &str) -> Result<RecordRouting> {
    let d = scope.n_embd();
    let enc = scope.encode(prompt).map_err(rt)?;
    let sub = scope.tokenize(subject).map_err(rt)?;
    let n = enc.tokens.len();
    let at = (!sub.is_empty() && sub.len() <= n)
        .then(|| {
            (0..=n - sub.len())
                .rev()
                .find(|&i| enc.tokens[i..i + sub.len()] == sub[..])
        })
        .flatten();
    let (subject_rows, relation) = match at {
        Some(i) => {
            let subject_rows = enc.rows[i * d..(i + sub.len()) * d].to_vec();
            let mut rel = vec![0f32; d];
            let mut any = false;
            for (j, row) in enc.rows.chunks_exact(d).enumerate() {
                if !(i..i + sub.len()).contains(&j) {
                    any = true;
                    rel.iter_mut().zip(row).for_each(|(r, x)| *r += x);
                }
            }
            if !any || !amend_edits::families::l2_normalize(&mut rel) {
                rel = enc.pooled.clone();
            }
            (subject_rows, rel)
        }
        // The subject is part of a longer word: its rows from an encode of its own.
        None => {
            let s = scope.encode(subject).map_err(rt)?;
            if s.rows.is_empty() {
                return Err(CompileError::Hparams(format!(
                    "subject {subject:?} has no tokens for the scope model"
                )));
            }
            (s.rows, enc.pooled.clone())
        }
    };
    Ok(RecordRouting {
        pooled: enc.pooled,
        subject_rows,
        relation,
    })
}

/// The three routing terms of `query` against record `r`: (pooled, subject, relation).
pub fn terms(scope: &ScopeModel, r: &RecordRouting, query: &str) -> Result<(f32, f32, f32)> {
    let q = scope.encode(query).map_err(rt)?;
    let pooled: f32 = r.pooled.iter().zip(&q.pooled).map(|(a, b)| a * b).sum();
    let (s, rel) = subject_relation(&r.subject_rows, &r.relation, &q.rows, scope.n_embd());
    Ok((pooled, s, rel))
}

/// A synthesized (or user-given) negative of one record.
#[derive(Clone, Debug, PartialEq)]
pub struct Negative {
    pub record: usize,
    pub kind: NegativeKind,
    pub prompt: String,
    pub pooled: f32,
    pub subject: f32,
    pub relation: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NegativeKind {
    SwappedSubject,
    OtherRelation,
    /// A locality prompt the user gave (`--use-probes`).
    Given,
}

/// The negatives of record `index` (see the module docs). `subjects` are the batch's subjects.
pub fn negatives(
    scope: &ScopeModel,
    index: usize,
    r: &RecordRouting,
    prompt: &str,
    subject: &str,
    subjects: &[&str],
    given: &[String],
) -> Result<Vec<Negative>> {
    let mut out = Vec::new();
    let push = |kind, q: String, out: &mut Vec<Negative>| -> Result<()> {
        let (pooled, s, rel) = terms(scope, r, &q)?;
        out.push(Negative {
            record: index,
            kind,
            prompt: q,
            pooled,
            subject: s,
            relation: rel,
        });
        Ok(())
    };
    // Swapped subjects: the next records' subjects, then the built-in list, from a per-record
    // offset so that different records meet different subjects.
    if let Some(span) = find_subject(prompt, subject) {
        let own = subject.to_ascii_lowercase();
        let n = subjects.len();
        let others = (1..n)
            .map(|k| subjects[(index + k) % n])
            .chain(
                (0..BUILTIN_SUBJECTS.len())
                    .map(|k| BUILTIN_SUBJECTS[(index + k) % BUILTIN_SUBJECTS.len()]),
            )
            .filter(|s| {
                let l = s.to_ascii_lowercase();
                !l.is_empty() && !own.contains(&l) && !l.contains(&own)
            });
        let mut seen: Vec<String> = Vec::new();
        for s in others {
            if seen.len() == SWAPS_PER_RECORD {
                break;
            }
            if seen.iter().any(|x| x.eq_ignore_ascii_case(s)) {
                continue;
            }
            seen.push(s.to_string());
            let q = format!("{}{}{}", &prompt[..span.start], s, &prompt[span.end..]);
            push(NegativeKind::SwappedSubject, q, &mut out)?;
        }
    }
    // Other relations: score every built-in relation's statement form, leave out the one
    // closest to the record's own relation (it may be the same relation), then both forms of
    // the next RELATIONS_PER_RECORD / 2 from a per-record offset.
    let stmt: Vec<(f32, usize)> = BUILTIN_RELATIONS
        .iter()
        .enumerate()
        .map(|(k, forms)| Ok((terms(scope, r, &forms[0].replace("{}", subject))?.2, k)))
        .collect::<Result<_>>()?;
    let closest = stmt
        .iter()
        .copied()
        .fold((f32::NEG_INFINITY, 0), |a, b| if b.0 > a.0 { b } else { a })
        .1;
    let n = BUILTIN_RELATIONS.len();
    let mut taken = 0;
    for k in (0..n).map(|k| (index * 5 + k) % n) {
        if k == closest || taken == RELATIONS_PER_RECORD / 2 {
            continue;
        }
        taken += 1;
        for form in BUILTIN_RELATIONS[k] {
            push(
                NegativeKind::OtherRelation,
                form.replace("{}", subject),
                &mut out,
            )?;
        }
    }
    for g in given {
        push(NegativeKind::Given, g.clone(), &mut out)?;
    }
    Ok(out)
}

/// The quantile of the relation terms of same-subject negatives the relation threshold sits
/// above (see `calibrate`).
pub const RELATION_QUANTILE: f32 = 0.95;

/// The calibrated thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeCalibration {
    pub subject_threshold: f32,
    pub relation_threshold: f32,
    /// Negatives rejected by the thresholds, of all negatives.
    pub rejected: (usize, usize),
    /// The subject or relation threshold hit its cap.
    pub capped: bool,
}

/// Thresholds from the negatives (see the module docs).
pub fn calibrate(
    negs: &[Negative],
    pooled_floor: f32,
    margin: f32,
    max_subject: f32,
    max_relation: f32,
) -> ScopeCalibration {
    let max_of = |it: &mut dyn Iterator<Item = f32>| it.fold(f32::NEG_INFINITY, f32::max);
    let s_raw = max_of(
        &mut negs
            .iter()
            .filter(|n| n.kind == NegativeKind::SwappedSubject && n.pooled >= pooled_floor)
            .map(|n| n.subject),
    ) + margin;
    // max/min, not clamp: clamp panics on a cap below 0 (Hparams refuses one; this stays total).
    let subject_threshold = s_raw.max(0.0).min(max_subject);
    // The relation threshold sits above a high quantile, not the maximum: the built-in
    // relations include near-synonyms of many edits' own relation ("founded by" / "created
    // by"), which are not negatives at all (measured on memory-dev: the top 1% of "other
    // relation" terms were such synonyms, 0.77-0.88, against a 95th percentile of 0.68).
    let mut rel: Vec<f32> = negs
        .iter()
        .filter(|n| n.pooled >= pooled_floor && n.subject >= subject_threshold)
        .map(|n| n.relation)
        .collect();
    rel.sort_by(|a, b| a.total_cmp(b));
    let r_raw = match rel.len() {
        0 => f32::NEG_INFINITY,
        n => rel[((n - 1) as f32 * RELATION_QUANTILE).round() as usize],
    } + margin;
    let relation_threshold = r_raw.max(0.0).min(max_relation);
    let rejected = negs
        .iter()
        .filter(|n| {
            n.pooled < pooled_floor
                || n.subject < subject_threshold
                || n.relation < relation_threshold
        })
        .count();
    ScopeCalibration {
        subject_threshold,
        relation_threshold,
        rejected: (rejected, negs.len()),
        capped: s_raw > max_subject || r_raw > max_relation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(kind: NegativeKind, pooled: f32, subject: f32, relation: f32) -> Negative {
        Negative {
            record: 0,
            kind,
            prompt: String::new(),
            pooled,
            subject,
            relation,
        }
    }

    #[test]
    fn thresholds_sit_above_the_hardest_negative() {
        let negs = [
            neg(NegativeKind::SwappedSubject, 0.8, 0.5, 0.9),
            neg(NegativeKind::SwappedSubject, 0.8, 0.6, 0.95),
            neg(NegativeKind::OtherRelation, 0.7, 0.95, 0.6),
            neg(NegativeKind::OtherRelation, 0.3, 0.95, 0.8),
        ];
        let c = calibrate(&negs, 0.5, 0.02, 0.9, 0.9);
        assert!((c.subject_threshold - 0.62).abs() < 1e-6, "{c:?}");
        // The 0.3-pooled negative is already out: only the 0.6 relation counts.
        assert!((c.relation_threshold - 0.62).abs() < 1e-6, "{c:?}");
        assert_eq!(c.rejected, (4, 4));
        assert!(!c.capped);
        let c = calibrate(&negs, 0.5, 0.02, 0.55, 0.9);
        assert!(c.capped && c.subject_threshold == 0.55);
    }
}
