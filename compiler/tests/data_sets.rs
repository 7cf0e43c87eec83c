//! The repository's evaluation sets (data/*.json) are well formed for the retrieval-memory and
//! low-rank evaluations: sizes, probe kinds, styles, and no leakage between the development set,
//! the held-out sets and the original dev edits. No model needed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use amend_compiler::dataset::{load, DataFormat, EditRecord};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(name)
}

fn records(name: &str) -> Vec<EditRecord> {
    load(&data(name), DataFormat::Auto).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `style` per id, read from the raw JSON (the loader keeps only what the methods use).
fn styles(name: &str) -> HashMap<String, String> {
    let text = std::fs::read_to_string(data(name)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["style"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

const KINDS: [&str; 3] = ["Relation_Specificity", "Subject_Specificity", "Unrelated"];

fn check_memory_set(name: &str, min: usize, id_prefix: &str) -> Vec<EditRecord> {
    let recs = records(name);
    assert!(
        recs.len() >= min,
        "{name}: {} records, want >= {min}",
        recs.len()
    );
    let styles = styles(name);
    let mut questions = 0;
    for r in &recs {
        let id = &r.id;
        assert!(id.starts_with(id_prefix), "{name}: id {id}");
        assert!(
            r.subject_span().is_some(),
            "{id}: subject {:?} not in prompt",
            r.subject
        );
        let gt = r
            .ground_truth
            .as_deref()
            .unwrap_or_else(|| panic!("{id}: no ground truth"));
        assert!(
            !gt.eq_ignore_ascii_case(&r.target_new),
            "{id}: target equals ground truth"
        );
        assert!(!r.rephrase_prompts.is_empty(), "{id}: no rephrase");
        assert!(
            !r.rephrase_prompts.contains(&r.prompt),
            "{id}: rephrase equals prompt"
        );
        let count = |kind: &str| r.locality.iter().filter(|p| p.kind == kind).count();
        assert!(
            count("Relation_Specificity") >= 2,
            "{id}: < 2 Relation_Specificity"
        );
        assert!(
            count("Subject_Specificity") >= 1,
            "{id}: no Subject_Specificity"
        );
        assert!(count("Unrelated") >= 1, "{id}: no Unrelated");
        for p in &r.locality {
            assert!(
                KINDS.contains(&p.kind.as_str()),
                "{id}: probe kind {}",
                p.kind
            );
        }
        // Same-subject probes name the subject; same-relation probes do not.
        let subject = r.subject.as_deref().unwrap();
        for p in &r.locality {
            match p.kind.as_str() {
                "Subject_Specificity" => assert!(p.prompt.contains(subject), "{id}: {}", p.prompt),
                _ => assert!(!p.prompt.contains(subject), "{id}: {}", p.prompt),
            }
        }
        match styles.get(id).map(String::as_str) {
            Some("question") => {
                questions += 1;
                assert!(
                    r.prompt.ends_with('?'),
                    "{id}: question style, prompt {:?}",
                    r.prompt
                );
            }
            Some("statement") => assert!(!r.prompt.ends_with('?'), "{id}: {:?}", r.prompt),
            other => panic!("{id}: style {other:?}"),
        }
    }
    // About half of each style.
    let share = questions as f64 / recs.len() as f64;
    assert!(
        (0.4..=0.6).contains(&share),
        "{name}: {questions} questions of {}",
        recs.len()
    );
    recs
}

/// No record of `set` has the subject of a record in one of `others` (named for the message).
fn assert_subjects_disjoint(set: &[EditRecord], others: &[(&str, &[EditRecord])]) {
    for (name, other) in others {
        let subjects: HashSet<_> = other.iter().filter_map(|r| r.subject.as_deref()).collect();
        for r in set {
            let s = r.subject.as_deref().unwrap();
            assert!(
                !subjects.contains(s),
                "{}: subject {s} also in {name}",
                r.id
            );
        }
    }
}

#[test]
fn memory_sets_are_well_formed_and_disjoint() {
    let dev = check_memory_set("memory-dev.json", 240, "mem-dev-");
    let heldout = check_memory_set("memory-heldout.json", 80, "mem-ho-");
    let heldout2 = check_memory_set("memory-heldout2.json", 80, "mem-h2-");
    let heldout3 = check_memory_set("memory-heldout3.json", 60, "mem-h3-");
    let heldout4 = check_memory_set("memory-heldout4.json", 60, "mem-h4-");
    let heldout5 = check_memory_set("memory-heldout5.json", 60, "mem-h5-");
    let heldout6 = check_memory_set("memory-heldout6.json", 60, "mem-h6-");
    let heldout7 = check_memory_set("memory-heldout7.json", 60, "mem-h7-");
    let heldout8 = check_memory_set("memory-heldout8.json", 80, "mem-h8-");
    let heldout9 = check_memory_set("memory-heldout9.json", 28, "mem-h9-");
    let heldout10 = check_memory_set("memory-heldout10.json", 32, "mem-h10-");
    let heldout11 = check_memory_set("memory-heldout11.json", 60, "mem-h11-");
    let heldout12 = check_memory_set("memory-heldout12.json", 60, "mem-h12-");
    let heldout13 = check_memory_set("memory-heldout13.json", 60, "mem-h13-");
    let heldout14 = check_memory_set("memory-heldout14.json", 60, "mem-h14-");
    let original = records("dev-edits.json");

    let all: Vec<&EditRecord> = dev
        .iter()
        .chain(&heldout)
        .chain(&heldout2)
        .chain(&heldout3)
        .chain(&heldout4)
        .chain(&heldout5)
        .chain(&heldout6)
        .chain(&heldout7)
        .chain(&heldout8)
        .chain(&heldout9)
        .chain(&heldout10)
        .chain(&heldout11)
        .chain(&heldout12)
        .chain(&heldout13)
        .chain(&heldout14)
        .chain(&original)
        .collect();
    let mut ids = HashSet::new();
    for r in &all {
        assert!(
            ids.insert(r.id.as_str()),
            "duplicate id {} across data files",
            r.id
        );
    }

    // The held-out part is about other subjects than the development part, and each later
    // held-out set about subjects in no earlier file (heldout4 on: written by writers that read
    // no compiler code or lexicon; heldout6 to heldout8 in directories of their own).
    assert_subjects_disjoint(&heldout, &[("memory-dev", &dev)]);
    let in_order: [(&str, &[EditRecord]); 15] = [
        ("memory-dev", &dev),
        ("memory-heldout", &heldout),
        ("memory-heldout2", &heldout2),
        ("memory-heldout3", &heldout3),
        ("memory-heldout4", &heldout4),
        ("memory-heldout5", &heldout5),
        ("memory-heldout6", &heldout6),
        ("memory-heldout7", &heldout7),
        ("memory-heldout8", &heldout8),
        ("memory-heldout9", &heldout9),
        ("memory-heldout10", &heldout10),
        ("memory-heldout11", &heldout11),
        ("memory-heldout12", &heldout12),
        ("memory-heldout13", &heldout13),
        ("memory-heldout14", &heldout14),
    ];
    for i in 2..in_order.len() {
        let mut earlier = in_order[..i].to_vec();
        earlier.push(("dev-edits", &original));
        assert_subjects_disjoint(in_order[i].1, &earlier);
    }

    // A probe that is some edit's prompt or rephrase would measure that edit, not locality.
    let edit_prompts: HashSet<&str> = all
        .iter()
        .flat_map(|r| std::iter::once(&r.prompt).chain(&r.rephrase_prompts))
        .map(String::as_str)
        .collect();
    for r in &all {
        for p in &r.locality {
            assert!(
                !edit_prompts.contains(p.prompt.as_str()),
                "{}: probe {:?} is an edit prompt",
                r.id,
                p.prompt
            );
        }
    }
}

/// The shipped scope head (data/scope-head.safetensors, the compiler's builtin) names the
/// command that made it and the sha256 of every set it was trained and calibrated on, and those
/// sets in data/ still hash the same: editing a training set without retraining the head, or
/// shipping a head without its recipe, fails here (session 41: the head shipped in session 23
/// was not what its documented command made). The rebuild itself: `make scope-head-check`.
#[test]
fn the_shipped_scope_head_names_its_recipe_and_the_data_still_matches() {
    use sha2::Digest;
    let head = amend_compiler::methods::scope_head::HeadFile::parse(
        amend_compiler::methods::scope_head::BUILTIN,
    )
    .unwrap();
    let command = &head.provenance["trained_with"];
    let mut named = 0;
    for key in ["data_sha256", "calibrate_sha256"] {
        let flag = if key == "data_sha256" {
            "--data"
        } else {
            "--calibrate"
        };
        for line in head.provenance[key].lines() {
            let (hex, name) = line.split_once("  ").unwrap();
            let bytes = std::fs::read(data(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                amend_edits::keys::to_hex(&sha2::Sha256::digest(&bytes)),
                hex,
                "data/{name} changed since the shipped scope head was trained on it; retrain \
                 it with the command in its trained_with metadata"
            );
            assert!(command.contains(&format!("{flag} {name}")), "{command}");
            named += 1;
        }
    }
    // dev, heldout..heldout6, calibrated on heldout7 (docs/methods.md).
    assert_eq!(named, 8, "{:?}", head.provenance);
    assert!(
        command.contains("--calibrate memory-heldout7.json"),
        "{command}"
    );
}
